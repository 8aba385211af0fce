//! Which GPUs a job of another agent gets: picked by UUID when its request is chosen, and turned
//! into [`GpuGrant`]s for the runner when its agreement runs. Plain functions over values.

use std::collections::HashSet;

use super::super::gpu_memory_each;
use crate::config::FAKE_GPU_PREFIX;
use crate::jobs::{GpuDevice, GpuGrant};
use crate::net::negotiate::Allocation;
use crate::resources::Gpu;
use hearth_api::availability::GpuCapacity;

/// The GPUs to grant a job asking for `wanted`: among `offered` and not `taken`, those with at
/// least the memory it asks of each, the smallest first (a large GPU stays free for a job that
/// needs it). `None` when too few fit.
pub(super) fn pick_gpus(
    wanted: &Allocation,
    offered: &[GpuCapacity],
    taken: &HashSet<String>,
) -> Option<Vec<String>> {
    let each = gpu_memory_each(wanted);
    let mut fitting: Vec<&GpuCapacity> =
        offered.iter().filter(|gpu| gpu.memory_bytes >= each && !taken.contains(&gpu.uuid)).collect();
    fitting.sort_by_key(|gpu| gpu.memory_bytes);
    let picked: Vec<String> =
        fitting.into_iter().take(wanted.gpus as usize).map(|gpu| gpu.uuid.clone()).collect();
    (picked.len() == wanted.gpus as usize).then_some(picked)
}

/// How each of `uuids` reaches the job: a GPU of this machine (`machine`, the resource monitor's)
/// by its device node; one the machine does not have is a GPU of the `[testing] fake_gpus` test
/// setting (the only way such a UUID gets into terms), granted by its environment variables alone.
pub(super) fn grant(machine: &[Gpu], uuids: &[String]) -> Result<Vec<GpuGrant>, String> {
    uuids
        .iter()
        .map(|uuid| {
            let device = match machine.iter().find(|gpu| gpu.uuid == *uuid) {
                Some(gpu) => match gpu.minor_number {
                    Some(minor_number) => GpuDevice::Node { minor_number },
                    None => return Err(format!("the driver does not say which device node GPU {uuid} is")),
                },
                None if uuid.starts_with(FAKE_GPU_PREFIX) => GpuDevice::Fake,
                None => return Err(format!("GPU {uuid} is no longer on this machine")),
            };
            Ok(GpuGrant { uuid: uuid.clone(), device })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_picked_by_uuid_the_smallest_that_fits_first_and_never_twice() {
        let offered: Vec<GpuCapacity> = [("A", 24), ("B", 8), ("C", 16)]
            .into_iter()
            .map(|(uuid, gib)| GpuCapacity { uuid: uuid.into(), memory_bytes: gib << 30 })
            .collect();
        let wanted = |gpus: u32, gib_each: u64| Allocation {
            gpus,
            vram_bytes: u64::from(gpus) * (gib_each << 30),
            ..Allocation::default()
        };
        let taken = |uuids: &[&str]| uuids.iter().map(|uuid| (*uuid).to_owned()).collect::<HashSet<String>>();
        let picked = |gpus, gib, busy: &[&str]| pick_gpus(&wanted(gpus, gib), &offered, &taken(busy));
        let names = |uuids: &[&str]| Some(uuids.iter().map(|uuid| (*uuid).to_owned()).collect::<Vec<_>>());
        assert_eq!(picked(0, 0, &[]), names(&[]));
        assert_eq!(picked(1, 0, &[]), names(&["B"]));
        assert_eq!(picked(1, 12, &[]), names(&["C"]));
        assert_eq!(picked(2, 12, &[]), names(&["C", "A"]));
        assert_eq!(picked(1, 12, &["C"]), names(&["A"]));
        assert_eq!(picked(1, 20, &["A"]), None);
        assert_eq!(picked(3, 0, &["B"]), None);
        assert_eq!(picked(1, 32, &[]), None);
    }

    #[test]
    fn a_real_gpu_is_granted_by_its_device_node_and_a_fake_one_by_its_uuid_alone() {
        let gpu = |uuid: &str, minor_number: Option<u32>| Gpu {
            index: 0,
            name: "NVIDIA A100".into(),
            uuid: uuid.into(),
            minor_number,
            memory_total_bytes: 40 << 30,
            memory_used_bytes: 0,
            compute_capability: None,
            utilization: None,
            temperature_c: None,
            power_draw_w: None,
            power_limit_w: None,
            processes: Vec::new(),
            mig_mode: None,
        };
        let machine = [gpu("GPU-a", Some(3)), gpu("GPU-b", None)];
        let uuids = |uuids: &[&str]| uuids.iter().map(|uuid| (*uuid).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            grant(&machine, &uuids(&["GPU-a", "FAKE-GPU-1"])),
            Ok(vec![
                GpuGrant { uuid: "GPU-a".into(), device: GpuDevice::Node { minor_number: 3 } },
                GpuGrant { uuid: "FAKE-GPU-1".into(), device: GpuDevice::Fake },
            ])
        );
        assert!(grant(&machine, &uuids(&["GPU-b"])).unwrap_err().contains("device node"));
        assert!(grant(&machine, &uuids(&["GPU-gone"])).unwrap_err().contains("no longer on this machine"));
    }
}
