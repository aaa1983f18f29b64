//! Unit tests of the scheduler core, driven through its public handlers with
//! graph builders, a recording `CommSink` that decodes every frame, and
//! simulated workers (see `common/mod.rs`).

mod common;

use common::*;

// ------------------------------------------------------------------ helpers

/// Runs `tasks` (the last one wanted) on 3 workers, checks the client hears
/// exactly once about the result, then releases it and checks that nothing
/// is left: no task in the core and no value on any worker.
fn run_to_completion(tasks: Vec<T>) -> Harness {
    let (mut h, _) = Harness::with_workers(3);
    let c = h.add_client();
    let n = tasks.len() as u64;
    let root = tasks.last().unwrap().key.clone();
    let sid = h.submit(c, &want_last(tasks), false);
    h.run_all();
    assert_eq!(h.submit_reply(c, sid), Some(Ok(())));
    assert_eq!(h.in_memory(c), vec![root.clone()], "exactly one InMemory, for the wanted key");
    assert!(h.erred(c).is_empty());
    assert_eq!(h.core.stats.finished, n, "every task ran once");
    assert_eq!(h.state(&root), Some(TaskState::Memory));
    h.check_stored_bytes();

    h.release(c, &[&root]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0, "released graph is forgotten");
    for (w, sim) in &h.sims {
        assert!(sim.held.is_empty(), "worker {w} was never told to release {:?}", sim.held);
    }
    for (w, worker) in &h.core.workers {
        assert!(worker.stored_values == 0 && worker.processing.is_empty(), "worker {w} still has books");
        assert_eq!(worker.stored_bytes, 0, "stored bytes of {w}");
    }
    h
}

/// Submits a raw batch and expects `SubmitRejected` with the same id and a
/// message containing `needle`, with nothing kept.
fn expect_rejected(h: &mut Harness, c: ClientId, mut graph: SubmitGraph, data: Vec<Bytes>, needle: &str) {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
    let submit_id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    graph.submit_id = submit_id;
    let tasks_before = h.core.tasks.len();
    let submitted_before = h.core.stats.submitted;
    h.submit_graph(c, graph, data).expect("a rejected submission is still a valid frame");
    h.step();
    let replies: Vec<ToClientMessage> = h.take_client_msgs(c);
    let msg = replies
        .iter()
        .find_map(|m| match m {
            ToClientMessage::SubmitRejected { submit_id: s, message } if *s == submit_id => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no SubmitRejected for {submit_id}; got {replies:?}"));
    assert!(msg.contains(needle), "rejection message {msg:?} should mention {needle:?}");
    assert!(!replies.iter().any(|m| matches!(m, ToClientMessage::Submitted { .. })));
    assert_eq!(h.core.tasks.len(), tasks_before, "a rejected batch keeps nothing");
    assert_eq!(h.core.stats.submitted, submitted_before);
}

fn spec(deps: Vec<u32>) -> TaskSpec {
    TaskSpec { deps, user_priority: 0, order: None, payload: NO_FRAME, want: true, retries: 0, restriction: NO_FRAME }
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn raw_frame(bytes: &[u8]) -> Frame {
    let mut control = rdask_transport::rkyv::util::AlignedVec::<16>::new();
    control.extend_from_slice(bytes);
    Frame::new(control)
}

// ------------------------------------------------------------------ 1. whole graphs

#[test]
fn merge_1000_completes_and_releases_everything() {
    let h = run_to_completion(merge("m", 1000));
    // Leaves have no inputs, so they must be spread over all workers.
    for w in h.core.workers.keys() {
        assert!(h.computed_on(*w).len() > 300, "worker {w} got {} leaves", h.computed_on(*w).len());
    }
}

#[test]
fn tree_10_completes_and_releases_everything() {
    run_to_completion(tree("t", 10));
}

#[test]
fn chain_500_completes_and_releases_everything() {
    run_to_completion(chain("c", 500));
}

#[test]
fn payload_reaches_the_worker_in_a_data_frame() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("p", &[]).payload(b"pickled-fn-p"), t("q", &["p"]).payload(b"pickled-fn-q").want(), t("r", &[])], false);
    h.run_all();
    let payloads: Vec<(String, Bytes)> =
        h.sims.values().flat_map(|s| s.payloads.iter().map(|(k, v)| (k.clone(), v.clone()))).collect();
    let get = |k: &str| payloads.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("p").as_deref(), Some(&b"pickled-fn-p"[..]));
    assert_eq!(get("q").as_deref(), Some(&b"pickled-fn-q"[..]));
    assert_eq!(get("r"), None, "a task without payload names no data frame");
}

// ------------------------------------------------------------------ 2. locality

#[test]
fn task_goes_to_the_worker_holding_its_large_input() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("big", &[]).want(), t("small", &[]).want()], false);
    h.step();
    let wb = h.assigned_to("big").unwrap();
    let ws = h.assigned_to("small").unwrap();
    assert_ne!(wb, ws, "precondition: leaves spread round-robin");
    h.finish_key(wb, "big", 1_000_000_000);
    h.finish_key(ws, "small", 10);
    h.step();
    // Ten consumers: round-robin would put half of them on the other worker.
    let consumers: Vec<T> = (0..10).map(|i| t(&format!("use-{i}"), &["small", "big"]).want()).collect();
    h.submit(c, &consumers, false);
    h.step();
    for i in 0..10 {
        assert_eq!(h.assigned_to(&format!("use-{i}")), Some(wb), "use-{i} should run where the 1 GB input is");
    }
}

// ------------------------------------------------------------------ 3. priority

#[test]
fn higher_user_priority_runs_first_then_lower_order() {
    let mut h = Harness::new(CoreConfig { tasks_per_thread: 1, ..Default::default() });
    let w = h.add_worker(1);
    let c = h.add_client();
    let run_order = |h: &mut Harness, tasks: Vec<T>| {
        h.submit(c, &tasks, false);
        h.step();
        let mut order = Vec::new();
        for _ in 0..tasks.len() {
            let q = h.queued(w);
            assert_eq!(q.len(), 1, "one slot: exactly one task is handed out at a time");
            order.push(q[0].clone());
            h.finish_key(w, &q[0], 1);
            h.step();
        }
        order
    };
    let by_priority = run_order(&mut h, vec![t("low", &[]).want(), t("high", &[]).priority(5).want(), t("mid", &[]).priority(1).want()]);
    assert_eq!(by_priority, ["high", "mid", "low"]);
    // Equal user priority: graph order decides (submission order would give o3 first).
    let by_order =
        run_order(&mut h, vec![t("o3", &[]).order(3).want(), t("o1", &[]).order(1).want(), t("o2", &[]).order(2).want()]);
    assert_eq!(by_order, ["o1", "o2", "o3"]);
}

