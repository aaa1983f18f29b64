//! Reading a [`Topology`] through hwloc 2.x (the system's libhwloc, bound by
//! `hwlocality`; docs/architecture.md says why that crate).

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;
use hwlocality::Topology as Hw;

use super::{Core, Gpu, NumaNode, Source, Topology, TopologyError};

const NVIDIA: u16 = 0x10de;

pub(super) fn read(source: &Source) -> Result<Topology, TopologyError> {
    let what = match source {
        Source::ThisMachine => "this machine".to_string(),
        Source::Synthetic(s) => format!("synthetic topology {s:?}"),
        Source::XmlFile(p) => format!("XML topology {}", p.display()),
    };
    let err = |e: &dyn std::fmt::Display| TopologyError::Hwloc { what: what.clone(), message: e.to_string() };
    let mut builder = Hw::builder();
    builder = match source {
        Source::ThisMachine => builder,
        Source::Synthetic(s) => builder.from_synthetic(s).map_err(|e| err(&e))?,
        // Read here: hwlocality panics (instead of erring) on a missing file.
        Source::XmlFile(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| err(&e))?;
            builder.from_xml(&text).map_err(|e| err(&e))?
        }
    };
    // PCI devices are how GPUs and their locality are found.
    let hw = builder.with_io_type_filter(TypeFilter::KeepImportant).map_err(|e| err(&e))?.build().map_err(|e| err(&e))?;
    let v = hwlocality::hwloc_api_version();
    let version = format!("hwloc {}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff);
    let description = match source {
        Source::ThisMachine => format!("this machine ({version} API, CPUs this process may use)"),
        _ => format!("{what} ({version} API)"),
    };
    Ok(from_hwloc(&hw, description))
}

fn bits(set: Option<impl IntoIterator<Item = hwlocality::bitmap::BitmapIndex>>) -> Vec<u32> {
    set.map(|s| s.into_iter().map(|i| usize::from(i) as u32).collect()).unwrap_or_default()
}

fn os_index(obj: &TopologyObject) -> u32 {
    obj.os_index().unwrap_or(obj.logical_index()) as u32
}

fn from_hwloc(hw: &Hw, description: String) -> Topology {
    let numa_nodes: Vec<NumaNode> = hw
        .objects_with_type(ObjectType::NUMANode)
        .map(|n| {
            let memory = match n.attributes() {
                Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map_or(0, |m| m.get()),
                _ => 0,
            };
            NumaNode { os_index: os_index(n), memory }
        })
        .collect();
    let packages = hw.objects_with_type(ObjectType::Package).count().max(1) as u32;
    let cores = hw
        .objects_with_type(ObjectType::Core)
        .map(|c| {
            let package = c.first_ancestor_with_type(ObjectType::Package).map_or(0, |p| p.logical_index() as u32);
            let numa = bits(c.nodeset().map(|s| s.iter_set().collect::<Vec<_>>())).first().copied().unwrap_or(0);
            let pus = bits(c.cpuset().map(|s| s.iter_set().collect::<Vec<_>>()));
            Core { package, numa, pus }
        })
        .filter(|c| !c.pus.is_empty())
        .collect();
    let mut gpus: Vec<Gpu> = hw
        .pci_devices()
        .filter_map(|dev| {
            let Some(ObjectAttributes::PCIDevice(pci)) = dev.attributes() else { return None };
            // Display (0x03xx) class, NVIDIA: GPUs; other vendors' GPUs are not
            // something rdask-cuda-worker can drive.
            if pci.vendor_id() != NVIDIA || pci.class_id() >> 8 != 0x03 {
                return None;
            }
            let bus = format!("{:04x}:{:02x}:{:02x}.{:x}", pci.domain(), pci.bus_id(), pci.bus_device(), pci.function());
            let near = dev.first_non_io_ancestor();
            let cpus = bits(near.and_then(|a| a.cpuset()).map(|s| s.iter_set().collect::<Vec<_>>()));
            let nodes = bits(near.and_then(|a| a.nodeset()).map(|s| s.iter_set().collect::<Vec<_>>()));
            let numa = if nodes.len() == 1 { Some(nodes[0]) } else { None };
            let name = dev
                .io_children()
                .filter(|o| matches!(o.attributes(), Some(ObjectAttributes::OSDevice(d)) if d.device_type() == OSDeviceType::GPU))
                .find_map(|o| o.info("GPUModel").map(|m| m.to_string_lossy().into_owned()))
                .or_else(|| dev.info("PCIDevice").map(|m| m.to_string_lossy().into_owned()))
                .unwrap_or_else(|| format!("NVIDIA device {:04x}", pci.device_id()));
            Some(Gpu { index: 0, pci_bus_id: bus, name, numa, cpus })
        })
        .collect();
    gpus.sort_by(|a, b| a.pci_bus_id.cmp(&b.pci_bus_id));
    for (i, g) in gpus.iter_mut().enumerate() {
        g.index = i as u32;
    }
    Topology { description, packages, numa_nodes, cores, gpus }
}
