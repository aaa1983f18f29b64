//! Graph submission: validation (all or nothing), b-level priorities, insertion.

use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::{
    ArchivedRestriction, ArchivedSubmitGraph, KeyDone, Resource, Restriction, ToClientMessage, NO_FRAME,
};
use rdask_transport::{ClientId, TaskId};
use hashbrown::HashTable;
use smallvec::SmallVec;
use thin_vec::ThinVec;

use super::{Core, Priority, Task, TaskState};
use crate::comm::Comm;
use crate::error::SchedError;

/// How a key of the batch resolves.
#[derive(Clone, Copy)]
enum Slot {
    /// A new task, index into the batch.
    New,
    /// A task the scheduler already holds.
    Existing(TaskId),
}

impl Core {
    pub(crate) fn on_submit(
        &mut self,
        comm: &mut Comm,
        client: ClientId,
        graph: &ArchivedSubmitGraph,
        data: &[Bytes],
    ) -> Result<(), SchedError> {
        if !self.clients.contains_key(&client) {
            return Err(SchedError::BadMessage(format!("unknown client {client}")));
        }
        let submit_id = graph.submit_id.to_native();
        let graph_tasks = graph.graph_tasks.to_native();
        if graph_tasks > 0 {
            self.graph_tasks_hint = graph_tasks;
        }
        match self.validate(graph, data) {
            Ok(plan) => {
                self.insert(comm, client, graph, data, plan);
                comm.send_client(client, ToClientMessage::Submitted { submit_id });
                Ok(())
            }
            Err(SchedError::Rejected(message)) => {
                tracing::warn!(%client, "submit rejected: {message}");
                // Later batches of this graph cannot succeed; drop the pins.
                self.unpin(comm, client, Some(graph.graph_id.to_native()));
                comm.send_client(client, ToClientMessage::SubmitRejected { submit_id, message });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves every key and orders the new tasks topologically; rejects
    /// duplicates, unknown dependencies, bad indices and cycles.
    fn validate(&self, graph: &ArchivedSubmitGraph, data: &[Bytes]) -> Result<Plan, SchedError> {
        let n = graph.tasks.len();
        let nkeys = graph.keys.len();
        let reject = |m: String| Err(SchedError::Rejected(m));
        if nkeys < n {
            return reject(format!("{nkeys} keys for {n} tasks"));
        }
        let mut slots = Vec::with_capacity(nkeys);
        // Each key is hashed once; the hash serves the duplicate check, the
        // lookup here and the insertion later.
        let hashes: Vec<u64> = graph.keys.iter().map(|k| self.hash_key(k.as_str())).collect();
        let mut seen: HashTable<u32> = HashTable::with_capacity(n);
        for (i, key) in graph.keys.iter().enumerate() {
            let key = key.as_str();
            let h = hashes[i];
            let in_batch = seen.find(h, |&j| graph.keys[j as usize].as_str() == key).is_some();
            if i < n {
                if in_batch {
                    return reject(format!("duplicate key {key:?} in one submission"));
                }
                seen.insert_unique(h, i as u32, |&j| hashes[j as usize]);
                slots.push(match self.lookup_hashed(key, h) {
                    Some(id) => Slot::Existing(id),
                    None => Slot::New,
                });
            } else {
                match self.lookup_hashed(key, h) {
                    Some(id) => slots.push(Slot::Existing(id)),
                    None if in_batch => {
                        return reject(format!("key {key:?} listed both as a task and as an existing dependency"))
                    }
                    None => {
                        let user = graph.tasks.iter().enumerate().find_map(|(t, spec)| {
                            spec.deps.iter().any(|d| d.to_native() as usize == i).then(|| graph.keys[t].as_str())
                        });
                        return reject(format!(
                            "task {:?} depends on unknown key {key:?} (not in this submission and not held by the scheduler)",
                            user.unwrap_or("?")
                        ));
                    }
                }
            }
        }
        // In-batch edges between new tasks, as CSR of dependents, plus indegrees.
        let mut indegree = vec![0u32; n];
        let mut dependents_count = vec![0u32; n + 1];
        for (i, spec) in graph.tasks.iter().enumerate() {
            let payload = spec.payload.to_native();
            if payload != NO_FRAME && payload as usize >= data.len() {
                return reject(format!("task {:?} names data frame {payload}, but {} were sent", graph.keys[i].as_str(), data.len()));
            }
            let r = spec.restriction.to_native();
            if r != NO_FRAME && r as usize >= graph.restrictions.len() {
                let have = graph.restrictions.len();
                return reject(format!("task {:?} names restriction {r}, but {have} were sent", graph.keys[i].as_str()));
            }
            if !matches!(slots[i], Slot::New) {
                continue;
            }
            for d in spec.deps.iter() {
                let d = d.to_native() as usize;
                if d >= nkeys {
                    return reject(format!("task {:?} names dependency index {d} of {nkeys}", graph.keys[i].as_str()));
                }
                if d == i {
                    return reject(format!("cycle: task {:?} depends on itself", graph.keys[i].as_str()));
                }
                if let Slot::New = slots[d] {
                    indegree[i] += 1;
                    dependents_count[d + 1] += 1;
                }
            }
        }
        for i in 0..n {
            dependents_count[i + 1] += dependents_count[i];
        }
        let offsets = dependents_count;
        let mut fill = offsets.clone();
        let mut adjacency = vec![0u32; offsets[n] as usize];
        for (i, spec) in graph.tasks.iter().enumerate() {
            if !matches!(slots[i], Slot::New) {
                continue;
            }
            for d in spec.deps.iter() {
                let d = d.to_native() as usize;
                if let Slot::New = slots[d] {
                    adjacency[fill[d] as usize] = i as u32;
                    fill[d] += 1;
                }
            }
        }
        // Kahn: anything left with indegree > 0 sits on a cycle.
        let mut order: Vec<u32> = (0..n as u32).filter(|&i| matches!(slots[i as usize], Slot::New) && indegree[i as usize] == 0).collect();
        let mut head = 0;
        while head < order.len() {
            let t = order[head] as usize;
            head += 1;
            for &x in &adjacency[offsets[t] as usize..offsets[t + 1] as usize] {
                indegree[x as usize] -= 1;
                if indegree[x as usize] == 0 {
                    order.push(x);
                }
            }
        }
        let new_count = slots[..n].iter().filter(|s| matches!(s, Slot::New)).count();
        if order.len() < new_count {
            let stuck: Vec<&str> = (0..n).filter(|&i| indegree[i] > 0).take(5).map(|i| graph.keys[i].as_str()).collect();
            return reject(format!("cycle in submitted graph involving {stuck:?}"));
        }
        // b-level (longest path to a sink, in tasks) for the fallback order.
        let mut blevel = vec![0i64; n];
        for &t in order.iter().rev() {
            let t = t as usize;
            let best = adjacency[offsets[t] as usize..offsets[t + 1] as usize]
                .iter()
                .map(|&x| blevel[x as usize])
                .max()
                .unwrap_or(0);
            blevel[t] = best + 1;
        }
        Ok(Plan { slots, order, blevel, hashes })
    }

    fn insert(&mut self, comm: &mut Comm, client: ClientId, graph: &ArchivedSubmitGraph, data: &[Bytes], plan: Plan) {
        let Plan { mut slots, order, blevel, hashes } = plan;
        let mut new_ids: Vec<(u32, TaskId)> = Vec::with_capacity(order.len());
        self.tasks.reserve(order.len());
        self.reserve_keys(order.len());
        for &i in &order {
            let spec = &graph.tasks[i as usize];
            let deps: SmallVec<[TaskId; 2]> = spec
                .deps
                .iter()
                .map(|d| match slots[d.to_native() as usize] {
                    Slot::Existing(id) => id,
                    Slot::New => unreachable!("topological order puts dependencies first"),
                })
                .collect();
            let payload = match spec.payload.to_native() {
                NO_FRAME => Bytes::new(),
                p => data[p as usize].clone(),
            };
            self.next_seq = self.next_seq.wrapping_add(1);
            let order_value = spec.order.as_ref().map(|o| o.to_native()).unwrap_or(-blevel[i as usize]);
            let task = Task {
                key: graph.keys[i as usize].as_str().into(),
                payload,
                deps,
                dependents: SmallVec::new(),
                holders: SmallVec::new(),
                wanted_by: ThinVec::new(),
                error: None,
                priority: Priority { order: order_value, user: spec.user_priority.to_native(), seq: self.next_seq },
                size: 0,
                waiting: 0,
                pending_dependents: 0,
                live_dependents: 0,
                assigned: None,
                retries_left: spec.retries.to_native(),
                pins: 0,
                suspicious: 0,
                executing: false,
                careful: false,
                steal_to: None,
                state: TaskState::Waiting,
            };
            let id = self.tasks.insert(task);
            self.index_key(id, hashes[i as usize]);
            let r = spec.restriction.to_native();
            if r != NO_FRAME {
                self.restrictions.insert(id, Box::new(owned_restriction(&graph.restrictions[r as usize])));
            }
            slots[i as usize] = Slot::Existing(id);
            new_ids.push((i, id));
            self.stats.submitted += 1;
        }
        // Until the graph's last batch arrives, every key of this batch (new
        // or reused) stays: a later batch may depend on it.
        if graph.more {
            let graph_id = graph.graph_id.to_native();
            let ids: Vec<TaskId> = slots[..graph.tasks.len()]
                .iter()
                .map(|s| match s {
                    Slot::Existing(id) => *id,
                    Slot::New => unreachable!("every new task was inserted"),
                })
                .collect();
            for &id in &ids {
                self.tasks[id].pins += 1;
            }
            let c = self.clients.get_mut(&client).expect("checked above");
            c.pinned.entry(graph_id).or_default().extend(ids);
        }
        // Client interest before linking, so a task that errs while being
        // linked tells its clients and is then released by the normal rules.
        for (i, spec) in graph.tasks.iter().enumerate() {
            if spec.want {
                if let Slot::Existing(id) = slots[i] {
                    self.add_want(comm, client, id);
                }
            }
        }
        // Wire edges and states once every new task exists.
        for &(_, id) in &new_ids {
            self.link_new_task(comm, id);
        }
        // Tasks that erred on an erred input are released by the normal
        // rules, but only now: while linking, a later task of this batch may
        // still have been about to depend on them.
        let erred: Vec<TaskId> =
            new_ids.iter().map(|&(_, id)| id).filter(|&id| self.tasks.get(id).is_some_and(|t| t.state == TaskState::Erred)).collect();
        if !erred.is_empty() {
            self.update_need(comm, erred);
        }
        if !graph.more {
            self.unpin(comm, client, Some(graph.graph_id.to_native()));
        }
    }

    /// Counts the new task's unfinished inputs and makes it ready, erred or
    /// waiting accordingly.
    fn link_new_task(&mut self, comm: &mut Comm, id: TaskId) {
        let deps = self.tasks[id].deps.clone();
        let mut waiting = 0;
        let mut erred_by = None;
        for &d in &deps {
            let dep = &mut self.tasks[d];
            dep.dependents.push(id);
            dep.live_dependents += 1;
            dep.pending_dependents += 1;
            match dep.state {
                TaskState::Memory => {}
                TaskState::Erred => {
                    erred_by.get_or_insert(d);
                    waiting += 1;
                }
                _ => waiting += 1,
            }
        }
        self.tasks[id].waiting = waiting;
        if let Some(d) = erred_by {
            let err = self.tasks[d].error.clone().expect("erred task keeps its error");
            self.fail_with_dependents(comm, id, *err);
            return;
        }
        for &d in &deps {
            if self.tasks[d].state == TaskState::Released {
                self.recompute(comm, d);
            }
        }
        if waiting == 0 {
            self.make_ready(id);
        }
    }

    /// A multi-batch submission is complete or abandoned (`None`: all of the
    /// client's): its tasks fall back to the normal release rules.
    pub(crate) fn unpin(&mut self, comm: &mut Comm, client: ClientId, graph: Option<u64>) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        let pinned: Vec<TaskId> = match graph {
            Some(g) => c.pinned.remove(&g).unwrap_or_default(),
            None => c.pinned.drain().flat_map(|(_, v)| v).collect(),
        };
        if pinned.is_empty() {
            return;
        }
        for &id in &pinned {
            if let Some(t) = self.tasks.get_mut(id) {
                t.pins -= 1;
            }
        }
        self.update_need(comm, pinned);
    }

    /// `client` holds `id`: tell it now if the value is already there.
    pub(crate) fn add_want(&mut self, comm: &mut Comm, client: ClientId, id: TaskId) {
        let Some(c) = self.clients.get_mut(&client) else { return };
        if !c.wanted.insert(id) {
            return;
        }
        let t = &mut self.tasks[id];
        t.wanted_by.push(client);
        match t.state {
            TaskState::Memory => comm.key_done(client, KeyDone { key: String::from(&*t.key), size: t.size }),
            TaskState::Erred => {
                let err = t.error.clone().expect("erred task keeps its error");
                let key = String::from(&*t.key);
                self.notify_erred(comm, client, key, &err);
            }
            TaskState::Released => self.recompute(comm, id),
            _ => {}
        }
    }
}

struct Plan {
    slots: Vec<Slot>,
    /// New tasks (batch indices) in topological order.
    order: Vec<u32>,
    blevel: Vec<i64>,
    hashes: Vec<u64>,
}

fn owned_restriction(r: &ArchivedRestriction) -> Restriction {
    Restriction {
        workers: r.workers.iter().map(|w| w.to_string()).collect(),
        resources: r.resources.iter().map(|x| Resource { name: x.name.to_string(), amount: x.amount.to_native() }).collect(),
        loose: r.loose,
    }
}
