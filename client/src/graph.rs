//! Turning a list of task definitions into submit batches.

use rdask_transport::bytes::Bytes;
use std::sync::Arc;

use rdask_transport::protocol::{Restriction, SubmitGraph, TaskSpec, NO_FRAME};
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
    /// Where the task may run; shared by the tasks of one `map`.
    pub restriction: Option<Arc<Restriction>>,
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
#[cfg(test)]
pub(crate) fn for_each_batch<E>(
    tasks: Vec<TaskDef>,
    batch_size: usize,
    send: impl FnMut(SubmitGraph, Vec<Bytes>, Vec<String>) -> Result<(), E>,
) -> Result<(), E> {
    for_each_batch_of_part(tasks, batch_size, Part { open: false, graph_tasks: 0 }, send)
}

/// Where a list of tasks sits in a graph submitted in several parts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    /// More parts of the same graph follow (its batches stay pinned).
    pub open: bool,
    /// Tasks in the whole graph, if known (0: this part's size).
    pub graph_tasks: u64,
}

pub(crate) fn for_each_batch_of_part<E>(
    tasks: Vec<TaskDef>,
    batch_size: usize,
    part: Part,
    send: impl FnMut(SubmitGraph, Vec<Bytes>, Vec<String>) -> Result<(), E>,
) -> Result<(), E> {
    // One index over the whole graph (key -> position). Graphs usually
    // arrive dependencies-first; only otherwise are they sorted and indexed
    // again. Every dependency is resolved to a position while the keys can
    // still be borrowed; the batches then move keys out instead of cloning.
    let pos = index(&tasks);
    if is_ordered(&tasks, &pos) {
        let resolved = resolve(&tasks, &pos);
        drop(pos);
        return emit(tasks, &resolved, batch_size, part, send);
    }
    drop(pos);
    let ordered = topological(tasks);
    let resolved = resolve(&ordered, &index(&ordered));
    emit(ordered, &resolved, batch_size, part, send)
}

fn index(tasks: &[TaskDef]) -> FxHashMap<&str, usize> {
    tasks.iter().enumerate().map(|(i, t)| (t.key.as_str(), i)).collect()
}

fn is_ordered(tasks: &[TaskDef], pos: &FxHashMap<&str, usize>) -> bool {
    tasks.iter().enumerate().all(|(i, t)| t.deps.iter().all(|d| pos.get(d.as_str()).is_none_or(|&j| j < i)))
}

/// A dependency outside this list of tasks (a key the scheduler holds).
const OUTSIDE: u32 = u32::MAX;

/// For each task's dependencies, in order: the graph position, or `OUTSIDE`.
fn resolve(ordered: &[TaskDef], pos: &FxHashMap<&str, usize>) -> Vec<u32> {
    ordered
        .iter()
        .flat_map(|t| t.deps.iter())
        .map(|d| pos.get(d.as_str()).map_or(OUTSIDE, |&p| p as u32))
        .collect()
}

fn emit<E>(
    mut ordered: Vec<TaskDef>,
    resolved: &[u32],
    batch_size: usize,
    part: Part,
    mut send: impl FnMut(SubmitGraph, Vec<Bytes>, Vec<String>) -> Result<(), E>,
) -> Result<(), E> {
    const FIRST_BATCH: usize = 2048;
    let batch_size = batch_size.max(1);
    let total = ordered.len();
    let graph_tasks = if part.graph_tasks > 0 { part.graph_tasks } else { total as u64 };
    let mut start = 0;
    let mut next_dep = 0; // this batch's first entry in `resolved`
    let mut size = FIRST_BATCH.min(batch_size);
    while start < total || (start == 0 && total == 0) {
        let end = (start + size).min(total);
        let chunk = &mut ordered[start..end];
        // The batch's own keys move out of the definitions (they are not
        // needed again: dependencies are resolved already).
        let mut keys: Vec<String> = chunk.iter_mut().map(|t| std::mem::take(&mut t.key)).collect();
        // Dependencies outside this batch: earlier batches (by graph
        // position) and keys the scheduler already holds (by name).
        let mut earlier: FxHashMap<u32, u32> = FxHashMap::default();
        let mut outside: FxHashMap<String, u32> = FxHashMap::default();
        let mut data = Vec::new();
        let mut specs = Vec::with_capacity(chunk.len());
        let mut wanted = Vec::new();
        let mut restrictions: Vec<Restriction> = Vec::new();
        let mut restriction_index: FxHashMap<*const Restriction, u32> = FxHashMap::default();
        for (i, t) in chunk.iter_mut().enumerate() {
            let restriction = match &t.restriction {
                None => NO_FRAME,
                Some(r) => *restriction_index.entry(Arc::as_ptr(r)).or_insert_with(|| {
                    restrictions.push((**r).clone());
                    (restrictions.len() - 1) as u32
                }),
            };
            let mine = &resolved[next_dep..next_dep + t.deps.len()];
            next_dep += t.deps.len();
            let mut deps = Vec::with_capacity(mine.len());
            for (name, &p) in t.deps.iter_mut().zip(mine) {
                let p_usize = p as usize;
                let index = if p != OUTSIDE && p_usize >= start && p_usize < end {
                    (p_usize - start) as u32
                } else if p != OUTSIDE {
                    *earlier.entry(p).or_insert_with(|| {
                        keys.push(std::mem::take(name));
                        (keys.len() - 1) as u32
                    })
                } else if let Some(&k) = outside.get(name.as_str()) {
                    k
                } else {
                    keys.push(name.clone());
                    outside.insert(std::mem::take(name), (keys.len() - 1) as u32);
                    (keys.len() - 1) as u32
                };
                deps.push(index);
            }
            let payload = if t.payload.is_empty() {
                NO_FRAME
            } else {
                data.push(std::mem::take(&mut t.payload));
                (data.len() - 1) as u32
            };
            if t.want {
                wanted.push(keys[i].clone());
            }
            specs.push(TaskSpec {
                deps,
                user_priority: t.priority,
                order: t.order,
                payload,
                want: t.want,
                retries: t.retries,
                restriction,
            });
        }
        let more = end < total || part.open;
        send(SubmitGraph { submit_id: 0, graph_id: 0, more, graph_tasks, keys, tasks: specs, restrictions }, data, wanted)?;
        if end >= total {
            break;
        }
        start = end;
        size = (size * 2).min(batch_size);
    }
    Ok(())
}

