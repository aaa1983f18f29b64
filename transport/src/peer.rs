//! Fetching values from a worker: used by workers (inputs held elsewhere) and
//! clients (gather). One connection per peer address, shared by concurrent
//! requests and matched by request id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{oneshot, OnceCell};

use crate::backend::{connect, FrameSender};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, Limits};
use crate::handshake::{handshake_connect, Role};
use crate::device::{DevicePayload, MemoryKind};
use crate::protocol::{ArchivedFromPeerMessage, FromPeerMessage, IpcOffer, ToPeerMessage, WireMessage};
use crate::TaskId;

/// The frames of one value; most values are one frame, kept inline.
pub type Frames = smallvec::SmallVec<[Bytes; 1]>;

/// What a peer answered for one requested task.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchedValue {
    Value(Frames),
    /// The peer does not (or no longer) hold it.
    Missing,
    /// The peer holds it but cannot serialise it: a message and the
    /// executor's error payload (may be empty).
    Unserializable { message: String, payload: Bytes },
}

pub type Fetched = (TaskId, FetchedValue);

/// Requests waiting for their answer, with the items of the answer's parts
/// that arrived so far.
type Pending = Arc<Mutex<Option<HashMap<u64, Waiting>>>>;

struct Waiting {
    tx: oneshot::Sender<Result<Answer>>,
    so_far: Vec<Fetched>,
    /// Some value of the answer came in parts.
    parts: bool,
}

/// An answer's values, and whether some came in parts.
type Answer = (Vec<Fetched>, bool);

/// In the error of a value whose device memory could not be imported from
/// its holder (`PartReceiver::push`): the requester then fetches it again
/// without offering IPC.
pub const IPC_IMPORT_FAILED: &str = "importing device memory from the holder failed";

/// Follows [`IPC_IMPORT_FAILED`] when the failure concerns that value only
/// (its memory is mapped in this process already, by UCX's CUDA IPC say):
/// the value is fetched again without IPC, but later ones are offered it.
pub const IPC_IMPORT_FAILED_ONCE: &str = "(this value only)";

/// Values of one connection that may fail to import "this value only"
/// before the connection makes no more offers.
const IPC_ONCE_LIMIT: u32 = 3;

/// Takes the parts of a value sent in parts (a device value, staging chunk
/// by staging chunk) as they arrive, instead of joining their frames in host
/// memory: the Python extension copies each chunk into device memory.
pub trait PartSink: Send + Sync {
    /// A value's first part (its head frames); `None` leaves the value to
    /// be joined in host memory.
    fn begin(&self, head: &[Bytes]) -> Option<Box<dyn PartReceiver>>;
    /// Offered with every request: this process can import device memory
    /// that a holder of the same domain shares (its parts are then IPC
    /// descriptors, which the receiver imports as they arrive).
    fn ipc_offer(&self) -> Option<IpcOffer> {
        None
    }
    /// Offered with every request on a connection that carries device
    /// payloads of this kind: this process's device memory is of this kind
    /// (a holder of the same kind then sends each array as one device frame,
    /// which the transport receives into this process's device memory).
    fn direct_kind(&self) -> Option<MemoryKind> {
        None
    }
}

/// One value arriving in parts.
pub trait PartReceiver: Send {
    /// The frames of the next part.
    fn push(&mut self, frames: &[Bytes]) -> std::result::Result<(), String>;
    /// The next part as a device payload (one array of the value, received
    /// into this process's device memory, or into host memory when the
    /// device had no room).
    fn push_device(&mut self, payload: DevicePayload) -> std::result::Result<(), String> {
        Err(format!("cannot take a device payload ({payload:?})"))
    }
    /// The value's frames, once every part arrived.
    fn finish(self: Box<Self>) -> std::result::Result<Frames, String>;
}

static PART_SINK: std::sync::OnceLock<Arc<dyn PartSink>> = std::sync::OnceLock::new();

/// Sets this process's part sink (once; later calls change nothing).
pub fn set_part_sink(sink: Arc<dyn PartSink>) {
    let _ = PART_SINK.set(sink);
}

