//! The worker's executor threads and their priority queue. Threads drain the
//! queue without sleeping while it has work, so a burst of micro-tasks costs
//! one lock round per task, not a thread wake-up.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};

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

struct Job {
    priority: JobPriority,
    run: TaskRun,
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
    shutdown: bool,
}

pub type Completion = (TaskId, Result<Value, TaskFailure>);

pub struct RunQueue {
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl RunQueue {
    /// Starts `nthreads` executor threads that report to `done`.
    pub fn start(
        nthreads: usize,
        name: &str,
        executor: Arc<dyn Executor>,
        done: mpsc::UnboundedSender<Vec<Completion>>,
    ) -> std::io::Result<Arc<RunQueue>> {
        let q = Arc::new(RunQueue { inner: Mutex::new(Inner::default()), cv: Condvar::new() });
        for i in 0..nthreads.max(1) {
            let q = q.clone();
            let executor = executor.clone();
            let done = done.clone();
            std::thread::Builder::new()
                .name(format!("{name}-exec-{i}"))
                .stack_size(4 << 20)
                .spawn(move || q.thread_loop(&*executor, &done))?;
        }
        Ok(q)
    }

    /// Queues jobs under one lock and wakes as many threads as there are jobs.
    pub fn push_many(&self, jobs: impl IntoIterator<Item = (JobPriority, TaskRun)>) {
        let mut g = self.inner.lock().unwrap();
        let mut n = 0;
        for (priority, run) in jobs {
            g.queued.insert(run.id);
            g.heap.push(Job { priority, run });
            n += 1;
        }
        drop(g);
        if n == 1 {
            self.cv.notify_one();
        } else if n > 1 {
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
        g.queued.clear();
        drop(g);
        self.cv.notify_all();
    }

    /// Runs jobs one at a time, highest priority first. Completions are
    /// handed to the worker loop in batches: a thread reports when the queue
    /// runs dry (or after `REPORT_EVERY` jobs), so a burst of micro-tasks
    /// costs one wake-up of the worker loop, not one per task.
    fn thread_loop(&self, executor: &dyn Executor, done: &mpsc::UnboundedSender<Vec<Completion>>) {
        const REPORT_EVERY: usize = 256;
        /// Results older than this go out even while the queue is busy, so a
        /// long queue of real tasks does not hold finished results back.
        const REPORT_AFTER: std::time::Duration = std::time::Duration::from_millis(1);
        let mut finished: Vec<Completion> = Vec::new();
        let mut oldest = std::time::Instant::now();
        let mut g = self.inner.lock().unwrap();
        loop {
            if g.shutdown {
                return;
            }
            let Some(job) = g.heap.pop() else {
                if !finished.is_empty() {
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
            if !g.queued.remove(&job.run.id) {
                continue; // stolen or cancelled while queued
            }
            g.running += 1;
            drop(g);
            let id = job.run.id;
            let key = job.run.key.clone();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| executor.execute(job.run)))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(TaskFailure::message(format!("executor panicked while running {key}: {what}")))
                });
            if finished.is_empty() {
                oldest = std::time::Instant::now();
            }
            finished.push((id, result));
            let due = finished.len() >= REPORT_EVERY || oldest.elapsed() >= REPORT_AFTER;
            if due && done.send(std::mem::take(&mut finished)).is_err() {
                return;
            }
            g = self.inner.lock().unwrap();
            g.running -= 1;
        }
    }
}
