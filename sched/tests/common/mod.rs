//! Test harness for the scheduler core: graph builders, a recording
//! `CommSink` that round-trips every outgoing frame through rkyv
//! encode → validated decode, and simulated workers that execute what the
//! core assigns to them.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use rdask_sched::core::membership::WorkerSpec;
pub use rdask_sched::core::TaskState;
pub use rdask_sched::{Comm, CommSink, Core, CoreConfig};
pub use rdask_transport::bytes::Bytes;
pub use rdask_transport::protocol::*;
pub use rdask_transport::{ClientId, Frame, TaskId, WireMessage, WorkerId};

// ------------------------------------------------------------------ graphs

/// One task as a client describes it (key, dependency keys, options).
#[derive(Debug, Clone, Default)]
pub struct T {
    pub key: String,
    pub deps: Vec<String>,
    pub want: bool,
    pub user_priority: i32,
    pub order: Option<i64>,
    pub retries: u32,
    pub payload: Bytes,
    pub restriction: Option<Restriction>,
}

/// A task with the given dependency keys.
pub fn t(key: &str, deps: &[&str]) -> T {
    T { key: key.to_string(), deps: deps.iter().map(|d| d.to_string()).collect(), ..Default::default() }
}

impl T {
    pub fn want(mut self) -> Self {
        self.want = true;
        self
    }
    pub fn priority(mut self, p: i32) -> Self {
        self.user_priority = p;
        self
    }
    pub fn order(mut self, o: i64) -> Self {
        self.order = Some(o);
        self
    }
    pub fn retries(mut self, r: u32) -> Self {
        self.retries = r;
        self
    }
    /// Only on these workers (names), needing these resources.
    pub fn restrict(mut self, workers: &[&str], resources: &[(&str, f64)], loose: bool) -> Self {
        self.restriction = Some(Restriction {
            workers: workers.iter().map(|w| w.to_string()).collect(),
            resources: resources.iter().map(|(n, a)| Resource { name: n.to_string(), amount: *a }).collect(),
            loose,
        });
        self
    }
    pub fn payload(mut self, p: &'static [u8]) -> Self {
        self.payload = Bytes::from_static(p);
        self
    }
}

/// `n` leaves `{p}-i` and one sink `{p}` depending on all of them (sink last).
pub fn merge(p: &str, n: usize) -> Vec<T> {
    let mut tasks: Vec<T> = (0..n).map(|i| t(&format!("{p}-{i}"), &[])).collect();
    let deps: Vec<String> = tasks.iter().map(|t| t.key.clone()).collect();
    tasks.push(T { key: p.to_string(), deps, ..Default::default() });
    tasks
}

/// `{p}-0 ← {p}-1 ← … ← {p}-{n-1}` (each depends on the previous; sink last).
pub fn chain(p: &str, n: usize) -> Vec<T> {
    (0..n)
        .map(|i| if i == 0 { t(&format!("{p}-0"), &[]) } else { t(&format!("{p}-{i}"), &[&format!("{p}-{}", i - 1)]) })
        .collect()
}

/// Binary reduction tree: 2^depth leaves `{p}-0-i`; node `{p}-l-i` depends on
/// `{p}-(l-1)-(2i)` and `{p}-(l-1)-(2i+1)`; the root `{p}-depth-0` comes last.
pub fn tree(p: &str, depth: u32) -> Vec<T> {
    let mut tasks = Vec::new();
    for l in 0..=depth {
        for i in 0..(1usize << (depth - l)) {
            if l == 0 {
                tasks.push(t(&format!("{p}-0-{i}"), &[]));
            } else {
                let a = format!("{p}-{}-{}", l - 1, 2 * i);
                let b = format!("{p}-{}-{}", l - 1, 2 * i + 1);
                tasks.push(t(&format!("{p}-{l}-{i}"), &[&a, &b]));
            }
        }
    }
    tasks
}

/// Marks the last task (the sink of the builders above) as wanted.
pub fn want_last(mut tasks: Vec<T>) -> Vec<T> {
    tasks.last_mut().unwrap().want = true;
    tasks
}

