//! The machine as workers are laid out on it: packages, NUMA nodes with
//! their memory, physical cores with their hardware threads (PUs), and GPUs
//! with the cores and NUMA node closest to them.
//!
//! Reading the machine and deciding a worker layout are two things: this
//! module makes a [`Topology`] value (from the machine through hwloc, or from
//! a synthetic or XML description, so that layouts are tested for machines
//! this project does not have), and [`layout`] turns it into worker specs
//! without touching the hardware.

pub mod bind;
#[cfg(feature = "hwloc")]
mod hwloc;
pub mod layout;

use serde::{Deserialize, Serialize};

/// Where a topology comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// This machine, restricted to the CPUs this process may use (a Slurm
    /// cpuset, `taskset`).
    ThisMachine,
    /// An hwloc synthetic description, e.g. `"pack:2 numa:2 core:16 pu:2"`.
    Synthetic(String),
    /// An hwloc XML file (`lstopo --of xml`), which may include GPUs.
    XmlFile(std::path::PathBuf),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// What was read, for people: "this machine (hwloc 2.9.0)", ...
    pub description: String,
    pub packages: u32,
    pub numa_nodes: Vec<NumaNode>,
    /// Physical cores in hwloc's logical order (package by package, NUMA
    /// node by NUMA node): neighbours in this list share caches.
    pub cores: Vec<Core>,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumaNode {
    /// The OS index (what `numactl` and `set_mempolicy` call it).
    pub os_index: u32,
    /// Bytes of memory local to this node (0 when unknown).
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Core {
    pub package: u32,
    /// OS index of the NUMA node the core belongs to.
    pub numa: u32,
    /// OS indexes of its hardware threads (what `sched_setaffinity` takes).
    pub pus: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// Index in PCI bus order, which is what NVML and CUDA (with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`) use.
    pub index: u32,
    /// `0000:07:00.0`.
    pub pci_bus_id: String,
    pub name: String,
    /// NUMA node closest to the GPU, if the machine says.
    pub numa: Option<u32>,
    /// OS indexes of the PUs closest to the GPU.
    pub cpus: Vec<u32>,
}

/// Why a topology could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("hwloc could not read {what}: {message}")]
    Hwloc { what: String, message: String },
    #[error("this build has no hwloc support (cargo feature `hwloc`); it cannot read {0}")]
    NoHwloc(String),
}

impl Topology {
    /// Reads the topology from `source`.
    pub fn read(source: &Source) -> Result<Topology, TopologyError> {
        #[cfg(feature = "hwloc")]
        {
            let mut t = hwloc::read(source)?;
            if *source == Source::ThisMachine {
                t.agree_with_physical_memory(physical_memory());
            }
            Ok(t)
        }
        #[cfg(not(feature = "hwloc"))]
        match source {
            Source::ThisMachine => {
                let mut t = Topology::flat(available_cpus());
                t.numa_nodes[0].memory = physical_memory();
                Ok(t)
            }
            Source::Synthetic(s) => Err(TopologyError::NoHwloc(format!("synthetic topology {s:?}"))),
            Source::XmlFile(p) => Err(TopologyError::NoHwloc(format!("XML topology {}", p.display()))),
        }
    }

    /// One package and NUMA node holding these PUs as cores, with unknown
    /// memory: what is known without hwloc.
    pub fn flat(pus: Vec<u32>) -> Topology {
        Topology {
            description: format!("{} CPUs (without hwloc: packages and NUMA nodes unknown)", pus.len()),
            packages: 1,
            numa_nodes: vec![NumaNode { os_index: 0, memory: 0 }],
            cores: pus.into_iter().map(|pu| Core { package: 0, numa: 0, pus: vec![pu] }).collect(),
            gpus: Vec::new(),
        }
    }

    /// Some virtual machines report NUMA node memory that does not add up to
    /// the memory the kernel has (here: 7 GB in node 0 of a 24 GB VM). When
    /// the two differ by more than a tenth, the nodes' shares are kept and
    /// scaled to the physical total, so `--memory-limit auto` splits what
    /// the machine really has.
    pub fn agree_with_physical_memory(&mut self, physical: u64) {
        let total = self.total_memory();
        if physical == 0 || total == 0 || total.abs_diff(physical) * 10 <= physical {
            return;
        }
        for n in &mut self.numa_nodes {
            n.memory = (n.memory as u128 * physical as u128 / total as u128) as u64;
        }
        self.description += &format!(
            "; NUMA memory scaled to the system's {:.1} GiB (the nodes reported {:.1} GiB)",
            physical as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }

    pub fn numa(&self, os_index: u32) -> Option<&NumaNode> {
        self.numa_nodes.iter().find(|n| n.os_index == os_index)
    }

    pub fn total_memory(&self) -> u64 {
        self.numa_nodes.iter().map(|n| n.memory).sum()
    }

    /// A few lines for people (`rdask topology`).
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{}\n{} package(s), {} NUMA node(s), {} core(s), {} PU(s), {} GPU(s)\n",
            self.description,
            self.packages,
            self.numa_nodes.len(),
            self.cores.len(),
            self.cores.iter().map(|c| c.pus.len()).sum::<usize>(),
            self.gpus.len()
        );
        for n in &self.numa_nodes {
            let cores: Vec<&Core> = self.cores.iter().filter(|c| c.numa == n.os_index).collect();
            let pus: Vec<u32> = cores.iter().flat_map(|c| c.pus.iter().copied()).collect();
            let package = cores.first().map_or(0, |c| c.package);
            out += &format!(
                "  NUMA node {} (package {package}): {} core(s), PUs {}, {}\n",
                n.os_index,
                cores.len(),
                cpu_list(&pus),
                human_bytes(n.memory)
            );
        }
        for g in &self.gpus {
            let numa = g.numa.map_or("?".to_string(), |n| n.to_string());
            out += &format!("  GPU {} {} at {}: NUMA node {numa}, close PUs {}\n", g.index, g.name, g.pci_bus_id, cpu_list(&g.cpus));
        }
        out
    }
}

/// The CPUs this process may run on (its affinity mask), for the flat
/// fallback and for binding within a cpuset.
pub fn available_cpus() -> Vec<u32> {
    bind::allowed_cpus().unwrap_or_else(|_| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0..n as u32).collect()
    })
}

/// Bytes of physical memory the kernel manages (0 if unknown).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGE_SIZE)) };
    if pages <= 0 || size <= 0 {
        return 0;
    }
    pages as u64 * size as u64
}

pub use rdask_transport::protocol::cpu_list;

/// Parses `cpu_list`'s form back (`0-3,8`); None on anything else.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn human_bytes(n: u64) -> String {
    if n == 0 {
        return "memory unknown".into();
    }
    format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_memory_that_disagrees_with_the_system_is_scaled() {
        let mut t = Topology::flat(vec![0, 1]);
        t.numa_nodes = vec![NumaNode { os_index: 0, memory: 3 << 30 }, NumaNode { os_index: 1, memory: 1 << 30 }];
        t.agree_with_physical_memory(8 << 30);
        assert_eq!(t.numa_nodes.iter().map(|n| n.memory).collect::<Vec<_>>(), [6 << 30, 2 << 30]);
        assert!(t.description.contains("scaled"));
        // Close enough (within a tenth): left alone.
        let mut t = Topology::flat(vec![0]);
        t.numa_nodes[0].memory = 95 << 20;
        t.agree_with_physical_memory(100 << 20);
        assert_eq!(t.numa_nodes[0].memory, 95 << 20);
    }

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(cpu_list(&[3, 0, 1, 2, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
