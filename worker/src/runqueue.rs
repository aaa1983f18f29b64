//! The worker's executor threads and their priority queue. Threads drain the
//! queue without sleeping while it has work, so a burst of micro-tasks costs
//! one lock round per task, not a thread wake-up.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex};

use rdask_transport::protocol::{Resource, TaskSpan};
use rdask_transport::TaskId;
use rustc_hash::FxHashSet;
use tokio::sync::mpsc;

use crate::executor::{Executor, TaskFailure, TaskRun, Value};

/// Run order: higher user priority, then lower graph order, then arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPriority {
    pub user: i32,
    pub order: i64,
    pub seq: u64,
}

impl Ord for JobPriority {
    fn cmp(&self, o: &Self) -> Ordering {
        self.user.cmp(&o.user).then_with(|| o.order.cmp(&self.order)).then_with(|| o.seq.cmp(&self.seq))
    }
}

impl PartialOrd for JobPriority {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// A task for the executor threads.
pub struct Job {
    pub priority: JobPriority,
    pub run: TaskRun,
    /// Confirm the start with the scheduler before running (the task was on
    /// a worker that died; see `ComputeTask::careful`).
    pub careful: bool,
    /// Resources the task holds while it runs (`GPU=1`); empty for most.
    pub needs: Vec<Resource>,
}

impl PartialEq for Job {
    fn eq(&self, o: &Self) -> bool {
        self.priority == o.priority
    }
}
impl Eq for Job {}
impl Ord for Job {
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority.cmp(&o.priority)
    }
}
impl PartialOrd for Job {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Default)]
struct Inner {
    heap: BinaryHeap<Job>,
    /// Ids in `heap` that may still run; `take` removes from here and the
    /// heap entry is skipped when popped.
    queued: FxHashSet<TaskId>,
    running: usize,
    /// Tasks running user code now (at most one per thread).
    executing: Vec<TaskId>,
    /// Careful tasks whose start the scheduler has seen.
    confirmed: FxHashSet<TaskId>,
    /// Resources not held by running tasks (the worker's `--resources`).
    available: Vec<Resource>,
    /// Queued jobs waiting for resources that running tasks hold; back in
    /// the heap when some are released.
    blocked: Vec<Job>,
    /// Memory above the pause threshold: no task starts.
    paused: bool,
    shutdown: bool,
}

/// Whether `needs` fit in `available` (a resource the worker lacks never
/// fits; the scheduler sends such tasks only to workers that have it).
fn fits(available: &[Resource], needs: &[Resource]) -> bool {
    needs.iter().all(|n| available.iter().any(|a| a.name == n.name && a.amount + 1e-9 >= n.amount))
}

fn take_resources(available: &mut [Resource], needs: &[Resource], sign: f64) {
    for n in needs {
        if let Some(a) = available.iter_mut().find(|a| a.name == n.name) {
            a.amount -= sign * n.amount;
        }
    }
}

pub type Completion = (TaskId, Result<Value, TaskFailure>);