/// Builds a submit batch the way a client does: keys of the new tasks first,
/// then the external keys they depend on; dependencies as indices; payloads
/// as data frames.
pub fn build_submit(submit_id: u64, tasks: &[T], more: bool) -> (SubmitGraph, Vec<Bytes>) {
    let mut keys: Vec<String> = tasks.iter().map(|t| t.key.clone()).collect();
    let mut index: HashMap<String, u32> = HashMap::new();
    for (i, t) in tasks.iter().enumerate() {
        index.entry(t.key.clone()).or_insert(i as u32);
    }
    let mut data = Vec::new();
    let mut specs = Vec::new();
    let mut restrictions = Vec::new();
    for t in tasks {
        let restriction = match &t.restriction {
            None => NO_FRAME,
            Some(r) => {
                restrictions.push(r.clone());
                (restrictions.len() - 1) as u32
            }
        };
        let deps = t
            .deps
            .iter()
            .map(|d| {
                *index.entry(d.clone()).or_insert_with(|| {
                    keys.push(d.clone());
                    (keys.len() - 1) as u32
                })
            })
            .collect();
        let payload = if t.payload.is_empty() {
            NO_FRAME
        } else {
            data.push(t.payload.clone());
            (data.len() - 1) as u32
        };
        specs.push(TaskSpec {
            deps,
            user_priority: t.user_priority,
            order: t.order,
            payload,
            want: t.want,
            retries: t.retries,
            restriction,
        });
    }
    (SubmitGraph { submit_id, graph_id: 0, more, graph_tasks: 0, keys, tasks: specs, restrictions }, data)
}

// ------------------------------------------------------------------ recorder

/// A decoded message and the data frames that travelled with it.
#[derive(Debug, Clone)]
pub struct Received<M> {
    pub msg: M,
    pub data: Vec<Bytes>,
}

/// Records every flushed frame after decoding it with validation, and checks
/// the frame's internal references (payload indices, peer addresses).
#[derive(Default)]
pub struct Recorder {
    pub workers: BTreeMap<WorkerId, Vec<Received<ToWorkerMessage>>>,
    pub clients: BTreeMap<ClientId, Vec<Received<ToClientMessage>>>,
}

impl CommSink for Recorder {
    fn to_worker(&mut self, worker: WorkerId, frame: Frame) {
        let msg = ToWorkerMessage::decode(&frame.control)
            .unwrap_or_else(|e| panic!("frame to worker {worker} does not decode: {e}"));
        if let ToWorkerMessage::Compute(batch) = &msg {
            let peers: BTreeSet<WorkerId> = batch.peers.iter().map(|p| p.id).collect();
            for task in &batch.tasks {
                assert!(
                    task.payload == NO_FRAME || (task.payload as usize) < frame.data.len(),
                    "compute {} names data frame {} of {}",
                    task.key,
                    task.payload,
                    frame.data.len()
                );
                for dep in &task.deps {
                    for h in &dep.holders {
                        assert!(peers.contains(h), "compute {} names holder {h} without its address", task.key);
                    }
                }
            }
        }
        self.workers.entry(worker).or_default().push(Received { msg, data: frame.data });
    }

    fn to_client(&mut self, client: ClientId, frame: Frame) {
        let msg = ToClientMessage::decode(&frame.control)
            .unwrap_or_else(|e| panic!("frame to client {client} does not decode: {e}"));
        if let ToClientMessage::Erred(items) = &msg {
            for e in items {
                assert!(e.payload == NO_FRAME || (e.payload as usize) < frame.data.len(), "erred {} payload index", e.key);
            }
        }
        self.clients.entry(client).or_default().push(Received { msg, data: frame.data });
    }
}

// ------------------------------------------------------------------ simulated workers

/// What a simulated worker knows: tasks queued on it, values it stores,
/// steal requests it has not answered, and every message it received.
#[derive(Default, Debug)]
pub struct SimWorker {
    pub queue: Vec<ComputeTask>,
    pub held: BTreeSet<TaskId>,
    pub steal_requests: Vec<TaskId>,
    /// Payload bytes of each computed task, by key (last assignment wins).
    pub payloads: HashMap<String, Bytes>,
    /// Careful tasks whose start the scheduler confirmed (`ExecutingSeen`).
    pub confirmed: Vec<TaskId>,
    /// The scheduler asked for `Spans`.
    pub report_spans: bool,
    seen: usize,
}

