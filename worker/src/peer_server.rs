//! Serves this worker's values to peers and clients.

use std::sync::Arc;

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_accept, HandshakeGate, Role};
use rdask_transport::device::MemoryKind;
use rdask_transport::warn_limit::WarnLimiter;
use rdask_transport::protocol::{ArchivedToPeerMessage, DataItem, FromPeerMessage, IpcOffer, ToPeerMessage, WireMessage};
use rdask_transport::{Connection, Frame, Listener};

use crate::executor::Part;
use crate::store::{read_spilled, Serve, Store};

/// Accepts peers until dropped or aborted. Connection tasks live in a
/// `JoinSet` owned by this future, so stopping the server also stops every
/// connection it serves (a stopped worker must not keep serving values).
/// `sent` counts the value bytes served (for the heartbeat's transfer rate).
pub async fn serve_peers(mut listener: Listener, store: Arc<Store>, token: Option<String>, sent: Arc<std::sync::atomic::AtomicU64>) {
    let token = Arc::new(token);
    let gate = HandshakeGate::default();
    let mut connections = tokio::task::JoinSet::new();
    while let Some(conn) = listener.accept().await {
        // Reap finished connection tasks so the set does not grow forever.
        while connections.try_join_next().is_some() {}
        let Some(permit) = gate.try_enter() else {
            if let Some(held_back) = PEER_WARNINGS.allow() {
                tracing::warn!(peer = %conn.peer, held_back, "too many peer connections in the handshake; closing this one");
            }
            continue;
        };
        let store = store.clone();
        let token = token.clone();
        let sent = sent.clone();
        connections.spawn(async move {
            let peer = conn.peer.clone();
            if let Err(e) = serve_one(conn, store, token.as_deref(), permit, sent).await {
                tracing::debug!(%peer, "peer connection ended: {e}");
            }
        });
    }
}

/// An answer is cut into messages of about this many value bytes.
const REPLY_CHUNK: u64 = 32 << 20;

/// Values at least this large count against the budget.
const BUDGET_FROM: u64 = 1 << 20;

/// Value bytes one peer connection may have queued for sending at once
/// (per connection: a peer that stops reading holds up only itself). A permit travels with the frames and is returned when
/// the transport has written and dropped them: serving twenty spilled 100 MB
/// values reads them from disk as the socket drains, instead of mapping all
/// of them at once (which would count against the worker's memory).
pub struct SendBudget {
    units: Arc<tokio::sync::Semaphore>,
    total: u32,
}

/// Permits count KiB, so a u32 covers any budget.
const UNIT: u64 = 1024;

impl SendBudget {
    pub fn new(bytes: u64) -> SendBudget {
        let total = (bytes / UNIT).clamp(1, u32::MAX as u64 >> 4) as u32;
        SendBudget { units: Arc::new(tokio::sync::Semaphore::new(total as usize)), total }
    }

    /// Waits until `bytes` (at most the whole budget: a value larger than it
    /// goes alone) may be queued.
    async fn take(&self, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
        let units = bytes.div_ceil(UNIT).min(self.total as u64) as u32;
        self.units.clone().acquire_many_owned(units).await.expect("the budget is never closed")
    }

    /// Ties the permit to the frames: it is released when the last of them is dropped.
    fn attach(frames: crate::executor::Frames, permit: tokio::sync::OwnedSemaphorePermit) -> Vec<Bytes> {
        let permit = Arc::new(permit);
        frames.into_iter().map(|f| Bytes::from_owner(Budgeted { data: f, _permit: permit.clone() })).collect()
    }
}

struct Budgeted {
    data: Bytes,
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

static PEER_WARNINGS: WarnLimiter = WarnLimiter::new(std::time::Duration::from_secs(5));

async fn serve_one(
    mut conn: Connection,
    store: Arc<Store>,
    token: Option<&str>,
    permit: tokio::sync::OwnedSemaphorePermit,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> rdask_transport::Result<()> {
    handshake_accept(&mut conn, &[Role::Peer], token).await?;
    drop(permit);
    // A requester that goes away without releasing what it was shown: its
    // device memory is let go of when the table is dropped (also when this
    // task is aborted).
    let shared = Arc::new(std::sync::Mutex::new(Shared::default()));
    // What a requester never released is let go of after a while, even on
    // a connection where nothing else arrives.
    let sweeper = {
        let (shared, peer) = (Arc::downgrade(&shared), conn.peer.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SHARED_AT_MOST / 10).await;
                let Some(shared) = shared.upgrade() else { return };
                shared.lock().unwrap().expire(&peer);
            }
        })
    };
    let result = serve_requests(&mut conn, &store, &sent, &shared).await;
    sweeper.abort();
    result
}