/// What executor threads hand to the worker loop: results, and when each
/// task ran (for the task stream).
#[derive(Default)]
pub struct Done {
    pub completions: Vec<Completion>,
    pub spans: Vec<TaskSpan>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub struct RunQueue {
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Wakes threads waiting for a careful task's confirmation (apart from
    /// `cv`, so a job's notify_one never lands on a waiting thread).
    confirm_cv: Condvar,
    /// `Inner::executing.len()`, readable without the lock.
    executing: AtomicUsize,
    /// Set while the worker loop sweeps for executing tasks. A thread that
    /// starts a task while it is clear sets it and wakes the loop through
    /// `sweep_wake`: one wake per busy period, not one per task.
    sweeping: std::sync::atomic::AtomicBool,
    pub sweep_wake: tokio::sync::Notify,
    executor: Arc<dyn Executor>,
    memory_gate: std::sync::atomic::AtomicU64,
    done: mpsc::UnboundedSender<Done>,
    /// Careful tasks about to start, for the worker loop to report.
    starting: mpsc::UnboundedSender<TaskId>,
    name: String,
    /// Threads started so far (names them), including replacements for
    /// threads that seceded.
    started: AtomicUsize,
}

thread_local! {
    /// The queue this executor thread serves; None on other threads.
    static CURRENT: RefCell<Option<Arc<RunQueue>>> = const { RefCell::new(None) };
    /// Set when the task running on this thread seceded: a replacement
    /// thread serves the queue, and this one ends with its task.
    static SECEDED: Cell<bool> = const { Cell::new(false) };
}

/// Called by a task that is about to block on the cluster (a task that
/// waits for other tasks, as `secede()` in Dask): its thread leaves the
/// pool and a new thread takes its place, so the tasks it waits for can run
/// on this worker even when it has a single thread. The seceded thread ends
/// when its task does. False when not called from an executor thread, or
/// when the task has seceded already.
pub fn secede_current_thread() -> bool {
    if SECEDED.with(|s| s.get()) {
        return false;
    }
    let Some(q) = CURRENT.with(|c| c.borrow().clone()) else { return false };
    match q.spawn_thread() {
        Ok(()) => {
            SECEDED.with(|s| s.set(true));
            tracing::debug!(queue = %q.name, "a task seceded from the executor pool; started a replacement thread");
            true
        }
        Err(e) => {
            tracing::warn!(queue = %q.name, "cannot start a thread for a seceding task: {e}");
            false
        }
    }
}

impl RunQueue {
    /// Starts `nthreads` executor threads that report to `done`; careful
    /// tasks announce themselves on `starting` and wait for [`RunQueue::confirm`].
    /// `resources`: what the worker offers; tasks that need some run only
    /// while enough is free.
    pub fn start(
        nthreads: usize,
        name: &str,
        executor: Arc<dyn Executor>,
        done: mpsc::UnboundedSender<Done>,
        starting: mpsc::UnboundedSender<TaskId>,
        resources: Vec<Resource>,
    ) -> std::io::Result<Arc<RunQueue>> {
        let q = Arc::new(RunQueue {
            inner: Mutex::new(Inner { available: resources, ..Inner::default() }),
            cv: Condvar::new(),
            confirm_cv: Condvar::new(),
            executing: AtomicUsize::new(0),
            sweeping: std::sync::atomic::AtomicBool::new(false),
            sweep_wake: tokio::sync::Notify::new(),
            executor,
            memory_gate: Default::default(),
            done,
            starting,
            name: name.to_string(),
            started: AtomicUsize::new(0),
        });
        for _ in 0..nthreads.max(1) {
            q.spawn_thread()?;
        }
        Ok(q)
    }

    fn spawn_thread(self: &Arc<Self>) -> std::io::Result<()> {
        let i = self.started.fetch_add(1, AtomicOrdering::Relaxed);
        let q = self.clone();
        std::thread::Builder::new().name(format!("{}-exec-{i}", self.name)).stack_size(4 << 20).spawn(move || {
            CURRENT.with(|c| *c.borrow_mut() = Some(q.clone()));
            q.thread_loop(i as u32);
            CURRENT.with(|c| c.borrow_mut().take());
        })?;
        Ok(())
    }

    /// Queues jobs under one lock and wakes as many threads as there are jobs.
    pub fn push_many(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut g = self.inner.lock().unwrap();
        let mut n = 0;
        for job in jobs {
            g.queued.insert(job.run.id);
            g.heap.push(job);
            n += 1;
        }
        drop(g);
        if n == 1 {
            self.cv.notify_one();
        } else if n > 1 {
            self.cv.notify_all();
        }
    }