impl SimWorker {
    pub fn queued_keys(&self) -> Vec<String> {
        self.queue.iter().map(|t| t.key.clone()).collect()
    }
}

// ------------------------------------------------------------------ harness

pub struct Harness {
    pub core: Core,
    pub comm: Comm,
    pub rec: Recorder,
    pub now_ms: u64,
    pub sims: BTreeMap<WorkerId, SimWorker>,
    /// Size simulated workers report for a key (default 8 bytes).
    pub sizes: HashMap<String, u64>,
    next_submit: u64,
    added_workers: u32,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new(CoreConfig::default())
    }
}

impl Harness {
    pub fn new(config: CoreConfig) -> Self {
        Harness {
            core: Core::new(config),
            comm: Comm::default(),
            rec: Recorder::default(),
            now_ms: 0,
            sims: BTreeMap::new(),
            sizes: HashMap::new(),
            next_submit: 1,
            added_workers: 0,
        }
    }

    /// A harness with `n` one-thread workers.
    pub fn with_workers(n: usize) -> (Self, Vec<WorkerId>) {
        let mut h = Harness::default();
        let ws = (0..n).map(|_| h.add_worker(1)).collect();
        (h, ws)
    }

    // ---- membership

    pub fn add_worker(&mut self, nthreads: u32) -> WorkerId {
        self.add_worker_with(nthreads, &[])
    }

    /// A worker named `sim-{n}` (n counts added workers) offering resources.
    pub fn add_worker_with(&mut self, nthreads: u32, resources: &[(&str, f64)]) -> WorkerId {
        let n = self.added_workers;
        self.added_workers += 1;
        let spec = WorkerSpec {
            name: format!("sim-{n}"),
            address: format!("tcp://w{n}"),
            nthreads,
            memory_limit: 0,
            resources: resources.iter().map(|(n, a)| Resource { name: n.to_string(), amount: *a }).collect(),
            placement: Default::default(),
        };
        let w = self.core.add_worker(&mut self.comm, spec, self.now_ms);
        self.sims.insert(w, SimWorker::default());
        self.step();
        w
    }

    /// The worker reports that these tasks started running (`Executing`).
    pub fn executing(&mut self, w: WorkerId, ids: &[TaskId], confirm: bool) {
        self.worker_msg(w, FromWorkerMessage::Executing { tasks: ids.to_vec(), confirm });
    }

    /// The worker says goodbye (`Leaving`), then its connection closes.
    pub fn leave(&mut self, w: WorkerId) {
        self.worker_msg(w, FromWorkerMessage::Leaving);
        self.remove_worker(w);
    }

    /// The worker is gone: the core forgets it, and its store is lost.
    pub fn remove_worker(&mut self, w: WorkerId) {
        self.core.remove_worker(&mut self.comm, w);
        self.sims.remove(&w);
        self.step();
    }

    pub fn add_client(&mut self) -> ClientId {
        let c = self.core.add_client(&mut self.comm);
        self.step();
        c
    }

    pub fn remove_client(&mut self, c: ClientId) {
        self.core.remove_client(&mut self.comm, c);
        self.step();
    }

    // ---- client messages

    pub fn client_frame(&mut self, c: ClientId, frame: &Frame) -> Result<(), rdask_sched::SchedError> {
        self.core.on_client_frame(&mut self.comm, c, frame)
    }

    pub fn client_msg(&mut self, c: ClientId, msg: FromClientMessage) {
        let frame = Frame::from_message(&msg);
        self.client_frame(c, &frame).expect("client message accepted");
    }

    /// Submits `tasks` as one batch; returns its submit id. Does not step.
    pub fn submit(&mut self, c: ClientId, tasks: &[T], more: bool) -> u64 {
        let id = self.next_submit;
        self.next_submit += 1;
        let (graph, data) = build_submit(id, tasks, more);
        self.submit_graph(c, graph, data).expect("submit frame accepted");
        id
    }

    pub fn submit_graph(&mut self, c: ClientId, graph: SubmitGraph, data: Vec<Bytes>) -> Result<(), rdask_sched::SchedError> {
        let frame = Frame::with_data(&FromClientMessage::Submit(graph), data);
        self.client_frame(c, &frame)
    }