// ------------------------------------------------------------------ 4. failure

#[test]
fn failure_reaches_the_client_holding_a_dependent() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("a", &[]), t("b", &["a"]).want()], false);
    h.step();
    let w = h.assigned_to("a").unwrap();
    h.fail_with_payload(w, h.id("a"), "ZeroDivisionError: boom", Bytes::from_static(b"pickled-exception"));
    h.step();
    let erred: Vec<(KeyErred, Bytes)> = h
        .take_client(c)
        .into_iter()
        .filter_map(|r| match r.msg {
            ToClientMessage::Erred(items) => Some(items.into_iter().map(move |e| {
                let p = r.data[e.payload as usize].clone();
                (e, p)
            })),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(erred.len(), 1, "only b is held by the client: {erred:?}");
    let (e, payload) = &erred[0];
    assert_eq!((e.key.as_str(), e.failed_key.as_str(), e.message.as_str()), ("b", "a", "ZeroDivisionError: boom"));
    assert_eq!(&payload[..], b"pickled-exception", "the executor's error payload is forwarded");
    assert_eq!(h.state("b"), Some(TaskState::Erred));

    // The core keeps serving: an independent graph completes.
    h.submit(c, &want_last(merge("g2", 20)), false);
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["g2"]);

    // Releasing the erred key forgets the failed graph.
    h.release(c, &["b", "g2"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0);
}

// ------------------------------------------------------------------ 5. retries

#[test]
fn retried_task_runs_again_and_completes() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("flaky", &[]).retries(1).want(), t("doomed", &[]).retries(1).want()], false);
    h.step();
    let w = h.assigned_to("flaky").unwrap();
    h.fail(w, h.id("flaky"), "transient");
    h.step();
    let w2 = h.assigned_to("flaky").expect("reassigned after its first failure");
    h.finish_key(w2, "flaky", 4);
    // `doomed` has one retry and fails twice.
    for _ in 0..2 {
        let w = h.assigned_to("doomed").expect("doomed is assigned");
        h.fail(w, h.id("doomed"), "always");
        h.step();
    }
    assert_eq!(h.in_memory(c), vec!["flaky"]);
    let erred = h.erred(c);
    assert_eq!(erred.len(), 1);
    assert_eq!((erred[0].key.as_str(), erred[0].message.as_str()), ("doomed", "always"));
    let runs: usize = h.core.workers.keys().map(|w| h.computed_on(*w).iter().filter(|k| *k == "flaky").count()).sum();
    assert_eq!(runs, 2, "flaky was sent out twice");
}

// ------------------------------------------------------------------ 6. worker death

#[test]
fn dead_workers_tasks_are_reassigned_and_lost_values_recomputed() {
    let (mut h, _) = Harness::with_workers(3);
    let c = h.add_client();
    h.submit(c, &[t("x", &[]), t("y", &[]), t("z", &["x", "y"]).want()], false);
    h.step();
    let wx = h.assigned_to("x").unwrap();
    let wy = h.assigned_to("y").unwrap();
    assert_ne!(wx, wy, "precondition: leaves spread round-robin");
    h.finish_key(wx, "x", 8);
    h.step();
    assert_eq!(h.state("z"), Some(TaskState::Waiting));

    // x's only copy dies with wx while z still needs it: x runs again.
    h.remove_worker(wx);
    let again = h.assigned_to("x").expect("lost value x is recomputed");
    assert_ne!(again, wx);
    assert!(h.core.stats.recomputed >= 1);

    // y was queued on wy: it moves to a live worker.
    h.remove_worker(wy);
    let wy2 = h.assigned_to("y").expect("y is reassigned");
    assert!(wy2 != wx && wy2 != wy);
    assert!(h.assigned_to("x").is_some_and(|w| w != wy));

    h.run_all();
    assert_eq!(h.in_memory(c), vec!["z"]);
    assert!(h.erred(c).is_empty());
}

#[test]
fn losing_an_input_cancels_the_assigned_dependent_and_reruns_it() {
    let (mut h, _) = Harness::with_workers(3);
    let c = h.add_client();
    h.submit(c, &[t("x", &[]), t("y", &[]), t("z", &["x", "y"]).want()], false);
    h.step();
    let (wx, wy) = (h.assigned_to("x").unwrap(), h.assigned_to("y").unwrap());
    h.finish_key(wx, "x", 8);
    h.finish_key(wy, "y", 1_000_000);
    h.step();
    assert_eq!(h.assigned_to("z"), Some(wy), "z runs where the larger input is");
    let idz = h.id("z");
    // z is queued on wy and needs x from wx; wx dies: z must be stopped on wy
    // (its input is gone) and run again once x is recomputed.
    h.remove_worker(wx);
    assert!(h.cancels_to(wy).contains(&idz), "z is cancelled on its worker");
    assert_eq!(h.state("z"), Some(TaskState::Waiting));
    assert!(h.assigned_to("x").is_some());
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["z"]);
}

// ------------------------------------------------------------------ 7. killed worker

#[test]
fn task_whose_workers_keep_dying_errs_with_killed_worker() {
    let (mut h, _) = Harness::with_workers(5);
    let c = h.add_client();
    h.submit(c, &[t("crasher", &[]).want()], false);
    h.step();
    // Dask's allowed-failures = 3: three deaths are allowed, the fourth errs.
    for round in 0..4 {
        let w = h.assigned_to("crasher").unwrap_or_else(|| panic!("assigned in round {round}"));
        assert!(h.erred(c).is_empty(), "not erred after {round} deaths");
        let id = h.id("crasher");
        h.executing(w, &[id], false);
        h.remove_worker(w);
    }
    let erred = h.erred(c);
    assert_eq!(erred.len(), 1, "{erred:?}");
    assert_eq!(erred[0].key, "crasher");
    assert_eq!(erred[0].failed_key, "crasher");
    assert!(erred[0].message.contains("KilledWorker"), "{}", erred[0].message);
    assert_eq!(h.state("crasher"), Some(TaskState::Erred));
    assert!(h.core.workers.values().all(|w| w.processing.is_empty()), "the erred task is not queued anywhere");
}

