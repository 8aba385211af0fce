//! Availability: whether this machine shares now, and how much. The owner's use always comes first.
//!
//! - [`policy`]: the owner's rules (`policy.toml`): windows, idle time, AC power, temperatures,
//!   reserves, exclusive programs, per-GPU rules and hysteresis.
//! - [`signals`]: what is measured, each source behind a small trait so tests can feed it: the
//!   clock, power supplies, hwmon temperatures, input devices, logind, CPU load, the process table.
//! - [`evaluate`]: the one evaluator, a pure function of policy, signals and time (plus the
//!   [`Memory`] it carries between calls) giving `Sharing { capacity }` or `Paused { reasons }`.
//!
//! The daemon samples the signals every second, evaluates, and publishes the result on a watch
//! channel and the event stream; the job supervisor freezes every running job when it turns
//! Paused and thaws them when sharing returns (see `daemon::availability`).

pub mod evaluate;
pub mod policy;
pub mod signals;

pub use evaluate::{Availability, Capacity, Memory, OwnerPause, Reason, Signals, evaluate};
pub use policy::{Policy, PolicyError};
