//! The Rust client as a Python object. Every call that waits on the network
//! runs with the GIL released.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyKeyError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use rdask_client::{Client as RustClient, ClientError, KeyStatus, TaskDef};
use rdask_transport::protocol::{Resource, Restriction};

use crate::frames::{frames_to_py, py_to_bytes, Frame};
use crate::payload::ScalarCalls;
use crate::{runtime, AuthenticationError, CommClosedError, RdaskError, UnserializableValue};

#[pyclass(module = "rdask._rdask", frozen)]
pub struct Client {
    // A mutex, not `&mut self`: `close` runs while another thread waits in
    // `next_events` on the same object.
    inner: std::sync::Mutex<Option<Arc<RustClient>>>,
    address: String,
}

/// A restriction as Python passes it: (workers, resources, allow_other_workers).
type PyRestriction = (Vec<String>, HashMap<String, f64>, bool);

fn to_restriction((workers, resources, loose): PyRestriction) -> Arc<Restriction> {
    let resources = resources.into_iter().map(|(name, amount)| Resource { name, amount }).collect();
    Arc::new(Restriction { workers, resources, loose })
}

/// `state.status` of a Python `FutureState`.
fn state_status(state: &Bound<'_, PyAny>) -> PyResult<String> {
    state.getattr("status")?.extract()
}

fn to_py_err(e: ClientError) -> PyErr {
    match e {
        ClientError::Disconnected => CommClosedError::new_err("the connection to the scheduler is closed"),
        ClientError::MissingKey(k) => PyKeyError::new_err(k),
        ClientError::Unserializable { key, message, payload } => {
            UnserializableValue::new_err((key, message, Frame { data: payload }))
        }
        ClientError::Connect { address, reason } => {
            PyTimeoutError::new_err(format!("cannot connect to scheduler at {address}: {reason}"))
        }
        e @ ClientError::Unauthorized { .. } => AuthenticationError::new_err(e.to_string()),
        other => RdaskError::new_err(other.to_string()),
    }
}

impl Client {
    fn inner(&self) -> PyResult<Arc<RustClient>> {
        self.inner.lock().unwrap().clone().ok_or_else(|| CommClosedError::new_err("this client is closed"))
    }
}

#[pymethods]
impl Client {
    /// Connects to a scheduler (`tcp://host:port`), failing after `timeout` seconds.
    #[staticmethod]
    #[pyo3(signature = (address, token=None, timeout=10.0))]
    fn connect(py: Python<'_>, address: String, token: Option<String>, timeout: f64) -> PyResult<Client> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let addr = address.clone();
        let client = py
            .detach(move || runtime().block_on(RustClient::connect(&addr, token.as_deref(), timeout)))
            .map_err(to_py_err)?;
        client.enable_events();
        Ok(Client { inner: std::sync::Mutex::new(Some(Arc::new(client))), address })
    }

