//! What this machine has to share: CPU, memory, the disk holding the data dir, the OS and its
//! NVIDIA GPUs, as plain values.
//!
//! [`Resources`] and its parts are value types; their snake_case JSON field names are part of the
//! CLI and API contract. A [`Detector`] owns the long-lived probes: a `sysinfo` [`System`] and
//! [`Disks`], kept between calls because CPU usage is the difference of two samples, and the NVML
//! handle, loaded once (see [`nvidia`]). [`Detector::refresh`] blocks: it may sleep up to
//! [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] so the first CPU usage is real, and NVML calls are
//! synchronous, so async callers run it on a blocking thread. Nothing is spawned.
//!
//! A machine without NVIDIA GPUs, driver or NVML library is CPU-only: that is logged at `debug`
//! and `gpus` is empty. A query that fails for one GPU leaves that field empty; the GPU stays.
//!
//! sysinfo does not list tmpfs or network file systems (its `linux-tmpfs`/`linux-netdevs`
//! features are off), so a data dir on one of them is reported with the enclosing listed disk.

pub mod nvidia;

use std::path::{Path, PathBuf};
use std::time::Instant;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use sysinfo::{DiskRefreshKind, Disks, MINIMUM_CPU_UPDATE_INTERVAL, MemoryRefreshKind, System};
use tracing::{debug, warn};

pub use hearth_api::resources::{
    ComputeCapability, Cpu, Disk, Gpu, GpuProcess, Memory, MigMode, Os, Resources, Utilization,
};

/// Why GPU readings could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    /// NVML could not be loaded or initialised.
    #[error("cannot load NVML (is the NVIDIA driver installed and loaded?): {source}")]
    NvmlInit {
        /// What NVML said.
        source: NvmlError,
    },
    /// NVML loaded but could not count the GPUs.
    #[error("NVML cannot list the GPUs: {source}")]
    GpuList {
        /// What NVML said.
        source: NvmlError,
    },
    /// NVML loaded and found no GPUs.
    #[error("NVML found no NVIDIA GPUs on this machine")]
    NoGpus,
    /// The readings could not be written as JSON.
    #[error("cannot encode the GPU readings as JSON: {source}")]
    Encode {
        /// What serde said.
        source: serde_json::Error,
    },
}

/// Reads this machine's resources, keeping what it needs between readings.
///
/// Create one per agent and call [`Detector::refresh`] whenever fresh figures are wanted.
pub struct Detector {
    /// `None` only where sysinfo does not support the OS; every figure then reads 0.
    system: Option<System>,
    disks: Option<Disks>,
    /// When the CPU times were last sampled, to space the samples a usage is computed from.
    cpu_sampled_at: Instant,
    /// `None` on a CPU-only machine.
    nvml: Option<Nvml>,
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

impl Detector {
    /// Takes the first CPU sample and loads NVML if it is there. Never fails: without NVML the
    /// agent is CPU-only.
    pub fn new() -> Self {
        let system = System::new()
            .map(|mut system| {
                system.refresh_cpu_usage();
                system
            })
            .inspect_err(|error| warn!(%error, "cannot read CPU and memory on this OS"))
            .ok();
        let disks = Disks::new().inspect_err(|error| warn!(%error, "cannot read disks on this OS")).ok();
        Self { system, disks, cpu_sampled_at: Instant::now(), nvml: nvidia::init() }
    }

    /// Reads every resource now, with `data_dir` naming the directory whose disk is reported
    /// (it need not exist yet).
    ///
    /// Blocks for up to [`MINIMUM_CPU_UPDATE_INTERVAL`] when the previous CPU sample is more
    /// recent than that, so even the first call reports a real CPU usage.
    pub fn refresh(&mut self, data_dir: &Path) -> Resources {
        Resources {
            cpu: self.cpu(Usage::Sampled),
            memory: self.memory(),
            disk: self.disk(data_dir),
            os: os(),
            gpus: self.gpus(),
        }
    }

    /// The machine's size, as [`Detector::refresh`] reads it but at once: the CPU's usage is
    /// left at 0 rather than waited for. What a caller needs that only asks whether a job fits.
    pub fn size(&mut self, data_dir: &Path) -> Resources {
        Resources {
            cpu: self.cpu(Usage::Skipped),
            memory: self.memory(),
            disk: self.disk(data_dir),
            os: os(),
            gpus: self.gpus(),
        }
    }

