//! Whether the machine shares, and what: [`Availability`] with its [`Reason`]s, and the owner's
//! explicit [`OwnerPause`].

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The owner's explicit pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OwnerPause {
    /// When it ends by itself; `None` until `hearth resume`.
    #[schema(value_type = Option<String>)]
    pub until: Option<Timestamp>,
}

/// What the machine offers now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Availability {
    /// Jobs may run, within `capacity`.
    Sharing {
        /// What is offered, reserves taken off.
        capacity: Capacity,
        /// GPUs paused alone, with why.
        paused_gpus: Vec<GpuPause>,
    },
    /// No job may run; running ones are frozen.
    Paused {
        /// Every condition that holds, the first one the most direct.
        reasons: Vec<Reason>,
    },
}

impl Availability {
    /// Whether jobs may run.
    pub fn is_sharing(&self) -> bool {
        matches!(self, Self::Sharing { .. })
    }

    /// `sharing` or `paused`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sharing { .. } => "sharing",
            Self::Paused { .. } => "paused",
        }
    }
}

/// The offered capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Capacity {
    /// CPU, in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory.
    pub memory_bytes: u64,
    /// The GPUs offered.
    pub gpus: Vec<GpuCapacity>,
}

/// One offered GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuCapacity {
    /// NVML UUID.
    pub uuid: String,
    /// Memory offered.
    pub memory_bytes: u64,
}

/// A GPU paused on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuPause {
    /// NVML UUID.
    pub uuid: String,
    /// Why.
    pub reasons: Vec<Reason>,
}

/// Why sharing is paused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// The owner paused sharing.
    OwnerPaused {
        /// When the pause ends by itself.
        #[schema(value_type = Option<String>)]
        until: Option<Timestamp>,
    },
    /// The time is outside every window.
    OutsideWindow,
    /// The owner used the machine recently.
    OwnerActive {
        /// Seconds since the last input.
        idle_seconds: u64,
    },
    /// Something other than Hearth keeps the CPU busy.
    OwnerBusy {
        /// Percent of all cores.
        cpu_percent: f32,
    },
    /// The machine runs on battery.
    OnBattery,
    /// The CPU is too hot.
    CpuTooHot {
        /// Degrees Celsius.
        celsius: f32,
    },
    /// A program on the owner's list runs, or exited within the cooldown.
    Program {
        /// Its name.
        name: String,
    },
    /// This GPU is too hot.
    GpuTooHot {
        /// Degrees Celsius.
        celsius: f32,
    },
    /// The owner paused this GPU in the policy.
    GpuPausedByPolicy,
    /// Nothing holds any more, but a pause lasts its minimum time.
    MinimumPause {
        /// When sharing resumes unless something new holds.
        #[schema(value_type = String)]
        resumes_at: Timestamp,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OwnerPaused { until: Some(until) } => write!(f, "paused by the owner until {until}"),
            Self::OwnerPaused { until: None } => f.write_str("paused by the owner"),
            Self::OutsideWindow => f.write_str("outside the sharing windows"),
            Self::OwnerActive { idle_seconds } => write!(f, "the owner was active {idle_seconds} s ago"),
            Self::OwnerBusy { cpu_percent } => write!(f, "other programs use {cpu_percent:.0}% of the CPU"),
            Self::OnBattery => f.write_str("on battery"),
            Self::CpuTooHot { celsius } => write!(f, "the CPU is at {celsius:.0} °C"),
            Self::Program { name } => write!(f, "{name} is running"),
            Self::GpuTooHot { celsius } => write!(f, "the GPU is at {celsius:.0} °C"),
            Self::GpuPausedByPolicy => f.write_str("paused in the policy"),
            Self::MinimumPause { resumes_at } => write!(f, "the pause lasts its minimum, until {resumes_at}"),
        }
    }
}
