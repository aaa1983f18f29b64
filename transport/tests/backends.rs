//! The transport contract, run over every network backend: TCP always, UCX
//! when this build has it. One body per case, instantiated per backend by
//! `over_backends!`, so a backend cannot pass by having its own easier copy.
//!
//! UCX reads its configuration once per process, so the UCX cases also run
//! in child processes of this test binary with `UCX_TLS=tcp` and with shared
//! memory, and with UCX's peer-failure handling on every endpoint as between
//! hosts (`ucx_cases_over_each_ucx_transport`).

mod common;
use common::{assert_same_frame, control, small_frame};
use std::time::Duration;

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_accept, handshake_connect, Role};
use rdask_transport::protocol::*;
use rdask_transport::rkyv::util::AlignedVec;
use rdask_transport::{Connection, Frame, Limits, TransportError, WireMessage};

const WAIT: Duration = Duration::from_secs(30);

fn pattern(seed: u8, n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

fn mixed_frame(seed: u8) -> Frame {
    Frame {
        control: control(),
        data: vec![Bytes::new(), Bytes::from_static(b"x"), pattern(seed, 3 * 1024 * 1024 + 17), Bytes::new(), pattern(seed ^ 1, 40_000), pattern(seed ^ 2, 1000)],
        device: None,
    }
}

async fn pair_with(scheme: &str, connect_limits: Limits, accept_limits: Limits) -> (Connection, Connection) {
    let mut listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), accept_limits).await.unwrap();
    assert!(listener.address.starts_with(&format!("{scheme}://127.0.0.1:")), "{}", listener.address);
    let client = tokio::time::timeout(WAIT, rdask_transport::connect(&listener.address, connect_limits)).await.expect("connect hung").unwrap();
    let server = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
    (client, server)
}

async fn pair(scheme: &str) -> (Connection, Connection) {
    pair_with(scheme, Limits::default(), Limits::default()).await
}

async fn recv(conn: &mut Connection) -> rdask_transport::Result<Option<Frame>> {
    tokio::time::timeout(WAIT, conn.receiver.recv()).await.expect("recv hung")
}

// ------------------------------------------------------------------ the cases

async fn frames_arrive_intact_and_in_order(scheme: &str) {
    let (client, mut server) = pair(scheme).await;
    // Large (rendezvous on UCX) and small (eager) frames interleaved: a small
    // one completes before the large one before it, and must still wait its turn.
    let frames: Vec<Frame> = (0..12u8).map(|i| if i % 3 == 0 { mixed_frame(i) } else { small_frame() }).collect();
    for f in &frames {
        client.sender.send(f.clone()).unwrap();
    }
    for (i, want) in frames.iter().enumerate() {
        let got = recv(&mut server).await.unwrap().unwrap_or_else(|| panic!("closed before frame {i}"));
        assert_same_frame(&got, want);
    }
    // Both directions.
    server.sender.send(mixed_frame(99)).unwrap();
    let mut client = client;
    assert_same_frame(&recv(&mut client).await.unwrap().unwrap(), &mixed_frame(99));
    // Dropping the last sender closes cleanly, after everything sent.
    server.sender.send(small_frame()).unwrap();
    drop(server.sender);
    assert_same_frame(&recv(&mut client).await.unwrap().unwrap(), &small_frame());
    assert!(recv(&mut client).await.unwrap().is_none(), "a clean close reads as the end");
}

async fn a_frame_with_many_data_frames_arrives_intact(scheme: &str) {
    let (client, mut server) = pair(scheme).await;
    // A reply with thousands of values, a few of them large.
    let data: Vec<Bytes> = (0..5000).map(|i| if i % 1000 == 7 { pattern(i as u8, 100_000) } else { pattern(i as u8, i % 50) }).collect();
    let f = Frame { control: control(), data, device: None };
    client.sender.send(f.clone()).unwrap();
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &f);
}

async fn a_large_value_arrives_intact(scheme: &str) {
    let (client, mut server) = pair(scheme).await;
    let f = Frame { control: control(), data: vec![pattern(3, 3), pattern(5, 200 << 20), pattern(7, 5)], device: None };
    client.sender.send(f.clone()).unwrap();
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &f);
}

