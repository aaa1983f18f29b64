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
use rdask_transport::bytes::Bytes;

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
    /// Taken only when this object is dropped.
    buf: Option<rdask_gpu::device::DeviceBuffer>,
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

impl DeviceBuffer {
    fn new(buf: rdask_gpu::device::DeviceBuffer, device: Arc<dyn Device>, shape: Vec<usize>, typestr: String) -> DeviceBuffer {
        let address = device.address(&buf);
        DeviceBuffer { nbytes: buf.len(), buf: Some(buf), device, address, shape, typestr }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.device.free(buf);
        }
    }
}

/// Copies `nbytes` of device memory at `address` (an array of CuPy, Numba,
/// PyTorch: the caller keeps it alive meanwhile) into a new host frame,
/// once the work on `stream` is done (the serialiser's code for the
/// interface's stream: -1 none given, the whole device; 0 ready).
/// The interpreter lock is released during the wait and the copy.
#[pyfunction]
#[pyo3(signature = (address, nbytes, stream=-1))]
pub fn device_download(py: Python<'_>, address: u64, nbytes: usize, stream: i64) -> PyResult<Frame> {
    let dev = device()?;
    let host = py.detach(|| {
        wait_for_arrays(&*dev, [stream], false)?;
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
            let mut into = with_room(total, || StageIn::new(dev.clone(), total))?;
            for chunk in &chunks {
                into.push(chunk)?;
            }
            into.finish()
        })
        .map_err(device_error)?;
    Ok(DeviceBuffer::new(buf, dev, shape, typestr))
}

/// Runs `alloc` (an allocation of `len` device bytes); when the device is
/// full, first asks the array libraries of this process to give their
/// cached blocks back to the driver (CuPy's pools and PyTorch's caching
/// allocator keep freed memory that rdask's `cuMemAlloc` cannot use), then
/// moves least recently used device values of this process's GPU workers to
/// host memory (`device_tier::make_room`) and tries again, as long as that
/// frees something. Blocks: not on an event loop's hot path.
pub(crate) fn with_room<T>(len: usize, mut alloc: impl FnMut() -> Result<T, rdask_gpu::GpuError>) -> Result<T, rdask_gpu::GpuError> {
    let mut asked_libraries = false;
    loop {
        let full = match alloc() {
            Err(e @ rdask_gpu::GpuError::OutOfMemory { .. }) => e,
            other => return other,
        };
        if !asked_libraries {
            asked_libraries = true;
            if free_library_pools() {
                continue;
            }
        }
        if rdask_worker::device_tier::make_room(len as u64) == 0 {
            return Err(full);
        }
        // Arrays freed by moving them went back to their library's cache,
        // not to the driver: ask the library to give them back.
        free_library_pools();
    }
}

