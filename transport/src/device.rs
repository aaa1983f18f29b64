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
    address: u64,
    len: usize,
    kind: MemoryKind,
    /// Keeps the memory allocated while the payload lives (a sender's
    /// arrays until the transport has sent them; a receiver's new buffer).
    owner: Arc<dyn std::any::Any + Send + Sync>,
}

impl DevicePayload {
    /// A payload of the `len` bytes of `kind` at `address`.
    ///
    /// # Safety
    /// While `owner` (or a clone of this payload) lives, the memory must stay
    /// allocated, and must not be written by anyone but a transport
    /// receiving into it; for `MemoryKind::Host` it must be this process's
    /// readable memory.
    pub unsafe fn new(address: u64, len: usize, kind: MemoryKind, owner: Arc<dyn std::any::Any + Send + Sync>) -> DevicePayload {
        DevicePayload { address, len, kind, owner }
    }

    /// A payload that arrived in host memory (no allocator, or no room on
    /// the device): its bytes.
    pub fn host(bytes: Bytes) -> DevicePayload {
        DevicePayload { address: bytes.as_ptr() as u64, len: bytes.len(), kind: MemoryKind::Host, owner: Arc::new(bytes) }
    }

    pub fn address(&self) -> u64 {
        self.address
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// What keeps the memory allocated (to recognise one's own allocation).
    pub fn owner(&self) -> &(dyn std::any::Any + Send + Sync) {
        &*self.owner
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
    /// Called on a transport's thread before it moves memory of `kind`
    /// (a GPU's context made current there, for UCX's CUDA transports).
    fn prepare_thread(&self, _kind: MemoryKind) {}
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

/// Readies the calling (transport) thread to move memory of `kind`.
pub fn prepare_thread(kind: MemoryKind) {
    if kind != MemoryKind::Host {
        if let Some(a) = ALLOCATOR.get() {
            a.prepare_thread(kind);
        }
    }
}

/// Bit of `kind` in a set of kinds ([`crate::FrameSender::carries`]).
pub const fn kind_bit(kind: MemoryKind) -> u8 {
    1 << kind as u8
}
