//! A GPU through cudarc (the CUDA driver API, loaded at run time). Opening
//! one on a machine without the driver or without a GPU is an error that
//! says so (`GpuError::NoCuda`), never a panic: cudarc panics when libcuda
//! is missing, so its presence is checked first.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DriverError};

use crate::device::{check_range, Device, DeviceBuffer, DeviceInner, StagingBuffer, StreamSync};
use crate::GpuError;

pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

fn err(what: &str) -> impl FnOnce(DriverError) -> GpuError + '_ {
    move |e| GpuError::Device { what: what.into(), reason: format!("{e:?}") }
}

impl CudaDevice {
    /// GPU `ordinal` (as numbered under this process's CUDA_VISIBLE_DEVICES).
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only tries to load the library and reports whether it could.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoCuda { reason: "libcuda (the NVIDIA driver's CUDA library) is not installed on this machine".into() });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| GpuError::NoCuda { reason: format!("cannot open GPU {ordinal}: {e:?}") })?;
        let stream = ctx.default_stream();
        Ok(CudaDevice { ordinal, ctx, stream })
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        format!("GPU {}", self.ordinal)
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer, GpuError> {
        if len == 0 {
            // CUDA refuses empty allocations; an empty array needs no memory.
            return Ok(DeviceBuffer { len, inner: DeviceInner::Host(Vec::new()) });
        }
        self.ctx.bind_to_thread().map_err(err("allocating device memory"))?;
        // Plain `cuMemAlloc`, not the stream-ordered pool cudarc would use
        // where the GPU has one: CUDA gives IPC handles only to plain
        // allocations, and values rdask received are shared on by IPC too.
        // SAFETY: the bytes are written (copies in) before anything reads them.
        match unsafe { cudarc::driver::result::malloc_sync(len) } {
            Ok(ptr) => Ok(DeviceBuffer { len, inner: DeviceInner::Cuda(CudaAlloc { ptr, ctx: self.ctx.clone() }) }),
            Err(e) if format!("{e:?}").contains("OUT_OF_MEMORY") => {
                Err(GpuError::OutOfMemory { device: self.describe(), wanted: len as u64, free: 0 })
            }
            Err(e) => Err(err("allocating device memory")(e)),
        }
    }

    fn copy_to_host(&self, src: &DeviceBuffer, offset: usize, dst: &mut StagingBuffer, len: usize) -> Result<(), GpuError> {
        if len == 0 {
            // An empty buffer has no CUDA memory (see `alloc`).
            return check_range(src.len, offset, 0, "copying to host");
        }
        let DeviceInner::Cuda(s) = &src.inner else {
            return Err(GpuError::Device { what: "copying to host".into(), reason: "not a CUDA buffer".into() });
        };
        check_range(src.len, offset, len, "copying to host")?;
        check_range(dst.len(), 0, len, "copying to host")?;
        self.ctx.bind_to_thread().map_err(err("copying to host"))?;
        let part = &mut dst.bytes_mut()?[..len];
        // SAFETY: both ranges were checked; the copy is waited for below,
        // before `part` can be used or freed.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(part, s.ptr + offset as u64, self.stream.cu_stream()) }.map_err(err("copying to host"))?;
        self.stream.synchronize().map_err(err("copying to host"))
    }

    fn copy_from_host(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<(), GpuError> {
        if src.is_empty() {
            return check_range(dst.len, offset, 0, "copying to the device");
        }
        let DeviceInner::Cuda(d) = &mut dst.inner else {
            return Err(GpuError::Device { what: "copying to the device".into(), reason: "not a CUDA buffer".into() });
        };
        check_range(dst.len, offset, src.len(), "copying to the device")?;
        self.ctx.bind_to_thread().map_err(err("copying to the device"))?;
        // SAFETY: the range was checked; waited for before `src` may go.
        unsafe { cudarc::driver::result::memcpy_htod_async(d.ptr + offset as u64, src, self.stream.cu_stream()) }.map_err(err("copying to the device"))?;
        self.stream.synchronize().map_err(err("copying to the device"))
    }

    fn address(&self, buf: &DeviceBuffer) -> u64 {
        match &buf.inner {
            DeviceInner::Cuda(s) => s.ptr,
            DeviceInner::Host(_) => 0, // an empty buffer
        }
    }

    unsafe fn read_raw(&self, ptr: u64, dst: &mut [u8]) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(err("reading device memory"))?;
        // SAFETY: the caller guarantees the range is live device memory.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(dst, ptr) }.map_err(err("reading device memory"))
    }

    fn bind_to_thread(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(err("making the GPU current"))
    }

    fn wait_for(&self, sync: StreamSync) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(err("waiting for the device"))?;
        match sync {
            StreamSync::Ready => Ok(()),
            StreamSync::Device => self.ctx.synchronize().map_err(err("waiting for the device")),
            // SAFETY: a stream handle of this process (the array's producer's,
            // which keeps the array, and so its stream, while it is sent).
            StreamSync::Stream(s) => unsafe { cudarc::driver::sys::cuStreamSynchronize(s as cudarc::driver::sys::CUstream) }
                .result()
                .map_err(err("waiting for an array's stream")),
        }
    }

    fn ipc_domain(&self) -> Option<String> {
        // GPUs of one node share memory through IPC handles; between two
        // GPUs the import asks for peer access, and fails (the requester then
        // fetches the value over the network) where there is none.
        Some(format!("cuda:{}", crate::ipc::node_id()))
    }

    unsafe fn ipc_export(&self, ptr: u64, len: usize) -> Result<Vec<u8>, GpuError> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(err("sharing device memory"))?;
        // A handle names a whole allocation (a CuPy pool block, say): the
        // array is at an offset into it.
        let (mut base, mut size) = (0, 0);
        // SAFETY: out-pointers to locals; the caller says `ptr` is device memory.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }.result().map_err(err("finding an array's allocation"))?;
        if (ptr - base) as usize + len > size {
            return Err(GpuError::Device { what: "sharing device memory".into(), reason: format!("{len} bytes at {ptr:#x} run past their allocation") });
        }
        let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: as above. Memory of a stream-ordered pool (cuMemAllocAsync)
        // is refused here, and then goes as bytes.
        unsafe { sys::cuIpcGetMemHandle(&mut handle, base) }.result().map_err(err("getting an IPC handle"))?;
        // Handle, the array's offset and the allocation's size: the importer
        // checks the range against the size the exporter saw.
        let mut body = key(&handle).to_vec();
        body.extend_from_slice(&(ptr - base).to_le_bytes());
        body.extend_from_slice(&(size as u64).to_le_bytes());
        Ok(crate::ipc::descriptor(&body))
    }

    fn ipc_import(&self, descriptor: &[u8], len: usize) -> Result<DeviceBuffer, GpuError> {
        use cudarc::driver::sys;
        let body = crate::ipc::body(descriptor)
            .filter(|b| b.len() == 80)
            .ok_or_else(|| GpuError::Device { what: "importing device memory".into(), reason: "not a CUDA IPC descriptor".into() })?;
        let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
        for (d, s) in handle.reserved.iter_mut().zip(&body[..64]) {
            *d = *s as _;
        }
        let offset = u64::from_le_bytes(body[64..72].try_into().unwrap());
        let size = u64::from_le_bytes(body[72..80].try_into().unwrap());
        // The descriptor came over the network: it must name memory inside
        // the shared allocation (an out-of-range copy can break the whole
        // context).
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(GpuError::Device { what: "importing device memory".into(), reason: format!("{len} bytes at offset {offset} lie outside the shared allocation of {size}") });
        }
        let dst = self.alloc(len)?;
        if len == 0 {
            return Ok(dst);
        }
        self.ctx.bind_to_thread().map_err(err("importing device memory"))?;
        let remote = open_handle(handle)?;
        // Where the driver describes the mapping, the range must fit it too
        // (a handle that names a smaller allocation than the descriptor says).
        let (mut base, mut mapped) = (0, 0);
        // SAFETY: out-pointers to locals; `remote` is a live mapping.
        if unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut mapped, remote) }.result().is_ok()
            && (remote.saturating_sub(base)).checked_add(offset + len as u64).is_none_or(|end| end > mapped as u64)
        {
            close_handle(handle);
            self.free(dst);
            return Err(GpuError::Device { what: "importing device memory".into(), reason: format!("{len} bytes at offset {offset} lie outside the mapped allocation of {mapped}") });
        }
        let to = self.address(&dst);
        // SAFETY: `remote` maps the exporter's allocation, which it keeps
        // until told the import is done; `to` is our new buffer of `len`.
        let copied = unsafe { sys::cuMemcpyDtoD_v2(to, remote + offset, len) }.result().map_err(err("copying from another process's device memory"));
        // Device-to-device copies do not wait for the device: wait before
        // the exporter is told it may free its memory.
        let synced = copied.and_then(|()| self.ctx.synchronize().map_err(err("copying from another process's device memory")));
        close_handle(handle);
        if let Err(e) = synced {
            self.free(dst);
            return Err(e);
        }
        Ok(dst)
    }

    fn alloc_staging(&self, len: usize) -> Result<StagingBuffer, GpuError> {
        // Plain page-locked memory, not cudarc's default write-combined kind:
        // the CPU reads what comes off the device (sockets, UCX, spilled
        // values), and reads of write-combined memory are very slow.
        // SAFETY: staging bytes are written by a copy before they are read.
        let p = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len, 0) }.map_err(err("allocating page-locked host memory"))?;
        Ok(StagingBuffer::Pinned(crate::device::Pinned::new(p)?))
    }
}

