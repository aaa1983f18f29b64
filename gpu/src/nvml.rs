//! NVML, loaded at run time: the GPUs of this machine.

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use crate::{GpuError, NvmlGpu};

/// Library names tried in order: the driver ships the versioned one; the
/// unversioned one comes with development packages.
const LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Loads NVML, or says clearly why it cannot.
pub fn load() -> Result<Nvml, GpuError> {
    let mut last = String::new();
    for lib in LIBRARIES {
        match Nvml::builder().lib_path(std::ffi::OsStr::new(lib)).init() {
            Ok(nvml) => return Ok(nvml),
            // The versioned library's reason is the one to show.
            Err(NvmlError::LibloadingError(e)) if last.is_empty() => last = e.to_string(),
            Err(NvmlError::LibloadingError(_)) => {}
            Err(e @ (NvmlError::DriverNotLoaded | NvmlError::NoPermission)) => {
                return Err(GpuError::NoDriver { library: lib.to_string(), reason: e.to_string() })
            }
            Err(e) => return Err(GpuError::Nvml { what: format!("initialising {lib}"), reason: e.to_string() }),
        }
    }
    Err(GpuError::NoDriver { library: LIBRARIES[0].to_string(), reason: last })
}

/// Every GPU NVML reports, in NVML's (PCI bus) order.
pub fn devices() -> Result<Vec<NvmlGpu>, GpuError> {
    let nvml = load()?;
    fn err(what: &'static str) -> impl Fn(NvmlError) -> GpuError {
        move |e| GpuError::Nvml { what: what.to_string(), reason: e.to_string() }
    }
    let n = nvml.device_count().map_err(err("counting GPUs"))?;
    if n == 0 {
        return Err(GpuError::NoDevices);
    }
    let ncpus = rdask_worker::topology::available_cpus().iter().max().map_or(64, |m| *m as usize + 1);
    let words = ncpus.div_ceil(64).max(1);
    (0..n)
        .map(|i| {
            let d = nvml.device_by_index(i).map_err(err("opening a GPU"))?;
            let pci = d.pci_info().map_err(err("reading a GPU's PCI bus id"))?;
            let affinity = d.cpu_affinity(words).unwrap_or_default();
            let cpus = affinity
                .iter()
                .enumerate()
                .flat_map(|(w, bits)| (0..64).filter(move |b| bits >> b & 1 == 1).map(move |b| (w * 64 + b) as u32))
                .collect();
            Ok(NvmlGpu {
                index: i,
                uuid: d.uuid().map_err(err("reading a GPU's UUID"))?,
                name: d.name().map_err(err("reading a GPU's name"))?,
                pci_bus_id: normalise_bus_id(&pci.bus_id),
                memory: d.memory_info().map_err(err("reading a GPU's memory"))?.total,
                cpus,
            })
        })
        .collect()
}

/// NVML writes `00000000:07:00.0`; hwloc `0000:07:00.0`.
pub fn normalise_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => format!("{}:{rest}", &domain[domain.len() - 4..]),
        _ => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_are_written_as_hwloc_writes_them() {
        assert_eq!(normalise_bus_id("00000000:07:00.0"), "0000:07:00.0");
        assert_eq!(normalise_bus_id("0000:B1:00.0"), "0000:b1:00.0");
    }
}
