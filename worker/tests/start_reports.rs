//! What a worker tells the scheduler about the tasks it runs, so that only
//! tasks running when it dies are suspected of killing it: a long task is
//! reported `Executing`; a careful task waits for the scheduler's
//! `ExecutingSeen` before it starts; a worker told to leave says `Leaving`.
//! The scheduler is played by this test over real TCP.

use std::sync::Arc;
use std::time::Duration;

use rdask_transport::handshake::{handshake_accept, Role};
use rdask_transport::protocol::{
    ArchivedFromWorkerMessage, ComputeBatch, ComputeTask, FromWorkerMessage, Resource, ToWorkerMessage, NO_FRAME,
};
use rdask_transport::{Connection, Frame, Listener, TaskId, WireMessage, WorkerId};
use rdask_worker::{run_worker_until, NullExecutor, NullTask, WorkerConfig};

/// What the worker said, in order (frames of other kinds are skipped).
#[derive(Debug, PartialEq)]
enum Said {
    Executing(Vec<TaskId>, bool),
    Finished(Vec<TaskId>),
    Leaving,
}

async fn start(leave: tokio::sync::oneshot::Receiver<()>) -> (Connection, tokio::task::JoinHandle<bool>) {
    let mut sched: Listener = rdask_transport::listen("tcp://127.0.0.1:0", Default::default()).await.unwrap();
    let config = WorkerConfig {
        scheduler: sched.address.clone(),
        name: "reports".into(),
        nthreads: 2,
        resources: vec![Resource { name: "GPU".into(), amount: 1.0 }],
        ..Default::default()
    };
    let leave = async move {
        let _ = leave.await;
    };
    let worker = tokio::spawn(async move { run_worker_until(config, Arc::new(NullExecutor::threaded()), leave).await.is_ok() });
    let mut conn = sched.accept().await.unwrap();
    handshake_accept(&mut conn, &[Role::Worker], None).await.unwrap();
    let _register = conn.receiver.recv().await.unwrap().unwrap();
    conn.sender.send(Frame::from_message(&ToWorkerMessage::Registered { worker_id: WorkerId(0), heartbeat_ms: 60_000 })).unwrap();
    (conn, worker)
}

fn compute(conn: &Connection, id: u64, sleep_us: u32, careful: bool) {
    compute_needing(conn, id, sleep_us, careful, vec![]);
}

fn compute_needing(conn: &Connection, id: u64, sleep_us: u32, careful: bool, needs: Vec<Resource>) {
    let payload = NullTask { sleep_us, ..Default::default() }.encode();
    let resources = if needs.is_empty() { NO_FRAME } else { 0 };
    let task = ComputeTask { id: TaskId(id), key: format!("t{id}"), user_priority: 0, order: id as i64, payload: 0, deps: vec![], careful, resources };
    let resource_sets = if needs.is_empty() { vec![] } else { vec![needs] };
    let batch = ComputeBatch { tasks: vec![task], peers: vec![], resource_sets };
    conn.sender.send(Frame::with_data(&ToWorkerMessage::Compute(batch), vec![payload])).unwrap();
}

/// The next report of interest, or None if none comes within `wait`.
async fn next(conn: &mut Connection, wait: Duration) -> Option<Said> {
    tokio::time::timeout(wait, async {
        loop {
            let frame = conn.receiver.recv().await.unwrap()?;
            match FromWorkerMessage::access(&frame.control).unwrap() {
                ArchivedFromWorkerMessage::Executing { tasks, confirm } => {
                    return Some(Said::Executing(tasks.iter().map(|t| t.get()).collect(), *confirm))
                }
                ArchivedFromWorkerMessage::Finished(items) => {
                    return Some(Said::Finished(items.iter().map(|t| t.id.get()).collect()))
                }
                ArchivedFromWorkerMessage::Leaving => return Some(Said::Leaving),
                _ => {}
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_is_reported_running_before_it_finishes() {
    let (_leave_tx, leave_rx) = tokio::sync::oneshot::channel();
    let (mut conn, _worker) = start(leave_rx).await;
    compute(&conn, 1, 300_000, false);
    assert_eq!(next(&mut conn, Duration::from_secs(5)).await, Some(Said::Executing(vec![TaskId(1)], false)));
    assert_eq!(next(&mut conn, Duration::from_secs(5)).await, Some(Said::Finished(vec![TaskId(1)])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_careful_task_waits_for_the_scheduler_to_confirm_its_start() {
    let (_leave_tx, leave_rx) = tokio::sync::oneshot::channel();
    let (mut conn, _worker) = start(leave_rx).await;
    compute(&conn, 7, 1, true);
    assert_eq!(next(&mut conn, Duration::from_secs(5)).await, Some(Said::Executing(vec![TaskId(7)], true)));
    // Unconfirmed, it does not run (nor count as running).
    assert_eq!(next(&mut conn, Duration::from_millis(500)).await, None);
    conn.sender.send(Frame::from_message(&ToWorkerMessage::ExecutingSeen(vec![TaskId(7)]))).unwrap();
    let mut said = next(&mut conn, Duration::from_secs(5)).await;
    if said == Some(Said::Executing(vec![TaskId(7)], false)) {
        said = next(&mut conn, Duration::from_secs(5)).await; // a sweep caught it running
    }
    assert_eq!(said, Some(Said::Finished(vec![TaskId(7)])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_told_to_leave_says_so_and_ends_cleanly() {
    let (leave_tx, leave_rx) = tokio::sync::oneshot::channel();
    let (mut conn, worker) = start(leave_rx).await;
    compute(&conn, 3, 5_000_000, false);
    assert_eq!(next(&mut conn, Duration::from_secs(5)).await, Some(Said::Executing(vec![TaskId(3)], false)));
    leave_tx.send(()).unwrap();
    assert_eq!(next(&mut conn, Duration::from_secs(5)).await, Some(Said::Leaving));
    drop(conn); // the scheduler takes note and hangs up
    let ended = tokio::time::timeout(Duration::from_secs(5), worker).await.expect("worker did not end");
    assert!(ended.unwrap(), "a worker that leaves ends with Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_needing_a_resource_run_one_at_a_time_and_others_alongside() {
    let (_leave_tx, leave_rx) = tokio::sync::oneshot::channel();
    let (mut conn, _worker) = start(leave_rx).await;
    let gpu = || vec![Resource { name: "GPU".into(), amount: 1.0 }];
    // Two threads, one GPU: two GPU tasks take twice as long as one.
    let t0 = std::time::Instant::now();
    compute_needing(&conn, 11, 300_000, false, gpu());
    compute_needing(&conn, 12, 300_000, false, gpu());
    let mut finished = Vec::new();
    while finished.len() < 2 {
        match next(&mut conn, Duration::from_secs(5)).await {
            Some(Said::Finished(ids)) => finished.extend(ids.into_iter().map(|id| (id, t0.elapsed()))),
            Some(_) => {}
            None => panic!("the GPU tasks did not finish"),
        }
    }
    assert!(finished[1].1 >= Duration::from_millis(580), "ran together: {finished:?}");
    // Without resources, both threads work at once.
    let t0 = std::time::Instant::now();
    compute(&conn, 13, 300_000, false);
    compute(&conn, 14, 300_000, false);
    let mut n = 0;
    while n < 2 {
        if let Some(Said::Finished(ids)) = next(&mut conn, Duration::from_secs(5)).await {
            n += ids.len();
        }
    }
    assert!(t0.elapsed() < Duration::from_millis(550), "{:?}", t0.elapsed());
}