#[test]
fn only_tasks_running_when_a_worker_dies_are_suspected() {
    // One worker, 50 tasks queued on it; it dies three times, each time
    // running one (different) task. Nothing errs: the queued tasks are
    // innocent, and each runner has one death against it.
    let (mut h, ws) = Harness::with_workers(1);
    let c = h.add_client();
    let tasks: Vec<T> = (0..50).map(|i| t(&format!("s{i}"), &[]).want()).collect();
    h.submit(c, &tasks, false);
    h.step();
    let mut w = ws[0];
    for round in 0..3 {
        assert_eq!(h.queued(w).len(), 50, "round {round}: everything is queued on the one worker");
        let runner = h.id(&format!("s{round}"));
        h.executing(w, &[runner], false);
        h.remove_worker(w);
        w = h.add_worker(1);
    }
    assert!(h.erred(c).is_empty(), "no task ran on more than one dying worker: {:?}", h.erred(c));
    let suspicious: Vec<u8> = (0..50).map(|i| h.core.tasks[h.id(&format!("s{i}"))].suspicious).collect();
    assert_eq!(&suspicious[..3], &[1, 1, 1]);
    assert!(suspicious[3..].iter().all(|s| *s == 0), "{suspicious:?}");
    // Every task that was on a dead worker now confirms its start.
    let careful = h.worker_log(w).iter().flat_map(|m| match m {
        ToWorkerMessage::Compute(b) => b.tasks.iter().map(|t| t.careful).collect(),
        _ => vec![],
    }).collect::<Vec<bool>>();
    assert_eq!(careful.len(), 50);
    assert!(careful.iter().all(|c| *c));
    h.run_all();
    assert_eq!(h.in_memory(c).len(), 50);
}

#[test]
fn a_worker_that_leaves_on_purpose_suspects_nobody() {
    let (mut h, _) = Harness::with_workers(6);
    let c = h.add_client();
    h.submit(c, &[t("long", &[]).want(), t("other", &[]).want()], false);
    h.step();
    for _ in 0..5 {
        let w = h.assigned_to("long").unwrap();
        let id = h.id("long");
        h.executing(w, &[id], false);
        h.leave(w);
    }
    assert!(h.erred(c).is_empty(), "{:?}", h.erred(c));
    let task = &h.core.tasks[h.id("long")];
    assert_eq!((task.suspicious, task.careful), (0, false));
    h.run_all();
    let mut done = h.in_memory(c);
    done.sort();
    assert_eq!(done, vec!["long", "other"]);
}

#[test]
fn a_leaving_worker_gets_no_new_tasks() {
    let (mut h, ws) = Harness::with_workers(2);
    let c = h.add_client();
    h.worker_msg(ws[0], FromWorkerMessage::Leaving);
    h.step();
    let tasks: Vec<T> = (0..20).map(|i| t(&format!("x{i}"), &[]).want()).collect();
    h.submit(c, &tasks, false);
    h.step();
    assert!(h.queued(ws[0]).is_empty(), "{:?}", h.queued(ws[0]));
    assert_eq!(h.queued(ws[1]).len(), 20);
}

#[test]
fn a_careful_start_is_confirmed_and_a_stale_executing_report_is_ignored() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("a", &[]).want()], false);
    h.step();
    let a = h.id("a");
    let first = h.assigned_to("a").unwrap();
    h.remove_worker(first); // died before reporting the start: not suspected
    assert_eq!(h.core.tasks[a].suspicious, 0);
    let second = h.assigned_to("a").unwrap();
    assert_ne!(first, second);
    h.executing(second, &[a], true);
    h.step();
    assert!(h.sims[&second].confirmed.contains(&a), "the scheduler confirms a careful start");
    // A report from a worker the task is not assigned to changes nothing.
    let other = h.add_worker(1);
    h.executing(other, &[a], false);
    h.remove_worker(other);
    assert_eq!(h.core.tasks[a].suspicious, 0);
    h.remove_worker(second);
    assert_eq!(h.core.tasks[a].suspicious, 1);
}

// ------------------------------------------------------------------ 8. bad submissions

#[test]
fn bad_submissions_are_rejected_whole_and_the_core_keeps_serving() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    // Something already held, so "unchanged" is not trivially zero.
    h.submit(c, &[t("base", &[]).want()], false);
    h.run_all();
    h.take_client_msgs(c);

    // A valid task next to a bad one: neither is kept.
    let (g, d) = build_submit(0, &[t("ok", &[]), t("user", &["ok", "nope"])], false);
    expect_rejected(&mut h, c, g, d, "nope");
    assert_eq!(h.state("ok"), None);

    let (g, d) = build_submit(0, &[t("a", &["b"]), t("b", &["a"])], false);
    expect_rejected(&mut h, c, g, d, "cycle");

    let (g, d) = build_submit(0, &[t("self", &["self"])], false);
    expect_rejected(&mut h, c, g, d, "self");

    let (g, d) = build_submit(0, &[t("dup", &[]), t("dup", &["base"])], false);
    expect_rejected(&mut h, c, g, d, "duplicate");

    let g = SubmitGraph { submit_id: 0, graph_id: 0, more: false, graph_tasks: 0, keys: vec!["a".into()], tasks: vec![spec(vec![5])], restrictions: vec![] };
    expect_rejected(&mut h, c, g, vec![], "index 5");

    let g = SubmitGraph {
        graph_id: 0,
        graph_tasks: 0,
        submit_id: 0,
        more: false,
        keys: vec!["a".into()],
        tasks: vec![TaskSpec { payload: 2, ..spec(vec![]) }],
        restrictions: vec![],
    };
    expect_rejected(&mut h, c, g, vec![Bytes::from_static(b"only one")], "data frame 2");

    let g = SubmitGraph { submit_id: 0, graph_id: 0, more: false, graph_tasks: 0, keys: vec![], tasks: vec![spec(vec![])], restrictions: vec![] };
    expect_rejected(&mut h, c, g, vec![], "keys");

    // Still serving: a valid graph using the held key completes.
    h.submit(c, &[t("after", &["base"]).want()], false);
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["after"]);
}

// ------------------------------------------------------------------ 9. malformed bytes

