//! What a machine has ([`Resources`]: CPU, memory, the disk holding the data dir, the OS and its
//! NVIDIA GPUs) and an amount of it that a job asks for or holds ([`Allocation`]). Their
//! snake_case JSON field names are part of the CLI and API contract.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Everything this machine could offer, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    /// The processor.
    pub cpu: Cpu,
    /// Main memory.
    pub memory: Memory,
    /// The disk that holds the data dir.
    pub disk: Disk,
    /// The operating system.
    pub os: Os,
    /// NVIDIA GPUs in NVML's order; empty on a CPU-only machine.
    pub gpus: Vec<Gpu>,
}

/// The processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cpu {
    /// Brand string, e.g. "AMD Ryzen 9 7950X 16-Core Processor"; empty if unknown.
    pub model: String,
    /// Physical cores in the machine.
    pub cores: u32,
    /// Logical CPUs this process may run on: what `nproc` prints.
    pub threads: u32,
    /// Machine-wide busy time since the previous sample, 0–100.
    pub usage_percent: f32,
}

/// Main memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Memory {
    /// Installed memory the kernel manages (`MemTotal`).
    pub total_bytes: u64,
    /// Memory that can be given to new work without swapping (`MemAvailable`).
    pub available_bytes: u64,
}

/// The file system that holds a directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    /// The directory asked about, as given.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Where the file system holding it is mounted; empty if no listed disk holds it.
    #[schema(value_type = String)]
    pub mount_point: PathBuf,
    /// Size of that file system.
    pub total_bytes: u64,
    /// Space an unprivileged user can still write.
    pub free_bytes: u64,
}

/// The operating system. A field the OS does not report is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Os {
    /// Distribution or OS name, e.g. "Ubuntu", "Darwin".
    pub name: String,
    /// Its version, e.g. "24.04".
    pub version: String,
    /// Kernel release, e.g. "6.8.0-48-generic".
    pub kernel: String,
    /// CPU architecture, e.g. "x86_64", "arm64".
    pub arch: String,
    /// Host name.
    pub hostname: String,
}

/// One NVIDIA GPU. `None` means the GPU or driver does not answer that query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    /// NVML's index, as `nvidia-smi` numbers it.
    pub index: u32,
    /// Product name, e.g. "NVIDIA GeForce RTX 4090"; empty if NVML could not say.
    pub name: String,
    /// "GPU-" and a UUID, stable across reboots; empty if NVML could not say.
    pub uuid: String,
    /// The N of its device node `/dev/nvidiaN`, which a job granted this GPU gets.
    pub minor_number: Option<u32>,
    /// Framebuffer size, including memory the driver reserves; 0 if NVML could not say.
    pub memory_total_bytes: u64,
    /// Framebuffer allocated by processes, as `nvidia-smi` shows it (reserved memory excluded).
    pub memory_used_bytes: u64,
    /// CUDA compute capability, e.g. 8.9.
    pub compute_capability: Option<ComputeCapability>,
    /// Busy time over the last sample period.
    pub utilization: Option<Utilization>,
    /// Die temperature in °C.
    pub temperature_c: Option<u32>,
    /// Current board power draw in watts.
    pub power_draw_w: Option<f64>,
    /// Power limit the driver enforces, in watts.
    pub power_limit_w: Option<f64>,
    /// Processes with a compute or graphics context on this GPU, one per pid.
    pub processes: Vec<GpuProcess>,
    /// Multi-Instance GPU mode; `None` on GPUs without MIG.
    pub mig_mode: Option<MigMode>,
}

/// A CUDA compute capability, `major.minor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComputeCapability {
    /// Major version: 9 for Hopper.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// GPU busy time over NVML's last sample period (1/6 s to 1 s depending on the product).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Utilization {
    /// Percent of the time one or more kernels ran.
    pub gpu_percent: u32,
    /// Percent of the time device memory was read or written (bandwidth, not capacity).
    pub memory_percent: u32,
}

/// A process using a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GpuProcess {
    /// Its process id (in the host's pid namespace).
    pub pid: u32,
    /// GPU memory it holds; `None` where the driver does not say.
    pub used_memory_bytes: Option<u64>,
}

/// Multi-Instance GPU mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigMode {
    /// MIG is enabled now.
    pub current: bool,
    /// MIG will be enabled after the next GPU reset.
    pub pending: bool,
}

/// An amount of each resource: what a request asks for, an agreement sets aside, a reservation
/// holds. (What a machine has is `resources::Resources`.) On the wire it is the documents'
/// `resources` field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Allocation {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Scratch disk in bytes.
    pub disk_bytes: u64,
    /// Whole GPUs.
    pub gpus: u32,
    /// GPU memory in bytes, summed over the GPUs.
    pub vram_bytes: u64,
}