/// Device memory from `cuMemAlloc`, freed when dropped.
pub(crate) struct CudaAlloc {
    ptr: u64,
    ctx: Arc<CudaContext>,
}

impl Drop for CudaAlloc {
    fn drop(&mut self) {
        // Copies into or out of the buffer were waited for when they were
        // made, so nothing on the device still uses it.
        // SAFETY: this allocation's own pointer, freed once.
        let freed = self.ctx.bind_to_thread().and_then(|()| unsafe { cudarc::driver::result::free_sync(self.ptr) });
        if let Err(e) = freed {
            tracing::warn!("freeing device memory at {:#x}: {e:?}", self.ptr);
        }
    }
}

/// Handles this process has open, with how many imports use each: CUDA
/// maps a handle once per context, and two arrays of one exported
/// allocation may be imported at the same time.
fn open_handles() -> &'static std::sync::Mutex<OpenHandles> {
    static OPEN: std::sync::OnceLock<std::sync::Mutex<OpenHandles>> = std::sync::OnceLock::new();
    OPEN.get_or_init(Default::default)
}

/// A handle's bytes → (where it is mapped here, imports using it).
type OpenHandles = std::collections::HashMap<[u8; 64], (u64, usize)>;

fn key(handle: &cudarc::driver::sys::CUipcMemHandle_st) -> [u8; 64] {
    let mut k = [0u8; 64];
    for (d, s) in k.iter_mut().zip(handle.reserved.iter()) {
        *d = *s as u8;
    }
    k
}

