//! Coordination primitives held by the scheduler, as distributed's
//! scheduler extensions: variables, semaphores and locks (one table: a lock
//! is a semaphore of one lease; a multi-lock takes several names at once),
//! events, queues and published datasets.
//!
//! Values are opaque bytes (pickled by the client). A value that holds a
//! future names its key: the scheduler keeps that key alive while the value
//! is held (through a client of its own, [`COORD_CLIENT`]), so
//! `Variable.set(future)` outlives the client that set it, as in distributed.
//!
//! Waiting operations (get a variable not set yet, acquire a taken lock,
//! wait for an event, get from an empty queue) are answered when they can be
//! granted. Timeouts are the client's: it sends `Cancel`, and gets either
//! `Cancelled` or the grant that was already on its way, never both. A client
//! that leaves gives back its leases and stops its waits.

use std::collections::VecDeque;

use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::{ArchivedCoordOp, CoordOutcome, ToClientMessage};
use rdask_transport::ClientId;
use rustc_hash::{FxHashMap, FxHashSet};

use super::Core;
use crate::comm::Comm;

/// The client under which keys held by coordination values stay alive.
pub const COORD_CLIENT: ClientId = ClientId(u32::MAX as _);

#[derive(Clone)]
struct Held {
    value: Bytes,
    key: Option<String>,
}

struct Waiter {
    client: ClientId,
    request_id: u64,
}

struct AcquireWait {
    client: ClientId,
    request_id: u64,
    names: Vec<String>,
    max_leases: u32,
    count: u32,
    lease: u64,
}

#[derive(Default)]
pub struct Coordination {
    variables: FxHashMap<String, Held>,
    variable_waits: FxHashMap<String, Vec<Waiter>>,
    /// Semaphore name → (max leases, leases held).
    semaphores: FxHashMap<String, (u32, u32)>,
    /// (client, lease) → the names it holds.
    leases: FxHashMap<(ClientId, u64), Vec<String>>,
    acquire_waits: VecDeque<AcquireWait>,
    events: FxHashSet<String>,
    event_waits: FxHashMap<String, Vec<Waiter>>,
    queues: FxHashMap<String, VecDeque<Held>>,
    queue_waits: FxHashMap<String, VecDeque<Waiter>>,
    datasets: FxHashMap<String, (Held, Vec<String>)>,
    /// How many held values name each key.
    key_refs: FxHashMap<String, u32>,
}

fn reply(comm: &mut Comm, client: ClientId, request_id: u64, outcome: CoordOutcome) {
    comm.send_client(client, ToClientMessage::Coord { request_id, outcome });
}

fn reply_values(comm: &mut Comm, client: ClientId, request_id: u64, values: Vec<Held>) {
    let keys = values.iter().map(|h| h.key.clone()).collect();
    let data = values.into_iter().map(|h| h.value).collect();
    comm.send_client_data(client, ToClientMessage::Coord { request_id, outcome: CoordOutcome::Values(keys) }, data);
}

impl Coordination {
    fn can_take(&self, names: &[String], max_leases: u32, count: u32) -> Option<Vec<String>> {
        let want = if count == 0 { names.len() } else { (count as usize).min(names.len()) };
        let free: Vec<String> = names
            .iter()
            .filter(|n| self.semaphores.get(*n).is_none_or(|&(max, held)| held < max.max(1)))
            .take(want)
            .cloned()
            .collect();
        // A name not seen yet takes its limit from this request.
        let _ = max_leases;
        (free.len() == want).then_some(free)
    }

    fn take(&mut self, client: ClientId, lease: u64, names: Vec<String>, max_leases: u32) {
        for n in &names {
            let e = self.semaphores.entry(n.clone()).or_insert((max_leases.max(1), 0));
            e.1 += 1;
        }
        self.leases.entry((client, lease)).or_default().extend(names);
    }

    fn give_back(&mut self, client: ClientId, lease: u64) -> bool {
        let Some(names) = self.leases.remove(&(client, lease)) else { return false };
        for n in names {
            if let Some(e) = self.semaphores.get_mut(&n) {
                e.1 = e.1.saturating_sub(1);
            }
        }
        true
    }

    /// Grants waiting acquisitions that fit now, oldest first.
    fn grant_waiting(&mut self, comm: &mut Comm) {
        let mut i = 0;
        while i < self.acquire_waits.len() {
            let w = &self.acquire_waits[i];
            if let Some(names) = self.can_take(&w.names, w.max_leases, w.count) {
                let w = self.acquire_waits.remove(i).unwrap();
                self.take(w.client, w.lease, names, w.max_leases);
                reply(comm, w.client, w.request_id, CoordOutcome::Done);
            } else {
                i += 1;
            }
        }
    }
}

impl Core {
    fn hold_key(&mut self, comm: &mut Comm, key: &Option<String>) {
        let Some(k) = key else { return };
        let count = self.coord.key_refs.entry(k.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            if let Some(id) = self.lookup(k) {
                self.clients.entry(COORD_CLIENT).or_default();
                self.add_want(comm, COORD_CLIENT, id);
            }
        }
    }