pub struct PeerConnection {
    sender: FrameSender,
    pending: Pending,
    next_id: AtomicU64,
    /// An import from this peer failed: no more IPC offers to it.
    ipc_off: AtomicBool,
    /// Imports that failed for one value only (`IPC_IMPORT_FAILED_ONCE`).
    ipc_once: std::sync::atomic::AtomicU32,
    pub address: String,
}

impl PeerConnection {
    pub async fn connect(address: &str, token: Option<&str>, limits: Limits) -> Result<PeerConnection> {
        let mut conn = connect(address, limits).await?;
        handshake_connect(&mut conn, Role::Peer, token).await?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader_pending = pending.clone();
        let mut receiver = conn.receiver;
        let addr = address.to_string();
        let release = conn.sender.downgrade();
        tokio::spawn(async move {
            // Values arriving in parts, by request (only this task sees them).
            let mut opens: HashMap<u64, Open> = HashMap::new();
            let err = loop {
                match receiver.recv().await {
                    Ok(Some(frame)) => {
                        if let Err(e) = dispatch(&reader_pending, &mut opens, frame, &release) {
                            break e;
                        }
                    }
                    Ok(None) => break TransportError::Closed,
                    Err(e) => break e,
                }
            };
            tracing::debug!(peer = %addr, "peer connection ended: {err}");
            // Fail everything still waiting, and refuse new requests.
            if let Some(map) = reader_pending.lock().unwrap().take() {
                for (_, w) in map {
                    let _ = w.tx.send(Err(TransportError::Closed));
                }
            }
        });
        Ok(PeerConnection { sender: conn.sender, pending, next_id: AtomicU64::new(1), ipc_off: AtomicBool::new(false), ipc_once: Default::default(), address: address.to_string() })
    }

    pub fn is_closed(&self) -> bool {
        self.pending.lock().unwrap().is_none() || self.sender.is_closed()
    }

    /// Asks the peer for `tasks`; the answer lists them in the same order.
    pub async fn fetch(&self, tasks: Vec<TaskId>) -> Result<Vec<Fetched>> {
        let offer = if self.ipc_off.load(Ordering::Relaxed) { None } else { PART_SINK.get().and_then(|s| s.ipc_offer()) };
        let offered = offer.is_some();
        let direct = PART_SINK.get().and_then(|s| s.direct_kind()).filter(|k| self.sender.carries(*k));
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (mut out, parts) = self.request(request_id, tasks, offer, direct).await?;
        if !(offered && parts) {
            return Ok(out);
        }
        let failed: Vec<usize> = (0..out.len())
            .filter(|&i| matches!(&out[i].1, FetchedValue::Unserializable { message, .. } if message.contains(IPC_IMPORT_FAILED)))
            .collect();
        if failed.is_empty() {
            return Ok(out);
        }
        let lasting = failed.iter().find_map(|&i| match &out[i].1 {
            FetchedValue::Unserializable { message, .. } if !message.contains(IPC_IMPORT_FAILED_ONCE) => Some(message.clone()),
            _ => None,
        });
        // Failures of one value only, again and again (a pool block that
        // UCX keeps mapped), end offers too.
        let lasting = lasting.or_else(|| {
            let times = self.ipc_once.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(peer = %self.address, times, "a device value's memory could not be imported this time; fetching it over the network");
            (times >= IPC_ONCE_LIMIT).then(|| format!("{IPC_IMPORT_FAILED} {IPC_ONCE_LIMIT} times"))
        });
        if let Some(message) = lasting {
            if !self.ipc_off.swap(true, Ordering::Relaxed) {
                tracing::warn!(peer = %self.address, "{message}; device values from this peer come over the network from now on");
            }
        }
        let again_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (again, _) = self.request(again_id, failed.iter().map(|&i| out[i].0).collect(), None, direct).await?;
        for (i, fetched) in failed.into_iter().zip(again) {
            out[i] = fetched;
        }
        Ok(out)
    }

    async fn request(&self, request_id: u64, tasks: Vec<TaskId>, ipc: Option<IpcOffer>, direct: Option<MemoryKind>) -> Result<Answer> {
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(map) => map.insert(request_id, Waiting { tx, so_far: Vec::new(), parts: false }),
            None => return Err(TransportError::Closed),
        };
        self.sender.send(Frame::from_message(&ToPeerMessage::Fetch { request_id, tasks, ipc, direct }))?;
        rx.await.map_err(|_| TransportError::Closed)?
    }
}

