//! NVIDIA GPUs through NVML: reading each device, and turning a reading into a [`Gpu`].
//!
//! Reading and mapping are kept apart so the mapping can be tested without hardware.
//! `read_all` asks NVML every query for every device and keeps each answer, failures included,
//! in a [`DeviceReading`] made of nvml-wrapper's own types; `to_gpu` is a pure function from a
//! reading to the [`Gpu`] the agent reports. A reading serialises to JSON, so [`record_fixture`]
//! can capture what a real machine answers and the tests replay those answers from `fixtures/`.
//!
//! NVML (`libnvidia-ml.so.1`) is loaded at run time by nvml-wrapper; a machine without the driver
//! simply has no GPUs, which is normal and logged at `debug` only. This module owns no state and
//! spawns nothing: the [`Nvml`] handle lives in [`super::Detector`].

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::{MemoryInfo, ProcessInfo, Utilization as NvmlUtilization};
use nvml_wrapper::structs::device::{CudaComputeCapability, MigMode as NvmlMigMode};
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{ComputeCapability, Gpu, GpuProcess, MigMode, ResourcesError, Utilization};

/// The answer to one NVML query, kept as data so a failure can be recorded and replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading<T> {
    /// The query succeeded.
    Ok(T),
    /// The device, driver or NVML library does not offer this query (GeForce cards and MIG, old
    /// drivers without a newer entry point such as `nvmlDeviceGetMemoryInfo_v2`).
    NotSupported,
    /// The query failed; the text is NVML's error, for the log and the fixture.
    Failed(String),
}

impl<T> Reading<T> {
    /// Keeps NVML's answer, folding "this device or driver cannot answer" into
    /// [`Reading::NotSupported`].
    pub fn from_result(result: Result<T, NvmlError>) -> Self {
        match result {
            Ok(value) => Self::Ok(value),
            // A symbol missing from an older libnvidia-ml is the driver saying it cannot answer,
            // not a fault of this device.
            Err(NvmlError::NotSupported | NvmlError::FunctionNotFound | NvmlError::FailedToLoadSymbol(_)) => {
                Self::NotSupported
            }
            Err(error) => Self::Failed(error.to_string()),
        }
    }

    /// The value, when the query succeeded.
    pub fn ok(&self) -> Option<&T> {
        match self {
            Self::Ok(value) => Some(value),
            Self::NotSupported | Self::Failed(_) => None,
        }
    }
}

/// Everything NVML answered about one device, exactly as nvml-wrapper returned it.
///
/// Power readings are NVML's milliwatts and memory is bytes; `to_gpu` does the conversions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReading {
    /// NVML's enumeration index (the index `nvidia-smi` shows).
    pub index: u32,
    /// `nvmlDeviceGetName`, e.g. "NVIDIA H100 80GB HBM3".
    pub name: Reading<String>,
    /// `nvmlDeviceGetUUID`, "GPU-" followed by a UUID.
    pub uuid: Reading<String>,
    /// `nvmlDeviceGetMemoryInfo_v2`: total, reserved, used and free framebuffer bytes.
    pub memory: Reading<MemoryInfo>,
    /// `nvmlDeviceGetCudaComputeCapability`.
    pub cuda_compute_capability: Reading<CudaComputeCapability>,
    /// `nvmlDeviceGetUtilizationRates`; not supported while MIG is enabled.
    pub utilization: Reading<NvmlUtilization>,
    /// `nvmlDeviceGetTemperature` for the GPU die, in °C.
    pub temperature_gpu_c: Reading<u32>,
    /// `nvmlDeviceGetPowerUsage`, in milliwatts.
    pub power_usage_mw: Reading<u32>,
    /// `nvmlDeviceGetEnforcedPowerLimit`, in milliwatts: the limit after every limiter.
    pub enforced_power_limit_mw: Reading<u32>,
    /// `nvmlDeviceGetComputeRunningProcesses_v3`.
    pub running_compute_processes: Reading<Vec<ProcessInfo>>,
    /// `nvmlDeviceGetGraphicsRunningProcesses_v3`.
    pub running_graphics_processes: Reading<Vec<ProcessInfo>>,
    /// `nvmlDeviceGetMigMode`; 1 means enabled.
    pub mig_mode: Reading<NvmlMigMode>,
    /// `nvmlDeviceGetMinorNumber`: the N of `/dev/nvidiaN`.
    pub minor_number: Reading<u32>,
}

