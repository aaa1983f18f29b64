//! The network shell around the core: accepts connections, runs handshakes,
//! turns frames into core calls, and flushes the core's outbox once per burst
//! of events. All core access happens on one task, so the core needs no locks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdask_transport::handshake::{handshake_accept, HandshakeGate, Role};
use rdask_transport::warn_limit::WarnLimiter;
use rdask_transport::protocol::{ArchivedFromWorkerMessage, FromWorkerMessage, ToClientMessage, ToWorkerMessage};
use rdask_transport::{ClientId, Connection, Frame, FrameSender, Listener, WireMessage, WorkerId};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, watch};

use crate::comm::{Comm, CommSink};
use crate::core::membership::WorkerSpec;
use crate::core::{Core, CoreConfig};
use crate::error::SchedError;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub core: CoreConfig,
    /// Shared secret peers must present in the handshake.
    pub token: Option<String>,
    /// A worker silent this long is dropped (its work is rescheduled).
    pub worker_timeout: Duration,
    /// How often progress is logged while tasks are in flight.
    pub progress_interval: Duration,
    /// Most events handled before the outbox is flushed.
    pub max_events_per_tick: usize,
    /// Where to serve the dashboard (`host:port`, `:8787`, `:0`); None: off.
    pub dashboard: Option<String>,
    /// The scheduler's Python side, when it runs inside a Python process
    /// (`rdask-scheduler`, `LocalCluster`): `run_on_scheduler` and
    /// scheduler plugins. None: such calls are refused with the reason.
    pub host: Option<HostLink>,
}

/// What the reactor tells the scheduler's Python side.
#[derive(Debug)]
pub enum HostMsg {
    Call(crate::core::HostCall),
    WorkerAdded(String),
    WorkerRemoved(String),
    ClientAdded(ClientId),
    ClientRemoved(ClientId),
    /// Tasks that finished (`processing` → `memory`) or failed (→ `erred`),
    /// while a plugin wants them.
    Transitions(Vec<(String, &'static str, &'static str)>),
}

/// The answer of the Python side to a [`HostMsg::Call`].
#[derive(Debug)]
pub struct HostReply {
    pub client: ClientId,
    pub request_id: u64,
    pub ok: bool,
    pub message: String,
    pub payload: Option<rdask_transport::bytes::Bytes>,
    /// Set when the Python side's wish for task transitions changed.
    pub want_transitions: Option<bool>,
}

/// Channels to the scheduler's Python side: messages go out on a plain
/// channel (a thread of the host blocks on it), answers come back on a tokio
/// one the reactor selects on.
#[derive(Clone)]
pub struct HostLink {
    pub to_host: std::sync::mpsc::Sender<HostMsg>,
    pub replies: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<HostReply>>>>,
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostLink")
    }
}

impl HostLink {
    /// A link and the host's ends of it: (link, messages for the host, where its answers go).
    pub fn new() -> (HostLink, std::sync::mpsc::Receiver<HostMsg>, mpsc::UnboundedSender<HostReply>) {
        let (to_host, from_reactor) = std::sync::mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        (HostLink { to_host, replies: Arc::new(std::sync::Mutex::new(Some(reply_rx))) }, from_reactor, reply_tx)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            core: CoreConfig::default(),
            token: None,
            worker_timeout: Duration::from_secs(60),
            progress_interval: Duration::from_secs(5),
            max_events_per_tick: 4096,
            dashboard: None,
            host: None,
        }
    }
}

/// How long a worker may take between the handshake and `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

enum Event {
    WorkerJoined { spec: WorkerSpec, sender: FrameSender, reply: oneshot::Sender<WorkerId> },
    WorkerFrame(WorkerId, Frame),
    WorkerGone(WorkerId, Gone),
    ClientJoined { sender: FrameSender, reply: oneshot::Sender<ClientId> },
    ClientFrame(ClientId, Frame),
    ClientGone(ClientId, Gone),
}

#[derive(Default)]
struct Senders {
    workers: FxHashMap<WorkerId, FrameSender>,
    clients: FxHashMap<ClientId, FrameSender>,
}

impl CommSink for Senders {
    fn to_worker(&mut self, worker: WorkerId, frame: Frame) {
        if let Some(s) = self.workers.get(&worker) {
            if let Err(e) = s.send(frame) {
                tracing::debug!(%worker, "send to worker failed: {e}");
            }
        }
    }
    fn to_client(&mut self, client: ClientId, frame: Frame) {
        if let Some(s) = self.clients.get(&client) {
            if let Err(e) = s.send(frame) {
                tracing::debug!(%client, "send to client failed: {e}");
            }
        }
    }
}

