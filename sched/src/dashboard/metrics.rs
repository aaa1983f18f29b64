//! Prometheus text format (version 0.0.4) from a snapshot, with Dask's
//! metric names where Dask has one.

use std::fmt::Write;

use super::snapshot::Snapshot;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, rows: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    gauge("dask_scheduler_workers", "Number of workers known by the scheduler", "gauge", &one(s.workers.len() as f64));
    gauge("dask_scheduler_clients", "Number of clients connected", "gauge", &one(s.clients as f64));
    let t = &s.tasks;
    let states: Vec<(String, f64)> = [
        ("waiting", t.waiting),
        ("queued", t.ready),
        ("processing", t.processing),
        ("memory", t.memory),
        ("released", t.released),
        ("erred", t.erred),
    ]
    .iter()
    .map(|(state, n)| (format!("{{state=\"{state}\"}}"), *n as f64))
    .collect();
    gauge("dask_scheduler_tasks", "Number of tasks known by the scheduler, by state", "gauge", &states);
    gauge("dask_scheduler_tasks_submitted_total", "Tasks submitted since the scheduler started", "counter", &one(s.submitted as f64));
    gauge("dask_scheduler_tasks_finished_total", "Tasks finished since the scheduler started", "counter", &one(s.finished as f64));
    gauge("dask_scheduler_tasks_erred_total", "Tasks that erred since the scheduler started", "counter", &one(s.failed as f64));
    gauge("dask_scheduler_tasks_stolen_total", "Tasks moved by work stealing", "counter", &one(s.stolen as f64));
    let per_worker = |f: &dyn Fn(&super::snapshot::WorkerRow) -> f64| -> Vec<(String, f64)> {
        s.workers.iter().map(|w| (format!("{{worker=\"{}\",name=\"{}\"}}", escape(&w.address), escape(&w.name)), f(w))).collect()
    };
    gauge("dask_worker_threads", "Threads of each worker", "gauge", &per_worker(&|w| w.nthreads as f64));
    gauge("dask_worker_tasks", "Tasks assigned to each worker and not finished", "gauge", &per_worker(&|w| w.processing as f64));
    gauge("dask_worker_tasks_executing", "Tasks running on each worker (last heartbeat)", "gauge", &per_worker(&|w| w.executing as f64));
    gauge("dask_worker_memory_bytes", "Bytes of task results each worker holds", "gauge", &per_worker(&|w| w.stored_bytes as f64));
    gauge("dask_worker_memory_limit_bytes", "Memory limit of each worker (0: none)", "gauge", &per_worker(&|w| w.memory_limit as f64));
    gauge("dask_worker_process_rss_bytes", "Resident memory of each worker's process", "gauge", &per_worker(&|w| w.rss as f64));
    gauge("dask_worker_transfer_incoming_bytes_total", "Value bytes each worker fetched from peers", "counter", &per_worker(&|w| w.bytes_in as f64));
    gauge("dask_worker_transfer_outgoing_bytes_total", "Value bytes each worker served to peers and clients", "counter", &per_worker(&|w| w.bytes_out as f64));
    gauge("dask_worker_device_memory_bytes", "Bytes of device (GPU) memory each worker's values hold", "gauge", &per_worker(&|w| w.device_bytes as f64));
    gauge("dask_worker_device_memory_limit_bytes", "Device memory limit of each worker (0: none, or not a GPU worker)", "gauge", &per_worker(&|w| w.device_limit as f64));
    gauge("dask_worker_device_spilled_bytes", "Bytes of device values each worker holds in host memory now", "gauge", &per_worker(&|w| w.device_spilled_bytes as f64));
    gauge("dask_worker_device_moved_to_host_bytes_total", "Device bytes each worker moved to host memory since it started", "counter", &per_worker(&|w| w.device_spilled_total_bytes as f64));
    gauge("dask_worker_cpu_percent", "CPU use of each worker's process, percent of one core", "gauge", &per_worker(&|w| w.cpu_percent as f64));
    out
}
