//! UCX backend (cargo feature `ucx`): `ucx://host:port` addresses over the
//! system's libucx (UCP), so rdask runs over whatever UCX picks or
//! `UCX_TLS` / `UCX_NET_DEVICES` name: InfiniBand, RoCE, shared memory, TCP.
//!
//! One engine thread per process owns the UCP context and worker
//! (UCS_THREAD_MODE_SINGLE); every UCX call and callback runs on it. Other
//! threads queue commands and "frames waiting on connection N" for it, and
//! write its eventfd only when it sleeps. When idle it
//! arms the worker and sleeps in poll(2) on UCX's event fd and that eventfd,
//! so an idle process does not spin a core.
//!
//! Connections use UCX's client-server mode: a listener on a socket address,
//! endpoints created from its connection requests, and `ucp_ep_create` with a
//! socket address on the connecting side. A frame is one active message
//! whose payload has exactly the TCP wire layout (header, length table,
//! control, data; see frame.rs), sent as an iov: small pieces are copied
//! into one staging buffer, large data frames are sent from their own
//! buffers. UCX sends small messages eagerly and large ones by rendezvous;
//! a rendezvous frame is received straight into the buffer that becomes the
//! frames' `Bytes`. Each side first sends HELLO with its id for the
//! connection (the only message that relies on UCX's reply endpoint to be
//! placed); every later message names the receiver's connection by that id
//! and carries a per-connection sequence number: rendezvous receives can
//! complete out of order, and frames are handed up in order. A CLOSE message
//! (after the last frame) ends a connection cleanly; an endpoint error (a
//! peer that vanished) is an error on the reading side.
//!
//! The unsafe FFI lives in this file only; see docs/architecture.md for why
//! the bindings are generated from the system's headers and loaded at run time.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CStr};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rkyv::util::AlignedVec;
use tokio::sync::{mpsc, oneshot};
use ucx_sys as sys;

use crate::backend::{host_port, Backend, BoxFuture, Connection, FrameRead, FrameSender, Listener, Notify};
use crate::error::{Result, TransportError};
use crate::device::{DevicePayload, MemoryKind, DEVICE_FRAME_HOST_MAX};
use crate::frame::{check_lengths, FixedHeader, Frame, Limits, HEADER_LEN};

/// Header: receiver's connection id, sequence number, the frame's first bytes.
const AM_FRAME: u32 = 1;
/// Header: receiver's connection id, sequence number, 1 when the sender
/// had the receiver's CLOSE already (else 0).
const AM_CLOSE: u32 = 2;
/// Header: the sender's id for this connection (sent with UCX's reply
/// endpoint, which tells the receiver which endpoint it came on).
const AM_HELLO: u32 = 3;
/// A frame with a device payload (`crate::device`). Header: receiver's
/// connection id, sequence number, the payload's memory kind (u64), then
/// the frame's whole host part; the message's data is the payload, sent
/// from (and received into) memory of that kind by rendezvous.
const AM_DEVICE: u32 = 4;
/// Pieces smaller than this are copied into the staging buffer rather than
/// given their own iov entry.
const COPY_BELOW: usize = 16 << 10;
/// A frame's first bytes go in the message header only when the rest is at
/// least this large (see `send_am`).
const PREFIX_MIN_REST: usize = 1 << 20;
/// How long a connection closed on both sides, here last, waits for the
/// peer to close its endpoint first (`drain_outgoing`).
const LINGER: Duration = Duration::from_secs(5);
/// Rendezvous bytes one connection receives at once (one frame of any size
/// is always allowed).
const RNDV_IN_FLIGHT: usize = 256 << 20;

// ---------------------------------------------------------------- public API

/// Starts UCX in this process (once) and returns its version, or says why
/// UCX cannot be used here (no library, no usable transport).
pub fn start() -> Result<String> {
    engine().map(|e| e.version.clone())
}

/// The memory kinds this process's UCX moves as device frames (starting
/// UCX if need be): none where device frames are off, host memory, and CUDA
/// memory where the build has CUDA transports.
pub fn device_frame_kinds() -> Result<Vec<MemoryKind>> {
    let carries = engine()?.carries;
    Ok([MemoryKind::Host, MemoryKind::Cuda].into_iter().filter(|k| carries & crate::device::kind_bit(*k) != 0).collect())
}

pub struct UcxBackend;

impl Backend for UcxBackend {
    fn scheme(&self) -> &'static str {
        "ucx"
    }

    fn listen<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Listener>> {
        Box::pin(async move {
            crate::tls::check_plain_allowed(addr)?;
            let sock = resolve(addr).await?;
            let e = engine()?;
            let (incoming, rx) = mpsc::channel(256);
            let (tx, reply) = oneshot::channel();
            e.send(Cmd::Listen { addr: sock, incoming, handle: tokio::runtime::Handle::current(), limits, reply: tx })?;
            let (id, bound) = reply.await.map_err(|_| TransportError::Closed)??;
            let mut local = bound;
            if local.ip().is_unspecified() {
                local.set_ip(crate::netif::contact_ip());
            }
            Ok(Listener::new(format!("ucx://{local}"), rx, Some(Box::new(ListenerGuard(id)))).bound_to(format!("ucx://{bound}")))
        })
    }

    fn connect<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Connection>> {
        Box::pin(async move {
            crate::tls::check_plain_allowed(addr)?;
            let sock = resolve(addr).await?;
            let e = engine()?;
            let (tx, reply) = oneshot::channel();
            e.send(Cmd::Connect { addr: sock, peer: addr.to_string(), handle: tokio::runtime::Handle::current(), limits, reply: tx })?;
            reply.await.map_err(|_| TransportError::Closed)?
        })
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(host_port(addr, "ucx")?)
        .await?
        .next()
        .ok_or_else(|| TransportError::InvalidAddress(addr.to_string(), "the host name has no address".into()))
}

/// Stops the UCX listener when the `Listener` is dropped.
struct ListenerGuard(u64);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        if let Ok(e) = engine() {
            let _ = e.send(Cmd::StopListener(self.0));
        }
    }
}

/// The reading half: frames the engine hands up, in order.
struct ChannelReader {
    rx: mpsc::UnboundedReceiver<Result<Option<Frame>>>,
    max: Arc<AtomicU64>,
}

impl FrameRead for ChannelReader {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>>> {
        Box::pin(async move { self.rx.recv().await.unwrap_or(Ok(None)) })
    }

    fn set_max_frame_size(&mut self, max: u64) -> Option<u64> {
        Some(self.max.swap(max, Ordering::Relaxed))
    }
}

/// Wakes the engine for one connection's queued frames; its drop (with the
/// last `FrameSender`) tells the engine this side is closed.
struct SendNotifier(u64);

impl Notify for SendNotifier {
    fn notify(&self) {
        if let Ok(e) = engine() {
            e.shared.ready.lock().unwrap().push(self.0);
            e.shared.wake_if_asleep();
        }
    }
}

impl Drop for SendNotifier {
    fn drop(&mut self) {
        self.notify();
    }
}

// ---------------------------------------------------------------- the engine handle

enum Cmd {
    Listen {
        addr: SocketAddr,
        incoming: mpsc::Sender<Connection>,
        handle: tokio::runtime::Handle,
        limits: Limits,
        reply: oneshot::Sender<Result<(u64, SocketAddr)>>,
    },
    StopListener(u64),
    Connect { addr: SocketAddr, peer: String, handle: tokio::runtime::Handle, limits: Limits, reply: oneshot::Sender<Result<Connection>> },
}

/// What other threads hand the engine: commands, and connections with
/// queued frames (or whose senders are all gone). A sender writes the
/// eventfd only when the engine sleeps: under load the engine is awake and
/// a frame costs a push, not a system call.
struct Shared {
    cmds: Mutex<Vec<Cmd>>,
    ready: Mutex<Vec<u64>>,
    asleep: AtomicBool,
    /// eventfd the engine sleeps on beside UCX's own.
    wake: i32,
}

impl Shared {
    fn wake_if_asleep(&self) {
        if self.asleep.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.wake, (&one as *const u64).cast(), 8) };
        }
    }

    fn has_work(&self) -> bool {
        !self.cmds.lock().unwrap().is_empty() || !self.ready.lock().unwrap().is_empty()
    }
}

struct Engine {
    shared: Arc<Shared>,
    version: String,
    /// The memory kinds connections carry (`State::carries`).
    carries: u8,
}

static ENGINE: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();

