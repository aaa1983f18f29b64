//! Workers and clients joining and leaving.

use rdask_transport::protocol::{cpu_list, Placement, Resource, ToClientMessage, ToWorkerMessage};
use rdask_transport::{ClientId, TaskId, WorkerId};

use super::{Client, Core, TaskError, TaskState, Worker};
use crate::comm::Comm;

/// What a worker tells about itself when it registers.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub name: String,
    pub address: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub resources: Vec<Resource>,
    pub placement: Placement,
}

impl Core {
    pub fn add_worker(&mut self, comm: &mut Comm, spec: WorkerSpec, now_ms: u64) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.stream_workers.insert(id, spec.address.clone().into_boxed_str());
        let p = &spec.placement;
        tracing::info!(
            worker = %id, name = %spec.name, address = %spec.address, nthreads = spec.nthreads, host = %p.host,
            cpus = %if p.cpus.is_empty() { "unbound".to_string() } else { cpu_list(&p.cpus) }, numa = ?p.numa_node, gpu = ?p.gpu, "worker joined"
        );
        self.workers.insert(
            id,
            Worker {
                name: spec.name,
                address: spec.address,
                nthreads: spec.nthreads.max(1),
                memory_limit: spec.memory_limit,
                resources: spec.resources,
                placement: spec.placement,
                processing: Default::default(),
                stored_values: 0,
                stored_bytes: 0,
                steals_in_flight: 0,
                incoming_steals: 0,
                last_seen_ms: now_ms,
                leaving: false,
                paused: false,
                load: Default::default(),
            },
        );
        self.worker_order.push(id);
        // A newcomer may take queued work from busy workers.
        self.idle_hint = true;
        comm.send_worker(id, ToWorkerMessage::Registered { worker_id: id, heartbeat_ms: self.config.heartbeat_ms });
        if self.stream_enabled {
            comm.send_worker(id, ToWorkerMessage::ReportSpans(true));
        }
        id
    }

    /// A worker left. Its queued and running tasks go back to the queue;
    /// values only it held are recomputed where still needed. A worker that
    /// said `Leaving` suspects nobody. One that died (crash, kill, silence)
    /// raises the suspicion of the tasks it was running, as Dask does, and a
    /// task that was running on more than `allowed_failures` dead workers
    /// errs with KilledWorker. Tasks merely queued there are innocent, but
    /// from now on their start is confirmed before they run (`careful`),
    /// because a task that kills its worker at once may die before the
    /// worker could say it started.
    pub fn remove_worker(&mut self, comm: &mut Comm, id: WorkerId) {
        let Some(worker) = self.workers.remove(&id) else { return };
        comm.forget_worker(id);
        self.worker_order.retain(|w| *w != id);
        let died = !worker.leaving;
        let running = worker.processing.iter().filter(|t| self.tasks[**t].executing).count();
        if died {
            tracing::warn!(
                worker = %id, name = %worker.name, processing = worker.processing.len(), running,
                values = worker.stored_values, "worker died"
            );
        } else {
            tracing::info!(
                worker = %id, name = %worker.name, processing = worker.processing.len(),
                values = worker.stored_values, "worker left"
            );
        }
        let mut processing: Vec<TaskId> = worker.processing.into_iter().collect();
        processing.sort_unstable();
        for t in processing {
            let task = &mut self.tasks[t];
            task.assigned = None;
            if let Some(thief) = task.steal_to.take() {
                if let Some(tw) = self.workers.get_mut(&thief) {
                    tw.incoming_steals = tw.incoming_steals.saturating_sub(1);
                }
            }
            let task = &mut self.tasks[t];
            let suspect = died && std::mem::take(&mut task.executing);
            task.executing = false;
            task.careful |= died;
            if suspect {
                task.suspicious = task.suspicious.saturating_add(1);
            }
            if suspect && task.suspicious > self.config.allowed_failures {
                let message = format!(
                    "KilledWorker: task {:?} was running on {} workers that died (the last was {} at {}); \
                     it may be crashing its worker",
                    &*task.key, task.suspicious, worker.name, worker.address
                );
                let err = TaskError { failed_key: task.key.clone(), message, payload: Default::default() };
                // Not Assigned any more: fail_with_dependents must not look for a worker.
                task.state = TaskState::Ready;
                self.stats.failed += 1;
                self.fail_with_dependents(comm, t, err);
            } else {
                self.make_ready(t);
            }
        }
        let held: Vec<TaskId> =
            if worker.stored_values == 0 { Vec::new() } else { self.tasks.iter().filter(|(_, t)| t.holders.contains(&id)).map(|(t, _)| t).collect() };
        for t in held {
            let Some(task) = self.tasks.get_mut(t) else { continue };
            task.holders.retain(|h| *h != id);
            if task.holders.is_empty() && task.state == TaskState::Memory {
                self.data_lost(comm, t);
            }
        }
        self.idle_hint = true;
    }

    /// Workers silent for longer than `timeout_ms`; the reactor drops them.
    pub fn silent_workers(&self, now_ms: u64, timeout_ms: u64) -> Vec<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| now_ms.saturating_sub(w.last_seen_ms) > timeout_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn add_client(&mut self, comm: &mut Comm) -> ClientId {
        let id = ClientId(self.next_client);
        self.next_client += 1;
        self.clients.insert(id, Client::default());
        comm.send_client(id, ToClientMessage::Welcome { client_id: id, scheduler_id: self.scheduler_id.clone() });
        id
    }

    /// A client left: everything it held is released.
    pub fn remove_client(&mut self, comm: &mut Comm, id: ClientId) {
        // An unfinished multi-batch submission is abandoned with its client.
        self.unpin(comm, id, None);
        let Some(client) = self.clients.remove(&id) else { return };
        comm.forget_client(id);
        self.coord_client_left(comm, id);
        let wanted: Vec<TaskId> = client.wanted.into_iter().collect();
        tracing::info!(client = %id, keys = wanted.len(), "client left; releasing its keys");
        for &t in &wanted {
            self.tasks[t].wanted_by.retain(|c| *c != id);
        }
        self.update_need(comm, wanted);
    }
}
