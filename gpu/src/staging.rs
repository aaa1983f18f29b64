//! Moving a device value over the network without a whole-value host copy.
//!
//! Sending: the value is copied to host in chunks, each into a staging
//! buffer from a small pool (page-locked memory on a GPU, so the copy runs at
//! the bus's speed), and each chunk is handed to the network as `Bytes` that
//! own the staging buffer: while the network writes chunk i, the device
//! copies chunk i+1 into another buffer, and a buffer goes back to the pool
//! when the network has dropped it. At most `depth` chunks of host memory are
//! in use per pool, whatever the value's size.
//!
//! Receiving: chunks are copied into a device buffer of the value's size as
//! they arrive ([`StageIn`]); a value that arrives short or long is an error.

use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;

use crate::device::{Device, DeviceBuffer, StagingBuffer};
use crate::GpuError;

/// Default chunk: large enough for full bus speed, small enough to overlap.
pub const DEFAULT_CHUNK: usize = 8 << 20;
/// Default staging buffers per pool.
pub const DEFAULT_DEPTH: usize = 4;

/// A bounded pool of staging buffers for one device.
pub struct StagingPool {
    device: Arc<dyn Device>,
    chunk: usize,
    depth: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Where its buffers go when it is dropped, and where it looks before
    /// allocating (page-locked memory is slow to allocate and to free).
    cache: Option<Arc<StagingCache>>,
}

/// Staging buffers kept between pools: a transfer gets a pool of its own
/// (a peer that stops reading holds up only its own buffers), and the
/// buffers outlive it here for the next transfer. Bounded.
pub struct StagingCache {
    free: Mutex<Vec<StagingBuffer>>,
    max: usize,
}

impl StagingCache {
    pub fn new(max: usize) -> Arc<StagingCache> {
        Arc::new(StagingCache { free: Mutex::new(Vec::new()), max })
    }

    fn take(&self, len: usize) -> Option<StagingBuffer> {
        let mut free = self.free.lock().unwrap();
        let i = free.iter().position(|b| b.len() == len)?;
        Some(free.swap_remove(i))
    }

    /// Buffers held now.
    pub fn len(&self) -> usize {
        self.free.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for StagingPool {
    fn drop(&mut self) {
        if let Some(cache) = &self.cache {
            let mut st = self.state.lock().unwrap();
            let mut free = cache.free.lock().unwrap();
            while free.len() < cache.max {
                match st.free.pop() {
                    Some(b) => free.push(b),
                    None => break,
                }
            }
        }
    }
}

struct PoolState {
    free: Vec<StagingBuffer>,
    created: usize,
    in_use: usize,
    most_in_use: usize,
}

impl StagingPool {
    pub fn new(device: Arc<dyn Device>, chunk: usize, depth: usize) -> Arc<Self> {
        Self::with_cache(device, chunk, depth, None)
    }

    /// A pool that takes buffers from `cache` before allocating and leaves
    /// them there when it is dropped.
    pub fn with_cache(device: Arc<dyn Device>, chunk: usize, depth: usize, cache: Option<Arc<StagingCache>>) -> Arc<Self> {
        Arc::new(StagingPool {
            device,
            chunk: chunk.max(1),
            depth: depth.max(1),
            state: Mutex::new(PoolState { free: Vec::new(), created: 0, in_use: 0, most_in_use: 0 }),
            freed: Condvar::new(),
            cache,
        })
    }

    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The most staging buffers in use at once so far.
    pub fn most_in_use(&self) -> usize {
        self.state.lock().unwrap().most_in_use
    }

    /// A free staging buffer; waits while `depth` are out (the network has
    /// not yet written them), creating up to `depth` of them.
    fn take(&self) -> Result<StagingBuffer, GpuError> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(b) = st.free.pop() {
                st.in_use += 1;
                st.most_in_use = st.most_in_use.max(st.in_use);
                return Ok(b);
            }
            if st.created < self.depth {
                st.created += 1;
                st.in_use += 1;
                st.most_in_use = st.most_in_use.max(st.in_use);
                drop(st);
                if let Some(b) = self.cache.as_ref().and_then(|c| c.take(self.chunk)) {
                    return Ok(b);
                }
                return self.device.alloc_staging(self.chunk).inspect_err(|_| {
                    let mut st = self.state.lock().unwrap();
                    st.created -= 1;
                    st.in_use -= 1;
                });
            }
            st = self.freed.wait(st).unwrap();
        }
    }

    fn give(&self, b: StagingBuffer) {
        let mut st = self.state.lock().unwrap();
        st.in_use -= 1;
        st.free.push(b);
        self.freed.notify_one();
    }
}

/// A staged chunk handed to the network; its buffer returns to the pool
/// when the network drops it.
struct Staged {
    buf: Option<StagingBuffer>,
    len: usize,
    pool: Arc<StagingPool>,
}