    /// Process memory above which no task starts (the pause threshold;
    /// 0: none). Checked by each thread before it starts a task, so a burst
    /// of allocating tasks cannot outrun the memory monitor's sampling.
    pub fn set_memory_gate(&self, bytes: u64) {
        self.memory_gate.store(bytes, AtomicOrdering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.inner.lock().unwrap().paused
    }

    /// Pauses (no queued task starts; running ones finish) or resumes.
    pub fn set_paused(&self, paused: bool) {
        self.inner.lock().unwrap().paused = paused;
        if !paused {
            self.cv.notify_all();
        }
    }

    /// Removes a task that has not started. True if it was still queued.
    pub fn take(&self, id: TaskId) -> bool {
        self.inner.lock().unwrap().queued.remove(&id)
    }

    /// (queued, running)
    pub fn load(&self) -> (usize, usize) {
        let g = self.inner.lock().unwrap();
        (g.queued.len(), g.running)
    }

    pub fn shutdown(&self) {
        let mut g = self.inner.lock().unwrap();
        g.shutdown = true;
        g.heap.clear();
        g.blocked.clear();
        g.queued.clear();
        drop(g);
        self.cv.notify_all();
        self.confirm_cv.notify_all();
    }

    /// Whether some task is running user code now (no lock taken).
    pub fn is_executing(&self) -> bool {
        self.executing.load(AtomicOrdering::SeqCst) > 0
    }

    /// The worker loop stops sweeping. False (keep sweeping) if a task
    /// started meanwhile: its thread saw the flag still set and did not wake
    /// the loop.
    pub fn stop_sweeping(&self) -> bool {
        self.sweeping.store(false, AtomicOrdering::SeqCst);
        if self.is_executing() {
            self.sweeping.store(true, AtomicOrdering::SeqCst);
            return false;
        }
        true
    }

    /// Appends the tasks running user code now to `out`.
    pub fn executing_into(&self, out: &mut Vec<TaskId>) {
        out.extend_from_slice(&self.inner.lock().unwrap().executing);
    }

    /// The scheduler has seen these careful tasks start: they may run.
    pub fn confirm(&self, ids: impl IntoIterator<Item = TaskId>) {
        self.inner.lock().unwrap().confirmed.extend(ids);
        self.confirm_cv.notify_all();
    }

    /// Announces a careful task and waits until the scheduler confirms it
    /// (or the queue shuts down, or `CONFIRM_WAIT` passes: a scheduler that
    /// does not answer must not stall the worker forever).
    fn wait_for_confirmation<'a>(&'a self, id: TaskId, mut g: std::sync::MutexGuard<'a, Inner>) -> std::sync::MutexGuard<'a, Inner> {
        const CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        if self.starting.send(id).is_err() {
            return g;
        }
        let deadline = std::time::Instant::now() + CONFIRM_WAIT;
        while !g.confirmed.remove(&id) && !g.shutdown {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(task = %id, "the scheduler did not confirm a careful task's start; running it anyway");
                break;
            }
            g = self.confirm_cv.wait_timeout(g, left).unwrap().0;
        }
        g
    }

    /// Books a task's end: no longer running or executing, its resources
    /// free again (jobs that waited for them go back to the heap, and every
    /// thread looks again).
    fn job_ended(&self, g: &mut Inner, id: TaskId, needs: &[Resource]) {
        g.running -= 1;
        if let Some(i) = g.executing.iter().position(|t| *t == id) {
            g.executing.swap_remove(i);
            self.executing.fetch_sub(1, AtomicOrdering::SeqCst);
        }
        if needs.is_empty() {
            return;
        }
        take_resources(&mut g.available, needs, -1.0);
        if !g.blocked.is_empty() {
            let blocked = std::mem::take(&mut g.blocked);
            g.heap.extend(blocked);
            self.cv.notify_all();
        }
    }

