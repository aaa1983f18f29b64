//! The Rust client. Graphs go to the scheduler in batches (each batch only
//! depends on itself and earlier ones); results come straight from the
//! workers that hold them.

mod graph;
pub mod graphs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_connect, Role};
use rdask_transport::peer::{FetchedValue, PeerPool};
pub use rdask_transport::protocol::{ClusterInfo, StreamEvent};
use rdask_transport::protocol::{ArchivedToClientMessage, CoordOp, CoordOutcome, FromClientMessage, KeyLocation, ToClientMessage, NO_FRAME};
use rdask_transport::{ClientId, Frame, FrameSender, Limits, TransportError, WireMessage};
use thiserror::Error;
use tokio::sync::{oneshot, Notify};

pub use graph::TaskDef;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot connect to scheduler at {address}: {reason}")]
    Connect { address: String, reason: String },
    /// The scheduler refused our token.
    #[error("the scheduler at {address} refused this client's token: {reason}")]
    Unauthorized { address: String, reason: String },
    /// The scheduler answered but refused us (another protocol version).
    #[error("the scheduler at {address} refused the connection: {reason}")]
    Refused { address: String, reason: String },
    #[error("task {key} failed (raised in {failed_key}): {message}")]
    TaskFailed { key: String, failed_key: String, message: String, payload: Bytes },
    #[error("submission rejected by the scheduler: {0}")]
    Rejected(String),
    #[error("key {0} was cancelled")]
    Cancelled(String),
    #[error("key {0} is not in memory on any worker (unknown, released or not finished)")]
    MissingKey(String),
    #[error("the value of {key} exists but its worker cannot send it: {message}")]
    Unserializable { key: String, message: String, payload: Bytes },
    #[error("scheduler error: {0}")]
    Scheduler(String),
    #[error("connection to the scheduler was lost")]
    Disconnected,
}

/// What the client knows about a key it holds.
#[derive(Debug, Clone)]
pub enum KeyStatus {
    Pending,
    Done { size: u64 },
    Erred { failed_key: String, message: String, payload: Bytes },
    Cancelled,
    Rejected(String),
}

#[derive(Default)]
struct Shared {
    keys: HashMap<String, KeyStatus>,
    /// Keys of each submit batch not yet acknowledged.
    unacked: HashMap<u64, Vec<String>>,
    who_has: HashMap<u64, oneshot::Sender<(Vec<KeyLocation>, Vec<String>)>>,
    info: HashMap<u64, oneshot::Sender<ClusterInfo>>,
    stream: HashMap<u64, oneshot::Sender<Vec<StreamEvent>>>,
    coord: HashMap<u64, oneshot::Sender<(CoordOutcome, Vec<Bytes>)>>,
    processing: HashMap<u64, oneshot::Sender<Vec<(String, Vec<String>)>>>,
    dropped: HashMap<u64, oneshot::Sender<u64>>,
    host_calls: HashMap<u64, oneshot::Sender<(bool, String, Option<Bytes>)>>,
    errors: Vec<String>,
    disconnected: bool,
    /// Status changes of held keys, in arrival order, kept only once
    /// [`Client::enable_events`] was called (the Python client's futures are
    /// driven by them).
    events: Option<Vec<(String, KeyStatus)>>,
}

impl Shared {
    fn set(&mut self, key: &str, status: KeyStatus) {
        if let Some(s) = self.keys.get_mut(key) {
            *s = status.clone();
            if let Some(ev) = &mut self.events {
                ev.push((key.to_string(), status));
            }
        }
    }
}

pub struct Client {
    sender: FrameSender,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    next_id: AtomicU64,
    pool: PeerPool,
    pub id: ClientId,
    /// Most tasks per submit message (the first messages of a graph are
    /// smaller, so the scheduler can start early).
    pub batch_size: usize,
}

