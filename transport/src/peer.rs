//! Fetching values from a worker: used by workers (inputs held elsewhere) and
//! clients (gather). One connection per peer address, shared by concurrent
//! requests and matched by request id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{oneshot, OnceCell};

use crate::backend::{connect, FrameSender};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, Limits};
use crate::handshake::{handshake_connect, Role};
use crate::protocol::{ArchivedFromPeerMessage, FromPeerMessage, ToPeerMessage, WireMessage};
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
    tx: oneshot::Sender<Result<Vec<Fetched>>>,
    so_far: Vec<Fetched>,
    /// The last item's value continues in the next item (`DataItem::partial`).
    open: bool,
}

/// Takes the parts of a value sent in parts (a device value, staging chunk
/// by staging chunk) as they arrive, instead of joining their frames in host
/// memory: the Python extension copies each chunk into device memory.
pub trait PartSink: Send + Sync {
    /// A value's first part (its head frames); `None` leaves the value to
    /// be joined in host memory.
    fn begin(&self, head: &[Bytes]) -> Option<Box<dyn PartReceiver>>;
}

/// One value arriving in parts.
pub trait PartReceiver: Send {
    /// The frames of the next part.
    fn push(&mut self, frames: &[Bytes]) -> std::result::Result<(), String>;
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
        tokio::spawn(async move {
            // Values arriving in parts, by request (only this task sees them).
            let mut parts: HashMap<u64, Box<dyn PartReceiver>> = HashMap::new();
            let err = loop {
                match receiver.recv().await {
                    Ok(Some(frame)) => {
                        if let Err(e) = dispatch(&reader_pending, &mut parts, frame) {
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
        Ok(PeerConnection { sender: conn.sender, pending, next_id: AtomicU64::new(1), address: address.to_string() })
    }

    pub fn is_closed(&self) -> bool {
        self.pending.lock().unwrap().is_none() || self.sender.is_closed()
    }

    /// Asks the peer for `tasks`; the answer lists them in the same order.
    pub async fn fetch(&self, tasks: Vec<TaskId>) -> Result<Vec<Fetched>> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap().as_mut() {
            Some(map) => map.insert(request_id, Waiting { tx, so_far: Vec::new(), open: false }),
            None => return Err(TransportError::Closed),
        };
        self.sender.send(Frame::from_message(&ToPeerMessage::Fetch { request_id, tasks }))?;
        rx.await.map_err(|_| TransportError::Closed)?
    }
}

fn dispatch(pending: &Pending, parts: &mut HashMap<u64, Box<dyn PartReceiver>>, frame: Frame) -> Result<()> {
    let msg = FromPeerMessage::access(&frame.control)?;
    let ArchivedFromPeerMessage::Data { request_id, items, more } = msg;
    let mut out = Vec::with_capacity(items.len());
    let mut any_partial = false;
    for item in items.iter() {
        any_partial |= item.partial;
        if !item.found {
            out.push((item.id.get(), FetchedValue::Missing));
            continue;
        }
        let first = item.first.to_native() as usize;
        let count = item.count.to_native() as usize;
        let frames = first
            .checked_add(count)
            .and_then(|end| frame.data.get(first..end))
            .ok_or_else(|| TransportError::Invalid(format!("data item names frames {first}..+{count} of {}", frame.data.len())))?;
        let value = match item.error.as_ref() {
            None => FetchedValue::Value(frames.iter().cloned().collect()),
            Some(message) => FetchedValue::Unserializable {
                message: message.to_string(),
                payload: frames.first().cloned().unwrap_or_default(),
            },
        };
        out.push((item.id.get(), value));
    }
    let mut guard = pending.lock().unwrap();
    let Some(map) = guard.as_mut() else { return Ok(()) };
    let id = request_id.to_native();
    let Some(w) = map.get_mut(&id) else { return Ok(()) };
    if w.so_far.is_empty() && !*more && !any_partial {
        // The whole answer in one message (the common case): no joining.
        let w = map.remove(&id).expect("present");
        drop(guard);
        let _ = w.tx.send(Ok(out));
        return Ok(());
    }
    for ((task, value), partial) in out.into_iter().zip(items.iter().map(|i| i.partial)) {
        let joined = w.open && w.so_far.last().is_some_and(|(t, _)| *t == task);
        if !joined {
            if let (true, FetchedValue::Value(head), Some(sink)) = (partial, &value, PART_SINK.get()) {
                if let Some(r) = sink.begin(head) {
                    parts.insert(id, r);
                }
            }
            w.so_far.push((task, value));
        } else {
            let last = &mut w.so_far.last_mut().expect("checked").1;
            match (last, value, parts.get_mut(&id)) {
                (last @ FetchedValue::Value(_), FetchedValue::Value(more), Some(r)) => {
                    // Into the sink as it arrives; the head stays as it was.
                    if let Err(e) = r.push(&more) {
                        parts.remove(&id);
                        *last = FetchedValue::Unserializable { message: format!("receiving a value in parts: {e}"), payload: Bytes::new() };
                    }
                }
                (FetchedValue::Value(frames), FetchedValue::Value(more), None) => frames.extend(more),
                // A value that failed half-way (its copy off a device) is that failure.
                (last, other, _) => {
                    parts.remove(&id);
                    *last = other;
                }
            }
        }
        if !partial {
            if let Some(r) = parts.remove(&id) {
                let last = &mut w.so_far.last_mut().expect("an item was just added or joined").1;
                if matches!(last, FetchedValue::Value(_)) {
                    *last = match r.finish() {
                        Ok(frames) => FetchedValue::Value(frames),
                        Err(e) => FetchedValue::Unserializable { message: format!("receiving a value in parts: {e}"), payload: Bytes::new() },
                    };
                }
            }
        }
        w.open = partial;
    }
    if !*more {
        let w = map.remove(&id).expect("present");
        drop(guard);
        parts.remove(&id);
        if w.open {
            let _ = w.tx.send(Err(TransportError::Invalid("an answer ended inside a value sent in parts".into())));
        } else {
            let _ = w.tx.send(Ok(w.so_far));
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
