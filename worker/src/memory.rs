//! Memory management with Dask's thresholds (`distributed.worker.memory.*`),
//! as fractions of the worker's memory limit:
//! - **target** (0.6): values in memory above this are spilled to disk,
//!   least recently used first;
//! - **spill** (0.7): process memory (RSS) above this spills values until it
//!   is back under *target*;
//! - **pause** (0.8): process memory above this pauses the worker: it starts
//!   no task and the scheduler sends it none, until memory drops again;
//! - **terminate** (0.95): the nanny restarts the worker (done by the nanny,
//!   which watches the process from outside; carried here to be reported).
//!
//! The monitor is a thread (spilling writes files and may serialise Python
//! values, neither of which belongs on the worker's event loop).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::runqueue::RunQueue;
use crate::store::Store;

/// Fractions of the memory limit; `None` turns a threshold off (Dask's `False`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryThresholds {
    pub target: Option<f64>,
    pub spill: Option<f64>,
    pub pause: Option<f64>,
    pub terminate: Option<f64>,
}

impl Default for MemoryThresholds {
    fn default() -> Self {
        MemoryThresholds { target: Some(0.6), spill: Some(0.7), pause: Some(0.8), terminate: Some(0.95) }
    }
}

impl MemoryThresholds {
    /// Each fraction must lie in (0, 1]: a typo such as `--memory-target-fraction 60`
    /// must not silently switch spilling off.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("target", self.target), ("spill", self.spill), ("pause", self.pause), ("terminate", self.terminate)] {
            if let Some(v) = v {
                if !(v > 0.0 && v <= 1.0) {
                    return Err(format!("memory {name} fraction must be in (0, 1] or off, got {v}"));
                }
            }
        }
        Ok(())
    }

    /// Whether the store must keep values in LRU order and may spill.
    pub fn spills(&self) -> bool {
        self.target.is_some() || self.spill.is_some()
    }
}

/// Every 100 ms, as Dask's `distributed.worker.memory.monitor-interval`.
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
/// After a write error (full disk), wait this long before spilling again.
const BACKOFF_AFTER_ERROR: Duration = Duration::from_secs(5);

/// What the monitor decided, as the worker loop needs to hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryEvent {
    Paused(bool),
}

/// Runs the monitor until the store is dropped or `stop` is set.
pub fn spawn_monitor(
    name: String,
    limit: u64,
    thresholds: MemoryThresholds,
    store: Weak<Store>,
    queue: Arc<RunQueue>,
    events: tokio::sync::mpsc::UnboundedSender<MemoryEvent>,
    stop: Arc<AtomicBool>,
    device: Option<Arc<crate::device_tier::DeviceLedger>>,
) -> std::io::Result<()> {
    let rss = crate::procinfo::rss_now;
    // Managed host memory: the store's values (device values count only
    // their host part there) and device values moved to host memory.
    let moved_to_host = move || device.as_ref().map_or(0, |l| l.on_host_bytes());
    if let Some(p) = thresholds.pause {
        queue.set_memory_gate((p * limit as f64) as u64);
    }
    std::thread::Builder::new().name(format!("{name}-memory")).spawn(move || {
        let mut quiet_until = std::time::Instant::now();
        let frac = |f: Option<f64>| f.map(|f| (f * limit as f64) as u64);
        let (target, spill, pause) = (frac(thresholds.target), frac(thresholds.spill), frac(thresholds.pause));
        // Checked before, during and after each round of spilling: a round
        // that writes gigabytes must not let tasks pile up more meanwhile.
        let mut pauser = Pauser { name: &name, limit, pause, paused: false, queue: &queue, events: &events };
        // Above this, cached receive buffers go first: they are not values,
        // and nothing else can free them.
        let tight = spill.or(pause).or(target).unwrap_or(limit);
        while !stop.load(Ordering::Relaxed) {
            let Some(store) = store.upgrade() else { return };
            if rss() > tight && rdask_transport::bufpool::pooled_bytes() > 0 {
                let freed = rdask_transport::bufpool::clear();
                tracing::info!(worker = %name, "process memory is high: dropped {} of cached receive buffers", human(freed as u64));
            }
            if !pauser.check(rss()) {
                return;
            }
            let now = std::time::Instant::now();
            if now >= quiet_until {
                // Managed memory above target: spill until under it.
                let mut round = match target {
                    Some(t) if store.bytes() + moved_to_host() > t => {
                        store.spill_lru(|mem| mem + moved_to_host() > t && pauser.check(rss()))
                    }
                    _ => Default::default(),
                };
                // Process memory above spill: spill until the process is
                // under target (or nothing is left to spill).
                if round.error.is_none() {
                    if let Some(s) = spill {
                        let goal = target.unwrap_or(s);
                        if rss() > s {
                            let more = store.spill_lru(|_| {
                                let used = rss();
                                pauser.check(used) && used > goal
                            });
                            round.values += more.values;
                            round.bytes += more.bytes;
                            round.error = more.error;
                        }
                    }
                }
                if round.values > 0 {
                    let st = store.stats();
                    tracing::info!(
                        worker = %name,
                        "spilled {} values ({}) to disk; in memory {}, on disk {} in {} values; process memory {} of {} limit",
                        round.values,
                        human(round.bytes),
                        human(st.memory_bytes),
                        human(st.disk_bytes),
                        st.disk_values,
                        human(rss()),
                        human(limit)
                    );
                }
                if let Some(e) = round.error {
                    tracing::error!(worker = %name, "{e}; trying again in {BACKOFF_AFTER_ERROR:?}");
                    quiet_until = now + BACKOFF_AFTER_ERROR;
                }
            }
            if !pauser.check(rss()) {
                return;
            }
            drop(store);
            std::thread::sleep(MONITOR_INTERVAL);
        }
    })?;
    Ok(())
}

struct Pauser<'a> {
    name: &'a str,
    limit: u64,
    pause: Option<u64>,
    paused: bool,
    queue: &'a RunQueue,
    events: &'a tokio::sync::mpsc::UnboundedSender<MemoryEvent>,
}

impl Pauser<'_> {
    /// Pauses or resumes the worker for this process memory. False when the
    /// worker loop is gone (the monitor ends).
    fn check(&mut self, used: u64) -> bool {
        let Some(p) = self.pause else { return true };
        let should = used > p;
        // The run queue may have paused itself (a thread saw memory above
        // the threshold before starting a task): say so to the scheduler too.
        if should == self.paused && should == self.queue.is_paused() {
            return true;
        }
        let (name, limit) = (self.name, self.limit);
        if should != self.paused {
            if should {
                tracing::warn!(worker = %name, "process memory {} is above the pause threshold {} ({} limit): pausing; no task starts until it drops", human(used), human(p), human(limit));
            } else {
                tracing::info!(worker = %name, "process memory {} is below the pause threshold again: resuming", human(used));
            }
        }
        self.paused = should;
        self.queue.set_paused(should);
        self.events.send(MemoryEvent::Paused(should)).is_ok()
    }
}

pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_outside_zero_to_one_are_refused() {
        assert!(MemoryThresholds::default().validate().is_ok());
        let bad = MemoryThresholds { target: Some(60.0), ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("target"));
        let off = MemoryThresholds { target: None, spill: None, pause: None, terminate: None };
        assert!(off.validate().is_ok());
        assert!(!off.spills());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