impl Client {
    /// Connects and completes the handshake, giving up after `timeout`.
    pub async fn connect(address: &str, token: Option<&str>, timeout: Duration) -> Result<Client, ClientError> {
        let fail = |reason: String| ClientError::Connect { address: address.to_string(), reason };
        let attempt = async {
            let mut conn = rdask_transport::connect(address, Limits::default()).await?;
            handshake_connect(&mut conn, Role::Client, token).await?;
            let welcome = conn.receiver.recv().await?.ok_or(TransportError::Closed)?;
            let id = match ToClientMessage::access(&welcome.control)? {
                ArchivedToClientMessage::Welcome { client_id, .. } => client_id.get(),
                _ => return Err(TransportError::Handshake("expected Welcome".into())),
            };
            Ok((conn, id))
        };
        let (conn, id) = match tokio::time::timeout(timeout, attempt).await {
            Err(_) => return Err(fail(format!("no answer within {timeout:?}"))),
            Ok(Err(TransportError::Unauthorized(reason))) => {
                return Err(ClientError::Unauthorized { address: address.to_string(), reason })
            }
            Ok(Err(e @ (TransportError::VersionMismatch { .. } | TransportError::Handshake(_) | TransportError::Tls(_)))) => {
                return Err(ClientError::Refused { address: address.to_string(), reason: e.to_string() })
            }
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(x)) => x,
        };
        let shared = Arc::new(Mutex::new(Shared::default()));
        let changed = Arc::new(Notify::new());
        let (s, c) = (shared.clone(), changed.clone());
        let mut receiver = conn.receiver;
        tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(Some(frame)) => {
                        if let Err(e) = handle_frame(&s, &frame) {
                            tracing::error!("bad message from scheduler: {e}");
                            s.lock().unwrap().errors.push(e.to_string());
                        }
                    }
                    Ok(None) | Err(_) => {
                        let mut sh = s.lock().unwrap();
                        sh.disconnected = true;
                        // Dropping the reply channels wakes every pending request with an error.
                        sh.who_has.clear();
                        sh.info.clear();
                        sh.stream.clear();
                        sh.coord.clear();
                        sh.processing.clear();
                        sh.dropped.clear();
                        sh.host_calls.clear();
                        drop(sh);
                        c.notify_waiters();
                        break;
                    }
                }
                c.notify_waiters();
            }
        });
        Ok(Client {
            sender: conn.sender,
            shared,
            changed,
            next_id: AtomicU64::new(1),
            pool: PeerPool::new(token.map(str::to_string), Limits::default()),
            id,
            batch_size: 50_000,
        })
    }

    /// Submits tasks (any order; they are sorted so each batch depends only
    /// on itself and earlier batches). Keys marked `want` can be waited on.
    pub fn submit(&self, tasks: Vec<TaskDef>) -> Result<(), ClientError> {
        let graph_id = self.new_graph();
        self.submit_part(graph_id, tasks, false, 0)
    }

    /// An id for a graph submitted in parts ([`Client::submit_part`]).
    pub fn new_graph(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Submits one part of a graph sent in several calls, so the cluster
    /// starts on the first part while the caller prepares the next. Each
    /// part may depend on earlier parts; while `more` parts follow, the
    /// scheduler keeps every task of the graph. The last part has `more ==
    /// false` (it may be empty). `graph_tasks`: size of the whole graph, a
    /// placement hint (0 if unknown).
    pub fn submit_part(&self, graph_id: u64, tasks: Vec<TaskDef>, more: bool, graph_tasks: u64) -> Result<(), ClientError> {
        self.check_connected()?;
        let part = graph::Part { open: more, graph_tasks };
        graph::for_each_batch_of_part(tasks, self.batch_size, part, |graph, data, wanted| {
            let submit_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            {
                let mut sh = self.shared.lock().unwrap();
                for k in &wanted {
                    let status = sh.keys.entry(k.clone()).or_insert(KeyStatus::Pending);
                    // A key cancelled or refused earlier runs again now.
                    if matches!(status, KeyStatus::Cancelled | KeyStatus::Rejected(_)) {
                        *status = KeyStatus::Pending;
                    }
                }
                sh.unacked.insert(submit_id, wanted);
            }
            let msg = FromClientMessage::Submit(rdask_transport::protocol::SubmitGraph { submit_id, graph_id, ..graph });
            if let Err(e) = self.sender.send(Frame::with_data(&msg, data)) {
                // Nothing of this batch reached the scheduler: its keys are
                // not pending any more, and an empty last batch closes the
                // graph so the batches already sent are not pinned forever.
                let mut sh = self.shared.lock().unwrap();
                for k in sh.unacked.remove(&submit_id).unwrap_or_default() {
                    sh.keys.insert(k, KeyStatus::Rejected(e.to_string()));
                }
                drop(sh);
                let close = rdask_transport::protocol::SubmitGraph {
                    submit_id,
                    graph_id,
                    more: false,
                    graph_tasks: 0,
                    keys: vec![],
                    tasks: vec![],
                    restrictions: vec![],
                };
                let _ = self.sender.send(Frame::from_message(&FromClientMessage::Submit(close)));
                return Err(send_error(e));
            }
            Ok(())
        })
    }

    fn send_control(&self, msg: FromClientMessage) -> Result<(), ClientError> {
        self.check_connected()?;
        self.sender.send(Frame::from_message(&msg)).map_err(send_error)
    }

    fn check_connected(&self) -> Result<(), ClientError> {
        if self.shared.lock().unwrap().disconnected {
            return Err(ClientError::Disconnected);
        }
        Ok(())
    }

    /// Sends a request whose answer arrives through `slot`; fails instead of
    /// hanging when the scheduler is gone.
    async fn request<T>(
        &self,
        msg: FromClientMessage,
        slot: impl FnOnce(&mut Shared) -> &mut HashMap<u64, oneshot::Sender<T>>,
        request_id: u64,
    ) -> Result<T, ClientError> {
        let rx = {
            let mut sh = self.shared.lock().unwrap();
            if sh.disconnected {
                return Err(ClientError::Disconnected);
            }
            let (tx, rx) = oneshot::channel();
            slot(&mut sh).insert(request_id, tx);
            rx
        };
        self.sender.send(Frame::from_message(&msg)).map_err(|_| ClientError::Disconnected)?;
        rx.await.map_err(|_| ClientError::Disconnected)
    }

    /// Waits until every key is done; the first failure is returned as an error.
    pub async fn wait(&self, keys: &[String]) -> Result<(), ClientError> {
        let mut pending: Vec<&String> = keys.iter().collect();
        loop {
            let notified = self.changed.notified();
            {
                let sh = self.shared.lock().unwrap();
                let mut err = None;
                pending.retain(|k| match sh.keys.get(*k) {
                    Some(KeyStatus::Done { .. }) => false,
                    Some(KeyStatus::Pending) => true,
                    Some(other) => {
                        err.get_or_insert_with(|| status_error(k, other));
                        false
                    }
                    None => {
                        err.get_or_insert_with(|| {
                            if sh.disconnected {
                                ClientError::Disconnected
                            } else {
                                ClientError::MissingKey(k.to_string())
                            }
                        });
                        false
                    }
                });
                if let Some(e) = err {
                    return Err(e);
                }
                if pending.is_empty() {
                    return Ok(());
                }
                if sh.disconnected {
                    return Err(ClientError::Disconnected);
                }
            }
            notified.await;
        }
    }

    /// Starts recording status changes for [`Client::next_events`].
    pub fn enable_events(&self) {
        let mut sh = self.shared.lock().unwrap();
        sh.events.get_or_insert_with(Vec::new);
    }

    /// Waits up to `timeout` for status changes and returns them all (empty
    /// on timeout). `Err(Disconnected)` once the scheduler is gone and every
    /// change has been handed out.
    pub async fn next_events(&self, timeout: Duration) -> Result<Vec<(String, KeyStatus)>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            {
                let mut sh = self.shared.lock().unwrap();
                let disconnected = sh.disconnected;
                let ev = sh.events.get_or_insert_with(Vec::new);
                if !ev.is_empty() {
                    return Ok(std::mem::take(ev));
                }
                if disconnected {
                    return Err(ClientError::Disconnected);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    pub fn status(&self, key: &str) -> Option<KeyStatus> {
        self.shared.lock().unwrap().keys.get(key).cloned()
    }

    /// Where the scheduler holds these keys in memory: (found, missing).
    pub async fn who_has(&self, keys: &[String]) -> Result<(Vec<KeyLocation>, Vec<String>), ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = FromClientMessage::WhoHas { request_id, keys: keys.to_vec() };
        self.request(msg, |sh| &mut sh.who_has, request_id).await
    }

    /// Runs something in the scheduler's Python process (`kind`: run,
    /// register_plugin, unregister_plugin): (ok, message, pickled result).
    pub async fn scheduler_call(&self, kind: &str, name: &str, payload: Bytes) -> Result<(bool, String, Option<Bytes>), ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut sh = self.shared.lock().unwrap();
            if sh.disconnected {
                return Err(ClientError::Disconnected);
            }
            let (tx, rx) = oneshot::channel();
            sh.host_calls.insert(request_id, tx);
            rx
        };
        let msg = FromClientMessage::SchedulerCall { request_id, kind: kind.to_string(), name: name.to_string() };
        self.sender.send(Frame::with_data(&msg, vec![payload])).map_err(|_| ClientError::Disconnected)?;
        rx.await.map_err(|_| ClientError::Disconnected)
    }

    /// Per worker address, the keys it is running or has queued.
    pub async fn processing(&self) -> Result<Vec<(String, Vec<String>)>, ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request(FromClientMessage::Processing { request_id }, |sh| &mut sh.processing, request_id).await
    }

    /// Drops copies of values (key, worker address) that have another copy;
    /// returns how many went.
    pub async fn drop_replicas(&self, items: Vec<(String, String)>) -> Result<u64, ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request(FromClientMessage::DropReplicas { request_id, items }, |sh| &mut sh.dropped, request_id).await
    }

    /// A new id for a coordination request (to cancel it by, see [`Client::coord`]).
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A coordination operation (locks, variables, queues, ...): the outcome
    /// and its data frames. A waiting operation may wait forever: bound it
    /// with a timeout and [`Client::coord_cancel`].
    pub async fn coord(&self, request_id: u64, op: CoordOp, value: Option<Bytes>) -> Result<(CoordOutcome, Vec<Bytes>), ClientError> {
        let rx = {
            let mut sh = self.shared.lock().unwrap();
            if sh.disconnected {
                return Err(ClientError::Disconnected);
            }
            let (tx, rx) = oneshot::channel();
            sh.coord.insert(request_id, tx);
            rx
        };
        let msg = FromClientMessage::Coord { request_id, op };
        let frame = match value {
            Some(v) => Frame::with_data(&msg, vec![v]),
            None => Frame::from_message(&msg),
        };
        self.sender.send(frame).map_err(|_| ClientError::Disconnected)?;
        rx.await.map_err(|_| ClientError::Disconnected)
    }

    /// Asks the scheduler to stop waiting for `request_id`; its answer (the
    /// grant that left already, or `Cancelled`) still arrives through the
    /// pending [`Client::coord`] call.
    pub fn coord_cancel(&self, request_id: u64) -> Result<(), ClientError> {
        let id = self.next_request_id();
        self.send_control(FromClientMessage::Coord { request_id: id, op: CoordOp::Cancel { request_id } })
    }

    /// Fetches the values of finished keys directly from the workers.
    pub async fn gather(&self, keys: &[String]) -> Result<Vec<Vec<Bytes>>, ClientError> {
        // A value can be lost with its worker between "done" and the fetch;
        // the scheduler then says so (the key is pending again) and we wait
        // for the recomputation.
        // Keys this client never submitted (another client's, say) are not
        // waited for: the scheduler says whether they are in memory.
        let held: Vec<String> = {
            let sh = self.shared.lock().unwrap();
            keys.iter().filter(|k| sh.keys.contains_key(k.as_str())).cloned().collect()
        };
        let (found, missing) = loop {
            self.wait(&held).await?;
            let (found, missing) = self.who_has(keys).await?;
            if missing.is_empty() {
                break (found, missing);
            }
            let lost = {
                let sh = self.shared.lock().unwrap();
                missing.iter().all(|k| matches!(sh.keys.get(k), Some(KeyStatus::Pending)))
            };
            if !lost {
                break (found, missing);
            }
        };
        if let Some(k) = missing.first() {
            return Err(ClientError::MissingKey(k.clone()));
        }
        let mut by_worker: HashMap<String, Vec<(usize, rdask_transport::TaskId)>> = HashMap::new();
        let index: HashMap<&str, usize> = keys.iter().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
        for loc in &found {
            let addr = loc.addresses.first().ok_or_else(|| ClientError::MissingKey(loc.key.clone()))?;
            by_worker.entry(addr.clone()).or_default().push((index[loc.key.as_str()], loc.task));
        }
        let mut out: Vec<Option<Vec<Bytes>>> = vec![None; keys.len()];
        for (addr, items) in by_worker {
            let ids = items.iter().map(|(_, t)| *t).collect();
            let fetched = self.pool.fetch(&addr, ids).await?;
            for ((slot, _), (_, fetched)) in items.iter().zip(fetched) {
                let key = || keys[*slot].clone();
                out[*slot] = Some(match fetched {
                    FetchedValue::Value(frames) => frames.into_vec(),
                    FetchedValue::Missing => return Err(ClientError::MissingKey(key())),
                    FetchedValue::Unserializable { message, payload } => {
                        return Err(ClientError::Unserializable { key: key(), message, payload })
                    }
                });
            }
        }
        out.into_iter().enumerate().map(|(i, v)| v.ok_or_else(|| ClientError::MissingKey(keys[i].clone()))).collect()
    }

    pub fn release(&self, keys: &[String]) -> Result<(), ClientError> {
        {
            let mut sh = self.shared.lock().unwrap();
            for k in keys {
                sh.keys.remove(k);
            }
        }
        self.send_control(FromClientMessage::Release { keys: keys.to_vec() })
    }

    pub fn cancel(&self, keys: &[String]) -> Result<(), ClientError> {
        self.send_control(FromClientMessage::Cancel { keys: keys.to_vec() })
    }

    /// Workers and task counts as the scheduler sees them now.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request(FromClientMessage::ClusterInfo { request_id }, |sh| &mut sh.info, request_id).await
    }

    /// Task runs on worker threads that ended at or after `since_us` (µs
    /// since the Unix epoch), oldest first (the scheduler keeps the last
    /// 100,000).
    pub async fn task_stream(&self, since_us: u64) -> Result<Vec<StreamEvent>, ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request(FromClientMessage::TaskStream { request_id, since_us }, |sh| &mut sh.stream, request_id).await
    }

    /// Waits until at least `n` workers are connected.
    pub async fn wait_for_workers(&self, n: usize, timeout: Duration) -> Result<ClusterInfo, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.cluster_info().await?;
            if info.workers.len() >= n {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Scheduler(format!(
                    "only {} of {n} workers connected after {timeout:?}",
                    info.workers.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scheduler errors about this client's messages so far.
    pub fn errors(&self) -> Vec<String> {
        self.shared.lock().unwrap().errors.clone()
    }

    pub async fn close(&self) {
        let _ = self.sender.send(Frame::from_message(&FromClientMessage::Close));
        // Give the writer a moment to flush the goodbye.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A failed send: the connection is gone, or the frame broke a limit.
fn send_error(e: TransportError) -> ClientError {
    match e {
        TransportError::Closed => ClientError::Disconnected,
        other => ClientError::Transport(other),
    }
}

fn status_error(key: &str, s: &KeyStatus) -> ClientError {
    match s {
        KeyStatus::Erred { failed_key, message, payload } => ClientError::TaskFailed {
            key: key.to_string(),
            failed_key: failed_key.clone(),
            message: message.clone(),
            payload: payload.clone(),
        },
        KeyStatus::Cancelled => ClientError::Cancelled(key.to_string()),
        KeyStatus::Rejected(m) => ClientError::Rejected(m.clone()),
        KeyStatus::Pending | KeyStatus::Done { .. } => unreachable!(),
    }
}

fn handle_frame(shared: &Mutex<Shared>, frame: &Frame) -> Result<(), TransportError> {
    let msg = ToClientMessage::access(&frame.control)?;
    let mut sh = shared.lock().unwrap();
    match msg {
        ArchivedToClientMessage::InMemory(items) => {
            for it in items.iter() {
                sh.set(it.key.as_str(), KeyStatus::Done { size: it.size.to_native() });
            }
        }
        ArchivedToClientMessage::Erred(items) => {
            for it in items.iter() {
                let payload = match it.payload.to_native() {
                    NO_FRAME => Bytes::new(),
                    i => frame.data_frame(i)?.clone(),
                };
                let status =
                    KeyStatus::Erred { failed_key: it.failed_key.to_string(), message: it.message.to_string(), payload };
                sh.set(it.key.as_str(), status);
            }
        }
        ArchivedToClientMessage::Lost { keys } => {
            for k in keys.iter() {
                sh.set(k.as_str(), KeyStatus::Pending);
            }
        }
        ArchivedToClientMessage::Cancelled { keys } => {
            for k in keys.iter() {
                sh.set(k.as_str(), KeyStatus::Cancelled);
            }
        }
        ArchivedToClientMessage::Submitted { submit_id } => {
            sh.unacked.remove(&submit_id.to_native());
        }
        ArchivedToClientMessage::SubmitRejected { submit_id, message } => {
            let keys = sh.unacked.remove(&submit_id.to_native()).unwrap_or_default();
            for k in keys {
                sh.set(&k, KeyStatus::Rejected(message.to_string()));
            }
            sh.errors.push(message.to_string());
        }
        ArchivedToClientMessage::WhoHas { request_id, .. } => {
            let owned = ToClientMessage::decode(&frame.control)?;
            if let ToClientMessage::WhoHas { found, missing, .. } = owned {
                if let Some(tx) = sh.who_has.remove(&request_id.to_native()) {
                    let _ = tx.send((found, missing));
                }
            }
        }
        ArchivedToClientMessage::ClusterInfo { request_id, .. } => {
            if let ToClientMessage::ClusterInfo { info, .. } = ToClientMessage::decode(&frame.control)? {
                if let Some(tx) = sh.info.remove(&request_id.to_native()) {
                    let _ = tx.send(info);
                }
            }
        }
        ArchivedToClientMessage::TaskStream { request_id, .. } => {
            if let ToClientMessage::TaskStream { events, .. } = ToClientMessage::decode(&frame.control)? {
                if let Some(tx) = sh.stream.remove(&request_id.to_native()) {
                    let _ = tx.send(events);
                }
            }
        }
        ArchivedToClientMessage::Processing { request_id, .. } => {
            if let ToClientMessage::Processing { workers, .. } = ToClientMessage::decode(&frame.control)? {
                if let Some(tx) = sh.processing.remove(&request_id.to_native()) {
                    let _ = tx.send(workers);
                }
            }
        }
        ArchivedToClientMessage::SchedulerCallResult { request_id, ok, message } => {
            if let Some(tx) = sh.host_calls.remove(&request_id.to_native()) {
                let _ = tx.send((*ok, message.to_string(), frame.data.first().cloned()));
            }
        }
        ArchivedToClientMessage::ReplicasDropped { request_id, dropped } => {
            if let Some(tx) = sh.dropped.remove(&request_id.to_native()) {
                let _ = tx.send(dropped.to_native());
            }
        }
        ArchivedToClientMessage::Coord { request_id, .. } => {
            if let ToClientMessage::Coord { outcome, .. } = ToClientMessage::decode(&frame.control)? {
                if let Some(tx) = sh.coord.remove(&request_id.to_native()) {
                    let _ = tx.send((outcome, frame.data.to_vec()));
                }
            }
        }
        ArchivedToClientMessage::Error { message } => {
            tracing::error!("scheduler: {}", message.as_str());
            // A submission the scheduler could not even read is never
            // acknowledged; its keys must not wait forever.
            let unacked: Vec<Vec<String>> = sh.unacked.drain().map(|(_, keys)| keys).collect();
            for k in unacked.into_iter().flatten() {
                sh.set(&k, KeyStatus::Rejected(message.to_string()));
            }
            sh.errors.push(message.to_string());
        }
        ArchivedToClientMessage::Welcome { .. } => {}
    }
    Ok(())
}
