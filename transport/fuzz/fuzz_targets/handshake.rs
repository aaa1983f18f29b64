//! The accepting side of the handshake (`handshake_accept`) against
//! arbitrary client input.
//!
//! Input byte 0 holds flags: bit 0 = the endpoint requires a token
//! (`TOKEN`); bit 1 = transport (see below); bits 2..5 = the roles the
//! endpoint serves (Client, Worker, Peer). The rest is what the client sends:
//!
//! * stream mode (bit 1 clear): the bytes are a byte stream read by
//!   `StreamReader`, a `FrameRead` that decodes frames with
//!   `frame::decode_frame` under the limit the handshake sets through
//!   `set_max_frame_size` (as the TCP reader does), so the hello goes through
//!   the frame layer with the 4 KiB pre-auth cap;
//! * in-process mode (bit 1 set): the bytes are the control part of the
//!   hello frame, delivered over an `inproc::pair` (no size cap there: that
//!   backend trusts its frames).
//!
//! Checked on every input: no panic; the result (Ok(role) or Err) equals an
//! independent reading of the hello (`expected` below); the reply frames are
//! well formed (one `Ok` reply on success, at most one refusal otherwise);
//! the reader runs under a limit of at most `MAX_HANDSHAKE_FRAME` while the
//! hello is read and gets its own limit back after; no single allocation made
//! during the handshake exceeds `MAX_HANDSHAKE_FRAME`, and the memory it
//! holds at once never grows by more than `4 * MAX_HANDSHAKE_FRAME`.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use rdask_transport::backend::{BoxFuture, Connection, FrameRead, FrameSender};
use rdask_transport::frame::{decode_frame, Frame, Limits};
use rdask_transport::handshake::{handshake_accept, Role, MAGIC, MAX_HANDSHAKE_FRAME};
use rdask_transport::protocol::PROTOCOL_VERSION;
use rdask_transport::rkyv::util::AlignedVec;
use rdask_transport::{inproc, Result, TransportError};
use tokio::sync::mpsc;

// ------------------------------------------------------------ allocation watch

/// Counts what the process allocates while `TRACK` is on (the fuzzer runs
/// one input at a time on one thread, and the runtime is current-thread).
struct Watch;

static TRACK: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn on_alloc(size: usize) {
    if TRACK.load(Relaxed) {
        LARGEST.fetch_max(size, Relaxed);
        let live = LIVE.fetch_add(size as u64, Relaxed) + size as u64;
        PEAK.fetch_max(live, Relaxed);
    }
}

fn on_free(size: usize) {
    if TRACK.load(Relaxed) {
        // Frees of memory allocated before tracking started may take LIVE
        // below zero; saturate instead (PEAK only looks upwards).
        let _ = LIVE.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(size as u64)));
    }
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_alloc(new_size);
        on_free(layout.size());
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Watch = Watch;

// ------------------------------------------------------------ byte-stream reader

/// A connection's receiving half over a byte slice: frames are decoded with
/// the frame layer under the current limit, which the handshake lowers to
/// the pre-auth cap through `set_max_frame_size`.
struct StreamReader {
    bytes: Vec<u8>,
    pos: usize,
    limits: Limits,
    /// The limit in force at each `recv`, for the harness to check.
    seen: Arc<Mutex<Vec<u64>>>,
    /// The limit when the reader is dropped (after the handshake).
    last: Arc<AtomicU64>,
}

impl FrameRead for StreamReader {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>>> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(self.limits.max_frame_size);
            let rest = &self.bytes[self.pos..];
            if rest.is_empty() {
                return Ok(None);
            }
            let frame = decode_frame(rest, &self.limits)?;
            self.pos += frame.wire_size() as usize;
            Ok(Some(frame))
        })
    }

    fn set_max_frame_size(&mut self, max: u64) -> Option<u64> {
        Some(std::mem::replace(&mut self.limits.max_frame_size, max))
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.last.store(self.limits.max_frame_size, Relaxed);
    }
}

// ------------------------------------------------------------ the oracle

const TOKEN: &str = "fuzz-token-0123456789";
const ROLES: [Role; 3] = [Role::Client, Role::Worker, Role::Peer];

