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
    /// `python_side`: called as `python_side(event, client_id, request_id, name, payload)` on a
    /// thread of its own for `run_on_scheduler`, scheduler plugins and
    /// membership events; returns `(ok, message, bytes|None)` for calls.
    #[pyo3(signature = (host="127.0.0.1", port=0, token=None, worker_timeout=60.0, tasks_per_thread=256, address=None, dashboard_address=None, python_side=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        port: u16,
        token: Option<String>,
        worker_timeout: f64,
        tasks_per_thread: u32,
        address: Option<String>,
        dashboard_address: Option<String>,
        python_side: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let mut config = SchedulerConfig::default();
        config.token = token;
        config.worker_timeout = Duration::from_secs_f64(worker_timeout.max(0.1));
        config.core.tasks_per_thread = tasks_per_thread.max(1);
        config.dashboard = dashboard_address;
        if let Some(side) = python_side {
            let (link, messages, replies) = rdask_sched::reactor::HostLink::new();
            config.host = Some(link);
            std::thread::Builder::new()
                .name("rdask-scheduler-python".into())
                .spawn(move || serve_python_side(side, messages, replies))
                .map_err(crate::os_error)?;
        }
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

/// The scheduler's Python side: waits (without the GIL) for what the
/// reactor sends, calls `side` for each, and sends call results back. Ends
/// when the scheduler stops (its end of the channel goes).
fn serve_python_side(
    side: Py<PyAny>,
    messages: std::sync::mpsc::Receiver<rdask_sched::reactor::HostMsg>,
    replies: tokio::sync::mpsc::UnboundedSender<rdask_sched::reactor::HostReply>,
) {
    use rdask_sched::reactor::{HostMsg, HostReply};
    while let Ok(msg) = messages.recv() {
        Python::attach(|py| {
            let empty = pyo3::types::PyBytes::new(py, b"");
            let (event, client, request_id, name, payload) = match &msg {
                HostMsg::Call(c) => (c.kind.clone(), c.client.0 as u64, c.request_id, c.name.clone(), pyo3::types::PyBytes::new(py, &c.payload)),
                HostMsg::WorkerAdded(a) => ("worker_added".to_string(), 0, 0, a.clone(), empty),
                HostMsg::WorkerRemoved(a) => ("worker_removed".to_string(), 0, 0, a.clone(), empty),
                HostMsg::ClientAdded(c) => ("client_added".to_string(), c.0 as u64, 0, String::new(), empty),
                HostMsg::ClientRemoved(c) => ("client_removed".to_string(), c.0 as u64, 0, String::new(), empty),
                HostMsg::Transitions(batch) => {
                    let items: Vec<(&str, &str, &str)> = batch.iter().map(|(k, a, b)| (k.as_str(), *a, *b)).collect();
                    if let Err(e) = side.call_method1(py, "transitions", (items,)) {
                        e.print(py);
                    }
                    return;
                }
            };
            let result = side.call1(py, (event, client, request_id, name, payload));
            let HostMsg::Call(call) = msg else {
                if let Err(e) = result {
                    e.print(py);
                }
                return;
            };
            let want_transitions = side.getattr(py, "wants_transitions").and_then(|w| w.extract::<bool>(py)).ok();
            let reply = match result.and_then(|r| r.extract::<(bool, String, Option<Vec<u8>>)>(py)) {
                Ok((ok, message, payload)) => {
                    HostReply { client: call.client, request_id: call.request_id, ok, message, payload: payload.map(Into::into), want_transitions }
                }
                Err(e) => HostReply {
                    client: call.client,
                    request_id: call.request_id,
                    ok: false,
                    message: format!("the scheduler's Python side failed: {e}"),
                    payload: None,
                    want_transitions,
                },
            };
            let _ = replies.send(reply);
        });
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}
