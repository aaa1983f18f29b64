//! Reuse of large receive buffers. Memory the kernel has just handed out
//! must be zeroed page by page on first touch, and on a VM that can cost
//! more than the network copy itself (2.5 s per GiB measured here in slow
//! phases, docs/benchmarks.md). A received value's memory that is freed
//! again (the value was released) goes back to this pool, already mapped, and
//! the next large receive of a similar size lands in it.
//!
//! Bounded on purpose: a few buffers, at most an eighth of the machine's
//! memory (and 4 GiB), each dropped after a minute unused.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Receives smaller than this allocate as usual.
pub const POOL_MIN: usize = 32 << 20;
/// Enough for a stream of 64 MiB values: a UCX receiver keeps four in
/// flight (256 MiB) while the last ones are handed up; with 4, one buffer in
/// five was new memory (a third of the receiver's CPU time spent clearing
/// pages, `perf`, 8 GiB of 64 MiB frames).
const MAX_BUFFERS: usize = 8;
const MAX_IDLE: Duration = Duration::from_secs(60);

struct Pool {
    free: Vec<(Vec<u8>, Instant)>,
    limit: usize,
}

fn pool() -> &'static Mutex<Pool> {
    static POOL: std::sync::OnceLock<Mutex<Pool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Mutex::new(Pool { free: Vec::new(), limit: default_limit() }))
}

fn default_limit() -> usize {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let phys = if pages > 0 && size > 0 { pages as usize * size as usize } else { 0 };
    (phys / 8).min(4 << 30)
}

impl Pool {
    fn expire(&mut self, now: Instant) {
        self.free.retain(|(_, since)| now.duration_since(*since) < MAX_IDLE);
    }

    fn held(&self) -> usize {
        self.free.iter().map(|(b, _)| b.capacity()).sum()
    }
}

/// An empty buffer with room for `len` bytes: a pooled one of at most twice
/// that size if there is one, else a new allocation. `fresh` is told when
/// the memory is new (for madvise and the like).
pub fn take(len: usize, fresh: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    if len >= POOL_MIN {
        let mut p = pool().lock().unwrap();
        p.expire(Instant::now());
        let best = p
            .free
            .iter()
            .enumerate()
            .filter(|(_, (b, _))| b.capacity() >= len && b.capacity() / 2 <= len)
            .min_by_key(|(_, (b, _))| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let (mut b, _) = p.free.swap_remove(i);
            b.clear();
            return b;
        }
    }
    let mut b = Vec::with_capacity(len);
    fresh(&mut b);
    b
}

/// Owns a received buffer; gives it back to the pool when the last `Bytes`
/// pointing into it is dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.capacity() < POOL_MIN {
            return;
        }
        let mut p = pool().lock().unwrap();
        let now = Instant::now();
        p.expire(now);
        if buf.capacity() > p.limit {
            return;
        }
        // A full pool makes room by dropping the buffers idle longest: the
        // sizes a process receives change (64 MiB values, then 1 GiB ones),
        // and a buffer just used is the likeliest to fit the next receive.
        let mut evicted = Vec::new();
        while p.free.len() >= MAX_BUFFERS || p.held() + buf.capacity() > p.limit {
            let Some(oldest) = p.free.iter().enumerate().min_by_key(|(_, (_, since))| *since).map(|(i, _)| i) else { break };
            evicted.push(p.free.swap_remove(oldest));
        }
        p.free.push((buf, now));
        // Unmapping a large buffer takes a while: not under the lock every
        // receiver takes.
        drop(p);
        drop(evicted);
    }
}

/// The filled buffer as `Bytes` that return it to the pool when dropped.
pub fn into_bytes(buf: Vec<u8>) -> Bytes {
    if buf.capacity() >= POOL_MIN {
        Bytes::from_owner(Pooled(buf))
    } else {
        Bytes::from(buf)
    }
}

