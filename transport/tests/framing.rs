//! Framing and handshake, byte by byte and over real TCP on 127.0.0.1.
//!
//! The byte-level tests drive `encode_frame` / `decode_frame`; the TCP tests
//! drive the real backend (`listen` / `connect`) and, where a peer must
//! misbehave, a raw `tokio::net::TcpStream` that writes whatever bytes the
//! test wants. Every network wait is bounded, so a hang fails the test
//! instead of stalling the suite.

mod common;
use common::{assert_same_frame, control, small_frame};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rdask_transport::bytes::Bytes;
use rdask_transport::frame::{decode_frame, encode_frame, DEFAULT_MAX_FRAME_SIZE, MAX_DATA_FRAMES};
use rdask_transport::handshake::{handshake_accept, handshake_connect, handshake_connect_as, Role, HANDSHAKE_TIMEOUT, MAGIC};
use rdask_transport::protocol::*;
use rdask_transport::rkyv::util::AlignedVec;
use rdask_transport::{ClientId, Connection, Frame, Limits, TaskId, TransportError, WireMessage, WorkerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ------------------------------------------------------------------ helpers

/// Records the largest single allocation the process asks for, so a test can
/// tell "allocated what a hostile header announced" from "did not".
struct PeakAlloc;

static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

/// Bound on every network wait in this file.
const WAIT: Duration = Duration::from_secs(5);

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// A frame whose data frames include empty ones, tiny ones, one above the TCP
/// writer's copy threshold and one of a few MB.
fn mixed_frame() -> Frame {
    Frame {
        control: control(),
        data: vec![
            Bytes::new(),
            Bytes::from_static(b"x"),
            Bytes::from(pseudo_random(1, 3 * 1024 * 1024 + 17)),
            Bytes::new(),
            Bytes::from(pseudo_random(2, 4096)),
            Bytes::from(pseudo_random(3, 1000)),
            Bytes::new(),
        ],
        device: None,
    }
}

/// A header: control length, number of data frames, then the length table.
fn header(control_len: u32, lengths: &[u64]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&control_len.to_le_bytes());
    v.extend_from_slice(&(lengths.len() as u32).to_le_bytes());
    for l in lengths {
        v.extend_from_slice(&l.to_le_bytes());
    }
    v
}

/// A connected pair over real TCP: (connecting side, accepting side), each
/// with its own limits.
async fn tcp_pair_with(connect_limits: Limits, accept_limits: Limits) -> (Connection, Connection) {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", accept_limits).await.unwrap();
    let client = rdask_transport::connect(&listener.address, connect_limits).await.unwrap();
    let server = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
    (client, server)
}

async fn tcp_pair() -> (Connection, Connection) {
    tcp_pair_with(Limits::default(), Limits::default()).await
}

async fn recv(conn: &mut Connection) -> rdask_transport::Result<Option<Frame>> {
    tokio::time::timeout(WAIT, conn.receiver.recv()).await.expect("recv hung")
}

/// A raw TCP peer writes `bytes` to an rdask listener and hangs up; returns
/// what the listening side's first `recv` says.
async fn recv_after_raw_peer_writes(bytes: &[u8], limits: Limits) -> rdask_transport::Result<Option<Frame>> {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", limits).await.unwrap();
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    raw.write_all(bytes).await.unwrap();
    raw.shutdown().await.unwrap();
    drop(raw);
    let mut conn = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
    recv(&mut conn).await
}

/// The hello frame a connector sends, built by hand (fixed layout, docs §3).
fn hello_bytes(version: u16, role: u8, token: &[u8]) -> Vec<u8> {
    let mut c = AlignedVec::new();
    c.extend_from_slice(MAGIC);
    c.extend_from_slice(&version.to_le_bytes());
    c.extend_from_slice(&[role, 0]);
    c.extend_from_slice(&(token.len() as u16).to_le_bytes());
    c.extend_from_slice(token);
    encode_frame(&Frame::new(c))
}

/// Runs both sides of a handshake over TCP concurrently.
async fn handshake_over_tcp(
    version: u16,
    role: Role,
    token: Option<&str>,
    allowed: &[Role],
    expected_token: Option<&str>,
) -> (rdask_transport::Result<()>, rdask_transport::Result<Role>) {
    let (mut c, mut s) = tcp_pair().await;
    let both = async { tokio::join!(handshake_connect_as(&mut c, version, role, token), handshake_accept(&mut s, allowed, expected_token)) };
    tokio::time::timeout(WAIT, both).await.expect("handshake hung")
}

// ------------------------------------------------------------------ byte level

