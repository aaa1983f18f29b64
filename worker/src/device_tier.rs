//! Device memory as a tier above host memory, as dask-cuda's device→host
//! spilling: values that hold device memory (CuPy, Numba or PyTorch arrays on
//! a GPU worker) count against `--device-memory-limit`; above it the least
//! recently used move to host memory (where the host memory limit may spill
//! them on to disk), and a task that needs one gets it back on the device.
//!
//! The executor's values do the moving ([`ObjectValue::move_to_host`],
//! and back when a task uses one); they report every change to the
//! worker's [`DeviceLedger`]. The store keeps the use order, and a thread
//! ([`spawn_device_monitor`]) spills as soon as the ledger goes over the
//! limit: spilling copies device memory and may take an interpreter lock,
//! which does not belong on the worker's event loop.
//!
//! [`ObjectValue::move_to_host`]: crate::executor::ObjectValue::move_to_host

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::memory::human;
use crate::store::Store;

/// Device-tier figures for heartbeats, `scheduler_info()` and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub limit: u64,
    /// Bytes of values on the device now.
    pub device_bytes: u64,
    /// Bytes and count of device values moved to host memory now.
    pub on_host_bytes: u64,
    pub on_host_values: u64,
    /// Since the worker started: moved to host, and back to the device.
    pub spilled_total: u64,
    pub spilled_total_bytes: u64,
    pub unspilled_total: u64,
    pub unspilled_total_bytes: u64,
}

/// What one worker's values hold in device memory, and the limit.
pub struct DeviceLedger {
    limit: u64,
    device_bytes: AtomicU64,
    stats: Mutex<DeviceStats>,
    /// Set when the ledger went over the limit; the monitor waits on it.
    over: Mutex<bool>,
    wake: Condvar,
}

impl std::fmt::Debug for DeviceLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceLedger({:?})", self.stats())
    }
}