/// Device memory shared with this connection's requester through IPC, by
/// request, until it says it copied it (`ToPeerMessage::Release`).
#[derive(Default)]
struct Shared(std::collections::HashMap<u64, (std::time::Instant, Vec<Box<dyn crate::executor::ChunkSource>>)>);

/// A requester that has not released shared memory after this long is not
/// going to: the memory is let go of.
const SHARED_AT_MOST: std::time::Duration = std::time::Duration::from_secs(300);

impl Drop for Shared {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        // Dropping the sources may take an interpreter lock: not on an
        // event loop (which may be shutting down: a plain thread).
        let sources = std::mem::take(&mut self.0);
        let _ = std::thread::Builder::new().name("rdask-release".into()).spawn(move || drop(sources));
    }
}

impl Shared {
    fn release(&mut self, request_id: u64) {
        if let Some((_, sources)) = self.0.remove(&request_id) {
            tokio::task::spawn_blocking(move || drop(sources));
        }
    }

    fn expire(&mut self, peer: &str) {
        let old: Vec<u64> = self.0.iter().filter(|(_, (since, _))| since.elapsed() > SHARED_AT_MOST).map(|(id, _)| *id).collect();
        for id in old {
            tracing::warn!(%peer, request = id, "a requester never released device memory shared with it; letting go of it");
            self.release(id);
        }
    }
}

async fn serve_requests(
    conn: &mut Connection,
    store: &Arc<Store>,
    sent: &Arc<std::sync::atomic::AtomicU64>,
    shared: &std::sync::Mutex<Shared>,
) -> rdask_transport::Result<()> {
    let budget = SendBudget::new(128 << 20);
    while let Some(frame) = conn.receiver.recv().await? {
        let (request_id, tasks, ipc, direct) = match ToPeerMessage::access(&frame.control)? {
            ArchivedToPeerMessage::Fetch { request_id, tasks, ipc, direct } => {
                let ipc = ipc.as_ref().map(|o| IpcOffer { domain: o.domain.to_string(), pid: o.pid.to_native() });
                // Device payloads only where this side's transport carries them too.
                let direct = direct.as_ref().map(|k| match k {
                    rdask_transport::protocol::ArchivedMemoryKind::Host => MemoryKind::Host,
                    rdask_transport::protocol::ArchivedMemoryKind::Cuda => MemoryKind::Cuda,
                });
                (request_id.to_native(), tasks, ipc, direct.filter(|k| conn.sender.carries(*k)))
            }
            ArchivedToPeerMessage::Release { request_id } => {
                shared.lock().unwrap().release(request_id.to_native());
                continue;
            }
        };
        let mut items = Vec::with_capacity(tasks.len());
        let mut data: Vec<Bytes> = Vec::with_capacity(tasks.len());
        let mut chunk_bytes = 0u64;
        let held = store.hold_many(tasks.iter().map(|t| t.get()));
        // Pickling a large Python object, say, would stall this event loop
        // (and the worker's heartbeats with it).
        let served = if Store::serving_may_block(&held) {
            tokio::task::spawn_blocking(move || Store::serve_held(held, ipc.as_ref(), direct)).await.expect("serialising does not panic")
        } else {
            Store::serve_held(held, ipc.as_ref(), direct)
        };
        for (n, (t, value)) in tasks.iter().zip(served).enumerate() {
            let id = t.get();
            // A spilled value is read from disk only when the budget lets it
            // go out; a large in-memory one waits its turn the same way.
            let mut permit = None;
            let value = match value {
                Some(Serve::Staged(staged)) => {
                    // What came before goes first: answers keep the request's order.
                    send_part(&conn.sender, request_id, &mut items, &mut data, &mut chunk_bytes, sent)?;
                    let keep = staged.shared;
                    let (bytes, source) = send_staged(&conn.sender, request_id, id, staged).await?;
                    sent.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    if keep {
                        shared.lock().unwrap().0.entry(request_id).or_insert_with(|| (std::time::Instant::now(), Vec::new())).1.push(source);
                    } else {
                        // Letting go of the source may take an interpreter
                        // lock (it keeps the arrays alive): not on this event loop.
                        tokio::task::spawn_blocking(move || drop(source));
                    }
                    continue;
                }
                Some(Serve::Disk(disk)) => {
                    permit = Some(budget.take(disk.bytes).await);
                    Some(read_spilled(&disk))
                }
                Some(Serve::Frames(f)) => Some(f),
                None => None,
            };
            let first = data.len() as u32;
            let frames = match value {
                Some(Ok(frames)) => frames,
                Some(Err(e)) => {
                    // The requester fails the tasks that needed it with this
                    // error; the value itself stays (another reader may be a
                    // task on this worker, which needs no serialising).
                    tracing::warn!(task = %id, "cannot serialise value for a peer: {}", e.message);
                    let count = u32::from(!e.payload.is_empty());
                    if count == 1 {
                        data.push(e.payload);
                    }
                    items.push(DataItem { id, found: true, first, count, error: Some(e.message), partial: false });
                    continue;
                }
                None => {
                    items.push(DataItem { id, found: false, first: 0, count: 0, error: None, partial: false });
                    continue;
                }
            };
            let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
            if permit.is_none() && bytes >= BUDGET_FROM {
                permit = Some(budget.take(bytes).await);
            }
            items.push(DataItem { id, found: true, first, count: frames.len() as u32, error: None, partial: false });
            match permit {
                Some(p) => data.extend(SendBudget::attach(frames, p)),
                None => data.extend(frames),
            }
            chunk_bytes += bytes;
            if chunk_bytes >= REPLY_CHUNK && n + 1 < tasks.len() {
                send_part(&conn.sender, request_id, &mut items, &mut data, &mut chunk_bytes, sent)?;
            }
        }
        let reply = FromPeerMessage::Data { request_id, items, more: false };
        sent.fetch_add(chunk_bytes, std::sync::atomic::Ordering::Relaxed);
        conn.sender.send(Frame::with_data(&reply, data))?;
    }
    Ok(())
}