/// Binds the dashboard `config.dashboard` asks for (on the scheduler's host
/// when it names only a port): the listener and its `http://` link.
pub async fn bind_dashboard(config: &SchedulerConfig, listener: &Listener) -> Result<Option<(tokio::net::TcpListener, String)>, SchedError> {
    let Some(addr) = &config.dashboard else { return Ok(None) };
    // The scheduler's own interface for IP transports; all interfaces for others (MPI).
    let (scheme, rest) = rdask_transport::backend::split_scheme(&listener.bound);
    let host = match (scheme, rest.rsplit_once(':')) {
        ("tcp" | "tls" | "ucx", Some((h, _))) if !h.is_empty() => h.trim_matches(['[', ']']).to_string(),
        _ => "0.0.0.0".to_string(),
    };
    let bound = crate::dashboard::bind(addr, &host).await?;
    Ok(Some(bound))
}

/// Serves `listener` until `stop` turns true. On a clean stop every worker
/// is told to stop too.
pub async fn serve(listener: Listener, config: SchedulerConfig, stop: watch::Receiver<bool>) {
    serve_with_dashboard(listener, None, config, stop).await
}

/// As [`serve`], with the dashboard on `dashboard` (from [`bind_dashboard`]).
pub async fn serve_with_dashboard(
    listener: Listener,
    dashboard: Option<(tokio::net::TcpListener, String)>,
    config: SchedulerConfig,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(bound = %listener.bound, contact = %listener.address, "scheduler listening; clients and workers connect to {}", listener.address);
    let scheduler_address = listener.address.clone();
    let (snapshots_tx, snapshots_rx) = watch::channel(Arc::new(crate::dashboard::Snapshot::default()));
    let dashboard_link = dashboard.as_ref().map(|(_, link)| link.clone());
    let dashboard_task = dashboard.map(|(l, link)| {
        tracing::info!("dashboard at {link}/status");
        tokio::spawn(crate::dashboard::serve(l, snapshots_rx))
    });
    let mut snapshot_tick = tokio::time::interval(Duration::from_millis(500));
    snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    if listener.is_exposed() && config.token.is_none() {
        tracing::warn!(
            "listening on all interfaces ({}) without a token: anyone who can reach this port can run code on the \
             workers; pass --token/RDASK_TOKEN/--token-file, or --host 127.0.0.1 for a single machine",
            listener.bound
        );
    }
    let (events_tx, mut events) = mpsc::channel::<Event>(4096);
    let accept = tokio::spawn(accept_loop(listener, events_tx, config.token.clone()));

    let started = Instant::now();
    let now_ms = || started.elapsed().as_millis() as u64;
    let mut core = Core::new(config.core.clone());
    core.dashboard = dashboard_link.clone().unwrap_or_default();
    core.stream_enabled = dashboard_link.is_some();
    let mut comm = Comm::default();
    let mut senders = Senders::default();
    let mut addresses: FxHashMap<WorkerId, String> = FxHashMap::default();
    let mut housekeeping = tokio::time::interval(config.progress_interval.min(config.worker_timeout / 4));
    let mut last_logged = core.stats;
    let host = config.host.clone();
    let mut host_replies = host.as_ref().and_then(|h| h.replies.lock().unwrap().take());

    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            Some(reply) = async { match host_replies.as_mut() { Some(r) => r.recv().await, None => None } } => {
                if let Some(want) = reply.want_transitions {
                    core.host_transitions = want;
                }
                if let Some(s) = senders.clients.get(&reply.client) {
                    let msg = ToClientMessage::SchedulerCallResult { request_id: reply.request_id, ok: reply.ok, message: reply.message };
                    let _ = s.send(Frame::with_data(&msg, reply.payload.into_iter().collect()));
                }
            }
            // Only while a dashboard is on: one pass over the tasks.
            _ = snapshot_tick.tick(), if dashboard_task.is_some() => {
                let link = dashboard_link.as_deref().unwrap_or("");
                let wall_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
                let snap = crate::dashboard::snapshot(&core, now_ms(), wall_us, &scheduler_address, link);
                let _ = snapshots_tx.send(Arc::new(snap));
            }
            // Before events, so a steady stream of messages cannot starve
            // silent-worker detection and progress logs.
            _ = housekeeping.tick() => {
                for w in core.silent_workers(now_ms(), config.worker_timeout.as_millis() as u64) {
                    tracing::warn!(worker = %w, "no message for {:?}; dropping worker", config.worker_timeout);
                    drop_worker(&mut core, &mut comm, &mut senders, &mut addresses, w, host.as_ref());
                }
                if core.tasks.is_empty() && core.release_memory_if_idle() {
                    comm.release_spare();
                    let trimmed = crate::alloc::trim();
                    tracing::debug!(trimmed, "idle: released task bookkeeping memory");
                }
                let s = core.stats;
                if s.submitted != last_logged.submitted || s.finished != last_logged.finished {
                    tracing::info!(
                        submitted = s.submitted, finished = s.finished, failed = s.failed, stolen = s.stolen, ready = core.ready_len(),
                        live = core.tasks.len(), workers = core.workers.len(), clients = core.clients.len(),
                        "progress"
                    );
                    last_logged = s;
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                handle(&mut core, &mut comm, &mut senders, &mut addresses, ev, now_ms(), host.as_ref());
                let mut n = 1;
                while n < config.max_events_per_tick {
                    match events.try_recv() {
                        Ok(ev) => handle(&mut core, &mut comm, &mut senders, &mut addresses, ev, now_ms(), host.as_ref()),
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
        }
        core.schedule(&mut comm);
        if !core.transitions_out.is_empty() {
            let batch = std::mem::take(&mut core.transitions_out);
            if let Some(h) = &host {
                let _ = h.to_host.send(HostMsg::Transitions(batch));
            }
        }
        for call in std::mem::take(&mut core.host_calls) {
            let (client, request_id) = (call.client, call.request_id);
            let sent = host.as_ref().is_some_and(|h| h.to_host.send(HostMsg::Call(call)).is_ok());
            if !sent {
                let message = "this scheduler has no Python side (the Rust rdask-scheduler binary): run_on_scheduler and \
                               scheduler plugins need the Python rdask-scheduler or a LocalCluster"
                    .to_string();
                comm.send_client(client, ToClientMessage::SchedulerCallResult { request_id, ok: false, message });
            }
        }
        if !comm.is_empty() {
            comm.flush(&mut senders, &|w| addresses.get(&w).cloned());
        }
    }
    accept.abort();
    if let Some(t) = &dashboard_task {
        t.abort();
    }
    // Tell workers to stop and wait (bounded) until they hang up, so the Stop
    // frames are written before this process exits.
    for s in senders.workers.values() {
        let _ = s.send(Frame::from_message(&ToWorkerMessage::Stop));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !senders.workers.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::WorkerGone(w, _))) => {
                senders.workers.remove(&w);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let s = core.stats;
    tracing::info!(
        submitted = s.submitted, finished = s.finished, failed = s.failed, stolen = s.stolen,
        recomputed = s.recomputed, "scheduler stopped"
    );
}

fn drop_worker(
    core: &mut Core,
    comm: &mut Comm,
    senders: &mut Senders,
    addresses: &mut FxHashMap<WorkerId, String>,
    w: WorkerId,
    host: Option<&HostLink>,
) {
    senders.workers.remove(&w);
    if let (Some(address), Some(h)) = (addresses.remove(&w), host) {
        let _ = h.to_host.send(HostMsg::WorkerRemoved(address));
    }
    core.remove_worker(comm, w);
}

fn handle(
    core: &mut Core,
    comm: &mut Comm,
    senders: &mut Senders,
    addresses: &mut FxHashMap<WorkerId, String>,
    ev: Event,
    now_ms: u64,
    host: Option<&HostLink>,
) {
    let tell = |msg: HostMsg| {
        if let Some(h) = host {
            let _ = h.to_host.send(msg);
        }
    };
    match ev {
        Event::WorkerJoined { spec, sender, reply } => {
            let address = spec.address.clone();
            tell(HostMsg::WorkerAdded(address.clone()));
            let id = core.add_worker(comm, spec, now_ms);
            senders.workers.insert(id, sender);
            addresses.insert(id, address);
            let _ = reply.send(id);
        }
        Event::WorkerFrame(w, frame) => {
            if !senders.workers.contains_key(&w) {
                return;
            }
            if let Err(e) = core.on_worker_frame(comm, w, &frame, now_ms) {
                tracing::warn!(worker = %w, "bad message from worker, disconnecting it: {e}");
                if let Some(s) = senders.workers.get(&w) {
                    let _ = s.send(Frame::from_message(&ToWorkerMessage::Error { message: e.to_string() }));
                }
                drop_worker(core, comm, senders, addresses, w, host);
            } else if core.workers.get(&w).is_some_and(|worker| worker.leaving) {
                // Said goodbye: its tasks go elsewhere now, suspecting none,
                // and the closed connection tells the worker it may go.
                drop_worker(core, comm, senders, addresses, w, host);
            }
        }
        Event::WorkerGone(w, reason) => {
            if let Some(s) = senders.workers.get(&w) {
                if let Gone::Error(e) = &reason {
                    tracing::warn!(worker = %w, "bad input from worker, disconnecting it: {e}");
                    let _ = s.send(Frame::from_message(&ToWorkerMessage::Error { message: e.clone() }));
                } else {
                    tracing::info!(worker = %w, "worker connection closed");
                }
                drop_worker(core, comm, senders, addresses, w, host);
            }
        }
        Event::ClientJoined { sender, reply } => {
            let id = core.add_client(comm);
            senders.clients.insert(id, sender);
            let _ = reply.send(id);
            tell(HostMsg::ClientAdded(id));
        }
        Event::ClientFrame(c, frame) => {
            if !senders.clients.contains_key(&c) {
                return;
            }
            if let Err(e) = core.on_client_frame(comm, c, &frame) {
                tracing::warn!(client = %c, "client request failed: {e}");
                comm.send_client(c, ToClientMessage::Error { message: e.to_string() });
            }
        }
        Event::ClientGone(c, reason) => {
            if let Some(s) = senders.clients.remove(&c) {
                if let Gone::Error(e) = &reason {
                    // Malformed or truncated input: say why, then hang up.
                    tracing::warn!(client = %c, "bad input from client, disconnecting it: {e}");
                    let _ = s.send(Frame::from_message(&ToClientMessage::Error { message: e.clone() }));
                } else {
                    tracing::info!(client = %c, "client connection closed");
                }
                core.remove_client(comm, c);
                tell(HostMsg::ClientRemoved(c));
            }
        }
    }
}

/// Warnings a remote peer can cause at will (refused handshakes, broken
/// connections) are rate-limited: one line per interval.
static CONNECTION_WARNINGS: WarnLimiter = WarnLimiter::new(Duration::from_secs(5));

async fn accept_loop(mut listener: Listener, events: mpsc::Sender<Event>, token: Option<String>) {
    let token: Arc<Option<String>> = Arc::new(token);
    let gate = HandshakeGate::default();
    while let Some(conn) = listener.accept().await {
        let Some(permit) = gate.try_enter() else {
            if let Some(held_back) = CONNECTION_WARNINGS.allow() {
                tracing::warn!(peer = %conn.peer, held_back, "too many connections in the handshake; closing this one");
            }
            continue;
        };
        let events = events.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let peer = conn.peer.clone();
            if let Err(e) = serve_connection(conn, events, token.as_deref(), permit).await {
                if let Some(held_back) = CONNECTION_WARNINGS.allow() {
                    tracing::warn!(%peer, held_back, "connection ended with error: {e}");
                } else {
                    tracing::debug!(%peer, "connection ended with error: {e}");
                }
            }
        });
    }
}

