//! MPI backend (cargo feature `mpi`): `mpi://RANK:PORT` addresses, frames as
//! point-to-point messages between the ranks of one MPI job.
//!
//! One engine thread per process owns MPI: it calls MPI_Init_thread
//! (FUNNELED, checked), and every MPI call, for the transport and for the
//! job's start-up (`rdask-mpi-boot`), runs on it, fed by a command channel.
//! (OpenMPI's communicators are pointers, not `Send`; and FUNNELED is the
//! level every MPI library gives.)
//!
//! On the wire, per frame: one HEAD message (destination connection id,
//! control length, data lengths, control bytes, then the bytes of every data
//! frame under 32 KiB, copied in: a reply of 8,192 small values is one
//! message, not 8,193), then one DATA message per larger data frame, sent
//! from the frame's own buffer (no copy; the buffer is kept alive until MPI
//! completes the send) and received straight into the buffer that becomes
//! the `Bytes` handed up. MPI's ordering (same source, same
//! communicator) keeps a frame's messages together. Connections are opened
//! with CONNECT/ACCEPT to a listener's port and closed with CLOSE.
//!
//! Messages that arrive do not wake a sleeping thread, so after any
//! activity the engine keeps polling for 2 ms (yielding the core between
//! polls); after that it sleeps, backing off to 1 ms, so an idle process
//! does not spin a core. New commands from this process wake it at once.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use mpi::point_to_point::{Destination, Source};
use mpi::request::{Request, StaticScope};
pub use mpi::topology::SimpleCommunicator;
use mpi::topology::Communicator;
use mpi::traits::Root;
use mpi::Threading;
use rkyv::util::AlignedVec;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{split_scheme, Backend, BoxFuture, Connection, FrameRead, FrameSender, Listener};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, Limits};

const TAG_CONNECT: i32 = 101;
const TAG_ACCEPT: i32 = 102;
const TAG_HEAD: i32 = 103;
const TAG_DATA: i32 = 104;
const TAG_CLOSE: i32 = 105;
/// The client rank of `rdask.mpi.initialize()` tells rank 0 it is done.
const TAG_DONE: i32 = 7311;
/// Data frames smaller than this travel inside the HEAD message.
const INLINE_BELOW: usize = 32 << 10;

/// This process's rank and the job's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: i32,
    pub size: i32,
}

type Reply<T> = std_mpsc::Sender<T>;

enum Cmd {
    /// Runs on the engine thread with the world communicator (benchmarks
    /// and tools that need plain MPI next to the transport).
    Run(Box<dyn FnOnce(&SimpleCommunicator) + Send>),
    Broadcast { value: Option<String>, reply: Reply<std::result::Result<String, String>> },
    SendDone(i32),
    TakeDone(Reply<Option<i32>>),
    Abort(i32),
    Finalize(Reply<()>),
    Listen { port: u32, incoming: mpsc::Sender<Connection>, handle: tokio::runtime::Handle, limits: Limits, reply: Reply<std::result::Result<u32, String>> },
    Connect { rank: i32, port: u32, handle: tokio::runtime::Handle, limits: Limits, reply: oneshot::Sender<Result<Connection>> },
    Send { conn: u64, frame: Frame },
    Close { conn: u64 },
}

pub struct Engine {
    cmds: std::sync::Mutex<std_mpsc::Sender<Cmd>>,
    thread: std::thread::Thread,
    pub world: World,
}

static ENGINE: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();

/// Starts MPI on its engine thread (once per process) and returns the world.
pub fn start() -> Result<World> {
    let engine = ENGINE.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let spawned = std::thread::Builder::new().name("rdask-mpi".into()).spawn(move || engine_thread(rx, ready_tx));
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => return Err(format!("cannot start the MPI thread: {e}")),
        };
        match ready_rx.recv() {
            Ok(Ok(world)) => Ok(Engine { cmds: std::sync::Mutex::new(tx), thread: handle.thread().clone(), world }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the MPI thread ended during start-up".into()),
        }
    });
    match engine {
        Ok(e) => Ok(e.world),
        Err(e) => Err(TransportError::Handshake(e.clone())),
    }
}