#[test]
fn malformed_control_bytes_are_an_error_and_change_nothing() {
    let (mut h, ws) = Harness::with_workers(1);
    let c = h.add_client();
    h.submit(c, &[t("held", &[]).want()], false);
    h.run_all();
    let tasks_before = h.core.tasks.len();

    let (graph, _) = build_submit(7, &want_last(chain("bad", 5)), false);
    let good = FromClientMessage::Submit(graph).encode();
    let mut garbage: Vec<Vec<u8>> = vec![vec![], good[..good.len() / 2].to_vec(), good[..good.len() - 1].to_vec()];
    for (len, seed) in [(1, 1), (7, 2), (16, 3), (64, 4), (333, 5), (4096, 6)] {
        garbage.push(noise(len, seed));
    }
    for bytes in &garbage {
        let frame = raw_frame(bytes);
        // Random bytes can happen to form a valid small message (any eight
        // bytes are a valid request id); those are messages, not garbage.
        let as_client = FromClientMessage::decode(&frame.control);
        if as_client.is_err() {
            assert!(h.client_frame(c, &frame).is_err(), "{} bytes of garbage were accepted from a client", bytes.len());
        } else {
            let _ = h.client_frame(c, &frame);
        }
        if FromWorkerMessage::decode(&frame.control).is_err() {
            assert!(h.worker_frame(ws[0], &frame).is_err(), "{} bytes of garbage were accepted from a worker", bytes.len());
        }
        h.step();
    }
    assert_eq!(h.core.tasks.len(), tasks_before);
    assert!(h.core.clients.contains_key(&c) && h.core.workers.len() == 1);
    // The truncated copies of a real message are never accepted.
    for bytes in &garbage[..3] {
        assert!(FromClientMessage::decode(&raw_frame(bytes).control).is_err());
    }

    h.submit(c, &[t("fine", &["held"]).want()], false);
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["held", "fine"]);
}

// ------------------------------------------------------------------ 10. client disconnect

#[test]
fn client_disconnect_releases_values_and_cancels_running_tasks() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("a", &[]), t("b", &["a"]).want(), t("r", &[]).want(), t("later", &["b"]).want()], false);
    h.step();
    let wa = h.assigned_to("a").unwrap();
    let wr = h.assigned_to("r").unwrap();
    h.finish_key(wa, "a", 8);
    h.step();
    let wb = h.assigned_to("b").unwrap();
    let (ida, idb, idr) = (h.id("a"), h.id("b"), h.id("r"));

    h.remove_client(c);
    assert_eq!(h.core.tasks.len(), 0, "nothing the client held is kept");
    assert!(h.cancels_to(wb).contains(&idb), "running b is cancelled on its worker");
    assert!(h.cancels_to(wr).contains(&idr), "running r is cancelled on its worker");
    assert!(h.releases_to(wa).contains(&ida), "a's value is released");
    assert!(h.sims.values().all(|s| s.queue.is_empty() && s.held.is_empty()));
    assert!(h.core.workers.values().all(|w| w.processing.is_empty() && w.stored_values == 0));
    assert_eq!(h.core.ready_len(), 0);
}

#[test]
fn a_key_shared_by_two_clients_survives_one_leaving() {
    let (mut h, ws) = Harness::with_workers(2);
    let (c1, c2) = (h.add_client(), h.add_client());
    h.submit(c1, &want_last(merge("s", 4)), false);
    h.submit(c2, &[t("s", &[]).want(), t("mine", &["s"]).want()], false);
    h.step();
    h.remove_client(c1);
    h.run_all();
    assert_eq!(h.in_memory(c2), vec!["s", "mine"]);
    assert!(h.cancels_to(ws[0]).is_empty() && h.cancels_to(ws[1]).is_empty());
}

// ------------------------------------------------------------------ 11. cancel

#[test]
fn cancel_reaches_the_key_and_its_unfinished_dependents() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("a", &[]).want(), t("b", &["a"]).want(), t("c", &["b"]).want(), t("other", &[]).want()], false);
    h.step();
    let wa = h.assigned_to("a").unwrap();
    let ida = h.id("a");
    h.cancel(c, &["a"]);
    h.step();
    let mut cancelled = h.cancelled(c);
    cancelled.sort();
    assert_eq!(cancelled, ["a", "b", "c"]);
    assert!(h.cancels_to(wa).contains(&ida), "a is stopped on its worker");
    assert_eq!((h.state("a"), h.state("b"), h.state("c")), (None, None, None));
    // Unrelated work goes on.
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["other"]);
}

// ------------------------------------------------------------------ 12. work stealing

/// Everything is queued on A; B joins idle. The scheduler asks A to give up
/// part of its queue, and what A gives up goes to B.
#[test]
fn idle_worker_that_joins_gets_stolen_work() {
    let mut h = Harness::default();
    let a = h.add_worker(1);
    let c = h.add_client();
    h.submit(c, &(0..20).map(|i| t(&format!("t{i}"), &[]).want()).collect::<Vec<_>>(), false);
    h.step();
    assert_eq!(h.queued(a).len(), 20);
    let b = h.add_worker(1);
    assert!(h.queued(b).is_empty());
    let steals = h.steals_to(a);
    assert!(!steals.is_empty(), "A (20 queued) should be asked to give work to idle B");
    assert!(steals.len() <= 10, "at most half of A's queue: {}", steals.len());
    assert!(h.steals_to(b).is_empty());

    // A refuses the first (already running): it stays on A. A gives up the rest.
    let kept = steals[0];
    let mut outcomes = vec![(kept, false)];
    outcomes.extend(steals[1..].iter().map(|id| (*id, true)));
    h.steal_reply(a, &outcomes);
    h.step();
    let kept_key = h.core.tasks[kept].key.to_string();
    assert_eq!(h.assigned_to(&kept_key), Some(a));
    for id in &steals[1..] {
        let key = h.core.tasks[*id].key.to_string();
        assert_eq!(h.assigned_to(&key), Some(b), "stolen {key} should go to B");
    }
    assert_eq!(h.core.stats.stolen as usize, steals.len() - 1);
    h.run_all();
    assert_eq!(h.in_memory(c).len(), 20);
}