async fn serve_connection(
    mut conn: Connection,
    events: mpsc::Sender<Event>,
    token: Option<&str>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), SchedError> {
    let role = handshake_accept(&mut conn, &[Role::Client, Role::Worker], token).await?;
    drop(permit);
    match role {
        Role::Worker => serve_worker(conn, events).await,
        Role::Client => serve_client(conn, events).await,
        Role::Peer => unreachable!("handshake only admits clients and workers"),
    }
}

/// Why a connection's reader stopped.
enum Gone {
    Closed,
    /// Bad or truncated input: the peer is told why before the hang-up.
    Error(String),
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gone::Closed => write!(f, "closed"),
            Gone::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Reads frames until the peer hangs up or sends garbage. The reader keeps no
/// sender: once the core drops the peer's sender, the socket closes.
async fn forward_frames(receiver: &mut Box<dyn rdask_transport::FrameRead>, mut forward: impl FnMut(Frame) -> Event, events: &mpsc::Sender<Event>) -> Option<Gone> {
    loop {
        match receiver.recv().await {
            Ok(Some(frame)) => {
                if events.send(forward(frame)).await.is_err() {
                    return None; // scheduler stopping
                }
            }
            Ok(None) => return Some(Gone::Closed),
            Err(e) => return Some(Gone::Error(e.to_string())),
        }
    }
}

async fn serve_worker(conn: Connection, events: mpsc::Sender<Event>) -> Result<(), SchedError> {
    let Connection { sender, mut receiver, .. } = conn;
    let first = match tokio::time::timeout(REGISTER_TIMEOUT, receiver.recv()).await {
        Ok(r) => r?.ok_or(rdask_transport::TransportError::Closed)?,
        Err(_) => return Err(SchedError::BadMessage("worker did not register in time".into())),
    };
    let spec = match FromWorkerMessage::access(&first.control)? {
        ArchivedFromWorkerMessage::Register(info) => WorkerSpec {
            name: info.name.to_string(),
            address: info.address.to_string(),
            nthreads: info.nthreads.to_native(),
            memory_limit: info.memory_limit.to_native(),
            resources: info
                .resources
                .iter()
                .map(|r| rdask_transport::protocol::Resource { name: r.name.to_string(), amount: r.amount.to_native() })
                .collect(),
            placement: rdask_transport::rkyv::deserialize::<_, rdask_transport::rkyv::rancor::Error>(&info.placement)
                .map_err(|e| SchedError::BadMessage(format!("bad worker placement: {e}")))?,
        },
        _ => {
            let msg = "first message from a worker must be Register";
            let _ = sender.send(Frame::from_message(&ToWorkerMessage::Error { message: msg.into() }));
            return Err(SchedError::BadMessage(msg.into()));
        }
    };
    let (reply, id) = oneshot::channel();
    if events.send(Event::WorkerJoined { spec, sender, reply }).await.is_err() {
        return Ok(());
    }
    let Ok(id) = id.await else { return Ok(()) };
    if let Some(gone) = forward_frames(&mut receiver, |f| Event::WorkerFrame(id, f), &events).await {
        let _ = events.send(Event::WorkerGone(id, gone)).await;
    }
    Ok(())
}

async fn serve_client(conn: Connection, events: mpsc::Sender<Event>) -> Result<(), SchedError> {
    let Connection { sender, mut receiver, .. } = conn;
    let (reply, id) = oneshot::channel();
    if events.send(Event::ClientJoined { sender, reply }).await.is_err() {
        return Ok(());
    }
    let Ok(id) = id.await else { return Ok(()) };
    if let Some(gone) = forward_frames(&mut receiver, |f| Event::ClientFrame(id, f), &events).await {
        let _ = events.send(Event::ClientGone(id, gone)).await;
    }
    Ok(())
}

/// A scheduler running on its own thread (its own single-threaded runtime),
/// for in-process clusters, tests and benchmarks.
pub struct SchedulerHandle {
    /// Where clients and workers connect.
    pub address: String,
    /// Where the socket is bound.
    pub bound: String,
    /// `http://host:port` of the dashboard, if it is on.
    pub dashboard: Option<String>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    thread_cpu: Arc<std::sync::Mutex<Option<libc_time::ThreadClock>>>,
}

impl SchedulerHandle {
    /// Starts a scheduler listening on `addr` (port 0 picks a free port).
    pub fn start(addr: &str, config: SchedulerConfig) -> Result<SchedulerHandle, SchedError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let addr = addr.to_string();
        let thread_cpu = Arc::new(std::sync::Mutex::new(None));
        let cpu = thread_cpu.clone();
        let thread = std::thread::Builder::new().name("rdask-scheduler".into()).spawn(move || {
            *cpu.lock().unwrap() = Some(libc_time::ThreadClock::current());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                let listener = match rdask_transport::listen(&addr, Default::default()).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(SchedError::from(e)));
                        return;
                    }
                };
                let dashboard = match bind_dashboard(&config, &listener).await {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e));
                        return;
                    }
                };
                let link = dashboard.as_ref().map(|(_, l)| l.clone());
                let _ = addr_tx.send(Ok((listener.address.clone(), listener.bound.clone(), link)));
                serve_with_dashboard(listener, dashboard, config, stop_rx).await;
            });
        })?;
        let (address, bound, dashboard) = addr_rx
            .recv()
            .map_err(|_| SchedError::BadMessage("scheduler thread died during start-up".into()))??;
        Ok(SchedulerHandle { address, bound, dashboard, stop: stop_tx, thread: Some(thread), thread_cpu })
    }

    /// CPU time the scheduler thread has used so far.
    pub fn cpu_time(&self) -> Duration {
        self.thread_cpu.lock().unwrap().as_ref().map(|c| c.elapsed()).unwrap_or_default()
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Per-thread CPU clock (Linux `pthread_getcpuclockid`), readable from any thread.
mod libc_time {
    use std::time::Duration;

    pub struct ThreadClock(libc::clockid_t);

    impl ThreadClock {
        pub fn current() -> Self {
            let mut id: libc::clockid_t = 0;
            // SAFETY: pthread_self is always valid for the calling thread and
            // `id` is a valid out-pointer.
            unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
            ThreadClock(id)
        }

        pub fn elapsed(&self) -> Duration {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: valid clock id and out-pointer; a clock of an exited
            // thread returns an error and leaves ts at zero.
            unsafe { libc::clock_gettime(self.0, &mut ts) };
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        }
    }
}