fn engine() -> Result<&'static Engine> {
    match ENGINE.get() {
        Some(Ok(e)) => Ok(e),
        Some(Err(e)) => Err(TransportError::Handshake(e.clone())),
        None => Err(TransportError::InvalidAddress("mpi://".into(), "MPI is not started in this process (run under mpirun with rdask-mpi or rdask.mpi.initialize)".into())),
    }
}

impl Engine {
    fn send(&self, cmd: Cmd) -> Result<()> {
        self.cmds.lock().unwrap().send(cmd).map_err(|_| TransportError::Closed)?;
        self.thread.unpark();
        Ok(())
    }
}

/// Rank 0 gives `value`; every rank gets it back (a collective: all call it).
pub fn broadcast(value: Option<&str>) -> Result<String> {
    let (tx, rx) = std_mpsc::channel();
    engine()?.send(Cmd::Broadcast { value: value.map(str::to_string), reply: tx })?;
    rx.recv().map_err(|_| TransportError::Closed)?.map_err(TransportError::Malformed)
}

/// Runs `f` on the MPI thread with the world communicator and returns its
/// result (plain MPI beside the transport, e.g. a reference ping-pong).
pub fn with_world<R: Send + 'static>(f: impl FnOnce(&SimpleCommunicator) -> R + Send + 'static) -> Result<R> {
    let (tx, rx) = std_mpsc::channel();
    engine()?.send(Cmd::Run(Box::new(move |w| {
        let _ = tx.send(f(w));
    })))?;
    rx.recv().map_err(|_| TransportError::Closed)
}

pub fn send_done(code: i32) -> Result<()> {
    engine()?.send(Cmd::SendDone(code))
}

/// The client's exit code once its "done" has arrived (rank 0).
pub fn take_done() -> Result<Option<i32>> {
    let (tx, rx) = std_mpsc::channel();
    engine()?.send(Cmd::TakeDone(tx))?;
    rx.recv().map_err(|_| TransportError::Closed)
}

pub fn abort(code: i32) -> ! {
    if let Ok(e) = engine() {
        let _ = e.send(Cmd::Abort(code));
        std::thread::sleep(Duration::from_secs(10));
    }
    std::process::exit(code)
}

/// MPI_Finalize on the engine thread; the engine ends.
pub fn finalize() -> Result<()> {
    let (tx, rx) = std_mpsc::channel();
    engine()?.send(Cmd::Finalize(tx))?;
    rx.recv().map_err(|_| TransportError::Closed)
}

// ---------------------------------------------------------------- the backend

pub struct MpiBackend;

/// `mpi://RANK:PORT` → (rank, port).
fn rank_port(addr: &str) -> Result<(i32, u32)> {
    let (scheme, rest) = split_scheme(addr);
    let bad = || TransportError::InvalidAddress(addr.to_string(), "expected mpi://RANK:PORT".into());
    if scheme != "mpi" {
        return Err(TransportError::UnknownScheme(addr.to_string()));
    }
    let (r, p) = rest.split_once(':').ok_or_else(bad)?;
    Ok((r.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?))
}