impl DeviceReading {
    /// The reading for a device NVML counted but could not open: every query failed the same way.
    fn unreadable(index: u32, error: &NvmlError) -> Self {
        let reason = error.to_string();
        Self {
            index,
            name: Reading::Failed(reason.clone()),
            uuid: Reading::Failed(reason.clone()),
            memory: Reading::Failed(reason.clone()),
            cuda_compute_capability: Reading::Failed(reason.clone()),
            utilization: Reading::Failed(reason.clone()),
            temperature_gpu_c: Reading::Failed(reason.clone()),
            power_usage_mw: Reading::Failed(reason.clone()),
            enforced_power_limit_mw: Reading::Failed(reason.clone()),
            running_compute_processes: Reading::Failed(reason.clone()),
            running_graphics_processes: Reading::Failed(reason.clone()),
            mig_mode: Reading::Failed(reason.clone()),
            minor_number: Reading::Failed(reason),
        }
    }
}

/// Loads NVML once for the life of a [`super::Detector`].
///
/// `None` means this agent is CPU-only: no library, no driver, no permission, or no devices. That
/// is the normal state of most machines, so it is logged at `debug` and never above.
pub(super) fn init() -> Option<Nvml> {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(error) => {
            debug!(%error, "NVML is not available; no NVIDIA GPUs will be reported");
            return None;
        }
    };
    match nvml.device_count() {
        Ok(0) => {
            debug!("NVML loaded but found no NVIDIA GPUs");
            None
        }
        Ok(count) => {
            debug!(count, "NVML loaded");
            Some(nvml)
        }
        Err(error) => {
            debug!(%error, "NVML cannot count the GPUs; no NVIDIA GPUs will be reported");
            None
        }
    }
}

/// Reads every device NVML lists.
///
/// Only a failure to count the devices is an error; a device that cannot be opened or a query
/// that fails is kept in its [`DeviceReading`] and logged at `debug`.
pub(super) fn read_all(nvml: &Nvml) -> Result<Vec<DeviceReading>, NvmlError> {
    let count = nvml.device_count()?;
    Ok((0..count).map(|index| read_device(nvml, index)).collect())
}

fn read_device(nvml: &Nvml, index: u32) -> DeviceReading {
    let device = match nvml.device_by_index(index) {
        Ok(device) => device,
        Err(error) => {
            debug!(gpu = index, %error, "NVML cannot open the GPU");
            return DeviceReading::unreadable(index, &error);
        }
    };
    DeviceReading {
        index,
        name: query(index, "name", device.name()),
        uuid: query(index, "uuid", device.uuid()),
        minor_number: query(index, "minor_number", device.minor_number()),
        memory: query(index, "memory_info", device.memory_info()),
        cuda_compute_capability: query(index, "cuda_compute_capability", device.cuda_compute_capability()),
        utilization: query(index, "utilization_rates", device.utilization_rates()),
        temperature_gpu_c: query(index, "temperature", device.temperature(TemperatureSensor::Gpu)),
        power_usage_mw: query(index, "power_usage", device.power_usage()),
        enforced_power_limit_mw: query(index, "enforced_power_limit", device.enforced_power_limit()),
        running_compute_processes: query(
            index,
            "running_compute_processes",
            device.running_compute_processes(),
        ),
        running_graphics_processes: query(
            index,
            "running_graphics_processes",
            device.running_graphics_processes(),
        ),
        mig_mode: query(index, "mig_mode", device.mig_mode()),
    }
}

fn query<T>(index: u32, what: &'static str, result: Result<T, NvmlError>) -> Reading<T> {
    let reading = Reading::from_result(result);
    if let Reading::Failed(error) = &reading {
        debug!(gpu = index, query = what, %error, "NVML query failed; the field is left empty");
    }
    reading
}

