//! Jobs: what a consumer asks to run, its life cycle, the runners and the sandbox around them.
//!
//! - [`spec`]: the parsed and validated job spec every runner takes.
//! - `hearth_api::jobs`: the states a job passes through and the one function that moves it, with
//!   the job record the API shows.
//! - [`sandbox`]: the one containment every job runs in (namespaces, private root, cgroups,
//!   rlimits, capabilities, seccomp), through the hidden `__sandbox-shim` step and the init it forks.
//! - [`image`]: OCI image archives and rootfs tars, unpacked once into a content-addressed cache.
//! - [`wasi`]: wasmtime for WASI modules, compiled once into a content-addressed cache.
//! - [`runner`]: takes a spec to a terminal state under the sandbox, with pause, resume, cancel,
//!   a deadline, a disk limit and bounded logs.
//! - [`supervisor`]: the daemon's jobs: records in the store, events on the bus, control.

pub mod image;
pub mod runner;
pub mod sandbox;
pub use hearth_api::spec;
pub mod supervisor;
pub mod wasi;

pub use hearth_api::jobs::{
    JobAction, JobRecord, JobState, LogChunk, OwnerNotice, Stream, Transition, TransitionError,
};
pub use runner::{Control, EVENT_BUFFER, GpuDevice, GpuGrant, Job, Outcome, RunEvent, Runner};
pub use spec::{Demand, Image, JobKind, JobSpec, Limits, SpecError};
pub use supervisor::{Supervisor, SupervisorError};