fn engine() -> Result<&'static Engine> {
    let engine = ENGINE.get_or_init(|| {
        if !sys::HEADERS {
            return Err("this rdask was built without UCX (no libucx-dev headers at build time)".into());
        }
        // SAFETY: eventfd has no preconditions; the fd lives as long as the process.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        let shared = Arc::new(Shared { cmds: Mutex::new(Vec::new()), ready: Mutex::new(Vec::new()), asleep: AtomicBool::new(false), wake });
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let theirs = shared.clone();
        let spawned = std::thread::Builder::new().name("rdask-ucx".into()).spawn(move || engine_thread(theirs, ready_tx));
        if let Err(e) = spawned {
            return Err(format!("cannot start the UCX thread: {e}"));
        }
        match ready_rx.recv() {
            Ok(Ok((version, carries))) => Ok(Engine { shared, version, carries }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the UCX thread ended during start-up".into()),
        }
    });
    engine.as_ref().map_err(|e| TransportError::Io(std::io::Error::new(std::io::ErrorKind::Unsupported, format!("UCX: {e}"))))
}

impl Engine {
    fn send(&self, cmd: Cmd) -> Result<()> {
        self.shared.cmds.lock().unwrap().push(cmd);
        self.shared.wake_if_asleep();
        Ok(())
    }
}

// ---------------------------------------------------------------- callbacks
//
// UCX calls these on the engine thread from inside its progress function.
// They only record what happened; the engine loop acts on it afterwards,
// holding its state mutably without aliasing.

enum Event {
    Hello { ep: usize, remote: u64 },
    Frame { conn: u64, seq: u64, prefix: Vec<u8>, data: Vec<u8> },
    Rndv { conn: u64, seq: u64, prefix: Vec<u8>, desc: usize, len: usize },
    /// A device frame whose payload waits for its receive (`desc`), or
    /// came with the message (`data`: eager, in host memory).
    Device { conn: u64, seq: u64, kind: u64, host: Vec<u8>, desc: usize, len: usize, data: Option<Vec<u8>> },
    /// `second`: the peer had our CLOSE when it sent its own.
    Close { conn: u64, seq: u64, second: bool },
    ConnRequest { listener: u64, request: usize },
    EpError { ep: usize, status: sys::ucs_status_t },
    SendDone { keep: usize, request: usize, status: sys::ucs_status_t },
    RecvDone { keep: usize, request: usize, status: sys::ucs_status_t },
    FlushDone { conn: u64, request: usize, status: sys::ucs_status_t },
}

thread_local! {
    static EVENTS: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
}

fn push(ev: Event) {
    EVENTS.with(|q| q.borrow_mut().push(ev));
}

unsafe extern "C" fn on_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    let param = &*param;
    let header = std::slice::from_raw_parts(header.cast::<u8>(), header_length);
    let word = |i: usize| u64::from_le_bytes(header[8 * i..8 * i + 8].try_into().unwrap());
    match arg as usize as u32 {
        AM_HELLO if header_length == 8 && param.recv_attr & sys::UCP_AM_RECV_ATTR_FIELD_REPLY_EP as u64 != 0 => {
            push(Event::Hello { ep: param.reply_ep as usize, remote: word(0) });
        }
        AM_CLOSE if header_length == 16 || header_length == 24 => {
            push(Event::Close { conn: word(0), seq: word(1), second: header_length == 24 && word(2) == 1 })
        }
        AM_FRAME if header_length >= 16 => {
            let (conn, seq) = (word(0), word(1));
            // The frame's first bytes when they travel in the header (see `send_am`).
            let prefix = header[16..].to_vec();
            if param.recv_attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
                // Kept until the engine posts the receive (or releases it).
                push(Event::Rndv { conn, seq, prefix, desc: data as usize, len: length });
                return sys::UCS_INPROGRESS as sys::ucs_status_t;
            }
            let bytes = if length == 0 { Vec::new() } else { std::slice::from_raw_parts(data.cast::<u8>(), length).to_vec() };
            push(Event::Frame { conn, seq, prefix, data: bytes });
        }
        AM_DEVICE if header_length >= 24 => {
            let (conn, seq, kind) = (word(0), word(1), word(2));
            let host = header[24..].to_vec();
            if param.recv_attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
                push(Event::Device { conn, seq, kind, host, desc: data as usize, len: length, data: None });
                return sys::UCS_INPROGRESS as sys::ucs_status_t;
            }
            // UCX may deliver a small payload with the message even when
            // rendezvous was asked for: it is host memory then.
            let bytes = if length == 0 { Vec::new() } else { std::slice::from_raw_parts(data.cast::<u8>(), length).to_vec() };
            push(Event::Device { conn, seq, kind, host, desc: 0, len: length, data: Some(bytes) });
        }
        id => tracing::warn!(id, header_length, "malformed UCX message; dropped"),
    }
    sys::UCS_OK as sys::ucs_status_t
}

unsafe extern "C" fn on_conn_request(request: sys::ucp_conn_request_h, arg: *mut c_void) {
    push(Event::ConnRequest { listener: arg as u64, request: request as usize });
}

unsafe extern "C" fn on_ep_error(_arg: *mut c_void, ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    push(Event::EpError { ep: ep as usize, status });
}

unsafe extern "C" fn on_send(request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    push(Event::SendDone { keep: user_data as usize, request: request as usize, status });
}

unsafe extern "C" fn on_recv(request: *mut c_void, status: sys::ucs_status_t, _length: usize, user_data: *mut c_void) {
    push(Event::RecvDone { keep: user_data as usize, request: request as usize, status });
}

unsafe extern "C" fn on_flush(request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    push(Event::FlushDone { conn: user_data as u64, request: request as usize, status });
}

fn status_text(lib: &sys::UcpLib, status: sys::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a static C string for any status.
    unsafe { CStr::from_ptr(lib.ucs_status_string(status)).to_string_lossy().into_owned() }
}

// ---------------------------------------------------------------- engine state

/// A frame being sent: the buffers UCX reads from, alive until it is done.
struct SendKeep {
    header: Vec<u8>,
    staging: Vec<u8>,
    iov: Vec<sys::ucp_dt_iov_t>,
    _frame: Option<Frame>,
    /// A device frame's connection: a failed send fails the connection (its
    /// receiver would wait for that sequence number forever).
    device_conn: Option<u64>,
}

/// A rendezvous receive in progress.
struct RecvKeep {
    conn: u64,
    seq: u64,
    prefix: Vec<u8>,
    /// Host memory received into (a frame's bytes, or a device payload
    /// that lands on the host).
    buf: Vec<u8>,
    len: usize,
    into: Into,
}

/// What a rendezvous receive fills.
enum Into {
    /// A frame's bytes after `prefix`.
    Frame,
    /// A device frame's payload (`prefix` is the frame's whole host part)
    /// in memory of its kind.
    Device(DevicePayload),
    /// A device frame's payload landing in host memory (`buf`).
    DeviceOnHost,
}

/// A rendezvous receive waiting its turn (`RNDV_IN_FLIGHT`); `device`: a
/// device frame's payload of that kind.
struct WaitingRndv {
    seq: u64,
    prefix: Vec<u8>,
    desc: usize,
    len: usize,
    device: Option<MemoryKind>,
}

enum Slot {
    Receiving,
    Ready(Result<Option<Frame>>),
}

struct Conn {
    ep: sys::ucp_ep_h,
    peer: String,
    inbound: mpsc::UnboundedSender<Result<Option<Frame>>>,
    outgoing: mpsc::UnboundedReceiver<Frame>,
    max: Arc<AtomicU64>,
    send_seq: u64,
    next_in: u64,
    arrived: BTreeMap<u64, Slot>,
    /// The reading side got its end (close or error).
    ended: bool,
    /// We sent CLOSE (all our senders are gone).
    closed_here: bool,
    /// The peer sent CLOSE.
    closed_there: bool,
    /// We wait for the peer to close its endpoint (`drain_outgoing`), since when.
    lingering: Option<Instant>,
    /// The peer's CLOSE said it had ours already (it lingers).
    peer_closed_second: bool,
    /// We accepted this connection (the side that lingers when both close
    /// at once).
    accepted: bool,
    connecting: Option<(oneshot::Sender<Result<Connection>>, Connection)>,
    /// The peer's id for this connection (its HELLO); frames wait for it.
    remote: Option<u64>,
    /// Bytes of rendezvous receives in progress, and the frames waiting
    /// their turn (sequence, prefix, UCX's descriptor, length).
    rndv_bytes: usize,
    rndv_waiting: std::collections::VecDeque<WaitingRndv>,
}

struct ListenerEntry {
    handle: sys::ucp_listener_h,
    incoming: mpsc::Sender<Connection>,
    runtime: tokio::runtime::Handle,
    limits: Limits,
}

