//! The core's outbox. Handlers append to per-destination batches; the reactor
//! flushes once per tick, so one frame carries every assignment (or
//! completion notice) produced while handling a burst of events.

use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::{
    ComputeBatch, ComputeTask, KeyDone, KeyErred, PeerAddress, ToClientMessage, ToWorkerMessage, NO_FRAME,
};
use rdask_transport::{ClientId, Frame, WorkerId};
use rustc_hash::{FxHashMap, FxHashSet};

#[derive(Default)]
struct WorkerOut {
    compute: Vec<ComputeTask>,
    resource_sets: Vec<Vec<rdask_transport::protocol::Resource>>,
    data: Vec<Bytes>,
    peers: FxHashSet<WorkerId>,
    release: Vec<rdask_transport::TaskId>,
    steal: Vec<rdask_transport::TaskId>,
    cancel: Vec<rdask_transport::TaskId>,
    other: Vec<ToWorkerMessage>,
}

#[derive(Default)]
struct ClientOut {
    done: Vec<KeyDone>,
    erred: Vec<KeyErred>,
    erred_data: Vec<Bytes>,
    cancelled: Vec<String>,
    lost: Vec<String>,
    other: Vec<ToClientMessage>,
    /// Replies that carry data frames (coordination values).
    with_data: Vec<(ToClientMessage, Vec<Bytes>)>,
}

/// Where flushed frames go: the reactor's connections, or a test recorder.
pub trait CommSink {
    fn to_worker(&mut self, worker: WorkerId, frame: Frame);
    fn to_client(&mut self, client: ClientId, frame: Frame);
}

#[derive(Default)]
pub struct Comm {
    workers: FxHashMap<WorkerId, WorkerOut>,
    clients: FxHashMap<ClientId, ClientOut>,
    /// Compute records of batches already encoded, kept for reuse: the next
    /// assignments refill their key strings and input lists instead of
    /// allocating new ones.
    spare: Vec<ComputeTask>,
}

/// Reuse at most this many records, and none whose input list grew past
/// `SPARE_MAX_DEPS` (a 100k-input reduction must not pin its list).
const SPARE_MAX: usize = 16 << 10;
const SPARE_MAX_DEPS: usize = 64;

impl Comm {
    /// A record to fill and hand to [`Comm::compute`]: a spare one, whose
    /// key and input list keep their capacity, or a new one.
    pub fn compute_record(&mut self) -> ComputeTask {
        self.spare.pop().unwrap_or_else(|| ComputeTask {
            id: rdask_transport::TaskId::new(0),
            key: String::new(),
            user_priority: 0,
            order: 0,
            payload: NO_FRAME,
            deps: Vec::new(),
            careful: false,
            resources: NO_FRAME,
        })
    }

    /// `resources`: what the task holds while it runs (None for most).
    pub fn compute(&mut self, worker: WorkerId, mut task: ComputeTask, payload: &Bytes, resources: Option<&[rdask_transport::protocol::Resource]>) {
        let out = self.workers.entry(worker).or_default();
        task.resources = match resources {
            None => NO_FRAME,
            Some(set) => match out.resource_sets.iter().position(|s| s.as_slice() == set) {
                Some(i) => i as u32,
                None => {
                    out.resource_sets.push(set.to_vec());
                    (out.resource_sets.len() - 1) as u32
                }
            },
        };
        for dep in &task.deps {
            out.peers.extend(dep.holders.iter().copied());
        }
        task.payload = if payload.is_empty() {
            NO_FRAME
        } else {
            out.data.push(payload.clone());
            (out.data.len() - 1) as u32
        };
        out.compute.push(task);
    }

    pub fn release(&mut self, worker: WorkerId, task: rdask_transport::TaskId) {
        self.workers.entry(worker).or_default().release.push(task);
    }

    pub fn steal(&mut self, worker: WorkerId, task: rdask_transport::TaskId) {
        self.workers.entry(worker).or_default().steal.push(task);
    }

    pub fn cancel(&mut self, worker: WorkerId, task: rdask_transport::TaskId) {
        self.workers.entry(worker).or_default().cancel.push(task);
    }

    pub fn send_worker(&mut self, worker: WorkerId, msg: ToWorkerMessage) {
        self.workers.entry(worker).or_default().other.push(msg);
    }