/// Gives the blocks CuPy's default pools and PyTorch's caching allocator
/// keep back to the driver, for those of them this process uses; returns
/// whether there was any.
fn free_library_pools() -> bool {
    Python::attach(|py| {
        let Ok(modules) = py.import("sys").and_then(|s| s.getattr("modules")) else { return false };
        let mut any = false;
        if let Ok(cupy) = modules.get_item("cupy") {
            for pool in ["get_default_memory_pool", "get_default_pinned_memory_pool"] {
                if let Ok(p) = cupy.call_method0(pool) {
                    any = true;
                    if let Err(e) = p.call_method0("free_all_blocks") {
                        tracing::debug!("cupy.{pool}().free_all_blocks(): {e}");
                    }
                }
            }
        }
        // Only where PyTorch already uses the GPU: asking would otherwise
        // start CUDA in PyTorch.
        if let Ok(cuda) = modules.get_item("torch.cuda") {
            if cuda.call_method0("is_initialized").and_then(|b| b.is_truthy()).unwrap_or(false) {
                any = true;
                if let Err(e) = cuda.call_method0("empty_cache") {
                    tracing::debug!("torch.cuda.empty_cache(): {e}");
                }
            }
        }
        any
    })
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

/// Device values shared with processes of this node through IPC: since
/// start, and held now (until the requester says it copied them).
pub(crate) static SHARED_VALUES: AtomicU64 = AtomicU64::new(0);
pub(crate) static SHARED_HELD: AtomicU64 = AtomicU64::new(0);
/// Device arrays this process imported from another through IPC.
static IMPORTED_ARRAYS: AtomicU64 = AtomicU64::new(0);
static IMPORTED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Waits once for each distinct stream the arrays' interfaces named (the
/// codes of `device_download`), before their memory is read or shared.
/// `by_others`: the memory is read outside the legacy default stream (by
/// another process through IPC, or by UCX's own streams), which does not
/// wait for legacy-stream work as rdask's own copies do: an array said to
/// be ready (`stream: None`, which Numba gives for arrays of that stream)
/// waits for the whole device then.
pub(crate) fn wait_for_arrays(dev: &dyn Device, streams: impl IntoIterator<Item = i64>, by_others: bool) -> Result<(), rdask_gpu::GpuError> {
    use rdask_gpu::device::StreamSync;
    let mut seen = std::collections::HashSet::new();
    let syncs = streams.into_iter().map(StreamSync::from_code).map(|s| if by_others && s == StreamSync::Ready { StreamSync::Device } else { s });
    for sync in syncs {
        if !seen.insert(sync) {
            continue;
        }
        let counter = match sync {
            StreamSync::Device => &WAITED_DEVICE,
            StreamSync::Ready => &WAITED_NOT_NEEDED,
            StreamSync::Stream(_) => &WAITED_STREAM,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        dev.wait_for(sync)?;
    }
    Ok(())
}

/// How often a copy off the device waited for the whole device (an array
/// that named no stream), for one stream, or not at all (`stream: None`).
static WAITED_DEVICE: AtomicU64 = AtomicU64::new(0);
static WAITED_STREAM: AtomicU64 = AtomicU64::new(0);
static WAITED_NOT_NEEDED: AtomicU64 = AtomicU64::new(0);

/// Whether device values may go to and come from processes of this node as
/// IPC descriptors (`RDASK_DEVICE_IPC=0` turns it off).
pub(crate) fn ipc_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RDASK_DEVICE_IPC").map_or(true, |v| v.trim() != "0"))
}

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
    d.set_item("shared_values", SHARED_VALUES.load(Ordering::Relaxed))?;
    d.set_item("shared_held", SHARED_HELD.load(Ordering::Relaxed))?;
    d.set_item("waited_device", WAITED_DEVICE.load(Ordering::Relaxed))?;
    d.set_item("waited_stream", WAITED_STREAM.load(Ordering::Relaxed))?;
    d.set_item("waited_not_needed", WAITED_NOT_NEEDED.load(Ordering::Relaxed))?;
    d.set_item("direct_values", crate::device_direct::SENT_VALUES.load(Ordering::Relaxed))?;
    d.set_item("direct_arrays", crate::device_direct::SENT_ARRAYS.load(Ordering::Relaxed))?;
    d.set_item("direct_bytes", crate::device_direct::SENT_BYTES.load(Ordering::Relaxed))?;
    Ok(d)
}

// ------------------------------------------------------------ receiving in parts

/// Device arrays that arrived in parts and wait for the serialiser to claim
/// them (`device_claim`), by handle id.
type Arrived = std::collections::HashMap<u64, (rdask_gpu::device::DeviceBuffer, Arc<dyn Device>)>;
static ARRIVED: std::sync::Mutex<Option<Arrived>> = std::sync::Mutex::new(None);
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);
/// Values received in parts, and chunks copied into device memory on arrival.
static RECEIVED_VALUES: AtomicU64 = AtomicU64::new(0);
static RECEIVED_CHUNKS: AtomicU64 = AtomicU64::new(0);

/// The marker of a header whose device frames are handles of arrays already
/// in device memory (rewritten from `RDV1` by [`DeviceParts::finish`]).
const RESIDENT: &[u8; 4] = b"RDVD";
const HANDLE: &[u8; 4] = b"RDVH";
/// The marker of a header (`RDV1` layout) whose arrays follow as IPC
/// descriptors (`rdask_gpu::ipc`), one per array, to import.
pub(crate) const SHARED: &[u8; 4] = b"RDVS";

/// A frame standing for an arrived device array; dropping the last copy of
/// it frees the array if nobody claimed it.
struct HandleFrame {
    bytes: [u8; 12],
    id: u64,
}

impl AsRef<[u8]> for HandleFrame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for HandleFrame {
    fn drop(&mut self) {
        let gone = ARRIVED.lock().unwrap().as_mut().and_then(|m| m.remove(&self.id));
        if let Some((buf, dev)) = gone {
            dev.free(buf);
        }
    }
}

/// The bytes a value's frames took to arrive: for a value whose device
/// arrays arrived in parts (an `RDVD` head and handle frames), its head,
/// host buffers and the arrays' sizes; else the frames' length.
pub(crate) fn received_bytes(frames: &[Bytes]) -> u64 {
    let all = || frames.iter().map(|f| f.len() as u64).sum();
    let Some(head) = frames.first().filter(|h| h.starts_with(RESIDENT)) else { return all() };
    match parse_header(head, &[RESIDENT]) {
        // One handle per array, or the head is not what it says.
        Some((nhost, sizes)) if frames.len() == 1 + nhost + sizes.len() => {
            frames[..=nhost].iter().map(|f| f.len() as u64).chain(sizes).fold(0u64, u64::saturating_add)
        }
        _ => all(),
    }
}

