//! A GPU through cudarc (the CUDA driver API, loaded at run time). Opening
//! one on a machine without the driver or without a GPU is an error that
//! says so (`GpuError::NoCuda`), never a panic: cudarc panics when libcuda
//! is missing, so its presence is checked first.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DriverError};

use crate::device::{Device, DeviceBuffer, DeviceInner, StagingBuffer};
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
        // SAFETY: the bytes are written (copies in) before anything reads them.
        match unsafe { self.stream.alloc::<u8>(len) } {
            Ok(s) => Ok(DeviceBuffer { len, inner: DeviceInner::Cuda(s) }),
            Err(e) if format!("{e:?}").contains("OUT_OF_MEMORY") => {
                Err(GpuError::OutOfMemory { device: self.describe(), wanted: len as u64, free: 0 })
            }
            Err(e) => Err(err("allocating device memory")(e)),
        }
    }

    fn copy_to_host(&self, src: &DeviceBuffer, offset: usize, dst: &mut StagingBuffer, len: usize) -> Result<(), GpuError> {
        let DeviceInner::Cuda(s) = &src.inner else {
            return Err(GpuError::Device { what: "copying to host".into(), reason: "not a CUDA buffer".into() });
        };
        let view = s.slice(offset..offset + len);
        match dst {
            StagingBuffer::Pinned(p) => {
                let part = p.as_mut_slice().map_err(err("copying to host"))?;
                self.stream.memcpy_dtoh(&view, &mut part[..len]).map_err(err("copying to host"))?
            }
            StagingBuffer::Host(v) => self.stream.memcpy_dtoh(&view, &mut v[..len]).map_err(err("copying to host"))?,
        }
        self.stream.synchronize().map_err(err("copying to host"))
    }

    fn copy_from_host(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<(), GpuError> {
        let DeviceInner::Cuda(d) = &mut dst.inner else {
            return Err(GpuError::Device { what: "copying to the device".into(), reason: "not a CUDA buffer".into() });
        };
        let mut view = d.slice_mut(offset..offset + src.len());
        self.stream.memcpy_htod(src, &mut view).map_err(err("copying to the device"))?;
        self.stream.synchronize().map_err(err("copying to the device"))
    }

    fn address(&self, buf: &DeviceBuffer) -> u64 {
        use cudarc::driver::DevicePtr;
        match &buf.inner {
            DeviceInner::Cuda(s) => s.device_ptr(&self.stream).0,
            DeviceInner::Host(_) => 0, // an empty buffer
        }
    }

    unsafe fn read_raw(&self, ptr: u64, dst: &mut [u8]) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(err("reading device memory"))?;
        // Arrays of other libraries are written on their own streams: wait
        // for the device before reading (as CuPy's `.get()` does by default).
        self.ctx.synchronize().map_err(err("reading device memory"))?;
        // SAFETY: the caller guarantees the range is live device memory.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(dst, ptr) }.map_err(err("reading device memory"))
    }

    fn alloc_staging(&self, len: usize) -> Result<StagingBuffer, GpuError> {
        // SAFETY: staging bytes are written by a copy before they are read.
        let p = unsafe { self.ctx.alloc_pinned::<u8>(len) }.map_err(err("allocating page-locked host memory"))?;
        Ok(StagingBuffer::Pinned(p))
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
