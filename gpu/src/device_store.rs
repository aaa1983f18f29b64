//! A worker's device values under a device memory limit: when they exceed
//! it, the least recently used move to host memory (where the host memory
//! limit may spill them on to disk); a value needed on the device again is
//! copied back, moving others out first if it does not fit. As dask-cuda's
//! device-host spilling, in the runtime.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use bytes::Bytes;

use crate::device::{Device, DeviceBuffer, StagingBuffer};
use crate::GpuError;

/// Figures for `scheduler_info()` and the logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStats {
    /// Bytes of values now in device memory.
    pub device_bytes: u64,
    /// Bytes of device values now in host memory.
    pub host_bytes: u64,
    pub host_values: u64,
    /// Moves to host so far, and their bytes.
    pub spills: u64,
    pub spilled_bytes: u64,
    /// Moves back to the device so far.
    pub unspills: u64,
}

enum Place {
    Device(DeviceBuffer),
    Host(Bytes),
}

struct Entry {
    place: Place,
    len: u64,
    stamp: u64,
}

pub struct DeviceStore<K> {
    device: Arc<dyn Device>,
    limit: u64,
    entries: HashMap<K, Entry>,
    /// Device-resident values by last use, oldest first.
    lru: BTreeMap<u64, K>,
    clock: u64,
    stats: DeviceStats,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug> DeviceStore<K> {
    /// `limit` in bytes of device memory for values (`--device-memory-limit`).
    pub fn new(device: Arc<dyn Device>, limit: u64) -> Self {
        DeviceStore { device, limit, entries: HashMap::new(), lru: BTreeMap::new(), clock: 0, stats: DeviceStats::default() }
    }

    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn is_on_device(&self, key: &K) -> bool {
        matches!(self.entries.get(key), Some(Entry { place: Place::Device(_), .. }))
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Stores a device value, then moves older ones to host until the
    /// device values fit the limit again. Returns the keys moved.
    pub fn insert(&mut self, key: K, buf: DeviceBuffer) -> Result<Vec<K>, GpuError> {
        self.remove(&key);
        let len = buf.len() as u64;
        let stamp = self.tick();
        self.entries.insert(key.clone(), Entry { place: Place::Device(buf), len, stamp });
        self.lru.insert(stamp, key.clone());
        self.stats.device_bytes += len;
        self.spill_until(self.limit, Some(&key))
    }

    /// Moves least recently used device values to host until device values
    /// take at most `target` bytes (never `keep`). Also the way to make room
    /// before an allocation that failed.
    pub fn spill_until(&mut self, target: u64, keep: Option<&K>) -> Result<Vec<K>, GpuError> {
        let mut moved = Vec::new();
        while self.stats.device_bytes > target {
            let Some(victim) = self.lru.values().find(|k| Some(*k) != keep).cloned() else { break };
            self.spill(&victim)?;
            moved.push(victim);
        }
        if !moved.is_empty() {
            tracing::info!(
                values = moved.len(),
                device_bytes = self.stats.device_bytes,
                limit = self.limit,
                spilled_bytes = self.stats.spilled_bytes,
                "device memory over its limit: moved values to host memory"
            );
        }
        Ok(moved)
    }

    fn spill(&mut self, key: &K) -> Result<(), GpuError> {
        let e = self.entries.get_mut(key).expect("an LRU key is stored");
        let Place::Device(buf) = &e.place else { return Ok(()) };
        let mut host = StagingBuffer::Host(vec![0; buf.len()]);
        self.device.copy_to_host(buf, 0, &mut host, buf.len())?;
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let StagingBuffer::Host(bytes) = host else { unreachable!("made as host memory above") };
        let Place::Device(buf) = std::mem::replace(&mut e.place, Place::Host(Bytes::from(bytes))) else { unreachable!() };
        self.device.free(buf);
        self.lru.remove(&e.stamp);
        self.stats.device_bytes -= e.len;
        self.stats.host_bytes += e.len;
        self.stats.host_values += 1;
        self.stats.spills += 1;
        self.stats.spilled_bytes += e.len;
        Ok(())
    }

    /// The value on the device, copied back from host memory if it was
    /// moved there (making room first: other values move out until it fits
    /// the limit, and again if the device itself is out of memory).
    pub fn get(&mut self, key: &K) -> Result<&DeviceBuffer, GpuError> {
        let stamp = self.tick();
        let (len, on_host, old) = match self.entries.get(key) {
            None => return Err(GpuError::Device { what: "reading a device value".into(), reason: format!("no value {key:?} on this worker") }),
            Some(e) => (e.len, matches!(e.place, Place::Host(_)), e.stamp),
        };
        if on_host {
            self.spill_until(self.limit.saturating_sub(len), Some(key))?;
            let mut buf = match self.device.alloc(len as usize) {
                Ok(b) => b,
                Err(GpuError::OutOfMemory { .. }) => {
                    // Other users of the device hold more than we thought.
                    self.spill_until(0, Some(key))?;
                    self.device.alloc(len as usize)?
                }
                Err(e) => return Err(e),
            };
            let e = self.entries.get_mut(key).expect("checked above");
            if let Place::Host(bytes) = &e.place {
                self.device.copy_from_host(&mut buf, 0, bytes)?;
            }
            e.place = Place::Device(buf);
            self.stats.host_bytes -= len;
            self.stats.host_values -= 1;
            self.stats.device_bytes += len;
            self.stats.unspills += 1;
        } else {
            self.lru.remove(&old);
        }
        self.lru.insert(stamp, key.clone());
        let e = self.entries.get_mut(key).expect("checked above");
        e.stamp = stamp;
        match &e.place {
            Place::Device(b) => Ok(b),
            Place::Host(_) => unreachable!("moved to the device above"),
        }
    }

    pub fn remove(&mut self, key: &K) -> bool {
        let Some(e) = self.entries.remove(key) else { return false };
        match e.place {
            Place::Device(buf) => {
                self.lru.remove(&e.stamp);
                self.stats.device_bytes -= e.len;
                self.device.free(buf);
            }
            Place::Host(_) => {
                self.stats.host_bytes -= e.len;
                self.stats.host_values -= 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{upload, HostStandIn};

    fn value(i: u8, n: usize) -> Vec<u8> {
        (0..n).map(|j| (j as u8).wrapping_mul(13).wrapping_add(i)).collect()
    }

    fn read(dev: &HostStandIn, b: &DeviceBuffer) -> Vec<u8> {
        let mut h = StagingBuffer::Host(vec![0; b.len()]);
        dev.copy_to_host(b, 0, &mut h, b.len()).unwrap();
        h.bytes().to_vec()
    }

    #[test]
    fn values_three_times_the_limit_all_come_back_right_and_the_limit_holds() {
        const MIB: usize = 1 << 20;
        // The device itself is larger than the limit (other users; slack).
        let dev = Arc::new(HostStandIn::with_capacity(4 * MIB as u64));
        let mut store = DeviceStore::new(dev.clone(), 3 * MIB as u64);
        for i in 0..9u8 {
            let b = upload(dev.as_ref(), &value(i, MIB)).unwrap();
            store.insert(i, b).unwrap();
            assert!(store.stats().device_bytes <= 3 * MIB as u64);
            assert!(dev.allocated() <= 3 * MIB as u64);
        }
        let s = store.stats();
        assert_eq!((s.device_bytes, s.host_bytes, s.host_values, s.spills), (3 * MIB as u64, 6 * MIB as u64, 6, 6));
        // Oldest went first: 6, 7, 8 are still on the device.
        assert!((6..9).all(|i| store.is_on_device(&i)) && (0..6).all(|i| !store.is_on_device(&i)));
        // A graph that reads every value (in an order unlike the inserts):
        for i in [0u8, 8, 1, 7, 2, 6, 3, 5, 4, 0] {
            let b = store.get(&i).unwrap();
            assert_eq!(read(&dev, b), value(i, MIB), "value {i}");
            assert!(store.stats().device_bytes <= 3 * MIB as u64);
        }
        let s = store.stats();
        assert!(s.unspills >= 6 && s.spilled_bytes >= 6 * MIB as u64, "{s:?}");
        for i in 0..9u8 {
            assert!(store.remove(&i));
        }
        assert_eq!(store.stats().device_bytes + store.stats().host_bytes, 0);
        assert_eq!(dev.allocated(), 0, "every device buffer given back");
    }

    #[test]
    fn a_used_value_stays_and_the_least_recently_used_moves() {
        let dev = Arc::new(HostStandIn::default());
        let mut store = DeviceStore::new(dev.clone(), 300);
        for k in ["a", "b", "c"] {
            store.insert(k, upload(dev.as_ref(), &[1; 100]).unwrap()).unwrap();
        }
        store.get(&"a").unwrap();
        let moved = store.insert("d", upload(dev.as_ref(), &[2; 100]).unwrap()).unwrap();
        assert_eq!(moved, vec!["b"], "a was used after b");
        // A value larger than the limit itself still goes in (alone).
        let moved = store.insert("big", upload(dev.as_ref(), &[3; 500]).unwrap()).unwrap();
        assert_eq!(moved.len(), 3);
        assert!(store.is_on_device(&"big"));
        assert!(store.get(&"nope").unwrap_err().to_string().contains("no value"));
    }

    #[test]
    fn when_the_device_is_full_of_others_values_getting_one_back_makes_room() {
        // The device holds 250 bytes; the store's limit thinks 1000.
        let dev = Arc::new(HostStandIn::with_capacity(250));
        let mut store = DeviceStore::new(dev.clone(), 1000);
        store.insert(1, upload(dev.as_ref(), &[1; 100]).unwrap()).unwrap();
        store.insert(2, upload(dev.as_ref(), &[2; 100]).unwrap()).unwrap();
        store.spill_until(100, None).unwrap();
        assert!(!store.is_on_device(&1) && store.is_on_device(&2));
        let other = dev.alloc(100).unwrap(); // someone else's allocation
        assert_eq!(read(&dev, store.get(&1).unwrap()), vec![1; 100]);
        assert!(!store.is_on_device(&2), "2 moved out to make room for 1");
        dev.free(other);
    }
}