impl DeviceLedger {
    /// `limit` in bytes; 0 counts device memory but never spills.
    pub fn new(limit: u64) -> Arc<DeviceLedger> {
        Arc::new(DeviceLedger {
            limit,
            device_bytes: AtomicU64::new(0),
            stats: Mutex::new(DeviceStats { limit, ..Default::default() }),
            over: Mutex::new(false),
            wake: Condvar::new(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn device_bytes(&self) -> u64 {
        self.device_bytes.load(Ordering::Relaxed)
    }

    pub fn over_limit(&self) -> bool {
        self.limit > 0 && self.device_bytes() > self.limit
    }

    /// A value came to the device holding `bytes`: a task's result, or a
    /// value that arrived or was read back with device frames.
    pub fn added(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let now = self.device_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if self.limit > 0 && now > self.limit {
            *self.over.lock().unwrap() = true;
            self.wake.notify_one();
        }
    }

    /// A value on the device was released.
    pub fn released(&self, bytes: u64) {
        if bytes > 0 {
            self.device_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Bytes of device values moved to host memory and held there now
    /// (host memory the worker manages, besides its store's values).
    pub fn on_host_bytes(&self) -> u64 {
        self.stats.lock().unwrap().on_host_bytes
    }

    /// A value moved from the device to host memory.
    pub fn moved_to_host(&self, bytes: u64) {
        self.released(bytes);
        let mut s = self.stats.lock().unwrap();
        s.on_host_bytes += bytes;
        s.on_host_values += 1;
        s.spilled_total += 1;
        s.spilled_total_bytes += bytes;
    }

    /// A value moved to host came back to the device (a task needs it).
    pub fn moved_to_device(&self, bytes: u64) {
        {
            let mut s = self.stats.lock().unwrap();
            s.on_host_bytes = s.on_host_bytes.saturating_sub(bytes);
            s.on_host_values = s.on_host_values.saturating_sub(1);
            s.unspilled_total += 1;
            s.unspilled_total_bytes += bytes;
        }
        self.added(bytes);
    }

    /// A value moved to host was released without coming back.
    pub fn released_on_host(&self, bytes: u64) {
        let mut s = self.stats.lock().unwrap();
        s.on_host_bytes = s.on_host_bytes.saturating_sub(bytes);
        s.on_host_values = s.on_host_values.saturating_sub(1);
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats { device_bytes: self.device_bytes(), ..*self.stats.lock().unwrap() }
    }

    /// Waits until the ledger goes over the limit or `timeout` passes.
    fn wait_over(&self, timeout: Duration) {
        let over = self.over.lock().unwrap();
        let (mut over, _) = self.wake.wait_timeout_while(over, timeout, |o| !*o).unwrap();
        *over = false;
    }

    fn poke(&self) {
        *self.over.lock().unwrap() = true;
        self.wake.notify_one();
    }
}

/// After a round with a value that could not move, wait this long.
const BACKOFF_AFTER_ERROR: Duration = Duration::from_secs(5);

/// How long the monitor waits after a round that could move nothing.
const IDLE_BACKOFF: Duration = Duration::from_secs(1);

/// Spills device values to host memory whenever the ledger is over its
/// limit, until the store is dropped or `stop` is set. Checks at least every
/// 100 ms, and at once when a value pushes the ledger over.
pub fn spawn_device_monitor(name: String, ledger: Arc<DeviceLedger>, store: Weak<Store>, stop: Arc<AtomicBool>) -> std::io::Result<StopOnDrop> {
    let guard = StopOnDrop { stop: stop.clone(), ledger: ledger.clone() };
    std::thread::Builder::new().name(format!("{name}-device")).spawn(move || {
        let mut quiet_until = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if ledger.over_limit() && std::time::Instant::now() >= quiet_until {
                let Some(store) = store.upgrade() else { return };
                let round = store.spill_device(&ledger);
                if round.values > 0 {
                    let s = ledger.stats();
                    tracing::info!(
                        worker = %name,
                        "moved {} device values ({}) to host memory; on the device {} of {} limit, on host {} in {} values",
                        round.values,
                        human(round.bytes),
                        human(s.device_bytes),
                        human(s.limit),
                        human(s.on_host_bytes),
                        s.on_host_values
                    );
                }
                if let Some(e) = round.error {
                    // Values that cannot move would be tried every 100 ms: back off.
                    tracing::error!(worker = %name, "cannot move a device value to host memory: {e}; trying again in {BACKOFF_AFTER_ERROR:?}");
                    quiet_until = std::time::Instant::now() + BACKOFF_AFTER_ERROR;
                } else if round.values == 0 && ledger.over_limit() {
                    // Over the limit with every value in use elsewhere (tasks'
                    // inputs, say): look again once some may have finished.
                    tracing::debug!(worker = %name, "over the device memory limit, but no device value can move now");
                    quiet_until = std::time::Instant::now() + IDLE_BACKOFF;
                }
            }
            ledger.wait_over(crate::memory::MONITOR_INTERVAL);
        }
    })?;
    Ok(guard)
}

/// The GPU workers of this process, for [`make_room`].
type Rooms = Vec<(u64, Arc<DeviceLedger>, Weak<Store>)>;
static ROOMS: Mutex<Rooms> = Mutex::new(Vec::new());
static NEXT_ROOM: AtomicU64 = AtomicU64::new(1);

/// Lets [`make_room`] move this worker's device values; undone when the
/// guard is dropped (the worker ends).
pub fn offer_room(ledger: Arc<DeviceLedger>, store: Weak<Store>) -> RoomGuard {
    let id = NEXT_ROOM.fetch_add(1, Ordering::Relaxed);
    ROOMS.lock().unwrap().push((id, ledger, store));
    RoomGuard(id)
}

pub struct RoomGuard(u64);

impl Drop for RoomGuard {
    fn drop(&mut self) {
        ROOMS.lock().unwrap().retain(|(id, ..)| *id != self.0);
    }
}

/// Device memory ran out (an arriving value could not be allocated): moves
/// least recently used device values of this process's GPU workers to host
/// memory until `bytes` are freed or none are left, whatever the limit.
/// Returns the bytes moved. Blocks (copies, an interpreter lock): call it
/// where blocking is allowed.
pub fn make_room(bytes: u64) -> u64 {
    let rooms: Vec<(Arc<DeviceLedger>, Arc<Store>)> = ROOMS.lock().unwrap().iter().filter_map(|(_, l, s)| Some((l.clone(), s.upgrade()?))).collect();
    let mut moved = 0;
    for (ledger, store) in rooms {
        let round = store.spill_device_while(|so_far| moved + so_far < bytes);
        moved += round.bytes;
        if round.values > 0 {
            let s = ledger.stats();
            tracing::info!(
                "device memory full: moved {} device values ({}) to host memory to make room for {}; on the device {}",
                round.values,
                human(round.bytes),
                human(bytes),
                human(s.device_bytes)
            );
        }
        if let Some(e) = round.error {
            tracing::error!("cannot move a device value to host memory: {e}");
        }
        if moved >= bytes {
            break;
        }
    }
    moved
}

/// Stops the device monitor when the worker ends.
pub struct StopOnDrop {
    stop: Arc<AtomicBool>,
    ledger: Arc<DeviceLedger>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ledger.poke();
    }
}
