//! Worker layouts on machines this project does not have, read through
//! hwloc from synthetic descriptions and from an XML file of an 8-GPU node.

use std::path::PathBuf;

use rdask_worker::topology::layout::{per_core, per_gpu, Flags, WorkerSpec};
use rdask_worker::topology::{Source, Topology};

const GIB: u64 = 1 << 30;

fn synthetic(s: &str) -> Topology {
    Topology::read(&Source::Synthetic(s.into())).unwrap()
}

/// 2 packages x 2 NUMA nodes (32 GiB each) x 4 cores x 2 hardware threads.
fn two_socket() -> Topology {
    synthetic("pack:2 numa:2(memory=32GiB) core:4 pu:2")
}

fn dgx() -> Topology {
    let xml = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dgx-like.xml");
    Topology::read(&Source::XmlFile(xml)).unwrap()
}

fn bound(nworkers: Option<usize>, nthreads: Option<usize>) -> Flags {
    Flags { nworkers, nthreads, bind: true, ..Default::default() }
}

fn disjoint(specs: &[WorkerSpec]) -> bool {
    let mut all: Vec<u32> = specs.iter().flat_map(|s| s.cpus.iter().copied()).collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    all.len() == n
}

#[test]
fn a_two_socket_node_is_read_with_its_numa_nodes_cores_and_memory() {
    let t = two_socket();
    assert_eq!(t.packages, 2);
    assert_eq!(t.numa_nodes.iter().map(|n| (n.os_index, n.memory)).collect::<Vec<_>>(), [(0, 32 * GIB), (1, 32 * GIB), (2, 32 * GIB), (3, 32 * GIB)]);
    assert_eq!(t.cores.len(), 16);
    assert!(t.cores.iter().all(|c| c.pus.len() == 2));
    assert_eq!(t.cores[5].numa, 1);
    assert_eq!(t.cores[5].package, 0);
    assert_eq!(t.cores[9].package, 1);
    assert_eq!(t.cores[0].pus, [0, 1]);
    assert!(t.gpus.is_empty());
}

#[test]
fn auto_makes_one_pinned_worker_per_physical_core() {
    let t = two_socket();
    let specs = per_core(&t, &bound(None, None));
    assert_eq!(specs.len(), 16);
    assert!(disjoint(&specs), "each worker has cores of its own");
    for (i, s) in specs.iter().enumerate() {
        assert_eq!(s.cpus, t.cores[i].pus, "worker {i} gets both threads of core {i}");
        assert_eq!(s.numa, Some(t.cores[i].numa));
        assert_eq!(s.nthreads, 1);
        assert_eq!(s.cores, 1);
        assert_eq!(s.memory_limit, 8 * GIB, "its NUMA node's memory split over its 4 workers");
    }
}

#[test]
fn n_workers_spread_over_packages_then_numa_nodes() {
    let t = two_socket();
    let numa_of = |specs: &[WorkerSpec]| specs.iter().map(|s| s.numa.unwrap()).collect::<Vec<_>>();
    let mut all = per_core(&t, &bound(Some(4), Some(2)));
    assert_eq!(all.iter().map(|s| (s.cores, s.nthreads)).collect::<Vec<_>>(), [(2, 2); 4], "--nthreads: that many cores each");
    assert_eq!(numa_of(&all), [0, 1, 2, 3]);
    all.clear();
    let four = per_core(&t, &bound(Some(4), None));
    assert_eq!(numa_of(&four), [0, 1, 2, 3]);
    assert!(four.iter().all(|s| s.nthreads == 4 && s.cores == 4 && s.cpus.len() == 8 && s.memory_limit == 32 * GIB));
    assert_eq!(four[1].cpus, (8..16).collect::<Vec<u32>>());
    let two = per_core(&t, &bound(Some(2), None));
    assert_eq!(two.iter().map(|s| s.cores).collect::<Vec<_>>(), [8, 8], "one worker per socket");
    assert!(two.iter().all(|s| s.nthreads == 8 && s.numa.is_none()));
    assert_eq!(two[0].cpus, (0..16).collect::<Vec<u32>>(), "the whole first socket");
    // Three do not divide the node: even runs of cores, NUMA-bound only
    // where a run stays inside one node.
    let three = per_core(&t, &bound(Some(3), None));
    assert_eq!(three.iter().map(|s| s.cores).collect::<Vec<_>>(), [5, 5, 6]);
    assert_eq!(three.iter().map(|s| s.nthreads).collect::<Vec<_>>(), [5, 5, 6]);
    assert!(three.iter().all(|s| s.numa.is_none() && s.memory_limit == 128 * GIB / 3));
    assert!(disjoint(&three));
    // One worker (the default) gets the whole node.
    let one = per_core(&t, &bound(Some(1), None));
    assert_eq!((one[0].cores, one[0].nthreads, one[0].cpus.len(), one[0].numa), (16, 16, 32, None));
    assert_eq!(one[0].memory_limit, 128 * GIB);
}

