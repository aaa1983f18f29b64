//! Device memory for the Python serialiser (`rdask.serialize`): arrays with
//! `__cuda_array_interface__` (CuPy, Numba, PyTorch) leave the device as
//! one host frame each ([`device_download`]) instead of going through
//! pickle's host copies, and device frames that arrive become device memory
//! again ([`device_upload`]) as a [`DeviceBuffer`], which CuPy, Numba and
//! PyTorch wrap without a copy through its `__cuda_array_interface__`.
//!
//! The device is the process's (`rdask_gpu::device::process_device`): GPU 0
//! of the worker's `CUDA_VISIBLE_DEVICES`, or with `RDASK_DEVICE=standin`
//! the host-memory stand-in, whose "device addresses" are host addresses
//! (how the device path is tested on machines without a GPU).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use rdask_gpu::device::{process_device, Device};
use rdask_gpu::staging::StageIn;

use crate::frames::{py_to_bytes, Frame};
use crate::GpuUnavailableError;

fn device() -> PyResult<Arc<dyn Device>> {
    process_device().map_err(|e| GpuUnavailableError::new_err(e.to_string()))
}

fn device_error(e: rdask_gpu::GpuError) -> PyErr {
    crate::RdaskError::new_err(e.to_string())
}

/// Device memory that rdask allocated for a value that arrived, with the
/// array interface of the value it holds.
#[pyclass(module = "rdask._rdask", frozen)]
pub struct DeviceBuffer {
    buf: std::sync::Mutex<Option<rdask_gpu::device::DeviceBuffer>>,
    device: Arc<dyn Device>,
    address: u64,
    nbytes: usize,
    shape: Vec<usize>,
    typestr: String,
}

#[pymethods]
impl DeviceBuffer {
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    #[getter]
    fn __cuda_array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        d.set_item("typestr", &self.typestr)?;
        d.set_item("data", (self.address, false))?;
        d.set_item("strides", py.None())?;
        d.set_item("version", 3)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("<rdask DeviceBuffer of {} bytes on {}, shape {:?}, {}>", self.nbytes, self.device.describe(), self.shape, self.typestr)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.lock().unwrap().take() {
            self.device.free(buf);
        }
    }
}

/// Copies `nbytes` of device memory at `address` (an array of CuPy, Numba,
/// PyTorch: the caller keeps it alive meanwhile) into a new host frame.
/// The interpreter lock is released during the copy.
#[pyfunction]
pub fn device_download(py: Python<'_>, address: u64, nbytes: usize) -> PyResult<Frame> {
    let dev = device()?;
    let host = py.detach(|| {
        // Large frames land in reused, already mapped memory when there is
        // some (fresh pages cost a fault each on first touch).
        let mut host = rdask_transport::bufpool::take(nbytes, |_| {});
        host.resize(nbytes, 0);
        if nbytes > 0 {
            // SAFETY: the Python caller holds the array whose interface gave
            // `address` and `nbytes` (it is an argument of the serialiser's call).
            unsafe { dev.read_raw(address, &mut host) }?;
        }
        Ok::<_, rdask_gpu::GpuError>(host)
    });
    Ok(Frame { data: rdask_transport::bufpool::into_bytes(host.map_err(device_error)?) })
}

/// Host frames (bytes-like: an array's bytes whole, or its staging chunks in
/// order) copied into new device memory one after the other, described as an
/// array of `shape` and `typestr` (C order).
#[pyfunction]
pub fn device_upload(py: Python<'_>, frames: Vec<Bound<'_, PyAny>>, shape: Vec<usize>, typestr: String) -> PyResult<DeviceBuffer> {
    let dev = device()?;
    let chunks = frames.iter().map(py_to_bytes).collect::<PyResult<Vec<_>>>()?;
    let total = chunks.iter().map(|c| c.len()).sum();
    let buf = py
        .detach(|| {
            let mut into = StageIn::new(dev.clone(), total)?;
            for chunk in &chunks {
                into.push(chunk)?;
            }
            into.finish()
        })
        .map_err(device_error)?;
    let address = dev.address(&buf);
    Ok(DeviceBuffer { nbytes: buf.len(), buf: std::sync::Mutex::new(Some(buf)), device: dev, address, shape, typestr })
}

/// The device this process's device frames use ("GPU 0", "host stand-in");
/// raises GpuUnavailableError saying why there is none.
#[pyfunction]
pub fn device_name() -> PyResult<String> {
    Ok(device()?.describe())
}

/// What this process's workers sent in staging chunks (`staging_stats()`).
pub(crate) static STAGED_VALUES: AtomicU64 = AtomicU64::new(0);
pub(crate) static STAGED_CHUNKS: AtomicU64 = AtomicU64::new(0);
pub(crate) static STAGED_BYTES: AtomicU64 = AtomicU64::new(0);
/// The most staging buffers one value had in use at once.
pub(crate) static MOST_BUFFERS: AtomicU64 = AtomicU64::new(0);

/// Device values this process sent to peers in staging chunks since it
/// started: `{"values", "chunks", "bytes", "most_buffers", "chunk_bytes"}`
/// (`most_buffers`: the most staging buffers one value used at once, which
/// bounds the host memory of a transfer to `most_buffers * chunk_bytes`).
#[pyfunction]
pub fn staging_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("values", STAGED_VALUES.load(Ordering::Relaxed))?;
    d.set_item("chunks", STAGED_CHUNKS.load(Ordering::Relaxed))?;
    d.set_item("bytes", STAGED_BYTES.load(Ordering::Relaxed))?;
    d.set_item("most_buffers", MOST_BUFFERS.load(Ordering::Relaxed))?;
    d.set_item("chunk_bytes", rdask_gpu::staging::DEFAULT_CHUNK)?;
    Ok(d)
}
