//! Placement: ready tasks go to the worker holding most of their input bytes
//! that has room; tasks without inputs spread round-robin. When the ready
//! queue is empty and a worker idles, queued work is stolen from the busiest.

use rdask_transport::protocol::DepInfo;
use rdask_transport::{TaskId, WorkerId};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use super::{Core, TaskState};
use crate::comm::Comm;

/// Steal only from workers queueing more than this many tasks per thread.
const STEAL_MIN_QUEUE_PER_THREAD: u32 = 2;
const MAX_STEAL_PER_ROUND: usize = 4096;

impl Core {
    /// Tasks the worker may hold; none for a worker that is leaving or paused.
    fn capacity(&self, w: WorkerId) -> u32 {
        let w = &self.workers[&w];
        if !w.takes_work() {
            return 0;
        }
        w.nthreads.max(1) * self.config.tasks_per_thread
    }

    /// Assigns as many ready tasks as workers have room for, then balances.
    /// Call once after each burst of events.
    pub fn schedule(&mut self, comm: &mut Comm) {
        if self.workers.is_empty() {
            return;
        }
        for (id, w) in std::mem::take(&mut self.pending_assign) {
            let ok = self.tasks.get(id).is_some_and(|t| t.state == TaskState::Ready)
                && self.workers.get(&w).is_some_and(|w| w.takes_work());
            if ok {
                self.assign(comm, id, w);
            } else if self.tasks.get(id).is_some_and(|t| t.state == TaskState::Ready) {
                self.make_ready(id);
            }
        }
        for id in std::mem::take(&mut self.parked) {
            if self.tasks.get(id).is_some_and(|t| t.state == TaskState::Ready) {
                self.make_ready(id);
            }
        }
        while let Some((prio, id)) = self.ready.peek() {
            let live = self.tasks.get(id).is_some_and(|t| t.state == TaskState::Ready && t.priority == prio);
            if !live {
                self.ready.pop();
                continue;
            }
            if !self.restrictions.is_empty() && self.restrictions.contains_key(&id) {
                // A restricted task that cannot go anywhere now must not
                // hold up the tasks behind it.
                self.ready.pop();
                match self.choose_restricted(id) {
                    Some(w) => self.assign(comm, id, w),
                    None => self.parked.push(id),
                }
                continue;
            }
            let Some(w) = self.choose_worker(id) else { break };
            self.ready.pop();
            self.assign(comm, id, w);
        }
        if self.idle_hint {
            self.idle_hint = false;
            if self.ready.is_empty() {
                self.balance(comm);
            }
        }
    }

    fn choose_worker(&mut self, id: TaskId) -> Option<WorkerId> {
        let t = &self.tasks[id];
        if !t.deps.is_empty() {
            if let Some(w) = self.best_local(id) {
                return Some(w);
            }
        }
        // Tasks without inputs go out in blocks of consecutive tasks per
        // worker, not one by one: neighbours in submission order (siblings
        // under one reduction) then share a worker, so their dependents find
        // both inputs local. The block is the ready backlog split evenly, or
        // half the announced graph per worker when the graph is still
        // arriving in batches (the first batches are small on purpose).
        let n = self.worker_order.len();
        let from_graph = (self.graph_tasks_hint / (2 * n as u64)) as usize;
        let block = (self.ready.len() / n).max(from_graph).max(1) as u32;
        for _ in 0..=n {
            let w = self.worker_order[self.rr_cursor % n];
            if self.rr_filled < block && self.workers[&w].load() < self.capacity(w) {
                self.rr_filled += 1;
                return Some(w);
            }
            self.rr_cursor = self.rr_cursor.wrapping_add(1);
            self.rr_filled = 0;
        }
        None
    }

    /// The allowed worker with room holding most input bytes (then the least
    /// loaded); None while every allowed worker is full or none is connected.
    fn choose_restricted(&self, id: TaskId) -> Option<WorkerId> {
        let r = &self.restrictions[&id];
        let named = |w: &super::Worker| r.workers.is_empty() || r.workers.iter().any(|s| worker_matches(w, s));
        let equipped = |w: &super::Worker| {
            r.resources.iter().all(|need| w.resources.iter().any(|have| have.name == need.name && have.amount >= need.amount))
        };
        let any_named = self.workers.values().any(|w| named(w) && equipped(w));
        let allowed = |w: &super::Worker| equipped(w) && (named(w) || (r.loose && !any_named));
        let deps = &self.tasks[id].deps;
        self.worker_order
            .iter()
            .filter_map(|id| self.workers.get(id).map(|w| (*id, w)))
            .filter(|(wid, w)| allowed(w) && w.load() < self.capacity(*wid))
            .max_by_key(|(wid, w)| {
                let local: u64 = deps
                    .iter()
                    .map(|d| &self.tasks[*d])
                    .filter(|dt| dt.holders.contains(wid))
                    .map(|dt| dt.size.max(1))
                    .sum();
                (local, std::cmp::Reverse(w.load()))
            })
            .map(|(wid, _)| wid)
    }

