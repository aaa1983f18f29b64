//! The worker's values, shared between the worker loop (insert/release), the
//! peer server (reads) and the memory monitor (spilling).
//!
//! A value is in memory or, once spilled, on disk. With spilling enabled the
//! store keeps values in least-recently-used order (a stamp per value and a
//! B-tree from stamp to id); without it (no memory limit, the benchmarks'
//! null workers) it keeps no order and costs what a hash map costs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rdask_transport::TaskId;
use rustc_hash::FxHashMap;

use crate::executor::{Executor, Frames, TaskFailure, Value};
use crate::spill::{OnDisk, SpillDir};

/// What a look into the store found, without reading anything back from disk.
pub enum Held {
    Memory(Value),
    Disk,
}

/// A value as the peer server finds it.
pub enum Serve {
    Frames(Result<Frames, TaskFailure>),
    Disk(OnDisk),
    /// A device value, sent in chunks as they are copied off the device.
    Staged(crate::executor::Staged),
}

/// Reads a spilled value's frames for a peer (the file stays).
pub fn read_spilled(disk: &OnDisk) -> Result<Frames, TaskFailure> {
    SpillDir::read(disk, false).map_err(|e| TaskFailure::message(format!("cannot read spilled value: {e}")))
}

/// Figures for heartbeats, logs and `scheduler_info()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub memory_bytes: u64,
    pub memory_values: u64,
    pub disk_bytes: u64,
    pub disk_values: u64,
    /// Since the worker started: values (and bytes) written to disk and read back.
    pub spilled_total: u64,
    pub spilled_total_bytes: u64,
    pub unspilled_total: u64,
    pub unspilled_total_bytes: u64,
}

/// How a round of spilling ended.
#[derive(Debug, Default)]
pub struct SpillRound {
    pub values: u64,
    pub bytes: u64,
    /// Writing failed (full disk, no permission): the value stayed in
    /// memory; the caller backs off before trying again.
    pub error: Option<String>,
}

struct Spilling {
    dir: SpillDir,
    /// Turns frames read back from disk into a value (the executor's codec).
    executor: Arc<dyn Executor>,
}

#[derive(Default)]
pub struct Store {
    inner: Mutex<Inner>,
    spilling: Option<Spilling>,
    /// Keep the use order without spilling to disk: device values move to
    /// host memory least recently used first (`device_tier.rs`).
    ordered: bool,
}

/// In-memory values sit in `values` exactly as in a store that never
/// spills (the hot path of micro-tasks pays nothing for spilling); spilled
/// ones in `spilled`; use order only when spilling.
#[derive(Default)]
struct Inner {
    values: FxHashMap<TaskId, Value>,
    spilled: FxHashMap<TaskId, OnDisk>,
    stats: StoreStats,
    /// Last use of each in-memory value, and the values by last use
    /// (oldest first); kept only when spilling.
    stamps: FxHashMap<TaskId, u64>,
    lru: BTreeMap<u64, TaskId>,
    next_stamp: u64,
}

impl Inner {
    /// Marks `id` (in memory) as just used.
    fn touch(&mut self, id: TaskId) {
        self.next_stamp += 1;
        let stamp = self.next_stamp;
        if let Some(old) = self.stamps.insert(id, stamp) {
            self.lru.remove(&old);
        }
        self.lru.insert(stamp, id);
    }

    fn forget_order(&mut self, id: TaskId) {
        // Without spilling there is no order to forget (and no hashing).
        if self.stamps.is_empty() {
            return;
        }
        if let Some(old) = self.stamps.remove(&id) {
            self.lru.remove(&old);
        }
    }

    /// Takes `id` out (memory or disk); what was there is returned to be
    /// dropped (or deleted) after the lock is released.
    #[inline]
    fn take(&mut self, id: TaskId, gone: &mut Vec<Value>, files: &mut Vec<OnDisk>) {
        if let Some(v) = self.values.remove(&id) {
            self.stats.memory_bytes -= v.host_bytes();
            self.stats.memory_values -= 1;
            self.forget_order(id);
            gone.push(v);
        } else if let Some(d) = if self.spilled.is_empty() { None } else { self.spilled.remove(&id) } {
            self.stats.disk_bytes -= d.bytes;
            self.stats.disk_values -= 1;
            files.push(d);
        }
    }
}

