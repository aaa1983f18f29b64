//! The worker loop: registers with the scheduler, fetches missing inputs
//! from peers, feeds the executor threads, and reports back in batches.

use std::sync::Arc;
use std::time::Duration;

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_connect, Role};
use rdask_transport::peer::{Fetched, FetchedValue, PeerPool};
use rdask_transport::protocol::{
    ArchivedComputeTask, ArchivedToWorkerMessage, FailedTask, FetchFailure, FinishedTask, FromWorkerMessage, Resource,
    StealOutcome, ToWorkerMessage, WorkerInfo, WorkerLoad, NO_FRAME,
};
use rdask_transport::{Frame, FrameSender, Limits, TaskId, TransportError, WireMessage, WorkerId};
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;

use crate::error::WorkerError;
use crate::executor::{Executor, TaskFailure, TaskRun, Value};
use crate::peer_server::serve_peers;
use crate::runqueue::{Completion, Done, Job, JobPriority, RunQueue};
use crate::store::{Held, Store};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Scheduler address, e.g. `tcp://127.0.0.1:8786`.
    pub scheduler: String,
    pub name: String,
    pub nthreads: u32,
    /// Bytes; 0 = no limit.
    pub memory_limit: u64,
    pub resources: Vec<Resource>,
    /// Where peers fetch this worker's values (`tcp://host:0` picks a port).
    pub listen: String,
    pub token: Option<String>,
    /// Concurrent fetch requests to peers.
    pub max_concurrent_fetches: usize,
    /// Values asked for in one request to one peer.
    pub max_fetch_batch: usize,
    /// Bytes asked for in one request (a single larger value still goes alone).
    pub max_fetch_bytes: u64,
    /// Host, CPUs, NUMA node and GPU as the launcher placed this worker
    /// (reported to the scheduler; an empty host is filled in).
    pub placement: rdask_transport::protocol::Placement,
    /// A fetch request not answered within this time fails over to the next holder.
    pub fetch_timeout: Duration,
    pub connect_timeout: Duration,
    /// Spill/pause thresholds, fractions of `memory_limit` (used when it is set).
    pub memory: crate::memory::MemoryThresholds,
    /// Where values spill (`--local-directory`); the system's temporary
    /// directory when unset.
    pub local_directory: Option<std::path::PathBuf>,
    /// What this worker's values hold in device memory, and its
    /// `--device-memory-limit` (a GPU worker; the executor's values report
    /// to it). `None`: no device tier.
    pub device: Option<Arc<crate::device_tier::DeviceLedger>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            scheduler: "tcp://127.0.0.1:8786".into(),
            name: format!("worker-{}", std::process::id()),
            nthreads: 1,
            memory_limit: 0,
            resources: Vec::new(),
            listen: "tcp://127.0.0.1:0".into(),
            token: None,
            max_concurrent_fetches: 32,
            max_fetch_batch: 8192,
            max_fetch_bytes: 64 << 20,
            placement: Default::default(),
            fetch_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            memory: Default::default(),
            local_directory: None,
            device: None,
        }
    }
}

enum Stage {
    Fetching,
    Queued,
}

struct LocalTask {
    key: String,
    payload: Bytes,
    deps: Vec<TaskId>,
    missing: u32,
    priority: JobPriority,
    stage: Stage,
    careful: bool,
    /// Resources held while it runs (`ComputeTask::resources`).
    needs: Vec<Resource>,
}

struct DepFetch {
    // Inline: a value usually has one or two holders and one waiter, and a
    // task with 100k inputs makes 100k of these records.
    holders: smallvec::SmallVec<[WorkerId; 2]>,
    /// Size the scheduler reported, for request byte limits.
    size: u64,
    tried: usize,
    /// The holder asked last (named in a FetchFailed report).
    last_asked: Option<WorkerId>,
    waiters: smallvec::SmallVec<[TaskId; 1]>,
}

struct FetchDone {
    holder: WorkerId,
    /// Whether this request counted against `in_flight`.
    counted: bool,
    ids: Vec<TaskId>,
    result: Result<Vec<Fetched>, TransportError>,
}

