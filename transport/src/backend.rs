//! The transport trait. A backend turns an address into connections; a
//! connection is a [`FrameSender`] (cheap to clone, never blocks) and a
//! [`FrameRead`] that yields whole frames. Everything above this module is
//! backend-agnostic, so UCX and MPI are one file each behind a cargo feature.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::error::{Result, TransportError};
use crate::frame::{Frame, Limits};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sending half of a connection. Frames queue without blocking; a backend
/// task writes them out, coalescing whatever has queued into one vectored write.
#[derive(Clone)]
pub struct FrameSender {
    // Declared before `notify`: the last clone drops its channel end first,
    // so a backend woken by the notifier's drop sees the channel closed.
    tx: mpsc::UnboundedSender<Frame>,
    limits: Limits,
    notify: Option<Arc<dyn Notify>>,
    /// Memory kinds this connection carries as device payloads
    /// (`device::kind_bit`); 0 for all but UCX.
    carries: u8,
}

/// Wakes a backend that does not poll the send queue from a tokio task (UCX:
/// its engine thread sleeps on the library's event fd). Called after every
/// queued frame; dropped with the last clone of the sender, which is how the
/// backend learns the connection is closed on this side.
pub trait Notify: Send + Sync {
    fn notify(&self);
}

impl FrameSender {
    pub fn new(tx: mpsc::UnboundedSender<Frame>, limits: Limits) -> Self {
        FrameSender { tx, limits, notify: None, carries: 0 }
    }

    /// A sender whose backend is woken by `notify` after each frame.
    pub fn with_notify(tx: mpsc::UnboundedSender<Frame>, limits: Limits, notify: Arc<dyn Notify>) -> Self {
        FrameSender { tx, limits, notify: Some(notify), carries: 0 }
    }

    /// This sender with device payloads of the kinds in `kinds` (bits of
    /// `device::kind_bit`) allowed.
    pub fn carrying(mut self, kinds: u8) -> Self {
        self.carries = kinds;
        self
    }

    /// Whether frames with a device payload of `kind` can go on this
    /// connection (UCX with that memory kind in its build).
    pub fn carries(&self, kind: crate::device::MemoryKind) -> bool {
        self.carries & crate::device::kind_bit(kind) != 0
    }

    /// Queues a frame. Fails at once for a frame over the size limit, or when
    /// the connection is gone.
    pub fn send(&self, frame: Frame) -> Result<()> {
        frame.check(&self.limits)?;
        if let Some(d) = &frame.device {
            if !self.carries(d.kind()) {
                return Err(TransportError::Invalid(format!("this connection cannot carry {:?} memory", d.kind())));
            }
            if d.is_empty() || !frame.data.is_empty() {
                return Err(TransportError::Invalid("a device frame has a non-empty payload and no data frames".into()));
            }
            if frame.host_size() > crate::device::DEVICE_FRAME_HOST_MAX as u64 {
                return Err(TransportError::Invalid(format!("a device frame's host part of {} bytes is over {}", frame.host_size(), crate::device::DEVICE_FRAME_HOST_MAX)));
            }
        }
        self.tx.send(frame).map_err(|_| TransportError::Closed)?;
        if let Some(n) = &self.notify {
            n.notify();
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// A handle that can send while some other clone of this sender lives,
    /// without keeping the connection open itself.
    pub fn downgrade(&self) -> WeakFrameSender {
        WeakFrameSender { tx: self.tx.downgrade(), limits: self.limits, notify: self.notify.as_ref().map(Arc::downgrade), carries: self.carries }
    }
}

/// See [`FrameSender::downgrade`].
pub struct WeakFrameSender {
    tx: mpsc::WeakUnboundedSender<Frame>,
    limits: Limits,
    notify: Option<std::sync::Weak<dyn Notify>>,
    carries: u8,
}

impl WeakFrameSender {
    /// The sender, while the connection's sending side is still open.
    pub fn upgrade(&self) -> Option<FrameSender> {
        let notify = match &self.notify {
            Some(n) => Some(n.upgrade()?),
            None => None,
        };
        Some(FrameSender { tx: self.tx.upgrade()?, limits: self.limits, notify, carries: self.carries })
    }
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender").field("closed", &self.is_closed()).finish()
    }
}

/// Receiving half of a connection.
pub trait FrameRead: Send {
    /// The next frame; `Ok(None)` on a clean close. After an error the
    /// connection is unusable and should be dropped.
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>>>;

    /// Sets the largest frame this reader accepts and returns the previous
    /// limit; None for readers that take frames from a trusted source (the
    /// in-process backend). The handshake lowers it to what a hello can be
    /// while the peer is not yet authenticated.
    fn set_max_frame_size(&mut self, _max: u64) -> Option<u64> {
        None
    }
}

/// An established connection (before or after the handshake).
pub struct Connection {
    pub sender: FrameSender,
    pub receiver: Box<dyn FrameRead>,
    /// Human-readable peer address, for logs and errors.
    pub peer: String,
}

/// Accepted connections of a listening backend.
pub struct Listener {
    /// The address peers should connect to (port 0 resolved; for a listener
    /// bound to all interfaces, an address of this host others can reach).
    pub address: String,
    /// The address the socket is bound to, e.g. `tcp://0.0.0.0:8786`.
    pub bound: String,
    incoming: mpsc::Receiver<Connection>,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Listener {
    pub fn new(address: String, incoming: mpsc::Receiver<Connection>, guard: Option<Box<dyn Send + Sync>>) -> Self {
        Listener { bound: address.clone(), address, incoming, _guard: guard }
    }

    /// Records the socket's bound address where it differs from `address`.
    pub fn bound_to(mut self, bound: String) -> Self {
        self.bound = bound;
        self
    }

    /// Bound to every interface (0.0.0.0 or ::), so reachable from other hosts.
    pub fn is_exposed(&self) -> bool {
        let (_, rest) = split_scheme(&self.bound);
        rest.starts_with("0.0.0.0:") || rest.starts_with("[::]:")
    }

    /// Next accepted connection; `None` once the backend stopped accepting.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.incoming.recv().await
    }
}

/// One transport implementation (TCP, in-process, UCX, MPI).
pub trait Backend: Send + Sync + 'static {
    /// Address scheme this backend serves, e.g. "tcp".
    fn scheme(&self) -> &'static str;
    fn listen<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Listener>>;
    fn connect<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Connection>>;
}

