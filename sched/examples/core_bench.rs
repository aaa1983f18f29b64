//! Scheduler core alone, no network: how much CPU the state machine (with
//! message encoding and decoding) spends per task. Simulated workers finish
//! every task they are sent at once.
//!
//! `cargo run --release -p rdask-sched --example core_bench -- merge 100000 8`

use std::time::Instant;

use rdask_sched::core::membership::WorkerSpec;
use rdask_sched::{Comm, CommSink, Core, CoreConfig};
use rdask_transport::protocol::{
    ArchivedToWorkerMessage, FinishedTask, FromClientMessage, FromWorkerMessage, SubmitGraph, TaskSpec, ToWorkerMessage,
    NO_FRAME,
};
use rdask_transport::{ClientId, Frame, TaskId, WireMessage, WorkerId};

#[derive(Default)]
struct Sink {
    to_workers: Vec<(WorkerId, Frame)>,
    client_frames: usize,
}

impl CommSink for Sink {
    fn to_worker(&mut self, worker: WorkerId, frame: Frame) {
        self.to_workers.push((worker, frame));
    }
    fn to_client(&mut self, _: ClientId, _: Frame) {
        self.client_frames += 1;
    }
}

fn graph(kind: &str, n: usize) -> Vec<(String, Vec<usize>)> {
    match kind {
        "merge" => {
            let mut g: Vec<(String, Vec<usize>)> = (0..n).map(|i| (format!("m{i}"), vec![])).collect();
            g.push(("merge".into(), (0..n).collect()));
            g
        }
        "tree" => {
            let leaves = n.next_power_of_two();
            let mut g: Vec<(String, Vec<usize>)> = (0..leaves).map(|i| (format!("t{i}"), vec![])).collect();
            let mut level: Vec<usize> = (0..leaves).collect();
            while level.len() > 1 {
                let mut next = Vec::new();
                for pair in level.chunks(2) {
                    g.push((format!("t{}", g.len()), pair.to_vec()));
                    next.push(g.len() - 1);
                }
                level = next;
            }
            g
        }
        _ => panic!("merge or tree"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "merge".into());
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(100_000);
    let nworkers: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(8);
    let g = graph(&kind, n);
    let total = g.len();
    let batch = 50_000;

    let mut core = Core::new(CoreConfig::default());
    let mut comm = Comm::default();
    let mut sink = Sink::default();
    let workers: Vec<WorkerId> = (0..nworkers)
        .map(|i| {
            let spec = WorkerSpec {
                name: format!("w{i}"),
                address: format!("tcp://w{i}"),
                nthreads: 1,
                memory_limit: 0,
                resources: vec![],
                placement: Default::default(),
            };
            core.add_worker(&mut comm, spec, 0)
        })
        .collect();
    let client = core.add_client(&mut comm);
    comm.flush(&mut sink, &|w| Some(format!("tcp://w{w}")));
    sink.to_workers.clear();

    // Encode the submission the way the client library does (outside the timing).
    let mut frames = Vec::new();
    for (b, chunk_start) in (0..total).step_by(batch).enumerate() {
        let end = (chunk_start + batch).min(total);
        let mut keys: Vec<String> = g[chunk_start..end].iter().map(|t| t.0.clone()).collect();
        let mut ext = std::collections::HashMap::new();
        let tasks = g[chunk_start..end]
            .iter()
            .map(|(_, deps)| TaskSpec {
                deps: deps
                    .iter()
                    .map(|&d| {
                        if d >= chunk_start {
                            (d - chunk_start) as u32
                        } else {
                            *ext.entry(d).or_insert_with(|| {
                                keys.push(g[d].0.clone());
                                (keys.len() - 1) as u32
                            })
                        }
                    })
                    .collect(),
                user_priority: 0,
                order: None,
                payload: NO_FRAME,
                want: end == total && deps.len() > 1 && chunk_start + batch >= total,
                retries: 0,
                restriction: NO_FRAME,
            })
            .collect();
        let msg = FromClientMessage::Submit(SubmitGraph {
            submit_id: b as u64,
            graph_id: 1,
            graph_tasks: total as u64,
            more: end < total,
            keys,
            tasks,
            restrictions: vec![],
        });
        frames.push(Frame::from_message(&msg));
    }

    let t0 = Instant::now();
    let mut finished = 0usize;
    let mut pending_frames = frames.into_iter();
    loop {
        if let Some(f) = pending_frames.next() {
            core.on_client_frame(&mut comm, client, &f).unwrap();
        }
        core.schedule(&mut comm);
        comm.flush(&mut sink, &|w| Some(format!("tcp://w{w}")));
        let out = std::mem::take(&mut sink.to_workers);
        if out.is_empty() && pending_frames.len() == 0 && core.ready_len() == 0 {
            break;
        }
        // Each simulated worker finishes everything it was sent, in one batch.
        for (w, frame) in out {
            if let ArchivedToWorkerMessage::Compute(b) = ToWorkerMessage::access(&frame.control).unwrap() {
                let done: Vec<FinishedTask> = b.tasks.iter().map(|t| FinishedTask { id: t.id.get(), size: 8 }).collect();
                finished += done.len();
                // Inputs fetched from elsewhere become replicas, as a real worker reports.
                let replicas: Vec<TaskId> = b
                    .tasks
                    .iter()
                    .flat_map(|t| t.deps.iter().filter(|d| !d.holders.iter().any(|h| h.get() == w)).map(|d| d.id.get()))
                    .collect();
                if !replicas.is_empty() {
                    let f = Frame::from_message(&FromWorkerMessage::ReplicasAdded(replicas));
                    core.on_worker_frame(&mut comm, w, &f, 0).unwrap();
                }
                let f = Frame::from_message(&FromWorkerMessage::Finished(done));
                core.on_worker_frame(&mut comm, w, &f, 0).unwrap();
            }
        }
    }
    let elapsed = t0.elapsed();
    assert_eq!(finished, total, "every task ran once");
    let _ = workers;
    println!(
        "{kind}-{n} on {nworkers} workers: {total} tasks in {:.1} ms = {:.3} µs/task of core CPU (incl. encode/decode), live tasks after: {}",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / total as f64,
        core.tasks.len()
    );
}
