//! A worker whose input is held by a peer that accepts connections but never
//! answers must give up on it after the fetch timeout and fetch from the next
//! holder. The scheduler and both peers are played by this test over real TCP.

use std::sync::Arc;
use std::time::Duration;

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_accept, Role};
use rdask_transport::protocol::{
    ArchivedFromWorkerMessage, ArchivedToPeerMessage, ComputeBatch, ComputeTask, DataItem, DepInfo, FromPeerMessage,
    FromWorkerMessage, PeerAddress, ToPeerMessage, ToWorkerMessage, NO_FRAME,
};
use rdask_transport::{Frame, TaskId, WireMessage, WorkerId};
use rdask_worker::{run_worker, NullExecutor, WorkerConfig};

/// A peer that completes the handshake, reads requests and never replies.
async fn hung_peer() -> String {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Default::default()).await.unwrap();
    let address = listener.address.clone();
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                if handshake_accept(&mut conn, &[Role::Peer], None).await.is_ok() {
                    while let Ok(Some(_)) = conn.receiver.recv().await {}
                }
            });
        }
    });
    address
}

/// A peer that holds every asked-for value as a null-task count of 41.
async fn good_peer() -> String {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Default::default()).await.unwrap();
    let address = listener.address.clone();
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                handshake_accept(&mut conn, &[Role::Peer], None).await.unwrap();
                while let Ok(Some(frame)) = conn.receiver.recv().await {
                    let ArchivedToPeerMessage::Fetch { request_id, tasks, .. } = ToPeerMessage::access(&frame.control).unwrap() else { continue };
                    let items: Vec<DataItem> = tasks
                        .iter()
                        .enumerate()
                        .map(|(i, t)| DataItem { id: t.get(), found: true, first: i as u32, count: 1, error: None, partial: false })
                        .collect();
                    let data = items.iter().map(|_| Bytes::copy_from_slice(&41u64.to_le_bytes())).collect();
                    let reply = FromPeerMessage::Data { request_id: request_id.to_native(), items, more: false };
                    conn.sender.send(Frame::with_data(&reply, data)).unwrap();
                }
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_a_hung_peer_fails_over_to_the_next_holder() {
    let (hung, good) = (hung_peer().await, good_peer().await);
    let mut sched = rdask_transport::listen("tcp://127.0.0.1:0", Default::default()).await.unwrap();
    let config = WorkerConfig {
        scheduler: sched.address.clone(),
        name: "failover".into(),
        fetch_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let worker = tokio::spawn(run_worker(config, Arc::new(NullExecutor::default())));

    // Play the scheduler: register the worker, then send one task whose only
    // input is held by the hung peer first and the good peer second.
    let mut conn = sched.accept().await.unwrap();
    assert_eq!(handshake_accept(&mut conn, &[Role::Worker], None).await.unwrap(), Role::Worker);
    let register = conn.receiver.recv().await.unwrap().unwrap();
    assert!(matches!(FromWorkerMessage::access(&register.control).unwrap(), ArchivedFromWorkerMessage::Register(_)));
    let me = WorkerId(0);
    conn.sender.send(Frame::from_message(&ToWorkerMessage::Registered { worker_id: me, heartbeat_ms: 10_000 })).unwrap();
    let (input, task) = (TaskId(1), TaskId(2));
    let (hung_id, good_id) = (WorkerId(7), WorkerId(8));
    let batch = ComputeBatch {
        tasks: vec![ComputeTask {
            id: task,
            key: "sum".into(),
            user_priority: 0,
            order: 0,
            payload: NO_FRAME,
            deps: vec![DepInfo { id: input, size: 8, holders: [hung_id, good_id].into_iter().collect() }],
            careful: false,
            resources: NO_FRAME,
        }],
        peers: vec![PeerAddress { id: hung_id, address: hung }, PeerAddress { id: good_id, address: good }],
        resource_sets: vec![],
    };
    conn.sender.send(Frame::from_message(&ToWorkerMessage::Compute(batch))).unwrap();

    // The task finishes once the value came from the good peer: 1 + 41.
    let finished = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let frame = conn.receiver.recv().await.unwrap().expect("worker hung up");
            if let ArchivedFromWorkerMessage::Finished(items) = FromWorkerMessage::access(&frame.control).unwrap() {
                return items.iter().map(|f| f.id.get()).collect::<Vec<_>>();
            }
        }
    })
    .await
    .expect("the task did not finish: the worker kept waiting for the hung peer");
    assert_eq!(finished, vec![task]);

    conn.sender.send(Frame::from_message(&ToWorkerMessage::Stop)).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), worker).await.expect("worker did not stop");
    assert!(ended.unwrap().is_ok());
}