impl Backend for MpiBackend {
    fn scheme(&self) -> &'static str {
        "mpi"
    }

    fn listen<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Listener>> {
        Box::pin(async move {
            let (rank, port) = rank_port(addr)?;
            let e = engine()?;
            if rank != e.world.rank {
                return Err(TransportError::InvalidAddress(addr.into(), format!("this process is rank {}", e.world.rank)));
            }
            let (incoming, rx) = mpsc::channel(256);
            let (tx, reply) = std_mpsc::channel();
            let handle = tokio::runtime::Handle::current();
            e.send(Cmd::Listen { port, incoming, handle, limits, reply: tx })?;
            let port = tokio::task::spawn_blocking(move || reply.recv())
                .await
                .map_err(|_| TransportError::Closed)?
                .map_err(|_| TransportError::Closed)?
                .map_err(|m| TransportError::InvalidAddress(addr.to_string(), m))?;
            Ok(Listener::new(format!("mpi://{rank}:{port}"), rx, None))
        })
    }

    fn connect<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Connection>> {
        Box::pin(async move {
            let (rank, port) = rank_port(addr)?;
            let e = engine()?;
            if rank < 0 || rank >= e.world.size {
                return Err(TransportError::InvalidAddress(addr.into(), format!("the job has ranks 0..{}", e.world.size)));
            }
            let (tx, rx) = oneshot::channel();
            e.send(Cmd::Connect { rank, port, handle: tokio::runtime::Handle::current(), limits, reply: tx })?;
            rx.await.map_err(|_| TransportError::Closed)?
        })
    }
}

struct ChannelReader(mpsc::UnboundedReceiver<Result<Option<Frame>>>);

impl FrameRead for ChannelReader {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>>> {
        Box::pin(async move { self.0.recv().await.unwrap_or(Ok(None)) })
    }
}

/// A connection whose outgoing frames go to the engine for `conn`.
fn make_connection(id: u64, peer: String, handle: &tokio::runtime::Handle, limits: Limits, inbound: mpsc::UnboundedReceiver<Result<Option<Frame>>>) -> Connection {
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    handle.spawn(async move {
        let Ok(e) = engine() else { return };
        while let Some(frame) = rx.recv().await {
            if e.send(Cmd::Send { conn: id, frame }).is_err() {
                return;
            }
        }
        let _ = e.send(Cmd::Close { conn: id });
    });
    Connection { sender: FrameSender::new(tx, limits), receiver: Box::new(ChannelReader(inbound)), peer }
}

// ---------------------------------------------------------------- the engine thread

struct Conn {
    rank: i32,
    /// The peer's id for this connection; None until it accepted.
    remote: Option<u64>,
    inbound: mpsc::UnboundedSender<Result<Option<Frame>>>,
    /// Frames sent before the peer accepted.
    waiting: Vec<Frame>,
}

struct Pending {
    reply: oneshot::Sender<Result<Connection>>,
    connection: Connection,
}

struct State {
    world: SimpleCommunicator,
    rank: i32,
    next_id: u64,
    listeners: HashMap<u32, (mpsc::Sender<Connection>, tokio::runtime::Handle, Limits)>,
    conns: HashMap<u64, Conn>,
    pending: HashMap<u64, Pending>,
    /// Sends MPI has not completed, with the buffers they read from.
    in_flight: Vec<(Request<'static, [u8], StaticScope>, Keep)>,
    done: Option<i32>,
}

/// A buffer kept alive while MPI sends from it.
#[allow(dead_code)]
enum Keep {
    Bytes(Bytes),
    Vec(Vec<u8>),
}

fn engine_thread(cmds: std_mpsc::Receiver<Cmd>, ready: std_mpsc::Sender<std::result::Result<World, String>>) {
    let Some((universe, given)) = mpi::initialize_with_threading(Threading::Funneled) else {
        let _ = ready.send(Err("MPI is already initialised in this process".into()));
        return;
    };
    if given < Threading::Funneled {
        let _ = ready.send(Err(format!("MPI gave thread level {given:?}; rdask needs Funneled")));
        return;
    }
    let world = universe.world();
    let me = World { rank: world.rank(), size: world.size() };
    tracing::debug!(rank = me.rank, size = me.size, "MPI engine started");
    let _ = ready.send(Ok(me));
    let mut st = State {
        world,
        rank: me.rank,
        next_id: 1,
        listeners: HashMap::new(),
        conns: HashMap::new(),
        pending: HashMap::new(),
        in_flight: Vec::new(),
        done: None,
    };
    // After activity the engine keeps polling for a while (messages that
    // arrive do not wake a sleeping thread); idle, it backs off to 1 ms
    // sleeps so an idle process does not spin a core.
    const STAY_AWAKE: Duration = Duration::from_millis(2);
    let mut idle = Duration::from_micros(20);
    let mut last_busy = std::time::Instant::now();
    loop {
        let mut busy = false;
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Finalize(reply)) => {
                    // Peers see every connection of this process close.
                    let open: Vec<(i32, u64)> = st.conns.values().filter_map(|c| Some((c.rank, c.remote?))).collect();
                    for (rank, remote) in open {
                        st.post(rank, TAG_CLOSE, Keep::Vec(remote.to_le_bytes().to_vec()));
                    }
                    st.conns.clear();
                    st.drain_sends();
                    drop(st);
                    drop(universe); // MPI_Finalize
                    let _ = reply.send(());
                    return;
                }
                Ok(cmd) => {
                    busy = true;
                    st.command(cmd);
                }
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => return,
            }
        }
        busy |= st.progress_sends();
        busy |= st.receive();
        if busy {
            idle = Duration::from_micros(20);
            last_busy = std::time::Instant::now();
        } else if !st.in_flight.is_empty() || last_busy.elapsed() < STAY_AWAKE {
            std::thread::yield_now();
        } else {
            std::thread::park_timeout(idle);
            idle = (idle * 2).min(Duration::from_millis(1));
        }
    }
}