/// Drops every pooled buffer (a worker short of memory: the pool is a cache,
/// and its pages count in the process's memory); returns the bytes freed.
pub fn clear() -> usize {
    let free = std::mem::take(&mut pool().lock().unwrap().free);
    free.iter().map(|(b, _)| b.capacity()).sum()
}

/// Bytes the pool holds now (for tests and diagnostics).
pub fn pooled_bytes() -> usize {
    pool().lock().unwrap().held()
}

/// Large receive buffers ask for transparent huge pages: a 1 GiB value then
/// takes 512 page faults instead of 262,144 (measured: page faults and page
/// clearing were half the CPU time of a 1 GiB worker-to-worker transfer over
/// TCP), and a single-copy transfer between processes (UCX's `cma`) walks
/// 512 times fewer page-table entries.
pub fn advise_huge_pages_vec(buf: &mut Vec<u8>) {
    advise_huge_pages_spare(buf.spare_capacity_mut());
}

/// As `advise_huge_pages_vec`, for the not yet written part of a buffer.
pub fn advise_huge_pages_spare(spare: &mut [std::mem::MaybeUninit<u8>]) {
    const HUGE: usize = 2 << 20;
    if spare.len() < 4 * HUGE {
        return;
    }
    let start = spare.as_mut_ptr() as usize;
    let aligned = (start + HUGE - 1) & !(HUGE - 1);
    let end = (start + spare.len()) & !(HUGE - 1);
    if end > aligned {
        // SAFETY: the range lies inside memory this buffer owns and has not
        // initialised; madvise only changes how the kernel backs it. Failure
        // (THP disabled) is harmless, so the result is ignored.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool is global: its tests take turns.
    static TURN: Mutex<()> = Mutex::new(());

    #[test]
    fn clearing_the_pool_frees_its_buffers() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let buf = take(POOL_MIN + 1, |_| {});
        drop(into_bytes(buf));
        assert!(pooled_bytes() >= POOL_MIN);
        assert!(clear() >= POOL_MIN);
        assert_eq!(pooled_bytes(), 0);
    }

    #[test]
    fn a_released_large_buffer_is_reused_for_the_next_receive_of_its_size() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let len = POOL_MIN + 4096;
        let mut fresh = 0;
        let mut b = take(len, |_| fresh += 1);
        b.resize(len, 7);
        let addr = b.as_ptr() as usize;
        let bytes = into_bytes(b);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&part[..], &[7u8; 10][..], "a slice keeps the buffer alive");
        drop(part);
        assert!(pooled_bytes() >= len);
        let again = take(len - 100, |_| fresh += 1);
        assert_eq!(fresh, 1, "the second receive needed no new memory");
        assert_eq!(again.as_ptr() as usize, addr);
        assert!(again.is_empty());
        // Receives below the pool's size allocate as usual.
        drop(into_bytes(again));
        let small = take(len / 4, |_| fresh += 1);
        assert_eq!(fresh, 2);
        drop(small);
    }

    #[test]
    fn a_full_pool_keeps_the_buffer_used_last() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        clear();
        // The pool fills with buffers of one size...
        let held: Vec<Bytes> = (0..MAX_BUFFERS).map(|_| into_bytes(take(POOL_MIN, |_| {}))).collect();
        drop(held);
        assert_eq!(pooled_bytes(), MAX_BUFFERS * POOL_MIN);
        // ...then the values grow: the larger buffer replaces an idle one
        // and serves the next receive of its size.
        let len = 3 * POOL_MIN;
        let mut fresh = 0;
        let big = take(len, |_| fresh += 1);
        let addr = big.as_ptr() as usize;
        drop(into_bytes(big));
        let again = take(len, |_| fresh += 1);
        assert_eq!(fresh, 1, "the larger buffer was kept");
        assert_eq!(again.as_ptr() as usize, addr);
        assert!(pooled_bytes() <= (MAX_BUFFERS - 1) * POOL_MIN, "a smaller one made room");
        drop(again);
        clear();
    }
}
