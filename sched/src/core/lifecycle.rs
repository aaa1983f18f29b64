//! Task transitions after submission: finish, fail, retry, release, forget,
//! cancel, and recomputation of lost data. Cascades use explicit work lists,
//! never recursion, so a chain of a million tasks cannot overflow the stack.

use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::{KeyDone, KeyErred, KeyLocation, ToClientMessage};
use rdask_transport::{ClientId, TaskId, WorkerId};

use super::{Core, TaskError, TaskState};
use crate::comm::Comm;

impl Core {
    pub(crate) fn make_ready(&mut self, id: TaskId) {
        let t = &mut self.tasks[id];
        t.state = TaskState::Ready;
        self.ready.push(t.priority, id);
    }

    /// Takes `id` off its worker's books (it was Assigned there).
    pub(crate) fn unassign(&mut self, id: TaskId) -> Option<WorkerId> {
        let t = &mut self.tasks[id];
        let w = t.assigned.take()?;
        let thief = t.steal_to.take();
        let was_stealing = thief.is_some();
        if let Some(tw) = thief.and_then(|th| self.workers.get_mut(&th)) {
            tw.incoming_steals = tw.incoming_steals.saturating_sub(1);
        }
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.processing.remove(&id);
            if was_stealing {
                worker.steals_in_flight = worker.steals_in_flight.saturating_sub(1);
            }
            if worker.processing.len() < worker.nthreads as usize {
                self.idle_hint = true;
            }
        }
        Some(w)
    }

    pub(crate) fn task_finished(&mut self, comm: &mut Comm, worker: WorkerId, id: TaskId, size: u64) {
        let current = self.tasks.get(id).map(|t| (t.state, t.assigned));
        if current != Some((TaskState::Assigned, Some(worker))) {
            match current {
                // A repeat report from a worker we already list as holder.
                Some((TaskState::Memory, _)) if self.tasks[id].holders.contains(&worker) => {}
                // Finished elsewhere too (it ran again after a cancel crossed
                // its start): an extra replica is still a correct value.
                Some((TaskState::Memory, _)) => self.replica_added(comm, worker, id),
                // Forgotten, cancelled or moved meanwhile: the worker must not
                // keep an orphan value.
                _ => comm.release(worker, id),
            }
            return;
        }
        self.unassign(id);
        self.stats.finished += 1;
        let t = &mut self.tasks[id];
        if self.host_transitions {
            self.transitions_out.push((String::from(&*t.key), "processing", "memory"));
        }
        t.state = TaskState::Memory;
        t.size = size;
        t.holders.push(worker);
        if let Some(w) = self.workers.get_mut(&worker) {
            w.stored_values += 1;
            w.stored_bytes += size;
        }
        for &c in &t.wanted_by {
            comm.key_done(c, KeyDone { key: String::from(&*t.key), size });
        }
        let deps = t.deps.clone();
        let dependents = t.dependents.clone();
        for x in dependents {
            if let Some(xt) = self.tasks.get_mut(x) {
                if xt.state == TaskState::Waiting {
                    xt.waiting -= 1;
                    if xt.waiting == 0 {
                        self.make_ready(x);
                    }
                }
            }
        }
        let mut check = Vec::with_capacity(deps.len() + 1);
        for d in deps {
            self.tasks[d].pending_dependents -= 1;
            check.push(d);
        }
        check.push(id);
        self.update_need(comm, check);
    }

    pub(crate) fn task_failed(&mut self, comm: &mut Comm, worker: WorkerId, id: TaskId, message: &str, payload: Bytes) {
        let current = self.tasks.get(id).map(|t| (t.state, t.assigned));
        if current != Some((TaskState::Assigned, Some(worker))) {
            return;
        }
        self.unassign(id);
        let t = &mut self.tasks[id];
        if t.retries_left > 0 {
            t.retries_left -= 1;
            tracing::debug!(key = %t.key, left = t.retries_left, "task raised; retrying");
            self.make_ready(id);
            return;
        }
        self.stats.failed += 1;
        if self.host_transitions {
            self.transitions_out.push((String::from(&*t.key), "processing", "erred"));
        }
        let err = TaskError { failed_key: t.key.clone(), message: message.to_string(), payload };
        self.fail_with_dependents(comm, id, err);
    }

    /// Marks `id` and every unfinished task downstream as erred with `err`,
    /// telling the clients that hold any of them.
    pub(crate) fn fail_with_dependents(&mut self, comm: &mut Comm, id: TaskId, err: TaskError) {
        let err = Box::new(err);
        let mut stack = vec![id];
        let mut check = Vec::new();
        while let Some(x) = stack.pop() {
            let Some(t) = self.tasks.get(x) else { continue };
            if t.is_finished() {
                continue;
            }
            if t.state == TaskState::Assigned {
                if let Some(w) = self.unassign(x) {
                    comm.cancel(w, x);
                }
            }
            let t = &mut self.tasks[x];
            t.state = TaskState::Erred;
            t.error = Some(err.clone());
            let key = String::from(&*t.key);
            let wanted = t.wanted_by.clone();
            let deps = t.deps.clone();
            stack.extend(t.dependents.iter().copied());
            for c in wanted {
                self.notify_erred(comm, c, key.clone(), &err);
            }
            for d in deps {
                if let Some(dt) = self.tasks.get_mut(d) {
                    dt.pending_dependents -= 1;
                    check.push(d);
                }
            }
        }
        self.update_need(comm, check);
    }

    pub(crate) fn notify_erred(&self, comm: &mut Comm, client: ClientId, key: String, err: &TaskError) {
        comm.key_erred(
            client,
            KeyErred { key, failed_key: String::from(&*err.failed_key), message: err.message.clone(), payload: 0 },
            &err.payload,
        );
    }

    /// For each task: drop its value if nobody needs it, and forget it once no
    /// client holds it and no live task depends on it. Forgetting a task can
    /// make its inputs unneeded in turn; the list grows as that happens.
    pub(crate) fn update_need(&mut self, comm: &mut Comm, mut check: Vec<TaskId>) {
        while let Some(id) = check.pop() {
            let Some(t) = self.tasks.get_mut(id) else { continue };
            if t.is_needed() {
                continue;
            }
            if t.state == TaskState::Memory {
                t.state = TaskState::Released;
                let size = t.size;
                for h in t.holders.drain(..) {
                    comm.release(h, id);
                    if let Some(w) = self.workers.get_mut(&h) {
                        w.stored_values = w.stored_values.saturating_sub(1);
                        w.stored_bytes = w.stored_bytes.saturating_sub(size);
                    }
                }
            }
            if self.tasks[id].is_unreferenced() {
                self.forget(comm, id, &mut check);
            }
        }
    }

    fn forget(&mut self, comm: &mut Comm, id: TaskId, check: &mut Vec<TaskId>) {
        if self.tasks[id].state == TaskState::Assigned {
            if let Some(w) = self.unassign(id) {
                comm.cancel(w, id);
            }
        }
        let t = self.tasks.remove(id).expect("forgetting a live task");
        if !self.restrictions.is_empty() {
            self.restrictions.remove(&id);
        }
        self.unindex_key(id, &t.key);
        self.stats.forgotten += 1;
        for h in &t.holders {
            comm.release(*h, id);
            if let Some(w) = self.workers.get_mut(h) {
                w.stored_values = w.stored_values.saturating_sub(1);
            }
        }
        let finished = t.is_finished();
        for &d in &t.deps {
            if let Some(dt) = self.tasks.get_mut(d) {
                dt.live_dependents -= 1;
                if !finished {
                    dt.pending_dependents -= 1;
                }
                check.push(d);
            }
        }
    }

    /// A value in memory lost its last copy. Unfinished dependents wait for
    /// it again; it is recomputed if anyone still needs it.
    pub(crate) fn data_lost(&mut self, comm: &mut Comm, id: TaskId) {
        let t = &mut self.tasks[id];
        debug_assert!(t.holders.is_empty());
        t.state = TaskState::Released;
        for &c in &t.wanted_by {
            comm.key_lost(c, String::from(&*t.key));
        }
        let dependents = t.dependents.clone();
        for x in dependents {
            let Some(xt) = self.tasks.get_mut(x) else { continue };
            match xt.state {
                TaskState::Waiting => xt.waiting += 1,
                TaskState::Ready => {
                    xt.waiting += 1;
                    xt.state = TaskState::Waiting;
                }
                TaskState::Assigned => {
                    xt.waiting += 1;
                    xt.state = TaskState::Waiting;
                    if let Some(w) = self.unassign(x) {
                        comm.cancel(w, x);
                    }
                }
                _ => {}
            }
        }
        if self.tasks[id].is_needed() {
            self.recompute(comm, id);
        } else {
            self.update_need(comm, vec![id]);
        }
    }

    /// Puts a released task (and released inputs, transitively) back to work.
    /// Its unfinished dependents already count it as missing.
    pub(crate) fn recompute(&mut self, comm: &mut Comm, id: TaskId) {
        let mut stack = vec![id];
        while let Some(x) = stack.pop() {
            if self.tasks[x].state != TaskState::Released {
                continue;
            }
            self.stats.recomputed += 1;
            tracing::debug!(key = %self.tasks[x].key, "recomputing lost value");
            let deps = self.tasks[x].deps.clone();
            let mut waiting = 0;
            let mut erred = None;
            for &d in &deps {
                let dt = &mut self.tasks[d];
                dt.pending_dependents += 1;
                match dt.state {
                    TaskState::Memory => {}
                    TaskState::Released => {
                        waiting += 1;
                        stack.push(d);
                    }
                    TaskState::Erred => {
                        waiting += 1;
                        erred = dt.error.clone();
                    }
                    _ => waiting += 1,
                }
            }
            let t = &mut self.tasks[x];
            t.state = TaskState::Waiting;
            t.waiting = waiting;
            if let Some(err) = erred {
                self.fail_with_dependents(comm, x, *err);
            } else if waiting == 0 {
                self.make_ready(x);
            }
        }
    }

    pub(crate) fn client_releases(&mut self, comm: &mut Comm, client: ClientId, key: &str) {
        let Some(id) = self.lookup(key) else { return };
        let Some(c) = self.clients.get_mut(&client) else { return };
        if c.wanted.remove(&id) {
            self.tasks[id].wanted_by.retain(|x| *x != client);
            self.update_need(comm, vec![id]);
        }
    }

    /// Cancels keys and every unfinished task downstream of them, for every
    /// client that holds any of them.
    pub(crate) fn cancel_keys(&mut self, comm: &mut Comm, keys: &[&str]) {
        let mut stack: Vec<TaskId> = keys.iter().filter_map(|k| self.lookup(k)).collect();
        let mut affected = Vec::new();
        let mut seen = rustc_hash::FxHashSet::default();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let Some(t) = self.tasks.get_mut(id) else { continue };
            for c in t.wanted_by.drain(..) {
                comm.key_cancelled(c, String::from(&*t.key));
                if let Some(cl) = self.clients.get_mut(&c) {
                    cl.wanted.remove(&id);
                }
            }
            let dependents = t.dependents.clone();
            stack.extend(dependents.into_iter().filter(|x| self.tasks.get(*x).is_some_and(|d| !d.is_finished())));
            affected.push(id);
        }
        self.update_need(comm, affected);
    }

    pub(crate) fn replica_added(&mut self, comm: &mut Comm, worker: WorkerId, id: TaskId) {
        let keep = self.tasks.get(id).is_some_and(|t| t.state == TaskState::Memory && t.is_needed());
        let Some(w) = self.workers.get_mut(&worker) else { return };
        if !keep {
            comm.release(worker, id);
            return;
        }
        let t = &mut self.tasks[id];
        if !t.holders.contains(&worker) {
            t.holders.push(worker);
            w.stored_values += 1;
            w.stored_bytes += t.size;
        }
    }

    /// Drops the copy of `key` on the worker at `address` when another
    /// copy remains (never the last one). True when it went.
    pub(crate) fn drop_replica(&mut self, comm: &mut Comm, key: &str, address: &str) -> bool {
        let Some(id) = self.lookup(key) else { return false };
        let Some((&wid, _)) = self.workers.iter().find(|(_, w)| w.address == address) else { return false };
        let t = &mut self.tasks[id];
        if t.state != TaskState::Memory || t.holders.len() < 2 || !t.holders.contains(&wid) {
            return false;
        }
        t.holders.retain(|h| *h != wid);
        let size = t.size;
        comm.release(wid, id);
        if let Some(w) = self.workers.get_mut(&wid) {
            w.stored_values = w.stored_values.saturating_sub(1);
            w.stored_bytes = w.stored_bytes.saturating_sub(size);
        }
        true
    }

    pub(crate) fn fetch_failed(&mut self, comm: &mut Comm, worker: WorkerId, task: TaskId, dep: TaskId, holder: WorkerId) {
        if let Some(dt) = self.tasks.get_mut(dep) {
            if let Some(pos) = dt.holders.iter().position(|h| *h == holder) {
                tracing::warn!(key = %dt.key, %holder, "worker could not fetch value from holder; dropping that replica");
                dt.holders.remove(pos);
                let size = dt.size;
                if let Some(w) = self.workers.get_mut(&holder) {
                    w.stored_values = w.stored_values.saturating_sub(1);
                    w.stored_bytes = w.stored_bytes.saturating_sub(size);
                    // It may still hold a broken copy; make sure it drops it.
                    comm.release(holder, dep);
                }
                if dt.holders.is_empty() && dt.state == TaskState::Memory {
                    self.data_lost(comm, dep);
                }
            }
        }
        // The worker dropped `task`; place it again if it is still ours.
        let current = self.tasks.get(task).map(|t| (t.state, t.assigned));
        if current == Some((TaskState::Assigned, Some(worker))) {
            self.unassign(task);
            let t = &self.tasks[task];
            if t.waiting == 0 {
                self.make_ready(task);
            } else {
                self.tasks[task].state = TaskState::Waiting;
            }
        }
    }

    /// The worker says the task started running there.
    pub(crate) fn task_executing(&mut self, worker: WorkerId, id: TaskId) {
        if let Some(t) = self.tasks.get_mut(id) {
            if t.state == TaskState::Assigned && t.assigned == Some(worker) {
                t.executing = true;
            }
        }
    }

    pub(crate) fn steal_reply(&mut self, worker: WorkerId, id: TaskId, stolen: bool) {
        let Some(t) = self.tasks.get_mut(id) else { return };
        if !(t.steal_to.is_some() && t.state == TaskState::Assigned && t.assigned == Some(worker)) {
            return;
        }
        let thief = t.steal_to.take().unwrap();
        if let Some(w) = self.workers.get_mut(&worker) {
            w.steals_in_flight = w.steals_in_flight.saturating_sub(1);
        }
        if let Some(tw) = self.workers.get_mut(&thief) {
            tw.incoming_steals = tw.incoming_steals.saturating_sub(1);
        }
        // Balancing skips victims with steals in flight; now there is one
        // less, so look again.
        self.idle_hint = true;
        if stolen {
            self.unassign(id);
            self.stats.stolen += 1;
            // Straight to the worker it was stolen for, if that one is still here.
            if self.workers.contains_key(&thief) {
                self.tasks[id].state = TaskState::Ready;
                self.pending_assign.push((id, thief));
            } else {
                self.make_ready(id);
            }
        }
    }

    pub(crate) fn who_has<'a>(&self, comm: &mut Comm, client: ClientId, request_id: u64, keys: impl Iterator<Item = &'a str>) {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for key in keys {
            match self.lookup(key).map(|id| (id, &self.tasks[id])) {
                Some((id, t)) if t.state == TaskState::Memory => found.push(KeyLocation {
                    key: key.to_string(),
                    task: id,
                    size: t.size,
                    addresses: t.holders.iter().filter_map(|h| self.workers.get(h)).map(|w| w.address.clone()).collect(),
                }),
                _ => missing.push(key.to_string()),
            }
        }
        comm.send_client(client, ToClientMessage::WhoHas { request_id, found, missing });
    }
}
