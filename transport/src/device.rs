//! Device memory as a frame's payload, for transports that move it without
//! staging it through host memory (UCX with the memory kind in its build:
//! `cuda_copy`/`cuda_ipc`/`gdr_copy` for GPU memory). Other transports
//! refuse such frames; whoever sends one asked first
//! ([`crate::FrameSender::carries`]).
//!
//! The receiving side allocates the destination through a hook the process
//! installs ([`set_device_allocator`]: the Python extension allocates on its
//! device); without one, or when the device has no room, the payload lands
//! in host memory ([`DevicePayload::host`]) and the receiver copies it in.

use std::sync::Arc;

use bytes::Bytes;

pub use crate::protocol::MemoryKind;

/// Most bytes of a device frame's host part (its control message and host
/// data frames): it travels in the active message's header, beside the
/// device payload.
pub const DEVICE_FRAME_HOST_MAX: usize = 1024;

/// `len` bytes of memory of `kind` at `address`, kept allocated by `owner`.
#[derive(Clone)]
pub struct DevicePayload {
    pub address: u64,
    pub len: usize,
    pub kind: MemoryKind,
    /// Keeps the memory allocated while the payload lives (a sender's
    /// arrays until the transport has sent them; a receiver's new buffer).
    pub owner: Arc<dyn std::any::Any + Send + Sync>,
}

impl DevicePayload {
    /// A payload that arrived in host memory (no allocator, or no room on
    /// the device): its bytes.
    pub fn host(bytes: Bytes) -> DevicePayload {
        DevicePayload { address: bytes.as_ptr() as u64, len: bytes.len(), kind: MemoryKind::Host, owner: Arc::new(bytes) }
    }

    /// The payload as bytes, without a copy, when it is host memory.
    pub fn into_host_bytes(self) -> Option<Bytes> {
        if self.kind != MemoryKind::Host {
            return None;
        }
        if let Some(b) = self.owner.downcast_ref::<Bytes>() {
            return Some(b.clone());
        }
        Some(Bytes::from_owner(HostView(self)))
    }
}

/// Host memory of a payload as a byte slice (its owner keeps it alive).
struct HostView(DevicePayload);

impl AsRef<[u8]> for HostView {
    fn as_ref(&self) -> &[u8] {
        if self.0.len == 0 {
            return &[];
        }
        // SAFETY: a host-memory payload's owner keeps `len` bytes at
        // `address` allocated and unchanged while the payload lives.
        unsafe { std::slice::from_raw_parts(self.0.address as *const u8, self.0.len) }
    }
}

impl std::fmt::Debug for DevicePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevicePayload({} bytes of {:?} at {:#x})", self.len, self.kind, self.address)
    }
}

/// Allocates where an arriving device payload lands.
pub trait DeviceAllocator: Send + Sync {
    /// `len` bytes of `kind`; `None` (no such device here, or no room):
    /// the payload lands in host memory instead.
    fn alloc(&self, kind: MemoryKind, len: usize) -> Option<DevicePayload>;
}

static ALLOCATOR: std::sync::OnceLock<Arc<dyn DeviceAllocator>> = std::sync::OnceLock::new();

/// Sets this process's allocator for arriving device payloads (once; later
/// calls change nothing).
pub fn set_device_allocator(a: Arc<dyn DeviceAllocator>) {
    let _ = ALLOCATOR.set(a);
}

/// Where an arriving payload of `kind` lands, if the process can hold it.
pub fn alloc_for_arrival(kind: MemoryKind, len: usize) -> Option<DevicePayload> {
    ALLOCATOR.get()?.alloc(kind, len).filter(|p| p.len == len && p.kind == kind)
}

/// Bit of `kind` in a set of kinds ([`crate::FrameSender::carries`]).
pub const fn kind_bit(kind: MemoryKind) -> u8 {
    1 << kind as u8
}