/// A value of a request that is arriving in parts (only the connection's
/// reader sees these).
struct Open {
    task: TaskId,
    /// Where its parts go as they arrive; `None`: joined in host memory.
    sink: Option<Box<dyn PartReceiver>>,
    /// It failed already: later parts are dropped.
    failed: bool,
}

/// What an item does to the answer being gathered.
enum Step {
    New(Fetched),
    /// More frames of the last value.
    Extend(Frames),
    /// The last value is now this (finished by its sink, or failed).
    Replace(FetchedValue),
    /// Taken by the sink; nothing changes in the answer yet.
    Nothing,
}

fn receive_error(e: String) -> FetchedValue {
    FetchedValue::Unserializable { message: format!("receiving a value in parts: {e}"), payload: Bytes::new() }
}

/// Tells the holder that request `id`'s answer, which came in parts, is
/// in: what it shared by IPC has been copied (the parts' receivers import as
/// they go), so it may let go of it. Sent by the reader, so it also happens
/// when the fetch that asked was dropped or timed out meanwhile; a holder
/// that shared nothing for the request ignores it.
fn send_release(release: &crate::backend::WeakFrameSender, id: u64) {
    if let Some(sender) = release.upgrade() {
        let _ = sender.send(Frame::from_message(&ToPeerMessage::Release { request_id: id }));
    }
}

fn dispatch(pending: &Pending, opens: &mut HashMap<u64, Open>, frame: Frame, release: &crate::backend::WeakFrameSender) -> Result<()> {
    let msg = FromPeerMessage::access(&frame.control)?;
    let ArchivedFromPeerMessage::Data { request_id, items, more } = msg;
    let id = request_id.to_native();
    let mut steps = Vec::with_capacity(items.len());
    let mut joining = opens.contains_key(&id);
    // A device payload is one part of a value sent in parts, alone in its frame.
    let mut device = frame.device.clone();
    if device.is_some() && (items.len() != 1 || !frame.data.is_empty()) {
        return Err(TransportError::Invalid(format!("a device frame with {} items and {} data frames (one item, no frames expected)", items.len(), frame.data.len())));
    }
    for item in items.iter() {
        let task = item.id.get();
        let value = if !item.found {
            FetchedValue::Missing
        } else {
            let first = item.first.to_native() as usize;
            let count = item.count.to_native() as usize;
            let frames = first
                .checked_add(count)
                .and_then(|end| frame.data.get(first..end))
                .ok_or_else(|| TransportError::Invalid(format!("data item names frames {first}..+{count} of {}", frame.data.len())))?;
            match item.error.as_ref() {
                None => FetchedValue::Value(frames.iter().cloned().collect()),
                Some(message) => FetchedValue::Unserializable {
                    message: message.to_string(),
                    payload: frames.first().cloned().unwrap_or_default(),
                },
            }
        };
        // Parts go to their sink here, outside the lock: a copy into device
        // memory must not hold up the requests waiting on this connection.
        let Some(open) = opens.get_mut(&id) else {
            if device.is_some() {
                return Err(TransportError::Invalid(format!("a device payload for task {task} outside a value sent in parts")));
            }
            if item.partial {
                let sink = match (&value, PART_SINK.get()) {
                    (FetchedValue::Value(head), Some(sink)) => sink.begin(head),
                    _ => None,
                };
                let failed = !matches!(value, FetchedValue::Value(_));
                opens.insert(id, Open { task, sink, failed });
                joining = true;
            }
            steps.push(Step::New((task, value)));
            continue;
        };
        if open.task != task {
            return Err(TransportError::Invalid(format!("the parts of task {} were interrupted by task {task}", open.task)));
        }
        let step = match (value, open.failed) {
            (FetchedValue::Value(_), true) => Step::Nothing,
            (FetchedValue::Value(frames), false) => {
                let pushed = match (&mut open.sink, device.take()) {
                    (Some(r), Some(payload)) => r.push_device(payload).map(|()| Step::Nothing),
                    (Some(r), None) => r.push(&frames).map(|()| Step::Nothing),
                    // Joined in host memory: a host payload is one more frame.
                    (None, Some(payload)) => payload.into_host_bytes().map(|b| Step::Extend(std::iter::once(b).collect())).ok_or_else(|| "device memory arrived for a value this process cannot place on a device".to_string()),
                    (None, None) => Ok(Step::Extend(frames)),
                };
                pushed.unwrap_or_else(|e| {
                    (open.sink, open.failed) = (None, true);
                    Step::Replace(receive_error(e))
                })
            }
            (_, _) if device.is_some() => {
                return Err(TransportError::Invalid(format!("a device payload for task {task}, which is not a value")));
            }
            // A value that failed half-way (its copy off a device) is that failure.
            (other, _) => {
                (open.sink, open.failed) = (None, true);
                Step::Replace(other)
            }
        };
        steps.push(step);
        if !item.partial {
            let open = opens.remove(&id).expect("present");
            if let (Some(r), false) = (open.sink, open.failed) {
                steps.push(Step::Replace(r.finish().map(FetchedValue::Value).unwrap_or_else(receive_error)));
            }
        }
    }
    let mut guard = pending.lock().unwrap();
    let Some(map) = guard.as_mut() else { return Ok(()) };
    let Some(w) = map.get_mut(&id) else {
        opens.remove(&id);
        return Ok(());
    };
    if w.so_far.is_empty() && !*more && !joining {
        // The whole answer in one message (the common case): no joining.
        let w = map.remove(&id).expect("present");
        drop(guard);
        let out = steps.into_iter().map(|s| if let Step::New(f) = s { f } else { unreachable!("no parts") }).collect();
        let _ = w.tx.send(Ok((out, false)));
        return Ok(());
    }
    w.parts |= joining;
    for step in steps {
        match step {
            Step::New(f) => w.so_far.push(f),
            Step::Extend(more) => {
                if let Some((_, FetchedValue::Value(frames))) = w.so_far.last_mut() {
                    frames.extend(more);
                }
            }
            Step::Replace(v) => {
                if let Some((_, last)) = w.so_far.last_mut() {
                    *last = v;
                }
            }
            Step::Nothing => {}
        }
    }
    if !*more {
        let w = map.remove(&id).expect("present");
        drop(guard);
        if w.parts {
            send_release(release, id);
        }
        if opens.remove(&id).is_some() {
            let _ = w.tx.send(Err(TransportError::Invalid("an answer ended inside a value sent in parts".into())));
        } else {
            let _ = w.tx.send(Ok((w.so_far, w.parts)));
        }
    }
    Ok(())
}

