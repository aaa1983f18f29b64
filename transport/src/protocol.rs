//! Every control message of the wire protocol, one enum per direction.
//!
//! Control messages are rkyv archives. Receivers validate them (bytecheck) and
//! read them in place; they are never deserialised on hot paths. Payloads
//! (pickled functions, results, exceptions) never live inside a control
//! message: a message names them by index into the data frames that travel
//! after it in the same [`crate::Frame`]. [`NO_FRAME`] means "no payload".

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
pub use smallvec::SmallVec;

use crate::error::TransportError;
pub use crate::ids::{ArchivedClientId, ArchivedTaskId, ArchivedWorkerId, ClientId, TaskId, WorkerId};

/// Bumped on any change of a message layout below. The handshake rejects
/// peers with a different version before any archive is read.
pub const PROTOCOL_VERSION: u16 = 10;

/// Index value meaning "this item has no data frame".
pub const NO_FRAME: u32 = u32::MAX;

/// A named amount of an abstract resource ("GPU" = 1, "MEM" = 4e9).
#[derive(Debug, Clone, Default, PartialEq, Archive, Serialize, Deserialize)]
pub struct Resource {
    pub name: String,
    pub amount: f64,
}

// ---------------------------------------------------------------- client -> scheduler

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum FromClientMessage {
    /// Adds tasks. May be one of many batches of a large graph; each batch may
    /// depend only on its own tasks and on keys the scheduler already holds.
    /// Answered by `Submitted` or `SubmitRejected` with the same `submit_id`.
    Submit(SubmitGraph),
    /// The client drops its interest in these keys.
    Release { keys: Vec<String> },
    /// Stop these keys (and everything that depends on them).
    Cancel { keys: Vec<String> },
    /// Where do these keys live? Answered with [`ToClientMessage::WhoHas`];
    /// the client then fetches directly from the workers.
    WhoHas { request_id: u64, keys: Vec<String> },
    /// Workers and task counts; answered with [`ToClientMessage::ClusterInfo`].
    ClusterInfo { request_id: u64 },
    /// Task stream events that ended at or after `since_us` (µs since the
    /// Unix epoch); answered with [`ToClientMessage::TaskStream`].
    TaskStream { request_id: u64, since_us: u64 },
    /// Clean goodbye; the client's keys are released.
    Close,
    /// A coordination primitive (locks, semaphores, variables, events,
    /// queues, published datasets) held by the scheduler; a value travels
    /// as data frame 0. Answered with [`ToClientMessage::Coord`], at once or
    /// (for the waiting operations) when it can be granted.
    Coord { request_id: u64, op: CoordOp },
    /// Which tasks each worker has (queued or running); answered with
    /// [`ToClientMessage::Processing`].
    Processing { request_id: u64 },
    /// Drop these copies (`key` on the worker at `address`) where the value
    /// has another copy (rebalancing); answered with
    /// [`ToClientMessage::ReplicasDropped`] naming how many went.
    DropReplicas { request_id: u64, items: Vec<(String, String)> },
    /// Python to run in the scheduler's process (`run_on_scheduler`,
    /// scheduler plugins): `kind` names what (`run`, `register_plugin`,
    /// `unregister_plugin`), the pickled payload is data frame 0. Answered
    /// with [`ToClientMessage::SchedulerCallResult`]; a scheduler without a
    /// Python side (the Rust binary) answers with an error.
    SchedulerCall { request_id: u64, kind: String, name: String },
}

