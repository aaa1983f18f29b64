//! The worker's values, shared between the worker loop (insert/release) and
//! the peer server (reads).

use std::sync::Mutex;

use rdask_transport::TaskId;
use rustc_hash::FxHashMap;

use crate::executor::Value;

#[derive(Default)]
pub struct Store {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    values: FxHashMap<TaskId, Value>,
    bytes: u64,
}

impl Store {

    pub fn insert_many(&self, values: Vec<(TaskId, Value)>) {
        if values.is_empty() {
            return;
        }
        let mut replaced = Vec::new();
        let mut g = self.inner.lock().unwrap();
        g.values.reserve(values.len());
        for (id, value) in values {
            g.bytes += value.size();
            if let Some(old) = g.values.insert(id, value) {
                g.bytes -= old.size();
                replaced.push(old);
            }
        }
        drop(g);
        drop(replaced);
    }

    pub fn remove_many(&self, ids: impl Iterator<Item = TaskId>) {
        let mut gone = Vec::new();
        let mut g = self.inner.lock().unwrap();
        for id in ids {
            if let Some(v) = g.values.remove(&id) {
                g.bytes -= v.size();
                gone.push(v);
            }
        }
        // Values are dropped after the lock is released: dropping one may
        // wait for an executor's interpreter lock (a large Python value),
        // and nothing may wait for that while holding the store.
        drop(g);
        drop(gone);
    }

    /// Looks up many values under one lock.
    pub fn get_many(&self, ids: impl Iterator<Item = TaskId>) -> Vec<Option<Value>> {
        let g = self.inner.lock().unwrap();
        ids.map(|id| g.values.get(&id).cloned()).collect()
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }
}
