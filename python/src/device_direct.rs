//! Device values as device frames (`rdask_transport::device`): on a
//! connection whose transport moves this process's kind of device memory
//! (UCX with CUDA transports for GPU memory; host memory for the stand-in),
//! a holder sends each array of a device value as one frame whose payload is
//! the array's own memory, and the transport receives it straight into
//! device memory this process allocated ([`Arrivals`]): no staging copy at
//! either end. Where the device has no room the payload lands in host
//! memory and is copied in once room is made.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use rdask_gpu::device::{process_device, Device, DeviceBuffer};
use rdask_transport::device::{DeviceAllocator, DevicePayload, MemoryKind};
use rdask_worker::executor::{ChunkSource, Part, TaskFailure};

/// Values sent as device frames, their arrays and bytes.
pub(crate) static SENT_VALUES: AtomicU64 = AtomicU64::new(0);
pub(crate) static SENT_ARRAYS: AtomicU64 = AtomicU64::new(0);
pub(crate) static SENT_BYTES: AtomicU64 = AtomicU64::new(0);
/// Arrays that arrived as device frames: in device memory at once, or in
/// host memory (the device was full) and copied in.
pub(crate) static ARRIVED_ARRAYS: AtomicU64 = AtomicU64::new(0);
pub(crate) static ARRIVED_BYTES: AtomicU64 = AtomicU64::new(0);
pub(crate) static ARRIVED_ON_HOST: AtomicU64 = AtomicU64::new(0);

/// `RDASK_DEVICE_DIRECT=0` turns device frames off (values are staged).
pub(crate) fn direct_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RDASK_DEVICE_DIRECT").map_or(true, |v| v.trim() != "0"))
}

/// The memory kind of `device` as transports name it.
pub(crate) fn kind_of(device: &dyn Device) -> MemoryKind {
    if device.is_host_memory() {
        MemoryKind::Host
    } else {
        MemoryKind::Cuda
    }
}

/// Device memory allocated for an arriving payload, until a value claims it.
struct Arrival(Mutex<Option<(DeviceBuffer, Arc<dyn Device>)>>);

impl Drop for Arrival {
    fn drop(&mut self) {
        if let Some((buf, dev)) = self.0.lock().unwrap().take() {
            dev.free(buf);
        }
    }
}

/// Allocates arriving device payloads on this process's device (the
/// transport calls it on its own thread).
pub(crate) struct Arrivals;

impl DeviceAllocator for Arrivals {
    fn alloc(&self, kind: MemoryKind, len: usize) -> Option<DevicePayload> {
        // A process that does not work with device memory (a CPU-only
        // client) must not open a GPU for a payload a peer sent it.
        if !crate::device::device_expected() {
            return None;
        }
        let dev = process_device().ok()?;
        if kind_of(&*dev) != kind {
            return None;
        }
        // No room: the payload lands in host memory, and the receiver makes
        // room when it copies it in (that may move values to host memory,
        // which is not for this thread).
        let buf = dev.alloc(len).ok()?;
        let address = dev.address(&buf);
        // SAFETY: the buffer lives in the owner until a value claims it
        // (`take_arrival`), and only the transport writes it before then.
        Some(unsafe { DevicePayload::new(address, len, kind, Arc::new(Arrival(Mutex::new(Some((buf, dev)))))) })
    }

    fn prepare_thread(&self, _kind: MemoryKind) {
        // Only a device this process opened for its own work: a payload a
        // peer sends must not open one.
        if !rdask_gpu::device::device_opened() {
            return;
        }
        if let Ok(dev) = process_device() {
            if let Err(e) = dev.bind_to_thread() {
                tracing::warn!("cannot make the device current on the transport's thread: {e}");
            }
        }
    }
}

/// The device buffer behind an arrived payload, or its bytes when it landed
/// in host memory.
pub(crate) enum Arrived {
    OnDevice(DeviceBuffer),
    OnHost(rdask_transport::bytes::Bytes),
}

/// What arrived as `payload` (of `len` bytes, the array's size).
pub(crate) fn take_arrival(payload: DevicePayload, len: u64) -> Result<Arrived, String> {
    if payload.len() as u64 != len {
        return Err(format!("a device frame of {} bytes for an array of {len}", payload.len()));
    }
    ARRIVED_ARRAYS.fetch_add(1, Ordering::Relaxed);
    ARRIVED_BYTES.fetch_add(len, Ordering::Relaxed);
    if let Some(arrival) = payload.owner().downcast_ref::<Arrival>() {
        if let Some((buf, _)) = arrival.0.lock().unwrap().take() {
            return Ok(Arrived::OnDevice(buf));
        }
    }
    ARRIVED_ON_HOST.fetch_add(1, Ordering::Relaxed);
    payload.into_host_bytes().map(Arrived::OnHost).ok_or_else(|| "device memory of another kind arrived".to_string())
}

/// Keeps a sent value's arrays alive until the transport has sent the last
/// of them (the payloads share it). Often dropped on the transport's
/// thread, which must not wait for the interpreter: PyO3 defers the decref
/// of an object dropped there until some thread is attached.
struct KeepArrays(#[allow(dead_code)] Py<PyAny>);

/// A device value's arrays as device payloads, in order (empty arrays have
/// no frame: the receiver knows their size from the head).
pub(crate) struct DirectArrays {
    arrays: std::collections::VecDeque<(u64, u64)>,
    kind: MemoryKind,
    keep: Arc<KeepArrays>,
}

impl DirectArrays {
    /// `parts`: (device address, bytes) of each array, kept by `keep`, whose
    /// writers were waited for (the transport reads the memory outside the
    /// streams that wrote it).
    pub(crate) fn new(device: &dyn Device, parts: &[(u64, u64)], keep: Py<PyAny>) -> DirectArrays {
        SENT_VALUES.fetch_add(1, Ordering::Relaxed);
        DirectArrays { arrays: parts.iter().copied().filter(|&(_, n)| n > 0).collect(), kind: kind_of(device), keep: Arc::new(KeepArrays(keep)) }
    }
}

impl ChunkSource for DirectArrays {
    fn next_chunk(&mut self) -> Result<Option<rdask_transport::bytes::Bytes>, TaskFailure> {
        Err(TaskFailure::message("a value sent as device frames has no staging chunks"))
    }

    fn next_part(&mut self) -> Result<Option<Part>, TaskFailure> {
        let Some((address, len)) = self.arrays.pop_front() else { return Ok(None) };
        SENT_ARRAYS.fetch_add(1, Ordering::Relaxed);
        SENT_BYTES.fetch_add(len, Ordering::Relaxed);
        // SAFETY: `keep` holds the array (its writers were waited for
        // before this source was made) until the last payload is gone.
        Ok(Some(Part::Device(unsafe { DevicePayload::new(address, len as usize, self.kind, self.keep.clone()) })))
    }
}
