//! Worker layouts: which cores, NUMA node, memory and GPU each worker
//! process of a node gets. Pure functions of a [`Topology`] and the flags,
//! so they are tested against machines this project does not have.

use serde::{Deserialize, Serialize};

use super::{Gpu, Topology};

/// What the user asked for (`rdask-worker` / `rdask-cuda-worker` flags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Flags {
    /// Worker processes; None is `auto`: one per physical core (or one per
    /// `nthreads` cores), or one per GPU.
    pub nworkers: Option<usize>,
    /// Threads per worker; None: the cores a worker gets (per-core
    /// layouts) or 1 (GPU layouts, as dask-cuda).
    pub nthreads: Option<usize>,
    /// Bytes per worker; None is `auto`: the memory of the worker's NUMA node
    /// split among the workers on it.
    pub memory_limit: Option<u64>,
    /// Host memory to split when the topology does not know its NUMA
    /// nodes' memory (0: none known).
    pub fallback_memory: u64,
    /// Pin workers to their cores and memory to their NUMA node.
    pub bind: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub index: usize,
    pub nthreads: u32,
    /// OS indexes of the PUs to bind to; empty: unbound.
    pub cpus: Vec<u32>,
    /// Physical cores the worker got (for reports; also when unbound).
    pub cores: usize,
    /// NUMA node to take memory from; None: no memory binding.
    pub numa: Option<u32>,
    /// Bytes; 0: no limit.
    pub memory_limit: u64,
    pub gpu: Option<GpuSlot>,
}

/// The GPU of a `rdask-cuda-worker` worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSlot {
    pub index: u32,
    pub pci_bus_id: String,
    pub name: String,
    /// `CUDA_VISIBLE_DEVICES` for this worker: every visible device, its own
    /// first (as dask-cuda does), so device 0 inside the worker is its GPU
    /// and the others stay reachable for peer copies.
    pub visible_devices: String,
}

/// One worker per physical core, or `nworkers` spread evenly over the
/// cores in topology order (package by package, NUMA node by NUMA node), so
/// that two workers on a two-socket node get a socket each and four get a
/// NUMA node each. Each worker gets a contiguous run of cores; with more
/// workers than cores, workers share cores.
pub fn per_core(topo: &Topology, flags: &Flags) -> Vec<WorkerSpec> {
    let ncores = topo.cores.len();
    let n = match (flags.nworkers, flags.nthreads) {
        (Some(n), _) => n.max(1),
        (None, None) => ncores.max(1),
        (None, Some(t)) => (ncores / t.max(1)).max(1),
    };
    // Core runs: [start, end) of the core list for each worker.
    let runs: Vec<(usize, usize)> = (0..n)
        .map(|j| {
            if ncores == 0 {
                return (0, 0);
            }
            let start = j * ncores / n;
            // `--nthreads T`: T cores from the worker's even start (runs
            // overlap when T workers' worth exceeds the node); else up to
            // the next worker's start.
            let end = match flags.nthreads {
                Some(t) => start + t.max(1),
                None => (j + 1) * ncores / n,
            };
            (start, end.max(start + 1).min(ncores))
        })
        .collect();
    let numa_of = |&(s, e): &(usize, usize)| -> Option<u32> {
        let first = topo.cores.get(s)?.numa;
        topo.cores[s..e].iter().all(|c| c.numa == first).then_some(first)
    };
    let nodes: Vec<Option<u32>> = runs.iter().map(numa_of).collect();
    let total = match topo.total_memory() {
        0 => flags.fallback_memory,
        t => t,
    };
    runs.iter()
        .zip(&nodes)
        .enumerate()
        .map(|(j, (&(s, e), &numa))| {
            let cores = &topo.cores[s..e];
            let node_memory = numa.and_then(|n| topo.numa(n)).map_or(0, |n| n.memory);
            let sharing = nodes.iter().filter(|n| **n == numa).count().max(1) as u64;
            let memory_limit = flags.memory_limit.unwrap_or(if node_memory > 0 { node_memory / sharing } else { total / n as u64 });
            WorkerSpec {
                index: j,
                nthreads: flags.nthreads.unwrap_or(cores.len()).max(1) as u32,
                cpus: if flags.bind { cores.iter().flat_map(|c| c.pus.iter().copied()).collect() } else { Vec::new() },
                cores: cores.len(),
                numa: if flags.bind { numa } else { None },
                memory_limit,
                gpu: None,
            }
        })
        .collect()
}

/// One worker per GPU in `devices` (each given as it appears in
/// `CUDA_VISIBLE_DEVICES`, or its index), on the cores closest to it.
pub fn per_gpu(topo: &Topology, devices: &[(String, Gpu)], flags: &Flags) -> Vec<WorkerSpec> {
    let n = devices.len();
    let total = match topo.total_memory() {
        0 => flags.fallback_memory,
        t => t,
    };
    let ids: Vec<&str> = devices.iter().map(|(id, _)| id.as_str()).collect();
    devices
        .iter()
        .enumerate()
        .map(|(i, (_, gpu))| {
            let mut close = gpu.cpus.clone();
            if close.is_empty() {
                if let Some(node) = gpu.numa {
                    close = topo.cores.iter().filter(|c| c.numa == node).flat_map(|c| c.pus.iter().copied()).collect();
                }
            }
            let cores = topo.cores.iter().filter(|c| c.pus.iter().any(|p| close.contains(p))).count();
            let rotated: Vec<&str> = ids[i..].iter().chain(ids[..i].iter()).copied().collect();
            WorkerSpec {
                index: i,
                nthreads: flags.nthreads.unwrap_or(1).max(1) as u32,
                cpus: if flags.bind { close } else { Vec::new() },
                cores,
                numa: if flags.bind { gpu.numa } else { None },
                memory_limit: flags.memory_limit.unwrap_or(if n == 0 { 0 } else { total / n as u64 }),
                gpu: Some(GpuSlot {
                    index: gpu.index,
                    pci_bus_id: gpu.pci_bus_id.clone(),
                    name: gpu.name.clone(),
                    visible_devices: rotated.join(","),
                }),
            }
        })
        .collect()
}
