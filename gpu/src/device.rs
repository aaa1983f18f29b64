//! Device memory behind one trait: allocate, copy to and from host memory,
//! and host staging buffers (page-locked on a GPU). Two implementations:
//! [`HostStandIn`], which keeps "device" buffers in host memory and counts
//! every copy (the staging and spilling logic is tested with it on any
//! machine), and `CudaDevice` (cargo feature `cuda`, cudarc with the driver
//! loaded at run time; `cuda.rs`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::GpuError;

/// A buffer in device memory.
pub struct DeviceBuffer {
    pub(crate) len: usize,
    pub(crate) inner: DeviceInner,
}

pub(crate) enum DeviceInner {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaAlloc),
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes)", self.len)
    }
}

/// Host memory that device copies go through.
pub enum StagingBuffer {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Pinned(Pinned),
}

/// Page-locked host memory from cudarc, read and written through a pointer
/// taken once: every copy into or out of it is waited for before the copy
/// returns, so cudarc's accessors (which wait for the slice's event and
/// bind the context, and can so return an unrelated error pending on the
/// context) have nothing to add.
#[cfg(feature = "cuda")]
pub struct Pinned {
    mem: cudarc::driver::PinnedHostSlice<u8>,
    ptr: *mut u8,
}

// SAFETY: `ptr` points into `mem`, which this struct owns; it is only used
// as `&[u8]` through `&self` and as `&mut [u8]` through `&mut self`.
#[cfg(feature = "cuda")]
unsafe impl Send for Pinned {}
#[cfg(feature = "cuda")]
unsafe impl Sync for Pinned {}

#[cfg(feature = "cuda")]
impl Pinned {
    pub(crate) fn new(mut mem: cudarc::driver::PinnedHostSlice<u8>) -> Result<Pinned, GpuError> {
        let ptr = mem.as_mut_ptr().map_err(|e| GpuError::Device { what: "using a staging buffer".into(), reason: format!("{e:?}") })?;
        Ok(Pinned { mem, ptr })
    }
}

impl StagingBuffer {
    pub fn len(&self) -> usize {
        match self {
            StagingBuffer::Host(v) => v.len(),
            #[cfg(feature = "cuda")]
            StagingBuffer::Pinned(p) => p.mem.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes to copy into.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8], GpuError> {
        match self {
            StagingBuffer::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            // SAFETY: see `Pinned`; `&mut self` makes this the only view.
            StagingBuffer::Pinned(p) => Ok(unsafe { std::slice::from_raw_parts_mut(p.ptr, p.mem.len()) }),
        }
    }

    /// The bytes (after any copy into them has completed).
    pub fn bytes(&self) -> &[u8] {
        match self {
            StagingBuffer::Host(v) => v,
            #[cfg(feature = "cuda")]
            // SAFETY: see `Pinned`; no `&mut` view exists while `&self` does.
            StagingBuffer::Pinned(p) => unsafe { std::slice::from_raw_parts(p.ptr, p.mem.len()) },
        }
    }
}

/// What must be finished before rdask reads another library's array: the
/// `stream` of its `__cuda_array_interface__` (version 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamSync {
    /// No stream given (an older interface): the whole device.
    Device,
    /// `stream: None`: the producer says the data is ready.
    Ready,
    /// Work on this stream (a `CUstream` of this process).
    Stream(u64),
}

impl StreamSync {
    /// From the code the serialiser passes: -1 no stream given, 0 `None`,
    /// else the stream (the interface forbids 0 as a stream). The default
    /// streams (1 legacy, 2 per-thread) mean the whole device: a library
    /// may give the stream current on the thread that asks (rdask's, not
    /// the one that wrote the array), and a per-thread stream is another
    /// one on each thread.
    pub fn from_code(code: i64) -> StreamSync {
        match code {
            0 => StreamSync::Ready,
            c if c <= 2 => StreamSync::Device,
            s => StreamSync::Stream(s as u64),
        }
    }
}