/// An operation on the scheduler's coordination state. Names are global to
/// the scheduler; the state a client holds (leases, waits) goes with it.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum CoordOp {
    /// Sets a variable to the value in data frame 0; `key`: the future it
    /// holds, kept alive while it is the variable's value.
    VariableSet { name: String, key: Option<String> },
    /// Waits until the variable is set; answers `Value`.
    VariableGet { name: String },
    VariableDelete { name: String },
    /// Takes a lease on `count` of `names` (all of them when `count` is 0),
    /// each a semaphore of `max_leases` (1: a lock); waits until it can.
    /// Answers `Done`. `lease` is the client's name for it.
    Acquire { names: Vec<String>, max_leases: u32, count: u32, lease: u64 },
    /// Gives a lease back; answers `Bool` (false: it was not held).
    Release { lease: u64 },
    /// Leases held now on a semaphore; answers `Count`.
    Leases { name: String },
    EventSet { name: String },
    EventClear { name: String },
    /// Waits until the event is set; answers `Done`.
    EventWait { name: String },
    EventIsSet { name: String },
    /// Appends the value in data frame 0 (and the future `key` it holds).
    QueuePut { name: String, key: Option<String> },
    /// Waits for an item (or, with `batch` > 0, takes up to `batch` at once
    /// without waiting); answers `Values`.
    QueueGet { name: String, batch: u32 },
    QueueSize { name: String },
    /// Publishes `keys` (kept alive) with the value in data frame 0 under a name.
    DatasetPublish { name: String, keys: Vec<String>, replace: bool },
    DatasetGet { name: String },
    DatasetDelete { name: String },
    DatasetList,
    /// Stops waiting for an earlier request: it is answered `Cancelled`
    /// unless its answer left already (then the client gets that one).
    Cancel { request_id: u64 },
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum CoordOutcome {
    Done,
    /// Values in data frames 0.. with the future key each holds.
    Values(Vec<Option<String>>),
    Bool(bool),
    Count(u64),
    Names(Vec<String>),
    Cancelled,
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct SubmitGraph {
    pub submit_id: u64,
    /// Identifies the graph a batch belongs to (client-chosen, unique per client).
    pub graph_id: u64,
    /// More batches of the same graph follow. Until the batch with `more ==
    /// false` arrives, the scheduler keeps every task of the graph (it may be
    /// an input of a later batch), even ones nobody seems to need yet.
    pub more: bool,
    /// Tasks in the whole graph (all its batches), or 0 if unknown. A
    /// placement hint: the scheduler sizes per-worker blocks of input-less
    /// tasks from it before the later batches have arrived.
    pub graph_tasks: u64,
    /// `keys[..tasks.len()]` are the keys of the new tasks, in order; the rest
    /// are existing keys that new tasks depend on.
    pub keys: Vec<String>,
    pub tasks: Vec<TaskSpec>,
    /// Placement restrictions the tasks of this batch refer to by index.
    pub restrictions: Vec<Restriction>,
}

/// Where a task may run (Dask's `workers=`, `resources=`,
/// `allow_other_workers=`).
#[derive(Debug, Clone, Default, PartialEq, Archive, Serialize, Deserialize)]
pub struct Restriction {
    /// Worker names, addresses or hosts; empty = any worker.
    pub workers: Vec<String>,
    /// Each must be offered (at least this amount) by the worker.
    pub resources: Vec<Resource>,
    /// Run elsewhere when no worker matching `workers` is connected.
    pub loose: bool,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Indices into [`SubmitGraph::keys`].
    pub deps: Vec<u32>,
    /// User priority: higher runs first (Dask's `priority=`).
    pub user_priority: i32,
    /// Graph order: lower runs first (Dask's `dask.order`). `None` lets the
    /// scheduler derive one from the graph's shape (b-level).
    pub order: Option<i64>,
    /// Data frame holding the task's payload, or [`NO_FRAME`].
    pub payload: u32,
    /// The client holds this key and wants to hear when it finishes.
    pub want: bool,
    /// How many times to re-run the task after it raised.
    pub retries: u32,
    /// Index into [`SubmitGraph::restrictions`], or [`NO_FRAME`] for none.
    pub restriction: u32,
}

// ---------------------------------------------------------------- scheduler -> client

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum ToClientMessage {
    Welcome { client_id: ClientId, scheduler_id: String },
    /// Wanted keys that finished.
    InMemory(Vec<KeyDone>),
    /// Wanted keys that failed (or depend on a failure).
    Erred(Vec<KeyErred>),
    Cancelled { keys: Vec<String> },
    /// Wanted keys whose value was lost with its worker; they are being
    /// recomputed and will be reported in memory again.
    Lost { keys: Vec<String> },
    Submitted { submit_id: u64 },
    /// A submit batch was refused as a whole; nothing of it was kept.
    SubmitRejected { submit_id: u64, message: String },
    WhoHas { request_id: u64, found: Vec<KeyLocation>, missing: Vec<String> },
    ClusterInfo { request_id: u64, info: ClusterInfo },
    TaskStream { request_id: u64, events: Vec<StreamEvent> },
    /// The answer to a [`FromClientMessage::Coord`] request.
    Coord { request_id: u64, outcome: CoordOutcome },
    /// Per worker address, the keys it is running or has queued.
    Processing { request_id: u64, workers: Vec<(String, Vec<String>)> },
    ReplicasDropped { request_id: u64, dropped: u64 },
    /// The answer to `SchedulerCall`: the pickled result (or error) is data
    /// frame 0 when there is one; `message` says what went wrong.
    SchedulerCallResult { request_id: u64, ok: bool, message: String },
    /// A message the scheduler could not act on; the connection stays up.
    Error { message: String },
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub scheduler_id: String,
    /// `http://host:port` of the scheduler's dashboard; empty when it is off.
    pub dashboard: String,
    /// Clients connected (the asking one included).
    pub clients: u64,
    pub workers: Vec<WorkerSummary>,
    /// Tasks the scheduler currently knows (not forgotten).
    pub tasks: u64,
    pub ready: u64,
    pub submitted: u64,
    pub finished: u64,
    pub failed: u64,
}

/// Where on its host a worker runs, as its launcher placed it.
#[derive(Debug, Clone, Default, PartialEq, Archive, Serialize, Deserialize)]
pub struct Placement {
    pub host: String,
    /// OS indexes of the CPUs the worker is bound to; empty: unbound.
    pub cpus: Vec<u32>,
    /// NUMA node its memory comes from, if bound.
    pub numa_node: Option<u32>,
    /// Its GPU ("0: NVIDIA A100-SXM4-40GB (0000:07:00.0)"), for GPU workers.
    pub gpu: Option<String>,
    /// Where it spills values (empty: the system's temporary directory).
    pub local_directory: String,
}

/// `0-3,8,10-11`, the form of `taskset -c` and `/proc/PID/status`.
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct WorkerSummary {
    pub id: WorkerId,
    pub name: String,
    pub address: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub placement: Placement,
    pub processing: u64,
    pub stored_values: u64,
    pub stored_bytes: u64,
    pub resources: Vec<Resource>,
    /// Memory above its pause threshold.
    pub paused: bool,
    /// Its last heartbeat (memory in and out of spill, process memory).
    pub load: WorkerLoad,
}

/// One task's run on a worker thread, for the task stream
/// (`client.get_task_stream`, `performance_report`, the dashboard).
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct StreamEvent {
    pub key: String,
    pub worker: String,
    pub thread: u32,
    /// µs since the Unix epoch, on the worker's clock.
    pub start_us: u64,
    pub stop_us: u64,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct KeyDone {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct KeyErred {
    pub key: String,
    /// The key of the task that actually raised (may be a dependency).
    pub failed_key: String,
    pub message: String,
    /// Data frame with the executor's error payload (e.g. a pickled exception).
    pub payload: u32,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct KeyLocation {
    pub key: String,
    pub task: TaskId,
    pub size: u64,
    /// Peer addresses of workers that hold the value.
    pub addresses: Vec<String>,
}

// ---------------------------------------------------------------- worker -> scheduler

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum FromWorkerMessage {
    Register(WorkerInfo),
    Finished(Vec<FinishedTask>),
    Failed(Vec<FailedTask>),
    /// The worker fetched these values for a local task and keeps a replica.
    ReplicasAdded(Vec<TaskId>),
    /// A dependency could not be fetched from the worker the scheduler named.
    FetchFailed(Vec<FetchFailure>),
    StealReply(Vec<StealOutcome>),
    Heartbeat(WorkerLoad),
    /// These tasks started running user code. Only tasks that ran when a
    /// worker died are suspected of killing it (KilledWorker); tasks merely
    /// queued there are innocent. Sent for tasks that run a while (the worker
    /// sweeps its threads every few milliseconds) and at once for `careful`
    /// tasks, which then wait for [`ToWorkerMessage::ExecutingSeen`] before
    /// they start when `confirm` is set.
    Executing { tasks: Vec<TaskId>, confirm: bool },
    /// The worker leaves on purpose (SIGTERM, retirement, close): its tasks
    /// go elsewhere and none of them is suspected. The connection closes next.
    Leaving,
    /// When tasks ran on executor threads (not tasks run inline on the
    /// worker loop), sent before their `Finished`/`Failed`.
    Spans(Vec<TaskSpan>),
    /// Process memory crossed the pause threshold (true) or dropped back
    /// under it (false). A paused worker starts no task; the scheduler sends
    /// it none and lets idle workers steal what it has queued.
    Paused(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Archive, Serialize, Deserialize)]
pub struct TaskSpan {
    pub id: TaskId,
    /// µs since the Unix epoch, on the worker's clock.
    pub start_us: u64,
    pub stop_us: u64,
    /// Index of the executor thread that ran it.
    pub thread: u32,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    /// Address peers and clients fetch data from.
    pub address: String,
    pub nthreads: u32,
    /// Bytes; 0 means no limit.
    pub memory_limit: u64,
    pub resources: Vec<Resource>,
    pub placement: Placement,
}

#[derive(Debug, Clone, Copy, PartialEq, Archive, Serialize, Deserialize)]
pub struct FinishedTask {
    pub id: TaskId,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct FailedTask {
    pub id: TaskId,
    pub message: String,
    pub payload: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Archive, Serialize, Deserialize)]
pub struct FetchFailure {
    /// The task that needed the value.
    pub task: TaskId,
    pub dep: TaskId,
    pub holder: WorkerId,
}

#[derive(Debug, Clone, Copy, PartialEq, Archive, Serialize, Deserialize)]
pub struct StealOutcome {
    pub id: TaskId,
    /// True when the worker gave the task up before starting it.
    pub stolen: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Archive, Serialize, Deserialize)]
pub struct WorkerLoad {
    pub running: u32,
    pub queued: u32,
    /// Bytes of values held in memory.
    pub stored_bytes: u64,
    /// Bytes and count of values spilled to disk now, and bytes written to
    /// / read back from disk since the worker started.
    pub spilled_bytes: u64,
    pub spilled_values: u64,
    pub spilled_total_bytes: u64,
    pub unspilled_total_bytes: u64,
    /// CPU use of the worker's process since the last heartbeat, in percent
    /// of one core (workers sharing a process report the same figure).
    pub cpu_percent: f32,
    /// Resident memory of the worker's process, bytes.
    pub rss: u64,
    /// Value bytes this worker fetched from peers / served to peers and
    /// clients since it started, and the rates since the last heartbeat.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub in_per_s: f32,
    pub out_per_s: f32,
    /// The device tier of a GPU worker (all zero elsewhere).
    pub device: DeviceLoad,
}

/// A GPU worker's device memory: values on the device and its limit, device
/// values moved to host memory now, and bytes moved each way since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Archive, Serialize, Deserialize)]
pub struct DeviceLoad {
    pub bytes: u64,
    pub limit: u64,
    pub spilled_bytes: u64,
    pub spilled_values: u64,
    pub spilled_total_bytes: u64,
    pub unspilled_total_bytes: u64,
}

// ---------------------------------------------------------------- scheduler -> worker

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum ToWorkerMessage {
    Registered { worker_id: WorkerId, heartbeat_ms: u32 },
    Compute(ComputeBatch),
    /// Drop the stored values of these tasks.
    Release(Vec<TaskId>),
    /// Give these tasks back if they have not started; answered by StealReply.
    Steal(Vec<TaskId>),
    /// Forget these tasks if queued (they were cancelled).
    Cancel(Vec<TaskId>),
    /// The scheduler could not accept something the worker sent.
    Error { message: String },
    /// Shut down cleanly (scheduler exiting or cluster closing).
    Stop,
    /// Answers `Executing { confirm: true }`: the scheduler knows these
    /// tasks run, so a careful task may start.
    ExecutingSeen(Vec<TaskId>),
    /// Start (true) or stop sending `Spans`: the scheduler keeps a task
    /// stream only while a dashboard or a client wants one.
    ReportSpans(bool),
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct ComputeBatch {
    pub tasks: Vec<ComputeTask>,
    /// Addresses of every worker named as a holder in `tasks`.
    pub peers: Vec<PeerAddress>,
    /// Resource needs the tasks name by index (`ComputeTask::resources`).
    pub resource_sets: Vec<Vec<Resource>>,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct ComputeTask {
    pub id: TaskId,
    pub key: String,
    pub user_priority: i32,
    pub order: i64,
    pub payload: u32,
    pub deps: Vec<DepInfo>,
    /// The task was on a worker that died. The worker reports its start and
    /// waits for the scheduler's [`ToWorkerMessage::ExecutingSeen`] before
    /// running it, so that a task which kills workers at once is still
    /// known to have been running when the next one dies.
    pub careful: bool,
    /// Index into [`ComputeBatch::resource_sets`], or [`NO_FRAME`]: what the
    /// task holds while it runs. A worker runs tasks needing `GPU=1` on a
    /// `GPU=1` worker one at a time (Dask's semantics).
    pub resources: u32,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct DepInfo {
    /// No key: executors get inputs in dependency order (a Python payload
    /// names its own inputs), and a 100k-input reduction then costs no
    /// 100k key strings to build, send and copy.
    pub id: TaskId,
    pub size: u64,
    /// Inline for up to two holders: building a message must not allocate per input.
    pub holders: SmallVec<[WorkerId; 2]>,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct PeerAddress {
    pub id: WorkerId,
    pub address: String,
}

// ---------------------------------------------------------------- worker <-> worker, client -> worker

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum ToPeerMessage {
    /// `ipc`: the requester is on this node and can import device memory
    /// of this domain: device values may come as IPC descriptors instead of
    /// their bytes (docs/protocol.md "Device frames"). `direct`: the
    /// requester's connection carries device payloads of this kind (UCX
    /// with that memory in its build) and its device is of this kind: device
    /// values may come as one device frame per array instead of staging
    /// chunks.
    Fetch { request_id: u64, tasks: Vec<TaskId>, ipc: Option<IpcOffer>, direct: Option<MemoryKind> },
    /// The requester has copied what request `request_id`'s answer shared
    /// through IPC: the holder may let go of it.
    Release { request_id: u64 },
}

/// Memory a device frame's payload lives in (`transport::device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug, PartialEq))]
#[repr(u8)]
pub enum MemoryKind {
    /// Host memory: the stand-in device's, or a payload that landed on the
    /// host because the device had no room.
    Host = 0,
    /// CUDA device memory.
    Cuda = 1,
}

impl MemoryKind {
    /// The kind with this code (`kind as u8`), if any.
    pub fn from_code(code: u8) -> Option<MemoryKind> {
        match code {
            0 => Some(MemoryKind::Host),
            1 => Some(MemoryKind::Cuda),
            _ => None,
        }
    }
}

/// Where a requester can import device memory from.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct IpcOffer {
    /// `Device::ipc_domain` of the requester's device (node and kind).
    pub domain: String,
    /// The requester's process (a process does not import from itself).
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum FromPeerMessage {
    /// Items for the requested tasks, in request order. A large answer
    /// comes as several messages: all but the last say `more`, and the
    /// requester joins their items (so neither end holds the whole answer in
    /// one frame, and the server reads spilled values as the socket drains).
    Data { request_id: u64, items: Vec<DataItem>, more: bool },
}

/// A value sent as `count` consecutive data frames starting at `first`
/// (a serialiser may split one value into several buffers, e.g. pickle 5).
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct DataItem {
    pub id: TaskId,
    /// False when the value is not (or no longer) stored here.
    pub found: bool,
    pub first: u32,
    pub count: u32,
    /// Set when the holder has the value but cannot serialise it (a Python
    /// object that cannot be pickled): the reason, and then `count` is 0 or
    /// 1 and that frame, if any, is the executor's error payload (the
    /// pickled exception).
    pub error: Option<String>,
    /// The value's frames continue in the next item, which names the same
    /// task and comes first in the next message of this answer (a device
    /// value sent in staging chunks as they are copied off the device); the
    /// requester joins them.
    pub partial: bool,
}

// ---------------------------------------------------------------- encode / access

/// A message type that travels as the control part of a frame.
pub trait WireMessage: Sized {
    type Archived;
    /// Archives the message. Infallible for these types (no shared pointers,
    /// no fallible serialisers), so an error here is a bug.
    fn encode(&self) -> AlignedVec;
    /// Validates `bytes` and returns a view of the archive without copying.
    fn access(bytes: &[u8]) -> Result<&Self::Archived, TransportError>;
    /// Validates and deserialises into an owned value (cold paths, tests).
    fn decode(bytes: &[u8]) -> Result<Self, TransportError>;
}

macro_rules! wire_message {
    ($($ty:ident => $archived:ident),* $(,)?) => {$(
        impl WireMessage for $ty {
            type Archived = $archived;
            fn encode(&self) -> AlignedVec {
                rkyv::to_bytes::<rancor::Error>(self).expect("archiving a protocol message cannot fail")
            }
            fn access(bytes: &[u8]) -> Result<&$archived, TransportError> {
                rkyv::access::<$archived, rancor::Error>(bytes).map_err(|e| {
                    TransportError::Invalid(format!(concat!("bad ", stringify!($ty), ": {}"), e))
                })
            }
            fn decode(bytes: &[u8]) -> Result<Self, TransportError> {
                let archived = Self::access(bytes)?;
                rkyv::deserialize::<$ty, rancor::Error>(archived)
                    .map_err(|e| TransportError::Invalid(e.to_string()))
            }
        }
    )*};
}

wire_message!(
    FromClientMessage => ArchivedFromClientMessage,
    ToClientMessage => ArchivedToClientMessage,
    FromWorkerMessage => ArchivedFromWorkerMessage,
    ToWorkerMessage => ArchivedToWorkerMessage,
    ToPeerMessage => ArchivedToPeerMessage,
    FromPeerMessage => ArchivedFromPeerMessage,
);