fn open_handle(handle: cudarc::driver::sys::CUipcMemHandle_st) -> Result<u64, GpuError> {
    use cudarc::driver::sys;
    let mut open = open_handles().lock().unwrap();
    if let Some((ptr, users)) = open.get_mut(&key(&handle)) {
        *users += 1;
        return Ok(*ptr);
    }
    let mut ptr = 0;
    // SAFETY: an out-pointer to a local; the driver checks the handle.
    unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32) }
        .result()
        .map_err(|e| match e.0 {
            sys::cudaError_enum::CUDA_ERROR_ALREADY_MAPPED => GpuError::AlreadyMapped { reason: format!("{e:?}") },
            _ => err("opening another process's IPC handle")(e),
        })?;
    open.insert(key(&handle), (ptr, 1));
    Ok(ptr)
}

fn close_handle(handle: cudarc::driver::sys::CUipcMemHandle_st) {
    let mut open = open_handles().lock().unwrap();
    let k = key(&handle);
    let Some((ptr, users)) = open.get_mut(&k) else { return };
    *users -= 1;
    if *users == 0 {
        let ptr = *ptr;
        open.remove(&k);
        // SAFETY: a mapping opened by `open_handle` that nothing uses now.
        if let Err(e) = unsafe { cudarc::driver::sys::cuIpcCloseMemHandle(ptr) }.result() {
            tracing::warn!("closing an IPC mapping: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_opening_one_says_why() {
        // This runs everywhere; on a GPU machine it opens GPU 0 and moves bytes.
        match CudaDevice::open(0) {
            Err(GpuError::NoCuda { reason }) => assert!(reason.contains("libcuda") || reason.contains("GPU 0"), "{reason}"),
            Err(other) => panic!("expected NoCuda, got {other}"),
            Ok(dev) => {
                let b = crate::device::upload(&dev, &[7u8; 1000]).unwrap();
                let mut h = dev.alloc_staging(1000).unwrap();
                dev.copy_to_host(&b, 0, &mut h, 1000).unwrap();
                assert!(h.bytes().iter().all(|x| *x == 7));
            }
        }
    }
}