impl State {
    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Broadcast { value, reply } => {
                let root = self.world.process_at_rank(0);
                let mut len = value.as_ref().map_or(0u64, |v| v.len() as u64);
                root.broadcast_into(&mut len);
                let mut buf = value.map(String::into_bytes).unwrap_or_default();
                buf.resize(len as usize, 0);
                root.broadcast_into(&mut buf[..]);
                let _ = reply.send(String::from_utf8(buf).map_err(|e| format!("broadcast value is not UTF-8: {e}")));
            }
            Cmd::Run(f) => f(&self.world),
            Cmd::SendDone(code) => self.world.process_at_rank(0).send_with_tag(&code, TAG_DONE),
            Cmd::TakeDone(reply) => {
                let _ = reply.send(self.done.take());
            }
            Cmd::Abort(code) => self.world.abort(code),
            Cmd::Finalize(_) => unreachable!("handled by the loop"),
            Cmd::Listen { port, incoming, handle, limits, reply } => {
                let port = if port == 0 { (1..).find(|p| !self.listeners.contains_key(p)).unwrap() } else { port };
                if self.listeners.contains_key(&port) {
                    let _ = reply.send(Err(format!("port {port} of rank {} is in use", self.rank)));
                } else {
                    self.listeners.insert(port, (incoming, handle, limits));
                    let _ = reply.send(Ok(port));
                }
            }
            Cmd::Connect { rank, port, handle, limits, reply } => {
                let id = self.new_id();
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                let connection = make_connection(id, format!("mpi://{rank}:{port}"), &handle, limits, in_rx);
                self.conns.insert(id, Conn { rank, remote: None, inbound: in_tx, waiting: Vec::new() });
                self.pending.insert(id, Pending { reply, connection });
                let mut msg = Vec::with_capacity(12);
                msg.extend_from_slice(&port.to_le_bytes());
                msg.extend_from_slice(&id.to_le_bytes());
                self.post(rank, TAG_CONNECT, Keep::Vec(msg));
            }
            Cmd::Send { conn, frame } => {
                let Some(c) = self.conns.get_mut(&conn) else { return };
                match c.remote {
                    None => c.waiting.push(frame),
                    Some(remote) => {
                        let rank = c.rank;
                        self.post_frame(rank, remote, frame);
                    }
                }
            }
            Cmd::Close { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    if let Some(remote) = c.remote {
                        self.post(c.rank, TAG_CLOSE, Keep::Vec(remote.to_le_bytes().to_vec()));
                    }
                }
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Starts a send from `buf`, which stays alive until MPI is done with it.
    fn post(&mut self, rank: i32, tag: i32, buf: Keep) {
        let slice: &[u8] = match &buf {
            Keep::Bytes(b) => b,
            Keep::Vec(v) => v,
        };
        // SAFETY: the slice points into `buf`'s heap memory, which does not
        // move when `buf` is moved, and `buf` is kept in `in_flight` beside
        // the request until the request has completed (`progress_sends`,
        // `drain_sends`); nothing writes to it meanwhile.
        let slice: &'static [u8] = unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len()) };
        let req = self.world.process_at_rank(rank).immediate_send_with_tag(StaticScope, slice, tag);
        self.in_flight.push((req, buf));
    }