async fn frames_with_large_control_messages_arrive_intact(scheme: &str) {
    // A graph submission is one large control message: sizes around the
    // eager/rendezvous switch, with and without a large value beside it.
    let (client, mut server) = pair(scheme).await;
    let mut frames = Vec::new();
    for (i, control_len) in [20_000usize, 70_000, 300_000, 3 << 20].into_iter().enumerate() {
        let mut control = AlignedVec::new();
        control.extend_from_slice(&pattern(i as u8, control_len));
        frames.push(Frame { control: control.clone(), data: vec![], device: None });
        frames.push(Frame { control, data: vec![pattern(9, 10), pattern(i as u8, 2 << 20)], device: None });
    }
    for f in &frames {
        client.sender.send(f.clone()).unwrap();
    }
    for want in &frames {
        assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), want);
    }
}

async fn several_large_frames_queued_at_once_arrive_in_order(scheme: &str) {
    // More than UCX's receiver takes at once (256 MiB): the rest wait their
    // turn, small frames between them included.
    let (client, mut server) = pair(scheme).await;
    let big = pattern(1, 120 << 20);
    for i in 0..5u8 {
        client.sender.send(Frame { control: control(), data: vec![Bytes::from(vec![i]), big.clone()], device: None }).unwrap();
        client.sender.send(Frame { control: control(), data: vec![Bytes::from(vec![100 + i])], device: None }).unwrap();
    }
    for i in 0..5u8 {
        let f = recv(&mut server).await.unwrap().unwrap();
        assert_eq!(f.data[0][..], [i]);
        assert!(f.data[1] == big, "large frame {i} intact");
        let f = recv(&mut server).await.unwrap().unwrap();
        assert_eq!(f.data[0][..], [100 + i]);
    }
}

async fn a_malformed_frame_fails_its_connection_only(scheme: &str) {
    // An empty control part is never valid: the receiver refuses the frame,
    // the connection is done, the listener serves the next one.
    let mut listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), Limits::default()).await.unwrap();
    let bad = rdask_transport::connect(&listener.address, Limits::default()).await.unwrap();
    let mut server = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
    bad.sender.send(Frame { control: AlignedVec::new(), data: vec![Bytes::from_static(b"junk")], device: None }).unwrap();
    assert!(matches!(recv(&mut server).await, Err(TransportError::Malformed(_))));
    let good = rdask_transport::connect(&listener.address, Limits::default()).await.unwrap();
    let mut server = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
    good.sender.send(small_frame()).unwrap();
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &small_frame());
}

async fn oversized_send_fails_at_the_sender_and_the_connection_stays_usable(scheme: &str) {
    let limits = Limits { max_frame_size: 64 * 1024, ..Default::default() };
    let (client, mut server) = pair_with(scheme, limits, Limits::default()).await;
    let big = Frame { control: control(), data: vec![Bytes::from(vec![7u8; 100 * 1024])], device: None };
    assert!(matches!(client.sender.send(big), Err(TransportError::FrameTooLarge { max: 65536, .. })));
    client.sender.send(small_frame()).unwrap();
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &small_frame());
}

async fn a_frame_over_the_receivers_limit_is_refused_there(scheme: &str) {
    let (client, mut server) = pair_with(scheme, Limits::default(), Limits { max_frame_size: 4096, ..Default::default() }).await;
    client.sender.send(Frame { control: control(), data: vec![Bytes::from(vec![1u8; 10_000])], device: None }).unwrap();
    match recv(&mut server).await {
        Err(TransportError::FrameTooLarge { max: 4096, .. }) => {}
        other => panic!("expected FrameTooLarge at the receiver, got {other:?}"),
    }
    // The large rendezvous case too (UCX refuses before receiving the body).
    let (client, mut server) = pair_with(scheme, Limits::default(), Limits { max_frame_size: 1 << 20, ..Default::default() }).await;
    client.sender.send(Frame { control: control(), data: vec![Bytes::from(vec![1u8; 8 << 20])], device: None }).unwrap();
    assert!(matches!(recv(&mut server).await, Err(TransportError::FrameTooLarge { .. })));
}

