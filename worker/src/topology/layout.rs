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

/// One worker per physical core, or `nworkers` spread evenly over the NUMA
/// nodes (and so the packages), each on a contiguous run of cores.
pub fn per_core(topo: &Topology, flags: &Flags) -> Vec<WorkerSpec> {
    let ncores = topo.cores.len().max(1);
    let (n, threads) = match (flags.nworkers, flags.nthreads) {
        (None, None) => (ncores, 1),
        (None, Some(t)) => ((ncores / t.max(1)).max(1), t.max(1)),
        (Some(n), None) => (n.max(1), (ncores / n.max(1)).max(1)),
        (Some(n), Some(t)) => (n.max(1), t.max(1)),
    };
    // Cores grouped by package, then NUMA node, in topology order.
    let mut groups: Vec<(u32, u32, Vec<usize>)> = Vec::new();
    for (i, c) in topo.cores.iter().enumerate() {
        match groups.iter_mut().find(|(pkg, numa, _)| *pkg == c.package && *numa == c.numa) {
            Some((_, _, members)) => members.push(i),
            None => groups.push((c.package, c.numa, vec![i])),
        }
    }
    if groups.is_empty() {
        groups.push((0, 0, Vec::new()));
    }
    // Workers go to packages in proportion to their cores, then within a
    // package to its NUMA nodes the same way: two workers on a two-socket
    // node get one socket each.
    let mut packages: Vec<u32> = groups.iter().map(|g| g.0).collect();
    packages.dedup();
    let package_cores: Vec<usize> =
        packages.iter().map(|p| groups.iter().filter(|g| g.0 == *p).map(|g| g.2.len().max(1)).sum()).collect();
    let mut quotas = Vec::with_capacity(groups.len());
    for (p, k) in packages.iter().zip(apportion(n, &package_cores)) {
        let weights: Vec<usize> = groups.iter().filter(|g| g.0 == *p).map(|g| g.2.len().max(1)).collect();
        quotas.extend(apportion(k, &weights));
    }
    let groups: Vec<(u32, Vec<usize>)> = groups.into_iter().map(|(_, numa, members)| (numa, members)).collect();
    let mut out = Vec::with_capacity(n);
    for ((numa, members), k) in groups.iter().zip(quotas) {
        let c = members.len();
        let node_memory = topo.numa(*numa).map_or(0, |n| n.memory);
        for j in 0..k {
            let (start, width) = if c == 0 { (0, 0) } else { (j * c / k, (threads.min(c / k)).max(1)) };
            let mine: Vec<usize> = members.iter().copied().skip(start).take(width.min(c - start.min(c))).collect();
            let cpus: Vec<u32> = if flags.bind { mine.iter().flat_map(|&i| topo.cores[i].pus.iter().copied()).collect() } else { Vec::new() };
            let memory_limit = flags.memory_limit.unwrap_or(if node_memory > 0 {
                node_memory / k as u64
            } else {
                flags.fallback_memory / n as u64
            });
            out.push(WorkerSpec {
                index: out.len(),
                nthreads: threads as u32,
                cpus,
                cores: mine.len(),
                numa: (flags.bind && c > 0).then_some(*numa),
                memory_limit,
                gpu: None,
            });
        }
    }
    out
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

/// Splits `n` over groups in proportion to `weights` (largest remainder;
/// ties go to the earlier group).
fn apportion(n: usize, weights: &[usize]) -> Vec<usize> {
    let total: usize = weights.iter().sum::<usize>().max(1);
    let mut quotas: Vec<usize> = weights.iter().map(|w| n * w / total).collect();
    let mut left = n - quotas.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(n * weights[i] % total), i));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        quotas[i] += 1;
        left -= 1;
    }
    quotas
}

/// The layout as a table for people (`rdask topology`).
pub fn describe(specs: &[WorkerSpec]) -> String {
    let mut out = String::new();
    for s in specs {
        let cpus = if s.cpus.is_empty() { "unbound".to_string() } else { super::cpu_list(&s.cpus) };
        let numa = s.numa.map_or("-".to_string(), |n| n.to_string());
        let mem = if s.memory_limit == 0 { "no limit".to_string() } else { format!("{:.2} GiB", s.memory_limit as f64 / (1u64 << 30) as f64) };
        out += &format!("  worker {:>3}: {} thread(s), CPUs {cpus}, NUMA node {numa}, memory {mem}", s.index, s.nthreads);
        if let Some(g) = &s.gpu {
            out += &format!(", GPU {} ({}), CUDA_VISIBLE_DEVICES={}", g.index, g.name, g.visible_devices);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn apportion_is_proportional_and_complete() {
        assert_eq!(apportion(4, &[4, 4, 4, 4]), vec![1, 1, 1, 1]);
        assert_eq!(apportion(3, &[4, 4, 4, 4]), vec![1, 1, 1, 0]);
        assert_eq!(apportion(6, &[4, 4, 4, 4]), vec![2, 2, 1, 1]);
        assert_eq!(apportion(5, &[8, 2]), vec![4, 1]);
        assert_eq!(apportion(1, &[1]), vec![1]);
        assert_eq!(apportion(7, &[1]), vec![7]);
    }
}
