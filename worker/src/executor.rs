//! How a worker runs tasks. The runtime is generic over [`Executor`]: the
//! Rust [`NullExecutor`] here for benchmarks and tests, a Python executor in
//! the Python package.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use rdask_transport::bytes::Bytes;
pub use rdask_transport::peer::Frames;
use rdask_transport::TaskId;

/// A value in the worker's store. Plain bytes, or an executor-specific object
/// that is serialised only when a peer or client asks for it.
#[derive(Clone)]
pub enum Value {
    Bytes(Bytes),
    Object(Arc<dyn ObjectValue>),
}

impl Value {
    pub fn size(&self) -> u64 {
        match self {
            Value::Bytes(b) => b.len() as u64,
            Value::Object(o) => o.size(),
        }
    }

    /// Device memory the value holds now (see [`ObjectValue::device_bytes`]).
    pub fn device_bytes(&self) -> u64 {
        match self {
            Value::Bytes(_) => 0,
            Value::Object(o) => o.device_bytes(),
        }
    }

    /// What the value counts for in the store's host memory (see
    /// [`ObjectValue::host_bytes`]).
    pub fn host_bytes(&self) -> u64 {
        match self {
            Value::Bytes(b) => b.len() as u64,
            Value::Object(o) => o.host_bytes(),
        }
    }

    /// Frames to send to a peer.
    pub fn to_frames(&self) -> Result<Frames, TaskFailure> {
        match self {
            Value::Bytes(b) => Ok(smallvec::smallvec![b.clone()]),
            Value::Object(o) => o.serialize().map(Frames::from_vec),
        }
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Value::Object(o) => write!(f, "Object({} bytes)", o.size()),
        }
    }
}

/// An in-memory object (e.g. a Python object) kept unserialised.
pub trait ObjectValue: Send + Sync + 'static {
    /// Estimated memory footprint, reported to the scheduler for placement.
    fn size(&self) -> u64;
    /// Host memory the value counts for against the worker's memory limit:
    /// its size less the device memory it holds (a device value's arrays
    /// count against the device memory limit instead, as in dask-cuda). A
    /// constant: the store adds and subtracts it. Device values moved to
    /// host memory are counted by the device tier's ledger.
    fn host_bytes(&self) -> u64 {
        self.size()
    }
    /// The value as frames; an error (with the executor's payload, e.g. the
    /// pickling exception) when this object cannot be serialised.
    fn serialize(&self) -> Result<Vec<Bytes>, TaskFailure>;
    fn as_any(&self) -> &dyn Any;
    /// Bytes of device (GPU) memory this value holds now: 0 for host
    /// values and for device values moved to host memory.
    fn device_bytes(&self) -> u64 {
        0
    }
    /// Moves this value's device memory to host memory (device→host
    /// spilling, `device_tier.rs`); returns the bytes moved. The value comes
    /// back to the device when a task uses it.
    fn move_to_host(&self) -> Result<u64, TaskFailure> {
        Ok(0)
    }
    /// For a peer, this value as frames whose device parts are read off the
    /// device in chunks while they are sent (`Staged`), instead of all at
    /// once into host memory. `None`: use [`ObjectValue::serialize`].
    /// With `ipc` (the requester shares this node and can import device
    /// memory of that domain), the parts may be descriptors of the arrays'
    /// memory instead (`Staged::shared`); with `direct` (the requester's
    /// connection carries device payloads of the kind of this process's
    /// device), each array may go as one device payload ([`Part::Device`]).
    fn staged(&self, _ipc: Option<&rdask_transport::protocol::IpcOffer>, _direct: Option<rdask_transport::device::MemoryKind>) -> Option<Result<Staged, TaskFailure>> {
        None
    }
    /// Whether serialising this value may take long (running an
    /// interpreter, copying off a device): the peer server then does it on
    /// a thread that may block, not on its event loop.
    fn serialize_may_block(&self) -> bool {
        false
    }
}

/// A value served in parts: its first frames, then the frames `chunks`
/// yields (each a separate frame of the value, in order).
pub struct Staged {
    pub head: Vec<Bytes>,
    pub chunks: Box<dyn ChunkSource>,
    /// The chunks are IPC descriptors of device memory the source keeps
    /// alive: the peer server keeps the source until the requester says it
    /// has copied them (`ToPeerMessage::Release`).
    pub shared: bool,
}

/// The chunks of a value that is being copied off a device.
pub trait ChunkSource: Send {
    /// The next chunk, or `None` at the end. May block (for a free staging
    /// buffer, and for the copy): call it where blocking is allowed.
    fn next_chunk(&mut self) -> Result<Option<Bytes>, TaskFailure>;
    /// The next part: a chunk, or an array's device memory itself for a
    /// connection that carries it.
    fn next_part(&mut self) -> Result<Option<Part>, TaskFailure> {
        Ok(self.next_chunk()?.map(Part::Bytes))
    }
}

/// One part of a value sent in parts.
pub enum Part {
    Bytes(Bytes),
    /// Sent as a device frame's payload (`rdask_transport::device`).
    Device(rdask_transport::device::DevicePayload),
}

/// One task as handed to an executor thread.
pub struct TaskRun {
    pub id: TaskId,
    pub key: String,
    pub payload: Bytes,
    /// Input values in the order of the task's dependencies.
    pub inputs: Vec<Value>,
}

/// Why a task failed: a message for humans and an optional payload the client
/// can turn back into the original exception.
#[derive(Debug, Clone)]
pub struct TaskFailure {
    pub message: String,
    pub payload: Bytes,
}

impl TaskFailure {
    pub fn message(m: impl Into<String>) -> Self {
        TaskFailure { message: m.into(), payload: Bytes::new() }
    }
}