    /// A client receives a value holding a future: it holds the key from
    /// now on, as if it had submitted it (it releases it like its own).
    fn give_keys(&mut self, comm: &mut Comm, client: ClientId, values: &[Held]) {
        for h in values {
            if let Some(id) = h.key.as_deref().and_then(|k| self.lookup(k)) {
                self.add_want(comm, client, id);
            }
        }
    }

    fn send_values(&mut self, comm: &mut Comm, client: ClientId, request_id: u64, values: Vec<Held>) {
        self.give_keys(comm, client, &values);
        reply_values(comm, client, request_id, values);
    }

    fn drop_key(&mut self, comm: &mut Comm, key: &Option<String>) {
        let Some(k) = key else { return };
        let Some(count) = self.coord.key_refs.get_mut(k) else { return };
        *count -= 1;
        if *count == 0 {
            self.coord.key_refs.remove(k);
            self.client_releases(comm, COORD_CLIENT, k);
        }
    }

    pub(crate) fn on_coord(&mut self, comm: &mut Comm, client: ClientId, request_id: u64, op: &ArchivedCoordOp, data: &[Bytes]) {
        let value = || data.first().cloned().unwrap_or_default();
        let key = |k: &rdask_transport::rkyv::option::ArchivedOption<rdask_transport::rkyv::string::ArchivedString>| {
            k.as_ref().map(|k| k.to_string())
        };
        let c = &mut self.coord;
        match op {
            ArchivedCoordOp::VariableSet { name, key: k } => {
                let held = Held { value: value(), key: key(k) };
                self.hold_key(comm, &held.key);
                let old = self.coord.variables.insert(name.to_string(), held.clone());
                if let Some(old) = old {
                    self.drop_key(comm, &old.key);
                }
                for w in self.coord.variable_waits.remove(name.as_str()).unwrap_or_default() {
                    self.send_values(comm, w.client, w.request_id, vec![held.clone()]);
                }
                reply(comm, client, request_id, CoordOutcome::Done);
            }
            ArchivedCoordOp::VariableGet { name } => match c.variables.get(name.as_str()).cloned() {
                Some(h) => self.send_values(comm, client, request_id, vec![h]),
                None => c.variable_waits.entry(name.to_string()).or_default().push(Waiter { client, request_id }),
            },
            ArchivedCoordOp::VariableDelete { name } => {
                if let Some(old) = c.variables.remove(name.as_str()) {
                    self.drop_key(comm, &old.key);
                }
                reply(comm, client, request_id, CoordOutcome::Done);
            }
            ArchivedCoordOp::Acquire { names, max_leases, count, lease } => {
                let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                let (max_leases, count, lease) = (max_leases.to_native(), count.to_native(), lease.to_native());
                if c.leases.contains_key(&(client, lease)) {
                    return reply(comm, client, request_id, CoordOutcome::Error(format!("lease {lease} is held already")));
                }
                // Waiting acquisitions go first (no overtaking), unless this fits and none wait.
                match c.can_take(&names, max_leases, count).filter(|_| c.acquire_waits.is_empty()) {
                    Some(free) => {
                        c.take(client, lease, free, max_leases);
                        reply(comm, client, request_id, CoordOutcome::Done);
                    }
                    None => c.acquire_waits.push_back(AcquireWait { client, request_id, names, max_leases, count, lease }),
                }
            }
            ArchivedCoordOp::Release { lease } => {
                let released = c.give_back(client, lease.to_native());
                c.grant_waiting(comm);
                reply(comm, client, request_id, CoordOutcome::Bool(released));
            }
            ArchivedCoordOp::Leases { name } => {
                let held = c.semaphores.get(name.as_str()).map_or(0, |&(_, held)| held);
                reply(comm, client, request_id, CoordOutcome::Count(held as u64));
            }
            ArchivedCoordOp::EventSet { name } => {
                c.events.insert(name.to_string());
                for w in c.event_waits.remove(name.as_str()).unwrap_or_default() {
                    reply(comm, w.client, w.request_id, CoordOutcome::Done);
                }
                reply(comm, client, request_id, CoordOutcome::Done);
            }
            ArchivedCoordOp::EventClear { name } => {
                c.events.remove(name.as_str());
                reply(comm, client, request_id, CoordOutcome::Done);
            }
            ArchivedCoordOp::EventWait { name } => {
                if c.events.contains(name.as_str()) {
                    reply(comm, client, request_id, CoordOutcome::Done);
                } else {
                    c.event_waits.entry(name.to_string()).or_default().push(Waiter { client, request_id });
                }
            }
            ArchivedCoordOp::EventIsSet { name } => {
                let set = c.events.contains(name.as_str());
                reply(comm, client, request_id, CoordOutcome::Bool(set));
            }
            ArchivedCoordOp::QueuePut { name, key: k } => {
                let held = Held { value: value(), key: key(k) };
                self.hold_key(comm, &held.key);
                let c = &mut self.coord;
                match c.queue_waits.get_mut(name.as_str()).and_then(|q| q.pop_front()) {
                    // Handed straight to a waiting getter, which holds the key now.
                    Some(w) => {
                        self.send_values(comm, w.client, w.request_id, vec![held.clone()]);
                        self.drop_key(comm, &held.key);
                    }
                    None => c.queues.entry(name.to_string()).or_default().push_back(held),
                }
                reply(comm, client, request_id, CoordOutcome::Done);
            }
            ArchivedCoordOp::QueueGet { name, batch } => {
                let batch = batch.to_native() as usize;
                let q = c.queues.entry(name.to_string()).or_default();
                if batch > 0 || !q.is_empty() {
                    let n = if batch == 0 { 1 } else { batch.min(q.len()) };
                    let items: Vec<Held> = q.drain(..n).collect();
                    self.send_values(comm, client, request_id, items.clone());
                    for h in &items {
                        self.drop_key(comm, &h.key);
                    }
                } else {
                    c.queue_waits.entry(name.to_string()).or_default().push_back(Waiter { client, request_id });
                }
            }
            ArchivedCoordOp::QueueSize { name } => {
                let n = c.queues.get(name.as_str()).map_or(0, |q| q.len());
                reply(comm, client, request_id, CoordOutcome::Count(n as u64));
            }
            ArchivedCoordOp::DatasetPublish { name, keys, replace } => {
                if c.datasets.contains_key(name.as_str()) && !*replace {
                    return reply(comm, client, request_id, CoordOutcome::Error(format!("Dataset {name} already exists")));
                }
                let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                for k in &keys {
                    self.hold_key(comm, &Some(k.clone()));
                }
                let old = self.coord.datasets.insert(name.to_string(), (Held { value: value(), key: None }, keys));
                if let Some((_, old_keys)) = old {
                    for k in old_keys {
                        self.drop_key(comm, &Some(k));
                    }
                }
                reply(comm, client, request_id, CoordOutcome::Done);
            }
            ArchivedCoordOp::DatasetGet { name } => match c.datasets.get(name.as_str()).cloned() {
                Some((h, keys)) => {
                    for k in keys {
                        if let Some(id) = self.lookup(&k) {
                            self.add_want(comm, client, id);
                        }
                    }
                    reply_values(comm, client, request_id, vec![h]);
                }
                None => reply(comm, client, request_id, CoordOutcome::Error(format!("no dataset named {name:?}"))),
            },
            ArchivedCoordOp::DatasetDelete { name } => {
                let found = match c.datasets.remove(name.as_str()) {
                    Some((_, keys)) => {
                        for k in keys {
                            self.drop_key(comm, &Some(k));
                        }
                        true
                    }
                    None => false,
                };
                reply(comm, client, request_id, CoordOutcome::Bool(found));
            }
            ArchivedCoordOp::DatasetList => {
                let mut names: Vec<String> = c.datasets.keys().cloned().collect();
                names.sort();
                reply(comm, client, request_id, CoordOutcome::Names(names));
            }
            ArchivedCoordOp::Cancel { request_id: of } => {
                let of = of.to_native();
                if c.cancel_wait(client, of) {
                    reply(comm, client, of, CoordOutcome::Cancelled);
                }
            }
        }
    }

