//! The scheduler's state machine. No sockets, no clock: handlers take the
//! core, the outbox ([`Comm`]) and, where time matters, `now`. The reactor
//! calls them; tests drive them directly.

pub mod coord;
mod lifecycle;
pub mod membership;
mod placement;
mod ready;
mod submit;
pub mod task;

use hashbrown::HashTable;
use rdask_transport::protocol::{
    ArchivedFromClientMessage, ArchivedFromWorkerMessage, ClusterInfo, Resource, Restriction, ToClientMessage,
    ToWorkerMessage, WorkerSummary,
};
use rdask_transport::{ClientId, Frame, TaskId, WorkerId};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::comm::Comm;
use crate::error::SchedError;
pub use task::{Priority, Task, TaskError, TaskSlab, TaskState};

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Tasks a worker may hold (queued + running) per thread before the
    /// scheduler keeps further ready tasks back in its own queue. Large enough
    /// to hide a round trip for micro-tasks; stealing fixes imbalance.
    pub tasks_per_thread: u32,
    /// A task may be running on this many workers that die; one more death
    /// makes it err with KilledWorker (Dask's `allowed-failures`, default 3).
    pub allowed_failures: u8,
    pub heartbeat_ms: u32,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig { tasks_per_thread: 256, allowed_failures: 3, heartbeat_ms: 1000 }
    }
}

#[derive(Debug)]
pub struct Worker {
    pub name: String,
    pub address: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub resources: Vec<Resource>,
    pub placement: rdask_transport::protocol::Placement,
    /// Assigned and not finished (queued or running there).
    pub processing: FxHashSet<TaskId>,
    /// Values this worker holds (the tasks list it in `holders`; a worker
    /// that leaves is found there by one scan, which is cheaper overall than
    /// a per-worker set updated on every completion and release).
    pub stored_values: u64,
    pub stored_bytes: u64,
    pub steals_in_flight: u32,
    /// Tasks being stolen for this worker (steal requests not answered yet).
    pub incoming_steals: u32,
    /// Milliseconds of the last message from it (time passed in by the caller).
    pub last_seen_ms: u64,
    /// The worker said it is leaving (`Leaving`): it gets no new work, and
    /// its departure suspects none of its tasks.
    pub leaving: bool,
    /// Its memory is above the pause threshold: it gets no new work, and
    /// idle workers may steal what it has queued.
    pub paused: bool,
    /// What its last heartbeat said (for the dashboard and /metrics).
    pub load: rdask_transport::protocol::WorkerLoad,
}

impl Worker {
    pub fn load(&self) -> u32 {
        self.processing.len() as u32
    }

    /// Whether new tasks may go to it.
    pub fn takes_work(&self) -> bool {
        !self.leaving && !self.paused
    }
}

#[derive(Debug, Default)]
pub struct Client {
    pub wanted: FxHashSet<TaskId>,
    /// Per graph id: tasks of a multi-batch submission whose last batch has
    /// not arrived.
    pub pinned: FxHashMap<u64, Vec<TaskId>>,
}

/// Counters for progress reporting and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub submitted: u64,
    pub finished: u64,
    pub failed: u64,
    pub stolen: u64,
    pub recomputed: u64,
    pub forgotten: u64,
}