    pub fn key_done(&mut self, client: ClientId, done: KeyDone) {
        self.clients.entry(client).or_default().done.push(done);
    }

    pub fn key_erred(&mut self, client: ClientId, mut erred: KeyErred, payload: &Bytes) {
        let out = self.clients.entry(client).or_default();
        erred.payload = if payload.is_empty() {
            NO_FRAME
        } else {
            out.erred_data.push(payload.clone());
            (out.erred_data.len() - 1) as u32
        };
        out.erred.push(erred);
    }

    pub fn key_cancelled(&mut self, client: ClientId, key: String) {
        self.clients.entry(client).or_default().cancelled.push(key);
    }

    pub fn key_lost(&mut self, client: ClientId, key: String) {
        self.clients.entry(client).or_default().lost.push(key);
    }

    pub fn send_client(&mut self, client: ClientId, msg: ToClientMessage) {
        self.clients.entry(client).or_default().other.push(msg);
    }

    pub fn send_client_data(&mut self, client: ClientId, msg: ToClientMessage, data: Vec<Bytes>) {
        self.clients.entry(client).or_default().with_data.push((msg, data));
    }

    /// Drops anything queued for a worker that is gone.
    pub fn forget_worker(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
    }

    pub fn forget_client(&mut self, client: ClientId) {
        self.clients.remove(&client);
    }

    /// Drops the spare compute records (when the scheduler goes idle).
    pub fn release_spare(&mut self) {
        self.spare = Vec::new();
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty() && self.clients.is_empty()
    }

    /// Encodes every pending batch into frames. `address` resolves the peer
    /// addresses that compute batches must carry.
    pub fn flush(&mut self, sink: &mut dyn CommSink, address: &dyn Fn(WorkerId) -> Option<String>) {
        let spare = &mut self.spare;
        for (worker, out) in self.workers.drain() {
            // Control messages first: "Registered" must precede any work.
            for msg in out.other {
                sink.to_worker(worker, Frame::from_message(&msg));
            }
            if !out.release.is_empty() {
                sink.to_worker(worker, Frame::from_message(&ToWorkerMessage::Release(out.release)));
            }
            if !out.cancel.is_empty() {
                sink.to_worker(worker, Frame::from_message(&ToWorkerMessage::Cancel(out.cancel)));
            }
            if !out.steal.is_empty() {
                sink.to_worker(worker, Frame::from_message(&ToWorkerMessage::Steal(out.steal)));
            }
            if !out.compute.is_empty() {
                let peers = out
                    .peers
                    .into_iter()
                    .filter_map(|id| address(id).map(|address| PeerAddress { id, address }))
                    .collect();
                let msg = ToWorkerMessage::Compute(ComputeBatch { tasks: out.compute, peers, resource_sets: out.resource_sets });
                sink.to_worker(worker, Frame::with_data(&msg, out.data));
                if let ToWorkerMessage::Compute(batch) = msg {
                    let room = SPARE_MAX.saturating_sub(spare.len());
                    spare.extend(batch.tasks.into_iter().filter(|t| t.deps.capacity() <= SPARE_MAX_DEPS).take(room));
                }
            }
        }
        for (client, out) in self.clients.drain() {
            // Key news in the order it happened within a tick: a value can be
            // done, then lost, then its recomputation can err; never the
            // reverse. Replies (who-has, acks) go last, so they describe the
            // state the key news already told.
            if !out.done.is_empty() {
                sink.to_client(client, Frame::from_message(&ToClientMessage::InMemory(out.done)));
            }
            if !out.lost.is_empty() {
                sink.to_client(client, Frame::from_message(&ToClientMessage::Lost { keys: out.lost }));
            }
            if !out.erred.is_empty() {
                sink.to_client(client, Frame::with_data(&ToClientMessage::Erred(out.erred), out.erred_data));
            }
            if !out.cancelled.is_empty() {
                sink.to_client(client, Frame::from_message(&ToClientMessage::Cancelled { keys: out.cancelled }));
            }
            for msg in out.other {
                sink.to_client(client, Frame::from_message(&msg));
            }
            for (msg, data) in out.with_data {
                sink.to_client(client, Frame::with_data(&msg, data));
            }
        }
    }
}