    pub fn release(&mut self, c: ClientId, keys: &[&str]) {
        self.client_msg(c, FromClientMessage::Release { keys: keys.iter().map(|k| k.to_string()).collect() });
    }

    pub fn cancel(&mut self, c: ClientId, keys: &[&str]) {
        self.client_msg(c, FromClientMessage::Cancel { keys: keys.iter().map(|k| k.to_string()).collect() });
    }

    // ---- worker messages

    pub fn worker_frame(&mut self, w: WorkerId, frame: &Frame) -> Result<(), rdask_sched::SchedError> {
        self.core.on_worker_frame(&mut self.comm, w, frame, self.now_ms)
    }

    pub fn worker_msg(&mut self, w: WorkerId, msg: FromWorkerMessage) {
        let frame = Frame::from_message(&msg);
        self.worker_frame(w, &frame).expect("worker message accepted");
    }

    /// `w` reports these tasks finished; the simulated worker stores them.
    pub fn finish(&mut self, w: WorkerId, ids: &[TaskId], size: u64) {
        if let Some(sim) = self.sims.get_mut(&w) {
            sim.queue.retain(|t| !ids.contains(&t.id));
            sim.held.extend(ids.iter().copied());
        }
        self.worker_msg(w, FromWorkerMessage::Finished(ids.iter().map(|&id| FinishedTask { id, size }).collect()));
    }

    pub fn finish_key(&mut self, w: WorkerId, key: &str, size: u64) {
        let id = self.id(key);
        self.finish(w, &[id], size);
    }

    pub fn fail(&mut self, w: WorkerId, id: TaskId, message: &str) {
        self.fail_with_payload(w, id, message, Bytes::new());
    }

    /// `w` reports that the task raised, optionally with an error payload frame.
    pub fn fail_with_payload(&mut self, w: WorkerId, id: TaskId, message: &str, payload: Bytes) {
        if let Some(sim) = self.sims.get_mut(&w) {
            sim.queue.retain(|t| t.id != id);
        }
        let (index, data) = if payload.is_empty() { (NO_FRAME, vec![]) } else { (0, vec![payload]) };
        let msg = FromWorkerMessage::Failed(vec![FailedTask { id, message: message.to_string(), payload: index }]);
        let frame = Frame::with_data(&msg, data);
        self.worker_frame(w, &frame).expect("failed message accepted");
    }

    pub fn steal_reply(&mut self, w: WorkerId, outcomes: &[(TaskId, bool)]) {
        if let Some(sim) = self.sims.get_mut(&w) {
            for &(id, stolen) in outcomes {
                sim.steal_requests.retain(|x| *x != id);
                if stolen {
                    sim.queue.retain(|t| t.id != id);
                }
            }
        }
        let items = outcomes.iter().map(|&(id, stolen)| StealOutcome { id, stolen }).collect();
        self.worker_msg(w, FromWorkerMessage::StealReply(items));
    }

    pub fn replicas_added(&mut self, w: WorkerId, ids: &[TaskId]) {
        if let Some(sim) = self.sims.get_mut(&w) {
            sim.held.extend(ids.iter().copied());
        }
        self.worker_msg(w, FromWorkerMessage::ReplicasAdded(ids.to_vec()));
    }

    // ---- driving

    /// One reactor tick: schedule, flush through the recorder, check invariants,
    /// and let the simulated workers read what they were sent.
    pub fn step(&mut self) {
        self.core.schedule(&mut self.comm);
        self.comm.flush(&mut self.rec, &|w| Some(format!("tcp://w{w}")));
        assert!(self.comm.is_empty(), "flush left messages behind");
        self.core.check_invariants();
        self.sync();
        self.check_holders();
    }

    /// Every holder the core lists for a value really stores it: the core
    /// never told it to release it (the simulated worker applies Release).
    pub fn check_holders(&self) {
        for (id, t) in self.core.tasks.iter() {
            for h in &t.holders {
                if let Some(sim) = self.sims.get(h) {
                    assert!(sim.held.contains(&id), "core lists worker {h} as holder of {}, but it was told to drop it", t.key);
                }
            }
        }
    }