    #[getter]
    fn id(&self) -> PyResult<u32> {
        Ok(self.inner()?.id.0)
    }

    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    /// Submits tasks: a list of `(key, deps, payload, priority, order, want,
    /// retries[, restriction])`, where restriction indexes `restrictions`, a
    /// list of `(workers, resources, allow_other_workers)`.
    ///
    /// A graph sent in parts: `graph` from `new_graph()`, `more=True` on all
    /// parts but the last (which may be empty), `graph_tasks` its total size.
    #[pyo3(signature = (tasks, restrictions=None, graph=None, more=false, graph_tasks=0))]
    fn submit(
        &self,
        py: Python<'_>,
        tasks: &Bound<'_, PyList>,
        restrictions: Option<Vec<PyRestriction>>,
        graph: Option<u64>,
        more: bool,
        graph_tasks: u64,
    ) -> PyResult<()> {
        let client = self.inner()?;
        let restrictions: Vec<Arc<Restriction>> =
            restrictions.unwrap_or_default().into_iter().map(to_restriction).collect();
        let mut defs = Vec::with_capacity(tasks.len());
        for item in tasks.iter() {
            let t = item.cast::<PyTuple>().map_err(|_| PyValueError::new_err("each task must be a tuple"))?;
            if t.len() != 7 && t.len() != 8 {
                return Err(PyValueError::new_err(
                    "a task is (key, deps, payload, priority, order, want, retries[, restriction])",
                ));
            }
            let restriction = match t.len() {
                8 => match t.get_item(7)?.extract::<Option<usize>>()? {
                    None => None,
                    Some(i) => Some(
                        restrictions
                            .get(i)
                            .ok_or_else(|| PyValueError::new_err(format!("restriction index {i} out of range")))?
                            .clone(),
                    ),
                },
                _ => None,
            };
            defs.push(TaskDef {
                key: t.get_item(0)?.extract()?,
                deps: t.get_item(1)?.extract()?,
                payload: py_to_bytes(&t.get_item(2)?)?,
                priority: t.get_item(3)?.extract()?,
                order: t.get_item(4)?.extract()?,
                want: t.get_item(5)?.extract()?,
                retries: t.get_item(6)?.extract()?,
                restriction,
            });
        }
        py.detach(move || {
            let graph = graph.unwrap_or_else(|| client.new_graph());
            client.submit_part(graph, defs, more, graph_tasks)
        })
        .map_err(to_py_err)
    }

    /// `client.map`'s fast path for calls whose arguments are plain scalars:
    /// payloads and keys are made here (see `payload.rs`) and submitted in one
    /// go. `calls` holds one argument per call (`single`) or a tuple of them.
    /// Keys already held in `states` (the Python client's `{key: state}`)
    /// are not sent again unless their state is "cancelled".
    /// Keys in `releasing` (dropped, release not yet sent) that erred or were
    /// cancelled are released now, before the submission, and removed from
    /// it, so they run afresh.
    /// Returns (every call's key, the cancelled keys sent again), or None with
    /// nothing sent when some argument is not a plain scalar. The caller holds
    /// its lock around this call, so no news about these keys is applied
    /// before their futures exist.
    #[pyo3(signature = (function, prefix, calls, single, states, releasing, priority=0, retries=0, restriction=None))]
    #[allow(clippy::too_many_arguments)]
    fn map_scalars(
        &self,
        py: Python<'_>,
        function: &[u8],
        prefix: &str,
        calls: &Bound<'_, PyAny>,
        single: bool,
        states: &Bound<'_, PyDict>,
        releasing: &Bound<'_, PyDict>,
        priority: i32,
        retries: u32,
        restriction: Option<PyRestriction>,
    ) -> PyResult<Option<(Vec<String>, Vec<String>)>> {
        let client = self.inner()?;
        let Some(mut encoder) = ScalarCalls::new(function, prefix) else { return Ok(None) };
        let restriction = restriction.map(to_restriction);
        let mut keys = Vec::new();
        let mut again = Vec::new();
        let mut stale = Vec::new();
        let mut defs = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut args = Vec::with_capacity(4);
        for call in calls.try_iter()? {
            let call = call?;
            args.clear();
            if single {
                args.push(call);
            } else {
                let Ok(t) = call.cast::<PyTuple>() else { return Ok(None) };
                args.extend(t.iter());
            }
            let Some((payload, key)) = encoder.call(&args) else { return Ok(None) };
            if !seen.insert(key.clone()) {
                keys.push(key);
                continue;
            }
            if let Some(st) = states.get_item(&key)? {
                if state_status(&st)? != "cancelled" {
                    keys.push(key);
                    continue;
                }
                again.push(key.clone());
            } else if !releasing.is_empty() {
                if let Some(st) = releasing.get_item(&key)? {
                    if matches!(state_status(&st)?.as_str(), "error" | "cancelled") {
                        stale.push(key.clone());
                    }
                }
            }
            defs.push(TaskDef {
                key: key.clone(),
                deps: Vec::new(),
                payload: payload.into(),
                priority,
                order: None,
                want: true,
                retries,
                restriction: restriction.clone(),
            });
            keys.push(key);
        }
        // Every call was a scalar call: only now may state change.
        for k in &stale {
            releasing.del_item(k)?;
        }
        if !defs.is_empty() {
            py.detach(move || {
                if !stale.is_empty() {
                    client.release(&stale)?;
                }
                let graph = client.new_graph();
                client.submit_part(graph, defs, false, 0)
            })
            .map_err(to_py_err)?;
        }
        Ok(Some((keys, again)))
    }

