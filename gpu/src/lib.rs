//! rdask on GPU nodes: the NVIDIA GPUs of this machine as NVML reports them
//! (the library is loaded at run time, so builds and CPU-only machines need
//! no driver), their locality, and the worker layout of
//! `rdask-cuda-worker`: one worker per visible GPU on the cores closest to
//! it. The launcher itself is Python (`rdask.cuda`), sharing the nanny and
//! binding path of `rdask-worker`.
//!
//! The device data plane's building blocks: device memory behind one trait
//! (`device.rs`, with a host-memory stand-in and, with the `cuda` feature,
//! cudarc in `cuda.rs`), chunked staging for transfers (`staging.rs`) and
//! device-to-host spilling under a device memory limit (`device_store.rs`).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod device_store;
pub mod ipc;
pub mod nvml;
pub mod staging;

use rdask_worker::topology::layout::{per_gpu, Flags, WorkerSpec};
use rdask_worker::topology::{Gpu, Topology};

/// Why GPUs could not be found or used. Every variant reads as one clear
/// line for the user; none of them is a panic.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no NVIDIA driver: cannot load {library} ({reason}); rdask-cuda-worker needs an NVIDIA GPU and its driver")]
    NoDriver { library: String, reason: String },
    #[error("the NVIDIA driver is loaded but reports no GPU")]
    NoDevices,
    #[error("NVML error while {what}: {reason}")]
    Nvml { what: String, reason: String },
    #[error("CUDA_VISIBLE_DEVICES={value:?} names no GPU of this machine: {reason}")]
    BadVisibleDevices { value: String, reason: String },
    #[error("no CUDA: {reason}")]
    NoCuda { reason: String },
    #[error("out of device memory on {device}: {wanted} bytes wanted, about {free} free")]
    OutOfMemory { device: String, wanted: u64, free: u64 },
    #[error("device error while {what}: {reason}")]
    Device { what: String, reason: String },
    /// Another process's memory is mapped in this one already (by UCX's
    /// CUDA IPC, say): CUDA refuses a second mapping.
    #[error("device memory of another process is mapped here already: {reason}")]
    AlreadyMapped { reason: String },
}

/// A GPU as NVML sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NvmlGpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// `0000:07:00.0` (lower case, 4-digit domain), as hwloc writes it.
    pub pci_bus_id: String,
    pub memory: u64,
    /// OS indexes of the CPUs NVML calls close to the GPU.
    pub cpus: Vec<u32>,
}

/// The GPUs the workers should use, as (id as written in
/// `CUDA_VISIBLE_DEVICES`, GPU), in that variable's order; all GPUs when it
/// is unset. Entries are indices or UUIDs (`GPU-...`, a prefix is enough, as
/// CUDA accepts). Locality comes from the topology where it knows the GPU's
/// PCI bus, else from NVML.
pub fn visible_gpus(topo: &Topology, gpus: &[NvmlGpu], visible: Option<&str>) -> Result<Vec<(String, Gpu)>, GpuError> {
    let as_gpu = |g: &NvmlGpu| {
        let hw = topo.gpus.iter().find(|t| t.pci_bus_id == g.pci_bus_id);
        Gpu {
            index: g.index,
            pci_bus_id: g.pci_bus_id.clone(),
            name: g.name.clone(),
            numa: hw.and_then(|h| h.numa).or_else(|| numa_of(topo, &g.cpus)),
            cpus: hw.map(|h| h.cpus.clone()).filter(|c| !c.is_empty()).unwrap_or_else(|| g.cpus.clone()),
        }
    };
    let Some(value) = visible.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(gpus.iter().map(|g| (g.index.to_string(), as_gpu(g))).collect());
    };
    let bad = |reason: String| GpuError::BadVisibleDevices { value: value.to_string(), reason };
    let mut out = Vec::new();
    for id in value.split(',').map(str::trim) {
        let found = match id.parse::<u32>() {
            Ok(i) => gpus.iter().find(|g| g.index == i),
            Err(_) => gpus.iter().find(|g| g.uuid.starts_with(id) || format!("GPU-{}", g.uuid.trim_start_matches("GPU-")).starts_with(id)),
        };
        let g = found.ok_or_else(|| bad(format!("no GPU {id:?} (this machine has {})", gpus.len())))?;
        if out.iter().any(|(_, o): &(String, Gpu)| o.index == g.index) {
            return Err(bad(format!("GPU {id:?} is listed twice")));
        }
        out.push((id.to_string(), as_gpu(g)));
    }
    Ok(out)
}

/// The NUMA node holding all of `cpus`, if one does.
fn numa_of(topo: &Topology, cpus: &[u32]) -> Option<u32> {
    let nodes: Vec<u32> = topo.cores.iter().filter(|c| c.pus.iter().any(|p| cpus.contains(p))).map(|c| c.numa).collect();
    let first = *nodes.first()?;
    nodes.iter().all(|n| *n == first).then_some(first)
}

/// The workers of `rdask-cuda-worker`: one per visible GPU.
pub fn cuda_layout(topo: &Topology, visible: &[(String, Gpu)], flags: &Flags) -> Vec<WorkerSpec> {
    per_gpu(topo, visible, flags)
}