    /// Runs jobs one at a time, highest priority first. Completions are
    /// handed to the worker loop in batches: a thread reports when the queue
    /// runs dry (or after `REPORT_EVERY` jobs), so a burst of micro-tasks
    /// costs one wake-up of the worker loop, not one per task.
    fn thread_loop(&self, thread: u32) {
        let (executor, done) = (&*self.executor, &self.done);
        const REPORT_EVERY: usize = 256;
        /// Results older than this go out even while the queue is busy, so a
        /// long queue of real tasks does not hold finished results back.
        const REPORT_AFTER: std::time::Duration = std::time::Duration::from_millis(1);
        let mut finished = Done::default();
        let mut oldest = std::time::Instant::now();
        let mut g = self.inner.lock().unwrap();
        loop {
            if g.shutdown {
                return;
            }
            let gate = self.memory_gate.load(AtomicOrdering::Relaxed);
            if gate > 0 && !g.paused && !g.heap.is_empty() && crate::procinfo::rss_now() > gate {
                // The memory monitor takes it from here: it tells the
                // scheduler, and resumes the queue when memory drops.
                g.paused = true;
            }
            let next = if g.paused { None } else { g.heap.pop() };
            let Some(mut job) = next else {
                if !finished.completions.is_empty() {
                    drop(g);
                    if done.send(std::mem::take(&mut finished)).is_err() {
                        return; // worker loop is gone
                    }
                    g = self.inner.lock().unwrap();
                    continue;
                }
                g = self.cv.wait(g).unwrap();
                continue;
            };
            if !g.queued.contains(&job.run.id) {
                continue; // stolen or cancelled while queued
            }
            if !job.needs.is_empty() {
                if !fits(&g.available, &job.needs) {
                    g.blocked.push(job); // still queued: steal and cancel find it
                    continue;
                }
                take_resources(&mut g.available, &job.needs, 1.0);
            }
            g.queued.remove(&job.run.id);
            g.running += 1;
            if job.careful {
                g = self.wait_for_confirmation(job.run.id, g);
                if g.shutdown {
                    return;
                }
            }
            // Executing from here on (a careful task's wait is not).
            g.executing.push(job.run.id);
            self.executing.fetch_add(1, AtomicOrdering::SeqCst);
            drop(g);
            if !self.sweeping.swap(true, AtomicOrdering::SeqCst) {
                self.sweep_wake.notify_one();
            }
            let id = job.run.id;
            let key = job.run.key.clone();
            let needs = std::mem::take(&mut job.needs);
            let start_us = now_us();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| executor.execute(job.run)))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(TaskFailure::message(format!("executor panicked while running {key}: {what}")))
                });
            if finished.completions.is_empty() {
                oldest = std::time::Instant::now();
            }
            finished.spans.push(TaskSpan { id, start_us, stop_us: now_us(), thread, ok: result.is_ok() });
            finished.completions.push((id, result));
            if SECEDED.with(|s| s.replace(false)) {
                // A replacement serves the queue already: report and end.
                let _ = done.send(std::mem::take(&mut finished));
                let mut g = self.inner.lock().unwrap();
                self.job_ended(&mut g, id, &needs);
                return;
            }
            let due = finished.completions.len() >= REPORT_EVERY || oldest.elapsed() >= REPORT_AFTER;
            if due && done.send(std::mem::take(&mut finished)).is_err() {
                return;
            }
            g = self.inner.lock().unwrap();
            self.job_ended(&mut g, id, &needs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdask_transport::bytes::Bytes;
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    /// "outer" secedes and then waits until "inner" has run; with one
    /// thread that only works if seceding brought a second thread.
    struct WaitsForInner {
        inner_ran: Mutex<Option<std_mpsc::Receiver<()>>>,
        signal: Mutex<std_mpsc::Sender<()>>,
        secede: bool,
    }

    impl Executor for WaitsForInner {
        fn execute(&self, task: TaskRun) -> Result<Value, TaskFailure> {
            if task.key == "outer" {
                let seceded = self.secede && secede_current_thread();
                let again = self.secede && secede_current_thread();
                let rx = self.inner_ran.lock().unwrap().take().unwrap();
                let ran = rx.recv_timeout(Duration::from_secs(2)).is_ok();
                Ok(Value::Bytes(Bytes::from(format!("{seceded} {again} {ran}"))))
            } else {
                let _ = self.signal.lock().unwrap().send(());
                Ok(Value::Bytes(Bytes::from_static(b"inner")))
            }
        }
    }

    fn run_outer_then_inner(secede: bool) -> String {
        let (sig_tx, sig_rx) = std_mpsc::channel();
        let exec = Arc::new(WaitsForInner {
            inner_ran: Mutex::new(Some(sig_rx)),
            signal: Mutex::new(sig_tx),
            secede,
        });
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let (start_tx, _start_rx) = mpsc::unbounded_channel();
        let q = RunQueue::start(1, "t", exec, done_tx, start_tx, vec![]).unwrap();
        let job = |id: u64, key: &str, order: i64| {
            let run = TaskRun { id: TaskId::new(id), key: key.into(), payload: Bytes::new(), inputs: vec![] };
            Job { priority: JobPriority { user: 0, order, seq: id }, run, careful: false, needs: vec![] }
        };
        q.push_many([job(1, "outer", 0)]);
        std::thread::sleep(Duration::from_millis(50));
        q.push_many([job(2, "inner", 1)]);
        let mut outer = None;
        let mut seen = 0;
        while seen < 2 {
            for (id, r) in done_rx.blocking_recv().unwrap().completions {
                seen += 1;
                if id == TaskId::new(1) {
                    let Value::Bytes(b) = r.unwrap() else { panic!("bytes expected") };
                    outer = Some(String::from_utf8(b.to_vec()).unwrap());
                }
            }
        }
        q.shutdown();
        outer.unwrap()
    }

    #[test]
    fn a_seceded_task_lets_the_tasks_it_waits_for_run_on_a_single_thread() {
        assert_eq!(run_outer_then_inner(true), "true false true");
    }

    #[test]
    fn without_seceding_a_single_thread_is_held_by_the_waiting_task() {
        // The control: the same tasks starve until the wait times out.
        assert_eq!(run_outer_then_inner(false), "false false false");
    }

    #[test]
    fn secede_outside_an_executor_thread_does_nothing() {
        assert!(!secede_current_thread());
    }
}