#[test]
fn nthreads_gives_each_worker_that_many_cores() {
    let t = two_socket();
    let specs = per_core(&t, &bound(None, Some(2)));
    assert_eq!(specs.len(), 8);
    assert!(specs.iter().all(|s| s.nthreads == 2 && s.cores == 2 && s.cpus.len() == 4));
    assert!(disjoint(&specs));
    assert_eq!(specs.iter().map(|s| s.memory_limit).collect::<Vec<_>>(), vec![16 * GIB; 8]);
}

#[test]
fn an_explicit_memory_limit_and_no_bind_are_kept() {
    let t = two_socket();
    let flags = Flags { nworkers: Some(4), memory_limit: Some(3 * GIB), bind: false, ..Default::default() };
    let specs = per_core(&t, &flags);
    assert!(specs.iter().all(|s| s.cpus.is_empty() && s.numa.is_none() && s.memory_limit == 3 * GIB && s.cores == 4));
}

#[test]
fn a_one_core_box_gets_one_worker_or_shares_its_core() {
    let t = synthetic("pack:1 core:1 pu:1");
    assert_eq!(t.cores.len(), 1);
    let one = per_core(&t, &bound(None, None));
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].cpus, [0]);
    let four = per_core(&t, &bound(Some(4), None));
    assert_eq!(four.len(), 4);
    assert!(four.iter().all(|s| s.cpus == [0] && s.nthreads == 1));
}

#[test]
fn an_eight_gpu_node_is_read_with_each_gpus_close_cores() {
    let t = dgx();
    assert_eq!(t.gpus.len(), 8);
    for (i, g) in t.gpus.iter().enumerate() {
        let node = (i / 2) as u32;
        assert_eq!(g.index, i as u32);
        assert_eq!(g.numa, Some(node), "GPU {i}");
        let close: Vec<u32> = (node * 16..node * 16 + 16).collect();
        assert_eq!(g.cpus, close, "GPU {i}: the PUs of its NUMA node");
        assert_eq!(g.name, "NVIDIA A100-SXM4-40GB");
    }
    assert_eq!(t.gpus[0].pci_bus_id, "0000:11:00.0");
    assert_eq!(t.gpus[7].pci_bus_id, "0000:d2:00.0");
}

#[test]
fn one_cuda_worker_per_gpu_on_its_close_cores_with_its_device_first() {
    let t = dgx();
    let devices: Vec<(String, _)> = t.gpus.iter().map(|g| (g.index.to_string(), g.clone())).collect();
    let specs = per_gpu(&t, &devices, &Flags { bind: true, ..Default::default() });
    assert_eq!(specs.len(), 8);
    for (i, s) in specs.iter().enumerate() {
        let gpu = s.gpu.as_ref().unwrap();
        assert_eq!(gpu.index, i as u32);
        assert_eq!(s.nthreads, 1);
        assert_eq!(s.numa, Some((i / 2) as u32));
        assert_eq!(s.cpus, t.gpus[i].cpus);
        assert_eq!(s.memory_limit, 256 * GIB / 8);
        let visible: Vec<String> = (0..8).map(|k| ((i + k) % 8).to_string()).collect();
        assert_eq!(gpu.visible_devices, visible.join(","));
    }
    // CUDA_VISIBLE_DEVICES=5,2: two workers, each with its own device first.
    let some = vec![("5".to_string(), t.gpus[5].clone()), ("2".to_string(), t.gpus[2].clone())];
    let specs = per_gpu(&t, &some, &Flags { bind: true, nthreads: Some(2), ..Default::default() });
    let visible: Vec<&str> = specs.iter().map(|s| s.gpu.as_ref().unwrap().visible_devices.as_str()).collect();
    assert_eq!(visible, ["5,2", "2,5"]);
    assert_eq!(specs[0].numa, Some(2));
    assert_eq!(specs[1].numa, Some(1));
    assert!(specs.iter().all(|s| s.nthreads == 2 && s.memory_limit == 128 * GIB));
}

#[test]
fn this_machine_is_read_within_the_cpus_this_process_may_use() {
    let t = Topology::read(&Source::ThisMachine).unwrap();
    let allowed = rdask_worker::topology::available_cpus();
    let pus: Vec<u32> = t.cores.iter().flat_map(|c| c.pus.iter().copied()).collect();
    assert!(!pus.is_empty());
    assert!(pus.iter().all(|p| allowed.contains(p)), "{pus:?} vs allowed {allowed:?}");
    assert!(t.summary().contains("core(s)"));
}

#[test]
fn a_bad_description_is_a_clear_error() {
    let e = Topology::read(&Source::Synthetic("pack:banana".into())).unwrap_err().to_string();
    assert!(e.contains("synthetic") && e.contains("banana"), "{e}");
    let e = Topology::read(&Source::XmlFile("/nonexistent/topo.xml".into())).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/topo.xml"), "{e}");
    let garbage = std::env::temp_dir().join(format!("rdask-not-xml-{}.xml", std::process::id()));
    std::fs::write(&garbage, "this is not hwloc XML").unwrap();
    let e = Topology::read(&Source::XmlFile(garbage.clone())).unwrap_err().to_string();
    std::fs::remove_file(&garbage).unwrap();
    assert!(e.contains("XML topology"), "{e}");
}
