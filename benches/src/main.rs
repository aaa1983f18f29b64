//! `rdask-bench`: runs null-task graphs on a real scheduler process and K
//! workers over TCP on loopback, checks every result, and reports tasks/s,
//! µs per task, scheduler CPU per task and scheduler memory per task.

mod cluster;
use rdask_worker::procinfo;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cluster::{Cluster, WorkerMode};
use rdask_client::{graphs, Client};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "rdask-bench", about = "rdask scaling benchmark (null workers, TCP loopback)")]
struct Args {
    /// Graphs: merge-N, tree-D, chain-N, shuffle-P (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "merge-100000,tree-15,chain-10000,shuffle-100")]
    graphs: Vec<String>,
    /// Worker counts (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256,1024")]
    workers: Vec<usize>,
    /// Where workers run: "inproc" (all in this process), "procs" (in --procs
    /// rdask-worker processes) or "both".
    #[arg(long, default_value = "inproc")]
    mode: String,
    /// Worker processes in "procs" mode.
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// Runs of each scenario (the best is reported; all are checked).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Also measure scheduler memory with this many pending tasks (0 = skip).
    #[arg(long, default_value_t = 0)]
    pending: usize,
    /// Scheduler tasks-per-thread setting.
    #[arg(long, default_value_t = 256)]
    tasks_per_thread: u32,
    /// Run every null task through the workers' executor threads (as user
    /// code runs) instead of inline on the worker loop.
    #[arg(long)]
    threaded: bool,
    /// Serve the scheduler's dashboard during the runs (to measure its cost;
    /// a browser may watch it).
    #[arg(long)]
    dashboard: bool,
    /// Tokio threads of this process (client and in-process workers).
    #[arg(long, default_value_t = 2)]
    runtime_threads: usize,
    /// Every connection over TLS (a throw-away CA and certificate; mutual
    /// authentication as in a real TLS cluster).
    #[arg(long)]
    tls: bool,
    /// Transport of every connection: tcp or ucx (UCX_TLS etc. pass through
    /// to every process).
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// The small CI form: correctness only, never judged on timing.
    #[arg(long)]
    ci: bool,
    /// JSON output file.
    #[arg(long, default_value = "bench-results/latest.json")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Row {
    graph: String,
    tasks: usize,
    workers: usize,
    mode: String,
    /// Null tasks ran through executor threads (true) or inline (false).
    threaded: bool,
    wall_s: f64,
    tasks_per_s: f64,
    us_per_task: f64,
    sched_cpu_us_per_task: f64,
    /// CPU of this process (client, plus the workers in "1 proc" mode).
    bench_proc_cpu_us_per_task: f64,
    sched_peak_rss_bytes: u64,
    sched_rss_bytes_per_task: f64,
    result_ok: bool,
}

#[derive(Debug, Serialize)]
struct PendingRow {
    tasks: usize,
    sched_rss_before: u64,
    sched_rss_after: u64,
    bytes_per_pending_task: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: String,
    rows: Vec<Row>,
    pending: Option<PendingRow>,
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut args = Args::parse();
    rdask_transport::raise_fd_limit();
    let protocol = rdask_transport::choose_scheme(Some(&args.protocol), false).map_err(anyhow::Error::msg)?;
    let _ = cluster::PROTOCOL.set(protocol);
    if protocol != "tcp" {
        eprintln!("rdask-bench: every connection over {protocol}://");
    }
    let _tls_dir = if args.tls {
        let dir = std::env::temp_dir().join(format!("rdask-bench-tls-{}", std::process::id()));
        let files = rdask_transport::tls::temporary_identity(&dir)?;
        rdask_transport::tls::configure(Some(&files), false)?;
        let _ = cluster::TLS.set(files);
        eprintln!("rdask-bench: every connection over TLS (certificates in {})", dir.display());
        Some(RemoveOnDrop(dir))
    } else {
        None
    };
    if args.ci {
        args.graphs = vec!["tree-15".into(), "merge-20000".into(), "shuffle-48".into(), "chain-2000".into()];
        args.workers = vec![256];
        args.mode = "both".into();
        args.procs = 4;
        args.pending = 200_000;
    }
    let modes: Vec<WorkerMode> = match args.mode.as_str() {
        "inproc" => vec![WorkerMode::InProcess],
        "procs" => vec![WorkerMode::Processes(args.procs)],
        "both" => vec![WorkerMode::InProcess, WorkerMode::Processes(args.procs)],
        m => bail!("unknown mode {m:?} (inproc, procs, both)"),
    };
    // Workers and client share this runtime; the scheduler has its own process.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(args.runtime_threads.max(1)).enable_all().build()?;
    let report = rt.block_on(run_all(&args, &modes))?;
    print_table(&report);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", args.out.display());
    let bad: Vec<&Row> = report.rows.iter().filter(|r| !r.result_ok).collect();
    // A closing line test harnesses understand: one scenario, one check.
    println!("bench scenarios: {} passed, {} failed", report.rows.len() - bad.len(), bad.len());
    if !bad.is_empty() {
        bail!("{} scenario(s) produced wrong results", bad.len());
    }
    Ok(())
}

