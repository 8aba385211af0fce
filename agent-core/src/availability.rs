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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The owner's levers, shared by the API and the availability task: the policy, the explicit
/// pause, and the desktop app's activity reports. Every change wakes the task at once.
#[derive(Debug)]
pub struct OwnerControls {
    policy_file: PathBuf,
    pause_file: PathBuf,
    policy: Mutex<Policy>,
    pause: Mutex<Option<OwnerPause>>,
    reports: Arc<Mutex<Option<Instant>>>,
    wake: Notify,
}

/// The file in the data dir that keeps an owner's pause across restarts.
pub const PAUSE_FILE: &str = "owner-pause.json";

impl OwnerControls {
    /// Loads the policy file and any pause left by the previous run (a pause that has ended by
    /// now is dropped).
    pub fn load(policy_file: &Path, data_dir: &Path) -> Result<Self, PolicyError> {
        let policy = Policy::load(policy_file)?;
        let pause_file = data_dir.join(PAUSE_FILE);
        let pause = std::fs::read(&pause_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<OwnerPause>(&bytes).ok())
            .filter(|pause| pause.until.is_none_or(|until| until > jiff::Timestamp::now()));
        Ok(Self {
            policy_file: policy_file.to_owned(),
            pause_file,
            policy: Mutex::new(policy),
            pause: Mutex::new(pause),
            reports: Arc::default(),
            wake: Notify::new(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Validates `text`, writes it as the policy file and applies it. An invalid policy changes
    /// nothing.
    pub fn set_policy(&self, text: &str) -> Result<Policy, PolicyError> {
        let policy = Policy::parse(text, "the new policy")?;
        Policy::store(&self.policy_file, text)?;
        *self.policy.lock().unwrap_or_else(PoisonError::into_inner) = policy.clone();
        self.wake.notify_one();
        Ok(policy)
    }

    /// The owner's pause in force, if any.
    pub fn pause_state(&self) -> Option<OwnerPause> {
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pauses sharing, for `length` or until [`OwnerControls::resume`]. Kept across restarts.
    pub fn pause(&self, length: Option<Duration>) -> std::io::Result<OwnerPause> {
        let until = match length {
            Some(length) => Some(jiff::Timestamp::now().checked_add(length).map_err(std::io::Error::other)?),
            None => None,
        };
        let pause = OwnerPause { until };
        policy::replace_file(&self.pause_file, &serde_json::to_vec(&pause).map_err(std::io::Error::other)?)?;
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = Some(pause);
        self.wake.notify_one();
        Ok(pause)
    }

    /// Ends the owner's pause.
    pub fn resume(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.pause_file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.wake.notify_one();
        Ok(())
    }

    /// The desktop app says the owner last used the machine `idle` ago.
    pub fn report_idle(&self, idle: Duration) {
        let at = Instant::now().checked_sub(idle).unwrap_or_else(Instant::now);
        *self.reports.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
        self.wake.notify_one();
    }

    /// Where [`signals::Activity`] reads the desktop app's reports.
    pub fn reports(&self) -> Arc<Mutex<Option<Instant>>> {
        Arc::clone(&self.reports)
    }

    /// Resolves when the owner changed something.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}
