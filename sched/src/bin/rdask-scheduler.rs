//! `rdask-scheduler`: runs the scheduler until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rdask_sched::reactor::{serve_with_dashboard, SchedulerConfig};

#[derive(Parser, Debug)]
#[command(name = "rdask-scheduler", version, about = "rdask scheduler")]
struct Args {
    /// Interface to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8786)]
    port: u16,
    /// Write the scheduler's address here as JSON (atomically); removed on clean exit.
    #[arg(long)]
    scheduler_file: Option<PathBuf>,
    /// Shared token workers and clients must present.
    #[arg(long, env = "RDASK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file (so it does not show in `ps`).
    #[arg(long, env = "RDASK_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Tasks queued per worker thread before the scheduler holds tasks back.
    #[arg(long, default_value_t = 256)]
    tasks_per_thread: u32,
    /// Drop a worker silent for this many seconds.
    #[arg(long, default_value_t = 60)]
    worker_timeout: u64,
    /// Dashboard address (`:8787`, `host:port`, `:0` any free port, `none` off).
    #[arg(long, default_value = ":8787")]
    dashboard_address: String,
    /// Turn the dashboard off (as `--dashboard-address none`).
    #[arg(long)]
    no_dashboard: bool,
    #[command(flatten)]
    net: rdask_transport::cli::NetFlags,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    rdask_transport::raise_fd_limit();
    rdask_sched::alloc::tune();
    let mut config = SchedulerConfig::default();
    config.core.tasks_per_thread = args.tasks_per_thread.max(1);
    config.token = match &args.token_file {
        Some(path) => Some(rdask_transport::handshake::token_from_file(path)?),
        None => args.token.clone(),
    };
    config.worker_timeout = Duration::from_secs(args.worker_timeout.max(1));
    config.dashboard = (!args.no_dashboard && !args.dashboard_address.eq_ignore_ascii_case("none")).then(|| args.dashboard_address.clone());

    let (scheme, host) = args.net.apply(None, &args.host).map_err(anyhow::Error::msg)?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{scheme}://{host}:{}", args.port);
        let listener = rdask_transport::listen(&addr, Default::default())
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let dashboard = rdask_sched::reactor::bind_dashboard(&config, &listener).await.context("cannot serve the dashboard")?;
        if let Some(path) = &args.scheduler_file {
            let port = dashboard.as_ref().and_then(|(l, _)| l.local_addr().ok()).map(|a| a.port());
            write_scheduler_file(path, &listener.address, port)?;
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; shutting down");
            let _ = stop_tx.send(true);
        });
        serve_with_dashboard(listener, dashboard, config, stop_rx).await;
        if let Some(path) = &args.scheduler_file {
            let _ = std::fs::remove_file(path);
        }
        anyhow::Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Dask-compatible scheduler file, written to a temporary name and renamed
/// so readers never see half a file.
/// `dashboard`: its port, listed under "services" as Dask does.
fn write_scheduler_file(path: &std::path::Path, address: &str, dashboard: Option<u16>) -> anyhow::Result<()> {
    let services = match dashboard {
        Some(port) => serde_json::json!({ "dashboard": port }),
        None => serde_json::json!({}),
    };
    let body = serde_json::json!({
        "type": "Scheduler",
        "id": format!("rdask-scheduler-{}", std::process::id()),
        "address": address,
        "services": services,
        "started": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64(),
        "workers": {},
    });
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&body)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