#[test]
fn encode_decode_round_trip_preserves_every_byte() {
    let frame = mixed_frame();
    let bytes = encode_frame(&frame);
    assert_eq!(bytes.len() as u64, frame.wire_size(), "wire_size must match the encoding");
    let back = decode_frame(&bytes, &Limits::default()).unwrap();
    assert_same_frame(&back, &frame);
    // The control part must still be readable in place as the message it was.
    let ArchivedToPeerMessage::Fetch { request_id, tasks, .. } = back.access::<ToPeerMessage>().unwrap() else { panic!("not a fetch") };
    assert_eq!(request_id.to_native(), 42);
    assert_eq!(tasks.len(), 3);
}

#[test]
fn decode_of_a_frame_with_only_empty_data_frames_round_trips() {
    let frame = Frame { control: control(), data: vec![Bytes::new(); 5], device: None };
    let back = decode_frame(&encode_frame(&frame), &Limits::default()).unwrap();
    assert_same_frame(&back, &frame);
}

#[test]
fn decode_of_truncated_input_is_an_error_at_every_cut() {
    // Cut inside the header, the length table, the control part and the data.
    let bytes = encode_frame(&small_frame());
    for cut in 0..bytes.len() {
        match decode_frame(&bytes[..cut], &Limits::default()) {
            Err(TransportError::Malformed(_)) => {}
            other => panic!("cut at {cut} of {}: expected Malformed, got {other:?}", bytes.len()),
        }
    }
    assert!(decode_frame(&bytes, &Limits::default()).is_ok(), "the uncut frame must decode");
}

#[test]
fn decode_rejects_broken_headers() {
    let limits = Limits::default();
    // An empty control part is never legal (every frame carries a message).
    let mut empty_control = header(0, &[]);
    empty_control.extend_from_slice(b"junk");
    assert!(matches!(decode_frame(&empty_control, &limits), Err(TransportError::Malformed(_))));
    // More data frames than MAX_DATA_FRAMES, rejected before the table is read.
    let mut too_many = header(4, &[]);
    too_many[4..8].copy_from_slice(&(MAX_DATA_FRAMES + 1).to_le_bytes());
    assert!(matches!(decode_frame(&too_many, &limits), Err(TransportError::Malformed(_))));
    // Data lengths whose sum overflows u64.
    let overflow = header(4, &[u64::MAX, u64::MAX]);
    assert!(matches!(decode_frame(&overflow, &limits), Err(TransportError::Malformed(_))));
}

#[test]
fn header_announcing_more_than_max_frame_size_is_frame_too_large() {
    let limits = Limits { max_frame_size: 1000, ..Default::default() };
    // The control part alone is too large.
    match decode_frame(&header(2000, &[]), &limits) {
        Err(TransportError::FrameTooLarge { size: 2000, max: 1000 }) => {}
        other => panic!("expected FrameTooLarge for the control length, got {other:?}"),
    }
    // Each part fits, the total does not: 8 + 16 + 100 + 500 + 500 = 1124.
    match decode_frame(&header(100, &[500, 500]), &limits) {
        Err(TransportError::FrameTooLarge { size: 1124, max: 1000 }) => {}
        other => panic!("expected FrameTooLarge for the total, got {other:?}"),
    }
    // The default limit: a table announcing 4 GiB of data.
    match decode_frame(&header(16, &[DEFAULT_MAX_FRAME_SIZE]), &Limits::default()) {
        Err(TransportError::FrameTooLarge { max, .. }) => assert_eq!(max, DEFAULT_MAX_FRAME_SIZE),
        other => panic!("expected FrameTooLarge at the default limit, got {other:?}"),
    }
}

#[test]
fn frame_check_matches_what_decode_accepts() {
    // A frame exactly at the limit passes both the send and the receive check;
    // one byte more fails both.
    let frame = small_frame();
    let size = frame.wire_size();
    let at_limit = Limits { max_frame_size: size, ..Default::default() };
    frame.check(&at_limit).unwrap();
    decode_frame(&encode_frame(&frame), &at_limit).unwrap();
    let below = Limits { max_frame_size: size - 1, ..Default::default() };
    assert!(matches!(frame.check(&below), Err(TransportError::FrameTooLarge { .. })));
    assert!(matches!(decode_frame(&encode_frame(&frame), &below), Err(TransportError::FrameTooLarge { .. })));
}

#[test]
fn data_frame_index_out_of_range_is_invalid() {
    let frame = small_frame();
    assert_eq!(&frame.data_frame(2).unwrap()[..], b"defgh");
    assert!(matches!(frame.data_frame(3), Err(TransportError::Invalid(_))));
    assert!(matches!(frame.data_frame(NO_FRAME), Err(TransportError::Invalid(_))));
}

// ------------------------------------------------------------------ over TCP