#[test]
fn stolen_tasks_go_to_the_idle_worker() {
    let mut h = Harness::default();
    let a = h.add_worker(1);
    let c = h.add_client();
    h.submit(c, &(0..20).map(|i| t(&format!("t{i}"), &[]).want()).collect::<Vec<_>>(), false);
    h.step();
    let b = h.add_worker(1);
    h.submit(c, &[t("x", &[]).want(), t("y", &[]).want()], false);
    h.step();
    let on_b = h.queued(b);
    h.finish_key(b, &on_b[0], 1);
    h.step();
    let steals = h.steals_to(a);
    assert!(!steals.is_empty());
    let outcomes: Vec<(TaskId, bool)> = steals.iter().map(|id| (*id, true)).collect();
    h.steal_reply(a, &outcomes);
    h.step();
    let went_back: Vec<String> = steals
        .iter()
        .map(|id| h.core.tasks[*id].key.to_string())
        .filter(|k| h.assigned_to(k) == Some(a))
        .collect();
    assert!(went_back.is_empty(), "stolen from A and handed straight back to A: {went_back:?}");
}

// ------------------------------------------------------------------ 13. multi-batch

#[test]
fn later_batch_can_depend_on_a_finished_unwanted_task_of_an_earlier_batch() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    let s1 = h.submit(c, &[t("leaf", &[])], true);
    h.run_all();
    // Nobody wants `leaf`, but the graph is incomplete: it must be kept.
    assert_eq!(h.state("leaf"), Some(TaskState::Memory));
    let s2 = h.submit(c, &[t("top", &["leaf"]).want()], false);
    h.run_all();
    assert_eq!(h.submit_reply(c, s1), Some(Ok(())));
    assert_eq!(h.submit_reply(c, s2), Some(Ok(())));
    assert_eq!(h.in_memory(c), vec!["top"]);
    // The last batch unpinned `leaf`: its value went once `top` finished.
    assert_eq!(h.state("leaf"), Some(TaskState::Released));
    assert!(h.sims.values().all(|s| !s.held.contains(&h.id("leaf"))));
    h.release(c, &["top"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0);
    assert!(h.sims.values().all(|s| s.held.is_empty()));
}

// ------------------------------------------------------------------ 14. stale messages

#[test]
fn finished_for_a_forgotten_task_is_answered_with_release() {
    let (mut h, ws) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("k", &[]).want()], false);
    h.run_all();
    let old = h.id("k");
    h.release(c, &["k"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0);
    // The slot is reused by a new task; the old id must not hit it.
    h.submit(c, &[t("new", &[]).want()], false);
    h.step();
    let stats = h.core.stats;
    let client_msgs = h.rec.clients[&c].len();
    let releases_before = h.releases_to(ws[1]).len();

    h.finish(ws[1], &[old], 99);
    h.step();
    assert_eq!(h.releases_to(ws[1]).len(), releases_before + 1);
    assert_eq!(h.releases_to(ws[1]).last(), Some(&old), "the worker is told to drop the orphan value");
    assert_eq!(h.core.stats.finished, stats.finished);
    assert_eq!(h.rec.clients[&c].len(), client_msgs, "no client hears about it");
    assert_eq!(h.state("new"), Some(TaskState::Assigned));
    assert!(h.core.workers.values().all(|w| w.stored_values == 0));

    // A Finished from a worker the task is not assigned to is stale as well.
    let w_new = h.assigned_to("new").unwrap();
    let other = if w_new == ws[0] { ws[1] } else { ws[0] };
    h.finish(other, &[h.id("new")], 5);
    h.step();
    assert_eq!(h.assigned_to("new"), Some(w_new));
    assert_eq!(h.releases_to(other).last(), Some(&h.id("new")));
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["k", "new"]);
}

// ------------------------------------------------------------------ 15. reused key

#[test]
fn wanting_a_key_already_in_memory_answers_at_once() {
    let (mut h, _) = Harness::with_workers(2);
    let c1 = h.add_client();
    h.submit(c1, &[t("shared", &[]).want()], false);
    h.run_all();
    let computes_before: usize = h.core.workers.keys().map(|w| h.computed_on(*w).len()).sum();

    let c2 = h.add_client();
    let sid = h.submit(c2, &[t("shared", &[]).want()], false);
    h.step();
    assert_eq!(h.submit_reply(c2, sid), Some(Ok(())));
    assert_eq!(h.in_memory(c2), vec!["shared"]);
    let computes_after: usize = h.core.workers.keys().map(|w| h.computed_on(*w).len()).sum();
    assert_eq!(computes_after, computes_before, "nothing is recomputed");
    // Both hold it now: one release keeps it, the second forgets it.
    h.release(c1, &["shared"]);
    h.step();
    assert_eq!(h.state("shared"), Some(TaskState::Memory));
    h.release(c2, &["shared"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0);
}

// ------------------------------------------------------------------ more edges

#[test]
fn wanting_an_erred_key_answers_with_the_error() {
    let (mut h, ws) = Harness::with_workers(1);
    let c1 = h.add_client();
    h.submit(c1, &[t("bad", &[]).want()], false);
    h.step();
    h.fail(ws[0], h.id("bad"), "ValueError");
    h.step();
    let c2 = h.add_client();
    // A new task on top of the erred key errs at once, naming the original failure.
    h.submit(c2, &[t("bad", &[]).want(), t("on-top", &["bad"]).want()], false);
    h.step();
    let mut erred: Vec<(String, String)> = h.erred(c2).into_iter().map(|e| (e.key, e.failed_key)).collect();
    erred.sort();
    assert_eq!(erred, [("bad".to_string(), "bad".to_string()), ("on-top".to_string(), "bad".to_string())]);
    assert!(h.computed_on(ws[0]).iter().all(|k| k != "on-top"));
}

#[test]
fn released_input_is_recomputed_for_a_new_dependent() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("x", &[]), t("y", &["x"]).want()], false);
    h.run_all();
    // y is held, so x stays known (Released) but its value is gone.
    assert_eq!(h.state("x"), Some(TaskState::Released));
    assert!(h.sims.values().all(|s| !s.held.contains(&h.id("x"))));
    h.submit(c, &[t("z", &["x"]).want()], false);
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["y", "z"]);
    let runs: usize = h.core.workers.keys().map(|w| h.computed_on(*w).iter().filter(|k| *k == "x").count()).sum();
    assert_eq!(runs, 2);
}

#[test]
fn releasing_an_input_keeps_its_value_while_a_dependent_needs_it() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("in", &[]).want(), t("out", &["in"]).want(), t("slow", &[])], false);
    h.step();
    let w = h.assigned_to("in").unwrap();
    h.finish_key(w, "in", 8);
    h.release(c, &["in"]);
    h.step();
    assert_eq!(h.state("in"), Some(TaskState::Memory), "out still needs it");
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["in", "out"]);
    assert_eq!(h.state("in"), Some(TaskState::Released));
}