    fn cpu(&mut self, usage: Usage) -> Cpu {
        let Some(system) = self.system.as_mut() else {
            let threads = logical_cpus(0);
            return Cpu { model: String::new(), cores: threads, threads, usage_percent: 0.0 };
        };
        if usage == Usage::Sampled {
            let since = self.cpu_sampled_at.elapsed();
            if let Some(wait) = MINIMUM_CPU_UPDATE_INTERVAL.checked_sub(since) {
                std::thread::sleep(wait);
            }
            system.refresh_cpu_usage();
            self.cpu_sampled_at = Instant::now();
        }

        let threads = logical_cpus(system.cpus().len());
        let cores = System::physical_core_count()
            .ok()
            .and_then(|cores| u32::try_from(cores).ok())
            .filter(|&cores| cores > 0)
            .unwrap_or(threads);
        Cpu {
            model: system.cpus().first().map(|cpu| cpu.brand().trim().to_owned()).unwrap_or_default(),
            cores,
            threads,
            usage_percent: match usage {
                Usage::Sampled => system.global_cpu_usage(),
                Usage::Skipped => 0.0,
            },
        }
    }

    fn memory(&mut self) -> Memory {
        let Some(system) = self.system.as_mut() else {
            return Memory { total_bytes: 0, available_bytes: 0 };
        };
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        Memory { total_bytes: system.total_memory(), available_bytes: system.available_memory() }
    }

    fn disk(&mut self, data_dir: &Path) -> Disk {
        let mut disk =
            Disk { path: data_dir.to_owned(), mount_point: PathBuf::new(), total_bytes: 0, free_bytes: 0 };
        let Some(disks) = self.disks.as_mut() else {
            return disk;
        };
        // Drops unmounted disks and adds new mounts, reading only the space figures.
        disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
        let Some(resolved) = resolve(data_dir) else {
            debug!(path = %data_dir.display(), "cannot resolve the data dir to an absolute path");
            return disk;
        };
        let chosen = longest_mount_prefix(disks.iter().map(sysinfo::Disk::mount_point), &resolved)
            .and_then(|index| disks.get(index));
        match chosen {
            Some(found) => {
                disk.mount_point = found.mount_point().to_owned();
                disk.total_bytes = found.total_space();
                disk.free_bytes = found.available_space();
            }
            None => debug!(path = %resolved.display(), "no listed disk holds the data dir"),
        }
        disk
    }

    fn gpus(&self) -> Vec<Gpu> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        match nvidia::read_all(nvml) {
            Ok(readings) => readings.iter().map(nvidia::to_gpu).collect(),
            Err(error) => {
                debug!(%error, "NVML cannot list the GPUs; reporting none");
                Vec::new()
            }
        }
    }
}

/// Whether a CPU reading waits for a usage sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Sampled,
    Skipped,
}

/// Reads this machine's resources once; see [`Detector::refresh`]. Takes at least
/// [`MINIMUM_CPU_UPDATE_INTERVAL`], so repeated callers keep a [`Detector`] instead.
pub fn detect(data_dir: &Path) -> Resources {
    Detector::new().refresh(data_dir)
}

fn os() -> Os {
    Os {
        name: System::name().unwrap_or_default(),
        version: System::os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: System::cpu_arch(),
        hostname: System::host_name().unwrap_or_default(),
    }
}

/// The logical CPUs this process may use, as `nproc` counts them: the scheduler affinity mask
/// where the OS exposes it, else the CPUs sysinfo lists (`listed`), else the standard library's
/// count. Not `available_parallelism` first: it also divides by a cgroup CPU quota, which `nproc`
/// does not.
fn logical_cpus(listed: usize) -> u32 {
    let from_affinity = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status.lines().find_map(|line| line.strip_prefix("Cpus_allowed_list:")).and_then(count_cpu_list)
    });
    from_affinity
        .or_else(|| u32::try_from(listed).ok().filter(|&n| n > 0))
        .or_else(|| std::thread::available_parallelism().ok().and_then(|n| u32::try_from(n.get()).ok()))
        .unwrap_or(1)
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut count: u32 = 0;
    for range in list.trim().split(',') {
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first.parse::<u32>().ok()?, last.parse::<u32>().ok()?),
            None => {
                let cpu = range.parse::<u32>().ok()?;
                (cpu, cpu)
            }
        };
        count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
    }
    (count > 0).then_some(count)
}