    /// A client left: its leases go back and its waits end.
    pub(crate) fn coord_client_left(&mut self, comm: &mut Comm, client: ClientId) {
        let c = &mut self.coord;
        let leases: Vec<u64> = c.leases.keys().filter(|(cl, _)| *cl == client).map(|(_, l)| *l).collect();
        let had_leases = !leases.is_empty();
        for l in leases {
            c.give_back(client, l);
        }
        c.acquire_waits.retain(|w| w.client != client);
        for waits in c.variable_waits.values_mut().chain(c.event_waits.values_mut()) {
            waits.retain(|w| w.client != client);
        }
        for waits in c.queue_waits.values_mut() {
            waits.retain(|w| w.client != client);
        }
        if had_leases {
            tracing::info!(client = %client, "client left holding leases (locks, semaphores); they are released");
        }
        c.grant_waiting(comm);
    }
}

impl Coordination {
    fn cancel_wait(&mut self, client: ClientId, request_id: u64) -> bool {
        let hit = |w: &Waiter| w.client == client && w.request_id == request_id;
        let before = self.acquire_waits.len();
        self.acquire_waits.retain(|w| !(w.client == client && w.request_id == request_id));
        let mut found = self.acquire_waits.len() != before;
        for waits in self.variable_waits.values_mut().chain(self.event_waits.values_mut()) {
            let n = waits.len();
            waits.retain(|w| !hit(w));
            found |= waits.len() != n;
        }
        for waits in self.queue_waits.values_mut() {
            let n = waits.len();
            waits.retain(|w| !hit(w));
            found |= waits.len() != n;
        }
        found
    }
}