#[tokio::test]
async fn data_frames_read_over_tcp_are_the_same_bytes() {
    let (client, mut server) = tcp_pair().await;
    // Several frames queued at once, so the writer coalesces them into one
    // vectored write: the reader must still see each frame intact and in order.
    let frames = vec![mixed_frame(), small_frame(), Frame::new(control()), mixed_frame()];
    for f in &frames {
        client.sender.send(f.clone()).unwrap();
    }
    for (i, want) in frames.iter().enumerate() {
        let got = recv(&mut server).await.unwrap().unwrap_or_else(|| panic!("connection closed before frame {i}"));
        assert_same_frame(&got, want);
    }
    // Dropping the last sender flushes and closes: a clean end between frames.
    drop(client);
    assert!(recv(&mut server).await.unwrap().is_none());
}

#[tokio::test]
async fn large_values_arrive_intact_and_their_memory_is_reused_by_the_next_one() {
    // Above bufpool::POOL_MIN: received into pooled memory.
    let (client, mut server) = tcp_pair().await;
    let part = |n: usize, seed: u8| Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>());
    let a = Frame { control: control(), data: vec![part(3, 1), part(40 << 20, 2), part(5, 3)], device: None };
    client.sender.send(a.clone()).unwrap();
    let got = recv(&mut server).await.unwrap().unwrap();
    assert_same_frame(&got, &a);
    let first = got.data[1].as_ptr() as usize - 3;
    drop(got);
    assert!(rdask_transport::bufpool::pooled_bytes() >= 40 << 20, "the freed buffer went back to the pool");
    let b = Frame { control: control(), data: vec![part(3, 4), part(40 << 20, 5), part(5, 6)], device: None };
    client.sender.send(b.clone()).unwrap();
    let got = recv(&mut server).await.unwrap().unwrap();
    assert_same_frame(&got, &b);
    assert_eq!(got.data[0].as_ptr() as usize, first, "the second value landed in the first one's memory");
}

#[tokio::test]
async fn oversized_send_fails_at_the_sender_and_the_connection_stays_usable() {
    let limits = Limits { max_frame_size: 64 * 1024, ..Default::default() };
    let (client, mut server) = tcp_pair_with(limits, Limits::default()).await;
    let big = Frame { control: control(), data: vec![Bytes::from(vec![7u8; 100 * 1024])], device: None };
    match client.sender.send(big.clone()) {
        Err(TransportError::FrameTooLarge { size, max }) => {
            assert_eq!(size, big.wire_size());
            assert_eq!(max, 64 * 1024);
        }
        other => panic!("expected FrameTooLarge at the sender, got {other:?}"),
    }
    // Nothing of the big frame went out; the next frames arrive as sent.
    client.sender.send(small_frame()).unwrap();
    client.sender.send(Frame::new(control())).unwrap();
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &small_frame());
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &Frame::new(control()));
    assert!(!client.sender.is_closed());
}