    /// The worker with room that holds the most input bytes (each input
    /// counts at least one byte, so many small inputs still attract).
    fn best_local(&self, id: TaskId) -> Option<WorkerId> {
        let deps = &self.tasks[id].deps;
        let mut small: SmallVec<[(WorkerId, u64); 8]> = SmallVec::new();
        let mut big: FxHashMap<WorkerId, u64> = FxHashMap::default();
        let use_map = deps.len() > 32;
        for d in deps {
            let dt = &self.tasks[*d];
            for &h in &dt.holders {
                let bytes = dt.size.max(1);
                if use_map {
                    *big.entry(h).or_default() += bytes;
                } else if let Some(e) = small.iter_mut().find(|e| e.0 == h) {
                    e.1 += bytes;
                } else {
                    small.push((h, bytes));
                }
            }
        }
        let candidates: Box<dyn Iterator<Item = (WorkerId, u64)>> =
            if use_map { Box::new(big.into_iter()) } else { Box::new(small.into_iter()) };
        candidates
            .filter(|(w, _)| self.workers.get(w).is_some_and(|wk| wk.load() < self.capacity(*w)))
            .max_by_key(|(w, bytes)| (*bytes, std::cmp::Reverse(self.workers[w].load()), std::cmp::Reverse(*w)))
            .map(|(w, _)| w)
    }

    pub(crate) fn assign(&mut self, comm: &mut Comm, id: TaskId, w: WorkerId) {
        let t = &mut self.tasks[id];
        t.state = TaskState::Assigned;
        t.assigned = Some(w);
        t.executing = false;
        let t = &self.tasks[id];
        // Filled in place: a reused record keeps the capacity of its key and input list.
        let mut msg = comm.compute_record();
        msg.id = id;
        msg.key.clear();
        msg.key.push_str(&t.key);
        msg.user_priority = t.priority.user;
        msg.order = t.priority.order;
        msg.careful = t.careful;
        msg.deps.clear();
        msg.deps.extend(t.deps.iter().map(|d| {
            let dt = &self.tasks[*d];
            DepInfo { id: *d, size: dt.size, holders: dt.holders.clone() }
        }));
        let resources = self.restrictions.get(&id).map(|r| r.resources.as_slice()).filter(|r| !r.is_empty());
        comm.compute(w, msg, &t.payload, resources);
        self.workers.get_mut(&w).expect("assigning to a live worker").processing.insert(id);
    }

    /// Work stealing: idle workers take queued tasks from the busiest ones.
    /// The victim answers for each task whether it gave it up (it may have
    /// started it already); given-up tasks return to the ready queue.
    fn balance(&mut self, comm: &mut Comm) {
        let mut idle: Vec<(WorkerId, u32)> = Vec::new();
        let mut busy: Vec<(WorkerId, u32)> = Vec::new();
        for (&id, w) in &self.workers {
            let load = w.load();
            if w.leaving {
                continue;
            }
            if w.paused {
                // It starts nothing: all it has queued may go elsewhere.
                if load > 0 && w.steals_in_flight == 0 {
                    busy.push((id, load));
                }
                continue;
            }
            if load < w.nthreads && w.incoming_steals == 0 {
                idle.push((id, w.nthreads - load));
            } else if load > w.nthreads * STEAL_MIN_QUEUE_PER_THREAD && w.steals_in_flight == 0 {
                busy.push((id, load - w.nthreads));
            }
        }
        if idle.is_empty() || busy.is_empty() {
            return;
        }
        // Each idle worker asks for enough to fill its queue, not just its threads.
        let mut thieves: Vec<(WorkerId, usize)> =
            idle.iter().map(|(w, free)| (*w, (*free * self.config.tasks_per_thread.max(1)) as usize)).collect();
        let mut cursor = 0;
        let mut remaining: usize = thieves.iter().map(|(_, n)| n).sum::<usize>().min(MAX_STEAL_PER_ROUND);
        busy.sort_by_key(|(_, surplus)| std::cmp::Reverse(*surplus));
        for (victim, surplus) in busy {
            if remaining == 0 {
                break;
            }
            // Take at most half of the victim's queue, so it keeps working too.
            let take = (surplus as usize / 2).max(1).min(remaining);
            let picked: Vec<TaskId> = self.workers[&victim]
                .processing
                .iter()
                .copied()
                .filter(|t| self.tasks[*t].steal_to.is_none() && !self.restrictions.contains_key(t))
                .take(take)
                .collect();
            let mut sent = 0u32;
            for t in &picked {
                // Round-robin over thieves that still want work.
                let Some(pos) = (0..thieves.len()).map(|i| (cursor + i) % thieves.len()).find(|&i| thieves[i].1 > 0) else {
                    break;
                };
                cursor = pos + 1;
                thieves[pos].1 -= 1;
                let thief = thieves[pos].0;
                self.tasks[*t].steal_to = Some(thief);
                self.workers.get_mut(&thief).unwrap().incoming_steals += 1;
                comm.steal(victim, *t);
                sent += 1;
            }
            let w = self.workers.get_mut(&victim).unwrap();
            w.steals_in_flight += sent;
            remaining -= picked.len();
        }
    }
}

/// `workers=` entries name a worker by name, address (with or without the
/// scheme) or host.
fn worker_matches(w: &super::Worker, s: &str) -> bool {
    let bare = w.address.split_once("://").map_or(w.address.as_str(), |(_, rest)| rest);
    let host = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
    w.name == s || w.address == s || bare == s || host == s
}