#[test]
fn a_dependency_listed_twice_is_handled() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    let g = SubmitGraph {
        graph_id: 0,
        graph_tasks: 0,
        submit_id: 5,
        more: false,
        keys: vec!["d".into(), "twice".into()],
        tasks: vec![TaskSpec { want: false, ..spec(vec![]) }, spec(vec![0, 0])],
        restrictions: vec![],
    };
    h.submit_graph(c, g, vec![]).unwrap();
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["twice"]);
    h.release(c, &["twice"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0);
}

#[test]
fn fetch_failure_recomputes_the_value_and_keeps_accounting() {
    let (mut h, _) = Harness::with_workers(2);
    let c = h.add_client();
    // Two inputs on different workers; `use` runs on one and fetches the other.
    h.submit(c, &[t("p", &[]), t("q", &[]), t("use", &["p", "q"]).want()], false);
    h.step();
    let (wp, wq) = (h.assigned_to("p").unwrap(), h.assigned_to("q").unwrap());
    assert_ne!(wp, wq);
    h.finish_key(wp, "p", 100);
    h.finish_key(wq, "q", 10);
    h.step();
    let wu = h.assigned_to("use").unwrap();
    assert_eq!(wu, wp, "use runs where the larger input is");
    // wp cannot fetch q from wq.
    let msg = FromWorkerMessage::FetchFailed(vec![FetchFailure { task: h.id("use"), dep: h.id("q"), holder: wq }]);
    h.sims.get_mut(&wu).unwrap().queue.clear();
    h.worker_msg(wu, msg);
    h.step();
    assert!(h.assigned_to("q").is_some(), "q lost its only copy and is recomputed");
    assert_eq!(h.state("use"), Some(TaskState::Waiting));
    h.check_stored_bytes();
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["use"]);
}

#[test]
fn who_has_names_the_holders_address() {
    let (mut h, ws) = Harness::with_workers(1);
    let c = h.add_client();
    h.submit(c, &[t("v", &[]).want(), t("w", &["v"])], false);
    h.run_all();
    h.take_client_msgs(c);
    h.client_msg(c, FromClientMessage::WhoHas { request_id: 42, keys: vec!["v".into(), "nope".into()] });
    h.step();
    let msgs = h.take_client_msgs(c);
    let [ToClientMessage::WhoHas { request_id: 42, found, missing }] = &msgs[..] else { panic!("{msgs:?}") };
    assert_eq!(missing, &["nope".to_string()]);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].key.as_str(), found[0].task, found[0].size), ("v", h.id("v"), 8));
    assert_eq!(found[0].addresses, vec![h.core.workers[&ws[0]].address.clone()]);
}

#[test]
fn silent_worker_is_found_with_the_fake_clock() {
    let (mut h, ws) = Harness::with_workers(2);
    h.now_ms = 5_000;
    h.worker_msg(ws[1], FromWorkerMessage::Heartbeat(WorkerLoad::default()));
    assert_eq!(h.core.silent_workers(5_500, 1_000), vec![ws[0]], "only the worker silent since t=0");
    assert!(h.core.silent_workers(900, 1_000).is_empty());
}

/// A worker cannot stop a running task: after `Cancel` it still finishes
/// it. If the task was meanwhile assigned to the same worker again, that
/// worker reports `Finished` twice; the second must not make the core tell
/// the worker to drop a value the core goes on listing it as holding.
#[test]
fn duplicate_finished_does_not_release_a_value_the_core_still_lists() {
    let (mut h, _) = Harness::with_workers(3);
    let c = h.add_client();
    h.submit(c, &[t("x", &[]), t("y", &[]), t("z", &["x", "y"]).want()], false);
    h.step();
    let (wx, wy) = (h.assigned_to("x").unwrap(), h.assigned_to("y").unwrap());
    h.finish_key(wx, "x", 8);
    h.finish_key(wy, "y", 1_000_000);
    h.step();
    assert_eq!(h.assigned_to("z"), Some(wy));
    // z is running on wy when x's holder dies: wy is sent Cancel(z) but keeps running it.
    h.remove_worker(wx);
    let wx2 = h.assigned_to("x").unwrap();
    h.finish_key(wx2, "x", 8);
    h.step();
    assert_eq!(h.assigned_to("z"), Some(wy), "z placed on wy again");
    // wy's first run completes (its Finished was in flight), then the second run.
    let idz = h.id("z");
    h.finish(wy, &[idz], 16);
    h.step();
    h.finish(wy, &[idz], 16);
    h.step(); // check_holders: wy must still hold z if the core lists it
    assert_eq!(h.in_memory(c), vec!["z"]);
}

/// `more: true` promises that every task of the unfinished graph is kept.
/// A key the batch reuses (already computed for another client) is part of
/// the graph too.
#[test]
fn multi_batch_keeps_reused_keys_until_the_last_batch() {
    let (mut h, _) = Harness::with_workers(2);
    let (c1, c2) = (h.add_client(), h.add_client());
    h.submit(c1, &[t("s", &[]).want()], false);
    h.run_all();
    // c2's graph: batch 1 reuses "s" (not wanted by c2), batch 2 builds on it.
    h.submit(c2, &[t("s", &[])], true);
    h.step();
    h.release(c1, &["s"]);
    h.step();
    let s2 = h.submit(c2, &[t("top", &["s"]).want()], false);
    h.run_all();
    assert_eq!(h.submit_reply(c2, s2), Some(Ok(())), "batch 2 depends on a key of batch 1");
    assert_eq!(h.in_memory(c2), vec!["top"]);
}

/// Batch 1 (`more: true`) has an unwanted `p`; the final batch lists `p`
/// again with `want: true`.
#[test]
fn final_batch_may_want_a_key_of_an_earlier_batch() {
    let (mut h, _) = Harness::with_workers(1);
    let c = h.add_client();
    h.submit(c, &[t("p", &[])], true);
    h.run_all();
    let s2 = h.submit(c, &[t("p", &[]).want()], false);
    h.run_all();
    assert_eq!(h.submit_reply(c, s2), Some(Ok(())));
    assert_eq!(h.in_memory(c), vec!["p"]);
}