struct State {
    lib: &'static sys::UcpLib,
    worker: sys::ucp_worker_h,
    next_id: u64,
    conns: HashMap<u64, Conn>,
    by_ep: HashMap<usize, u64>,
    listeners: HashMap<u64, ListenerEntry>,
    /// Endpoint closes UCX has not finished.
    closing: Vec<usize>,
    /// Most frame bytes sent in an active message's header.
    max_prefix: usize,
    id_key: std::collections::hash_map::RandomState,
    /// Which endpoints ask UCX for peer-failure handling.
    peer_errors: PeerErrors,
    /// Memory kinds connections carry as device payloads (`device::kind_bit`).
    carries: u8,
}

/// When endpoints use UCP_ERR_HANDLING_MODE_PEER (`RDASK_UCX_PEER_ERRORS`).
///
/// The mode costs bandwidth: UCX 1.13 then leaves out transports that cannot
/// detect a failed peer, among them `cma` (single-copy shared memory), and
/// moves rendezvous data between a node's processes over TCP. What the mode
/// adds is keepalive for peers that vanish without a word (a host or link
/// that goes down). A peer on the same host cannot vanish that way: when its
/// process dies the kernel closes its connection-manager socket, and UCX
/// reports the endpoint failed in either mode (`Connection reset by remote
/// peer`; a test kills a peer mid-transfer in both). So by default only
/// endpoints to other hosts ask for it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PeerErrors {
    /// Endpoints to other hosts (the default, `auto`).
    Remote,
    /// Every endpoint (`1`).
    Always,
    /// None (`0`): a vanished remote peer is noticed only by the layers
    /// above (heartbeats, timeouts).
    Never,
}

impl PeerErrors {
    fn from_env() -> PeerErrors {
        match std::env::var("RDASK_UCX_PEER_ERRORS").as_deref().map(str::trim) {
            Ok("1") | Ok("always") | Ok("yes") => PeerErrors::Always,
            Ok("0") | Ok("never") | Ok("no") => PeerErrors::Never,
            Ok("") | Ok("auto") | Err(_) => PeerErrors::Remote,
            Ok(other) => {
                tracing::warn!("RDASK_UCX_PEER_ERRORS={other:?} is not one of auto, 1, 0; using auto");
                PeerErrors::Remote
            }
        }
    }

    /// Whether an endpoint to `peer` asks for peer-failure handling.
    fn wanted(self, peer: Option<std::net::IpAddr>) -> bool {
        match self {
            PeerErrors::Always => true,
            PeerErrors::Never => false,
            PeerErrors::Remote => !peer.is_some_and(is_this_host),
        }
    }
}

/// Whether `ip` is an address of this machine (loopback or an interface's).
fn is_this_host(ip: std::net::IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    let ip = match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => return false,
        },
        v4 => v4,
    };
    ip.is_loopback() || crate::netif::interface_addresses().iter().any(|(_, a)| std::net::IpAddr::V4(*a) == ip)
}