#[derive(Default)]
struct Outgoing {
    finished: Vec<FinishedTask>,
    failed: Vec<FailedTask>,
    failed_data: Vec<Bytes>,
    replicas: Vec<TaskId>,
    fetch_failed: Vec<FetchFailure>,
    steal: Vec<StealOutcome>,
    /// Tasks seen running user code (the sweep).
    executing: Vec<TaskId>,
    /// Careful tasks waiting for the scheduler to confirm their start.
    confirm: Vec<TaskId>,
    /// When thread-pool tasks ran (the task stream).
    spans: Vec<rdask_transport::protocol::TaskSpan>,
}

/// Stops the executor threads and the peer server however the worker ends
/// (return, error, or its task being aborted).
struct Guard {
    monitor_stop: Arc<std::sync::atomic::AtomicBool>,
    queue: Arc<RunQueue>,
    peer_server: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.monitor_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.queue.shutdown();
        self.peer_server.abort();
    }
}

struct State {
    id: WorkerId,
    config: WorkerConfig,
    executor: Arc<dyn Executor>,
    store: Arc<Store>,
    queue: Arc<RunQueue>,
    pool: Arc<PeerPool>,
    tasks: FxHashMap<TaskId, LocalTask>,
    peers: FxHashMap<WorkerId, String>,
    fetches: FxHashMap<TaskId, DepFetch>,
    to_request: FxHashMap<WorkerId, Vec<TaskId>>,
    in_flight: usize,
    fetch_tx: mpsc::UnboundedSender<FetchDone>,
    out: Outgoing,
    /// Jobs made runnable while handling the current burst; queued together.
    to_run: Vec<Job>,
    /// Running tasks already reported as executing.
    reported: rustc_hash::FxHashSet<TaskId>,
    /// Scratch for the executing sweep.
    sweep_buf: Vec<TaskId>,
    /// Results of trivial tasks run inline during the current burst.
    inline_done: Vec<Completion>,
    seq: u64,
    /// Value bytes fetched from peers so far.
    bytes_in: u64,
    /// Send `Spans` (the scheduler keeps a task stream).
    report_spans: bool,
}

/// How often the worker looks which tasks run user code, to tell the
/// scheduler (only tasks that ran when a worker died are suspected of
/// killing it). A task that kills its worker sooner than this after its
/// start is caught on its next run, which confirms its start first.
const EXECUTING_SWEEP: Duration = Duration::from_millis(10);
/// Fetch failures logged at warning level: one line per interval (the
/// count of lines held back rides along).
static FETCH_WARNINGS: rdask_transport::warn_limit::WarnLimiter =
    rdask_transport::warn_limit::WarnLimiter::new(Duration::from_secs(5));

/// How long a leaving worker waits for the scheduler to take note.
const LEAVE_WAIT: Duration = Duration::from_secs(3);

/// Runs one worker until the scheduler says stop (Ok) or goes away (Err).
pub async fn run_worker(config: WorkerConfig, executor: Arc<dyn Executor>) -> Result<(), WorkerError> {
    run_worker_until(config, executor, std::future::pending()).await
}