/// A task nobody wants whose input already erred is erred at once; it
/// must still be forgotten like any finished task nobody needs.
#[test]
fn unwanted_task_on_top_of_an_erred_key_is_forgotten() {
    let (mut h, ws) = Harness::with_workers(1);
    let c = h.add_client();
    h.submit(c, &[t("bad", &[]).want()], false);
    h.step();
    h.fail(ws[0], h.id("bad"), "boom");
    h.step();
    h.submit(c, &[t("orphan", &["bad"])], false);
    h.step();
    h.release(c, &["bad"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0, "left: {:?}", h.core.tasks.iter().map(|(_, t)| t.key.to_string()).collect::<Vec<_>>());
}

/// A chain on top of an erred key, submitted in one batch: the first link
/// errs while the second is not linked yet; it must not be forgotten under
/// the second (found in review: the scheduler panicked here).
#[test]
fn chain_on_an_erred_key_errs_whole_and_is_then_forgotten() {
    let (mut h, ws) = Harness::with_workers(1);
    let c = h.add_client();
    h.submit(c, &[t("bad", &[]).want()], false);
    h.step();
    h.fail(ws[0], h.id("bad"), "boom");
    h.step();
    h.take_client_msgs(c);
    h.submit(c, &[t("x", &["bad"]), t("y", &["x"]).want()], false);
    h.step();
    let msgs = h.take_client_msgs(c);
    let erred: Vec<&KeyErred> = msgs.iter().flat_map(|m| match m { ToClientMessage::Erred(e) => e.iter().collect(), _ => vec![] }).collect();
    assert_eq!(erred.len(), 1, "{msgs:?}");
    assert_eq!((erred[0].key.as_str(), erred[0].failed_key.as_str()), ("y", "bad"));
    h.release(c, &["bad", "y"]);
    h.step();
    assert_eq!(h.core.tasks.len(), 0);
}

#[test]
fn cluster_info_reports_workers_and_counters() {
    let (mut h, ws) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &want_last(merge("ci", 3)), false);
    h.run_all();
    h.take_client_msgs(c);
    h.client_msg(c, FromClientMessage::ClusterInfo { request_id: 9 });
    h.step();
    let msgs = h.take_client_msgs(c);
    let [ToClientMessage::ClusterInfo { request_id: 9, info }] = &msgs[..] else { panic!("{msgs:?}") };
    assert_eq!(info.workers.iter().map(|w| w.id).collect::<Vec<_>>(), ws);
    assert_eq!((info.submitted, info.finished, info.failed, info.tasks), (4, 4, 0, 4));
    let stored: u64 = info.workers.iter().map(|w| w.stored_values).sum();
    assert_eq!(stored, 1, "only the wanted sink's value is kept");
}

// ------------------------------------------------------------------ restrictions

#[test]
fn restricted_tasks_run_only_on_named_workers_and_do_not_block_others() {
    let (mut h, ws) = Harness::with_workers(3);
    let c = h.add_client();
    let mut tasks: Vec<T> = (0..6).map(|i| t(&format!("only-b-{i}"), &[]).want().restrict(&["sim-1"], &[], false)).collect();
    tasks.extend((0..6).map(|i| t(&format!("free-{i}"), &[]).want()));
    h.submit(c, &tasks, false);
    h.step();
    for i in 0..6 {
        assert_eq!(h.assigned_to(&format!("only-b-{i}")), Some(ws[1]), "only-b-{i} must go to sim-1");
    }
    h.run_all();
    assert_eq!(h.in_memory(c).len(), 12);
}

#[test]
fn task_needing_a_resource_waits_for_a_worker_that_offers_it() {
    let (mut h, _ws) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(c, &[t("gpu-task", &[]).want().restrict(&[], &[("GPU", 1.0)], false), t("cpu-task", &[]).want()], false);
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["cpu-task"], "no worker has a GPU yet");
    assert_eq!(h.state("gpu-task"), Some(TaskState::Ready));
    let too_small = h.add_worker_with(1, &[("GPU", 0.5)]);
    h.run_all();
    assert_eq!(h.state("gpu-task"), Some(TaskState::Ready), "0.5 GPU is not enough");
    let gpu = h.add_worker_with(1, &[("GPU", 1.0)]);
    assert_eq!(h.assigned_to("gpu-task"), Some(gpu));
    assert_ne!(gpu, too_small);
    h.run_all();
    assert_eq!(h.in_memory(c).len(), 2);
}

#[test]
fn loose_restriction_falls_back_to_any_worker_and_strict_one_waits() {
    let (mut h, _ws) = Harness::with_workers(2);
    let c = h.add_client();
    h.submit(
        c,
        &[
            t("loose", &[]).want().restrict(&["no-such-worker"], &[], true),
            t("strict", &[]).want().restrict(&["no-such-worker"], &[], false),
        ],
        false,
    );
    h.run_all();
    assert_eq!(h.in_memory(c), vec!["loose"]);
    assert_eq!(h.state("strict"), Some(TaskState::Ready));
    // Releasing the waiting task forgets it and its restriction.
    h.release(c, &["strict"]);
    h.run_all();
    assert_eq!(h.state("strict"), None);
}

#[test]
fn restriction_index_out_of_range_is_rejected() {
    let mut h = Harness::default();
    let c = h.add_client();
    let g = SubmitGraph {
        submit_id: 0,
        graph_id: 0,
        more: false,
        graph_tasks: 0,
        keys: vec!["a".into()],
        tasks: vec![TaskSpec { restriction: 3, ..spec(vec![]) }],
        restrictions: vec![],
    };
    expect_rejected(&mut h, c, g, vec![], "restriction 3");
}