/// Reads every NVIDIA GPU on this machine and returns the readings as pretty JSON, in the format
/// of the fixtures under `src/resources/fixtures/`.
///
/// Meant for a hidden CLI flag: run it on a machine with real GPUs and commit the output as a new
/// fixture.
///
/// # Errors
///
/// [`ResourcesError::NvmlInit`] when NVML cannot be loaded, [`ResourcesError::GpuList`] when it
/// cannot count the devices, [`ResourcesError::NoGpus`] when it counts none.
pub fn record_fixture() -> Result<String, ResourcesError> {
    let nvml = Nvml::init().map_err(|source| ResourcesError::NvmlInit { source })?;
    let readings = read_all(&nvml).map_err(|source| ResourcesError::GpuList { source })?;
    if readings.is_empty() {
        return Err(ResourcesError::NoGpus);
    }
    serde_json::to_string_pretty(&readings).map_err(|source| ResourcesError::Encode { source })
}

/// Maps one device's raw NVML answers to the [`Gpu`] the agent reports.
///
/// A query that was not supported or failed leaves its field `None` (or empty, for the name,
/// UUID and memory, which every working GPU reports); the GPU itself is always kept.
pub(super) fn to_gpu(reading: &DeviceReading) -> Gpu {
    let memory = reading.memory.ok();
    Gpu {
        index: reading.index,
        name: reading.name.ok().cloned().unwrap_or_default(),
        uuid: reading.uuid.ok().cloned().unwrap_or_default(),
        minor_number: reading.minor_number.ok().copied(),
        memory_total_bytes: memory.map_or(0, |memory| memory.total),
        memory_used_bytes: memory.map_or(0, |memory| memory.used),
        compute_capability: reading.cuda_compute_capability.ok().and_then(compute_capability),
        utilization: reading
            .utilization
            .ok()
            .map(|rates| Utilization { gpu_percent: rates.gpu, memory_percent: rates.memory }),
        temperature_c: reading.temperature_gpu_c.ok().copied(),
        power_draw_w: reading.power_usage_mw.ok().copied().map(milliwatts_to_watts),
        power_limit_w: reading.enforced_power_limit_mw.ok().copied().map(milliwatts_to_watts),
        processes: merge_processes(&[
            &reading.running_compute_processes,
            &reading.running_graphics_processes,
        ]),
        mig_mode: reading
            .mig_mode
            .ok()
            .map(|mode| MigMode { current: mode.current != 0, pending: mode.pending != 0 }),
    }
}

/// NVML reports the version as C `int`s; a negative one would be a driver bug, read as unknown.
fn compute_capability(capability: &CudaComputeCapability) -> Option<ComputeCapability> {
    Some(ComputeCapability {
        major: u32::try_from(capability.major).ok()?,
        minor: u32::try_from(capability.minor).ok()?,
    })
}

fn milliwatts_to_watts(milliwatts: u32) -> f64 {
    f64::from(milliwatts) / 1000.0
}

/// One entry per pid, ordered by pid. A process with both a compute and a graphics context is
/// listed by both queries with the same usage, so the entries are merged, keeping a known size
/// over "unavailable".
fn merge_processes(lists: &[&Reading<Vec<ProcessInfo>>]) -> Vec<GpuProcess> {
    let mut merged: Vec<GpuProcess> = Vec::new();
    for process in lists.iter().filter_map(|list| list.ok()).flatten() {
        let used = match process.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        };
        match merged.iter_mut().find(|known| known.pid == process.pid) {
            Some(known) => known.used_memory_bytes = known.used_memory_bytes.max(used),
            None => merged.push(GpuProcess { pid: process.pid, used_memory_bytes: used }),
        }
    }
    merged.sort_by_key(|process| process.pid);
    merged
}

#[cfg(test)]
mod tests {
    //! The fixtures under `fixtures/` were composed by hand from NVML's documented return values
    //! and the figures these cards really report (an H100 80GB has 81559 MiB of framebuffer, a
    //! GeForce RTX 4090 24564 MiB and a 450 W limit), not recorded live: no GPU was available
    //! when this module was written. To record a live one, run `record_fixture()` on a machine
    //! with NVIDIA GPUs (through the agent's hidden fixture flag) and save its output next to
    //! these files.