/// What `handshake_accept` must answer for this hello control part:
/// Ok(role), or Err(Some(status)) when a refusal must be sent, or Err(None)
/// when the frame is not a hello at all (no reply).
fn expected(control: &[u8], allowed: &[Role], token: Option<&str>) -> std::result::Result<Role, Option<u8>> {
    if control.len() < 12 || &control[..6] != MAGIC {
        return Err(None);
    }
    let len = u16::from_le_bytes([control[10], control[11]]) as usize;
    if control.len() != 12 + len {
        return Err(None);
    }
    if u16::from_le_bytes([control[6], control[7]]) != PROTOCOL_VERSION {
        return Err(Some(1));
    }
    let Some(role) = ROLES.iter().copied().find(|r| *r as u8 == control[8] && allowed.contains(r)) else {
        return Err(Some(3));
    };
    if let Some(t) = token {
        if t.as_bytes() != &control[12..] {
            return Err(Some(2));
        }
    }
    Ok(role)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap())
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else { return };
    let token = (flags & 1 != 0).then_some(TOKEN);
    let in_process = flags & 2 != 0;
    let allowed: Vec<Role> = ROLES.iter().enumerate().filter(|(i, _)| flags & (4 << i) != 0).map(|(_, r)| *r).collect();
    let own_limits = Limits::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let last = Arc::new(AtomicU64::new(0));

    // The server's connection, the client's end of it (in-process mode), the
    // receiver of the server's replies (stream mode), and the verdict due.
    let (mut server, client, mut replies, want) = if in_process {
        let (client, server) = inproc::pair("fuzz-client", "fuzz-server", own_limits);
        let mut control = AlignedVec::<16>::with_capacity(rest.len());
        control.extend_from_slice(rest);
        let want = expected(rest, &allowed, token);
        client.sender.send(Frame::new(control)).unwrap();
        (server, Some(client), None, want)
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = StreamReader {
            bytes: rest.to_vec(),
            pos: 0,
            limits: own_limits,
            seen: seen.clone(),
            last: last.clone(),
        };
        let pre_auth = Limits { max_frame_size: MAX_HANDSHAKE_FRAME, ..own_limits };
        let want = match decode_frame(rest, &pre_auth) {
            Ok(hello) => expected(&hello.control, &allowed, token),
            Err(_) => Err(None),
        };
        let conn = Connection { sender: FrameSender::new(tx, own_limits), receiver: Box::new(reader), peer: "fuzz".into() };
        (conn, None, Some(rx), want)
    };

    let rt = runtime();
    LARGEST.store(0, Relaxed);
    LIVE.store(0, Relaxed);
    PEAK.store(0, Relaxed);
    TRACK.store(true, Relaxed);
    let got = rt.block_on(handshake_accept(&mut server, &allowed, token));
    TRACK.store(false, Relaxed);
    let (largest, peak) = (LARGEST.load(Relaxed), PEAK.load(Relaxed));
    assert!(largest as u64 <= MAX_HANDSHAKE_FRAME, "one allocation of {largest} bytes during the handshake");
    assert!(peak <= 4 * MAX_HANDSHAKE_FRAME, "the handshake held {peak} bytes at once");

    match (&got, &want) {
        (Ok(r), Ok(w)) => assert_eq!(r, w),
        (Err(_), Err(_)) => {}
        _ => panic!("handshake_accept returned {got:?}, expected {want:?}"),
    }
    if let Err(TransportError::VersionMismatch { ours, .. }) = &got {
        assert_eq!(*ours, PROTOCOL_VERSION);
    }

    // The replies the server queued for the client.
    let mut sent = Vec::new();
    if let Some(mut client) = client {
        drop(server);
        while let Some(f) = rt.block_on(client.receiver.recv()).unwrap() {
            sent.push(f);
        }
    } else {
        drop(server);
        let rx = replies.as_mut().unwrap();
        while let Ok(f) = rx.try_recv() {
            sent.push(f);
        }
        // The hello was read under the pre-auth cap, and the reader has its
        // own limit back afterwards.
        let seen = seen.lock().unwrap();
        assert!(seen.len() <= 1, "the handshake read {} frames", seen.len());
        assert!(seen.iter().all(|&m| m <= MAX_HANDSHAKE_FRAME), "hello read under a limit of {seen:?}");
        assert_eq!(last.load(Relaxed), own_limits.max_frame_size, "the reader's limit was not restored");
    }
    let status = match want {
        Ok(_) => Some(0),
        Err(s) => s,
    };
    match status {
        None => assert!(sent.is_empty(), "replied to something that is not a hello"),
        Some(s) => {
            assert_eq!(sent.len(), 1, "expected one reply");
            let b = &sent[0].control[..];
            assert!(b.len() >= 12 && &b[..6] == MAGIC, "reply without magic");
            assert_eq!(u16::from_le_bytes([b[6], b[7]]), PROTOCOL_VERSION);
            assert_eq!(b[8], s, "reply status");
            let len = u16::from_le_bytes([b[10], b[11]]) as usize;
            assert_eq!(b.len(), 12 + len, "reply length field");
            assert!(std::str::from_utf8(&b[12..]).is_ok(), "reply message is not UTF-8");
            assert_eq!(s == 0, b.len() == 12, "only an Ok reply is empty");
        }
    }
});