/// Connections to peers by address, opened on first use and reopened after
/// they break.
#[derive(Default)]
pub struct PeerPool {
    links: Mutex<HashMap<String, Arc<OnceCell<PeerConnection>>>>,
    token: Option<String>,
    limits: Limits,
}

impl PeerPool {
    pub fn new(token: Option<String>, limits: Limits) -> Self {
        PeerPool { links: Default::default(), token, limits }
    }

    /// The pool every worker of this process uses (one per token). Sharing
    /// matters when a process hosts many workers: each peer address gets one
    /// connection per process instead of one per worker, which keeps a
    /// thousand in-process workers within the open-file limit.
    pub fn shared(token: Option<String>) -> Arc<PeerPool> {
        static POOLS: std::sync::OnceLock<Mutex<HashMap<Option<String>, Arc<PeerPool>>>> = std::sync::OnceLock::new();
        let pools = POOLS.get_or_init(Default::default);
        pools.lock().unwrap().entry(token.clone()).or_insert_with(|| Arc::new(PeerPool::new(token, Limits::default()))).clone()
    }

    pub async fn fetch(&self, address: &str, tasks: Vec<TaskId>) -> Result<Vec<Fetched>> {
        let cell = {
            let mut links = self.links.lock().unwrap();
            let cell = links.entry(address.to_string()).or_default();
            if cell.get().is_some_and(|c| c.is_closed()) {
                *cell = Arc::default();
            }
            cell.clone()
        };
        let conn = cell.get_or_try_init(|| PeerConnection::connect(address, self.token.as_deref(), self.limits)).await;
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                self.links.lock().unwrap().remove(address);
                return Err(e);
            }
        };
        conn.fetch(tasks).await
    }
}