/// Sends the items gathered so far (if any) as a part of the answer
/// (`more`), and counts their bytes as sent.
fn send_part(
    sender: &rdask_transport::FrameSender,
    request_id: u64,
    items: &mut Vec<DataItem>,
    data: &mut Vec<Bytes>,
    bytes: &mut u64,
    sent: &std::sync::atomic::AtomicU64,
) -> rdask_transport::Result<()> {
    sent.fetch_add(std::mem::take(bytes), std::sync::atomic::Ordering::Relaxed);
    if items.is_empty() {
        return Ok(());
    }
    let reply = FromPeerMessage::Data { request_id, items: std::mem::take(items), more: true };
    sender.send(Frame::with_data(&reply, std::mem::take(data)))
}

/// Sends a device value as it is copied off the device: its first frames,
/// then one message per staging chunk (each chunk's buffer goes back to its
/// pool when the transport has written it, which is what paces the copies),
/// then a closing item. Every message has `more` set; the answer's last
/// message closes the request. A copy that fails closes the value with the
/// error instead. Returns the bytes sent and the source (which keeps the
/// value's arrays alive).
async fn send_staged(
    sender: &rdask_transport::FrameSender,
    request_id: u64,
    id: rdask_transport::TaskId,
    staged: crate::executor::Staged,
) -> rdask_transport::Result<(u64, Box<dyn crate::executor::ChunkSource>)> {
    let crate::executor::Staged { head, mut chunks, .. } = staged;
    let item = |count: usize, partial: bool, error: Option<String>| DataItem { id, found: true, first: 0, count: count as u32, error, partial };
    let message = |item: DataItem| FromPeerMessage::Data { request_id, items: vec![item], more: true };
    let mut bytes: u64 = head.iter().map(|f| f.len() as u64).sum();
    sender.send(Frame::with_data(&message(item(head.len(), true, None)), head))?;
    loop {
        let (back, next) = tokio::task::spawn_blocking(move || {
            let next = chunks.next_part();
            (chunks, next)
        })
        .await
        .expect("a staging copy does not panic");
        chunks = back;
        match next {
            Ok(Some(Part::Bytes(chunk))) => {
                bytes += chunk.len() as u64;
                sender.send(Frame::with_data(&message(item(1, true, None)), vec![chunk]))?;
            }
            Ok(Some(Part::Device(payload))) => {
                // The payload's owner keeps the array alive until sent.
                bytes += payload.len() as u64;
                sender.send(Frame { device: Some(payload), ..Frame::from_message(&message(item(0, true, None))) })?;
            }
            Ok(None) => {
                sender.send(Frame::from_message(&message(item(0, false, None))))?;
                break;
            }
            Err(e) => {
                tracing::warn!(task = %id, "cannot copy a device value for a peer: {}", e.message);
                let payload: Vec<Bytes> = if e.payload.is_empty() { vec![] } else { vec![e.payload] };
                sender.send(Frame::with_data(&message(item(payload.len(), false, Some(e.message))), payload))?;
                break;
            }
        }
    }
    Ok((bytes, chunks))
}