    /// An id for a graph submitted in parts.
    fn new_graph(&self) -> PyResult<u64> {
        Ok(self.inner()?.new_graph())
    }

    /// Status changes since the last call, waiting up to `timeout` seconds
    /// for the first: a list of `(key, state, detail)` where state is
    /// "finished" (detail: size), "erred" (detail: (failed_key, message,
    /// payload frame)), "cancelled", "lost" or "rejected" (detail: message).
    fn next_events<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyList>> {
        let client = self.inner()?;
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let events = py.detach(move || runtime().block_on(client.next_events(timeout))).map_err(to_py_err)?;
        let out = PyList::empty(py);
        for (key, status) in events {
            let item = match status {
                KeyStatus::Done { size } => (key, "finished", size.into_pyobject(py)?.into_any()),
                KeyStatus::Erred { failed_key, message, payload } => {
                    let frame = Py::new(py, Frame { data: payload })?;
                    (key, "erred", (failed_key, message, frame).into_pyobject(py)?.into_any())
                }
                KeyStatus::Cancelled => (key, "cancelled", py.None().into_bound(py)),
                KeyStatus::Pending => (key, "lost", py.None().into_bound(py)),
                KeyStatus::Rejected(m) => (key, "rejected", m.into_pyobject(py)?.into_any()),
            };
            out.append(item)?;
        }
        Ok(out)
    }