pub struct Core {
    pub config: CoreConfig,
    pub tasks: TaskSlab,
    /// Key → task, hashing the key stored in the task (no second copy).
    keys: HashTable<TaskId>,
    hasher: rustc_hash::FxBuildHasher,
    pub workers: FxHashMap<WorkerId, Worker>,
    pub clients: FxHashMap<ClientId, Client>,
    ready: ready::ReadyQueue,
    next_worker: u32,
    next_client: u32,
    next_seq: u32,
    /// Round-robin cursor over `worker_order` for tasks without inputs.
    rr_cursor: usize,
    /// Tasks given to the worker at `rr_cursor` in its current block.
    rr_filled: u32,
    /// Size of the most recent graph as its client announced it.
    graph_tasks_hint: u64,
    worker_order: Vec<WorkerId>,
    /// Set when some worker dropped below one task per thread; balancing
    /// (stealing) only runs then.
    idle_hint: bool,
    /// Stolen tasks to hand to the worker they were stolen for.
    pending_assign: Vec<(TaskId, WorkerId)>,
    /// Placement restrictions, for the few tasks that have them (a side
    /// table, so unrestricted tasks pay nothing).
    restrictions: FxHashMap<TaskId, Box<Restriction>>,
    /// Ready restricted tasks no allowed worker has room for; retried on
    /// every scheduling round.
    parked: Vec<TaskId>,
    pub stats: Stats,
    pub scheduler_id: String,
    /// The dashboard's link, for clients (`client.dashboard_link`); empty: off.
    pub dashboard: String,
    /// The most recent task runs on worker threads (oldest first), for the
    /// task stream; at most `STREAM_EVENTS`.
    pub stream: std::collections::VecDeque<StreamRecord>,
    /// Addresses of every worker that ever joined, for stream events of
    /// workers that have left.
    pub stream_workers: FxHashMap<WorkerId, Box<str>>,
    /// Whether task runs are kept: on with a dashboard, and from the first
    /// task stream request on (a copy of each key per run is not free for
    /// micro-tasks nobody watches).
    pub stream_enabled: bool,
    /// Locks, semaphores, variables, events, queues and datasets.
    coord: coord::Coordination,
    /// Requests for the scheduler's Python side (`SchedulerCall`), for the
    /// reactor to hand over (or refuse, when there is none).
    pub host_calls: Vec<HostCall>,
    /// Whether a scheduler plugin wants task transitions (then each task
    /// that finishes or fails is queued in `transitions_out`); off, the
    /// per-task cost is one flag test.
    pub host_transitions: bool,
    pub transitions_out: Vec<(String, &'static str, &'static str)>,
}

/// A `SchedulerCall` from a client, for the scheduler's Python side.
#[derive(Debug, Clone)]
pub struct HostCall {
    pub client: ClientId,
    pub request_id: u64,
    pub kind: String,
    pub name: String,
    pub payload: rdask_transport::bytes::Bytes,
}

/// Task runs kept for the task stream (about 100 bytes each).
pub const STREAM_EVENTS: usize = 100_000;

/// One task run as the worker reported it (`FromWorkerMessage::Spans`).
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub key: Box<str>,
    pub worker: WorkerId,
    pub thread: u32,
    pub start_us: u64,
    pub stop_us: u64,
    pub ok: bool,
}

impl Core {
    pub fn new(config: CoreConfig) -> Self {
        Core {
            config,
            tasks: TaskSlab::default(),
            keys: HashTable::new(),
            hasher: Default::default(),
            workers: Default::default(),
            clients: Default::default(),
            ready: Default::default(),
            next_worker: 0,
            next_client: 0,
            next_seq: 0,
            rr_cursor: 0,
            rr_filled: 0,
            graph_tasks_hint: 0,
            worker_order: Vec::new(),
            idle_hint: false,
            pending_assign: Vec::new(),
            restrictions: Default::default(),
            parked: Vec::new(),
            stats: Stats::default(),
            scheduler_id: format!("rdask-scheduler-{}", std::process::id()),
            dashboard: String::new(),
            stream: Default::default(),
            stream_workers: Default::default(),
            stream_enabled: false,
            coord: Default::default(),
            host_calls: Vec::new(),
            host_transitions: false,
            transitions_out: Vec::new(),
        }
    }