/// Runs tasks on the worker's threads. Must be thread-safe: `nthreads`
/// threads call `execute` concurrently.
pub trait Executor: Send + Sync + 'static {
    fn execute(&self, task: TaskRun) -> Result<Value, TaskFailure>;

    /// True when this task is known to finish in microseconds without
    /// blocking: the worker then runs it on its event loop and skips the
    /// hand-off to an executor thread (two queue operations and a wake-up,
    /// which would cost more than the task). Executors of user code (Python)
    /// leave this false.
    fn is_trivial(&self, _payload: &Bytes) -> bool {
        false
    }

    /// Runs a task `is_trivial` accepted, on the worker's event loop. The
    /// key is borrowed from the received message, so a micro-task costs no
    /// allocation for it; the default builds a [`TaskRun`] and calls
    /// [`Executor::execute`].
    fn execute_trivial(&self, id: TaskId, key: &str, payload: &Bytes, inputs: &[Value]) -> Result<Value, TaskFailure> {
        self.execute(TaskRun { id, key: key.to_string(), payload: payload.clone(), inputs: inputs.to_vec() })
    }

    /// The bytes a value received as `frames` took to move (for the
    /// transfer figures): their length, unless some frames stand for
    /// memory that arrived another way (device arrays copied into device
    /// memory as they came).
    fn received_bytes(&self, frames: &Frames) -> u64 {
        frames.iter().map(|f| f.len() as u64).sum()
    }

    /// Turns frames received from a peer back into a value.
    fn deserialize(&self, frames: Frames) -> Result<Value, TaskFailure> {
        match frames.len() {
            1 => Ok(Value::Bytes(frames.into_iter().next().unwrap())),
            0 => Ok(Value::Bytes(Bytes::new())),
            n => Err(TaskFailure::message(format!("value arrived as {n} frames; this executor expects one"))),
        }
    }
}

/// What a null task does, carried as its payload (12 bytes, little-endian).
/// An empty payload means: no sleep, output the count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NullTask {
    pub sleep_us: u32,
    /// Output size; at least 8 (the count always leads the output).
    pub output_bytes: u32,
    /// Raise an error instead of producing output.
    pub fail: bool,
    /// Kill the whole worker process (for killed-worker tests).
    pub crash: bool,
}

impl NullTask {
    pub fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(12);
        v.extend_from_slice(&self.sleep_us.to_le_bytes());
        v.extend_from_slice(&self.output_bytes.to_le_bytes());
        v.extend_from_slice(&((self.fail as u32) | ((self.crash as u32) << 1)).to_le_bytes());
        Bytes::from(v)
    }

    pub fn decode(b: &[u8]) -> Result<NullTask, String> {
        if b.is_empty() {
            return Ok(NullTask::default());
        }
        if b.len() != 12 {
            return Err(format!("null task payload must be 0 or 12 bytes, got {}", b.len()));
        }
        let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Ok(NullTask { sleep_us: word(0), output_bytes: word(4), fail: word(8) & 1 != 0, crash: word(8) & 2 != 0 })
    }
}

/// Reads the count a null task produced.
pub fn null_count(value: &Value) -> Option<u64> {
    match value {
        Value::Bytes(b) if b.len() >= 8 => Some(u64::from_le_bytes(b[..8].try_into().unwrap())),
        _ => None,
    }
}

/// Does no real work, but does it checkably: each task outputs
/// `1 + sum of its inputs' counts`, so a tree of N tasks yields N at its root
/// and a lost or duplicated input shows up as a wrong number.
#[derive(Debug, Clone, Copy)]
pub struct NullExecutor {
    /// Run tasks without sleep on the worker's event loop (see
    /// [`Executor::is_trivial`]). Off: every task goes through the thread pool.
    pub inline_trivial: bool,
}

impl Default for NullExecutor {
    fn default() -> Self {
        NullExecutor { inline_trivial: true }
    }
}

impl NullExecutor {
    /// Every task through the executor threads, as user code would run.
    pub fn threaded() -> Self {
        NullExecutor { inline_trivial: false }
    }
}

impl Executor for NullExecutor {
    fn is_trivial(&self, payload: &Bytes) -> bool {
        self.inline_trivial && NullTask::decode(payload).is_ok_and(|t| t.sleep_us == 0 && !t.crash)
    }

    fn execute(&self, task: TaskRun) -> Result<Value, TaskFailure> {
        run_null(&task.key, &task.payload, &task.inputs)
    }

    fn execute_trivial(&self, _id: TaskId, key: &str, payload: &Bytes, inputs: &[Value]) -> Result<Value, TaskFailure> {
        run_null(key, payload, inputs)
    }
}

/// What a null task does (see [`NullExecutor`]).
fn run_null(key: &str, payload: &[u8], inputs: &[Value]) -> Result<Value, TaskFailure> {
    let spec = NullTask::decode(payload).map_err(TaskFailure::message)?;
    if spec.sleep_us > 0 {
        std::thread::sleep(Duration::from_micros(spec.sleep_us as u64));
    }
    if spec.crash {
        tracing::error!(key = %key, "null task asked to crash the worker process");
        std::process::exit(17);
    }
    if spec.fail {
        return Err(TaskFailure::message(format!("null task {key} failed on purpose")));
    }
    let mut count = 1u64;
    for (i, v) in inputs.iter().enumerate() {
        count += null_count(v).ok_or_else(|| TaskFailure::message(format!("input {i} of {key} is not a null-task value")))?;
    }
    let len = (spec.output_bytes as usize).max(8);
    let mut out = vec![0u8; len];
    out[..8].copy_from_slice(&count.to_le_bytes());
    Ok(Value::Bytes(Bytes::from(out)))
}
