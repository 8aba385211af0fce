//! Jobs: what a consumer asks to run, and (as the job-execution work lands) their life cycle,
//! runners and containment.
//!
//! So far this holds [`spec`], the parsed and validated job spec that every runner will take. It
//! spawns nothing.

pub mod spec;

pub use spec::{Demand, Image, JobKind, JobSpec, Limits, SpecError};
