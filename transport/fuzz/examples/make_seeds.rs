//! Writes the seed inputs of the fuzz targets into `seeds/<target>/`: valid
//! encodings made with the transport's own code, so the fuzzer starts from
//! inputs that get past validation. The files are committed; rerun after a
//! protocol change:
//!
//! ```text
//! cargo +nightly run --manifest-path transport/fuzz/Cargo.toml --example make_seeds
//! ```

use std::path::{Path, PathBuf};

use rdask_transport::bytes::Bytes;
use rdask_transport::frame::{encode_frame, Frame, Limits};
use rdask_transport::handshake::{handshake_connect, Role};
use rdask_transport::protocol::*;
use rdask_transport::{inproc, ClientId, TaskId, WireMessage, WorkerId};

/// Must match the token of fuzz_targets/handshake.rs.
const TOKEN: &str = "fuzz-token-0123456789";

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn with_selector(sel: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(bytes);
    v
}

/// The hello frame `handshake_connect` sends for `role` and `token`.
fn hello(role: Role, token: Option<&'static str>) -> Frame {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let (mut client, mut server) = inproc::pair("seed-client", "seed-server", Limits::default());
        // No answer comes (the server end is dropped): only the hello matters.
        let connect = tokio::spawn(async move { handshake_connect(&mut client, role, token).await });
        let frame = server.receiver.recv().await.unwrap().unwrap();
        drop(server);
        let _ = connect.await;
        frame
    })
}

fn worker_load() -> WorkerLoad {
    let device = DeviceLoad { bytes: 1 << 30, limit: 2 << 30, spilled_bytes: 1 << 20, spilled_values: 1, ..DeviceLoad::default() };
    WorkerLoad { running: 2, queued: 5, stored_bytes: 1 << 20, cpu_percent: 150.0, rss: 1 << 30, device, ..WorkerLoad::default() }
}

fn placement() -> Placement {
    Placement { host: "node1".into(), cpus: vec![0, 1, 2], numa_node: Some(0), gpu: Some("0: GPU".into()), local_directory: "/tmp".into() }
}

