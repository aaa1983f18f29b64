//! The machine's topology, worker layouts and process binding for the
//! Python launchers (`rdask-worker`, `rdask-cuda-worker`, `rdask topology`).
//! Values cross as JSON: the launchers only read them.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rdask_worker::topology::layout::{per_core, per_gpu, Flags};
use rdask_worker::topology::{bind, Gpu, Source, Topology};

fn source(synthetic: Option<String>, xml: Option<String>) -> PyResult<Source> {
    match (synthetic, xml) {
        (Some(_), Some(_)) => Err(PyValueError::new_err("give a synthetic description or an XML file, not both")),
        (Some(s), None) => Ok(Source::Synthetic(s)),
        (None, Some(x)) => Ok(Source::XmlFile(x.into())),
        (None, None) => Ok(Source::ThisMachine),
    }
}

/// The topology as JSON: this machine (within this process's CPUs), an
/// hwloc synthetic description, or an hwloc XML file.
#[pyfunction]
#[pyo3(signature = (synthetic=None, xml=None))]
pub fn read_topology(py: Python<'_>, synthetic: Option<String>, xml: Option<String>) -> PyResult<String> {
    let source = source(synthetic, xml)?;
    let topo = py.detach(|| Topology::read(&source)).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(serde_json::to_string(&topo).expect("a topology serialises"))
}

/// A few lines describing a topology (JSON from `read_topology`).
#[pyfunction]
pub fn describe_topology(topology: &str) -> PyResult<String> {
    let topo: Topology = serde_json::from_str(topology).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(topo.summary())
}

/// Worker specs (JSON list) for `flags` (JSON of `layout::Flags`): per core,
/// or, with `devices` (a JSON list of [id as in CUDA_VISIBLE_DEVICES, gpu]),
/// one per GPU.
#[pyfunction]
#[pyo3(signature = (topology, flags, devices=None))]
pub fn plan_workers(topology: &str, flags: &str, devices: Option<&str>) -> PyResult<String> {
    let bad = |e: serde_json::Error| PyValueError::new_err(e.to_string());
    let topo: Topology = serde_json::from_str(topology).map_err(bad)?;
    let flags: Flags = serde_json::from_str(flags).map_err(bad)?;
    let specs = match devices {
        None => per_core(&topo, &flags),
        Some(d) => {
            let devices: Vec<(String, Gpu)> = serde_json::from_str(d).map_err(bad)?;
            per_gpu(&topo, &devices, &flags)
        }
    };
    Ok(serde_json::to_string(&specs).expect("specs serialise"))
}

/// Binds this process to `cpus` (within its allowed set) and prefers memory
/// from NUMA node `numa`; returns (cpus now, numa node bound, warnings).
/// Call before threads start: they inherit the binding.
#[pyfunction]
#[pyo3(signature = (cpus, numa=None))]
pub fn bind_process(cpus: Vec<u32>, numa: Option<u32>) -> (Vec<u32>, Option<u32>, Vec<String>) {
    let b = bind::bind_process(&cpus, numa);
    (b.cpus, b.numa, b.warnings)
}

/// The CPUs this process may run on.
#[pyfunction]
pub fn allowed_cpus() -> PyResult<Vec<u32>> {
    bind::allowed_cpus().map_err(crate::os_error)
}

/// The NVIDIA GPUs NVML reports (JSON list), or `GpuUnavailableError` with
/// one line saying what is missing (no driver, no GPU).
#[pyfunction]
pub fn gpu_devices(py: Python<'_>) -> PyResult<String> {
    let gpus = py.detach(rdask_gpu::nvml::devices).map_err(|e| crate::GpuUnavailableError::new_err(e.to_string()))?;
    let list: Vec<serde_json::Value> = gpus
        .iter()
        .map(|g| {
            serde_json::json!({"index": g.index, "uuid": g.uuid, "name": g.name, "pci_bus_id": g.pci_bus_id,
                               "memory": g.memory, "cpus": g.cpus})
        })
        .collect();
    Ok(serde_json::Value::Array(list).to_string())
}

/// The workers of `rdask-cuda-worker` (JSON list of specs): one per GPU
/// named in `visible` (CUDA_VISIBLE_DEVICES; all when None), placed near it.
/// `gpus` is the JSON of `gpu_devices` (or, for a dry run on a described
/// machine, the same fields made from the topology's GPUs).
#[pyfunction]
#[pyo3(signature = (topology, flags, gpus, visible=None))]
pub fn plan_cuda_workers(topology: &str, flags: &str, gpus: &str, visible: Option<&str>) -> PyResult<String> {
    let bad = |e: serde_json::Error| PyValueError::new_err(e.to_string());
    let topo: Topology = serde_json::from_str(topology).map_err(bad)?;
    let flags: Flags = serde_json::from_str(flags).map_err(bad)?;
    let raw: Vec<serde_json::Value> = serde_json::from_str(gpus).map_err(bad)?;
    let field = |v: &serde_json::Value, k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let gpus: Vec<rdask_gpu::NvmlGpu> = raw
        .iter()
        .map(|v| {
            Ok(rdask_gpu::NvmlGpu {
                index: serde_json::from_value(field(v, "index"))?,
                uuid: serde_json::from_value(field(v, "uuid")).unwrap_or_default(),
                name: serde_json::from_value(field(v, "name")).unwrap_or_default(),
                pci_bus_id: serde_json::from_value(field(v, "pci_bus_id")).unwrap_or_default(),
                memory: serde_json::from_value(field(v, "memory")).unwrap_or_default(),
                cpus: serde_json::from_value(field(v, "cpus")).unwrap_or_default(),
            })
        })
        .collect::<Result<_, serde_json::Error>>()
        .map_err(bad)?;
    let chosen = rdask_gpu::visible_gpus(&topo, &gpus, visible).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let specs = rdask_gpu::cuda_layout(&topo, &chosen, &flags);
    Ok(serde_json::to_string(&specs).expect("specs serialise"))
}