    fn hash_key(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    pub fn lookup(&self, key: &str) -> Option<TaskId> {
        self.lookup_hashed(key, self.hash_key(key))
    }

    fn lookup_hashed(&self, key: &str, h: u64) -> Option<TaskId> {
        self.keys.find(h, |&id| &*self.tasks[id].key == key).copied()
    }

    fn reserve_keys(&mut self, n: usize) {
        let tasks = &self.tasks;
        let hasher = &self.hasher;
        self.keys.reserve(n, |&other| {
            use std::hash::BuildHasher;
            hasher.hash_one(&*tasks[other].key)
        });
    }

    /// Indexes a new task's key; `h` is `hash_key` of it.
    fn index_key(&mut self, id: TaskId, h: u64) {
        let tasks = &self.tasks;
        let hasher = &self.hasher;
        self.keys.insert_unique(h, id, |&other| {
            use std::hash::BuildHasher;
            hasher.hash_one(&*tasks[other].key)
        });
    }

    fn unindex_key(&mut self, id: TaskId, key: &str) {
        let h = self.hash_key(key);
        if let Ok(entry) = self.keys.find_entry(h, |&other| other == id) {
            entry.remove();
        }
    }

    /// With no task left (a large graph finished and was released), gives
    /// back the memory its bookkeeping grew to. True if there was something
    /// worth giving back; the caller may then trim the allocator.
    pub fn release_memory_if_idle(&mut self) -> bool {
        if !self.tasks.is_empty() || !self.tasks.release_if_empty() {
            return false;
        }
        // Every entry left in these refers to a forgotten task.
        self.keys = HashTable::new();
        self.ready.release();
        self.parked = Vec::new();
        self.pending_assign = Vec::new();
        self.restrictions = Default::default();
        true
    }

    pub fn task_state(&self, key: &str) -> Option<TaskState> {
        self.lookup(key).map(|id| self.tasks[id].state)
    }

    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Handles one frame from a client. An `Err` goes back to that client;
    /// nothing else is affected.
    pub fn on_client_frame(&mut self, comm: &mut Comm, client: ClientId, frame: &Frame) -> Result<(), SchedError> {
        let msg = frame.access::<rdask_transport::protocol::FromClientMessage>()?;
        match msg {
            ArchivedFromClientMessage::Submit(graph) => self.on_submit(comm, client, graph, &frame.data),
            ArchivedFromClientMessage::Release { keys } => {
                for key in keys.iter() {
                    self.client_releases(comm, client, key.as_str());
                }
                Ok(())
            }
            ArchivedFromClientMessage::Cancel { keys } => {
                let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
                self.cancel_keys(comm, &keys);
                Ok(())
            }
            ArchivedFromClientMessage::WhoHas { request_id, keys } => {
                self.who_has(comm, client, request_id.to_native(), keys.iter().map(|k| k.as_str()));
                Ok(())
            }
            ArchivedFromClientMessage::TaskStream { request_id, since_us } => {
                self.enable_stream(comm);
                let events = self.task_stream(since_us.to_native());
                comm.send_client(client, ToClientMessage::TaskStream { request_id: request_id.to_native(), events });
                Ok(())
            }
            ArchivedFromClientMessage::ClusterInfo { request_id } => {
                let info = self.cluster_info();
                comm.send_client(client, ToClientMessage::ClusterInfo { request_id: request_id.to_native(), info });
                Ok(())
            }
            ArchivedFromClientMessage::Close => {
                self.remove_client(comm, client);
                Ok(())
            }
            ArchivedFromClientMessage::Processing { request_id } => {
                let mut workers: Vec<(String, Vec<String>)> = self
                    .worker_order
                    .iter()
                    .filter_map(|w| self.workers.get(w))
                    .map(|w| (w.address.clone(), w.processing.iter().map(|t| String::from(&*self.tasks[*t].key)).collect()))
                    .collect();
                workers.sort();
                comm.send_client(client, ToClientMessage::Processing { request_id: request_id.to_native(), workers });
                Ok(())
            }
            ArchivedFromClientMessage::DropReplicas { request_id, items } => {
                let mut dropped = 0;
                for item in items.iter() {
                    dropped += u64::from(self.drop_replica(comm, item.0.as_str(), item.1.as_str()));
                }
                comm.send_client(client, ToClientMessage::ReplicasDropped { request_id: request_id.to_native(), dropped });
                Ok(())
            }
            ArchivedFromClientMessage::SchedulerCall { request_id, kind, name } => {
                self.host_calls.push(HostCall {
                    client,
                    request_id: request_id.to_native(),
                    kind: kind.to_string(),
                    name: name.to_string(),
                    payload: frame.data.first().cloned().unwrap_or_default(),
                });
                Ok(())
            }
            ArchivedFromClientMessage::Coord { request_id, op } => {
                self.on_coord(comm, client, request_id.to_native(), op, &frame.data);
                Ok(())
            }
        }
    }

    /// Handles one frame from a worker. An `Err` means the worker sent
    /// something invalid; the reactor disconnects it.
    pub fn on_worker_frame(&mut self, comm: &mut Comm, worker: WorkerId, frame: &Frame, now_ms: u64) -> Result<(), SchedError> {
        let msg = frame.access::<rdask_transport::protocol::FromWorkerMessage>()?;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.last_seen_ms = now_ms;
        }
        match msg {
            ArchivedFromWorkerMessage::Register(_) => {
                return Err(SchedError::BadMessage("worker registered twice".into()));
            }
            ArchivedFromWorkerMessage::Finished(items) => {
                for item in items.iter() {
                    self.task_finished(comm, worker, item.id.get(), item.size.to_native());
                }
            }
            ArchivedFromWorkerMessage::Failed(items) => {
                for item in items.iter() {
                    let payload = if item.payload.to_native() == rdask_transport::protocol::NO_FRAME {
                        Default::default()
                    } else {
                        frame.data_frame(item.payload.to_native())?.clone()
                    };
                    self.task_failed(comm, worker, item.id.get(), item.message.as_str(), payload);
                }
            }
            ArchivedFromWorkerMessage::ReplicasAdded(ids) => {
                for id in ids.iter() {
                    self.replica_added(comm, worker, id.get());
                }
            }
            ArchivedFromWorkerMessage::FetchFailed(items) => {
                for f in items.iter() {
                    self.fetch_failed(comm, worker, f.task.get(), f.dep.get(), f.holder.get());
                }
            }
            ArchivedFromWorkerMessage::StealReply(items) => {
                for s in items.iter() {
                    self.steal_reply(worker, s.id.get(), s.stolen);
                }
            }
            ArchivedFromWorkerMessage::Heartbeat(load) => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.load = rdask_transport::rkyv::deserialize::<_, rdask_transport::rkyv::rancor::Error>(load)
                        .unwrap_or_default();
                }
            }
            ArchivedFromWorkerMessage::Executing { tasks, confirm } => {
                for id in tasks.iter() {
                    self.task_executing(worker, id.get());
                }
                if *confirm {
                    comm.send_worker(worker, ToWorkerMessage::ExecutingSeen(tasks.iter().map(|t| t.get()).collect()));
                }
            }
            ArchivedFromWorkerMessage::Spans(spans) if self.stream_enabled => {
                for s in spans.iter() {
                    let Some(t) = self.tasks.get(s.id.get()) else { continue };
                    if self.stream.len() >= STREAM_EVENTS {
                        self.stream.pop_front();
                    }
                    self.stream.push_back(StreamRecord {
                        key: t.key.clone(),
                        worker,
                        thread: s.thread.to_native(),
                        start_us: s.start_us.to_native(),
                        stop_us: s.stop_us.to_native(),
                        ok: s.ok,
                    });
                }
            }
            ArchivedFromWorkerMessage::Spans(_) => {}
            ArchivedFromWorkerMessage::Paused(paused) => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    if w.paused != *paused {
                        tracing::info!(worker = %worker, name = %w.name, "worker {}", if *paused { "paused (memory above its pause threshold)" } else { "resumed" });
                    }
                    w.paused = *paused;
                }
            }
            ArchivedFromWorkerMessage::Leaving => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    tracing::info!(worker = %worker, name = %w.name, "worker is leaving");
                    w.leaving = true;
                }
            }
        }
        Ok(())
    }

    /// Keeps task runs from now on and asks every worker to report them.
    pub fn enable_stream(&mut self, comm: &mut Comm) {
        if !self.stream_enabled {
            self.stream_enabled = true;
            for &w in &self.worker_order {
                comm.send_worker(w, ToWorkerMessage::ReportSpans(true));
            }
        }
    }

    /// Stream events that ended at or after `since_us`.
    pub fn task_stream(&self, since_us: u64) -> Vec<rdask_transport::protocol::StreamEvent> {
        // Events arrive roughly in end order; scan from the newest back.
        let from = self.stream.iter().rposition(|e| e.stop_us < since_us).map_or(0, |i| i + 1);
        self.stream
            .range(from..)
            .filter(|e| e.stop_us >= since_us)
            .map(|e| rdask_transport::protocol::StreamEvent {
                key: e.key.to_string(),
                worker: self.stream_workers.get(&e.worker).map_or_else(String::new, |a| a.to_string()),
                thread: e.thread,
                start_us: e.start_us,
                stop_us: e.stop_us,
                ok: e.ok,
            })
            .collect()
    }

    pub fn cluster_info(&self) -> ClusterInfo {
        let mut workers: Vec<WorkerSummary> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerSummary {
                id: *id,
                name: w.name.clone(),
                address: w.address.clone(),
                nthreads: w.nthreads,
                memory_limit: w.memory_limit,
                placement: w.placement.clone(),
                processing: w.processing.len() as u64,
                stored_values: w.stored_values,
                stored_bytes: w.stored_bytes,
                paused: w.paused,
                load: w.load,
                resources: w.resources.clone(),
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        ClusterInfo {
            scheduler_id: self.scheduler_id.clone(),
            dashboard: self.dashboard.clone(),
            clients: self.clients.keys().filter(|c| **c != coord::COORD_CLIENT).count() as u64,
            workers,
            tasks: self.tasks.len() as u64,
            ready: self.ready.len() as u64,
            submitted: self.stats.submitted,
            finished: self.stats.finished,
            failed: self.stats.failed,
        }
    }

    /// Debug check of the core's invariants (used by tests after every step).
    pub fn check_invariants(&self) {
        for (id, t) in self.tasks.iter() {
            assert_eq!(self.lookup(&t.key), Some(id), "key index out of sync for {}", t.key);
            let waiting = t.deps.iter().filter(|d| self.tasks[**d].state != TaskState::Memory).count() as u32;
            if matches!(t.state, TaskState::Waiting | TaskState::Ready | TaskState::Assigned) {
                assert_eq!(t.waiting, waiting, "waiting count of {}", t.key);
                assert_eq!(t.state == TaskState::Waiting, waiting > 0, "state of {} vs waiting {}", t.key, waiting);
            }
            let pending =
                t.dependents.iter().filter_map(|d| self.tasks.get(*d)).filter(|d| !d.is_finished()).count() as u32;
            assert_eq!(t.pending_dependents, pending, "pending dependents of {}", t.key);
            let live = t.dependents.iter().filter(|d| self.tasks.get(**d).is_some()).count();
            assert_eq!(t.live_dependents as usize, live, "live dependents of {}", t.key);
            if t.state == TaskState::Assigned {
                let w = t.assigned.expect("assigned task without worker");
                assert!(self.workers[&w].processing.contains(&id), "{} not in processing of {w}", t.key);
            }
            if t.state == TaskState::Memory {
                assert!(!t.holders.is_empty(), "{} in memory without holders", t.key);
            }
            for h in &t.holders {
                assert!(self.workers.contains_key(h), "holder {h} of {} is not a live worker", t.key);
            }
            for c in &t.wanted_by {
                assert!(self.clients[c].wanted.contains(&id));
            }
        }
        for (wid, w) in &self.workers {
            for id in &w.processing {
                let t = &self.tasks[*id];
                assert_eq!(t.assigned, Some(*wid));
                assert_eq!(t.state, TaskState::Assigned);
            }
            let held = self.tasks.iter().filter(|(_, t)| t.holders.contains(wid)).count() as u64;
            assert_eq!(w.stored_values, held, "stored values of worker {wid}");
        }
    }
}