/// As [`run_worker`], and when `leave` completes (SIGTERM, close) the worker
/// tells the scheduler it is leaving on purpose, so that none of its tasks
/// is suspected of killing it, and returns Ok.
pub async fn run_worker_until(
    config: WorkerConfig,
    executor: Arc<dyn Executor>,
    leave: impl std::future::Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let limits = Limits::default();
    let listener = rdask_transport::listen(&config.listen, limits).await?;
    let address = listener.address.clone();
    config.memory.validate().map_err(WorkerError::Config)?;
    let manage_memory = config.memory_limit > 0;
    let store = if manage_memory && config.memory.spills() {
        Store::with_spilling(crate::spill::SpillDir::new(config.local_directory.as_deref(), &config.name), executor.clone())
    } else {
        Store::default()
    };
    let device_limit = config.device.as_ref().map_or(0, |d| d.limit());
    // A GPU worker keeps its values' use order even without a limit: a
    // device that runs full makes room by moving the least recently used.
    let store = Arc::new(if config.device.is_some() { store.ordered() } else { store });
    let _room = config.device.as_ref().map(|ledger| crate::device_tier::offer_room(ledger.clone(), Arc::downgrade(&store)));
    let _device_monitor = match &config.device {
        Some(ledger) if device_limit > 0 => {
            tracing::info!(name = %config.name, limit = %crate::memory::human(device_limit), "device memory limit: least recently used device values move to host memory above it");
            Some(crate::device_tier::spawn_device_monitor(
                config.name.clone(),
                ledger.clone(),
                Arc::downgrade(&store),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )?)
        }
        _ => None,
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let (starting_tx, mut starting_rx) = mpsc::unbounded_channel::<TaskId>();
    let bytes_out = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let queue = RunQueue::start(
        config.nthreads as usize,
        &config.name,
        executor.clone(),
        done_tx,
        starting_tx,
        config.resources.clone(),
    )?;
    let (memory_tx, mut memory_rx) = mpsc::unbounded_channel();
    let monitor_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if manage_memory {
        crate::memory::spawn_monitor(
            config.name.clone(),
            config.memory_limit,
            config.memory,
            Arc::downgrade(&store),
            queue.clone(),
            memory_tx,
            monitor_stop.clone(),
            config.device.clone(),
        )?;
        tracing::info!(
            name = %config.name,
            limit = %crate::memory::human(config.memory_limit),
            spill_to = %store.spill_dir().map_or("nowhere (spilling off)".into(), |p| p.display().to_string()),
            "memory limit {:?}",
            config.memory
        );
    }
    let _guard = Guard {
        monitor_stop,
        queue: queue.clone(),
        peer_server: tokio::spawn(serve_peers(listener, store.clone(), config.token.clone(), bytes_out.clone())),
    };

    let info = WorkerInfo {
        name: config.name.clone(),
        address: address.clone(),
        nthreads: config.nthreads,
        memory_limit: config.memory_limit,
        resources: config.resources.clone(),
        placement: rdask_transport::protocol::Placement {
            host: if config.placement.host.is_empty() { hostname() } else { config.placement.host.clone() },
            local_directory: config.local_directory.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
            ..config.placement.clone()
        },
    };
    let register = |info: WorkerInfo| async {
        let mut conn = rdask_transport::connect(&config.scheduler, limits).await?;
        handshake_connect(&mut conn, Role::Worker, config.token.as_deref()).await?;
        conn.sender.send(Frame::from_message(&FromWorkerMessage::Register(info)))?;
        let first = conn.receiver.recv().await?.ok_or(TransportError::Closed)?;
        let registered = match ToWorkerMessage::access(&first.control)? {
            ArchivedToWorkerMessage::Registered { worker_id, heartbeat_ms } => Ok((worker_id.get(), heartbeat_ms.to_native())),
            ArchivedToWorkerMessage::Error { message } => Err(message.to_string()),
            _ => Err("expected Registered".to_string()),
        };
        Ok::<_, TransportError>((conn, registered))
    };
    // A scheduler that is still starting, or a thousand workers arriving at
    // once, can make an attempt fail; retry with backoff until
    // `connect_timeout`. A refusal (version, token, registration) is final.
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let mut backoff = Duration::from_millis(50);
    let (conn, (id, heartbeat_ms)) = loop {
        let source = match tokio::time::timeout_at(deadline, register(info.clone())).await {
            Ok(Ok((conn, Ok(reg)))) => break (conn, reg),
            Ok(Ok((_, Err(refusal)))) => return Err(WorkerError::Refused(refusal)),
            Ok(Err(e @ (TransportError::Handshake(_) | TransportError::VersionMismatch { .. } | TransportError::Unauthorized(_) | TransportError::Tls(_)))) => {
                return Err(WorkerError::Connect { address: config.scheduler.clone(), source: e })
            }
            Ok(Err(e)) => e,
            Err(_) => TransportError::Timeout(format!("no registration within {:?}", config.connect_timeout)),
        };
        if tokio::time::Instant::now() + backoff >= deadline {
            return Err(WorkerError::Connect { address: config.scheduler.clone(), source });
        }
        tracing::debug!(scheduler = %config.scheduler, "registration failed, retrying in {backoff:?}: {source}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    };
    tracing::info!(worker = %id, name = %config.name, %address, "registered with scheduler");

    // The frame reader is not cancel-safe, so it gets its own task and the
    // loop below selects on a channel instead.
    let (sched_tx, mut sched_rx) = mpsc::channel::<Result<Frame, TransportError>>(64);
    let mut receiver = conn.receiver;
    let reader = tokio::spawn(async move {
        loop {
            let r = receiver.recv().await;
            let end = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err(TransportError::Closed),
                Err(e) => Err(e),
            };
            if sched_tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    let _abort_reader = AbortOnDrop(reader);

    let (fetch_tx, mut fetch_rx) = mpsc::unbounded_channel();
    let mut st = State {
        id,
        pool: PeerPool::shared(config.token.clone()),
        config,
        executor,
        store,
        queue,
        tasks: Default::default(),
        peers: Default::default(),
        fetches: Default::default(),
        to_request: Default::default(),
        in_flight: 0,
        fetch_tx,
        out: Outgoing::default(),
        to_run: Vec::new(),
        reported: Default::default(),
        sweep_buf: Vec::new(),
        inline_done: Vec::new(),
        seq: 0,
        bytes_in: 0,
        report_spans: false,
    };
    let sender = conn.sender;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(100) as u64));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(EXECUTING_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Sweeping only while tasks run: an idle worker does not wake up.
    let mut sweeping = false;
    let queue = st.queue.clone();
    let mut cpu = crate::procinfo::CpuMeter::new();
    let mut transfers = (std::time::Instant::now(), 0u64, 0u64);
    let leave = leave;
    tokio::pin!(leave);

    loop {
        tokio::select! {
            biased;
            () = &mut leave => {
                tracing::info!(worker = %st.id, "leaving: telling the scheduler");
                st.flush(&sender);
                let _ = sender.send(Frame::from_message(&FromWorkerMessage::Leaving));
                // The scheduler closes the connection once it has taken note;
                // the worker's end must not suspect the tasks it ran.
                let _ = tokio::time::timeout(LEAVE_WAIT, async {
                    while let Some(Ok(_)) = sched_rx.recv().await {}
                })
                .await;
                return Ok(());
            }
            Some(id) = starting_rx.recv() => {
                st.out.confirm.push(id);
                while let Ok(id) = starting_rx.try_recv() {
                    st.out.confirm.push(id);
                }
            }
            Some(crate::memory::MemoryEvent::Paused(paused)) = memory_rx.recv() => {
                st.flush(&sender);
                let _ = sender.send(Frame::from_message(&FromWorkerMessage::Paused(paused)));
            }
            Some(done) = done_rx.recv() => {
                st.on_done(done);
                while let Ok(done) = done_rx.try_recv() {
                    st.on_done(done);
                }
            }
            Some(fetched) = fetch_rx.recv() => {
                st.on_fetched(fetched);
                while let Ok(f) = fetch_rx.try_recv() {
                    st.on_fetched(f);
                }
            }
            msg = sched_rx.recv() => {
                let mut next = msg;
                loop {
                    match next {
                        Some(Ok(frame)) => {
                            if st.on_scheduler_frame(&frame)? {
                                tracing::info!(worker = %st.id, "scheduler asked us to stop");
                                st.flush(&sender);
                                return Ok(());
                            }
                        }
                        Some(Err(e)) => return Err(WorkerError::Protocol(format!("lost the scheduler: {e}"))),
                        None => return Err(WorkerError::Protocol("lost the scheduler".into())),
                    }
                    match sched_rx.try_recv() {
                        Ok(f) => next = Some(f),
                        Err(_) => break,
                    }
                }
            }
            () = queue.sweep_wake.notified(), if !sweeping => {
                sweeping = true;
                sweep.reset_after(EXECUTING_SWEEP);
            }
            _ = sweep.tick(), if sweeping => {
                st.sweep_executing();
                if st.reported.is_empty() && queue.stop_sweeping() {
                    sweeping = false;
                }
            }
            _ = heartbeat.tick() => {
                let (queued, running) = st.queue.load();
                let stats = st.store.stats();
                let rss = crate::procinfo::memory(std::process::id()).map_or(0, |(rss, _)| rss);
                let (bytes_in, bytes_out) = (st.bytes_in, bytes_out.load(std::sync::atomic::Ordering::Relaxed));
                let secs = transfers.0.elapsed().as_secs_f64().max(1e-3);
                let load = WorkerLoad {
                    running: running as u32,
                    queued: queued as u32,
                    // Device values moved to host memory are host memory the
                    // worker manages too (the target counts them).
                    stored_bytes: stats.memory_bytes + st.config.device.as_ref().map_or(0, |l| l.on_host_bytes()),
                    spilled_bytes: stats.disk_bytes,
                    spilled_values: stats.disk_values,
                    spilled_total_bytes: stats.spilled_total_bytes,
                    unspilled_total_bytes: stats.unspilled_total_bytes,
                    device: device_load(st.config.device.as_deref()),
                    cpu_percent: cpu.percent(),
                    rss,
                    bytes_in,
                    bytes_out,
                    in_per_s: (bytes_in.saturating_sub(transfers.1) as f64 / secs) as f32,
                    out_per_s: (bytes_out.saturating_sub(transfers.2) as f64 / secs) as f32,
                };
                transfers = (std::time::Instant::now(), bytes_in, bytes_out);
                let _ = sender.send(Frame::from_message(&FromWorkerMessage::Heartbeat(load)));
            }
        }
        st.pump_fetches();
        if !st.to_run.is_empty() {
            st.queue.push_many(st.to_run.drain(..));
        }
        if !st.inline_done.is_empty() {
            let done = std::mem::take(&mut st.inline_done);
            st.record(done);
        }
        st.flush(&sender);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl State {
    /// Returns true when the scheduler said Stop.
    fn on_scheduler_frame(&mut self, frame: &Frame) -> Result<bool, WorkerError> {
        match ToWorkerMessage::access(&frame.control)? {
            ArchivedToWorkerMessage::Compute(batch) => {
                for p in batch.peers.iter() {
                    self.peers.entry(p.id.get()).or_insert_with(|| p.address.to_string());
                }
                for t in batch.tasks.iter() {
                    let payload = match t.payload.to_native() {
                        NO_FRAME => Bytes::new(),
                        i => frame.data_frame(i)?.clone(),
                    };
                    let needs = match t.resources.to_native() {
                        NO_FRAME => Vec::new(),
                        i => batch
                            .resource_sets
                            .get(i as usize)
                            .ok_or_else(|| WorkerError::Protocol(format!("resource set {i} out of range")))?
                            .iter()
                            .map(|r| Resource { name: r.name.to_string(), amount: r.amount.to_native() })
                            .collect(),
                    };
                    self.on_compute(t, payload, needs);
                }
            }
            ArchivedToWorkerMessage::Release(ids) => {
                self.store.remove_many(ids.iter().map(|id| id.get()));
            }
            ArchivedToWorkerMessage::Steal(ids) => {
                for id in ids.iter() {
                    let id = id.get();
                    let stolen = self.give_up(id);
                    self.out.steal.push(StealOutcome { id, stolen });
                }
            }
            ArchivedToWorkerMessage::Cancel(ids) => {
                for id in ids.iter() {
                    self.give_up(id.get());
                }
            }
            ArchivedToWorkerMessage::Error { message } => {
                tracing::error!(worker = %self.id, "scheduler reports an error: {}", message.as_str());
            }
            ArchivedToWorkerMessage::Registered { .. } => {
                return Err(WorkerError::Protocol("registered twice".into()));
            }
            ArchivedToWorkerMessage::Stop => return Ok(true),
            ArchivedToWorkerMessage::ReportSpans(on) => self.report_spans = *on,
            ArchivedToWorkerMessage::ExecutingSeen(ids) => {
                self.queue.confirm(ids.iter().map(|id| id.get()));
            }
        }
        Ok(false)
    }

    fn on_compute(&mut self, t: &ArchivedComputeTask, payload: Bytes, needs: Vec<Resource>) {
        let id = t.id.get();
        // Fast path: a trivial task whose inputs are all here (none, or a
        // reduction whose subtree shares this worker) runs right away, with
        // no bookkeeping record at all.
        // One look into the store serves both the fast path and the fetch plan.
        let values = self.store.lookup_many(t.deps.iter().map(|d| d.id.get()));
        if self.executor.is_trivial(&payload) && values.iter().all(|v| matches!(v, Some(Held::Memory(_)))) {
            let inputs: smallvec::SmallVec<[Value; 4]> =
                values.into_iter().map(|v| match v { Some(Held::Memory(v)) => v, _ => unreachable!() }).collect();
            let result = self.executor.execute_trivial(id, t.key.as_str(), &payload, &inputs);
            self.inline_done.push((id, result));
            return;
        }
        let mut missing = 0;
        let mut deps = Vec::with_capacity(t.deps.len());
        for (d, value) in t.deps.iter().zip(values) {
            let is_local = value.is_some();
            let dep = d.id.get();
            deps.push(dep);
            if is_local {
                continue;
            }
            missing += 1;
            match self.fetches.get_mut(&dep) {
                Some(f) => f.waiters.push(id),
                None => {
                    let holders = d.holders.iter().map(|h| h.get()).collect();
                    let waiters = smallvec::smallvec![id];
                    self.fetches.insert(dep, DepFetch { holders, size: d.size.to_native(), tried: 0, last_asked: None, waiters });
                    self.request_next(dep);
                }
            }
        }
        self.seq += 1;
        let priority = JobPriority { user: t.user_priority.to_native(), order: t.order.to_native(), seq: self.seq };
        self.tasks.insert(
            id,
            LocalTask {
                key: t.key.to_string(),
                payload,
                deps,
                missing,
                priority,
                stage: Stage::Fetching,
                careful: t.careful,
                needs,
            },
        );
        if missing == 0 {
            self.start(id);
        }
    }

    /// Queues a request for `dep` from its next untried holder, or fails the
    /// tasks waiting for it when every holder has been tried.
    fn request_next(&mut self, dep: TaskId) {
        let f = self.fetches.get_mut(&dep).expect("fetch entry");
        if f.tried < f.holders.len() {
            // Spread load: different workers start at different holders.
            let holder = f.holders[(f.tried + self.id.as_usize()) % f.holders.len()];
            f.tried += 1;
            f.last_asked = Some(holder);
            self.to_request.entry(holder).or_default().push(dep);
            return;
        }
        let f = self.fetches.remove(&dep).unwrap();
        let holder = f.last_asked.unwrap_or(self.id);
        for w in f.waiters {
            if self.tasks.remove(&w).is_some() {
                tracing::warn!(task = %w, %dep, "could not fetch input from any holder");
                self.out.fetch_failed.push(FetchFailure { task: w, dep, holder });
            }
        }
    }

    fn pump_fetches(&mut self) {
        while self.in_flight < self.config.max_concurrent_fetches && !self.to_request.is_empty() {
            let holder = *self.to_request.keys().next().unwrap();
            let queue = self.to_request.get_mut(&holder).unwrap();
            // At most max_fetch_batch values and (beyond the first) at most
            // max_fetch_bytes per request: the reply is one frame.
            let mut take = 0;
            let mut bytes = 0u64;
            for dep in queue.iter().take(self.config.max_fetch_batch) {
                let size = self.fetches.get(dep).map_or(0, |f| f.size);
                if take > 0 && bytes + size > self.config.max_fetch_bytes {
                    break;
                }
                bytes += size;
                take += 1;
            }
            let ids: Vec<TaskId> = queue.drain(..take).collect();
            if queue.is_empty() {
                self.to_request.remove(&holder);
            }
            let Some(address) = self.peers.get(&holder).cloned() else {
                let result = Err(TransportError::InvalidAddress(holder.to_string(), "unknown peer".into()));
                self.on_fetched(FetchDone { holder, counted: false, ids, result });
                continue;
            };
            self.in_flight += 1;
            let pool = self.pool.clone();
            let tx = self.fetch_tx.clone();
            let timeout = self.config.fetch_timeout;
            tokio::spawn(async move {
                // A peer that hangs (rather than dies) must not hold a fetch
                // slot forever: time out and try the next holder.
                let result = match tokio::time::timeout(timeout, pool.fetch(&address, ids.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(TransportError::Timeout(format!("no answer from {address} within {timeout:?}"))),
                };
                let _ = tx.send(FetchDone { holder, counted: true, ids, result });
            });
        }
    }

    fn on_fetched(&mut self, done: FetchDone) {
        if done.counted {
            self.in_flight -= 1;
        }
        let items = match done.result {
            Ok(items) => items,
            Err(e) => {
                // A dead peer fails many fetches at once: one line per 5 s.
                if let Some(held_back) = FETCH_WARNINGS.allow() {
                    tracing::warn!(worker = %self.id, holder = %done.holder, held_back, "fetch failed: {e}");
                } else {
                    tracing::debug!(worker = %self.id, holder = %done.holder, "fetch failed: {e}");
                }
                done.ids.iter().map(|id| (*id, FetchedValue::Missing)).collect()
            }
        };
        // Store everything that arrived under one lock, then wake waiters.
        let mut arrived = Vec::with_capacity(items.len());
        for (dep, fetched) in items {
            if !self.fetches.contains_key(&dep) {
                continue;
            }
            match fetched {
                FetchedValue::Value(frames) => {
                    self.bytes_in += self.executor.received_bytes(&frames);
                    match self.executor.deserialize(frames) {
                        Ok(v) => arrived.push((dep, v)),
                        // Another holder would send the same bytes: the tasks
                        // that need this value fail with the reason.
                        Err(e) => self.fail_waiters(dep, "cannot deserialise", e),
                    }
                }
                FetchedValue::Unserializable { message, payload } => {
                    self.fail_waiters(dep, "cannot serialise", TaskFailure { message, payload })
                }
                FetchedValue::Missing => self.request_next(dep),
            }
        }
        let deps: Vec<TaskId> = arrived.iter().map(|(d, _)| *d).collect();
        self.store.insert_many(arrived);
        for dep in deps {
            self.out.replicas.push(dep);
            let f = self.fetches.remove(&dep).unwrap();
            for w in f.waiters {
                if let Some(t) = self.tasks.get_mut(&w) {
                    t.missing -= 1;
                    if t.missing == 0 {
                        self.start(w);
                    }
                }
            }
        }
    }

    /// The value of `dep` exists but cannot reach this worker: every task
    /// waiting for it fails with `why` (the executor's payload kept, so a
    /// Python client re-raises the original exception).
    fn fail_waiters(&mut self, dep: TaskId, what: &str, why: TaskFailure) {
        let Some(f) = self.fetches.remove(&dep) else { return };
        let mut failures = Vec::new();
        for w in f.waiters {
            let Some(t) = self.tasks.remove(&w) else { continue };
            tracing::warn!(task = %t.key, input = %dep, "{what} input: {}", why.message);
            let message = format!("{what} an input of task {} (held elsewhere): {}", t.key, why.message);
            failures.push((w, Err(TaskFailure { message, payload: why.payload.clone() })));
        }
        self.record(failures);
    }

    fn start(&mut self, id: TaskId) {
        let t = self.tasks.get_mut(&id).unwrap();
        let values = self.store.load_many(t.deps.iter().copied());
        let mut inputs = Vec::with_capacity(values.len());
        for (dep, v) in std::mem::take(&mut t.deps).into_iter().zip(values) {
            match v {
                Some(v) => inputs.push(v),
                None => {
                    // Released under us; the scheduler will place the task again.
                    self.out.fetch_failed.push(FetchFailure { task: id, dep, holder: self.id });
                    self.tasks.remove(&id);
                    return;
                }
            }
        }
        t.stage = Stage::Queued;
        // The record keeps only what steal/cancel need; key and payload move on.
        let run = TaskRun { id, key: std::mem::take(&mut t.key), payload: std::mem::take(&mut t.payload), inputs };
        if self.executor.is_trivial(&run.payload) {
            // Runs now, on this loop; reported with the thread pool's results.
            self.tasks.remove(&id);
            let result = self.executor.execute(run);
            self.inline_done.push((id, result));
        } else {
            self.to_run.push(Job { priority: t.priority, run, careful: t.careful, needs: std::mem::take(&mut t.needs) });
        }
    }

    /// Drops a task that has not started. False if it is running (or unknown).
    fn give_up(&mut self, id: TaskId) -> bool {
        let Some(t) = self.tasks.get(&id) else { return false };
        let gone = match t.stage {
            Stage::Fetching => {
                // Not a waiter any more: if the task comes back while the
                // fetch runs, it must not be counted twice.
                for dep in &t.deps {
                    if let Some(f) = self.fetches.get_mut(dep) {
                        f.waiters.retain(|w| *w != id);
                    }
                }
                true
            }
            Stage::Queued => self.queue.take(id),
        };
        if gone {
            self.tasks.remove(&id);
        }
        gone
    }

    /// Reports tasks that run user code and were not reported yet; forgets
    /// reported ones that ended.
    fn sweep_executing(&mut self) {
        let mut now = std::mem::take(&mut self.sweep_buf);
        now.clear();
        self.queue.executing_into(&mut now);
        // A task whose completion was handled already is not reported.
        now.retain(|id| self.tasks.contains_key(id));
        self.reported.retain(|id| now.contains(id));
        for id in &now {
            if self.reported.insert(*id) {
                self.out.executing.push(*id);
            }
        }
        self.sweep_buf = now;
    }

    /// Results from the executor threads.
    fn on_done(&mut self, done: Done) {
        let Done { completions: mut batch, spans } = done;
        batch.retain(|(id, _)| self.tasks.remove(id).is_some()); // else cancelled while running
        if self.report_spans {
            self.out.spans.extend(spans);
        }
        self.record(batch);
    }

    /// Stores values and queues the reports of finished tasks.
    fn record(&mut self, batch: Vec<Completion>) {
        let mut values = Vec::with_capacity(batch.len());
        for (id, result) in batch {
            match result {
                Ok(value) => {
                    self.out.finished.push(FinishedTask { id, size: value.size() });
                    values.push((id, value));
                }
                Err(f) => {
                    let payload = if f.payload.is_empty() {
                        NO_FRAME
                    } else {
                        self.out.failed_data.push(f.payload);
                        (self.out.failed_data.len() - 1) as u32
                    };
                    self.out.failed.push(FailedTask { id, message: f.message, payload });
                }
            }
        }
        self.store.insert_many(values);
    }

    fn flush(&mut self, sender: &FrameSender) {
        let out = std::mem::take(&mut self.out);
        let send = |frame: Frame| {
            if let Err(e) = sender.send(frame) {
                tracing::debug!("send to scheduler failed: {e}");
            }
        };
        // Starts before completions: a task reported running and finished in
        // one flush is simply finished.
        if !out.confirm.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::Executing { tasks: out.confirm, confirm: true }));
        }
        if !out.executing.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::Executing { tasks: out.executing, confirm: false }));
        }
        if !out.spans.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::Spans(out.spans)));
        }
        // Replicas before completions: a dependent finishing may release them.
        if !out.replicas.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::ReplicasAdded(out.replicas)));
        }
        if !out.finished.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::Finished(out.finished)));
        }
        if !out.failed.is_empty() {
            send(Frame::with_data(&FromWorkerMessage::Failed(out.failed), out.failed_data));
        }
        if !out.fetch_failed.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::FetchFailed(out.fetch_failed)));
        }
        if !out.steal.is_empty() {
            send(Frame::from_message(&FromWorkerMessage::StealReply(out.steal)));
        }
    }
}

/// This machine's name, for the worker's registration.
/// The device tier's figures for a heartbeat.
fn device_load(ledger: Option<&crate::device_tier::DeviceLedger>) -> rdask_transport::protocol::DeviceLoad {
    let Some(ledger) = ledger else { return Default::default() };
    let s = ledger.stats();
    rdask_transport::protocol::DeviceLoad {
        bytes: s.device_bytes,
        limit: s.limit,
        spilled_bytes: s.on_host_bytes,
        spilled_values: s.on_host_values,
        spilled_total_bytes: s.spilled_total_bytes,
        unspilled_total_bytes: s.unspilled_total_bytes,
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
