//! A worker process's Rust runtime with a Python executor: tasks run on the
//! runtime's threads, which take the GIL only while Python code runs;
//! results stay Python objects until a peer or client asks for them.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::Resource;
use rdask_worker::device_tier::DeviceLedger;
use rdask_gpu::staging::{RawSource, StagingCache, StagingPool};
use rdask_worker::executor::{ChunkSource, Frames, ObjectValue, Staged};
use rdask_worker::{Executor, TaskFailure, TaskRun, Value, WorkerConfig};

use crate::frames::{frames_to_py, py_to_bytes, Frame};
use crate::{runtime, CannotJoinError, RdaskError};

/// The Python callables the executor calls (from `rdask.worker`):
/// `execute(key, payload, inputs) -> (True, value, nbytes, frames|None) | (False, message, error_payload)`,
/// `dumps(value) -> [frames]`, `loads([frames]) -> (value, nbytes)`.
struct PyExecutor {
    execute: Py<PyAny>,
    codec: Arc<Codec>,
}

struct Codec {
    dumps: Py<PyAny>,
    /// `value -> (frames, [(device address, bytes)], keep) | None`: a device
    /// value's frames but for its device arrays, which are read in staging
    /// chunks while they are sent (`rdask.device.dumps_staged`).
    dumps_staged: Option<Py<PyAny>>,
    /// `frames -> (value, nbytes, device_nbytes)`.
    loads: Py<PyAny>,
    /// The worker's device tier (a GPU worker), which values holding device
    /// memory report to.
    device: Option<Arc<DeviceLedger>>,
}

/// Where a value is: a Python object, or (a device value moved to host
/// memory by device→host spilling) its frames, turned back into an object
/// on the device when a task uses it.
enum Placed {
    Object(Py<PyAny>),
    OnHost(Vec<Bytes>),
}

struct PyValue {
    /// Never held while Python code runs (that code may let other threads
    /// take the interpreter lock, and one of them could wait for this).
    placed: Mutex<Placed>,
    size: u64,
    /// Device memory the object holds (CuPy, Numba, PyTorch arrays); 0 for
    /// host values.
    device: u64,
    /// Frames pickled when the task finished (small values only).
    frames: Option<Vec<Bytes>>,
    codec: Arc<Codec>,
}

impl PyValue {
    fn new(obj: Py<PyAny>, size: u64, device: u64, frames: Option<Vec<Bytes>>, codec: Arc<Codec>) -> PyValue {
        let device = if codec.device.is_some() { device } else { 0 };
        if let Some(ledger) = &codec.device {
            ledger.added(device);
        }
        PyValue { placed: Mutex::new(Placed::Object(obj)), size, device, frames, codec }
    }

    /// The object, brought back to the device first if it was moved to host.
    fn object(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let frames = match &*self.placed.lock().unwrap() {
            Placed::Object(o) => return Ok(o.clone_ref(py)),
            Placed::OnHost(frames) => frames.clone(),
        };
        let (obj, _, _) = self.codec.load(py, frames)?;
        let mut placed = self.placed.lock().unwrap();
        match &*placed {
            // Another thread brought it back meanwhile: use that one.
            Placed::Object(o) => Ok(o.clone_ref(py)),
            Placed::OnHost(_) => {
                let old = std::mem::replace(&mut *placed, Placed::Object(obj.clone_ref(py)));
                drop(placed);
                if let Some(ledger) = &self.codec.device {
                    ledger.moved_to_device(self.device);
                }
                drop(old);
                Ok(obj)
            }
        }
    }

    fn dumps(&self, py: Python<'_>, obj: Py<PyAny>) -> PyResult<Vec<Bytes>> {
        let frames = self.codec.dumps.call1(py, (obj,))?;
        let frames = frames.bind(py).cast::<PyList>()?.clone();
        frames.iter().map(|f| py_to_bytes(&f)).collect()
    }
}

impl ObjectValue for PyValue {
    fn size(&self) -> u64 {
        self.size
    }