/// Splits `scheme://rest`; a bare `host:port` means TCP, as in Dask.
pub fn split_scheme(addr: &str) -> (&str, &str) {
    match addr.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => ("tcp", addr),
    }
}

/// The `host:port` of a `scheme://host:port` address (for the IP backends:
/// TCP, TLS, UCX), or the error that names what is wrong with it.
pub(crate) fn host_port<'a>(addr: &'a str, scheme: &str) -> Result<&'a str> {
    let (given, rest) = split_scheme(addr);
    if given != scheme {
        return Err(TransportError::UnknownScheme(addr.to_string()));
    }
    if !rest.contains(':') {
        return Err(TransportError::InvalidAddress(addr.to_string(), format!("expected {scheme}://host:port")));
    }
    Ok(rest)
}

/// The backend for an address, chosen by its scheme.
pub fn backend_for(addr: &str) -> Result<Arc<dyn Backend>> {
    let (scheme, _) = split_scheme(addr);
    match scheme {
        "tcp" => Ok(Arc::new(crate::tcp::TcpBackend)),
        "tls" => Ok(Arc::new(crate::tls::TlsBackend)),
        "inproc" => Ok(Arc::new(crate::inproc::InProcBackend)),
        #[cfg(feature = "mpi")]
        "mpi" => Ok(Arc::new(crate::mpi::MpiBackend)),
        #[cfg(not(feature = "mpi"))]
        "mpi" => Err(TransportError::InvalidAddress(
            addr.to_string(),
            "this rdask was built without MPI (cargo feature `mpi`)".into(),
        )),
        #[cfg(all(feature = "ucx", ucx_bindings))]
        "ucx" => Ok(Arc::new(crate::ucx::UcxBackend)),
        #[cfg(not(all(feature = "ucx", ucx_bindings)))]
        "ucx" => Err(TransportError::InvalidAddress(addr.to_string(), ucx_status().unwrap_err())),
        _ => Err(TransportError::UnknownScheme(addr.to_string())),
    }
}

/// The scheme for a `--protocol` flag: `tcp`, `tls`, `ucx`, or `auto` (UCX
/// when this process can use it, else TCP; logged). None means TLS when
/// certificates are configured, else TCP. The error is one line for the user.
pub fn choose_scheme(protocol: Option<&str>, tls: bool) -> std::result::Result<&'static str, String> {
    let p = protocol.map(|p| p.trim_end_matches("://").to_ascii_lowercase());
    match p.as_deref() {
        None => Ok(if tls { "tls" } else { "tcp" }),
        Some("tcp") => Ok("tcp"),
        Some("tls") if tls => Ok("tls"),
        Some("tls") => Err("--protocol tls needs --tls-ca-file, --tls-cert and --tls-key".into()),
        Some("ucx") if tls => Err("--protocol ucx does not encrypt; with TLS certificates use --protocol tls".into()),
        Some("ucx") => ucx_status().map(|_| "ucx").map_err(|e| format!("--protocol ucx: {e}")),
        Some("auto") if tls => Ok("tls"),
        Some("auto") => Ok(match ucx_status() {
            Ok(version) => {
                tracing::info!("--protocol auto: UCX {version} is available; using ucx://");
                "ucx"
            }
            Err(why) => {
                tracing::info!("--protocol auto: {why}; using tcp://");
                "tcp"
            }
        }),
        Some(other) => Err(format!("--protocol {other} is not supported: tcp, tls, ucx or auto")),
    }
}

/// UCX's version when this process can use it (the library loads and a
/// UCP worker starts), else one line saying what is missing. Used by
/// `--protocol ucx|auto`.
pub fn ucx_status() -> std::result::Result<String, String> {
    #[cfg(all(feature = "ucx", ucx_bindings))]
    {
        crate::ucx::start().map_err(|e| e.to_string())
    }
    #[cfg(all(feature = "ucx", not(ucx_bindings)))]
    {
        Err("UCX is not available: this rdask was built without the UCX headers (install libucx-dev and rebuild)".into())
    }
    #[cfg(not(feature = "ucx"))]
    {
        Err("UCX is not available: this rdask was built without the `ucx` cargo feature".into())
    }
}

/// The memory kinds UCX moves as device frames in this process, or why UCX
/// is not usable (as [`ucx_status`]).
pub fn ucx_memory_kinds() -> std::result::Result<Vec<crate::device::MemoryKind>, String> {
    #[cfg(all(feature = "ucx", ucx_bindings))]
    {
        crate::ucx::device_frame_kinds().map_err(|e| e.to_string())
    }
    #[cfg(not(all(feature = "ucx", ucx_bindings)))]
    {
        ucx_status().map(|_| Vec::new())
    }
}

/// Listens on `addr` with the backend its scheme names.
pub async fn listen(addr: &str, limits: Limits) -> Result<Listener> {
    backend_for(addr)?.listen(addr, limits).await
}

/// Connects to `addr` with the backend its scheme names.
pub async fn connect(addr: &str, limits: Limits) -> Result<Connection> {
    backend_for(addr)?.connect(addr, limits).await
}