#[tokio::test]
async fn frame_over_the_receivers_limit_is_frame_too_large_at_the_receiver() {
    // The sender allows it, the receiver does not: the receiver must refuse
    // from the header alone, before reading the body.
    let (client, mut server) = tcp_pair_with(Limits::default(), Limits { max_frame_size: 4096, ..Default::default() }).await;
    client.sender.send(Frame { control: control(), data: vec![Bytes::from(vec![1u8; 10_000])], device: None }).unwrap();
    match recv(&mut server).await {
        Err(TransportError::FrameTooLarge { max: 4096, .. }) => {}
        other => panic!("expected FrameTooLarge at the receiver, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_from_a_raw_peer_makes_recv_fail() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // An HTTP request: n_data reads as "/ HT", far above MAX_DATA_FRAMES.
        ("http request", b"GET / HTTP/1.1\r\nHost: rdask\r\n\r\n".to_vec()),
        ("empty control part", header(0, &[])),
        ("too many data frames", {
            let mut h = header(4, &[]);
            h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            h
        }),
        ("overflowing lengths", header(4, &[u64::MAX, 2])),
        ("random bytes", pseudo_random(7, 64)),
    ];
    for (what, bytes) in cases {
        match recv_after_raw_peer_writes(&bytes, Limits::default()).await {
            Err(_) => {}
            Ok(f) => panic!("{what}: expected an error, got {:?}", f.map(|f| f.wire_size())),
        }
    }
}

#[tokio::test]
async fn truncated_frame_from_a_raw_peer_makes_recv_fail_at_every_cut() {
    // EOF is a clean close only between frames; anywhere inside one it is an
    // error, never a hang (waiting for bytes that cannot come) or a None.
    let bytes = encode_frame(&small_frame());
    for cut in 1..bytes.len() {
        match recv_after_raw_peer_writes(&bytes[..cut], Limits::default()).await {
            Err(TransportError::Malformed(m)) => assert!(m.contains("closed inside"), "cut {cut}: {m}"),
            other => panic!("cut at {cut} of {}: expected Malformed, got {:?}", bytes.len(), other.map(|f| f.is_some())),
        }
    }
    // Inside the data of a frame with a large data frame too.
    let big = encode_frame(&mixed_frame());
    let r = recv_after_raw_peer_writes(&big[..big.len() / 2], Limits::default()).await;
    assert!(matches!(r, Err(TransportError::Malformed(_))), "{:?}", r.map(|f| f.is_some()));
}

#[tokio::test]
async fn announced_size_is_not_allocated_before_the_bytes_arrive() {
    // Reproduction: connect to any rdask listener (scheduler, worker peer port)
    // and send `header(1 << 30, &[])`, i.e. 00 00 00 40 00 00 00 00, then
    // close. tcp.rs `read_frame` runs `control.resize(control_len)` first,
    // so one unauthenticated peer commits 1 GiB (4 GiB with 0xFFFFFFF0),
    // and a handful of them take the scheduler down. The reader should grow
    // its buffer as bytes arrive (or cap frames before the handshake).
    let announced: u32 = 1 << 30;
    let r = recv_after_raw_peer_writes(&header(announced, &[]), Limits::default()).await;
    assert!(matches!(r, Err(TransportError::Malformed(_))), "{:?}", r.map(|f| f.is_some()));
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    assert!(largest < (announced as usize) / 4, "the reader allocated {largest} bytes for an 8-byte header");
}

// ------------------------------------------------------------------ handshake

#[tokio::test]
async fn handshake_with_matching_version_reports_the_role() {
    for role in [Role::Client, Role::Worker, Role::Peer] {
        let (c, s) = handshake_over_tcp(PROTOCOL_VERSION, role, None, &[Role::Client, Role::Worker, Role::Peer], None).await;
        c.unwrap();
        assert_eq!(s.unwrap(), role);
    }
    // With the right token.
    let (c, s) = handshake_over_tcp(PROTOCOL_VERSION, Role::Worker, Some("s3cret"), &[Role::Worker], Some("s3cret")).await;
    c.unwrap();
    assert_eq!(s.unwrap(), Role::Worker);
}

#[tokio::test]
async fn connection_carries_messages_after_the_handshake() {
    let (mut c, mut s) = tcp_pair().await;
    let (a, b) = tokio::join!(handshake_connect(&mut c, Role::Client, None), handshake_accept(&mut s, &[Role::Client], None));
    a.unwrap();
    b.unwrap();
    let msg = FromClientMessage::ClusterInfo { request_id: 9 };
    c.sender.send(Frame::from_message(&msg)).unwrap();
    let got = recv(&mut s).await.unwrap().unwrap();
    assert_eq!(FromClientMessage::decode(&got.control).unwrap(), msg);
}

#[tokio::test]
async fn handshake_with_wrong_version_fails_on_both_sides() {
    let theirs = PROTOCOL_VERSION + 1;
    let (c, s) = handshake_over_tcp(theirs, Role::Client, None, &[Role::Client], None).await;
    match c {
        Err(TransportError::VersionMismatch { ours, theirs: t }) => assert_eq!((ours, t), (theirs, PROTOCOL_VERSION)),
        other => panic!("connector: expected VersionMismatch, got {other:?}"),
    }
    match s {
        Err(TransportError::VersionMismatch { ours, theirs: t }) => assert_eq!((ours, t), (PROTOCOL_VERSION, theirs)),
        other => panic!("acceptor: expected VersionMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_with_wrong_or_missing_token_is_refused() {
    for token in [Some("wrong"), None, Some("")] {
        let (c, s) = handshake_over_tcp(PROTOCOL_VERSION, Role::Client, token, &[Role::Client], Some("s3cret")).await;
        match c {
            Err(TransportError::Unauthorized(m)) => assert!(m.contains("token"), "connector, token {token:?}: {m}"),
            other => panic!("connector, token {token:?}: expected an Unauthorized error, got {other:?}"),
        }
        match s {
            Err(TransportError::Handshake(m)) => assert!(m.contains("token"), "acceptor, token {token:?}: {m}"),
            other => panic!("acceptor, token {token:?}: expected a Handshake error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn handshake_with_a_role_the_listener_does_not_serve_is_refused() {
    // A scheduler serves clients and workers, not peers; a worker's peer
    // listener serves only peers.
    let (c, s) = handshake_over_tcp(PROTOCOL_VERSION, Role::Peer, None, &[Role::Client, Role::Worker], None).await;
    match c {
        Err(TransportError::Handshake(m)) => assert!(m.contains("role 3"), "{m}"),
        other => panic!("connector: expected a Handshake error, got {other:?}"),
    }
    assert!(matches!(s, Err(TransportError::Handshake(_))), "acceptor: {s:?}");
    let (c, s) = handshake_over_tcp(PROTOCOL_VERSION, Role::Client, None, &[Role::Peer], None).await;
    assert!(matches!(c, Err(TransportError::Handshake(ref m)) if m.contains("not served")), "{c:?}");
    assert!(s.is_err());
}

#[tokio::test]
async fn handshake_with_an_unknown_role_byte_is_refused() {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Limits::default()).await.unwrap();
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    raw.write_all(&hello_bytes(PROTOCOL_VERSION, 9, b"")).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    let r = tokio::time::timeout(WAIT, handshake_accept(&mut conn, &[Role::Client, Role::Worker, Role::Peer], None)).await.unwrap();
    assert!(matches!(r, Err(TransportError::Handshake(ref m)) if m.contains("role 9")), "{r:?}");
}

#[tokio::test]
async fn handshake_from_a_non_rdask_peer_is_refused() {
    // A well-formed frame whose control part lacks the magic.
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Limits::default()).await.unwrap();
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    let mut c = AlignedVec::new();
    c.extend_from_slice(b"HELLO, WORLD");
    raw.write_all(&encode_frame(&Frame::new(c))).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    let r = tokio::time::timeout(WAIT, handshake_accept(&mut conn, &[Role::Client], None)).await.unwrap();
    assert!(matches!(r, Err(TransportError::Handshake(ref m)) if m.contains("magic")), "{r:?}");
    // The acceptor closes without a reply.
    drop(conn);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, raw.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(n, 0, "expected a close without a reply");
}

#[tokio::test(start_paused = true)]
async fn handshake_with_a_silent_peer_times_out() {
    // Paused time: the runtime jumps the clock when it has nothing else to
    // do, so the 10 s handshake timeout takes no real time.
    let real = std::time::Instant::now();

    // Accepting side, the connector never says hello.
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Limits::default()).await.unwrap();
    let _silent = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    let t0 = tokio::time::Instant::now();
    let r = handshake_accept(&mut conn, &[Role::Client], None).await;
    assert!(matches!(r, Err(TransportError::Timeout(_))), "acceptor: {r:?}");
    let waited = t0.elapsed();
    assert!(waited >= HANDSHAKE_TIMEOUT && waited < HANDSHAKE_TIMEOUT + Duration::from_secs(1), "waited {waited:?}");

    // Connecting side, the acceptor takes the connection and never answers.
    let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", raw_listener.local_addr().unwrap());
    let mut conn = rdask_transport::connect(&addr, Limits::default()).await.unwrap();
    let (_held, _) = raw_listener.accept().await.unwrap();
    let t0 = tokio::time::Instant::now();
    let r = handshake_connect(&mut conn, Role::Client, None).await;
    assert!(matches!(r, Err(TransportError::Timeout(_))), "connector: {r:?}");
    assert!(t0.elapsed() >= HANDSHAKE_TIMEOUT);

    assert!(real.elapsed() < Duration::from_secs(5), "paused time did not skip the wait");
}

#[tokio::test]
async fn token_over_the_length_limit_is_refused_before_sending() {
    let (mut c, _s) = tcp_pair().await;
    let long = "t".repeat(rdask_transport::handshake::MAX_TOKEN_LEN + 1);
    let r = handshake_connect(&mut c, Role::Client, Some(&long)).await;
    assert!(matches!(r, Err(TransportError::Handshake(ref m)) if m.contains("token")), "{r:?}");
}

#[tokio::test]
async fn a_hello_announcing_a_huge_frame_is_refused_before_anything_is_allocated() {
    // Before the token is checked, the acceptor reads at most a hello's
    // worth: a header announcing 512 MiB fails at once, without waiting for
    // (or reserving) the announced bytes.
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Limits::default()).await.unwrap();
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    raw.write_all(&header(512 << 20, &[])).await.unwrap();
    raw.write_all(&[0u8; 1024]).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    let r = tokio::time::timeout(WAIT, handshake_accept(&mut conn, &[Role::Client], Some("s3cret"))).await.expect("hung");
    match r {
        Err(TransportError::FrameTooLarge { size, max }) => {
            assert_eq!(size, 512 << 20);
            assert_eq!(max, rdask_transport::handshake::MAX_HANDSHAKE_FRAME);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // Data frames and a long length table count as well.
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    raw.write_all(&header(16, &[1 << 30])).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    let r = tokio::time::timeout(WAIT, handshake_accept(&mut conn, &[Role::Client], None)).await.expect("hung");
    assert!(matches!(r, Err(TransportError::FrameTooLarge { .. })), "{r:?}");
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    raw.write_all(&(16u32).to_le_bytes()).await.unwrap();
    raw.write_all(&(1u32 << 20).to_le_bytes()).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    let r = tokio::time::timeout(WAIT, handshake_accept(&mut conn, &[Role::Client], None)).await.expect("hung");
    assert!(matches!(r, Err(TransportError::FrameTooLarge { .. })), "{r:?}");
}

#[tokio::test]
async fn after_the_handshake_the_connection_takes_full_size_frames_again() {
    let (mut c, mut s) = tcp_pair().await;
    let (a, b) = tokio::join!(handshake_connect(&mut c, Role::Client, None), handshake_accept(&mut s, &[Role::Client], None));
    a.unwrap();
    b.unwrap();
    let big = Bytes::from(vec![7u8; 1 << 20]);
    c.sender.send(Frame::with_data(&FromClientMessage::Close, vec![big.clone()])).unwrap();
    let f = recv(&mut s).await.unwrap().unwrap();
    assert_eq!(f.data, vec![big]);
}

#[tokio::test(start_paused = true)]
async fn a_frame_that_stops_half_way_times_out_but_an_idle_connection_stays() {
    let limits = Limits { stall_timeout: Duration::from_secs(30), ..Default::default() };
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", limits).await.unwrap();
    let mut raw = TcpStream::connect(listener.address.trim_start_matches("tcp://")).await.unwrap();
    let mut conn = listener.accept().await.unwrap();
    // Idle for longer than the stall timeout between frames: fine.
    let idle = tokio::time::timeout(Duration::from_secs(120), conn.receiver.recv()).await;
    assert!(idle.is_err(), "an idle connection is not an error: {idle:?}");
    // Half a frame, then silence: the read fails after the stall timeout.
    let full = encode_frame(&Frame::with_data(&FromClientMessage::Close, vec![Bytes::from(vec![1u8; 4096])]));
    raw.write_all(&full[..full.len() / 2]).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(600), conn.receiver.recv()).await.expect("never timed out");
    assert!(matches!(r, Err(TransportError::Timeout(_))), "{r:?}");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(30) && waited < Duration::from_secs(35), "{waited:?}");
}

#[test]
fn tokens_compare_equal_only_when_identical() {
    use rdask_transport::handshake::tokens_equal;
    assert!(tokens_equal(b"s3cret", b"s3cret"));
    assert!(tokens_equal(b"", b""));
    for other in [&b"s3cres"[..], b"s3cre", b"s3cret!", b"", b"S3cret", b"\0s3cret"] {
        assert!(!tokens_equal(b"s3cret", other), "{other:?}");
        assert!(!tokens_equal(other, b"s3cret"), "{other:?}");
    }
}

#[tokio::test]
async fn the_handshake_gate_refuses_connections_over_its_cap_and_reopens() {
    let gate = rdask_transport::handshake::HandshakeGate::new(2);
    let a = gate.try_enter().expect("first");
    let _b = gate.try_enter().expect("second");
    assert!(gate.try_enter().is_none(), "a third pending handshake is refused");
    drop(a);
    assert!(gate.try_enter().is_some(), "a finished handshake frees its place");
}

#[test]
fn the_warning_limiter_lets_one_line_through_per_interval_and_counts_the_rest() {
    let limiter = rdask_transport::warn_limit::WarnLimiter::new(Duration::from_millis(200));
    assert_eq!(limiter.allow(), Some(0));
    assert_eq!(limiter.allow(), None);
    assert_eq!(limiter.allow(), None);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(limiter.allow(), Some(2), "the next line says how many were held back");
}

// ------------------------------------------------------------------ archive validation

fn samples_from_client() -> Vec<FromClientMessage> {
    vec![
        FromClientMessage::Submit(SubmitGraph {
            submit_id: 7,
            graph_id: 3,
            graph_tasks: 2,
            more: true,
            keys: vec!["a".into(), "a-key-longer-than-eight-bytes".into(), "existing".into()],
            tasks: vec![
                TaskSpec { deps: vec![], user_priority: -1, order: Some(5), payload: 0, want: false, retries: 2, restriction: 0 },
                TaskSpec { deps: vec![0, 2], user_priority: 3, order: None, payload: NO_FRAME, want: true, retries: 0, restriction: NO_FRAME },
            ],
            restrictions: vec![Restriction {
                workers: vec!["w-1".into()],
                resources: vec![Resource { name: "GPU".into(), amount: 1.0 }],
                loose: true,
            }],
        }),
        FromClientMessage::Release { keys: vec!["some-released-key".into()] },
        FromClientMessage::WhoHas { request_id: 1, keys: vec!["x".into(), "y-is-long-enough".into()] },
        FromClientMessage::TaskStream { request_id: 2, since_us: 1_796_000_000_000_000 },
        FromClientMessage::Coord {
            request_id: 9,
            op: rdask_transport::protocol::CoordOp::Acquire { names: vec!["lock-a".into(), "lock-b".into()], max_leases: 1, count: 0, lease: 4 },
        },
        FromClientMessage::Coord {
            request_id: 10,
            op: rdask_transport::protocol::CoordOp::QueuePut { name: "q".into(), key: Some("inc-7".into()) },
        },
    ]
}

fn samples_to_client() -> Vec<ToClientMessage> {
    vec![
        ToClientMessage::Welcome { client_id: ClientId(3), scheduler_id: "rdask-scheduler-1234".into() },
        ToClientMessage::TaskStream {
            request_id: 2,
            events: vec![StreamEvent {
                key: "inc-1".into(),
                worker: "tcp://127.0.0.1:4000".into(),
                thread: 1,
                start_us: 10,
                stop_us: 20,
                ok: true,
            }],
        },
        ToClientMessage::Erred(vec![KeyErred {
            key: "dependent-key".into(),
            failed_key: "failing-key".into(),
            message: "null task failed on purpose".into(),
            payload: 0,
        }]),
        ToClientMessage::WhoHas {
            request_id: 5,
            found: vec![KeyLocation { key: "k".into(), task: TaskId(77), size: 8, addresses: vec!["tcp://127.0.0.1:4000".into()] }],
            missing: vec!["gone-missing-key".into()],
        },
        ToClientMessage::Coord {
            request_id: 10,
            outcome: rdask_transport::protocol::CoordOutcome::Values(vec![Some("inc-7".into()), None]),
        },
    ]
}

fn samples_from_worker() -> Vec<FromWorkerMessage> {
    vec![
        FromWorkerMessage::Register(WorkerInfo {
            name: "worker-name-0".into(),
            address: "tcp://127.0.0.1:40000".into(),
            nthreads: 4,
            memory_limit: 1 << 30,
            resources: vec![Resource { name: "GPU".into(), amount: 2.0 }],
            placement: Placement {
                host: "node-7".into(),
                cpus: vec![0, 1, 2, 3],
                numa_node: Some(0),
                gpu: Some("0: NVIDIA A100-SXM4-40GB (0000:07:00.0)".into()),
                local_directory: "/scratch/rdask".into(),
            },
        }),
        FromWorkerMessage::Failed(vec![FailedTask { id: TaskId(9), message: "it broke badly".into(), payload: NO_FRAME }]),
        FromWorkerMessage::FetchFailed(vec![FetchFailure { task: TaskId(1), dep: TaskId(2), holder: WorkerId(3) }]),
        FromWorkerMessage::Executing { tasks: vec![TaskId(5), TaskId(6)], confirm: true },
        FromWorkerMessage::Leaving,
        FromWorkerMessage::Spans(vec![TaskSpan { id: TaskId(5), start_us: 1, stop_us: 2, thread: 0, ok: true }]),
        FromWorkerMessage::Paused(true),
    ]
}

fn samples_to_worker() -> Vec<ToWorkerMessage> {
    vec![
        ToWorkerMessage::Compute(ComputeBatch {
            tasks: vec![ComputeTask {
                id: TaskId(10),
                key: "compute-this-key".into(),
                user_priority: 0,
                order: -3,
                payload: 0,
                deps: vec![DepInfo { id: TaskId(4), size: 8, holders: vec![WorkerId(1), WorkerId(2)].into() }],
                careful: true,
                resources: 0,
            }],
            peers: vec![PeerAddress { id: WorkerId(1), address: "tcp://127.0.0.1:40001".into() }],
            resource_sets: vec![vec![Resource { name: "GPU".into(), amount: 1.0 }]],
        }),
        ToWorkerMessage::Release(vec![TaskId(1), TaskId(2)]),
        ToWorkerMessage::Error { message: "the scheduler could not accept that".into() },
        ToWorkerMessage::ExecutingSeen(vec![TaskId(5)]),
        ToWorkerMessage::ReportSpans(true),
    ]
}

fn samples_to_peer() -> Vec<ToPeerMessage> {
    vec![ToPeerMessage::Fetch { request_id: 1, tasks: vec![TaskId(1), TaskId(1 << 40)], ipc: None, direct: Some(rdask_transport::protocol::MemoryKind::Cuda) }, ToPeerMessage::Release { request_id: 1 }]
}

fn samples_from_peer() -> Vec<FromPeerMessage> {
    vec![FromPeerMessage::Data {
        request_id: 1,
        items: vec![
            DataItem { id: TaskId(1), found: true, first: 0, count: 2, error: None, partial: false },
            DataItem { id: TaskId(2), found: false, first: 0, count: 0, error: None, partial: false },
            DataItem { id: TaskId(3), found: true, first: 2, count: 1, error: Some("TypeError: cannot pickle".into()), partial: false },
        ],
        more: true,
    }]
}

fn aligned(bytes: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

/// `access` of bytes that are not an archive of `M` must be `Err(Invalid)`.
fn assert_rejected<M: WireMessage>(bytes: &[u8], what: &str) {
    match M::access(&aligned(bytes)) {
        Err(TransportError::Invalid(_)) => {}
        Err(e) => panic!("{what}: expected Invalid, got {e:?}"),
        Ok(_) => panic!("{what}: {} bytes validated as {}", bytes.len(), std::any::type_name::<M>()),
    }
}

/// `access` of arbitrary bytes must not panic; an error must be `Invalid`,
/// and bytes it accepts must be a complete message (they deserialise).
/// Returns whether the bytes were rejected.
fn access_is_sound<M: WireMessage>(bytes: &[u8], what: &str) -> bool {
    let buf = aligned(bytes);
    match M::access(&buf) {
        Err(TransportError::Invalid(_)) => true,
        Err(e) => panic!("{what}: expected Invalid, got {e:?}"),
        Ok(_) => {
            M::decode(&buf).unwrap_or_else(|e| panic!("{what}: validated but does not deserialise: {e}"));
            false
        }
    }
}

/// Validation of control archives, for one message type.
///
/// rkyv puts the root object at the *end* of the buffer and the format has
/// no length or checksum, so a buffer cut short can happen to look like
/// another, smaller message of the same type (e.g. zeros read as
/// `ToWorkerMessage::Registered`); the frame's exact control length is what
/// protects the receiver. So this checks what validation can promise:
/// * every sample round-trips;
/// * an impossible enum tag (0xFF in the root's first byte) is `Invalid`;
/// * a buffer too short to hold the root, or whose root would be misaligned,
///   is `Invalid` (this covers most cuts of a real archive);
/// * every other cut, and random bytes, never panic; what is accepted
///   deserialises; and nearly all random buffers are rejected.
fn check_validation<M: WireMessage + PartialEq + std::fmt::Debug>(samples: Vec<M>) {
    let name = std::any::type_name::<M>();
    let root_size = std::mem::size_of::<M::Archived>();
    let root_align = std::mem::align_of::<M::Archived>();
    for (s, sample) in samples.iter().enumerate() {
        let bytes = sample.encode();
        assert_eq!(&M::decode(&bytes).unwrap(), sample, "{name} sample {s} does not round-trip");
        let mut bad_tag = bytes.to_vec();
        bad_tag[bytes.len() - root_size] = 0xFF;
        assert_rejected::<M>(&bad_tag, &format!("{name} sample {s} with tag 0xFF"));
        for cut in 0..bytes.len() {
            let what = format!("{name} sample {s} cut at {cut} of {}", bytes.len());
            if cut < root_size || (cut - root_size) % root_align != 0 {
                assert_rejected::<M>(&bytes[..cut], &what);
            } else {
                access_is_sound::<M>(&bytes[..cut], &what);
            }
        }
    }
    let tries = 1000u64;
    let mut rejected = 0;
    for seed in 0..tries {
        let len = root_size + (seed as usize * 8) % 256;
        rejected += access_is_sound::<M>(&pseudo_random(seed + 100, len), &format!("{name} random bytes, seed {seed}")) as u64;
    }
    assert!(rejected * 10 >= tries * 9, "{name}: only {rejected} of {tries} random buffers were rejected");
    for len in [0, 1, 8, 16, 64, 256] {
        assert_rejected::<M>(&vec![0xFF; len], &format!("{name} {len} bytes of 0xFF"));
    }
}

#[test]
fn from_client_message_rejects_bad_archives() {
    check_validation(samples_from_client());
}

#[test]
fn to_client_message_rejects_bad_archives() {
    check_validation(samples_to_client());
}

#[test]
fn from_worker_message_rejects_bad_archives() {
    check_validation(samples_from_worker());
}

#[test]
fn to_worker_message_rejects_bad_archives() {
    check_validation(samples_to_worker());
}

#[test]
fn to_peer_message_rejects_bad_archives() {
    check_validation(samples_to_peer());
}

#[test]
fn from_peer_message_rejects_bad_archives() {
    check_validation(samples_from_peer());
}
