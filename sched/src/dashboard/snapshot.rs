//! What the dashboard shows, read from the core in one pass: the reactor
//! makes a snapshot every half second while a dashboard is on, and the HTTP
//! server only ever reads snapshots (the core stays free of I/O and locks).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::core::{Core, TaskState};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub scheduler_id: String,
    pub address: String,
    pub dashboard: String,
    pub uptime_s: f64,
    pub clients: usize,
    pub tasks: TaskCounts,
    pub submitted: u64,
    pub finished: u64,
    pub failed: u64,
    pub stolen: u64,
    pub recomputed: u64,
    pub workers: Vec<WorkerRow>,
    /// Progress per task prefix (the key's name part, as Dask groups them).
    pub prefixes: Vec<PrefixRow>,
    /// Task runs of the last `STREAM_WINDOW_S` seconds (at most
    /// `STREAM_ROWS`, newest kept), for the live task stream.
    pub stream: Vec<StreamRow>,
}

/// Seconds of task stream the status page shows.
pub const STREAM_WINDOW_S: f64 = 10.0;
const STREAM_ROWS: usize = 3000;

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamRow {
    pub worker: String,
    pub thread: u32,
    pub prefix: String,
    /// Seconds before the snapshot (positive: in the past).
    pub start_ago: f64,
    pub stop_ago: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskCounts {
    pub total: u64,
    pub waiting: u64,
    pub ready: u64,
    pub processing: u64,
    pub memory: u64,
    pub released: u64,
    pub erred: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerRow {
    pub id: u32,
    pub name: String,
    pub address: String,
    pub host: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub cpus: Vec<u32>,
    pub numa_node: Option<u32>,
    pub gpu: Option<String>,
    /// Assigned and not finished.
    pub processing: u64,
    /// Running user code (last heartbeat).
    pub executing: u32,
    pub stored_values: u64,
    pub stored_bytes: u64,
    pub cpu_percent: f32,
    pub rss: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub in_per_s: f32,
    pub out_per_s: f32,
    pub last_seen_s: f64,
    /// A GPU worker's device memory (zeros elsewhere): values on the device,
    /// its limit, device values moved to host memory now and bytes moved.
    pub device_bytes: u64,
    pub device_limit: u64,
    pub device_spilled_bytes: u64,
    pub device_spilled_total_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PrefixRow {
    pub prefix: String,
    pub total: u64,
    pub done: u64,
    pub processing: u64,
    pub erred: u64,
}

/// Dask's `key_split`, roughly: `inc-abc123` → `inc`, `('array-9f', 0, 1)`
/// → `array`, `finalize-...` → `finalize`; hex and numeric parts are dropped.
pub fn key_prefix(key: &str) -> &str {
    let k = key.trim_start_matches(['(', '\'', '"', '~']);
    let end = k.find(['\'', '"', ',', ')']).unwrap_or(k.len());
    let k = &k[..end];
    let mut cut = k.len();
    for (i, part) in k.match_indices('-') {
        let rest = &k[i + part.len()..];
        let word = rest.split('-').next().unwrap_or("");
        if word.len() >= 8 && word.chars().all(|c| c.is_ascii_hexdigit()) || word.chars().all(|c| c.is_ascii_digit()) {
            cut = i;
            break;
        }
    }
    if k[..cut].is_empty() { k } else { &k[..cut] }
}

/// `now_ms`: the scheduler's clock (uptime); `wall_us`: the wall clock, to
/// place the workers' task runs.
pub fn snapshot(core: &Core, now_ms: u64, wall_us: u64, address: &str, dashboard: &str) -> Snapshot {
    let mut tasks = TaskCounts::default();
    let mut prefixes: BTreeMap<&str, PrefixRow> = BTreeMap::new();
    for (_, t) in core.tasks.iter() {
        tasks.total += 1;
        let row = prefixes.entry(key_prefix(&t.key)).or_default();
        row.total += 1;
        match t.state {
            TaskState::Waiting => tasks.waiting += 1,
            TaskState::Ready => tasks.ready += 1,
            TaskState::Assigned => {
                tasks.processing += 1;
                row.processing += 1;
            }
            TaskState::Memory => {
                tasks.memory += 1;
                row.done += 1;
            }
            TaskState::Released => {
                tasks.released += 1;
                row.done += 1;
            }
            TaskState::Erred => {
                tasks.erred += 1;
                row.erred += 1;
            }
        }
    }
    let mut workers: Vec<WorkerRow> = core
        .workers
        .iter()
        .map(|(id, w)| WorkerRow {
            id: id.0,
            name: w.name.clone(),
            address: w.address.clone(),
            host: w.placement.host.clone(),
            nthreads: w.nthreads,
            memory_limit: w.memory_limit,
            cpus: w.placement.cpus.clone(),
            numa_node: w.placement.numa_node,
            gpu: w.placement.gpu.clone(),
            processing: w.processing.len() as u64,
            executing: w.load.running,
            stored_values: w.stored_values,
            stored_bytes: w.stored_bytes,
            cpu_percent: w.load.cpu_percent,
            rss: w.load.rss,
            bytes_in: w.load.bytes_in,
            bytes_out: w.load.bytes_out,
            in_per_s: w.load.in_per_s,
            out_per_s: w.load.out_per_s,
            last_seen_s: now_ms.saturating_sub(w.last_seen_ms) as f64 / 1000.0,
            device_bytes: w.load.device.bytes,
            device_limit: w.load.device.limit,
            device_spilled_bytes: w.load.device.spilled_bytes,
            device_spilled_total_bytes: w.load.device.spilled_total_bytes,
        })
        .collect();
    workers.sort_by_key(|w| w.id);
    let horizon = wall_us.saturating_sub((STREAM_WINDOW_S * 1e6) as u64);
    let mut stream: Vec<StreamRow> = core
        .stream
        .iter()
        .rev()
        .take_while(|e| e.stop_us >= horizon)
        .take(STREAM_ROWS)
        .map(|e| StreamRow {
            worker: core.stream_workers.get(&e.worker).map_or_else(String::new, |a| a.to_string()),
            thread: e.thread,
            prefix: key_prefix(&e.key).to_string(),
            start_ago: wall_us.saturating_sub(e.start_us) as f64 / 1e6,
            stop_ago: wall_us.saturating_sub(e.stop_us) as f64 / 1e6,
            ok: e.ok,
        })
        .collect();
    stream.reverse();
    let s = core.stats;
    Snapshot {
        scheduler_id: core.scheduler_id.clone(),
        address: address.to_string(),
        dashboard: dashboard.to_string(),
        uptime_s: now_ms as f64 / 1000.0,
        clients: core.clients.len(),
        tasks,
        submitted: s.submitted,
        finished: s.finished,
        failed: s.failed,
        stolen: s.stolen,
        recomputed: s.recomputed,
        workers,
        prefixes: prefixes
            .into_iter()
            .map(|(p, mut row)| {
                row.prefix = p.to_string();
                row
            })
            .collect(),
        stream,
    }
}

#[cfg(test)]
mod tests {
    use super::key_prefix;

    #[test]
    fn prefixes_group_keys_as_dask_does() {
        assert_eq!(key_prefix("inc-9f86d081884c7d65"), "inc");
        assert_eq!(key_prefix("('array-3a1b2c4d5e6f7a8b', 0, 1)"), "array");
        assert_eq!(key_prefix("('sum-aggregate-3a1b2c4d5e6f7a8b', 0)"), "sum-aggregate");
        assert_eq!(key_prefix("finalize-3a1b2c4d5e6f7a8b9c0d"), "finalize");
        assert_eq!(key_prefix("x-17"), "x");
        assert_eq!(key_prefix("plain"), "plain");
        assert_eq!(key_prefix("~1"), "1");
    }
}