fn engine_thread(shared: Arc<Shared>, ready: std_mpsc::Sender<std::result::Result<(String, u8), String>>) {
    let wake = shared.wake;
    let (mut st, efd) = match init() {
        Ok((st, efd, version)) => {
            let _ = ready.send(Ok((version, st.carries)));
            (st, efd)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut last_sweep = Instant::now();
    let mut last_busy = Instant::now();
    let spin = Duration::from_micros(std::env::var("RDASK_UCX_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(20));
    loop {
        let mut busy = false;
        let cmds = std::mem::take(&mut *shared.cmds.lock().unwrap());
        for cmd in cmds {
            busy = true;
            st.command(cmd);
        }
        let mut ready = std::mem::take(&mut *shared.ready.lock().unwrap());
        if !ready.is_empty() {
            busy = true;
            ready.sort_unstable();
            ready.dedup();
            for id in ready {
                st.drain_outgoing(id);
            }
        }
        loop {
            // SAFETY: the worker is ours and used on this thread only.
            let n = unsafe { st.lib.ucp_worker_progress(st.worker) };
            let events = EVENTS.with(|q| std::mem::take(&mut *q.borrow_mut()));
            if n == 0 && events.is_empty() {
                break;
            }
            busy = true;
            for ev in events {
                st.event(ev);
            }
        }
        st.finish_closes();
        if last_sweep.elapsed() > Duration::from_secs(1) {
            st.sweep();
            last_sweep = Instant::now();
        }
        if busy {
            last_busy = Instant::now();
            continue;
        }
        // Right after traffic the next message (a reply) usually follows
        // within microseconds: keep polling for `spin` before sleeping,
        // yielding the core between polls.
        if last_busy.elapsed() < spin {
            std::thread::yield_now();
            continue;
        }
        if efd < 0 {
            // No wake-up support in the transports UCX chose: poll gently.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        // From here senders write the eventfd; what they queued before is
        // seen by the check.
        shared.asleep.store(true, Ordering::SeqCst);
        if shared.has_work() {
            shared.asleep.store(false, Ordering::SeqCst);
            continue;
        }
        // SAFETY: as above.
        let armed = unsafe { st.lib.ucp_worker_arm(st.worker) };
        if armed == sys::UCS_ERR_BUSY as sys::ucs_status_t {
            shared.asleep.store(false, Ordering::SeqCst);
            continue;
        }
        let mut fds = [
            libc::pollfd { fd: efd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds; eventfd reads into a valid u64.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 2, 1000);
            shared.asleep.store(false, Ordering::SeqCst);
            let mut v: u64 = 0;
            libc::read(wake, (&mut v as *mut u64).cast(), 8);
        }
    }
}

/// UCP context and worker with active messages and wake-ups; the handlers.
fn init() -> std::result::Result<(State, i32, String), String> {
    let lib = sys::library()?;
    // SAFETY: plain UCP set-up calls with valid out-pointers; every struct is
    // zeroed and only the fields named in its field mask are read by UCX.
    unsafe {
        let mut config = ptr::null_mut();
        let s = lib.ucp_config_read(ptr::null(), ptr::null(), &mut config);
        if s != sys::UCS_OK as sys::ucs_status_t {
            return Err(format!("ucp_config_read: {} (check the UCX_* environment variables)", status_text(lib, s)));
        }
        // Shared memory between processes is used with peer-failure
        // handling only when UCX is told it may (UCX 1.13); without this,
        // endpoints that ask for it between a node's processes (a client
        // with `RDASK_UCX_PEER_ERRORS=1`, or one that judged our address
        // remote) talk over TCP. Only set when shared memory may be used
        // (else UCX warns).
        let peer_errors = PeerErrors::from_env();
        let tls = std::env::var("UCX_TLS").unwrap_or_default();
        let listed = |t: &&str| tls.trim_start_matches('^').split(',').any(|x| x.trim() == *t);
        // "^a,b" lists what UCX must not use.
        let shm_allowed = if tls.starts_with('^') { !["shm", "mm"].iter().any(listed) } else { tls.is_empty() || ["all", "shm", "mm", "sysv", "posix"].iter().any(listed) };
        if peer_errors != PeerErrors::Never && shm_allowed && std::env::var_os("UCX_MM_ERROR_HANDLING").is_none() {
            let _ = lib.ucp_config_modify(config, c"MM_ERROR_HANDLING".as_ptr(), c"y".as_ptr());
        }
        let mut params: sys::ucp_params_t = std::mem::zeroed();
        params.field_mask = (sys::UCP_PARAM_FIELD_FEATURES) as u64;
        params.features = (sys::UCP_FEATURE_AM | if std::env::var_os("RDASK_UCX_NO_WAKEUP").is_some() { 0 } else { sys::UCP_FEATURE_WAKEUP }) as u64;
        let mut context = ptr::null_mut();
        let s = lib.ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &params, config, &mut context);
        lib.ucp_config_release(config);
        if s != sys::UCS_OK as sys::ucs_status_t {
            return Err(format!("ucp_init: {} (UCX_TLS={:?})", status_text(lib, s), std::env::var("UCX_TLS").unwrap_or_default()));
        }
        let mut wparams: sys::ucp_worker_params_t = std::mem::zeroed();
        wparams.field_mask = sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        wparams.thread_mode = sys::UCS_THREAD_MODE_SINGLE;
        let mut worker = ptr::null_mut();
        let s = lib.ucp_worker_create(context, &wparams, &mut worker);
        if s != sys::UCS_OK as sys::ucs_status_t {
            return Err(format!("ucp_worker_create: {}", status_text(lib, s)));
        }
        for id in [AM_FRAME, AM_CLOSE, AM_HELLO, AM_DEVICE] {
            let mut h: sys::ucp_am_handler_param_t = std::mem::zeroed();
            h.field_mask = (sys::UCP_AM_HANDLER_PARAM_FIELD_ID
                | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
                | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG
                | sys::UCP_AM_HANDLER_PARAM_FIELD_FLAGS) as u64;
            h.id = id;
            h.flags = sys::UCP_AM_FLAG_WHOLE_MSG;
            h.cb = Some(on_am);
            h.arg = id as usize as *mut c_void;
            let s = lib.ucp_worker_set_am_recv_handler(worker, &h);
            if s != sys::UCS_OK as sys::ucs_status_t {
                return Err(format!("ucp_worker_set_am_recv_handler: {}", status_text(lib, s)));
            }
        }
        let mut efd = -1;
        if lib.ucp_worker_get_efd(worker, &mut efd) != sys::UCS_OK as sys::ucs_status_t {
            tracing::info!("UCX gives no event fd with these transports; the UCX thread polls every 200 µs when idle");
            efd = -1;
        }
        let (mut major, mut minor, mut release) = (0, 0, 0);
        lib.ucp_get_version(&mut major, &mut minor, &mut release);
        let version = format!("{major}.{minor}.{release}");
        tracing::debug!(%version, "UCX started");
        let mut attr: sys::ucp_worker_attr_t = std::mem::zeroed();
        attr.field_mask = sys::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER as u64;
        let max_prefix = if ok(lib.ucp_worker_query(worker, &mut attr)) { attr.max_am_header.saturating_sub(16).min(4096) } else { 0 };
        let carries = memory_kinds(lib, context, max_prefix);
        tracing::debug!(%version, carries, "UCX memory kinds for device frames (bit 0 host, bit 1 CUDA)");
        let st = State { lib, worker, next_id: 1, conns: HashMap::new(), by_ep: HashMap::new(), listeners: HashMap::new(), closing: Vec::new(), max_prefix, id_key: Default::default(), peer_errors, carries };
        Ok((st, efd, version))
    }
}

/// The memory kinds this UCX moves as device payloads: host memory always,
/// CUDA memory where the build has CUDA transports (Debian's libucx has
/// none; UCX from the `libucx-cu12` wheels does). None when a device
/// frame's host part would not fit an active message's header.
/// `RDASK_UCX_DEVICE_FRAMES=0` turns them off.
///
/// # Safety
/// `context` must be a live UCP context.
unsafe fn memory_kinds(lib: &sys::UcpLib, context: sys::ucp_context_h, max_prefix: usize) -> u8 {
    if max_prefix < DEVICE_FRAME_HOST_MAX + 8 || std::env::var("RDASK_UCX_DEVICE_FRAMES").is_ok_and(|v| v.trim() == "0") {
        return 0;
    }
    let mut kinds = crate::device::kind_bit(MemoryKind::Host);
    let mut attr: sys::ucp_context_attr = std::mem::zeroed();
    attr.field_mask = sys::UCP_ATTR_FIELD_MEMORY_TYPES as u64;
    if ok(lib.ucp_context_query(context, &mut attr)) && attr.memory_types & (1 << sys::UCS_MEMORY_TYPE_CUDA) != 0 {
        kinds |= crate::device::kind_bit(MemoryKind::Cuda);
    }
    kinds
}

fn ucs_memory_type(kind: MemoryKind) -> sys::ucs_memory_type_t {
    match kind {
        MemoryKind::Host => sys::UCS_MEMORY_TYPE_HOST,
        MemoryKind::Cuda => sys::UCS_MEMORY_TYPE_CUDA,
    }
}

/// An active-message header: the receiver's connection id and a sequence number.
fn header(conn: u64, seq: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&conn.to_le_bytes());
    h.extend_from_slice(&seq.to_le_bytes());
    h
}

fn connect_error(lib: &sys::UcpLib, peer: &str, status: sys::ucs_status_t) -> TransportError {
    io_error(lib, std::io::ErrorKind::ConnectionRefused, format!("cannot connect to {peer}: connection refused or unreachable; UCX says"), status)
}

fn io_error(lib: &sys::UcpLib, kind: std::io::ErrorKind, what: String, status: sys::ucs_status_t) -> TransportError {
    TransportError::Io(std::io::Error::new(kind, format!("{what}: {}", status_text(lib, status))))
}

fn ok(s: sys::ucs_status_t) -> bool {
    s == sys::UCS_OK as sys::ucs_status_t
}

impl State {
    /// A connection id the peer cannot guess from the ones it was told
    /// (frames name their connection by it).
    fn new_id(&mut self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        loop {
            self.next_id += 1;
            let mut h = self.id_key.build_hasher();
            h.write_u64(self.next_id);
            let id = h.finish();
            if id != 0 && !self.conns.contains_key(&id) && !self.listeners.contains_key(&id) {
                return id;
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Listen { addr, incoming, handle, limits, reply } => {
                let _ = reply.send(self.listen(addr, incoming, handle, limits));
            }
            Cmd::StopListener(id) => {
                if let Some(l) = self.listeners.remove(&id) {
                    // SAFETY: a listener we created and destroy once.
                    unsafe { self.lib.ucp_listener_destroy(l.handle) };
                }
            }
            Cmd::Connect { addr, peer, handle, limits, reply } => self.connect(addr, peer, handle, limits, reply),
        }
    }

    fn listen(&mut self, addr: SocketAddr, incoming: mpsc::Sender<Connection>, runtime: tokio::runtime::Handle, limits: Limits) -> Result<(u64, SocketAddr)> {
        let id = self.new_id();
        let (storage, len) = to_sockaddr(addr);
        // SAFETY: the sockaddr outlives the call (UCX copies it); the
        // callback's argument is the listener id, not a pointer.
        unsafe {
            let mut p: sys::ucp_listener_params_t = std::mem::zeroed();
            p.field_mask = (sys::UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | sys::UCP_LISTENER_PARAM_FIELD_CONN_HANDLER) as u64;
            p.sockaddr.addr = (&storage as *const libc::sockaddr_storage).cast();
            p.sockaddr.addrlen = len;
            p.conn_handler.cb = Some(on_conn_request);
            p.conn_handler.arg = id as usize as *mut c_void;
            let mut handle = ptr::null_mut();
            let s = self.lib.ucp_listener_create(self.worker, &p, &mut handle);
            if !ok(s) {
                let kind = if s == sys::UCS_ERR_BUSY as sys::ucs_status_t { std::io::ErrorKind::AddrInUse } else { std::io::ErrorKind::Other };
                return Err(io_error(self.lib, kind, format!("cannot listen on ucx://{addr}"), s));
            }
            let mut attr: sys::ucp_listener_attr_t = std::mem::zeroed();
            attr.field_mask = sys::UCP_LISTENER_ATTR_FIELD_SOCKADDR as u64;
            let bound = if ok(self.lib.ucp_listener_query(handle, &mut attr)) {
                from_sockaddr((&attr.sockaddr as *const sys::sockaddr_storage).cast()).unwrap_or(addr)
            } else {
                addr
            };
            self.listeners.insert(id, ListenerEntry { handle, incoming, runtime, limits });
            Ok((id, bound))
        }
    }

    /// A new endpoint for `ep_params` (plus the error handler), or UCX's
    /// status. `connecting_to`: the peer this side connects to, which
    /// decides the failure-handling mode; an accepted endpoint takes the
    /// mode its client chose (UCX refuses an endpoint whose two sides ask
    /// for different modes, and the two may judge "this host" differently:
    /// NAT, addresses bound by a proxy, different settings).
    fn create_ep(&self, params: &mut sys::ucp_ep_params_t, connecting_to: Option<std::net::IpAddr>) -> std::result::Result<sys::ucp_ep_h, sys::ucs_status_t> {
        params.field_mask |= sys::UCP_EP_PARAM_FIELD_ERR_HANDLER as u64;
        if let Some(peer) = connecting_to {
            let wanted = self.peer_errors.wanted(Some(peer));
            tracing::debug!(%peer, peer_failure_handling = wanted, "UCX endpoint");
            params.field_mask |= sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE as u64;
            params.err_mode = if wanted { sys::UCP_ERR_HANDLING_MODE_PEER } else { sys::UCP_ERR_HANDLING_MODE_NONE };
        }
        params.err_handler.cb = Some(on_ep_error);
        params.err_handler.arg = ptr::null_mut();
        let mut ep = ptr::null_mut();
        // SAFETY: valid worker and params; `ep` is an out-pointer.
        let s = unsafe { self.lib.ucp_ep_create(self.worker, params, &mut ep) };
        if ok(s) {
            Ok(ep)
        } else {
            Err(s)
        }
    }

    /// A connection on `ep`: the reading half goes up, the engine keeps the rest.
    fn add_conn(&mut self, ep: sys::ucp_ep_h, peer: String, runtime: &tokio::runtime::Handle, limits: Limits, accepted: bool) -> (u64, Connection) {
        let id = self.new_id();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let max = Arc::new(AtomicU64::new(limits.max_frame_size));
        let _enter = runtime.enter();
        let connection = Connection {
            sender: FrameSender::with_notify(out_tx, limits, Arc::new(SendNotifier(id))).carrying(self.carries),
            receiver: Box::new(ChannelReader { rx: in_rx, max: max.clone() }),
            peer: peer.clone(),
        };
        self.conns.insert(
            id,
            Conn {
                ep,
                peer,
                inbound: in_tx,
                outgoing: out_rx,
                max,
                send_seq: 0,
                next_in: 0,
                arrived: BTreeMap::new(),
                ended: false,
                closed_here: false,
                closed_there: false,
                lingering: None,
                peer_closed_second: false,
                accepted,
                connecting: None,
                remote: None,
                rndv_bytes: 0,
                rndv_waiting: Default::default(),
            },
        );
        self.by_ep.insert(ep as usize, id);
        // UCX holds it until the endpoint is wired up.
        self.send_am(ep, AM_HELLO, id.to_le_bytes().to_vec(), None, false);
        (id, connection)
    }

    fn connect(&mut self, addr: SocketAddr, peer: String, runtime: tokio::runtime::Handle, limits: Limits, reply: oneshot::Sender<Result<Connection>>) {
        let (storage, len) = to_sockaddr(addr);
        // SAFETY: zeroed params with the fields named in the mask set; the
        // sockaddr outlives the call.
        let ep = unsafe {
            let mut p: sys::ucp_ep_params_t = std::mem::zeroed();
            p.field_mask = (sys::UCP_EP_PARAM_FIELD_SOCK_ADDR | sys::UCP_EP_PARAM_FIELD_FLAGS) as u64;
            p.flags = sys::UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
            p.sockaddr.addr = (&storage as *const libc::sockaddr_storage).cast();
            p.sockaddr.addrlen = len;
            self.create_ep(&mut p, Some(addr.ip()))
        };
        let ep = match ep {
            Ok(ep) => ep,
            Err(s) => {
                let _ = reply.send(Err(connect_error(self.lib, &peer, s)));
                return;
            }
        };
        let (id, connection) = self.add_conn(ep, peer, &runtime, limits, false);
        // The connection is handed out once the endpoint is wired up (a
        // flush completes then), or fails with the endpoint's error.
        // SAFETY: a live endpoint; the callback's user data is the conn id.
        let request = unsafe {
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA;
            p.cb.send = Some(on_flush);
            p.user_data = id as usize as *mut c_void;
            self.lib.ucp_ep_flush_nbx(ep, &p)
        };
        let status = sys::ptr_status(request);
        if status == sys::UCS_INPROGRESS as sys::ucs_status_t {
            if let Some(c) = self.conns.get_mut(&id) {
                c.connecting = Some((reply, connection));
            }
        } else if ok(status) {
            let _ = reply.send(Ok(connection));
        } else {
            let _ = reply.send(Err(connect_error(self.lib, &connection.peer, status)));
            self.destroy(id, true);
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Hello { ep, remote } => {
                let Some(&id) = self.by_ep.get(&ep) else { return };
                let Some(c) = self.conns.get_mut(&id) else { return };
                c.remote = Some(remote);
                // Frames queued meanwhile go out now.
                self.drain_outgoing(id);
            }
            Event::Frame { conn: id, seq, prefix, data } => {
                let Some(c) = self.conns.get_mut(&id) else { return };
                let item = parse(Bytes::from(prefix), Bytes::from(data), c.max.load(Ordering::Relaxed)).map(Some);
                c.arrived.insert(seq, Slot::Ready(item));
                self.deliver(id);
            }
            Event::Rndv { conn, seq, prefix, desc, len } => self.rendezvous(conn, seq, prefix, desc as *mut c_void, len),
            Event::Device { conn, seq, kind, host, desc, len, data } => self.device_frame(conn, seq, kind, host, desc as *mut c_void, len, data),
            Event::Close { conn: id, seq, second } => {
                let Some(c) = self.conns.get_mut(&id) else { return };
                c.peer_closed_second = second;
                c.arrived.insert(seq, Slot::Ready(Ok(None)));
                self.deliver(id);
            }
            Event::ConnRequest { listener, request } => self.accept(listener, request as sys::ucp_conn_request_h),
            Event::EpError { ep, status } => {
                let Some(&id) = self.by_ep.get(&ep) else { return };
                let Some(c) = self.conns.get_mut(&id) else { return };
                if let Some((reply, _)) = c.connecting.take() {
                    let e = connect_error(self.lib, &c.peer, status);
                    let _ = reply.send(Err(e));
                } else if !c.ended {
                    let e = io_error(self.lib, std::io::ErrorKind::ConnectionReset, format!("UCX connection to {} failed", c.peer), status);
                    tracing::debug!(peer = %c.peer, "{e}");
                    let _ = c.inbound.send(Err(e));
                }
                self.destroy(id, true);
            }
            Event::SendDone { keep, request, status } => {
                // SAFETY: `keep` came from Box::into_raw in `send_frame` and
                // is given back exactly once; the request is UCX's to free.
                let keep = unsafe {
                    self.lib.ucp_request_free(request as *mut c_void);
                    Box::from_raw(keep as *mut SendKeep)
                };
                if !ok(status) {
                    tracing::debug!("UCX send failed: {}", status_text(self.lib, status));
                    if let Some(id) = keep.device_conn {
                        let e = io_error(self.lib, std::io::ErrorKind::Other, "sending device memory over UCX failed".into(), status);
                        self.fail(id, e);
                    }
                }
            }
            Event::RecvDone { keep, request, status } => {
                // SAFETY: as for SendDone, from `rendezvous`.
                let keep = unsafe {
                    self.lib.ucp_request_free(request as *mut c_void);
                    Box::from_raw(keep as *mut RecvKeep)
                };
                self.received(*keep, status);
            }
            Event::FlushDone { conn, request, status } => {
                // SAFETY: a request UCX handed to our callback.
                unsafe { self.lib.ucp_request_free(request as *mut c_void) };
                let Some(c) = self.conns.get_mut(&conn) else { return };
                let Some((reply, connection)) = c.connecting.take() else { return };
                if ok(status) {
                    let _ = reply.send(Ok(connection));
                    // Frames queued meanwhile go out now.
                    self.drain_outgoing(conn);
                } else {
                    let e = connect_error(self.lib, &connection.peer, status);
                    let _ = reply.send(Err(e));
                    self.destroy(conn, true);
                }
            }
        }
    }

    fn accept(&mut self, listener: u64, request: sys::ucp_conn_request_h) {
        let Some(l) = self.listeners.get(&listener) else {
            // The listener was stopped meanwhile: a request nobody takes is
            // rejected, so the peer hears at once.
            return;
        };
        let (incoming, runtime, limits, lh) = (l.incoming.clone(), l.runtime.clone(), l.limits, l.handle);
        // SAFETY: a connection request UCX handed us, used once.
        let client = unsafe {
            let mut attr: sys::ucp_conn_request_attr_t = std::mem::zeroed();
            attr.field_mask = sys::UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR as u64;
            if ok(self.lib.ucp_conn_request_query(request, &mut attr)) {
                from_sockaddr((&attr.client_address as *const sys::sockaddr_storage).cast())
            } else {
                None
            }
        };
        let peer = client.map_or_else(|| "ucx://(unknown)".into(), |a| format!("ucx://{a}"));
        if incoming.capacity() == 0 || incoming.is_closed() {
            tracing::warn!(%peer, "UCX listener queue full or closed; refusing a connection");
            // SAFETY: as above.
            unsafe { self.lib.ucp_listener_reject(lh, request) };
            return;
        }
        // SAFETY: zeroed params with the conn request named in the mask.
        let ep = unsafe {
            let mut p: sys::ucp_ep_params_t = std::mem::zeroed();
            p.field_mask = sys::UCP_EP_PARAM_FIELD_CONN_REQUEST as u64;
            p.conn_request = request;
            self.create_ep(&mut p, None)
        };
        match ep {
            Ok(ep) => {
                let (id, connection) = self.add_conn(ep, peer, &runtime, limits, true);
                if incoming.try_send(connection).is_err() {
                    self.destroy(id, true);
                }
            }
            Err(s) => tracing::warn!(%peer, "cannot accept a UCX connection: {}", status_text(self.lib, s)),
        }
    }

    fn rendezvous(&mut self, id: u64, seq: u64, prefix: Vec<u8>, desc: *mut c_void, len: usize) {
        let release = |st: &State| {
            // SAFETY: a descriptor UCX gave our handler, released once.
            unsafe { st.lib.ucp_am_data_release(st.worker, desc) };
        };
        let Some(c) = self.conns.get_mut(&id) else { return release(self) };
        let max = c.max.load(Ordering::Relaxed);
        if c.ended || (len + prefix.len()) as u64 > max {
            if !c.ended {
                c.arrived.insert(seq, Slot::Ready(Err(TransportError::FrameTooLarge { size: (len + prefix.len()) as u64, max })));
                self.deliver(id);
            }
            return release(self);
        }
        c.arrived.insert(seq, Slot::Receiving);
        // Large frames are received a few at a time (as TCP reads them one
        // after another): a peer that queues ten 1 GiB frames does not make
        // this process allocate 10 GiB at once, and buffers get reused.
        if c.rndv_bytes > 0 && c.rndv_bytes + len > RNDV_IN_FLIGHT {
            c.rndv_waiting.push_back(WaitingRndv { seq, prefix, desc: desc as usize, len, device: None });
            return;
        }
        self.post_rndv(id, seq, prefix, desc, len);
    }

    fn post_rndv(&mut self, id: u64, seq: u64, prefix: Vec<u8>, desc: *mut c_void, len: usize) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        c.rndv_bytes += len;
        // Large values land in reused memory when there is some.
        let mut buf = crate::bufpool::take(len, crate::bufpool::advise_huge_pages_vec);
        // SAFETY: UCX writes all `len` bytes before the buffer is read
        // (completion is checked in `received`).
        unsafe { buf.set_len(len) };
        let keep = Box::into_raw(Box::new(RecvKeep { conn: id, seq, prefix, buf, len, into: Into::Frame }));
        // SAFETY: the buffer lives in `keep` until the receive completes.
        let request = unsafe {
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA | sys::UCP_OP_ATTR_FIELD_DATATYPE;
            p.cb.recv_am = Some(on_recv);
            p.user_data = keep.cast();
            p.datatype = sys::dt_bytes();
            self.lib.ucp_am_recv_data_nbx(self.worker, desc, (*keep).buf.as_mut_ptr().cast(), len, &p)
        };
        let status = sys::ptr_status(request);
        if status != sys::UCS_INPROGRESS as sys::ucs_status_t {
            // SAFETY: completed at once (or failed): no callback will come.
            let keep = unsafe { Box::from_raw(keep) };
            self.received(*keep, status);
        }
    }

    fn received(&mut self, keep: RecvKeep, status: sys::ucs_status_t) {
        let Some(c) = self.conns.get_mut(&keep.conn) else { return };
        c.rndv_bytes -= keep.len;
        loop {
            let Some(c) = self.conns.get_mut(&keep.conn) else { return };
            let Some(next) = c.rndv_waiting.front() else { break };
            if c.rndv_bytes > 0 && c.rndv_bytes + next.len > RNDV_IN_FLIGHT {
                break;
            }
            let w = c.rndv_waiting.pop_front().unwrap();
            match w.device {
                None => self.post_rndv(keep.conn, w.seq, w.prefix, w.desc as *mut c_void, w.len),
                Some(kind) => self.post_device(keep.conn, w.seq, w.prefix, w.desc as *mut c_void, w.len, kind),
            }
        }
        let Some(c) = self.conns.get_mut(&keep.conn) else { return };
        let max = c.max.load(Ordering::Relaxed);
        let item = if !ok(status) {
            Err(TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!("UCX receive from {} failed: {}", c.peer, status_text(self.lib, status)),
            )))
        } else {
            let with = |payload: DevicePayload| move |f: Frame| Some(Frame { device: Some(payload), ..f });
            match keep.into {
                Into::Frame => parse(Bytes::from(keep.prefix), crate::bufpool::into_bytes(keep.buf), max).map(Some),
                Into::Device(payload) => parse(Bytes::from(keep.prefix), Bytes::new(), max).map(with(payload)),
                Into::DeviceOnHost => {
                    let payload = DevicePayload::host(crate::bufpool::into_bytes(keep.buf));
                    parse(Bytes::from(keep.prefix), Bytes::new(), max).map(with(payload))
                }
            }
        };
        c.arrived.insert(keep.seq, Slot::Ready(item));
        self.deliver(keep.conn);
    }

    /// Ends connection `id` with `e` on its reading side.
    fn fail(&mut self, id: u64, e: TransportError) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if !c.ended {
            c.ended = true;
            let _ = c.inbound.send(Err(e));
        }
        self.destroy(id, true);
    }

    /// Hands up, in order, every frame whose turn has come.
    fn deliver(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        while let Some(Slot::Ready(_)) = c.arrived.get(&c.next_in) {
            let Some(Slot::Ready(item)) = c.arrived.remove(&c.next_in) else { unreachable!() };
            c.next_in += 1;
            if c.ended {
                continue;
            }
            match item {
                Ok(Some(frame)) => {
                    let _ = c.inbound.send(Ok(Some(frame)));
                }
                Ok(None) => {
                    c.closed_there = true;
                    c.ended = true;
                    let _ = c.inbound.send(Ok(None));
                }
                Err(e) => {
                    c.ended = true;
                    let _ = c.inbound.send(Err(e));
                }
            }
        }
        if c.ended && !c.closed_there {
            // A bad frame: the connection is unusable, as on TCP.
            self.destroy(id, true);
        } else if c.closed_here && c.closed_there {
            // We closed first, or both at once. Of two sides closing their
            // endpoints at the same time one flush fails against the other's
            // vanished endpoint (UCX logs it as an error): the side that
            // closed second lingers (`drain_outgoing`), and of two that
            // closed at once the accepting one.
            if c.peer_closed_second || !c.accepted {
                self.destroy(id, false);
            } else if c.lingering.is_none() {
                c.lingering = Some(Instant::now());
            }
        }
    }

    /// Sends what is queued on connection `id`; CLOSE once its senders are gone.
    fn drain_outgoing(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if c.connecting.is_some() || c.closed_here {
            return;
        }
        let Some(remote) = c.remote else { return };
        let mut frames = Vec::new();
        let gone = loop {
            match c.outgoing.try_recv() {
                Ok(f) => frames.push(f),
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        let ep = c.ep;
        for frame in frames {
            let seq = self.conns.get_mut(&id).map(|c| {
                c.send_seq += 1;
                c.send_seq - 1
            });
            match seq {
                Some(seq) if frame.device.is_some() => self.send_device(id, ep, header(remote, seq), frame),
                Some(seq) => self.send_am(ep, AM_FRAME, header(remote, seq), Some(frame), true),
                None => {}
            }
        }
        if gone {
            let Some(c) = self.conns.get_mut(&id) else { return };
            c.closed_here = true;
            let seq = c.send_seq;
            c.send_seq += 1;
            let (second, reader_gone, accepted) = (c.closed_there, c.inbound.is_closed(), c.accepted);
            if second {
                // The peer closed first and closes its endpoint (flushing)
                // when our CLOSE arrives. Closing ours at the same time
                // makes one of the two flushes fail against a vanished
                // endpoint (UCX logs it as an error): wait for the peer's
                // endpoint to go instead (an endpoint error here), or a
                // few seconds.
                c.lingering = Some(Instant::now());
            }
            let mut close = header(remote, seq);
            close.extend_from_slice(&u64::from(second).to_le_bytes());
            self.send_am(ep, AM_CLOSE, close, None, true);
            if reader_gone && !second {
                // Nothing more will be read; the peer may be closing at this
                // very moment: the accepting side lingers (as in `deliver`).
                match self.conns.get_mut(&id) {
                    Some(c) if accepted => c.lingering = Some(Instant::now()),
                    _ => self.destroy(id, false),
                }
            }
        }
    }

    /// Sends one active message: the frame's wire layout as an iov.
    fn send_am(&mut self, ep: sys::ucp_ep_h, am: u32, header: Vec<u8>, frame: Option<Frame>, may_prefix: bool) {
        let mut keep = Box::new(SendKeep { header, staging: Vec::new(), iov: Vec::new(), _frame: None, device_conn: None });
        if let Some(frame) = &frame {
            // (start, end) in staging, or a borrowed slice.
            enum Piece {
                Staged(usize, usize),
                Own(*const u8, usize),
            }
            let mut pieces: Vec<Piece> = Vec::new();
            let staging = &mut keep.staging;
            let mut stage_from = 0;
            frame.encode_header(staging);
            for part in std::iter::once(&frame.control[..]).chain(frame.data.iter().map(|d| &d[..])) {
                if part.len() < COPY_BELOW {
                    staging.extend_from_slice(part);
                } else {
                    if staging.len() > stage_from {
                        pieces.push(Piece::Staged(stage_from, staging.len()));
                    }
                    stage_from = staging.len();
                    pieces.push(Piece::Own(part.as_ptr(), part.len()));
                }
            }
            if staging.len() > stage_from {
                pieces.push(Piece::Staged(stage_from, staging.len()));
            }
            // The first staged bytes (header, length table, control and the
            // small values) ride in the active message's header when they
            // fit: the rest is then often one contiguous buffer, which UCX
            // can move zero-copy by rendezvous.
            // Only before a large remainder (sure to go by rendezvous, where
            // a contiguous buffer is what UCX moves without copying); other
            // frames keep the plain layout.
            let rest: usize = pieces
                .iter()
                .skip(1)
                .map(|p| match *p {
                    Piece::Staged(s, e) => e - s,
                    Piece::Own(_, len) => len,
                })
                .sum();
            if let (Some(&Piece::Staged(0, e)), true) = (pieces.first(), may_prefix && rest >= PREFIX_MIN_REST) {
                if e <= self.max_prefix {
                    keep.header.extend_from_slice(&staging[..e]);
                    pieces.remove(0);
                }
            }
            let base = keep.staging.as_ptr();
            keep.iov = pieces
                .iter()
                .map(|p| match *p {
                    // SAFETY: offsets within `staging`, which is not touched again.
                    Piece::Staged(s, e) => sys::ucp_dt_iov_t { buffer: unsafe { base.add(s) } as *mut c_void, length: e - s },
                    Piece::Own(ptr, len) => sys::ucp_dt_iov_t { buffer: ptr as *mut c_void, length: len },
                })
                .collect();
        }
        keep._frame = frame;
        let keep = Box::into_raw(keep);
        // SAFETY: every buffer the message reads (header, staging, the
        // frame's own data, the iov array) lives in `keep` until UCX says the
        // send is done (SendDone) or it completed at once (below).
        let request = unsafe {
            let k = &*keep;
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA | sys::UCP_OP_ATTR_FIELD_FLAGS | sys::UCP_OP_ATTR_FIELD_DATATYPE;
            p.flags = if am == AM_HELLO { sys::UCP_AM_SEND_FLAG_REPLY } else { 0 };
            p.cb.send = Some(on_send);
            p.user_data = keep.cast();
            let (buffer, count) = if k.iov.is_empty() {
                p.datatype = sys::dt_bytes();
                (ptr::null(), 0)
            } else if k.iov.len() == 1 {
                p.datatype = sys::dt_bytes();
                (k.iov[0].buffer as *const c_void, k.iov[0].length)
            } else {
                p.datatype = sys::dt_iov();
                (k.iov.as_ptr() as *const c_void, k.iov.len())
            };
            self.lib.ucp_am_send_nbx(ep, am, k.header.as_ptr().cast(), k.header.len(), buffer, count, &p)
        };
        let status = sys::ptr_status(request);
        if status != sys::UCS_INPROGRESS as sys::ucs_status_t {
            // SAFETY: done (or failed) at once: no callback will come.
            drop(unsafe { Box::from_raw(keep) });
            if !ok(status) {
                tracing::debug!("UCX send failed: {}", status_text(self.lib, status));
            }
        }
    }

    /// Sends a frame with a device payload: its host part in the message
    /// header, the payload by rendezvous straight from its memory (the
    /// sender checked the host part's size and that this UCX carries the
    /// kind: `FrameSender::send`).
    fn send_device(&mut self, id: u64, ep: sys::ucp_ep_h, mut header: Vec<u8>, frame: Frame) {
        let payload = frame.device.clone().expect("a device frame");
        crate::device::prepare_thread(payload.kind());
        header.extend_from_slice(&(payload.kind() as u64).to_le_bytes());
        frame.encode_header(&mut header);
        header.extend_from_slice(&frame.control);
        for d in &frame.data {
            header.extend_from_slice(d);
        }
        let keep = Box::into_raw(Box::new(SendKeep { header, staging: Vec::new(), iov: Vec::new(), _frame: Some(frame), device_conn: Some(id) }));
        // SAFETY: the header lives in `keep`, the payload's memory with its
        // owner in `keep`'s frame, until UCX says the send is done.
        let request = unsafe {
            let k = &*keep;
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK
                | sys::UCP_OP_ATTR_FIELD_USER_DATA
                | sys::UCP_OP_ATTR_FIELD_FLAGS
                | sys::UCP_OP_ATTR_FIELD_DATATYPE
                | sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
            p.flags = sys::UCP_AM_SEND_FLAG_RNDV;
            p.cb.send = Some(on_send);
            p.user_data = keep.cast();
            p.datatype = sys::dt_bytes();
            p.memory_type = ucs_memory_type(payload.kind());
            self.lib.ucp_am_send_nbx(ep, AM_DEVICE, k.header.as_ptr().cast(), k.header.len(), payload.address() as *const c_void, payload.len(), &p)
        };
        let status = sys::ptr_status(request);
        if status != sys::UCS_INPROGRESS as sys::ucs_status_t {
            // SAFETY: done (or failed) at once: no callback will come.
            drop(unsafe { Box::from_raw(keep) });
            if !ok(status) {
                let e = io_error(self.lib, std::io::ErrorKind::Other, "sending device memory over UCX failed".into(), status);
                tracing::debug!("{e}");
                self.fail(id, e);
            }
        }
    }

    /// A device frame arrived: its payload is received into memory of its
    /// kind (the process's allocator), or into host memory where there is
    /// none (or no room), which the receiver then copies in.
    #[allow(clippy::too_many_arguments)]
    fn device_frame(&mut self, id: u64, seq: u64, kind: u64, host: Vec<u8>, desc: *mut c_void, len: usize, data: Option<Vec<u8>>) {
        let release = |st: &State| {
            if data.is_none() {
                // SAFETY: a descriptor UCX gave our handler, released once.
                unsafe { st.lib.ucp_am_data_release(st.worker, desc) };
            }
        };
        let carries = self.carries;
        let Some(c) = self.conns.get_mut(&id) else { return release(self) };
        let max = c.max.load(Ordering::Relaxed);
        // Only kinds this side said it carries: memory of another kind is
        // not for this UCX (or this process) to receive.
        let known = u8::try_from(kind).ok().and_then(MemoryKind::from_code).filter(|k| carries & crate::device::kind_bit(*k) != 0);
        let bad = match known {
            _ if (len + host.len()) as u64 > max => Some(TransportError::FrameTooLarge { size: (len + host.len()) as u64, max }),
            None => Some(TransportError::Malformed(format!("a device frame of memory kind {kind}, which this connection does not carry"))),
            Some(_) if len == 0 => Some(TransportError::Malformed("a device frame without a payload".into())),
            Some(_) => None,
        };
        let Some(kind) = known.filter(|_| !c.ended && bad.is_none()) else {
            if let (false, Some(e)) = (c.ended, bad) {
                c.arrived.insert(seq, Slot::Ready(Err(e)));
                self.deliver(id);
            }
            return release(self);
        };
        if let Some(bytes) = data {
            let item = parse(Bytes::from(host), Bytes::new(), max).map(|f| Some(Frame { device: Some(DevicePayload::host(Bytes::from(bytes))), ..f }));
            c.arrived.insert(seq, Slot::Ready(item));
            return self.deliver(id);
        }
        c.arrived.insert(seq, Slot::Receiving);
        // Received a few at a time, as large frames are (`rendezvous`).
        if c.rndv_bytes > 0 && c.rndv_bytes + len > RNDV_IN_FLIGHT {
            c.rndv_waiting.push_back(WaitingRndv { seq, prefix: host, desc: desc as usize, len, device: Some(kind) });
            return;
        }
        self.post_device(id, seq, host, desc, len, kind);
    }

    fn post_device(&mut self, id: u64, seq: u64, host: Vec<u8>, desc: *mut c_void, len: usize, kind: MemoryKind) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        c.rndv_bytes += len;
        let (into, mut buf, address, memory_type) = match crate::device::alloc_for_arrival(kind, len) {
            Some(p) => {
                let address = p.address();
                (Into::Device(p), Vec::new(), address, ucs_memory_type(kind))
            }
            None => {
                let mut buf = crate::bufpool::take(len, crate::bufpool::advise_huge_pages_vec);
                // SAFETY: UCX writes all `len` bytes before they are read.
                unsafe { buf.set_len(len) };
                let address = buf.as_mut_ptr() as u64;
                (Into::DeviceOnHost, buf, address, sys::UCS_MEMORY_TYPE_HOST)
            }
        };
        let keep = Box::into_raw(Box::new(RecvKeep { conn: id, seq, prefix: host, buf: std::mem::take(&mut buf), len, into }));
        // SAFETY: the destination (the payload's memory, kept by its owner,
        // or the buffer, whose heap memory does not move with the Vec) lives
        // in `keep` until the receive completes; nothing reads it before.
        let request = unsafe {
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA | sys::UCP_OP_ATTR_FIELD_DATATYPE | sys::UCP_OP_ATTR_FIELD_MEMORY_TYPE;
            p.cb.recv_am = Some(on_recv);
            p.user_data = keep.cast();
            p.datatype = sys::dt_bytes();
            p.memory_type = memory_type;
            self.lib.ucp_am_recv_data_nbx(self.worker, desc, address as *mut c_void, len, &p)
        };
        let status = sys::ptr_status(request);
        if status != sys::UCS_INPROGRESS as sys::ucs_status_t {
            // SAFETY: completed at once (or failed): no callback will come.
            let keep = unsafe { Box::from_raw(keep) };
            self.received(*keep, status);
        }
    }

    /// Closes connection `id`'s endpoint (forcibly after an error).
    fn destroy(&mut self, id: u64, force: bool) {
        let Some(c) = self.conns.remove(&id) else { return };
        tracing::debug!(peer = %c.peer, force, closed_here = c.closed_here, closed_there = c.closed_there, ended = c.ended, "closing a UCX endpoint");
        self.by_ep.remove(&(c.ep as usize));
        for w in &c.rndv_waiting {
            // SAFETY: descriptors UCX gave our handler and nobody received.
            unsafe { self.lib.ucp_am_data_release(self.worker, w.desc as *mut c_void) };
        }
        if !c.ended {
            let _ = c.inbound.send(Ok(None));
        }
        // SAFETY: the endpoint is ours and closed once; pending rendezvous
        // receives on it complete (with an error) through their callbacks.
        let request = unsafe {
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = if force { sys::UCP_EP_CLOSE_FLAG_FORCE } else { 0 };
            self.lib.ucp_ep_close_nbx(c.ep, &p)
        };
        if sys::ptr_status(request) == sys::UCS_INPROGRESS as sys::ucs_status_t {
            self.closing.push(request as usize);
        }
    }

    fn finish_closes(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let lib = self.lib;
        self.closing.retain(|&r| {
            // SAFETY: requests from ucp_ep_close_nbx, freed once complete.
            unsafe {
                if lib.ucp_request_check_status(r as *mut c_void) == sys::UCS_INPROGRESS as sys::ucs_status_t {
                    true
                } else {
                    lib.ucp_request_free(r as *mut c_void);
                    false
                }
            }
        });
    }

    /// Connections closed here whose reader has gone too: nothing more will
    /// be read, so the endpoint goes.
    fn sweep(&mut self) {
        let done: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.lingering {
                Some(since) => since.elapsed() > LINGER,
                None => c.closed_here && c.inbound.is_closed(),
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.destroy(id, false);
        }
    }
}

/// One received message as a frame: its bytes are `prefix` (from the
/// message header) followed by `payload`, in the TCP wire layout, checked
/// the same way. Data frames are views into whichever part holds them.
fn parse(prefix: Bytes, payload: Bytes, max: u64) -> Result<Frame> {
    let limits = Limits { max_frame_size: max, ..Limits::default() };
    let split = prefix.len();
    let len = split + payload.len();
    let at = |r: std::ops::Range<usize>| -> Bytes {
        if r.end <= split {
            prefix.slice(r)
        } else if r.start >= split {
            payload.slice(r.start - split..r.end - split)
        } else {
            let mut v = Vec::with_capacity(r.len());
            v.extend_from_slice(&prefix[r.start..]);
            v.extend_from_slice(&payload[..r.end - split]);
            Bytes::from(v)
        }
    };
    if len < HEADER_LEN {
        return Err(TransportError::Malformed(format!("UCX message of {len} bytes is shorter than a frame header")));
    }
    let header = FixedHeader::parse(at(0..HEADER_LEN)[..].try_into().unwrap(), &limits)?;
    let table_end = HEADER_LEN + 8 * header.n_data as usize;
    if len < table_end {
        return Err(TransportError::Malformed("truncated length table".into()));
    }
    let lengths: Vec<u64> = at(HEADER_LEN..table_end).chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let total = check_lengths(&header, &lengths, &limits)?;
    if total != len as u64 {
        return Err(TransportError::Malformed(format!("UCX message of {len} bytes, its header says {total}")));
    }
    let control_end = table_end + header.control_len as usize;
    let mut control = AlignedVec::with_capacity(header.control_len as usize);
    control.extend_from_slice(&at(table_end..control_end));
    let mut pos = control_end;
    let data = lengths
        .iter()
        .map(|&l| {
            let d = at(pos..pos + l as usize);
            pos += l as usize;
            d
        })
        .collect();
    Ok(Frame { control, data, device: None })
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, valid zeroed, and large
    // enough for either address family written into it.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
                (storage, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
                sin6.sin6_scope_id = a.scope_id();
                (storage, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
            }
        }
    }
}