/// One device (a GPU, or the stand-in).
pub trait Device: Send + Sync {
    /// For logs and errors: "GPU 0 (NVIDIA H200)", "host stand-in".
    fn describe(&self) -> String;
    fn alloc(&self, len: usize) -> Result<DeviceBuffer, GpuError>;
    /// Copies `dst.len()` bytes of `src` from `offset` into `dst`.
    fn copy_to_host(&self, src: &DeviceBuffer, offset: usize, dst: &mut StagingBuffer, len: usize) -> Result<(), GpuError>;
    /// Copies `src` into `dst` at `offset`.
    fn copy_from_host(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<(), GpuError>;
    fn alloc_staging(&self, len: usize) -> Result<StagingBuffer, GpuError>;
    /// The address of `buf` as `__cuda_array_interface__` reports it.
    fn address(&self, buf: &DeviceBuffer) -> u64;
    /// Copies `dst.len()` bytes at device address `ptr` into `dst`: device
    /// memory that another library owns (a CuPy, Numba or PyTorch array).
    /// Work still writing it is not waited for: call [`Device::wait_for`]
    /// first.
    ///
    /// # Safety
    /// `ptr..ptr + dst.len()` must be memory of this device that stays
    /// allocated until the call returns.
    unsafe fn read_raw(&self, ptr: u64, dst: &mut [u8]) -> Result<(), GpuError>;
    /// Whether this "device" memory is host memory (the stand-in): a
    /// transport moves it as host memory.
    fn is_host_memory(&self) -> bool {
        false
    }
    /// Makes this device current on the calling thread (a GPU's context),
    /// for libraries that move its memory there (UCX).
    fn bind_to_thread(&self) -> Result<(), GpuError> {
        Ok(())
    }
    /// Waits until the work `sync` names (another library's writes to its
    /// arrays) has finished, before rdask or a transport reads the memory.
    fn wait_for(&self, _sync: StreamSync) -> Result<(), GpuError> {
        Ok(())
    }
    /// Gives a buffer back (dropping one frees it too; this also keeps the
    /// stand-in's count right).
    fn free(&self, buf: DeviceBuffer) {
        drop(buf)
    }
    /// Which processes can import this process's exported memory: those
    /// whose device gives the same domain (`ipc.rs`). `None`: this device
    /// shares no memory between processes.
    fn ipc_domain(&self) -> Option<String> {
        None
    }
    /// A descriptor of the device memory at `ptr..ptr + len` that another
    /// process of the domain can import while this process keeps the
    /// memory allocated (wait for its writers first: [`Device::wait_for`]).
    ///
    /// # Safety
    /// The range must be memory of this device.
    unsafe fn ipc_export(&self, _ptr: u64, _len: usize) -> Result<Vec<u8>, GpuError> {
        Err(GpuError::Device { what: "sharing device memory with another process".into(), reason: format!("{} cannot", self.describe()) })
    }
    /// A new buffer of this process holding a copy of the `len` bytes an
    /// exported descriptor names (the exporter must keep them allocated
    /// until this returns).
    fn ipc_import(&self, _descriptor: &[u8], _len: usize) -> Result<DeviceBuffer, GpuError> {
        Err(GpuError::Device { what: "importing another process's device memory".into(), reason: format!("{} cannot", self.describe()) })
    }
}

pub(crate) fn check_range(buf_len: usize, offset: usize, len: usize, what: &str) -> Result<(), GpuError> {
    match offset.checked_add(len) {
        Some(end) if end <= buf_len => Ok(()),
        _ => Err(GpuError::Device { what: what.into(), reason: format!("bytes {offset}..+{len} outside a buffer of {buf_len}") }),
    }
}

/// "Device" memory in host memory, with an optional capacity, counting every
/// copy: what the staging and spilling code does is visible to tests.
#[derive(Default)]
pub struct HostStandIn {
    capacity: Option<u64>,
    allocated: AtomicU64,
    copies: AtomicUsize,
    largest_copy: AtomicUsize,
    staging_allocs: AtomicUsize,
}

impl HostStandIn {
    /// A stand-in whose allocations fail past `capacity` bytes in use.
    pub fn with_capacity(capacity: u64) -> Self {
        HostStandIn { capacity: Some(capacity), ..Default::default() }
    }

    /// Device ↔ host copies made so far.
    pub fn copies(&self) -> usize {
        self.copies.load(Ordering::Relaxed)
    }

    /// The largest single copy: with staging in chunks, never a whole value.
    pub fn largest_copy(&self) -> usize {
        self.largest_copy.load(Ordering::Relaxed)
    }

    pub fn staging_allocs(&self) -> usize {
        self.staging_allocs.load(Ordering::Relaxed)
    }