    use super::*;

    const H100: &str = include_str!("fixtures/h100_80gb_hbm3.json");
    const RTX_4090: &str = include_str!("fixtures/geforce_rtx_4090.json");
    const FAILING_T4: &str = include_str!("fixtures/tesla_t4_failing.json");

    const MIB: u64 = 1024 * 1024;

    fn only_gpu(fixture: &str) -> Gpu {
        let readings: Vec<DeviceReading> =
            serde_json::from_str(fixture).expect("fixture is a JSON list of device readings");
        assert_eq!(readings.len(), 1, "each fixture holds one device");
        to_gpu(&readings[0])
    }

    #[test]
    fn fixtures_map_to_the_values_the_cards_report() {
        struct Case {
            fixture: &'static str,
            name: &'static str,
            memory_total_bytes: u64,
            memory_used_bytes: u64,
            compute_capability: Option<(u32, u32)>,
            power_draw_w: Option<f64>,
            power_limit_w: Option<f64>,
            temperature_c: Option<u32>,
            utilization: Option<(u32, u32)>,
            mig_mode: Option<MigMode>,
        }
        let cases = [
            Case {
                fixture: H100,
                name: "NVIDIA H100 80GB HBM3",
                memory_total_bytes: 81_559 * MIB,
                memory_used_bytes: 47_248_834_560,
                compute_capability: Some((9, 0)),
                power_draw_w: Some(512.34),
                power_limit_w: Some(700.0),
                temperature_c: Some(54),
                utilization: Some((87, 41)),
                mig_mode: Some(MigMode { current: false, pending: false }),
            },
            Case {
                fixture: RTX_4090,
                name: "NVIDIA GeForce RTX 4090",
                memory_total_bytes: 24_564 * MIB,
                memory_used_bytes: 6_978_273_280,
                compute_capability: Some((8, 9)),
                power_draw_w: Some(118.65),
                power_limit_w: Some(450.0),
                temperature_c: Some(47),
                utilization: Some((34, 12)),
                mig_mode: None,
            },
            Case {
                fixture: FAILING_T4,
                name: "Tesla T4",
                memory_total_bytes: 0,
                memory_used_bytes: 0,
                compute_capability: Some((7, 5)),
                power_draw_w: None,
                power_limit_w: Some(70.0),
                temperature_c: None,
                utilization: None,
                mig_mode: None,
            },
        ];
        for case in cases {
            let gpu = only_gpu(case.fixture);
            assert_eq!(gpu.name, case.name);
            assert!(gpu.uuid.starts_with("GPU-"), "{}: uuid {}", case.name, gpu.uuid);
            assert_eq!(gpu.memory_total_bytes, case.memory_total_bytes, "{}", case.name);
            assert_eq!(gpu.memory_used_bytes, case.memory_used_bytes, "{}", case.name);
            assert_eq!(
                gpu.compute_capability,
                case.compute_capability.map(|(major, minor)| ComputeCapability { major, minor }),
                "{}",
                case.name
            );
            assert_eq!(gpu.power_draw_w, case.power_draw_w, "{}", case.name);
            assert_eq!(gpu.power_limit_w, case.power_limit_w, "{}", case.name);
            assert_eq!(gpu.temperature_c, case.temperature_c, "{}", case.name);
            assert_eq!(
                gpu.utilization,
                case.utilization
                    .map(|(gpu_percent, memory_percent)| Utilization { gpu_percent, memory_percent }),
                "{}",
                case.name
            );
            assert_eq!(gpu.mig_mode, case.mig_mode, "{}", case.name);
        }
    }

    #[test]
    fn h100_lists_both_compute_processes_and_leaves_unavailable_memory_empty() {
        let gpu = only_gpu(H100);
        assert_eq!(
            gpu.processes,
            vec![
                GpuProcess { pid: 48_213, used_memory_bytes: Some(43_008 * MIB) },
                GpuProcess { pid: 48_377, used_memory_bytes: None },
            ]
        );
    }