/// `RDV1` header: (host buffers, array sizes).
fn parse_header(h: &[u8], marks: &[&[u8; 4]]) -> Option<(usize, Vec<u64>)> {
    if h.len() < 12 || !marks.iter().any(|m| h[..4] == m[..]) {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap()) as usize;
    let (nhost, ndev) = (word(4), word(8));
    let end = 12usize.checked_add(ndev.checked_mul(8)?)?;
    if h.len() < end {
        return None;
    }
    Some((nhost, (0..ndev).map(|j| u64::from_le_bytes(h[12 + 8 * j..20 + 8 * j].try_into().unwrap())).collect()))
}

const MARK: &[u8; 4] = b"RDV1";

/// Copies the staging chunks of arriving device values into device memory
/// as they come (installed for every peer connection of this process).
pub(crate) struct DeviceSink;

impl rdask_transport::peer::PartSink for DeviceSink {
    fn begin(&self, head: &[Bytes]) -> Option<Box<dyn rdask_transport::peer::PartReceiver>> {
        let (nhost, sizes) = parse_header(head.first()?, &[MARK, SHARED])?;
        if head.len() != 1 + nhost {
            return None;
        }
        let dev = process_device().ok()?;
        let shared = head[0].starts_with(SHARED);
        Some(Box::new(DeviceParts { dev, head: head.to_vec(), sizes, shared, current: None, done: Vec::new() }))
    }

    fn ipc_offer(&self) -> Option<rdask_transport::protocol::IpcOffer> {
        if !ipc_enabled() || !device_expected() {
            return None;
        }
        let domain = process_device().ok()?.ipc_domain()?;
        Some(rdask_transport::protocol::IpcOffer { domain, pid: std::process::id() })
    }

    fn direct_kind(&self) -> Option<rdask_transport::device::MemoryKind> {
        if !crate::device_direct::direct_enabled() || !device_expected() {
            return None;
        }
        Some(crate::device_direct::kind_of(&*process_device().ok()?))
    }
}

/// Whether this process works with device memory: a GPU worker, the
/// stand-in, or a process that opened its device already. (Offering IPC
/// opens the device; a CPU-only client must not create a CUDA context on
/// GPU 0 for that.)
pub(crate) fn device_expected() -> bool {
    std::env::var_os("RDASK_DEVICE_MEMORY_LIMIT").is_some() || std::env::var("RDASK_DEVICE").is_ok_and(|v| v.trim() == "standin") || rdask_gpu::device::device_opened()
}

struct DeviceParts {
    dev: Arc<dyn Device>,
    head: Vec<Bytes>,
    sizes: Vec<u64>,
    /// The arrays come as IPC descriptors (`SHARED` head), not as bytes.
    shared: bool,
    current: Option<StageIn>,
    done: Vec<rdask_gpu::device::DeviceBuffer>,
}

impl DeviceParts {
    /// Empty arrays have no frames: they are complete as soon as they are next.
    fn skip_empty(&mut self) -> Result<(), rdask_gpu::GpuError> {
        while self.current.is_none() && self.done.len() < self.sizes.len() && self.sizes[self.done.len()] == 0 {
            self.done.push(self.dev.alloc(0)?);
        }
        Ok(())
    }

    fn push_bytes(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        while !chunk.is_empty() {
            self.skip_empty().map_err(|e| e.to_string())?;
            let j = self.done.len();
            let Some(&size) = self.sizes.get(j) else {
                return Err("more bytes arrived than the value's header says".into());
            };
            let into = match &mut self.current {
                Some(s) => s,
                None => {
                    let dev = self.dev.clone();
                    self.current.insert(with_room(size as usize, || StageIn::new(dev.clone(), size as usize)).map_err(|e| e.to_string())?)
                }
            };
            let room = (size - into.filled() as u64) as usize;
            let take = room.min(chunk.len());
            into.push(&chunk[..take]).map_err(|e| e.to_string())?;
            chunk = &chunk[take..];
            if take == room {
                let full = self.current.take().expect("present").finish().map_err(|e| e.to_string())?;
                self.done.push(full);
            }
        }
        Ok(())
    }
}

impl DeviceParts {
    /// The next array, imported from the holder's device memory.
    fn import(&mut self, descriptor: &[u8]) -> Result<(), String> {
        let failed = |e: String| format!("{}: {e}", rdask_transport::peer::IPC_IMPORT_FAILED);
        let Some(&size) = self.sizes.get(self.done.len()) else {
            return Err("more device arrays arrived than the value's header says".into());
        };
        let buf = if size == 0 { self.dev.alloc(0) } else { with_room(size as usize, || self.dev.ipc_import(descriptor, size as usize)) };
        let buf = buf.map_err(|e| match e {
            // A full device is not a failed import: the bytes would not fit either.
            rdask_gpu::GpuError::OutOfMemory { .. } => e.to_string(),
            // Mapped here already (UCX's CUDA IPC maps peers' memory too):
            // this value comes over the network, later ones may be imported.
            rdask_gpu::GpuError::AlreadyMapped { .. } => {
                format!("{} {}", failed(e.to_string()), rdask_transport::peer::IPC_IMPORT_FAILED_ONCE)
            }
            other => failed(other.to_string()),
        })?;
        self.done.push(buf);
        IMPORTED_ARRAYS.fetch_add(1, Ordering::Relaxed);
        IMPORTED_BYTES.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }
}

