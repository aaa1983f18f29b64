//! `rdask._rdask`: the Rust side of the Python package. It is thin on
//! purpose: the scheduler, worker runtime and client are the Rust crates;
//! this module hands them Python objects and releases the GIL around every
//! call that waits.

mod client;
mod device;
mod device_direct;
mod frames;
mod mpi;
mod payload;
mod scheduler;
mod tls;
mod topology;
mod worker;

use std::sync::OnceLock;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

pyo3::create_exception!(_rdask, RdaskError, pyo3::exceptions::PyException, "An error from the rdask runtime.");
pyo3::create_exception!(_rdask, CommClosedError, RdaskError, "The connection to the scheduler is gone.");
pyo3::create_exception!(
    _rdask,
    CannotJoinError,
    RdaskError,
    "A worker could not reach its scheduler within its timeout, or was refused by it."
);
pyo3::create_exception!(
    _rdask,
    GpuUnavailableError,
    RdaskError,
    "No usable NVIDIA GPU: no driver (libnvidia-ml.so.1), or no device."
);
pyo3::create_exception!(
    _rdask,
    AuthenticationError,
    RdaskError,
    "The scheduler refused this client's token (wrong or missing)."
);
pyo3::create_exception!(
    _rdask,
    UnserializableValue,
    RdaskError,
    "A worker holds the value but cannot serialise it; args: (key, message, error payload)."
);

/// One tokio runtime per process for clients and workers: its threads do
/// the network I/O while Python threads run user code.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rdask-io")
            .enable_all()
            .build()
            .expect("cannot start the rdask I/O runtime")
    })
}

pub(crate) fn os_error(e: impl std::fmt::Display) -> PyErr {
    PyOSError::new_err(e.to_string())
}

/// Sets up `tracing` output once (level from RDASK_LOG, default warn).
#[pyfunction]
#[pyo3(signature = (level=None))]
fn init_logging(level: Option<String>) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = level.or_else(|| std::env::var("RDASK_LOG").ok()).unwrap_or_else(|| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    });
}

/// The IPv4 address of network interface `name` (e.g. "ib0", "lo"), or None.
#[pyfunction]
fn interface_address(name: &str) -> Option<String> {
    rdask_transport::netif::interface_ip(name).map(|ip| ip.to_string())
}

/// `(True, version)` when this process can use UCX (`ucx://`), else
/// `(False, why)`: one line naming what is missing. Starts UCX's thread on
/// first success (GIL released meanwhile).
#[pyfunction]
fn ucx_status(py: Python<'_>) -> (bool, String) {
    match py.detach(rdask_transport::ucx_status) {
        Ok(version) => (true, version),
        Err(why) => (false, why),
    }
}

/// The memory a device value's arrays may travel in over this process's UCX
/// as device frames: `[]` where UCX is unusable or device frames are off,
/// `["host"]` for a UCX without CUDA transports (Debian's), `["host",
/// "cuda"]` for one with them (`libucx-cu12`/`-cu13`). GIL released.
#[pyfunction]
fn ucx_memory_kinds(py: Python<'_>) -> Vec<&'static str> {
    use rdask_transport::device::MemoryKind;
    let kinds = py.detach(rdask_transport::ucx_memory_kinds).unwrap_or_default();
    kinds.into_iter().map(|k| match k { MemoryKind::Host => "host", MemoryKind::Cuda => "cuda" }).collect()
}

/// The address other hosts reach this one at (first non-loopback IPv4 of an
/// interface that is up; loopback if there is none).
#[pyfunction]
fn contact_ip() -> String {
    rdask_transport::netif::contact_ip().to_string()
}

/// The name part of a key, as the dashboard groups tasks (`inc-9f86…` → `inc`).
#[pyfunction]
fn key_prefix(key: &str) -> &str {
    rdask_sched::dashboard::snapshot::key_prefix(key)
}

/// Bytes of freed large receive buffers this process keeps for reuse.
#[pyfunction]
fn receive_pool_bytes() -> usize {
    rdask_transport::bufpool::pooled_bytes()
}

#[pymodule]
fn _rdask(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("RdaskError", m.py().get_type::<RdaskError>())?;
    m.add("CommClosedError", m.py().get_type::<CommClosedError>())?;
    m.add("AuthenticationError", m.py().get_type::<AuthenticationError>())?;
    m.add("CannotJoinError", m.py().get_type::<CannotJoinError>())?;
    m.add("GpuUnavailableError", m.py().get_type::<GpuUnavailableError>())?;
    m.add("UnserializableValue", m.py().get_type::<UnserializableValue>())?;
    m.add("PROTOCOL_VERSION", rdask_transport::protocol::PROTOCOL_VERSION)?;
    m.add_class::<frames::Frame>()?;
    m.add_class::<device::DeviceBuffer>()?;
    m.add_function(wrap_pyfunction!(device::device_download, m)?)?;
    m.add_function(wrap_pyfunction!(device::device_upload, m)?)?;
    m.add_function(wrap_pyfunction!(device::device_name, m)?)?;
    m.add_function(wrap_pyfunction!(device::staging_stats, m)?)?;
    m.add_function(wrap_pyfunction!(device::device_claim, m)?)?;
    m.add_function(wrap_pyfunction!(device::receive_stats, m)?)?;
    rdask_transport::peer::set_part_sink(std::sync::Arc::new(device::DeviceSink));
    rdask_transport::device::set_device_allocator(std::sync::Arc::new(device_direct::Arrivals));
    m.add_class::<scheduler::Scheduler>()?;
    m.add_class::<client::Client>()?;
    m.add_function(wrap_pyfunction!(worker::run_worker, m)?)?;
    m.add_function(wrap_pyfunction!(worker::secede, m)?)?;
    m.add_function(wrap_pyfunction!(payload::scalar_call, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(tls::configure_tls, m)?)?;
    m.add_function(wrap_pyfunction!(tls::temporary_tls, m)?)?;
    m.add_function(wrap_pyfunction!(receive_pool_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(interface_address, m)?)?;
    m.add_function(wrap_pyfunction!(contact_ip, m)?)?;
    m.add_function(wrap_pyfunction!(ucx_status, m)?)?;
    m.add_function(wrap_pyfunction!(ucx_memory_kinds, m)?)?;
    m.add_function(wrap_pyfunction!(key_prefix, m)?)?;
    m.add_function(wrap_pyfunction!(topology::read_topology, m)?)?;
    m.add_function(wrap_pyfunction!(topology::describe_topology, m)?)?;
    m.add_function(wrap_pyfunction!(topology::plan_workers, m)?)?;
    m.add_function(wrap_pyfunction!(topology::bind_process, m)?)?;
    m.add_function(wrap_pyfunction!(topology::allowed_cpus, m)?)?;
    m.add_function(wrap_pyfunction!(topology::gpu_devices, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_built, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_launched, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_init, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_broadcast, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_send_done, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_recv_done, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_finalize, m)?)?;
    m.add_function(wrap_pyfunction!(mpi::mpi_abort, m)?)?;
    m.add_function(wrap_pyfunction!(topology::plan_cuda_workers, m)?)?;
    Ok(())
}