    /// Bytes of "device" memory in use.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn count(&self, len: usize) {
        self.copies.fetch_add(1, Ordering::Relaxed);
        self.largest_copy.fetch_max(len, Ordering::Relaxed);
    }
}

impl Device for HostStandIn {
    fn describe(&self) -> String {
        "host stand-in".into()
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer, GpuError> {
        let now = self.allocated.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if let Some(cap) = self.capacity {
            if now > cap {
                self.allocated.fetch_sub(len as u64, Ordering::Relaxed);
                return Err(GpuError::OutOfMemory { device: self.describe(), wanted: len as u64, free: cap.saturating_sub(now - len as u64) });
            }
        }
        Ok(DeviceBuffer { len, inner: DeviceInner::Host(vec![0; len]) })
    }

    fn copy_to_host(&self, src: &DeviceBuffer, offset: usize, dst: &mut StagingBuffer, len: usize) -> Result<(), GpuError> {
        check_range(src.len, offset, len, "copying to host")?;
        check_range(dst.len(), 0, len, "copying to host")?;
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let (DeviceInner::Host(s), StagingBuffer::Host(d)) = (&src.inner, dst) else {
            return Err(GpuError::Device { what: "copying to host".into(), reason: "not a stand-in buffer".into() });
        };
        d[..len].copy_from_slice(&s[offset..offset + len]);
        self.count(len);
        Ok(())
    }

    fn copy_from_host(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<(), GpuError> {
        check_range(dst.len, offset, src.len(), "copying to the device")?;
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let DeviceInner::Host(d) = &mut dst.inner else {
            return Err(GpuError::Device { what: "copying to the device".into(), reason: "not a stand-in buffer".into() });
        };
        d[offset..offset + src.len()].copy_from_slice(src);
        self.count(src.len());
        Ok(())
    }

    fn alloc_staging(&self, len: usize) -> Result<StagingBuffer, GpuError> {
        self.staging_allocs.fetch_add(1, Ordering::Relaxed);
        Ok(StagingBuffer::Host(vec![0; len]))
    }

    fn free(&self, buf: DeviceBuffer) {
        self.allocated.fetch_sub(buf.len as u64, Ordering::Relaxed);
    }

    fn address(&self, buf: &DeviceBuffer) -> u64 {
        match &buf.inner {
            // Empty arrays have no memory: address 0, as the interface allows.
            DeviceInner::Host(v) if v.is_empty() => 0,
            DeviceInner::Host(v) => v.as_ptr() as u64,
            #[cfg(feature = "cuda")]
            DeviceInner::Cuda(_) => 0,
        }
    }

    fn is_host_memory(&self) -> bool {
        true
    }

    fn ipc_domain(&self) -> Option<String> {
        Some(format!("standin:{}", crate::ipc::node_id()))
    }

    unsafe fn ipc_export(&self, ptr: u64, _len: usize) -> Result<Vec<u8>, GpuError> {
        // Tests of the holder's fallback: memory that cannot be shared.
        if std::env::var("RDASK_STANDIN_IPC").is_ok_and(|v| v.trim() == "unshareable") {
            return Err(GpuError::Device { what: "sharing device memory".into(), reason: "unshareable (RDASK_STANDIN_IPC=unshareable)".into() });
        }
        // The stand-in's "device" memory is this process's host memory.
        let mut body = std::process::id().to_le_bytes().to_vec();
        body.extend_from_slice(&ptr.to_le_bytes());
        Ok(crate::ipc::descriptor(&body))
    }

    fn ipc_import(&self, descriptor: &[u8], len: usize) -> Result<DeviceBuffer, GpuError> {
        let bad = |reason: String| GpuError::Device { what: "importing another process's device memory".into(), reason };
        let body = crate::ipc::body(descriptor).filter(|b| b.len() == 12).ok_or_else(|| bad("not a stand-in descriptor".into()))?;
        let pid = u32::from_le_bytes(body[..4].try_into().unwrap());
        let address = u64::from_le_bytes(body[4..].try_into().unwrap());
        // Tests of the fallback: the stand-in refuses as two GPUs without
        // peer access would.
        match std::env::var("RDASK_STANDIN_IPC").as_deref().map(str::trim) {
            Ok("refuse") => return Err(bad("refused (RDASK_STANDIN_IPC=refuse)".into())),
            // As CUDA refuses a second mapping of memory UCX mapped already:
            // the first import of the process fails, later ones work.
            Ok("mapped-once") => {
                static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    return Err(GpuError::AlreadyMapped { reason: "RDASK_STANDIN_IPC=mapped-once".into() });
                }
            }
            _ => {}
        }
        let mut buf = self.alloc(len)?;
        #[allow(irrefutable_let_patterns)] // refutable with the `cuda` feature
        let DeviceInner::Host(d) = &mut buf.inner else { unreachable!("the stand-in allocates host buffers") };
        if let Err(e) = crate::ipc::read_other_process(pid, address, d) {
            self.free(buf);
            return Err(bad(format!("reading {len} bytes of process {pid}: {e}")));
        }
        self.count(len);
        Ok(buf)
    }

    unsafe fn read_raw(&self, ptr: u64, dst: &mut [u8]) -> Result<(), GpuError> {
        if ptr == 0 && !dst.is_empty() {
            return Err(GpuError::Device { what: "reading device memory".into(), reason: "null address".into() });
        }
        // The stand-in's "device" addresses are host addresses.
        // SAFETY: the caller guarantees the range is readable.
        unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, dst.as_mut_ptr(), dst.len()) };
        self.count(dst.len());
        Ok(())
    }
}