async fn run_all(args: &Args, modes: &[WorkerMode]) -> anyhow::Result<Report> {
    let mut rows = Vec::new();
    for &workers in &args.workers {
        for &mode in modes {
            for spec in &args.graphs {
                let mut best: Option<Row> = None;
                for run in 0..args.repeat.max(1) {
                    let row = run_scenario(spec, workers, mode, args.tasks_per_thread, args.threaded, args.dashboard)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))
                        .with_context(|| format!("{spec} on {workers} workers ({mode}), run {}", run + 1))?;
                    eprintln!(
                        "  {spec:>14} {workers:>5} workers {mode:>8}: {:>10.0} tasks/s  {:>7.2} µs/task  result {}",
                        row.tasks_per_s,
                        row.us_per_task,
                        if row.result_ok { "ok" } else { "WRONG" }
                    );
                    let ok = row.result_ok;
                    if best.as_ref().is_none_or(|b| row.tasks_per_s > b.tasks_per_s) || !ok {
                        best = Some(row);
                    }
                    if !ok {
                        break;
                    }
                }
                rows.extend(best);
            }
        }
    }
    let pending = if args.pending > 0 { Some(measure_pending(args.pending).await?) } else { None };
    Ok(Report { command: std::env::args().collect::<Vec<_>>().join(" "), machine: machine(), rows, pending })
}

async fn run_scenario(
    spec: &str,
    workers: usize,
    mode: WorkerMode,
    tasks_per_thread: u32,
    threaded: bool,
    dashboard: bool,
) -> anyhow::Result<Row> {
    let graph = graphs::by_name(spec, "").map_err(anyhow::Error::msg)?;
    let cluster = Cluster::start(workers, mode, tasks_per_thread, threaded, dashboard).await?;
    let client = Client::connect(&cluster.address, None, Duration::from_secs(20)).await?;
    client.wait_for_workers(workers, Duration::from_secs(120)).await?;
    let pid = cluster.scheduler_pid();
    let cpu0 = procinfo::cpu_time(pid)?;
    let own0 = procinfo::cpu_time(std::process::id())?;
    let (rss0, _) = procinfo::memory(pid)?;
    let ntasks = graph.len();
    let root = vec![graph.root.clone()];

    let t0 = Instant::now();
    client.submit(graph.tasks)?;
    tracing::info!("submit() returned after {:?}", t0.elapsed());
    let values = client.gather(&root).await?;
    let wall = t0.elapsed();

    let cpu = procinfo::cpu_time(pid)? - cpu0;
    let own = procinfo::cpu_time(std::process::id())? - own0;
    let (_, hwm) = procinfo::memory(pid)?;
    let got = values[0].first().filter(|b| b.len() >= 8).map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()));
    let mut result_ok = got == Some(graph.expected);
    if !result_ok {
        eprintln!("  WRONG RESULT for {spec}: expected {}, got {got:?}", graph.expected);
    }
    // Releasing the root must let the scheduler forget every task.
    client.release(&root)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = client.cluster_info().await?;
        if info.tasks == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("  LEAK: scheduler still holds {} tasks after release", info.tasks);
            result_ok = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.close().await;
    cluster.stop().await?;
    let secs = wall.as_secs_f64();
    Ok(Row {
        graph: spec.to_string(),
        tasks: ntasks,
        workers,
        mode: mode.to_string(),
        threaded,
        wall_s: secs,
        tasks_per_s: ntasks as f64 / secs,
        us_per_task: secs * 1e6 / ntasks as f64,
        sched_cpu_us_per_task: cpu.as_secs_f64() * 1e6 / ntasks as f64,
        bench_proc_cpu_us_per_task: own.as_secs_f64() * 1e6 / ntasks as f64,
        sched_peak_rss_bytes: hwm,
        sched_rss_bytes_per_task: hwm.saturating_sub(rss0) as f64 / ntasks as f64,
        result_ok,
    })
}

/// Scheduler memory per pending task: submit a large graph with no workers
/// connected, so every task stays pending, and compare resident memory.
async fn measure_pending(n: usize) -> anyhow::Result<PendingRow> {
    let cluster = Cluster::start(0, WorkerMode::InProcess, 256, false, false).await?;
    let client = Client::connect(&cluster.address, None, Duration::from_secs(20)).await?;
    let pid = cluster.scheduler_pid();
    let (before, _) = procinfo::memory(pid)?;
    let graph = graphs::merge(n - 1, "pending-");
    let total = graph.len();
    client.submit(graph.tasks)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = client.cluster_info().await?;
        if info.tasks as usize == total {
            break;
        }
        if Instant::now() > deadline {
            bail!("scheduler holds {} of {total} submitted tasks after 120 s", info.tasks);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (after, _) = procinfo::memory(pid)?;
    client.close().await;
    cluster.stop().await?;
    let row = PendingRow {
        tasks: total,
        sched_rss_before: before,
        sched_rss_after: after,
        bytes_per_pending_task: after.saturating_sub(before) as f64 / total as f64,
    };
    eprintln!("  pending {total} tasks: {:.0} bytes/task of scheduler RSS", row.bytes_per_pending_task);
    Ok(row)
}

fn print_table(r: &Report) {
    println!(
        "{:<15} {:>8} {:>7} {:>8} {:>9} {:>11} {:>9} {:>12} {:>12} {:>12} {:>7}",
        "graph", "tasks", "workers", "mode", "wall s", "tasks/s", "µs/task", "sched µs/t", "bench µs/t", "sched B/t", "result"
    );
    for row in &r.rows {
        println!(
            "{:<15} {:>8} {:>7} {:>8} {:>9.3} {:>11.0} {:>9.2} {:>12.2} {:>12.2} {:>12.0} {:>7}",
            row.graph,
            row.tasks,
            row.workers,
            row.mode,
            row.wall_s,
            row.tasks_per_s,
            row.us_per_task,
            row.sched_cpu_us_per_task,
            row.bench_proc_cpu_us_per_task,
            row.sched_rss_bytes_per_task,
            if row.result_ok { "ok" } else { "WRONG" }
        );
    }
    if let Some(p) = &r.pending {
        println!(
            "pending: {} tasks, scheduler RSS {} → {} bytes: {:.0} bytes per pending task",
            p.tasks, p.sched_rss_before, p.sched_rss_after, p.bytes_per_pending_task
        );
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}
