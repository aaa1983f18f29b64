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