fn messages() -> Vec<(u8, Vec<u8>)> {
    let t = TaskId(7);
    let w = WorkerId(3);
    let res = Resource { name: "GPU".into(), amount: 1.0 };
    let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
    for m in [
        FromClientMessage::Submit(SubmitGraph {
            submit_id: 1,
            graph_id: 2,
            more: false,
            graph_tasks: 2,
            keys: vec!["a".into(), "b".into(), "x".into()],
            tasks: vec![
                TaskSpec { deps: vec![2], user_priority: 0, order: None, payload: 0, want: true, retries: 0, restriction: NO_FRAME },
                TaskSpec { deps: vec![0, 2], user_priority: -1, order: Some(4), payload: 1, want: false, retries: 2, restriction: 0 },
            ],
            restrictions: vec![Restriction { workers: vec!["w1".into()], resources: vec![res.clone()], loose: true }],
        }),
        FromClientMessage::Release { keys: vec!["a".into()] },
        FromClientMessage::WhoHas { request_id: 9, keys: vec!["a".into(), "b".into()] },
        FromClientMessage::TaskStream { request_id: 1, since_us: 5 },
        FromClientMessage::Close,
    ] {
        out.push((0, m.encode().to_vec()));
    }
    for m in [
        ToClientMessage::Welcome { client_id: ClientId(1), scheduler_id: "sched".into() },
        ToClientMessage::InMemory(vec![KeyDone { key: "a".into(), size: 8 }]),
        ToClientMessage::Erred(vec![KeyErred { key: "a".into(), failed_key: "b".into(), message: "boom".into(), payload: 0 }]),
        ToClientMessage::WhoHas {
            request_id: 3,
            found: vec![KeyLocation { key: "a".into(), task: t, size: 8, addresses: vec!["tcp://h:1".into()] }],
            missing: vec!["z".into()],
        },
        ToClientMessage::ClusterInfo {
            request_id: 4,
            info: ClusterInfo {
                scheduler_id: "s".into(),
                dashboard: String::new(),
                clients: 1,
                workers: vec![WorkerSummary {
                    id: w,
                    name: "w".into(),
                    address: "tcp://h:2".into(),
                    nthreads: 4,
                    memory_limit: 0,
                    placement: placement(),
                    processing: 1,
                    stored_values: 2,
                    stored_bytes: 3,
                    resources: vec![Resource { name: "GPU".into(), amount: 1.0 }],
                    paused: false,
                    load: worker_load(),
                }],
                tasks: 1,
                ready: 0,
                submitted: 1,
                finished: 0,
                failed: 0,
            },
        },
        ToClientMessage::TaskStream {
            request_id: 5,
            events: vec![StreamEvent { key: "a".into(), worker: "w".into(), thread: 0, start_us: 1, stop_us: 2, ok: true }],
        },
        ToClientMessage::Error { message: "no".into() },
    ] {
        out.push((1, m.encode().to_vec()));
    }
    for m in [
        FromWorkerMessage::Register(WorkerInfo {
            name: "w".into(),
            address: "tcp://h:2".into(),
            nthreads: 2,
            memory_limit: 1 << 30,
            resources: vec![res.clone()],
            placement: placement(),
        }),
        FromWorkerMessage::Finished(vec![FinishedTask { id: t, size: 8 }]),
        FromWorkerMessage::Failed(vec![FailedTask { id: t, message: "x".into(), payload: 0 }]),
        FromWorkerMessage::FetchFailed(vec![FetchFailure { task: t, dep: TaskId(8), holder: w }]),
        FromWorkerMessage::StealReply(vec![StealOutcome { id: t, stolen: true }]),
        FromWorkerMessage::Heartbeat(worker_load()),
        FromWorkerMessage::Executing { tasks: vec![t], confirm: true },
        FromWorkerMessage::Spans(vec![TaskSpan { id: t, start_us: 1, stop_us: 2, thread: 0, ok: true }]),
        FromWorkerMessage::Paused(true),
    ] {
        out.push((2, m.encode().to_vec()));
    }
    for m in [
        ToWorkerMessage::Registered { worker_id: w, heartbeat_ms: 500 },
        ToWorkerMessage::Compute(ComputeBatch {
            tasks: vec![ComputeTask {
                id: t,
                key: "a".into(),
                user_priority: 0,
                order: 1,
                payload: 0,
                deps: vec![
                    DepInfo { id: TaskId(8), size: 8, holders: SmallVec::from_slice(&[w]) },
                    DepInfo { id: TaskId(9), size: 8, holders: SmallVec::from_slice(&[w, WorkerId(4), WorkerId(5)]) },
                ],
                careful: false,
                resources: 0,
            }],
            peers: vec![PeerAddress { id: w, address: "tcp://h:2".into() }],
            resource_sets: vec![vec![res.clone()]],
        }),
        ToWorkerMessage::Steal(vec![t]),
        ToWorkerMessage::Stop,
        ToWorkerMessage::ReportSpans(true),
    ] {
        out.push((3, m.encode().to_vec()));
    }
    out.push((4, ToPeerMessage::Fetch { request_id: 1, tasks: vec![t, TaskId(8)], ipc: Some(rdask_transport::protocol::IpcOffer { domain: "standin:boot".into(), pid: 7 }), direct: Some(rdask_transport::protocol::MemoryKind::Host) }.encode().to_vec()));
    for m in [
        FromPeerMessage::Data {
            request_id: 1,
            items: vec![
                DataItem { id: t, found: true, first: 0, count: 2, error: None, partial: false },
                DataItem { id: TaskId(8), found: true, first: 2, count: 1, error: Some("cannot pickle".into()), partial: false },
                DataItem { id: TaskId(9), found: true, first: 3, count: 1, error: None, partial: true },
            ],
            more: true,
        },
    ] {
        out.push((5, m.encode().to_vec()));
    }
    out
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");

    // messages: selector byte + archive.
    let dir = root.join("messages");
    let msgs = messages();
    for (i, (sel, bytes)) in msgs.iter().enumerate() {
        write(&dir, &format!("msg-{sel}-{i:02}"), &with_selector(*sel, bytes));
    }

    // frame_decode: limit selector + back-to-back frames.
    let dir = root.join("frame_decode");
    let submit = FromClientMessage::Release { keys: vec!["k".into()] };
    let plain = Frame::from_message(&submit);
    let with_data = Frame::with_data(
        &ToClientMessage::InMemory(vec![]),
        vec![Bytes::from_static(b"abc"), Bytes::new(), Bytes::from(vec![7u8; 100])],
    );
    let mut two = encode_frame(&plain);
    two.extend_from_slice(&encode_frame(&with_data));
    write(&dir, "default-one", &with_selector(0, &encode_frame(&plain)));
    write(&dir, "default-two", &with_selector(0, &two));
    write(&dir, "preauth-hello", &with_selector(1, &encode_frame(&hello(Role::Worker, Some(TOKEN)))));
    let mut small = vec![2u8];
    small.extend_from_slice(&200u16.to_le_bytes());
    small.extend_from_slice(&two);
    write(&dir, "limit-200", &small);

    // handshake: flags + stream of frames (stream mode) or a hello control
    // part (in-process mode). Flags: bit 0 token, bit 1 in-process, bits 2..5 roles.
    let dir = root.join("handshake");
    let all_roles = 0b11100u8;
    for (role, role_name) in [(Role::Client, "client"), (Role::Worker, "worker"), (Role::Peer, "peer")] {
        for (token, flag, tname) in [(None, 0u8, "open"), (Some(TOKEN), 1u8, "token")] {
            let h = hello(role, token);
            write(&dir, &format!("stream-{role_name}-{tname}"), &with_selector(all_roles | flag, &encode_frame(&h)));
            write(&dir, &format!("inproc-{role_name}-{tname}"), &with_selector(all_roles | flag | 2, &h.control));
        }
    }
    // A hello followed by more frames (the server must read only the hello).
    let mut stream = encode_frame(&hello(Role::Client, None));
    stream.extend_from_slice(&encode_frame(&plain));
    write(&dir, "stream-client-then-message", &with_selector(all_roles, &stream));

    println!("seeds written under {}", root.display());
}
