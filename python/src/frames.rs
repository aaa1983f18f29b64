//! Data frames crossing the Python boundary without copies: received bytes
//! are handed to Python as read-only buffers ([`Frame`]), and Python buffers
//! (pickle protocol 5 out-of-band buffers, e.g. numpy memory) become
//! `Bytes` that keep the Python object alive.

use std::ffi::{c_int, c_void};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rdask_transport::bytes::Bytes;

/// A received data frame, exposed through the buffer protocol (read-only):
/// `pickle.loads(..., buffers=[frame])` and `numpy.frombuffer(frame)` read
/// the network buffer in place.
#[pyclass(module = "rdask._rdask", frozen)]
pub struct Frame {
    pub(crate) data: Bytes,
}

#[pymethods]
impl Frame {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.data)
    }

    fn __repr__(&self) -> String {
        format!("<rdask Frame of {} bytes>", self.data.len())
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null buffer view"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("rdask frames are read-only"));
        }
        let data = &slf.get().data;
        // SAFETY: `view` is a valid Py_buffer handed to us by CPython; the
        // pointers stored stay valid while `view.obj` (this frame, which owns
        // the immutable bytes) is alive, and CPython keeps it alive until
        // the view is released.
        unsafe {
            (*view).buf = data.as_ptr() as *mut c_void;
            (*view).len = data.len() as isize;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND { &mut (*view).len } else { std::ptr::null_mut() };
            (*view).strides =
                if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES { &mut (*view).itemsize } else { std::ptr::null_mut() };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
            (*view).obj = slf.into_any().into_ptr();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

pub(crate) fn frames_to_py<'py>(py: Python<'py>, frames: impl IntoIterator<Item = Bytes>) -> PyResult<Vec<Py<Frame>>> {
    frames.into_iter().map(|data| Py::new(py, Frame { data })).collect()
}

/// Keeps a contiguous Python buffer alive as the owner of a `Bytes`.
struct BufferOwner {
    buffer: PyUntypedBuffer,
}

impl AsRef<[u8]> for BufferOwner {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the exporter keeps this memory valid and unmoved until the
        // buffer is released, which happens when the owner is dropped.
        unsafe { std::slice::from_raw_parts(self.buffer.buf_ptr() as *const u8, self.buffer.len_bytes()) }
    }
}

/// A Python bytes-like object as `Bytes`: our own frames and contiguous
/// buffers are shared without copying; anything else is copied once.
pub(crate) fn py_to_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(frame) = obj.cast::<Frame>() {
        return Ok(frame.get().data.clone());
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        // Small control payloads: a copy is cheaper than holding the object.
        let raw = b.as_bytes();
        if raw.len() < 64 << 10 {
            return Ok(Bytes::copy_from_slice(raw));
        }
    }
    let buffer = PyUntypedBuffer::get(obj)?;
    if !buffer.is_c_contiguous() {
        let copied: Vec<u8> = obj.call_method0("tobytes")?.extract()?;
        return Ok(Bytes::from(copied));
    }
    Ok(Bytes::from_owner(BufferOwner { buffer }))
}