impl Store {
    /// A store that can spill: to its own folder in `dir`, values read back
    /// with `executor`'s codec.
    pub fn with_spilling(dir: SpillDir, executor: Arc<dyn Executor>) -> Store {
        Store { inner: Mutex::default(), spilling: Some(Spilling { dir, executor }), ordered: false }
    }

    /// This store, keeping values in use order for device→host spilling.
    pub fn ordered(mut self) -> Store {
        self.ordered = true;
        self
    }

    fn tracks(&self) -> bool {
        self.ordered || self.spilling.is_some()
    }

    pub fn insert_many(&self, values: Vec<(TaskId, Value)>) {
        if values.is_empty() {
            return;
        }
        let track = self.tracks();
        let mut replaced = Vec::new();
        let mut files = Vec::new();
        let mut guard = self.inner.lock().unwrap();
        let g = &mut *guard;
        g.values.reserve(values.len());
        for (id, value) in values {
            g.stats.memory_bytes += value.host_bytes();
            g.stats.memory_values += 1;
            if let Some(old) = g.values.insert(id, value) {
                g.stats.memory_bytes -= old.host_bytes();
                g.stats.memory_values -= 1;
                replaced.push(old);
            }
            if track {
                g.touch(id);
                if let Some(d) = g.spilled.remove(&id) {
                    g.stats.disk_bytes -= d.bytes;
                    g.stats.disk_values -= 1;
                    files.push(d);
                }
            }
        }
        drop(guard);
        drop(replaced);
        files.iter().for_each(SpillDir::remove);
    }

    pub fn remove_many(&self, ids: impl Iterator<Item = TaskId>) {
        let mut gone = Vec::new();
        let mut files = Vec::new();
        let mut guard = self.inner.lock().unwrap();
        if self.tracks() {
            for id in ids {
                guard.take(id, &mut gone, &mut files);
            }
        } else {
            // Nothing is ever on disk or ordered: the map alone.
            let g = &mut *guard;
            for id in ids {
                if let Some(v) = g.values.remove(&id) {
                    g.stats.memory_bytes -= v.host_bytes();
                    g.stats.memory_values -= 1;
                    gone.push(v);
                }
            }
        }
        // Values are dropped after the lock is released: dropping one may
        // wait for an executor's interpreter lock (a large Python value),
        // and nothing may wait for that while holding the store.
        drop(guard);
        drop(gone);
        files.iter().for_each(SpillDir::remove);
    }

    /// Which of these values are here, and the in-memory ones themselves;
    /// reads nothing back from disk.
    pub fn lookup_many(&self, ids: impl Iterator<Item = TaskId>) -> Vec<Option<Held>> {
        let g = self.inner.lock().unwrap();
        ids.map(|id| match g.values.get(&id) {
            Some(v) => Some(Held::Memory(v.clone())),
            None => g.spilled.contains_key(&id).then_some(Held::Disk),
        })
        .collect()
    }

    /// The values for a task to run on: in-memory ones are marked as just
    /// used, spilled ones are read back into memory. `None` for a value that
    /// is not here, or that could not be read back (logged).
    pub fn load_many(&self, ids: impl Iterator<Item = TaskId>) -> Vec<Option<Value>> {
        let track = self.tracks();
        let mut on_disk = Vec::new();
        let mut out: Vec<Option<Value>> = {
            let mut g = self.inner.lock().unwrap();
            ids.enumerate()
                .map(|(i, id)| match g.values.get(&id) {
                    Some(v) => {
                        let v = v.clone();
                        if track {
                            g.touch(id);
                        }
                        Some(v)
                    }
                    None => {
                        if let Some(d) = g.spilled.get(&id) {
                            on_disk.push((i, id, d.clone()));
                        }
                        None
                    }
                })
                .collect()
        };
        for (i, id, disk) in on_disk {
            out[i] = self.unspill(id, disk);
        }
        out
    }