    fn host_bytes(&self) -> u64 {
        // `device` is 0 where the worker keeps no device tier.
        self.size.saturating_sub(self.device)
    }

    fn serialize(&self) -> Result<Vec<Bytes>, TaskFailure> {
        if let Some(frames) = &self.frames {
            return Ok(frames.clone());
        }
        if let Placed::OnHost(frames) = &*self.placed.lock().unwrap() {
            return Ok(frames.clone());
        }
        keep_thread_state();
        Python::attach(|py| {
            let run = || -> PyResult<Vec<Bytes>> {
                let obj = match &*self.placed.lock().unwrap() {
                    Placed::Object(o) => o.clone_ref(py),
                    Placed::OnHost(frames) => return Ok(frames.clone()),
                };
                self.dumps(py, obj)
            };
            run().map_err(|e| failure_from(py, e))
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn device_bytes(&self) -> u64 {
        match &*self.placed.lock().unwrap() {
            Placed::Object(_) => self.device,
            Placed::OnHost(_) => 0,
        }
    }

    fn serialize_may_block(&self) -> bool {
        // Frames pickled when the task finished are served as they are.
        self.frames.is_none() || self.device > 0
    }

    fn staged(&self, ipc: Option<&rdask_transport::protocol::IpcOffer>, direct: Option<rdask_transport::device::MemoryKind>) -> Option<Result<Staged, TaskFailure>> {
        let device = rdask_gpu::device::process_device().ok()?;
        let share = ipc.is_some_and(|o| o.pid != std::process::id() && device.ipc_domain().is_some_and(|d| d == o.domain)) && crate::device::ipc_enabled();
        // The requester's connection carries this device's memory: each
        // array goes as one device frame, whatever the value's size.
        let direct = direct == Some(crate::device_direct::kind_of(&*device)) && crate::device_direct::direct_enabled();
        if self.device < STAGE_FROM && !share && !direct {
            return None;
        }
        let dumps_staged = self.codec.dumps_staged.as_ref()?;
        keep_thread_state();
        Python::attach(|py| {
            let obj = match &*self.placed.lock().unwrap() {
                Placed::Object(o) => o.clone_ref(py),
                Placed::OnHost(_) => return None,
            };
            let run = || -> PyResult<Option<Staged>> {
                let out = dumps_staged.call1(py, (obj,))?;
                if out.is_none(py) {
                    return Ok(None);
                }
                let (frames, parts, keep): StagedParts<'_> = out.extract(py)?;
                let head = frames.iter().map(py_to_bytes).collect::<PyResult<Vec<_>>>()?;
                let (parts, streams): (Vec<(u64, u64)>, Vec<i64>) = parts.into_iter().map(|(a, n, s)| ((a, n), s)).unzip();
                // What still writes the arrays is waited for once, before
                // any is read or shared, without holding the interpreter.
                py.detach(|| crate::device::wait_for_arrays(&*device, streams, share || direct)).map_err(|e| crate::RdaskError::new_err(e.to_string()))?;
                if share {
                    // Memory that cannot be shared (a stream-ordered pool's,
                    // say) goes as bytes instead.
                    match shared_parts(&*device, head.clone(), &parts, keep.clone_ref(py)) {
                        Ok(staged) => return Ok(Some(staged)),
                        Err(e) => {
                            tracing::debug!("cannot share a device value by IPC, sending its bytes: {e}");
                            if self.device < STAGE_FROM && !direct {
                                return Ok(None);
                            }
                        }
                    }
                }
                // One frame per array: an array over the frame size limit is staged.
                let fits = parts.iter().all(|&(_, n)| n + rdask_transport::device::DEVICE_FRAME_HOST_MAX as u64 <= rdask_transport::frame::DEFAULT_MAX_FRAME_SIZE);
                if direct && fits {
                    let arrays = crate::device_direct::DirectArrays::new(&*device, &parts, keep);
                    return Ok(Some(Staged { head, chunks: Box::new(arrays), shared: false }));
                }
                // A pool per value (a peer that stops reading holds up only
                // its own transfer), its buffers kept between transfers.
                let pool = StagingPool::with_cache(device, STAGING_CHUNK, STAGING_DEPTH, Some(staging_cache()));
                // SAFETY: `keep` holds the arrays whose memory the parts
                // name, and lives as long as the source.
                let raw = unsafe { RawSource::new(pool.clone(), parts) };
                Ok(Some(Staged { head, chunks: Box::new(DeviceChunks { raw, pool, keep: Some(keep) }), shared: false }))
            };
            run().map_err(|e| failure_from(py, e)).transpose()
        })
    }

    fn move_to_host(&self) -> Result<u64, TaskFailure> {
        if self.device == 0 {
            return Ok(0);
        }
        keep_thread_state();
        Python::attach(|py| {
            let obj = match &*self.placed.lock().unwrap() {
                Placed::Object(o) => o.clone_ref(py),
                Placed::OnHost(_) => return Ok(0),
            };
            if held_elsewhere(py, &obj) {
                tracing::debug!(bytes = self.device, "a device value in use elsewhere stays on the device");
                return Ok(0);
            }
            // Serialising copies the device frames to host memory.
            let frames = self.dumps(py, obj.clone_ref(py)).map_err(|e| failure_from(py, e))?;
            let mut placed = self.placed.lock().unwrap();
            let same = matches!(&*placed, Placed::Object(o) if o.is(&obj));
            // Again: the copy off the device let other threads run, and a
            // task may have taken the object meanwhile (`object()` hands it
            // out under this lock).
            if !same || held_elsewhere(py, &obj) {
                return Ok(0);
            }
            let old = std::mem::replace(&mut *placed, Placed::OnHost(frames));
            drop(placed);
            if let Some(ledger) = &self.codec.device {
                ledger.moved_to_host(self.device);
            }
            drop((old, obj));
            Ok(self.device)
        })
    }
}

/// Whether a stored object is referenced beyond the store and the one
/// reference `move_to_host` took (a running task's input, a view kept as
/// another value, an array being sent): moving it would free no device
/// memory and could part the copies. A view moved to host lets go of its
/// base, which can then move too.
fn held_elsewhere(_py: Python<'_>, obj: &Py<PyAny>) -> bool {
    // SAFETY: `obj` is a live object and the interpreter lock is held (`_py`).
    unsafe { pyo3::ffi::Py_REFCNT(obj.as_ptr()) > 2 }
}

/// What `rdask.device.dumps_staged` returns: the value's frames but for its
/// device arrays, the arrays as (device address, bytes, stream code of
/// `device_download`), what keeps them alive.
type StagedParts<'py> = (Vec<Bound<'py, PyAny>>, Vec<(u64, u64, i64)>, Py<PyAny>);

/// Device values of at least this size go to peers in staging chunks as
/// they are copied off the device; smaller ones in one copy.
const STAGE_FROM: u64 = 16 << 20;
const STAGING_CHUNK: usize = rdask_gpu::staging::DEFAULT_CHUNK;
const STAGING_DEPTH: usize = rdask_gpu::staging::DEFAULT_DEPTH;

/// Staging buffers kept between transfers (8 of 8 MiB at most).
fn staging_cache() -> Arc<StagingCache> {
    static CACHE: std::sync::OnceLock<Arc<StagingCache>> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| StagingCache::new(8)).clone()
}

/// The chunks of a device value being sent, and the Python objects that
/// keep its device memory alive meanwhile.
/// A device value for a requester of this node: its head marked as shared,
/// then one IPC descriptor per array (an empty array: the bare mark); the
/// arrays stay alive with the source until the requester releases them.
fn shared_parts(device: &dyn rdask_gpu::device::Device, mut head: Vec<Bytes>, parts: &[(u64, u64)], keep: Py<PyAny>) -> PyResult<Staged> {
    let mut descriptors = std::collections::VecDeque::with_capacity(parts.len());
    for &(address, nbytes) in parts {
        let d = if nbytes == 0 {
            rdask_gpu::ipc::descriptor(&[])
        } else {
            // SAFETY: `keep` holds the array whose memory this is.
            unsafe { device.ipc_export(address, nbytes as usize) }.map_err(|e| crate::RdaskError::new_err(e.to_string()))?
        };
        descriptors.push_back(Bytes::from(d));
    }
    let mut first = head[0].to_vec();
    first[..4].copy_from_slice(crate::device::SHARED);
    head[0] = Bytes::from(first);
    crate::device::SHARED_VALUES.fetch_add(1, Ordering::Relaxed);
    crate::device::SHARED_HELD.fetch_add(1, Ordering::Relaxed);
    Ok(Staged { head, chunks: Box::new(SharedArrays { descriptors, keep: Some(keep) }), shared: true })
}

/// The descriptors of a shared device value, and what keeps its arrays.
struct SharedArrays {
    descriptors: std::collections::VecDeque<Bytes>,
    keep: Option<Py<PyAny>>,
}

impl ChunkSource for SharedArrays {
    fn next_chunk(&mut self) -> Result<Option<Bytes>, TaskFailure> {
        Ok(self.descriptors.pop_front())
    }
}

impl Drop for SharedArrays {
    fn drop(&mut self) {
        crate::device::SHARED_HELD.fetch_sub(1, Ordering::Relaxed);
        if let Some(keep) = self.keep.take() {
            keep_thread_state();
            Python::attach(|_py| drop(keep));
        }
    }
}

struct DeviceChunks {
    raw: RawSource,
    pool: Arc<StagingPool>,
    keep: Option<Py<PyAny>>,
}

impl ChunkSource for DeviceChunks {
    fn next_chunk(&mut self) -> Result<Option<Bytes>, TaskFailure> {
        let chunk = self.raw.next_chunk().map_err(|e| TaskFailure::message(format!("cannot copy a device value off the device: {e}")))?;
        match &chunk {
            Some(c) => {
                crate::device::STAGED_CHUNKS.fetch_add(1, Ordering::Relaxed);
                crate::device::STAGED_BYTES.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
            None => {
                crate::device::STAGED_VALUES.fetch_add(1, Ordering::Relaxed);
                crate::device::MOST_BUFFERS.fetch_max(self.pool.most_in_use() as u64, Ordering::Relaxed);
            }
        }
        Ok(chunk)
    }
}

impl Drop for DeviceChunks {
    fn drop(&mut self) {
        if let Some(keep) = self.keep.take() {
            keep_thread_state();
            Python::attach(|_py| drop(keep));
        }
    }
}

impl Drop for PyValue {
    fn drop(&mut self) {
        let placed = std::mem::replace(self.placed.get_mut().unwrap(), Placed::OnHost(Vec::new()));
        if let Some(ledger) = &self.codec.device {
            match &placed {
                Placed::Object(_) => ledger.released(self.device),
                Placed::OnHost(_) => ledger.released_on_host(self.device),
            }
        }
        // Dropped without the GIL, PyO3 defers the decref until some thread
        // next takes it; a worker that is idle would then keep a released
        // array (and its receive buffer, which the next large transfer could
        // reuse, or its device memory) alive. Large values are let go of at once.
        if let Placed::Object(obj) = placed {
            if self.size >= rdask_transport::bufpool::POOL_MIN as u64 || self.device > 0 {
                keep_thread_state();
                Python::attach(|_py| drop(obj));
            }
        }
    }
}

impl Codec {
    fn load(&self, py: Python<'_>, frames: impl IntoIterator<Item = Bytes>) -> PyResult<(Py<PyAny>, u64, u64)> {
        let frames = frames_to_py(py, frames)?;
        self.loads.call1(py, (frames,))?.extract(py)
    }

