//! `rdask-worker`: starts N worker runtimes in this process, connected to a scheduler.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use rdask_worker::config_parse::{parse_memory_limit, parse_resources};
use rdask_worker::runtime::hostname;
use rdask_worker::{run_worker_until, NullExecutor, WorkerConfig};

#[derive(Parser, Debug)]
#[command(name = "rdask-worker", version, about = "rdask worker (Rust null executor; Python workers come with the rdask package)")]
struct Args {
    /// Scheduler address, e.g. tcp://127.0.0.1:8786.
    scheduler: Option<String>,
    /// Read the scheduler address from this file (written by rdask-scheduler --scheduler-file).
    #[arg(long)]
    scheduler_file: Option<PathBuf>,
    /// Worker runtimes to start in this process.
    #[arg(long, default_value_t = 1)]
    nworkers: u32,
    /// Executor threads per worker.
    #[arg(long, default_value_t = 1)]
    nthreads: u32,
    /// auto | 0 | bytes ("4GiB") | fraction of system memory ("0.5").
    #[arg(long, default_value = "auto")]
    memory_limit: String,
    /// Worker name (suffixed with -i when --nworkers > 1).
    #[arg(long)]
    name: Option<String>,
    /// Abstract resources, e.g. "GPU=1 MEM=8e9".
    #[arg(long, default_value = "")]
    resources: String,
    /// Host peers use to reach this worker.
    #[arg(long, default_value = "127.0.0.1")]
    listen_host: String,
    #[arg(long, env = "RDASK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file (so it does not show in `ps`).
    #[arg(long, env = "RDASK_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Keep trying to reach the scheduler for this many seconds.
    #[arg(long, default_value_t = 60)]
    death_timeout: u64,
    /// Executor: "null" (trivial tasks run on the worker loop) or
    /// "null-threaded" (every task through the executor threads).
    #[arg(long, default_value = "null")]
    executor: String,
    #[command(flatten)]
    net: rdask_transport::cli::NetFlags,
}

fn read_scheduler_file(path: &PathBuf) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading scheduler file {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v["address"].as_str().map(str::to_string).context("scheduler file has no \"address\"")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    rdask_transport::raise_fd_limit();
    let scheduler = match (&args.scheduler, &args.scheduler_file) {
        (Some(a), _) => a.clone(),
        (None, Some(f)) => read_scheduler_file(f)?,
        (None, None) => bail!("give the scheduler address or --scheduler-file"),
    };
    // Peers speak the scheduler's protocol unless told otherwise.
    let (scheme, listen_host) =
        args.net.apply(Some(rdask_transport::backend::split_scheme(&scheduler).0), &args.listen_host).map_err(anyhow::Error::msg)?;
    let executor = match args.executor.as_str() {
        "null" => NullExecutor::default(),
        "null-threaded" => NullExecutor::threaded(),
        other => bail!("unknown executor {other:?}; the Rust worker binary offers \"null\" and \"null-threaded\""),
    };
    let memory_limit = parse_memory_limit(&args.memory_limit, args.nworkers).map_err(anyhow::Error::msg)?;
    let resources = parse_resources(&args.resources).map_err(anyhow::Error::msg)?;
    let token = match &args.token_file {
        Some(path) => Some(rdask_transport::handshake::token_from_file(path)?),
        None => args.token.clone(),
    };
    let base = args.name.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        // SIGTERM / SIGINT: every worker says it is leaving (its tasks are
        // not suspected of killing it) and the process exits 0.
        let (leave_tx, leave_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received; workers are leaving");
            let _ = leave_tx.send(true);
        });
        let mut handles = Vec::new();
        for i in 0..args.nworkers {
            let config = WorkerConfig {
                scheduler: scheduler.clone(),
                name: if args.nworkers > 1 { format!("{base}-{i}") } else { base.clone() },
                nthreads: args.nthreads.max(1),
                memory_limit,
                resources: resources.clone(),
                listen: format!("{scheme}://{listen_host}:0"),
                token: token.clone(),
                connect_timeout: std::time::Duration::from_secs(args.death_timeout.max(1)),
                ..Default::default()
            };
            let name = config.name.clone();
            let executor = Arc::new(executor);
            // Each worker reports its own end as it happens.
            let mut leave = leave_rx.clone();
            handles.push(tokio::spawn(async move {
                let leave = async move {
                    let _ = leave.wait_for(|v| *v).await;
                };
                let result = run_worker_until(config, executor, leave).await;
                if let Err(e) = &result {
                    tracing::error!(worker = %name, "worker stopped: {e}");
                }
                result.is_ok()
            }));
        }
        let mut failed = 0;
        for h in handles {
            if !matches!(h.await, Ok(true)) {
                failed += 1;
            }
        }
        if failed > 0 {
            bail!("{failed} worker(s) stopped with an error");
        }
        Ok(())
    })
}