    /// Simulated workers process messages they have not seen yet.
    fn sync(&mut self) {
        for (w, sim) in self.sims.iter_mut() {
            let Some(log) = self.rec.workers.get(w) else { continue };
            for r in &log[sim.seen..] {
                match &r.msg {
                    ToWorkerMessage::Compute(batch) => {
                        for task in &batch.tasks {
                            if task.payload != NO_FRAME {
                                sim.payloads.insert(task.key.clone(), r.data[task.payload as usize].clone());
                            }
                            sim.queue.push(task.clone());
                        }
                    }
                    ToWorkerMessage::Release(ids) => {
                        for id in ids {
                            sim.held.remove(id);
                        }
                    }
                    ToWorkerMessage::Cancel(ids) => sim.queue.retain(|t| !ids.contains(&t.id)),
                    ToWorkerMessage::Steal(ids) => sim.steal_requests.extend(ids.iter().copied()),
                    ToWorkerMessage::ExecutingSeen(ids) => sim.confirmed.extend(ids.iter().copied()),
                    ToWorkerMessage::ReportSpans(on) => sim.report_spans = *on,
                    ToWorkerMessage::Registered { .. } | ToWorkerMessage::Error { .. } | ToWorkerMessage::Stop => {}
                }
            }
            sim.seen = log.len();
        }
    }

    /// Simulates every worker executing every task assigned to it (fetching
    /// missing inputs from the holders the scheduler named, reporting
    /// `ReplicasAdded` for them and then `Finished`), giving up queued tasks
    /// that are stolen, until nothing is left to do.
    pub fn run_all(&mut self) {
        for _round in 0..1_000_000 {
            self.step();
            let mut progressed = false;
            let workers: Vec<WorkerId> = self.sims.keys().copied().collect();
            for w in workers {
                let requests = std::mem::take(&mut self.sims.get_mut(&w).unwrap().steal_requests);
                if !requests.is_empty() {
                    let sim = &self.sims[&w];
                    let outcomes: Vec<(TaskId, bool)> =
                        requests.iter().map(|id| (*id, sim.queue.iter().any(|t| t.id == *id))).collect();
                    self.steal_reply(w, &outcomes);
                    progressed = true;
                }
                let tasks = std::mem::take(&mut self.sims.get_mut(&w).unwrap().queue);
                if tasks.is_empty() {
                    continue;
                }
                let mut fetched = BTreeSet::new();
                for task in &tasks {
                    for dep in &task.deps {
                        if self.sims[&w].held.contains(&dep.id) || fetched.contains(&dep.id) {
                            continue;
                        }
                        assert!(
                            dep.holders.iter().any(|h| self.sims.get(h).is_some_and(|s| s.held.contains(&dep.id))),
                            "{} needs {} from {:?}, but none of them holds it",
                            task.key,
                            dep.id,
                            dep.holders
                        );
                        fetched.insert(dep.id);
                    }
                }
                if !fetched.is_empty() {
                    let ids: Vec<TaskId> = fetched.into_iter().collect();
                    self.replicas_added(w, &ids);
                }
                let finished: Vec<FinishedTask> =
                    tasks.iter().map(|t| FinishedTask { id: t.id, size: self.size_of(&t.key) }).collect();
                self.sims.get_mut(&w).unwrap().held.extend(tasks.iter().map(|t| t.id));
                self.worker_msg(w, FromWorkerMessage::Finished(finished));
                progressed = true;
            }
            if !progressed {
                return;
            }
        }
        panic!("run_all did not settle");
    }

    fn size_of(&self, key: &str) -> u64 {
        self.sizes.get(key).copied().unwrap_or(8)
    }

    // ---- inspection

    pub fn id(&self, key: &str) -> TaskId {
        self.core.lookup(key).unwrap_or_else(|| panic!("no task {key:?}"))
    }

    pub fn state(&self, key: &str) -> Option<TaskState> {
        self.core.task_state(key)
    }

    /// The worker the core has `key` assigned to, checked against the
    /// simulated worker's queue (the Compute message must have arrived).
    pub fn assigned_to(&self, key: &str) -> Option<WorkerId> {
        let id = self.core.lookup(key)?;
        let w = self.core.tasks[id].assigned?;
        assert!(
            self.sims.get(&w).is_some_and(|s| s.queue.iter().any(|t| t.id == id)),
            "{key} is assigned to {w} but that worker was not sent it"
        );
        Some(w)
    }

