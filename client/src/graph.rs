//! Turning a list of task definitions into submit batches.

use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::{SubmitGraph, TaskSpec, NO_FRAME};
use rustc_hash::FxHashMap;

/// One task as the user describes it.
#[derive(Debug, Clone, Default)]
pub struct TaskDef {
    pub key: String,
    pub deps: Vec<String>,
    pub payload: Bytes,
    /// Higher runs first.
    pub priority: i32,
    /// Graph order (lower first); `None` lets the scheduler use b-level.
    pub order: Option<i64>,
    /// The client holds this key (can wait on and gather it).
    pub want: bool,
    pub retries: u32,
}

impl TaskDef {
    pub fn new(key: impl Into<String>, deps: Vec<String>) -> Self {
        TaskDef { key: key.into(), deps, ..Default::default() }
    }
    pub fn wanted(mut self) -> Self {
        self.want = true;
        self
    }
    pub fn with_payload(mut self, payload: Bytes) -> Self {
        self.payload = payload;
        self
    }
}

/// Orders tasks so dependencies come first (a cycle is left for the
/// scheduler to reject with a precise message), cuts them into batches and
/// hands each to `send` as soon as it is built. The first batches are small
/// and later ones grow to `batch_size`, so the scheduler starts work while the
/// rest of a large graph is still being encoded.
pub(crate) fn for_each_batch<E>(
    tasks: Vec<TaskDef>,
    batch_size: usize,
    mut send: impl FnMut(SubmitGraph, Vec<Bytes>, Vec<String>) -> Result<(), E>,
) -> Result<(), E> {
    const FIRST_BATCH: usize = 2048;
    let ordered = topological(tasks);
    let batch_size = batch_size.max(1);
    // One index over the whole graph: key -> position in `ordered`.
    let pos: FxHashMap<&str, usize> = ordered.iter().enumerate().map(|(i, t)| (t.key.as_str(), i)).collect();
    let mut start = 0;
    let mut size = FIRST_BATCH.min(batch_size);
    while start < ordered.len() || (start == 0 && ordered.is_empty()) {
        let end = (start + size).min(ordered.len());
        let chunk = &ordered[start..end];
        let mut keys: Vec<String> = chunk.iter().map(|t| t.key.clone()).collect();
        // Dependencies outside this batch (earlier batches or existing keys).
        let mut external: FxHashMap<&str, u32> = FxHashMap::default();
        let mut data = Vec::new();
        let mut specs = Vec::with_capacity(chunk.len());
        let mut wanted = Vec::new();
        for t in chunk {
            let deps = t
                .deps
                .iter()
                .map(|d| match pos.get(d.as_str()) {
                    Some(&p) if p >= start && p < end => (p - start) as u32,
                    _ => *external.entry(d.as_str()).or_insert_with(|| {
                        keys.push(d.clone());
                        (keys.len() - 1) as u32
                    }),
                })
                .collect();
            let payload = if t.payload.is_empty() {
                NO_FRAME
            } else {
                data.push(t.payload.clone());
                (data.len() - 1) as u32
            };
            if t.want {
                wanted.push(t.key.clone());
            }
            specs.push(TaskSpec {
                deps,
                user_priority: t.priority,
                order: t.order,
                payload,
                want: t.want,
                retries: t.retries,
            });
        }
        let more = end < ordered.len();
        send(SubmitGraph { submit_id: 0, graph_id: 0, more, keys, tasks: specs }, data, wanted)?;
        if !more {
            break;
        }
        start = end;
        size = (size * 2).min(batch_size);
    }
    Ok(())
}

fn topological(tasks: Vec<TaskDef>) -> Vec<TaskDef> {
    let n = tasks.len();
    let index: FxHashMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.key.as_str(), i)).collect();
    // Graphs usually arrive dependencies-first already; then there is nothing to do.
    let ordered = tasks.iter().enumerate().all(|(i, t)| t.deps.iter().all(|d| index.get(d.as_str()).is_none_or(|&j| j < i)));
    if ordered {
        return tasks;
    }
    let mut indegree = vec![0u32; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, t) in tasks.iter().enumerate() {
        for d in &t.deps {
            if let Some(&j) = index.get(d.as_str()) {
                indegree[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut head = 0;
    while head < order.len() {
        let t = order[head];
        head += 1;
        for &x in &dependents[t] {
            indegree[x] -= 1;
            if indegree[x] == 0 {
                order.push(x);
            }
        }
    }
    // Tasks on a cycle go last, as they are; the scheduler names the cycle.
    let mut placed = vec![false; n];
    for &i in &order {
        placed[i] = true;
    }
    order.extend((0..n).filter(|&i| !placed[i]));
    let mut slots: Vec<Option<TaskDef>> = tasks.into_iter().map(Some).collect();
    order.into_iter().map(|i| slots[i].take().unwrap()).collect()
}