async fn the_handshake_runs_and_refuses_a_wrong_token(scheme: &str) {
    let (mut c, mut s) = pair(scheme).await;
    let (a, b) = tokio::join!(handshake_connect(&mut c, Role::Client, Some("s3cret")), handshake_accept(&mut s, &[Role::Client], Some("s3cret")));
    a.unwrap();
    assert_eq!(b.unwrap(), Role::Client);
    let msg = FromClientMessage::ClusterInfo { request_id: 9 };
    c.sender.send(Frame::with_data(&msg, vec![Bytes::from(vec![7u8; 1 << 20])])).unwrap();
    let got = recv(&mut s).await.unwrap().unwrap();
    assert_eq!(FromClientMessage::decode(&got.control).unwrap(), msg);
    assert_eq!(got.data[0].len(), 1 << 20);

    let (mut c, mut s) = pair(scheme).await;
    let (a, b) = tokio::join!(handshake_connect(&mut c, Role::Client, Some("wrong")), handshake_accept(&mut s, &[Role::Client], Some("s3cret")));
    assert!(matches!(a, Err(TransportError::Unauthorized(_))), "{a:?}");
    assert!(b.is_err());
}

async fn connecting_to_nothing_fails_with_a_clear_error(scheme: &str) {
    // A port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = tokio::time::timeout(WAIT, rdask_transport::connect(&format!("{scheme}://127.0.0.1:{port}"), Limits::default())).await.expect("connect hung");
    match r {
        Err(e) => assert!(e.to_string().to_lowercase().contains("refused") || e.to_string().contains("unreachable"), "{e}"),
        Ok(mut c) => {
            // UCX may hand out the endpoint before it learns the peer is absent;
            // then the first read says so.
            let r = recv(&mut c).await;
            assert!(r.is_err(), "a connection to nothing must fail: {:?}", r.map(|f| f.is_some()));
        }
    }
}

async fn many_connections_to_one_listener(scheme: &str) {
    let mut listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), Limits::default()).await.unwrap();
    let addr = listener.address.clone();
    let clients = tokio::spawn(async move {
        let mut v = Vec::new();
        for i in 0..40u8 {
            let c = rdask_transport::connect(&addr, Limits::default()).await.unwrap();
            c.sender.send(Frame { control: control(), data: vec![pattern(i, 1000 + i as usize)], device: None }).unwrap();
            v.push(c);
        }
        v
    });
    let mut seen = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
        let f = recv(&mut s).await.unwrap().unwrap();
        seen.push(f.data[0].len() - 1000);
    }
    seen.sort();
    assert_eq!(seen, (0..40).collect::<Vec<_>>());
    drop(clients.await.unwrap());
}

async fn a_dropped_listener_stops_accepting(scheme: &str) {
    let listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), Limits::default()).await.unwrap();
    let addr = listener.address.clone();
    drop(listener);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = tokio::time::timeout(WAIT, async {
        let mut c = rdask_transport::connect(&addr, Limits::default()).await?;
        c.receiver.recv().await
    })
    .await
    .expect("hung");
    assert!(r.is_err(), "connected to a dropped listener");
}

/// A peer in another process (this test binary, run as `child_peer`) that
/// connects and streams 64 MiB frames until it is killed mid-transfer: the
/// reading side gets an error or an end, not a hang, and the listener keeps
/// serving.
async fn a_peer_process_killed_mid_transfer_ends_its_connection_only(scheme: &str) {
    let mut listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), Limits::default()).await.unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_peer", "--nocapture", "--test-threads=1"])
        .env("RDASK_TEST_PEER", &listener.address)
        .env("RDASK_UCX_PEER_ERRORS", other_failure_mode())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut conn = tokio::time::timeout(WAIT, listener.accept()).await.expect("the child never connected").unwrap();
    // Between processes UCX may pick other transports (shared memory) than
    // inside one: large control messages first.
    for n in [20_000usize, 300_000] {
        let f = recv(&mut conn).await.unwrap().expect("the child closed at once");
        assert_eq!(&f.control[..], &pattern(7, n)[..]);
    }
    let first = recv(&mut conn).await.unwrap().expect("the child closed at once");
    assert_eq!(first.data[0].len(), 64 << 20);
    assert!(first.data[0].iter().step_by(4099).all(|b| *b == 0x5a), "the child's bytes arrive intact");
    child.kill().unwrap();
    child.wait().unwrap();
    // Frames already on their way may still come; then the end.
    let end = loop {
        match recv(&mut conn).await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    eprintln!("{scheme}: after the kill the reader got {end:?}");
    // The listener still serves others.
    let addr = listener.address.clone();
    let mut c = rdask_transport::connect(&addr, Limits::default()).await.unwrap();
    let mut s = tokio::time::timeout(WAIT, listener.accept()).await.expect("accept hung").unwrap();
    c.sender.send(small_frame()).unwrap();
    assert_same_frame(&recv(&mut s).await.unwrap().unwrap(), &small_frame());
    s.sender.send(small_frame()).unwrap();
    assert_same_frame(&recv(&mut c).await.unwrap().unwrap(), &small_frame());
}