static PROCESS_DEVICE: std::sync::OnceLock<Result<std::sync::Arc<dyn Device>, String>> = std::sync::OnceLock::new();

/// Whether this process opened its device already (with success).
pub fn device_opened() -> bool {
    PROCESS_DEVICE.get().is_some_and(|d| d.is_ok())
}

/// The device of this process: with `RDASK_DEVICE=standin`, the host stand-in
/// (tests and CPU-only machines exercising the device path); otherwise GPU 0
/// of those `CUDA_VISIBLE_DEVICES` leaves visible (each `rdask-cuda-worker`
/// process sees its own GPU first). Opened once; a failure says why, every
/// time it is asked.
pub fn process_device() -> Result<std::sync::Arc<dyn Device>, GpuError> {
    PROCESS_DEVICE
        .get_or_init(|| {
            if std::env::var("RDASK_DEVICE").is_ok_and(|v| v.trim() == "standin") {
                // `RDASK_STANDIN_CAPACITY` (bytes): a small "device" that runs
                // full, for tests of what happens then.
                let capacity = std::env::var("RDASK_STANDIN_CAPACITY").ok().and_then(|v| v.trim().parse().ok());
                // The stand-in's IPC reads other processes' memory: where
                // Yama restricts that to descendants (ptrace_scope=1), let
                // this process's peers read it (the stand-in is for tests).
                // SAFETY: prctl with plain integer arguments.
                unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
                let dev = capacity.map_or_else(HostStandIn::default, HostStandIn::with_capacity);
                return Ok(std::sync::Arc::new(dev) as std::sync::Arc<dyn Device>);
            }
            open_gpu().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|reason| GpuError::NoCuda { reason })
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Result<std::sync::Arc<dyn Device>, GpuError> {
    crate::cuda::CudaDevice::open(0).map(|d| std::sync::Arc::new(d) as std::sync::Arc<dyn Device>)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Result<std::sync::Arc<dyn Device>, GpuError> {
    Err(GpuError::NoCuda { reason: "rdask was built without the `cuda` feature".into() })
}

/// A new device buffer holding `bytes` (one copy; for values that arrive
/// whole, and tests).
pub fn upload(device: &dyn Device, bytes: &[u8]) -> Result<DeviceBuffer, GpuError> {
    let mut buf = device.alloc(bytes.len())?;
    if !bytes.is_empty() {
        device.copy_from_host(&mut buf, 0, bytes)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::StreamSync;

    #[test]
    fn an_arrays_stream_says_what_to_wait_for() {
        // The serialiser's codes: -1 no stream given, 0 `None`, else the stream.
        assert_eq!(StreamSync::from_code(-1), StreamSync::Device);
        assert_eq!(StreamSync::from_code(0), StreamSync::Ready);
        // The default streams are the whole device (the asking thread's
        // stream is not the writer's).
        assert_eq!(StreamSync::from_code(1), StreamSync::Device);
        assert_eq!(StreamSync::from_code(2), StreamSync::Device);
        assert_eq!(StreamSync::from_code(0x7f00_1234), StreamSync::Stream(0x7f00_1234));
    }
}
