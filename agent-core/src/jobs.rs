//! Jobs: what a consumer asks to run, and (as the job-execution work lands) their life cycle,
//! runners and containment.
//!
//! So far this holds [`spec`], the parsed and validated job spec that every runner will take, and
//! [`lifecycle`], the states a job passes through and the one function that moves it between
//! them. It spawns nothing.

pub mod lifecycle;
pub mod spec;

pub use lifecycle::{JobState, Transition, TransitionError};
pub use spec::{Demand, Image, JobKind, JobSpec, Limits, SpecError};