    fn post_frame(&mut self, rank: i32, remote: u64, frame: Frame) {
        let mut head = Vec::with_capacity(16 + 8 * frame.data.len() + frame.control.len());
        head.extend_from_slice(&remote.to_le_bytes());
        head.extend_from_slice(&(frame.control.len() as u32).to_le_bytes());
        head.extend_from_slice(&(frame.data.len() as u32).to_le_bytes());
        for d in &frame.data {
            head.extend_from_slice(&(d.len() as u64).to_le_bytes());
        }
        head.extend_from_slice(&frame.control);
        for d in frame.data.iter().filter(|d| d.len() < INLINE_BELOW) {
            head.extend_from_slice(d);
        }
        self.post(rank, TAG_HEAD, Keep::Vec(head));
        for d in frame.data.into_iter().filter(|d| d.len() >= INLINE_BELOW) {
            self.post(rank, TAG_DATA, Keep::Bytes(d));
        }
    }

    /// Completes finished sends; true if any did.
    fn progress_sends(&mut self) -> bool {
        let before = self.in_flight.len();
        let mut still = Vec::with_capacity(before);
        for (req, keep) in self.in_flight.drain(..) {
            match req.test() {
                Ok(_) => drop(keep),
                Err(req) => still.push((req, keep)),
            }
        }
        self.in_flight = still;
        self.in_flight.len() != before
    }

    fn drain_sends(&mut self) {
        for (req, keep) in self.in_flight.drain(..) {
            req.wait();
            drop(keep);
        }
    }

    /// Takes every message that has arrived; true if there was one.
    fn receive(&mut self) -> bool {
        let mut any = false;
        while let Some((msg, status)) = self.world.any_process().immediate_matched_probe() {
            any = true;
            let (src, tag) = (status.source_rank(), status.tag());
            let len = status.count(u8::equivalent_datatype()) as usize;
            let mut buf = vec![0u8; len];
            msg.matched_receive_into(&mut buf[..]);
            match tag {
                TAG_DONE => self.done = Some(i32::from_le_bytes(buf[..4].try_into().unwrap_or_default())),
                TAG_CONNECT if len == 12 => self.on_connect(src, &buf),
                TAG_ACCEPT if len == 17 => self.on_accept(&buf),
                TAG_HEAD if len >= 16 => self.on_head(src, buf),
                TAG_CLOSE if len == 8 => {
                    let id = u64::from_le_bytes(buf.try_into().unwrap());
                    if let Some(c) = self.conns.remove(&id) {
                        let _ = c.inbound.send(Ok(None));
                    }
                }
                _ => tracing::warn!(source = src, tag, len, "unexpected MPI message; dropped"),
            }
        }
        any
    }