/// # Safety
/// `p` points to a sockaddr_storage filled by UCX.
unsafe fn from_sockaddr(p: *const libc::sockaddr_storage) -> Option<SocketAddr> {
    match (*p).ss_family as i32 {
        libc::AF_INET => {
            let sin = &*p.cast::<libc::sockaddr_in>();
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            let sin6 = &*p.cast::<libc::sockaddr_in6>();
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;

    #[test]
    fn peer_failure_handling_is_asked_for_endpoints_to_other_hosts_only() {
        let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        // TEST-NET-1: documentation addresses, never an interface's.
        let elsewhere: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        assert!(is_this_host(loopback) && is_this_host(mapped));
        assert!(!is_this_host(elsewhere));
        for (_, ip) in crate::netif::interface_addresses() {
            assert!(is_this_host(ip.into()), "{ip} is this host's");
        }
        assert!(!PeerErrors::Remote.wanted(Some(loopback)));
        assert!(PeerErrors::Remote.wanted(Some(elsewhere)));
        // A peer whose address UCX could not tell is treated as remote.
        assert!(PeerErrors::Remote.wanted(None));
        assert!(PeerErrors::Always.wanted(Some(loopback)));
        assert!(!PeerErrors::Never.wanted(Some(elsewhere)));
    }

    #[test]
    fn parse_takes_the_tcp_layout_and_refuses_mismatches() {
        let mut control = AlignedVec::new();
        control.extend_from_slice(b"hello");
        let frame = Frame { control, data: vec![Bytes::from_static(b"abc"), Bytes::from(vec![7u8; 40_000])], device: None };
        let wire = Bytes::from(encode_frame(&frame));
        let back = parse(Bytes::new(), wire.clone(), 1 << 30).unwrap();
        assert_eq!(&back.control[..], b"hello");
        assert_eq!(back.data.len(), 2);
        assert_eq!(&back.data[0][..], b"abc");
        assert_eq!(back.data[1].len(), 40_000);
        // Split anywhere between header and payload: the same frame, and the
        // large value is a view into the payload, not a copy.
        for cut in [3, 8, 20, wire.len() - 40_000 - 3, wire.len() - 40_000, wire.len()] {
            let back = parse(wire.slice(..cut), wire.slice(cut..), 1 << 30).unwrap();
            assert_eq!(&back.control[..], b"hello", "cut at {cut}");
            assert_eq!(&back.data[0][..], b"abc");
            assert_eq!(back.data[1], frame.data[1]);
        }
        let cut = wire.len() - 40_000;
        let payload = wire.slice(cut..);
        assert_eq!(parse(wire.slice(..cut), payload.clone(), 1 << 30).unwrap().data[1].as_ptr(), payload.as_ptr());
        assert!(matches!(parse(Bytes::new(), wire.slice(..wire.len() - 1), 1 << 30), Err(TransportError::Malformed(_))));
        assert!(matches!(parse(Bytes::new(), wire.clone(), 1000), Err(TransportError::FrameTooLarge { .. })));
        assert!(matches!(parse(Bytes::from_static(b"abc"), Bytes::new(), 1 << 30), Err(TransportError::Malformed(_))));
    }

    #[test]
    fn socket_addresses_round_trip() {
        for a in ["127.0.0.1:8786", "[::1]:9000", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            let (s, _) = to_sockaddr(a);
            assert_eq!(unsafe { from_sockaddr(&s) }, Some(a));
        }
    }
}