/// The child peer asks for the other UCX failure-handling mode than this
/// process: the accepting side takes the client's (UCX refuses an endpoint
/// whose sides ask for different ones).
fn other_failure_mode() -> &'static str {
    if std::env::var("RDASK_UCX_PEER_ERRORS").is_ok_and(|v| v == "1") {
        "0"
    } else {
        "1"
    }
}

/// A peer process that dies while its connection is idle (both sides
/// waiting, nothing in flight): the reading side learns it, not a hang.
async fn a_peer_process_killed_while_idle_ends_its_connection(scheme: &str) {
    let mut listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), Limits::default()).await.unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_peer", "--nocapture", "--test-threads=1"])
        .env("RDASK_TEST_PEER", &listener.address)
        .env("RDASK_TEST_PEER_IDLE", "1")
        .env("RDASK_UCX_PEER_ERRORS", other_failure_mode())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut conn = tokio::time::timeout(WAIT, listener.accept()).await.expect("the child never connected").unwrap();
    let hello = recv(&mut conn).await.unwrap().expect("the child closed at once");
    assert_same_frame(&hello, &small_frame());
    // Let any traffic settle: the connection is idle when the child dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let end = tokio::time::timeout(WAIT, recv(&mut conn)).await.expect("a dead idle peer was never noticed");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    eprintln!("{scheme}: after the idle kill the reader got {end:?}");
}

/// A device frame (`rdask_transport::device`): host memory stands for the
/// device here, which every UCX build carries; TCP carries none and says so
/// at the sender. In order with plain frames, its host part intact.
async fn device_frames_go_where_the_transport_carries_them(scheme: &str) {
    use rdask_transport::device::{DevicePayload, MemoryKind};
    let (client, mut server) = pair(scheme).await;
    // A device frame's host part is its control message alone.
    let bare = || Frame { control: control(), data: vec![], device: None };
    let device_frame = |payload: Bytes| Frame { device: Some(DevicePayload::host(payload)), ..bare() };
    if scheme == "tcp" {
        assert!(!client.sender.carries(MemoryKind::Host) && !client.sender.carries(MemoryKind::Cuda));
        let err = client.sender.send(device_frame(pattern(1, 100))).unwrap_err();
        assert!(err.to_string().contains("cannot carry Host memory"), "{err}");
        client.sender.send(small_frame()).unwrap();
        assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &small_frame());
        return;
    }
    assert!(client.sender.carries(MemoryKind::Host));
    // A host part over the limit is refused before it is queued.
    let mut control = AlignedVec::new();
    control.extend_from_slice(&pattern(3, 2000));
    let too_big = Frame { control, data: vec![], device: Some(DevicePayload::host(pattern(1, 10))) };
    assert!(client.sender.send(too_big).unwrap_err().to_string().contains("host part"));
    // So is one with data frames, or an empty payload.
    assert!(client.sender.send(Frame { device: Some(DevicePayload::host(pattern(1, 10))), ..small_frame() }).is_err());
    assert!(client.sender.send(device_frame(Bytes::new())).is_err());
    let (big, small) = (pattern(9, (3 << 20) + 5), pattern(4, 10));
    for f in [small_frame(), device_frame(big.clone()), device_frame(small.clone()), small_frame()] {
        client.sender.send(f).unwrap();
    }
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &small_frame());
    for want in [big, small] {
        let mut got = recv(&mut server).await.unwrap().unwrap();
        let payload = got.device.take().expect("the device payload");
        assert_eq!((payload.kind(), payload.len()), (MemoryKind::Host, want.len()));
        assert_same_frame(&got, &bare());
        assert!(payload.into_host_bytes().unwrap() == want, "the payload's bytes differ");
    }
    assert_same_frame(&recv(&mut server).await.unwrap().unwrap(), &small_frame());
}