    pub fn queued(&self, w: WorkerId) -> Vec<String> {
        self.sims[&w].queued_keys()
    }

    pub fn worker_log(&self, w: WorkerId) -> Vec<ToWorkerMessage> {
        self.rec.workers.get(&w).map(|l| l.iter().map(|r| r.msg.clone()).collect()).unwrap_or_default()
    }

    /// Keys of every task ever sent to `w` for computing, in order.
    pub fn computed_on(&self, w: WorkerId) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.worker_log(w) {
            if let ToWorkerMessage::Compute(b) = m {
                out.extend(b.tasks.into_iter().map(|t| t.key));
            }
        }
        out
    }

    pub fn releases_to(&self, w: WorkerId) -> Vec<TaskId> {
        self.worker_log(w)
            .into_iter()
            .flat_map(|m| if let ToWorkerMessage::Release(ids) = m { ids } else { vec![] })
            .collect()
    }

    pub fn cancels_to(&self, w: WorkerId) -> Vec<TaskId> {
        self.worker_log(w)
            .into_iter()
            .flat_map(|m| if let ToWorkerMessage::Cancel(ids) = m { ids } else { vec![] })
            .collect()
    }

    pub fn steals_to(&self, w: WorkerId) -> Vec<TaskId> {
        self.worker_log(w)
            .into_iter()
            .flat_map(|m| if let ToWorkerMessage::Steal(ids) = m { ids } else { vec![] })
            .collect()
    }

    /// Takes every message the client was sent so far (with data frames).
    pub fn take_client(&mut self, c: ClientId) -> Vec<Received<ToClientMessage>> {
        self.rec.clients.get_mut(&c).map(std::mem::take).unwrap_or_default()
    }

    /// Takes the client's messages, dropping the data frames.
    pub fn take_client_msgs(&mut self, c: ClientId) -> Vec<ToClientMessage> {
        self.take_client(c).into_iter().map(|r| r.msg).collect()
    }

    fn client_log(&self, c: ClientId) -> Vec<ToClientMessage> {
        self.rec.clients.get(&c).map(|l| l.iter().map(|r| r.msg.clone()).collect()).unwrap_or_default()
    }

    /// Keys the client was told are in memory (with repetitions), not consumed.
    pub fn in_memory(&self, c: ClientId) -> Vec<String> {
        self.client_log(c)
            .into_iter()
            .flat_map(|m| if let ToClientMessage::InMemory(d) = m { d.into_iter().map(|d| d.key).collect() } else { vec![] })
            .collect()
    }

    pub fn erred(&self, c: ClientId) -> Vec<KeyErred> {
        self.client_log(c).into_iter().flat_map(|m| if let ToClientMessage::Erred(e) = m { e } else { vec![] }).collect()
    }

    pub fn cancelled(&self, c: ClientId) -> Vec<String> {
        self.client_log(c)
            .into_iter()
            .flat_map(|m| if let ToClientMessage::Cancelled { keys } = m { keys } else { vec![] })
            .collect()
    }

    /// `Submitted` (Ok) or `SubmitRejected` (Err with message) for a submit id.
    pub fn submit_reply(&self, c: ClientId, submit_id: u64) -> Option<Result<(), String>> {
        self.client_log(c).into_iter().find_map(|m| match m {
            ToClientMessage::Submitted { submit_id: s } if s == submit_id => Some(Ok(())),
            ToClientMessage::SubmitRejected { submit_id: s, message } if s == submit_id => Some(Err(message)),
            _ => None,
        })
    }

    /// The stored-bytes total each worker reports matches the values it holds.
    pub fn check_stored_bytes(&self) {
        for (wid, w) in &self.core.workers {
            let held: Vec<u64> =
                self.core.tasks.iter().filter(|(_, t)| t.holders.contains(wid)).map(|(_, t)| t.size).collect();
            assert_eq!(w.stored_bytes, held.iter().sum::<u64>(), "stored_bytes of worker {wid}");
            assert_eq!(w.stored_values, held.len() as u64, "stored_values of worker {wid}");
        }
    }
}