    fn on_connect(&mut self, src: i32, buf: &[u8]) {
        let port = u32::from_le_bytes(buf[..4].try_into().unwrap());
        let their = u64::from_le_bytes(buf[4..12].try_into().unwrap());
        let mut reply = Vec::with_capacity(17);
        reply.extend_from_slice(&their.to_le_bytes());
        let accepted = self.listeners.get(&port).map(|(incoming, handle, limits)| (incoming.clone(), handle.clone(), *limits));
        match accepted {
            Some((incoming, handle, limits)) => {
                let id = self.new_id();
                let (in_tx, in_rx) = mpsc::unbounded_channel();
                let conn = make_connection(id, format!("mpi://{src}"), &handle, limits, in_rx);
                self.conns.insert(id, Conn { rank: src, remote: Some(their), inbound: in_tx, waiting: Vec::new() });
                if incoming.try_send(conn).is_err() {
                    tracing::warn!(port, "listener queue full or closed; refusing a connection from rank {src}");
                    self.conns.remove(&id);
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    reply.push(0);
                } else {
                    reply.extend_from_slice(&id.to_le_bytes());
                    reply.push(1);
                }
            }
            None => {
                reply.extend_from_slice(&0u64.to_le_bytes());
                reply.push(0);
            }
        }
        self.post(src, TAG_ACCEPT, Keep::Vec(reply));
    }

    fn on_accept(&mut self, buf: &[u8]) {
        let ours = u64::from_le_bytes(buf[..8].try_into().unwrap());
        let theirs = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        let ok = buf[16] == 1;
        let Some(p) = self.pending.remove(&ours) else { return };
        if !ok {
            self.conns.remove(&ours);
            let _ = p.reply.send(Err(TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("nothing listens at {}", p.connection.peer),
            ))));
            return;
        }
        let Some(c) = self.conns.get_mut(&ours) else { return };
        c.remote = Some(theirs);
        let (rank, waiting) = (c.rank, std::mem::take(&mut c.waiting));
        for f in waiting {
            self.post_frame(rank, theirs, f);
        }
        let _ = p.reply.send(Ok(p.connection));
    }

    /// A frame's head, with its small data frames inside, then (blocking:
    /// they were sent right after it) its large data frames, each received
    /// into its own buffer.
    fn on_head(&mut self, src: i32, buf: Vec<u8>) {
        let id = u64::from_le_bytes(buf[..8].try_into().unwrap());
        let control_len = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
        let n = u32::from_le_bytes(buf[12..16].try_into().unwrap()) as usize;
        let lengths_end = 16 + 8 * n;
        let bad = |c: &Conn, why: &str| {
            let _ = c.inbound.send(Err(TransportError::Malformed(format!("MPI frame head: {why}"))));
        };
        if buf.len() < lengths_end + control_len {
            if let Some(c) = self.conns.get(&id) {
                bad(c, "shorter than its lengths say");
            }
            return;
        }
        let lengths: Vec<usize> =
            buf[16..lengths_end].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize).collect();
        let inline: usize = lengths.iter().filter(|l| **l < INLINE_BELOW).sum();
        if buf.len() != lengths_end + control_len + inline {
            if let Some(c) = self.conns.get(&id) {
                bad(c, "inline data does not match its lengths");
            }
            return;
        }
        let mut control = AlignedVec::with_capacity(control_len);
        control.extend_from_slice(&buf[lengths_end..lengths_end + control_len]);
        let head = Bytes::from(buf);
        let mut at = lengths_end + control_len;
        let mut data = Vec::with_capacity(n);
        let from = self.world.process_at_rank(src);
        for &len in &lengths {
            if len < INLINE_BELOW {
                data.push(head.slice(at..at + len));
                at += len;
                continue;
            }
            let (msg, status) = from.matched_probe_with_tag(TAG_DATA);
            let len = status.count(u8::equivalent_datatype()) as usize;
            // Large values land in reused memory when there is some (no
            // page faults and zeroing for a 64 MiB value).
            let mut d = crate::bufpool::take(len, crate::bufpool::advise_huge_pages_vec);
            // SAFETY: MPI writes all `len` bytes before they are read: the
            // matched message has exactly `len` bytes (its status says so).
            unsafe { d.set_len(len) };
            msg.matched_receive_into(&mut d[..]);
            data.push(crate::bufpool::into_bytes(d));
        }
        let Some(c) = self.conns.get(&id) else { return };
        let _ = c.inbound.send(Ok(Some(Frame { control, data, device: None })));
    }
}

use mpi::datatype::Equivalence;