    #[test]
    fn rtx_4090_lists_a_process_with_graphics_and_compute_contexts_once() {
        let gpu = only_gpu(RTX_4090);
        let pids: Vec<u32> = gpu.processes.iter().map(|process| process.pid).collect();
        assert_eq!(pids, vec![1834, 2291, 5120]);
        assert_eq!(gpu.processes[2].used_memory_bytes, Some(6 * 1024 * MIB));
    }

    #[test]
    fn failed_process_query_keeps_the_other_list() {
        let gpu = only_gpu(FAILING_T4);
        assert_eq!(gpu.index, 1);
        assert!(gpu.processes.is_empty());
        // The fixture's lists are both empty or failed; check the rule itself with a non-empty one.
        let compute = Reading::Failed("Unknown".to_owned());
        let graphics = Reading::Ok(vec![ProcessInfo {
            pid: 4242,
            used_gpu_memory: UsedGpuMemory::Used(MIB),
            gpu_instance_id: None,
            compute_instance_id: None,
        }]);
        assert_eq!(
            merge_processes(&[&compute, &graphics]),
            vec![GpuProcess { pid: 4242, used_memory_bytes: Some(MIB) }]
        );
    }

    #[test]
    fn merging_prefers_a_known_size_over_unavailable() {
        let process = |pid, used_gpu_memory| ProcessInfo {
            pid,
            used_gpu_memory,
            gpu_instance_id: None,
            compute_instance_id: None,
        };
        let compute = Reading::Ok(vec![process(7, UsedGpuMemory::Unavailable)]);
        let graphics =
            Reading::Ok(vec![process(9, UsedGpuMemory::Used(MIB)), process(7, UsedGpuMemory::Used(2 * MIB))]);
        assert_eq!(
            merge_processes(&[&compute, &graphics]),
            vec![
                GpuProcess { pid: 7, used_memory_bytes: Some(2 * MIB) },
                GpuProcess { pid: 9, used_memory_bytes: Some(MIB) },
            ]
        );
    }

    #[test]
    fn a_device_that_cannot_be_opened_is_still_listed() {
        let gpu = to_gpu(&DeviceReading::unreadable(3, &NvmlError::GpuLost));
        assert_eq!(gpu.index, 3);
        assert_eq!(gpu.name, "");
        assert_eq!(gpu.memory_total_bytes, 0);
        assert_eq!(gpu.compute_capability, None);
        assert_eq!(gpu.power_limit_w, None);
        assert_eq!(gpu.mig_mode, None);
        assert!(gpu.processes.is_empty());
    }

    #[test]
    fn nvml_errors_sort_into_not_supported_and_failed() {
        let cases: [(NvmlError, Reading<u32>); 5] = [
            (NvmlError::NotSupported, Reading::NotSupported),
            (NvmlError::FunctionNotFound, Reading::NotSupported),
            (NvmlError::FailedToLoadSymbol("nvmlDeviceGetMigMode".into()), Reading::NotSupported),
            (NvmlError::NoPermission, Reading::Failed(NvmlError::NoPermission.to_string())),
            (NvmlError::GpuLost, Reading::Failed(NvmlError::GpuLost.to_string())),
        ];
        for (error, expected) in cases {
            assert_eq!(Reading::from_result(Err(error)), expected);
        }
        assert_eq!(Reading::from_result(Ok(5_u32)), Reading::Ok(5));
    }

    #[test]
    fn fixtures_round_trip_through_serde() {
        for fixture in [H100, RTX_4090, FAILING_T4] {
            let readings: Vec<DeviceReading> = serde_json::from_str(fixture).expect("parse");
            let written = serde_json::to_string_pretty(&readings).expect("serialise");
            let reread: Vec<DeviceReading> = serde_json::from_str(&written).expect("reparse");
            assert_eq!(reread, readings);
            let as_value =
                |text: &str| -> serde_json::Value { serde_json::from_str(text).expect("valid JSON") };
            assert_eq!(as_value(&written), as_value(fixture), "the fixture is in canonical form");
        }
    }
}