/// The absolute, symlink-free form of `path`, which need not exist: the nearest existing
/// ancestor is canonicalised and the rest appended.
fn resolve(path: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    for ancestor in absolute.ancestors() {
        if let Ok(canonical) = ancestor.canonicalize() {
            let rest = absolute.strip_prefix(ancestor).ok()?;
            return Some(canonical.join(rest));
        }
    }
    None
}

/// The index of the mount point that is the longest whole-component prefix of `path`. When a
/// mount point is listed twice the later entry wins, as the later mount hides the earlier.
fn longest_mount_prefix<'a>(mount_points: impl IntoIterator<Item = &'a Path>, path: &Path) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (index, mount_point) in mount_points.into_iter().enumerate() {
        if !path.starts_with(mount_point) {
            continue;
        }
        let depth = mount_point.components().count();
        if best.is_none_or(|(_, best_depth)| depth >= best_depth) {
            best = Some((index, depth));
        }
    }
    best.map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted_like_the_kernel_writes_them() {
        let cases = [
            ("0", Some(1)),
            ("0-1", Some(2)),
            ("0-3,8-11\n", Some(8)),
            ("0,2,4-5", Some(4)),
            ("", None),
            ("3-1", None),
            ("0-x", None),
        ];
        for (list, expected) in cases {
            assert_eq!(count_cpu_list(list), expected, "{list:?}");
        }
    }

    #[test]
    fn the_deepest_mount_point_holding_the_path_wins() {
        let mounts = ["/", "/home", "/home2", "/data", "/data/ssd", "/home"].map(Path::new);
        let cases = [
            ("/etc/hearth", Some(0)),
            ("/home2/alice/hearth", Some(2)),
            ("/home/alice/.local/share/hearth", Some(5)),
            ("/data/ssd/hearth", Some(4)),
            ("/data/ssd2/hearth", Some(3)),
            ("/data", Some(3)),
        ];
        for (path, expected) in cases {
            assert_eq!(longest_mount_prefix(mounts, Path::new(path)), expected, "{path}");
        }
        assert_eq!(longest_mount_prefix([Path::new("/mnt")], Path::new("/srv")), None);
    }

    #[test]
    fn a_missing_dir_resolves_through_its_nearest_existing_ancestor() {
        let temp = tempfile::tempdir().expect("temp dir");
        let missing = temp.path().join("not/yet/here");
        let resolved = resolve(&missing).expect("resolvable");
        let parent = temp.path().canonicalize().expect("canonical temp dir");
        assert_eq!(resolved, parent.join("not/yet/here"));
    }

    #[test]
    fn json_field_names_are_the_cli_contract() {
        let resources = Resources {
            cpu: Cpu { model: "m".into(), cores: 8, threads: 16, usage_percent: 12.5 },
            memory: Memory { total_bytes: 2, available_bytes: 1 },
            disk: Disk { path: "/d".into(), mount_point: "/".into(), total_bytes: 4, free_bytes: 3 },
            os: Os {
                name: "n".into(),
                version: "v".into(),
                kernel: "k".into(),
                arch: "a".into(),
                hostname: "h".into(),
            },
            gpus: vec![Gpu {
                index: 0,
                name: "g".into(),
                uuid: "GPU-0".into(),
                minor_number: Some(0),
                memory_total_bytes: 10,
                memory_used_bytes: 5,
                compute_capability: Some(ComputeCapability { major: 9, minor: 0 }),
                utilization: Some(Utilization { gpu_percent: 1, memory_percent: 2 }),
                temperature_c: Some(40),
                power_draw_w: Some(70.5),
                power_limit_w: None,
                processes: vec![GpuProcess { pid: 42, used_memory_bytes: None }],
                mig_mode: Some(MigMode { current: false, pending: true }),
            }],
        };
        let json = serde_json::to_value(&resources).expect("serialise");
        let keys = |value: &serde_json::Value| -> Vec<String> {
            let mut keys: Vec<String> = value.as_object().expect("object").keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(&json), ["cpu", "disk", "gpus", "memory", "os"]);
        assert_eq!(keys(&json["cpu"]), ["cores", "model", "threads", "usage_percent"]);
        assert_eq!(keys(&json["memory"]), ["available_bytes", "total_bytes"]);
        assert_eq!(keys(&json["disk"]), ["free_bytes", "mount_point", "path", "total_bytes"]);
        assert_eq!(keys(&json["os"]), ["arch", "hostname", "kernel", "name", "version"]);
        let gpu = &json["gpus"][0];
        assert_eq!(
            keys(gpu),
            [
                "compute_capability",
                "index",
                "memory_total_bytes",
                "memory_used_bytes",
                "mig_mode",
                "minor_number",
                "name",
                "power_draw_w",
                "power_limit_w",
                "processes",
                "temperature_c",
                "utilization",
                "uuid"
            ]
        );
        assert_eq!(keys(&gpu["compute_capability"]), ["major", "minor"]);
        assert_eq!(keys(&gpu["utilization"]), ["gpu_percent", "memory_percent"]);
        assert_eq!(keys(&gpu["processes"][0]), ["pid", "used_memory_bytes"]);
        assert_eq!(keys(&gpu["mig_mode"]), ["current", "pending"]);
        assert_eq!(gpu["power_limit_w"], serde_json::Value::Null);

        let back: Resources = serde_json::from_value(json).expect("deserialise");
        assert_eq!(back, resources);
    }

    #[test]
    fn detector_can_move_to_a_blocking_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Detector>();
    }

    /// Checks against what the kernel itself reports.
    #[cfg(target_os = "linux")]
    mod against_the_kernel {
        use super::*;

        fn proc_file(path: &str) -> String {
            std::fs::read_to_string(path).expect("readable /proc file")
        }

        #[test]
        fn threads_match_nproc() {
            let cpu = detect(&std::env::temp_dir()).cpu;
            let parallelism = std::thread::available_parallelism().expect("known parallelism");
            let processors =
                proc_file("/proc/cpuinfo").lines().filter(|line| line.starts_with("processor")).count();
            let threads = usize::try_from(cpu.threads).expect("fits");
            assert!(
                threads == parallelism.get() || threads == processors,
                "threads {threads}, available_parallelism {parallelism}, /proc/cpuinfo {processors}"
            );
            assert!(threads <= processors);
            assert!(cpu.cores >= 1);
        }

        #[test]
        fn memory_total_matches_meminfo() {
            let memory = detect(&std::env::temp_dir()).memory;
            let meminfo = proc_file("/proc/meminfo");
            let kib: u64 = meminfo
                .lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("MemTotal in /proc/meminfo");
            let expected = kib * 1024;
            assert!(
                memory.total_bytes.abs_diff(expected) <= expected / 100,
                "sysinfo {} vs MemTotal {expected}",
                memory.total_bytes
            );
            assert!(memory.available_bytes > 0 && memory.available_bytes <= memory.total_bytes);
        }

        #[test]
        fn the_disk_of_a_temp_dir_is_found() {
            let temp = tempfile::tempdir().expect("temp dir");
            let disk = detect(temp.path()).disk;
            assert_eq!(disk.path, temp.path());
            assert!(disk.free_bytes > 0, "{disk:?}");
            assert!(disk.total_bytes >= disk.free_bytes, "{disk:?}");
            let canonical = temp.path().canonicalize().expect("canonical");
            assert!(canonical.starts_with(&disk.mount_point), "{disk:?}");
        }

        #[test]
        fn a_data_dir_not_yet_created_is_on_its_parents_disk() {
            let temp = tempfile::tempdir().expect("temp dir");
            let missing = temp.path().join("hearth/data");
            let mut detector = Detector::new();
            let parent = detector.refresh(temp.path()).disk;
            let child = detector.refresh(&missing).disk;
            assert_eq!(child.path, missing);
            assert_eq!(child.mount_point, parent.mount_point);
            assert_eq!(child.total_bytes, parent.total_bytes);
        }

        #[test]
        fn os_matches_uname() {
            let os = detect(&std::env::temp_dir()).os;
            assert_eq!(os.kernel, proc_file("/proc/sys/kernel/osrelease").trim());
            assert_eq!(os.hostname, proc_file("/proc/sys/kernel/hostname").trim());
            assert!(!os.arch.is_empty());
        }

        #[test]
        fn cpu_usage_is_a_percentage_on_every_call() {
            let mut detector = Detector::new();
            for _ in 0..2 {
                let cpu = detector.refresh(&std::env::temp_dir()).cpu;
                assert!((0.0..=100.0).contains(&cpu.usage_percent), "{}", cpu.usage_percent);
                assert!(!cpu.model.is_empty());
            }
        }
    }
}