    fn unspill(&self, id: TaskId, disk: OnDisk) -> Option<Value> {
        let spilling = self.spilling.as_ref()?;
        let value = match SpillDir::read(&disk, false) {
            Ok(frames) => spilling.executor.deserialize(frames).map_err(|f| f.message),
            Err(e) => Err(e.to_string()),
        };
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(task = %id, path = %disk.path.display(), "cannot read a spilled value back: {e}");
                return None;
            }
        };
        let mut g = self.inner.lock().unwrap();
        if g.spilled.get(&id).is_some_and(|d| d.path == disk.path) {
            g.spilled.remove(&id);
            g.stats.disk_bytes -= disk.bytes;
            g.stats.disk_values -= 1;
            g.stats.memory_bytes += value.host_bytes();
            g.stats.memory_values += 1;
            g.stats.unspilled_total += 1;
            g.stats.unspilled_total_bytes += disk.bytes;
            g.values.insert(id, value.clone());
            g.touch(id);
            drop(g);
            // Readers that opened the file already keep their mapping.
            SpillDir::remove(&disk);
        }
        Some(value)
    }

    /// What to send a peer or client for these values: in-memory values as
    /// frames (`Err` when one cannot be serialised), spilled ones as where
    /// they are on disk, for the caller to read when it is ready to send
    /// ([`read_spilled`]); they stay on disk.
    pub fn serve_many(&self, ids: impl Iterator<Item = TaskId>) -> Vec<Option<Serve>> {
        Self::serve_held(self.hold_many(ids), None, None)
    }

    /// What `serve_many` serves, taken from the store (cheap, under its
    /// lock); [`Store::serve_held`] then serialises (maybe slow, without it).
    pub fn hold_many(&self, ids: impl Iterator<Item = TaskId>) -> Vec<Option<Result<Value, OnDisk>>> {
        let g = self.inner.lock().unwrap();
        ids.map(|id| match g.values.get(&id) {
            Some(v) => Some(Ok(v.clone())),
            None => g.spilled.get(&id).map(|d| Err(d.clone())),
        })
        .collect()
    }

    /// Whether serving these may take a while (an object to serialise, or
    /// device memory to stage): then not on an event loop.
    pub fn serving_may_block(held: &[Option<Result<Value, OnDisk>>]) -> bool {
        held.iter().any(|h| matches!(h, Some(Ok(Value::Object(o))) if o.serialize_may_block()))
    }

    /// `ipc`, `direct`: what the requester offered for device values
    /// (`ObjectValue::staged`).
    pub fn serve_held(
        held: Vec<Option<Result<Value, OnDisk>>>,
        ipc: Option<&rdask_transport::protocol::IpcOffer>,
        direct: Option<rdask_transport::device::MemoryKind>,
    ) -> Vec<Option<Serve>> {
        held.into_iter()
            .map(|h| {
                h.map(|h| match h {
                    Ok(Value::Object(o)) if o.device_bytes() > 0 => match o.staged(ipc, direct) {
                        Some(Ok(staged)) => Serve::Staged(staged),
                        Some(Err(e)) => Serve::Frames(Err(e)),
                        None => Serve::Frames(o.serialize().map(Frames::from_vec)),
                    },
                    Ok(value) => Serve::Frames(value.to_frames()),
                    Err(disk) => Serve::Disk(disk),
                })
            })
            .collect()
    }

    /// Writes least-recently-used values to disk while `more(memory_bytes)`
    /// says so and values are left. A value that cannot be serialised stays
    /// in memory (it is tried again after its next use); a write error ends
    /// the round with the value still in memory: no value is lost.
    pub fn spill_lru(&self, mut more: impl FnMut(u64) -> bool) -> SpillRound {
        let mut round = SpillRound::default();
        let Some(spilling) = self.spilling.as_ref() else { return round };
        // Values on the device free no host memory by going to disk (the
        // device tier moves them): passed over, and put back in line after.
        let mut on_device = Vec::new();
        loop {
            let (id, stamp, value) = {
                let mut g = self.inner.lock().unwrap();
                if !more(g.stats.memory_bytes) {
                    break;
                }
                let Some((stamp, id)) = g.lru.pop_first() else { break };
                match g.values.get(&id) {
                    Some(value) if g.stamps.get(&id) == Some(&stamp) => {
                        if value.device_bytes() > 0 {
                            on_device.push((stamp, id));
                            continue;
                        }
                        (id, stamp, value.clone())
                    }
                    _ => continue,
                }
            };
            let frames = match value.to_frames() {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(task = %id, "cannot spill a value that does not serialise; it stays in memory: {}", e.message);
                    continue;
                }
            };
            drop(value);
            let disk = match spilling.dir.write(id, &frames) {
                Ok(d) => d,
                Err(e) => {
                    // Back in line where it was: it goes first next time.
                    let mut g = self.inner.lock().unwrap();
                    if g.values.contains_key(&id) && g.stamps.get(&id) == Some(&stamp) {
                        g.lru.insert(stamp, id);
                    }
                    round.error = Some(format!("cannot spill to {}: {e}; the value stays in memory", spilling.dir.path().display()));
                    break;
                }
            };
            drop(frames);
            let mut g = self.inner.lock().unwrap();
            let unchanged = g.values.contains_key(&id) && g.stamps.get(&id) == Some(&stamp);
            if !unchanged {
                // Used or released meanwhile: keep it as it is.
                drop(g);
                SpillDir::remove(&disk);
                continue;
            }
            let bytes = disk.bytes;
            let old = g.values.remove(&id).expect("checked above");
            g.stamps.remove(&id);
            g.stats.memory_bytes -= old.host_bytes();
            g.stats.memory_values -= 1;
            g.spilled.insert(id, disk);
            g.stats.disk_bytes += bytes;
            g.stats.disk_values += 1;
            g.stats.spilled_total += 1;
            g.stats.spilled_total_bytes += bytes;
            drop(g);
            drop(old);
            round.values += 1;
            round.bytes += bytes;
        }
        if !on_device.is_empty() {
            let mut g = self.inner.lock().unwrap();
            for (stamp, id) in on_device {
                if g.stamps.get(&id) == Some(&stamp) {
                    g.lru.insert(stamp, id);
                }
            }
        }
        round
    }

    /// Moves values holding device memory to host memory, least recently
    /// used first, while `ledger` is over its limit and such values are left.
    /// A value that fails to move stays on the device (the error is in the
    /// round); the others are still tried.
    pub fn spill_device(&self, ledger: &crate::device_tier::DeviceLedger) -> SpillRound {
        self.spill_device_while(|_| ledger.over_limit())
    }

    /// Moves least-recently-used device values to host memory while
    /// `more(bytes moved so far)` says so and device values are left.
    pub fn spill_device_while(&self, mut more: impl FnMut(u64) -> bool) -> SpillRound {
        let mut round = SpillRound::default();
        let mut from = 0u64;
        while more(round.bytes) {
            let next = {
                let g = self.inner.lock().unwrap();
                g.lru.range(from..).find_map(|(&stamp, id)| match g.values.get(id) {
                    Some(Value::Object(o)) if o.device_bytes() > 0 => Some((stamp, o.clone())),
                    _ => None,
                })
            };
            let Some((stamp, value)) = next else { break };
            from = stamp + 1;
            match value.move_to_host() {
                Ok(bytes) if bytes > 0 => {
                    round.values += 1;
                    round.bytes += bytes;
                }
                Ok(_) => {}
                Err(e) => round.error = Some(e.message),
            }
        }
        round
    }

    /// Bytes of values in memory.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().stats.memory_bytes
    }

    pub fn stats(&self) -> StoreStats {
        self.inner.lock().unwrap().stats
    }

    pub fn spill_dir(&self) -> Option<&std::path::Path> {
        self.spilling.as_ref().map(|s| s.dir.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::NullExecutor;
    use rdask_transport::bytes::Bytes;

    fn value(n: usize, fill: u8) -> Value {
        Value::Bytes(Bytes::from(vec![fill; n]))
    }

    fn spilling_store(tag: &str) -> (Store, std::path::PathBuf) {
        let tmp = std::env::temp_dir().join(format!("rdask-store-{tag}-{}", std::process::id()));
        (Store::with_spilling(SpillDir::new(Some(&tmp), "w"), Arc::new(NullExecutor::default())), tmp)
    }

    fn bytes_of(v: &Value) -> Vec<u8> {
        match v {
            Value::Bytes(b) => b.to_vec(),
            Value::Object(_) => panic!("bytes expected"),
        }
    }

    #[test]
    fn least_recently_used_values_spill_first_and_come_back_intact() {
        let (store, tmp) = spilling_store("lru");
        let ids: Vec<TaskId> = (1..=4).map(TaskId::new).collect();
        store.insert_many(ids.iter().map(|&id| (id, value(1000, id.as_num() as u8))).collect());
        // Use 1 again: 2 is now the oldest.
        store.load_many([ids[0]].into_iter());
        let round = store.spill_lru(|mem| mem > 2000);
        assert_eq!((round.values, round.bytes), (2, 2000));
        let held = store.lookup_many(ids.iter().copied());
        let on_disk: Vec<bool> = held.iter().map(|h| matches!(h, Some(Held::Disk))).collect();
        assert_eq!(on_disk, vec![false, true, true, false], "2 and 3 were least recently used");
        let s = store.stats();
        assert_eq!((s.memory_bytes, s.disk_bytes, s.disk_values, s.spilled_total), (2000, 2000, 2, 2));

        // A peer reads a spilled value: it stays on disk.
        let served = store.serve_many([ids[1]].into_iter()).pop().flatten();
        let Some(Serve::Disk(disk)) = served else { panic!("a spilled value is served from disk") };
        assert_eq!(read_spilled(&disk).unwrap()[0].len(), 1000);
        assert_eq!(store.stats().disk_values, 2);
        // A task needs it: back in memory, with its bytes.
        let loaded = store.load_many([ids[1], ids[2]].into_iter());
        assert_eq!(bytes_of(loaded[0].as_ref().unwrap()), vec![2u8; 1000]);
        assert_eq!(bytes_of(loaded[1].as_ref().unwrap()), vec![3u8; 1000]);
        let s = store.stats();
        assert_eq!((s.memory_bytes, s.disk_values, s.unspilled_total, s.unspilled_total_bytes), (4000, 0, 2, 2000));
        store.remove_many(ids.into_iter());
        assert_eq!(store.stats().memory_values, 0);
        drop(store);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn releasing_a_spilled_value_deletes_its_file() {
        let (store, tmp) = spilling_store("release");
        store.insert_many(vec![(TaskId::new(9), value(10, 1))]);
        assert_eq!(store.spill_lru(|_| true).values, 1);
        let files = || std::fs::read_dir(store.spill_dir().unwrap()).unwrap().count();
        assert_eq!(files(), 1);
        store.remove_many([TaskId::new(9)].into_iter());
        assert_eq!(files(), 0);
        assert_eq!(store.stats(), StoreStats { spilled_total: 1, spilled_total_bytes: 10, ..Default::default() });
        drop(store);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn a_failing_disk_keeps_the_value_in_memory() {
        let blocker = std::env::temp_dir().join(format!("rdask-store-blocker-{}", std::process::id()));
        std::fs::write(&blocker, b"x").unwrap();
        let store = Store::with_spilling(SpillDir::new(Some(&blocker), "w"), Arc::new(NullExecutor::default()));
        store.insert_many(vec![(TaskId::new(1), value(100, 5)), (TaskId::new(2), value(100, 6))]);
        let round = store.spill_lru(|_| true);
        assert_eq!(round.values, 0);
        assert!(round.error.unwrap().contains("cannot spill"));
        assert_eq!(store.stats().memory_values, 2);
        // Still first in line, and readable.
        let v = store.load_many([TaskId::new(1)].into_iter());
        assert_eq!(bytes_of(v[0].as_ref().unwrap()), vec![5u8; 100]);
        let _ = std::fs::remove_file(&blocker);
    }

    /// A value holding "device memory" that reports to a ledger as the
    /// Python executor's values do.
    struct DeviceValue {
        bytes: u64,
        on_device: std::sync::atomic::AtomicBool,
        ledger: Arc<crate::device_tier::DeviceLedger>,
        fail: bool,
    }

    impl crate::executor::ObjectValue for DeviceValue {
        fn size(&self) -> u64 {
            self.bytes
        }
        fn serialize(&self) -> Result<Vec<Bytes>, crate::executor::TaskFailure> {
            Ok(vec![Bytes::from(vec![0u8; self.bytes as usize])])
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn device_bytes(&self) -> u64 {
            if self.on_device.load(std::sync::atomic::Ordering::Relaxed) {
                self.bytes
            } else {
                0
            }
        }
        fn host_bytes(&self) -> u64 {
            0 // all of it device memory
        }
        fn move_to_host(&self) -> Result<u64, crate::executor::TaskFailure> {
            if self.fail {
                return Err(crate::executor::TaskFailure::message("cannot copy"));
            }
            self.on_device.store(false, std::sync::atomic::Ordering::Relaxed);
            self.ledger.moved_to_host(self.bytes);
            Ok(self.bytes)
        }
    }

    #[test]
    fn device_values_move_to_host_least_recently_used_first() {
        let ledger = crate::device_tier::DeviceLedger::new(2500);
        let store = Store::default().ordered();
        let dv = |bytes: u64, fail: bool| {
            ledger.added(bytes);
            Value::Object(Arc::new(DeviceValue { bytes, on_device: true.into(), ledger: ledger.clone(), fail }))
        };
        // 1..=4 on the device (1000 each), 5 a host value, 6 cannot move.
        let ids: Vec<TaskId> = (1..=6).map(TaskId::new).collect();
        store.insert_many(vec![(ids[0], dv(1000, false)), (ids[4], value(5000, 1)), (ids[1], dv(1000, false))]);
        store.insert_many(vec![(ids[5], dv(1000, true)), (ids[2], dv(1000, false)), (ids[3], dv(1000, false))]);
        assert_eq!(ledger.device_bytes(), 5000);
        store.load_many([ids[0]].into_iter()); // 1 is now the most recent
        let round = store.spill_device(&ledger);
        assert!(round.error.as_deref() == Some("cannot copy"), "{:?}", round.error);
        // Oldest first: 2 moves, 6 fails (stays), 3 and 4 move; 2000 <= 2500.
        assert_eq!((round.values, round.bytes), (3, 3000));
        let on_device: Vec<u64> = store
            .lookup_many(ids.iter().copied())
            .into_iter()
            .map(|h| match h {
                Some(Held::Memory(Value::Object(o))) => o.device_bytes(),
                _ => u64::MAX,
            })
            .collect();
        assert_eq!(on_device, vec![1000, 0, 0, 0, u64::MAX, 1000]);
        let st = ledger.stats();
        assert_eq!((st.device_bytes, st.on_host_bytes, st.on_host_values, st.spilled_total), (2000, 3000, 3, 3));
        // Host memory is not touched by device spilling.
        assert_eq!(store.stats().memory_values, 6);
    }

    #[test]
    fn spilling_to_disk_passes_over_values_on_the_device_and_keeps_their_place() {
        let (store, tmp) = spilling_store("device");
        let ledger = crate::device_tier::DeviceLedger::new(0);
        let dv = |bytes: u64| {
            ledger.added(bytes);
            Value::Object(Arc::new(DeviceValue { bytes, on_device: true.into(), ledger: ledger.clone(), fail: false }))
        };
        let ids: Vec<TaskId> = (1..=3).map(TaskId::new).collect();
        store.insert_many(vec![(ids[0], dv(1000)), (ids[1], value(100, 2)), (ids[2], dv(1000))]);
        // Device values count no host memory.
        assert_eq!(store.stats().memory_bytes, 100);
        let round = store.spill_lru(|_| true);
        assert_eq!((round.values, round.bytes), (1, 100), "only the host value goes to disk");
        let held = store.lookup_many(ids.iter().copied());
        assert!(matches!(held[0], Some(Held::Memory(_))) && matches!(held[1], Some(Held::Disk)) && matches!(held[2], Some(Held::Memory(_))));
        // Moved to host, the oldest device value is first in line for disk.
        store.spill_device_while(|moved| moved == 0);
        let round = store.spill_lru(|_| true);
        assert_eq!(round.values, 1);
        let held = store.lookup_many(ids.iter().copied());
        assert!(matches!(held[0], Some(Held::Disk)) && matches!(held[2], Some(Held::Memory(_))));
        assert_eq!(store.stats().memory_bytes, 0);
        drop(store);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn without_spilling_nothing_is_ordered_or_written() {
        let store = Store::default();
        store.insert_many(vec![(TaskId::new(1), value(100, 5))]);
        assert_eq!(store.spill_lru(|_| true).values, 0);
        assert!(store.inner.lock().unwrap().lru.is_empty());
        assert_eq!(store.bytes(), 100);
    }
}
