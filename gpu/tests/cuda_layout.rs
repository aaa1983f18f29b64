//! rdask-cuda-worker's choices on an 8-GPU node described by hwloc XML, with
//! the GPUs NVML would report; and the no-driver path on this machine.

use std::path::PathBuf;

use rdask_gpu::{cuda_layout, nvml, visible_gpus, GpuError, NvmlGpu};
use rdask_worker::topology::layout::Flags;
use rdask_worker::topology::{Source, Topology};

fn dgx() -> Topology {
    let xml = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/dgx-like.xml");
    Topology::read(&Source::XmlFile(xml)).unwrap()
}

/// What NVML reports on that node: bus ids as NVML writes them, and a CPU
/// affinity that (wrongly, on purpose) says "every CPU", so the test shows
/// hwloc's locality wins where it knows the GPU.
fn nvml_view(topo: &Topology) -> Vec<NvmlGpu> {
    topo.gpus
        .iter()
        .map(|g| NvmlGpu {
            index: g.index,
            uuid: format!("GPU-{:08x}-aaaa-bbbb-cccc-{:012x}", g.index * 1111, g.index),
            name: "NVIDIA A100-SXM4-40GB".into(),
            pci_bus_id: nvml::normalise_bus_id(&format!("0000{}", g.pci_bus_id.to_uppercase())),
            memory: 40 << 30,
            cpus: (0..64).collect(),
        })
        .collect()
}

#[test]
fn all_gpus_get_a_worker_on_their_own_numa_node() {
    let topo = dgx();
    let gpus = nvml_view(&topo);
    let visible = visible_gpus(&topo, &gpus, None).unwrap();
    let specs = cuda_layout(&topo, &visible, &Flags { bind: true, ..Default::default() });
    assert_eq!(specs.len(), 8);
    for (i, s) in specs.iter().enumerate() {
        assert_eq!(s.numa, Some(i as u32 / 2), "worker {i}");
        assert_eq!(s.cpus.len(), 16, "the PUs of its NUMA node, not NVML's everything");
        assert_eq!(s.gpu.as_ref().unwrap().visible_devices.split(',').next(), Some(i.to_string().as_str()));
    }
}

#[test]
fn cuda_visible_devices_by_index_or_uuid_picks_and_orders_the_workers() {
    let topo = dgx();
    let gpus = nvml_view(&topo);
    let v = visible_gpus(&topo, &gpus, Some("6,1")).unwrap();
    assert_eq!(v.iter().map(|(id, g)| (id.as_str(), g.index)).collect::<Vec<_>>(), [("6", 6), ("1", 1)]);
    let specs = cuda_layout(&topo, &v, &Flags { bind: true, ..Default::default() });
    assert_eq!(specs[0].gpu.as_ref().unwrap().visible_devices, "6,1");
    assert_eq!(specs[1].gpu.as_ref().unwrap().visible_devices, "1,6");
    let by_uuid = visible_gpus(&topo, &gpus, Some(&gpus[3].uuid[..12])).unwrap();
    assert_eq!(by_uuid[0].1.index, 3);
    for bad in ["9", "1,1", "GPU-nope"] {
        match visible_gpus(&topo, &gpus, Some(bad)) {
            Err(e @ GpuError::BadVisibleDevices { .. }) => assert!(e.to_string().contains(bad), "{e}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn a_gpu_hwloc_does_not_know_uses_nvml_locality() {
    let topo = Topology::read(&Source::Synthetic("pack:2 numa:1 core:4 pu:1".into())).unwrap();
    let gpus = vec![NvmlGpu {
        index: 0,
        uuid: "GPU-1".into(),
        name: "Some GPU".into(),
        pci_bus_id: "0000:3b:00.0".into(),
        memory: 16 << 30,
        cpus: vec![4, 5, 6, 7],
    }];
    let v = visible_gpus(&topo, &gpus, None).unwrap();
    assert_eq!(v[0].1.cpus, [4, 5, 6, 7]);
    assert_eq!(v[0].1.numa, Some(1));
}

#[test]
fn without_a_driver_nvml_gives_one_clear_error() {
    match nvml::devices() {
        Ok(gpus) => assert!(!gpus.is_empty(), "a machine with a driver lists its GPUs"),
        Err(e @ GpuError::NoDriver { .. }) => {
            let text = e.to_string();
            assert!(text.contains("libnvidia-ml.so") && !text.contains('\n'), "{text}");
        }
        Err(e) => panic!("unexpected: {e}"),
    }
}