fn topological(tasks: Vec<TaskDef>) -> Vec<TaskDef> {
    let n = tasks.len();
    let index = index(&tasks);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(tasks: Vec<TaskDef>, batch_size: usize) -> Vec<SubmitGraph> {
        let mut out = Vec::new();
        for_each_batch::<()>(tasks, batch_size, |g, _, _| {
            out.push(g);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn external_keys_are_named_once_per_batch_and_payloads_travel_with_their_task() {
        // "held" exists on the scheduler; a* fill the first batch (2048).
        let mut tasks: Vec<TaskDef> = (0..2048).map(|i| TaskDef::new(format!("a{i}"), vec![])).collect();
        tasks.push(TaskDef::new("x", vec!["held".into(), "a0".into(), "a0".into(), "a1".into()]).with_payload(Bytes::from_static(b"px")));
        tasks.push(TaskDef::new("y", vec!["a1".into(), "held".into(), "x".into()]).with_payload(Bytes::from_static(b"py")).wanted());
        let mut sent = Vec::new();
        for_each_batch::<()>(tasks, 4096, |g, data, wanted| {
            sent.push((g, data, wanted));
            Ok(())
        })
        .unwrap();
        assert_eq!(sent.len(), 2);
        let (g, data, wanted) = &sent[1];
        // own keys first, then each outside name once, in first-use order
        assert_eq!(g.keys, vec!["x", "y", "held", "a0", "a1"]);
        assert_eq!(g.tasks[0].deps, vec![2, 3, 3, 4]);
        assert_eq!(g.tasks[1].deps, vec![4, 2, 0]);
        assert_eq!(data.iter().map(|d| &d[..]).collect::<Vec<_>>(), vec![&b"px"[..], &b"py"[..]]);
        assert_eq!((g.tasks[0].payload, g.tasks[1].payload), (0, 1));
        assert_eq!(wanted, &vec!["y".to_string()]);
        assert_eq!(sent[0].0.keys.len(), 2048);
        assert_eq!(sent[0].0.keys[7], "a7");
    }

    #[test]
    fn unordered_graph_is_sent_dependencies_first() {
        // c depends on b depends on a, given in reverse.
        let tasks = vec![
            TaskDef::new("c", vec!["b".into()]),
            TaskDef::new("b", vec!["a".into()]),
            TaskDef::new("a", vec![]),
        ];
        let batches = collect(tasks, 10);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].keys, vec!["a", "b", "c"]);
        assert_eq!(batches[0].tasks[2].deps, vec![1]);
        assert!(!batches[0].more);
    }

    #[test]
    fn batches_grow_and_name_earlier_keys_as_external() {
        let n = 10_000;
        let mut tasks: Vec<TaskDef> = (0..n).map(|i| TaskDef::new(format!("k{i}"), vec![])).collect();
        tasks.push(TaskDef::new("root", (0..n).map(|i| format!("k{i}")).collect()).wanted());
        let batches = collect(tasks, 4096);
        let sizes: Vec<usize> = batches.iter().map(|b| b.tasks.len()).collect();
        assert_eq!(sizes, vec![2048, 4096, 3857]);
        assert!(batches[..2].iter().all(|b| b.more) && !batches[2].more);
        // The root (last batch) names keys of earlier batches after its own tasks.
        let last = &batches[2];
        let root = last.tasks.last().unwrap();
        assert!(root.want);
        assert_eq!(root.deps.len(), n);
        let first_dep = root.deps[0] as usize;
        assert!(first_dep >= last.tasks.len(), "k0 is external to the last batch");
        assert_eq!(last.keys[first_dep], "k0");
    }
}