/// The child side of the tests above; does nothing unless run by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_peer() {
    let Ok(addr) = std::env::var("RDASK_TEST_PEER") else { return };
    let c = rdask_transport::connect(&addr, Limits::default()).await.unwrap();
    if std::env::var_os("RDASK_TEST_PEER_IDLE").is_some() {
        c.sender.send(small_frame()).unwrap();
        std::future::pending::<()>().await;
    }
    for n in [20_000usize, 300_000] {
        let mut control = AlignedVec::new();
        control.extend_from_slice(&pattern(7, n));
        c.sender.send(Frame { control, data: vec![], device: None }).unwrap();
    }
    let value = Bytes::from(vec![0x5au8; 64 << 20]);
    loop {
        if c.sender.send(Frame { control: control(), data: vec![value.clone()], device: None }).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The UCX cases again, in child processes restricted to one transport
/// choice each: TCP alone, and shared memory (with TCP, which UCX needs to
/// set up client-server connections). The peer-process case then moves its
/// 64 MiB frames through shared memory between two processes.
#[cfg(feature = "ucx")]
#[test]
fn ucx_cases_over_each_ucx_transport() {
    if std::env::var_os("RDASK_UCX_VARIANT").is_some() {
        return;
    }
    if rdask_transport::ucx_status().is_err() && std::env::var_os("RDASK_REQUIRE_UCX").is_none() {
        eprintln!("skipped: UCX is not available here");
        return;
    }
    // Between a host's processes endpoints leave out UCX's peer-failure
    // handling (`RDASK_UCX_PEER_ERRORS=auto`); endpoints to other hosts ask
    // for it, and the last run makes these use it too.
    for (tls, peer_errors) in [("tcp", "auto"), ("shm,tcp", "auto"), ("shm,tcp", "1")] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["ucx::", "--test-threads=1"])
            .env("UCX_TLS", tls)
            .env("RDASK_UCX_PEER_ERRORS", peer_errors)
            .env("RDASK_UCX_VARIANT", tls)
            .env("RDASK_REQUIRE_UCX", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "UCX_TLS={tls} RDASK_UCX_PEER_ERRORS={peer_errors}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("15 passed"), "UCX_TLS={tls} RDASK_UCX_PEER_ERRORS={peer_errors}: not every case ran:\n{stdout}");
    }
}

macro_rules! over_backends {
    ($($case:ident),* $(,)?) => {
        mod tcp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case("tcp").await
                }
            )*
        }
        #[cfg(feature = "ucx")]
        mod ucx {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Err(why) = rdask_transport::ucx_status() {
                        // CI (ci/test.sh) installs UCX and sets this: there a
                        // missing UCX is a failure, not a skip.
                        if std::env::var_os("RDASK_REQUIRE_UCX").is_some() {
                            panic!("UCX cannot start here: {why}");
                        }
                        eprintln!("skipped: {why}");
                        return;
                    }
                    super::$case("ucx").await
                }
            )*
        }
    };
}

over_backends!(
    frames_arrive_intact_and_in_order,
    a_frame_with_many_data_frames_arrives_intact,
    a_large_value_arrives_intact,
    frames_with_large_control_messages_arrive_intact,
    several_large_frames_queued_at_once_arrive_in_order,
    a_malformed_frame_fails_its_connection_only,
    oversized_send_fails_at_the_sender_and_the_connection_stays_usable,
    a_frame_over_the_receivers_limit_is_refused_there,
    the_handshake_runs_and_refuses_a_wrong_token,
    connecting_to_nothing_fails_with_a_clear_error,
    many_connections_to_one_listener,
    a_dropped_listener_stops_accepting,
    a_peer_process_killed_mid_transfer_ends_its_connection_only,
    a_peer_process_killed_while_idle_ends_its_connection,
    device_frames_go_where_the_transport_carries_them,
);

/// Built without UCX (`--no-default-features`, as ci/test.sh also builds
/// it): TCP works and `ucx://` fails with one line saying why.
#[cfg(not(feature = "ucx"))]
#[tokio::test]
async fn without_the_ucx_feature_ucx_addresses_say_why() {
    let why = rdask_transport::ucx_status().unwrap_err();
    assert!(why.contains("built without") && !why.contains('\n'), "{why}");
    let err = rdask_transport::connect("ucx://127.0.0.1:1", Limits::default()).await.err().expect("ucx:// must fail");
    assert!(err.to_string().contains("built without"), "{err}");
    assert_eq!(rdask_transport::choose_scheme(Some("auto"), false), Ok("tcp"));
    assert!(rdask_transport::choose_scheme(Some("ucx"), false).unwrap_err().contains("--protocol ucx"));
}