    /// Values of finished keys, fetched straight from the workers: one list
    /// of frames per key.
    fn gather<'py>(&self, py: Python<'py>, keys: Vec<String>) -> PyResult<Vec<Vec<Py<Frame>>>> {
        let client = self.inner()?;
        let values = py.detach(move || runtime().block_on(client.gather(&keys))).map_err(to_py_err)?;
        values.into_iter().map(|frames| frames_to_py(py, frames)).collect()
    }

    /// As `gather`, without waiting: `callback(True, [frames per key])` or
    /// `callback(False, exception)` is called from the runtime's thread when
    /// the values are here (the asynchronous client resolves an asyncio
    /// future with it: no thread waits for it).
    fn gather_async(&self, keys: Vec<String>, callback: Py<PyAny>) -> PyResult<()> {
        let client = self.inner()?;
        runtime().spawn(async move {
            let result = client.gather(&keys).await;
            Python::attach(|py| {
                let args = match result {
                    Ok(values) => values
                        .into_iter()
                        .map(|frames| frames_to_py(py, frames))
                        .collect::<PyResult<Vec<_>>>()
                        .and_then(|v| (true, v).into_pyobject(py).map(|t| t.into_any().unbind())),
                    Err(e) => (false, to_py_err(e).into_value(py)).into_pyobject(py).map(|t| t.into_any().unbind()),
                };
                let called = args.and_then(|a| callback.call1(py, a.bind(py).cast::<PyTuple>()?.clone()));
                if let Err(e) = called {
                    e.print(py);
                }
            });
        });
        Ok(())
    }

    /// Where the values of these keys live: `{key: [worker addresses]}` for
    /// keys in memory; keys the scheduler does not hold in memory are absent.
    fn who_has<'py>(&self, py: Python<'py>, keys: Vec<String>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.inner()?;
        let (found, _missing) = py.detach(move || runtime().block_on(client.who_has(&keys))).map_err(to_py_err)?;
        let d = PyDict::new(py);
        for loc in found {
            d.set_item(loc.key, loc.addresses)?;
        }
        Ok(d)
    }

    /// `{key: size in bytes}` for keys in memory (the sizes workers reported).
    fn who_has_sizes<'py>(&self, py: Python<'py>, keys: Vec<String>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.inner()?;
        let (found, _missing) = py.detach(move || runtime().block_on(client.who_has(&keys))).map_err(to_py_err)?;
        let d = PyDict::new(py);
        for loc in found {
            d.set_item(loc.key, loc.size)?;
        }
        Ok(d)
    }

    fn release(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<()> {
        let client = self.inner()?;
        py.detach(move || client.release(&keys)).map_err(to_py_err)
    }

    fn cancel(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<()> {
        let client = self.inner()?;
        py.detach(move || client.cancel(&keys)).map_err(to_py_err)
    }

    /// One coordination operation (`rdask.coordination`). `op` names a
    /// `CoordOp` variant in snake case; waiting operations end after
    /// `timeout` seconds (None: wait until granted; Ctrl-C stops the wait).
    /// Returns `(kind, data, frames)`: kind is "done", "values" (data: the
    /// futures' keys, frames: the values), "bool", "count", "names",
    /// "cancelled" (timed out) or "error" (data: the message).
    #[pyo3(signature = (op, name=None, names=None, key=None, keys=None, value=None, max_leases=1, count=0, lease=0, batch=0, replace=false, timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn coord<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        name: Option<String>,
        names: Option<Vec<String>>,
        key: Option<String>,
        keys: Option<Vec<String>>,
        value: Option<Bound<'py, PyAny>>,
        max_leases: u32,
        count: u32,
        lease: u64,
        batch: u32,
        replace: bool,
        timeout: Option<f64>,
    ) -> PyResult<(String, Py<PyAny>, Vec<Py<Frame>>)> {
        use rdask_transport::protocol::{CoordOp, CoordOutcome};
        let client = self.inner()?;
        let name = || name.clone().ok_or_else(|| PyValueError::new_err(format!("{op} needs a name")));
        let op = match op {
            "variable_set" => CoordOp::VariableSet { name: name()?, key },
            "variable_get" => CoordOp::VariableGet { name: name()? },
            "variable_delete" => CoordOp::VariableDelete { name: name()? },
            "acquire" => CoordOp::Acquire { names: names.unwrap_or_default(), max_leases, count, lease },
            "release" => CoordOp::Release { lease },
            "leases" => CoordOp::Leases { name: name()? },
            "event_set" => CoordOp::EventSet { name: name()? },
            "event_clear" => CoordOp::EventClear { name: name()? },
            "event_wait" => CoordOp::EventWait { name: name()? },
            "event_is_set" => CoordOp::EventIsSet { name: name()? },
            "queue_put" => CoordOp::QueuePut { name: name()?, key },
            "queue_get" => CoordOp::QueueGet { name: name()?, batch },
            "queue_size" => CoordOp::QueueSize { name: name()? },
            "dataset_publish" => CoordOp::DatasetPublish { name: name()?, keys: keys.unwrap_or_default(), replace },
            "dataset_get" => CoordOp::DatasetGet { name: name()? },
            "dataset_delete" => CoordOp::DatasetDelete { name: name()? },
            "dataset_list" => CoordOp::DatasetList,
            other => return Err(PyValueError::new_err(format!("unknown coordination operation {other:?}"))),
        };
        let is_acquire = matches!(op, CoordOp::Acquire { .. });
        let value = value.map(|v| py_to_bytes(&v)).transpose()?;
        let request_id = client.next_request_id();
        let (tx, rx) = std::sync::mpsc::channel();
        let c = client.clone();
        runtime().spawn(async move {
            let _ = tx.send(c.coord(request_id, op, value).await);
        });
        let rx = std::sync::Mutex::new(rx);
        let wait = |d: Duration| py.detach(|| rx.lock().unwrap().recv_timeout(d));
        let deadline = timeout.map(|t| std::time::Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let mut cancelled = false;
        let mut interrupted = None;
        let result = loop {
            match wait(Duration::from_millis(100)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(CommClosedError::new_err("the client stopped")),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if cancelled {
                continue;
            }
            if let Err(e) = py.check_signals() {
                interrupted = Some(e);
            }
            if interrupted.is_some() || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                // The answer still comes: the grant already on its way, or Cancelled.
                client.coord_cancel(request_id).map_err(to_py_err)?;
                cancelled = true;
            }
        };
        let (outcome, frames) = result.map_err(to_py_err)?;
        if let Some(e) = interrupted {
            if is_acquire && outcome == CoordOutcome::Done {
                let c = client.clone();
                let id = client.next_request_id();
                runtime().spawn(async move {
                    let _ = c.coord(id, CoordOp::Release { lease }, None).await;
                });
            }
            return Err(e);
        }
        let none = py.None();
        let (kind, data): (&str, Py<PyAny>) = match outcome {
            CoordOutcome::Done => ("done", none),
            CoordOutcome::Values(keys) => ("values", keys.into_pyobject(py)?.into_any().unbind()),
            CoordOutcome::Bool(b) => ("bool", b.into_pyobject(py)?.to_owned().into_any().unbind()),
            CoordOutcome::Count(n) => ("count", n.into_pyobject(py)?.into_any().unbind()),
            CoordOutcome::Names(n) => ("names", n.into_pyobject(py)?.into_any().unbind()),
            CoordOutcome::Cancelled => ("cancelled", none),
            CoordOutcome::Error(m) => ("error", m.into_pyobject(py)?.into_any().unbind()),
        };
        Ok((kind.to_string(), data, frames_to_py(py, frames)?))
    }

    /// Runs `kind` (run, register_plugin, unregister_plugin) with the pickled
    /// `payload` in the scheduler's Python process: `(ok, message, frame|None)`.
    fn scheduler_call(&self, py: Python<'_>, kind: String, name: String, payload: Bound<'_, PyAny>) -> PyResult<(bool, String, Option<Py<Frame>>)> {
        let client = self.inner()?;
        let payload = py_to_bytes(&payload)?;
        let (ok, message, frame) =
            py.detach(move || runtime().block_on(client.scheduler_call(&kind, &name, payload))).map_err(to_py_err)?;
        let frame = match frame {
            Some(f) => Some(frames_to_py(py, [f])?.remove(0)),
            None => None,
        };
        Ok((ok, message, frame))
    }

    /// `{worker address: [keys it runs or has queued]}`.
    fn processing<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.inner()?;
        let workers = py.detach(move || runtime().block_on(client.processing())).map_err(to_py_err)?;
        let d = PyDict::new(py);
        for (address, keys) in workers {
            d.set_item(address, keys)?;
        }
        Ok(d)
    }

    /// Drops copies `(key, worker address)` that have another copy; returns how many went.
    fn drop_replicas(&self, py: Python<'_>, items: Vec<(String, String)>) -> PyResult<u64> {
        let client = self.inner()?;
        py.detach(move || runtime().block_on(client.drop_replicas(items))).map_err(to_py_err)
    }

    /// The scheduler's view: `{"scheduler_id", "workers": [...], "tasks", ...}`.
    fn cluster_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.inner()?;
        let info = py.detach(move || runtime().block_on(client.cluster_info())).map_err(to_py_err)?;
        info_to_dict(py, &info)
    }

    /// Task runs that ended at or after `since_us` (µs since the epoch):
    /// a list of (key, worker, thread, start_us, stop_us, ok).
    fn task_stream<'py>(&self, py: Python<'py>, since_us: u64) -> PyResult<Bound<'py, PyList>> {
        let client = self.inner()?;
        let events = py.detach(move || runtime().block_on(client.task_stream(since_us))).map_err(to_py_err)?;
        let out = PyList::empty(py);
        for e in events {
            out.append((e.key, e.worker, e.thread, e.start_us, e.stop_us, e.ok))?;
        }
        Ok(out)
    }

    /// Waits until `n` workers are connected, or raises after `timeout` seconds.
    fn wait_for_workers<'py>(&self, py: Python<'py>, n: usize, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
        let client = self.inner()?;
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let info = py
            .detach(move || runtime().block_on(client.wait_for_workers(n, timeout)))
            .map_err(|e| match e {
                ClientError::Scheduler(m) => PyTimeoutError::new_err(m),
                other => to_py_err(other),
            })?;
        info_to_dict(py, &info)
    }

    /// Says goodbye to the scheduler (which releases this client's keys).
    fn close(&self, py: Python<'_>) {
        let client = self.inner.lock().unwrap().take();
        if let Some(client) = client {
            py.detach(move || runtime().block_on(client.close()));
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap().is_none()
    }
}