#[test]
fn task_spans_make_the_task_stream() {
    let (mut h, ws) = Harness::with_workers(1);
    let c = h.add_client();
    h.submit(c, &[t("a-1", &[]).want(), t("b-2", &[]).want()], false);
    h.step();
    let (a, b) = (h.id("a-1"), h.id("b-2"));
    let span = |id, start_us, stop_us, ok| TaskSpan { id, start_us, stop_us, thread: 3, ok };
    // Nobody asked yet (no dashboard, no request): runs are not kept.
    h.worker_msg(ws[0], FromWorkerMessage::Spans(vec![span(a, 500, 900, true)]));
    assert!(h.core.stream.is_empty());
    assert!(!h.sims[&ws[0]].report_spans);
    h.client_msg(c, FromClientMessage::TaskStream { request_id: 1, since_us: 0 });
    h.step();
    assert!(h.sims[&ws[0]].report_spans, "workers are asked for their runs");
    let late = h.add_worker(1);
    assert!(h.sims[&late].report_spans, "and so is a worker that joins later");
    h.worker_msg(ws[0], FromWorkerMessage::Spans(vec![span(a, 1_000, 2_000, true), span(b, 2_500, 4_000, false)]));
    let all = h.core.task_stream(0);
    assert_eq!(all.iter().map(|e| (e.key.as_str(), e.start_us, e.stop_us, e.ok, e.thread)).collect::<Vec<_>>(),
        [("a-1", 1_000, 2_000, true, 3), ("b-2", 2_500, 4_000, false, 3)]);
    assert!(all.iter().all(|e| e.worker == "tcp://w0"), "{all:?}");
    assert_eq!(h.core.task_stream(3_000).len(), 1, "only runs that ended since");
    // A span for a task the scheduler no longer knows is dropped.
    h.worker_msg(ws[0], FromWorkerMessage::Spans(vec![span(TaskId::new(999_999), 5_000, 6_000, true)]));
    assert_eq!(h.core.task_stream(0).len(), 2);
}

#[test]
fn a_task_with_resources_tells_its_worker_what_it_holds() {
    let mut h = Harness::new(CoreConfig::default());
    let gpu = h.add_worker_with(2, &[("GPU", 1.0)]);
    let c = h.add_client();
    h.submit(c, &[t("train", &[]).restrict(&[], &[("GPU", 1.0)], false).want(), t("plain", &[]).want()], false);
    h.step();
    let batches: Vec<ComputeBatch> = h.worker_log(gpu).into_iter().filter_map(|m| match m {
        ToWorkerMessage::Compute(b) => Some(b),
        _ => None,
    }).collect();
    let tasks: Vec<(&str, u32)> = batches.iter().flat_map(|b| b.tasks.iter().map(|t| (t.key.as_str(), t.resources))).collect();
    let train = tasks.iter().find(|(k, _)| *k == "train").unwrap().1;
    let plain = tasks.iter().find(|(k, _)| *k == "plain").unwrap().1;
    assert_eq!(plain, NO_FRAME);
    let sets = &batches.iter().find(|b| b.tasks.iter().any(|t| t.key == "train")).unwrap().resource_sets;
    assert_eq!(sets[train as usize], vec![Resource { name: "GPU".into(), amount: 1.0 }]);
}

#[test]
fn a_paused_worker_gets_no_new_tasks_gives_up_its_queue_and_resumes() {
    let (mut h, ws) = Harness::with_workers(2);
    let c = h.add_client();
    let tasks: Vec<T> = (0..20).map(|i| t(&format!("x{i}"), &[]).want()).collect();
    h.submit(c, &tasks, false);
    h.step();
    assert!(!h.queued(ws[0]).is_empty() && !h.queued(ws[1]).is_empty());
    // Memory above its pause threshold: what it has queued is stolen.
    h.worker_msg(ws[0], FromWorkerMessage::Paused(true));
    h.step();
    // Once the other worker runs dry, it steals from the paused one (which
    // has fewer queued than an active victim would need to have).
    let done: Vec<TaskId> = h.queued(ws[1]).iter().map(|k| h.id(k)).collect();
    h.finish(ws[1], &done, 8);
    h.step();
    assert!(!h.steals_to(ws[0]).is_empty(), "the paused worker's queue goes to the idle one");
    let more: Vec<T> = (0..20).map(|i| t(&format!("y{i}"), &[]).want()).collect();
    h.submit(c, &more, false);
    h.step();
    assert!(h.queued(ws[0]).iter().all(|k| k.starts_with('x')), "{:?}", h.queued(ws[0]));
    assert!(h.core.cluster_info().workers.iter().any(|w| w.paused));
    // Back under the threshold: it takes work again.
    h.worker_msg(ws[0], FromWorkerMessage::Paused(false));
    let last: Vec<T> = (0..20).map(|i| t(&format!("z{i}"), &[]).want()).collect();
    h.submit(c, &last, false);
    h.step();
    assert!(h.queued(ws[0]).iter().any(|k| k.starts_with('z')), "{:?}", h.queued(ws[0]));
    h.run_all();
    assert_eq!(h.in_memory(c).len(), 60);
}

#[test]
fn coordination_locks_wait_cancel_and_come_back_when_a_client_leaves() {
    use rdask_transport::protocol::{CoordOp, CoordOutcome, ToClientMessage};
    let (mut h, _) = Harness::with_workers(1);
    let (a, b) = (h.add_client(), h.add_client());
    h.step();
    h.take_client_msgs(a);
    h.take_client_msgs(b);
    let acquire = |lease| CoordOp::Acquire { names: vec!["L".into()], max_leases: 1, count: 0, lease };
    let outcomes = |h: &mut Harness, c| -> Vec<(u64, CoordOutcome)> {
        h.step();
        h.take_client_msgs(c)
            .into_iter()
            .filter_map(|m| match m {
                ToClientMessage::Coord { request_id, outcome } => Some((request_id, outcome)),
                _ => None,
            })
            .collect()
    };
    h.client_msg(a, FromClientMessage::Coord { request_id: 1, op: acquire(1) });
    assert_eq!(outcomes(&mut h, a), vec![(1, CoordOutcome::Done)]);
    // b waits; a cancelled wait is answered Cancelled, once.
    h.client_msg(b, FromClientMessage::Coord { request_id: 7, op: acquire(1) });
    assert!(outcomes(&mut h, b).is_empty());
    h.client_msg(b, FromClientMessage::Coord { request_id: 8, op: CoordOp::Cancel { request_id: 7 } });
    assert_eq!(outcomes(&mut h, b), vec![(7, CoordOutcome::Cancelled)]);
    h.client_msg(b, FromClientMessage::Coord { request_id: 9, op: CoordOp::Cancel { request_id: 7 } });
    assert!(outcomes(&mut h, b).is_empty());
    // b waits again; a leaves without releasing: b gets the lock.
    h.client_msg(b, FromClientMessage::Coord { request_id: 10, op: acquire(2) });
    assert!(outcomes(&mut h, b).is_empty());
    h.remove_client(a);
    assert_eq!(outcomes(&mut h, b), vec![(10, CoordOutcome::Done)]);
    h.client_msg(b, FromClientMessage::Coord { request_id: 11, op: CoordOp::Leases { name: "L".into() } });
    assert_eq!(outcomes(&mut h, b), vec![(11, CoordOutcome::Count(1))]);
}