    fn to_py(&self, py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
        match value {
            Value::Object(o) => match o.as_any().downcast_ref::<PyValue>() {
                Some(v) => v.object(py),
                None => self.load(py, o.serialize().map_err(|f| RdaskError::new_err(f.message))?).map(|(v, _, _)| v),
            },
            Value::Bytes(b) => self.load(py, [b.clone()]).map(|(v, _, _)| v),
        }
    }
}

/// A Python exception as a task failure: "Type: message" and the pickled
/// exception with its traceback (`rdask.serialize.dumps_error`), so the
/// client can raise the original.
fn failure_from(py: Python<'_>, e: PyErr) -> TaskFailure {
    let message = match e.get_type(py).qualname() {
        Ok(name) => format!("{name}: {}", e.value(py)),
        Err(_) => e.to_string(),
    };
    let payload = py
        .import("rdask.serialize")
        .and_then(|m| m.getattr("dumps_error"))
        .and_then(|f| f.call1((e.value(py),)))
        .and_then(|b| py_to_bytes(&b))
        .unwrap_or_default();
    TaskFailure { message, payload }
}

/// Gives this (non-Python) thread a Python thread state that lives as long
/// as the thread. Without it every `Python::attach` on a runtime thread
/// creates and destroys a thread state, which costs more than running a
/// small task.
fn keep_thread_state() {
    thread_local! {
        static KEPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    KEPT.with(|kept| {
        if !kept.get() {
            kept.set(true);
            // SAFETY: the interpreter is initialised (this module was
            // imported). Ensure creates the thread state and takes the GIL;
            // SaveThread gives the GIL back but leaves the state (and its
            // Ensure count of one) in place, so later attaches reuse it.
            unsafe {
                let _ = pyo3::ffi::PyGILState_Ensure();
                pyo3::ffi::PyEval_SaveThread();
            }
        }
    });
}

impl Executor for PyExecutor {
    fn received_bytes(&self, frames: &Frames) -> u64 {
        crate::device::received_bytes(frames)
    }

    fn execute(&self, task: TaskRun) -> Result<Value, TaskFailure> {
        keep_thread_state();
        Python::attach(|py| {
            let run = || -> PyResult<Result<Value, TaskFailure>> {
                let inputs = PyList::empty(py);
                for value in &task.inputs {
                    inputs.append(self.codec.to_py(py, value)?)?;
                }
                let payload = Py::new(py, Frame { data: task.payload.clone() })?;
                let out = self.execute.call1(py, (task.key.as_str(), payload, inputs))?;
                let out = out.bind(py).cast::<PyTuple>()?.clone();
                if out.get_item(0)?.extract::<bool>()? {
                    let eager = out.get_item(3)?;
                    let frames = if eager.is_none() {
                        None
                    } else {
                        Some(eager.try_iter()?.map(|f| py_to_bytes(&f?)).collect::<PyResult<Vec<_>>>()?)
                    };
                    let value = PyValue::new(
                        out.get_item(1)?.unbind(),
                        out.get_item(2)?.extract()?,
                        out.get_item(4)?.extract()?,
                        frames,
                        self.codec.clone(),
                    );
                    Ok(Ok(Value::Object(Arc::new(value))))
                } else {
                    let message: String = out.get_item(1)?.extract()?;
                    let payload = py_to_bytes(&out.get_item(2)?)?;
                    Ok(Err(TaskFailure { message, payload }))
                }
            };
            // The Python side catches user errors itself; anything reaching
            // here is a bug in rdask's own glue, reported as the task's error.
            run().unwrap_or_else(|e| Err(TaskFailure::message(format!("rdask executor error: {e}"))))
        })
    }

    fn deserialize(&self, frames: Frames) -> Result<Value, TaskFailure> {
        keep_thread_state();
        Python::attach(|py| {
            let (obj, size, device) = self.codec.load(py, frames).map_err(|e| failure_from(py, e))?;
            Ok(Value::Object(Arc::new(PyValue::new(obj, size, device, None, self.codec.clone()))))
        })
    }
}

/// Takes the calling task's thread out of its worker's pool and starts a
/// replacement, so tasks this one waits for can run (Dask's `secede`).
/// False outside a worker task or when the task seceded already.
#[pyfunction]
pub fn secede() -> bool {
    rdask_worker::runqueue::secede_current_thread()
}

/// Runs a worker until the scheduler goes away (returns) or the connection
/// cannot be made (raises). Blocks with the GIL released; Ctrl-C and other
/// signals are still seen every 200 ms. When a signal handler raises
/// (KeyboardInterrupt, or the SIGTERM handler of `rdask.worker`), the worker
/// first tells the scheduler it is leaving, so none of its tasks is
/// suspected of killing it, and then the exception propagates.
#[pyfunction]
#[pyo3(signature = (scheduler, execute, dumps, loads, name, nthreads=1, memory_limit=0, resources=None, listen="tcp://127.0.0.1:0", token=None, connect_timeout=10.0, on_start=None, cpus=None, numa_node=None, gpu=None, memory_thresholds=None, local_directory=None, device_memory_limit=None, dumps_staged=None))]
#[allow(clippy::too_many_arguments)]
pub fn run_worker(
    py: Python<'_>,
    scheduler: String,
    execute: Py<PyAny>,
    dumps: Py<PyAny>,
    loads: Py<PyAny>,
    name: String,
    nthreads: u32,
    memory_limit: u64,
    resources: Option<HashMap<String, f64>>,
    listen: &str,
    token: Option<String>,
    connect_timeout: f64,
    on_start: Option<Py<PyAny>>,
    cpus: Option<Vec<u32>>,
    numa_node: Option<u32>,
    gpu: Option<String>,
    memory_thresholds: Option<(Option<f64>, Option<f64>, Option<f64>, Option<f64>)>,
    local_directory: Option<std::path::PathBuf>,
    device_memory_limit: Option<u64>,
    dumps_staged: Option<Py<PyAny>>,
) -> PyResult<()> {
    let memory = match memory_thresholds {
        Some((target, spill, pause, terminate)) => rdask_worker::memory::MemoryThresholds { target, spill, pause, terminate },
        None => Default::default(),
    };
    memory.validate().map_err(pyo3::exceptions::PyValueError::new_err)?;
    // A GPU worker counts its values' device memory (a limit of 0: counted,
    // never spilled).
    let device = device_memory_limit.map(DeviceLedger::new);
    let config = WorkerConfig {
        memory,
        local_directory,
        scheduler,
        name,
        nthreads: nthreads.max(1),
        memory_limit,
        resources: resources.unwrap_or_default().into_iter().map(|(name, amount)| Resource { name, amount }).collect(),
        listen: listen.to_string(),
        token,
        connect_timeout: Duration::from_secs_f64(connect_timeout.max(0.1)),
        placement: rdask_transport::protocol::Placement { host: String::new(), cpus: cpus.unwrap_or_default(), numa_node, gpu, local_directory: String::new() },
        device: device.clone(),
        ..WorkerConfig::default()
    };
    let executor = Arc::new(PyExecutor { execute, codec: Arc::new(Codec { dumps, dumps_staged, loads, device }) });
    let (tx, rx) = std::sync::mpsc::channel();
    // `detach` wants `Sync` captures; the mutex is only ever taken here.
    let rx = std::sync::Mutex::new(rx);
    let (leave_tx, leave_rx) = tokio::sync::oneshot::channel::<()>();
    runtime().spawn(async move {
        let leave = async move {
            let _ = leave_rx.await;
        };
        let _ = tx.send(rdask_worker::run_worker_until(config, executor, leave).await);
    });
    if let Some(cb) = on_start {
        cb.call0(py)?;
    }
    let wait = |timeout: Duration| py.detach(|| rx.lock().unwrap().recv_timeout(timeout));
    loop {
        match wait(Duration::from_millis(200)) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e @ (rdask_worker::WorkerError::Connect { .. } | rdask_worker::WorkerError::Refused(_)))) => {
                return Err(CannotJoinError::new_err(e.to_string()))
            }
            Ok(Err(e)) => return Err(RdaskError::new_err(e.to_string())),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(signal) = py.check_signals() {
                    let _ = leave_tx.send(());
                    let _ = wait(Duration::from_secs(5));
                    return Err(signal);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(RdaskError::new_err("the worker runtime stopped unexpectedly"))
            }
        }
    }
}
