//! An in-process scheduler (its own thread, no GIL needed), used by
//! `LocalCluster` and the `rdask-scheduler` command.

use std::time::Duration;

use pyo3::prelude::*;
use rdask_sched::reactor::{SchedulerConfig, SchedulerHandle};

#[pyclass(module = "rdask._rdask")]
pub struct Scheduler {
    handle: Option<SchedulerHandle>,
    address: String,
    bound: String,
    dashboard: Option<String>,
}

#[pymethods]
impl Scheduler {
    /// Starts listening at once; `port=0` picks a free port.
    /// `address` (e.g. `mpi://0:0`) overrides `host` and `port`.
    #[new]
    /// `dashboard_address` (`:8787`, `host:port`, `:0`) serves the dashboard; None: off.
    #[pyo3(signature = (host="127.0.0.1", port=0, token=None, worker_timeout=60.0, tasks_per_thread=256, address=None, dashboard_address=None))]
    fn new(
        py: Python<'_>,
        host: &str,
        port: u16,
        token: Option<String>,
        worker_timeout: f64,
        tasks_per_thread: u32,
        address: Option<String>,
        dashboard_address: Option<String>,
    ) -> PyResult<Self> {
        let mut config = SchedulerConfig::default();
        config.token = token;
        config.worker_timeout = Duration::from_secs_f64(worker_timeout.max(0.1));
        config.core.tasks_per_thread = tasks_per_thread.max(1);
        config.dashboard = dashboard_address;
        let addr = address.unwrap_or_else(|| format!("tcp://{host}:{port}"));
        // The same allocator settings as the rdask-scheduler binary: without
        // them this process keeps the peak memory of a released graph.
        rdask_sched::alloc::tune();
        let handle = py.detach(|| SchedulerHandle::start(&addr, config)).map_err(crate::os_error)?;
        let address = handle.address.clone();
        let bound = handle.bound.clone();
        let dashboard = handle.dashboard.clone();
        Ok(Scheduler { handle: Some(handle), address, bound, dashboard })
    }

    /// The address clients and workers connect to.
    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    /// `http://host:port/status` of the dashboard, or None when it is off.
    #[getter]
    fn dashboard_link(&self) -> Option<String> {
        self.dashboard.as_ref().map(|d| format!("{d}/status"))
    }

    /// The address the socket is bound to (e.g. `tcp://0.0.0.0:8786`).
    #[getter]
    fn bound_address(&self) -> &str {
        &self.bound
    }

    #[getter]
    fn running(&self) -> bool {
        self.handle.is_some()
    }

    /// Seconds of CPU the scheduler thread has used.
    fn cpu_time(&self) -> f64 {
        self.handle.as_ref().map(|h| h.cpu_time().as_secs_f64()).unwrap_or(0.0)
    }

    /// Stops serving: workers and clients see the connection close.
    fn stop(&mut self, py: Python<'_>) {
        if let Some(h) = self.handle.take() {
            py.detach(move || h.stop());
        }
    }

    fn __repr__(&self) -> String {
        format!("<rdask Scheduler {} ({})>", self.address, if self.handle.is_some() { "running" } else { "stopped" })
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}