impl AsRef<[u8]> for Staged {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("present until dropped").bytes()[..self.len]
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

/// Sends `src` as chunks through `send` (which queues them on a connection
/// and returns). Returns the number of chunks. Blocks while the pool's
/// buffers are all on the wire: call it from a thread that may wait.
pub fn stage_out<E: From<GpuError>>(pool: &Arc<StagingPool>, src: &DeviceBuffer, mut send: impl FnMut(Bytes) -> Result<(), E>) -> Result<usize, E> {
    let mut chunks = 0;
    let mut offset = 0;
    while offset < src.len() {
        let len = pool.chunk.min(src.len() - offset);
        let mut buf = pool.take()?;
        if let Err(e) = pool.device.copy_to_host(src, offset, &mut buf, len) {
            pool.give(buf);
            return Err(e.into());
        }
        send(Bytes::from_owner(Staged { buf: Some(buf), len, pool: pool.clone() }))?;
        offset += len;
        chunks += 1;
    }
    Ok(chunks)
}

/// Device memory that another library owns (the arrays of a value being
/// sent), read off the device one staging chunk at a time: each chunk is
/// copied into a buffer of `pool` and handed out as `Bytes` that return the
/// buffer when dropped, so at most the pool's depth of chunks is in host
/// memory, and the copy of a chunk overlaps the sending of the ones before.
pub struct RawSource {
    pool: Arc<StagingPool>,
    parts: std::collections::VecDeque<(u64, u64)>,
    offset: u64,
}

impl RawSource {
    /// `parts`: (device address, bytes) in sending order.
    ///
    /// # Safety
    /// Every part must stay allocated device memory of the pool's device
    /// until the source is dropped (the caller keeps its arrays alive); the
    /// caller waited for their writers ([`crate::device::Device::wait_for`]).
    pub unsafe fn new(pool: Arc<StagingPool>, parts: Vec<(u64, u64)>) -> RawSource {
        RawSource { pool, parts: parts.into_iter().filter(|p| p.1 > 0).collect(), offset: 0 }
    }

    /// Bytes still to come.
    pub fn remaining(&self) -> u64 {
        self.parts.iter().map(|p| p.1).sum::<u64>() - self.offset
    }

    /// The next chunk (never spanning two parts), or `None` at the end.
    /// Blocks while all of the pool's buffers are out.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, GpuError> {
        let Some(&(address, len)) = self.parts.front() else { return Ok(None) };
        let n = (self.pool.chunk as u64).min(len - self.offset) as usize;
        let mut buf = self.pool.take()?;
        let read = buf.bytes_mut().and_then(|dst| {
            // SAFETY: `new`'s contract keeps the part allocated; the range
            // lies inside it.
            unsafe { self.pool.device.read_raw(address + self.offset, &mut dst[..n]) }
        });
        if let Err(e) = read {
            self.pool.give(buf);
            return Err(e);
        }
        self.offset += n as u64;
        if self.offset == len {
            self.parts.pop_front();
            self.offset = 0;
        }
        Ok(Some(Bytes::from_owner(Staged { buf: Some(buf), len: n, pool: self.pool.clone() })))
    }
}

/// A device value arriving in chunks.
pub struct StageIn {
    device: Arc<dyn Device>,
    buf: Option<DeviceBuffer>,
    filled: usize,
}

impl StageIn {
    /// Allocates the value's device buffer (an out-of-memory error here is
    /// the caller's cue to spill, see `DeviceStore::make_room`).
    pub fn new(device: Arc<dyn Device>, len: usize) -> Result<Self, GpuError> {
        let buf = device.alloc(len)?;
        Ok(StageIn { device, buf: Some(buf), filled: 0 })
    }

    /// Bytes copied in so far.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Copies the next chunk into place.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), GpuError> {
        let buf = self.buf.as_mut().expect("present until finished");
        if self.filled + chunk.len() > buf.len() {
            return Err(GpuError::Device {
                what: "receiving a device value".into(),
                reason: format!("{} bytes arrived for a value of {}", self.filled + chunk.len(), buf.len()),
            });
        }
        self.device.copy_from_host(buf, self.filled, chunk)?;
        self.filled += chunk.len();
        Ok(())
    }

    /// The value, once every byte has arrived.
    pub fn finish(mut self) -> Result<DeviceBuffer, GpuError> {
        let buf = self.buf.take().expect("present until finished");
        if self.filled != buf.len() {
            let reason = format!("only {} of {} bytes arrived", self.filled, buf.len());
            self.device.free(buf);
            return Err(GpuError::Device { what: "receiving a device value".into(), reason });
        }
        Ok(buf)
    }
}