fn info_to_dict<'py>(py: Python<'py>, info: &rdask_client::ClusterInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("scheduler_id", &info.scheduler_id)?;
    d.set_item("clients", info.clients)?;
    d.set_item("dashboard", (!info.dashboard.is_empty()).then_some(info.dashboard.as_str()))?;
    d.set_item("tasks", info.tasks)?;
    d.set_item("ready", info.ready)?;
    d.set_item("submitted", info.submitted)?;
    d.set_item("finished", info.finished)?;
    d.set_item("failed", info.failed)?;
    let workers = PyList::empty(py);
    for w in &info.workers {
        let wd = PyDict::new(py);
        wd.set_item("id", w.id.0)?;
        wd.set_item("name", &w.name)?;
        wd.set_item("address", &w.address)?;
        wd.set_item("nthreads", w.nthreads)?;
        wd.set_item("memory_limit", w.memory_limit)?;
        wd.set_item("host", &w.placement.host)?;
        wd.set_item("cpus", w.placement.cpus.clone())?;
        wd.set_item("numa_node", w.placement.numa_node)?;
        wd.set_item("gpu", w.placement.gpu.clone())?;
        wd.set_item("processing", w.processing)?;
        wd.set_item("stored_values", w.stored_values)?;
        wd.set_item("stored_bytes", w.stored_bytes)?;
        wd.set_item("status", if w.paused { "paused" } else { "running" })?;
        wd.set_item("local_directory", &w.placement.local_directory)?;
        let res = PyDict::new(py);
        for r in &w.resources {
            res.set_item(&r.name, r.amount)?;
        }
        wd.set_item("resources", res)?;
        wd.set_item("memory", w.load.rss)?;
        wd.set_item("managed_bytes", w.load.stored_bytes)?;
        wd.set_item("spilled_bytes", w.load.spilled_bytes)?;
        wd.set_item("spilled_values", w.load.spilled_values)?;
        wd.set_item("spilled_total_bytes", w.load.spilled_total_bytes)?;
        wd.set_item("unspilled_total_bytes", w.load.unspilled_total_bytes)?;
        // A GPU worker's device memory (zeros elsewhere): values on the
        // device, its limit, device values moved to host memory, bytes moved.
        let dev = &w.load.device;
        wd.set_item("device_memory", dev.bytes)?;
        wd.set_item("device_memory_limit", dev.limit)?;
        wd.set_item("device_spilled_bytes", dev.spilled_bytes)?;
        wd.set_item("device_spilled_values", dev.spilled_values)?;
        wd.set_item("device_spilled_total_bytes", dev.spilled_total_bytes)?;
        wd.set_item("device_unspilled_total_bytes", dev.unspilled_total_bytes)?;
        workers.append(wd)?;
    }
    d.set_item("workers", workers)?;
    Ok(d)
}
