//! Starting and stopping a benchmark cluster: the scheduler is always its own
//! process (so its CPU time and memory can be measured alone); workers run
//! either inside the benchmark process or in separate `rdask-worker` processes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdask_worker::{run_worker, NullExecutor, WorkerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WorkerMode {
    /// All workers in the benchmark process.
    InProcess,
    /// Workers spread over this many `rdask-worker` processes.
    Processes(usize),
}

impl std::fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerMode::InProcess => write!(f, "1 proc"),
            WorkerMode::Processes(p) => write!(f, "{p} procs"),
        }
    }
}

pub struct Cluster {
    pub address: String,
    scheduler: Option<Child>,
    worker_procs: Vec<Child>,
    worker_tasks: Vec<tokio::task::JoinHandle<Result<(), rdask_worker::WorkerError>>>,
    dir: PathBuf,
}

/// The TLS identity every process of the benchmark uses (`--tls`); unset: TCP.
pub static TLS: std::sync::OnceLock<rdask_transport::tls::TlsFiles> = std::sync::OnceLock::new();

/// The transport of every connection (`--protocol`): tcp (default) or ucx.
pub static PROTOCOL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn scheme() -> &'static str {
    if TLS.get().is_some() {
        "tls"
    } else {
        PROTOCOL.get().copied().unwrap_or("tcp")
    }
}

fn tls_flags(cmd: &mut Command) {
    if let Some(f) = TLS.get() {
        cmd.arg("--tls-ca-file").arg(&f.ca_file).arg("--tls-cert").arg(&f.cert).arg("--tls-key").arg(&f.key);
    }
    cmd.args(["--protocol", scheme()]);
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("no exe dir")?.join(name);
    if !path.exists() {
        bail!("{} not found next to rdask-bench; build the workspace (cargo build --release --workspace)", path.display());
    }
    Ok(path)
}

impl Cluster {
    /// `dashboard`: serve the scheduler's dashboard (on a free port); off,
    /// the scheduler makes no dashboard snapshots.
    pub async fn start(workers: usize, mode: WorkerMode, tasks_per_thread: u32, threaded: bool, dashboard: bool) -> anyhow::Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("rdask-bench-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("scheduler.json");
        let mut scheduler = Command::new(binary("rdask-scheduler")?);
        tls_flags(&mut scheduler);
        let scheduler = scheduler
            .args(["--host", "127.0.0.1", "--port", "0", "--tasks-per-thread", &tasks_per_thread.to_string()])
            .args(["--dashboard-address", if dashboard { ":0" } else { "none" }])
            .arg("--scheduler-file")
            .arg(&file)
            .env("RUST_LOG", std::env::var("RDASK_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .context("starting rdask-scheduler")?;
        let mut cluster = Cluster { address: String::new(), scheduler: Some(scheduler), worker_procs: vec![], worker_tasks: vec![], dir };
        let started = Instant::now();
        cluster.address = loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let v: serde_json::Value = serde_json::from_str(&text)?;
                if let Some(port) = v["services"]["dashboard"].as_u64() {
                    // A watcher, as a browser on /status would be: it reads
                    // every snapshot the scheduler publishes.
                    cluster.worker_tasks.push(tokio::spawn(watch_dashboard(port as u16)));
                }
                break v["address"].as_str().context("scheduler file without address")?.to_string();
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("scheduler did not write {} within 20 s", file.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        match mode {
            WorkerMode::InProcess => {
                for i in 0..workers {
                    let config = WorkerConfig {
                        scheduler: cluster.address.clone(),
                        name: format!("bench-{i}"),
                        nthreads: 1,
                        connect_timeout: Duration::from_secs(60),
                        listen: format!("{}://127.0.0.1:0", scheme()),
                        ..Default::default()
                    };
                    let executor = if threaded { NullExecutor::threaded() } else { NullExecutor::default() };
                    cluster.worker_tasks.push(tokio::spawn(run_worker(config, Arc::new(executor))));
                }
            }
            WorkerMode::Processes(p) => {
                let p = p.clamp(1, workers.max(1));
                for i in 0..p {
                    let n = workers / p + usize::from(i < workers % p);
                    let mut child = Command::new(binary("rdask-worker")?);
                    tls_flags(&mut child);
                    let child = child
                        .arg(&cluster.address)
                        .args(["--nworkers", &n.to_string(), "--nthreads", "1", "--memory-limit", "0"])
                        .args(["--name", &format!("bench-p{i}")])
                        .args(["--executor", if threaded { "null-threaded" } else { "null" }])
                        .env("RUST_LOG", std::env::var("RDASK_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
                        .stdin(Stdio::null())
                        .spawn()
                        .context("starting rdask-worker")?;
                    cluster.worker_procs.push(child);
                }
            }
        }
        Ok(cluster)
    }

    pub fn scheduler_pid(&self) -> u32 {
        self.scheduler.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM to the scheduler, which tells every worker to stop; then waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let scheduler = self.scheduler.take().context("cluster already stopped")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(scheduler.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut problems = Vec::new();
        for t in self.worker_tasks.drain(..) {
            match tokio::time::timeout_at(deadline.into(), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => problems.push(format!("worker: {e}")),
                Ok(Err(e)) => problems.push(format!("worker task: {e}")),
                Err(_) => problems.push("worker did not stop".into()),
            }
        }
        let procs: Vec<Child> = self.worker_procs.drain(..).chain(std::iter::once(scheduler)).collect();
        for mut c in procs {
            loop {
                if let Some(status) = c.try_wait()? {
                    if !status.success() {
                        problems.push(format!("process {} exited with {status}", c.id()));
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    problems.push(format!("process {} did not stop; killed", c.id()));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !problems.is_empty() {
            bail!("cluster shutdown: {}", problems.join("; "));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    /// On an error path, leave no processes behind.
    fn drop(&mut self) {
        for c in self.worker_procs.iter_mut().chain(self.scheduler.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in &self.worker_tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0)
}

/// Reads the dashboard's event stream until the scheduler goes away.
async fn watch_dashboard(port: u16) -> Result<(), rdask_worker::WorkerError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return Ok(()) };
    let _ = s.write_all(b"GET /api/events HTTP/1.1\r\nHost: bench\r\n\r\n").await;
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}