impl Drop for StageIn {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.device.free(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{upload, HostStandIn};

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_value_moves_in_chunks_through_at_most_depth_staging_buffers() {
        let dev = Arc::new(HostStandIn::default());
        let value = pattern((10 << 20) + 12345);
        let src = upload(dev.as_ref(), &value).unwrap();
        let pool = StagingPool::new(dev.clone(), 1 << 20, 3);
        // The "network" writes chunks on another thread, a little behind.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
        let receiver_dev: Arc<dyn Device> = dev.clone();
        let receiver = std::thread::spawn(move || {
            let mut into = StageIn::new(receiver_dev, (10 << 20) + 12345).unwrap();
            for chunk in rx {
                std::thread::sleep(std::time::Duration::from_millis(2));
                into.push(&chunk).unwrap();
            }
            into.finish().unwrap()
        });
        let chunks = stage_out(&pool, &src, |b| tx.send(b).map_err(|_| GpuError::NoDevices)).unwrap();
        drop(tx);
        let got = receiver.join().unwrap();
        assert_eq!(chunks, 11);
        let mut back = StagingBuffer::Host(vec![0; got.len()]);
        dev.copy_to_host(&got, 0, &mut back, got.len()).unwrap();
        assert!(back.bytes() == &value[..], "the value arrived intact");
        // Never a whole-value host copy on the way, and bounded host memory.
        assert!(pool.most_in_use() <= 3, "{}", pool.most_in_use());
        assert_eq!(dev.staging_allocs(), 3);
        assert!(dev.largest_copy() <= (10 << 20) + 12345);
        assert_eq!(dev.copies(), 1 + 11 + 11 + 1, "upload, 11 out, 11 in, the check");
    }

    #[test]
    fn memory_of_another_library_leaves_in_chunks_of_at_most_depth_buffers() {
        let dev = Arc::new(HostStandIn::default());
        // Two "arrays" whose memory the caller owns (stand-in addresses are host addresses).
        let (a, b) = (pattern((3 << 20) + 5), pattern(1 << 20));
        let pool = StagingPool::new(dev.clone(), 1 << 20, 2);
        // SAFETY: `a` and `b` outlive the source.
        let mut src = unsafe { RawSource::new(pool.clone(), vec![(a.as_ptr() as u64, a.len() as u64), (0, 0), (b.as_ptr() as u64, b.len() as u64)]) };
        assert_eq!(src.remaining(), (4 << 20) + 5);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
        let network = std::thread::spawn(move || {
            let mut got = Vec::new();
            for chunk in rx {
                std::thread::sleep(std::time::Duration::from_millis(2));
                got.push(chunk.len());
                drop(chunk);
            }
            got
        });
        let mut joined = Vec::new();
        while let Some(chunk) = src.next_chunk().unwrap() {
            joined.extend_from_slice(&chunk);
            tx.send(chunk).unwrap();
        }
        drop(tx);
        let sizes = network.join().unwrap();
        assert_eq!(sizes, vec![1 << 20, 1 << 20, 1 << 20, 5, 1 << 20], "chunks never span two arrays");
        assert!(joined[..a.len()] == a[..] && joined[a.len()..] == b[..]);
        assert!(pool.most_in_use() <= 2 && dev.staging_allocs() == 2, "{}", pool.most_in_use());
        assert_eq!(src.remaining(), 0);
    }

    #[test]
    fn pools_of_one_transfer_each_reuse_buffers_through_the_cache() {
        let dev = Arc::new(HostStandIn::default());
        let cache = StagingCache::new(3);
        let data = pattern(5 << 20);
        for round in 0..3 {
            let pool = StagingPool::with_cache(dev.clone(), 1 << 20, 2, Some(cache.clone()));
            // SAFETY: `data` outlives the source.
            let mut src = unsafe { RawSource::new(pool, vec![(data.as_ptr() as u64, data.len() as u64)]) };
            let mut joined = Vec::new();
            while let Some(chunk) = src.next_chunk().unwrap() {
                joined.extend_from_slice(&chunk);
            }
            assert!(joined == data, "round {round}");
            drop(src);
            assert_eq!(cache.len(), dev.staging_allocs(), "the pool's buffers wait in the cache");
            assert_eq!(dev.staging_allocs(), 1, "only the first transfer allocated (one buffer: chunks were let go at once)");
        }
    }

    #[test]
    fn a_value_that_arrives_short_or_long_is_an_error_and_frees_its_buffer() {
        let dev = Arc::new(HostStandIn::with_capacity(1000));
        let mut s = StageIn::new(dev.clone(), 100).unwrap();
        s.push(&[1; 60]).unwrap();
        let e = s.finish().unwrap_err();
        assert!(e.to_string().contains("only 60 of 100 bytes"), "{e}");
        assert_eq!(dev.allocated(), 0);
        let mut s = StageIn::new(dev.clone(), 100).unwrap();
        assert!(s.push(&[1; 101]).unwrap_err().to_string().contains("101 bytes arrived"));
        drop(s);
        assert_eq!(dev.allocated(), 0);
        // Out of device memory is a clear error, not a panic.
        let e = StageIn::new(dev.clone(), 2000).err().unwrap();
        assert!(e.to_string().contains("out of device memory"), "{e}");
    }
}