impl rdask_transport::peer::PartReceiver for DeviceParts {
    fn push(&mut self, frames: &[Bytes]) -> Result<(), String> {
        if self.shared {
            return frames.iter().try_for_each(|f| self.import(f));
        }
        for f in frames {
            self.push_bytes(f)?;
            RECEIVED_CHUNKS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn push_device(&mut self, payload: rdask_transport::device::DevicePayload) -> Result<(), String> {
        self.skip_empty().map_err(|e| e.to_string())?;
        if self.shared || self.current.is_some() {
            return Err("a device frame arrived inside another part of a value".into());
        }
        let Some(&size) = self.sizes.get(self.done.len()) else {
            return Err("more device arrays arrived than the value's header says".into());
        };
        match crate::device_direct::take_arrival(payload, size)? {
            crate::device_direct::Arrived::OnDevice(buf) => self.done.push(buf),
            // The device had no room when it arrived: copied in now (making room).
            crate::device_direct::Arrived::OnHost(bytes) => self.push_bytes(&bytes)?,
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<rdask_transport::peer::Frames, String> {
        self.skip_empty().map_err(|e| e.to_string())?;
        if self.current.is_some() || self.done.len() != self.sizes.len() {
            return Err(format!("a device value arrived short: {} of {} arrays", self.done.len(), self.sizes.len()));
        }
        let mut header = self.head[0].to_vec();
        header[..4].copy_from_slice(RESIDENT);
        let mut frames: rdask_transport::peer::Frames = std::iter::once(Bytes::from(header)).chain(self.head[1..].iter().cloned()).collect();
        let mut arrived = ARRIVED.lock().unwrap();
        let map = arrived.get_or_insert_with(Default::default);
        for buf in std::mem::take(&mut self.done) {
            let id = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
            map.insert(id, (buf, self.dev.clone()));
            let mut bytes = [0u8; 12];
            bytes[..4].copy_from_slice(HANDLE);
            bytes[4..].copy_from_slice(&id.to_le_bytes());
            frames.push(Bytes::from_owner(HandleFrame { bytes, id }));
        }
        RECEIVED_VALUES.fetch_add(1, Ordering::Relaxed);
        Ok(frames)
    }
}

impl Drop for DeviceParts {
    fn drop(&mut self) {
        for buf in self.done.drain(..) {
            self.dev.free(buf);
        }
    }
}

/// The device array an arrived handle frame stands for, as a `DeviceBuffer`
/// of `shape` and `typestr` (each handle can be claimed once).
#[pyfunction]
pub fn device_claim(frame: &Bound<'_, PyAny>, shape: Vec<usize>, typestr: String) -> PyResult<DeviceBuffer> {
    let b = py_to_bytes(frame)?;
    if b.len() != 12 || &b[..4] != HANDLE {
        return Err(crate::RdaskError::new_err("not a device array handle"));
    }
    let id = u64::from_le_bytes(b[4..].try_into().unwrap());
    let (buf, device) = ARRIVED
        .lock()
        .unwrap()
        .as_mut()
        .and_then(|m| m.remove(&id))
        .ok_or_else(|| crate::RdaskError::new_err("this device array was claimed already (or freed)"))?;
    Ok(DeviceBuffer::new(buf, device, shape, typestr))
}

/// Values this process received in parts with their chunks copied into
/// device memory on arrival: `{"values", "chunks"}`.
#[pyfunction]
pub fn receive_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("values", RECEIVED_VALUES.load(Ordering::Relaxed))?;
    d.set_item("chunks", RECEIVED_CHUNKS.load(Ordering::Relaxed))?;
    d.set_item("imported_arrays", IMPORTED_ARRAYS.load(Ordering::Relaxed))?;
    d.set_item("imported_bytes", IMPORTED_BYTES.load(Ordering::Relaxed))?;
    d.set_item("direct_arrays", crate::device_direct::ARRIVED_ARRAYS.load(Ordering::Relaxed))?;
    d.set_item("direct_bytes", crate::device_direct::ARRIVED_BYTES.load(Ordering::Relaxed))?;
    d.set_item("direct_on_host", crate::device_direct::ARRIVED_ON_HOST.load(Ordering::Relaxed))?;
    Ok(d)
}
