//! The dashboard: an HTTP server in the scheduler process (`/status`,
//! `/workers`, `/info`, `/health`, `/metrics`, a JSON API and server-sent
//! events). It only reads [`Snapshot`]s that the reactor publishes; pages are
//! static files built into the binary.

pub mod metrics;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use snapshot::{snapshot, Snapshot};

const STATUS_HTML: &str = include_str!("status.html");
const WORKERS_HTML: &str = include_str!("workers.html");
/// Connections served at once; more wait for a place.
const MAX_CONNECTIONS: usize = 64;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the dashboard at `addr` (`host:port`, `:8787`, `:0`). A port in use
/// falls back to a free one, with a warning, as Dask does.
pub async fn bind(addr: &str, default_host: &str) -> std::io::Result<(TcpListener, String)> {
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (if h.is_empty() { default_host } else { h }, p),
        None => (default_host, addr),
    };
    let port: u16 = port.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad dashboard address {addr:?}")))?;
    let listener = match TcpListener::bind((host, port)).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && port != 0 => {
            let l = TcpListener::bind((host, 0)).await?;
            tracing::warn!("dashboard port {port} is in use; serving the dashboard on {} instead", l.local_addr()?.port());
            l
        }
        Err(e) => return Err(e),
    };
    let mut local = listener.local_addr()?;
    if local.ip().is_unspecified() {
        local.set_ip(rdask_transport::netif::contact_ip());
    }
    Ok((listener, format!("http://{local}")))
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, snapshots: watch::Receiver<Arc<Snapshot>>) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(place) = places.clone().acquire_owned().await else { return };
        let rx = snapshots.clone();
        tokio::spawn(async move {
            let _place = place;
            if let Err(e) = handle(stream, rx).await {
                tracing::debug!("dashboard connection: {e}");
            }
        });
    }
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "incomplete or oversized request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => Ok(path.split('?').next().unwrap_or("/").to_string()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "only GET is served")),
    }
}

async fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

async fn handle(mut stream: TcpStream, mut snapshots: watch::Receiver<Arc<Snapshot>>) -> std::io::Result<()> {
    let path = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return respond(&mut stream, "400 Bad Request", "text/plain", e.to_string().as_bytes()).await,
        Err(_) => return Ok(()),
    };
    let snap = snapshots.borrow().clone();
    match path.as_str() {
        "/" => {
            let head = "HTTP/1.1 302 Found\r\nLocation: /status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await
        }
        "/status" => respond(&mut stream, "200 OK", "text/html; charset=utf-8", STATUS_HTML.as_bytes()).await,
        "/workers" => respond(&mut stream, "200 OK", "text/html; charset=utf-8", WORKERS_HTML.as_bytes()).await,
        "/info" => respond(&mut stream, "200 OK", "text/html; charset=utf-8", info_page(&snap).as_bytes()).await,
        "/health" => respond(&mut stream, "200 OK", "text/plain", b"ok").await,
        "/metrics" => respond(&mut stream, "200 OK", "text/plain; version=0.0.4", metrics::render(&snap).as_bytes()).await,
        "/api/snapshot" => {
            let body = serde_json::to_vec(&*snap).unwrap_or_default();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        "/api/events" => {
            // Server-sent events: a snapshot now and each time a new one is
            // published, until the browser goes away.
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await?;
            loop {
                let snap = snapshots.borrow_and_update().clone();
                let mut event = b"data: ".to_vec();
                event.extend(serde_json::to_vec(&*snap).unwrap_or_default());
                event.extend_from_slice(b"\n\n");
                stream.write_all(&event).await?;
                if snapshots.changed().await.is_err() {
                    return Ok(());
                }
            }
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", b"not found").await,
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn info_page(s: &Snapshot) -> String {
    let rows: String = s
        .workers
        .iter()
        .map(|w| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&w.name),
                html_escape(&w.address),
                html_escape(&w.host),
                w.nthreads,
                w.memory_limit
            )
        })
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>rdask scheduler info</title></head><body>\
         <h1>rdask scheduler</h1><p>id {}<br>address {}<br>dashboard {}<br>up {:.0} s<br>clients {}<br>tasks {} \
         (submitted {}, finished {}, erred {})</p><p><a href=/status>status</a> · <a href=/workers>workers</a> · \
         <a href=/metrics>metrics</a></p><table border=1><tr><th>worker</th><th>address</th><th>host</th>\
         <th>threads</th><th>memory limit</th></tr>{rows}</table></body></html>",
        html_escape(&s.scheduler_id),
        html_escape(&s.address),
        html_escape(&s.dashboard),
        s.uptime_s,
        s.clients,
        s.tasks.total,
        s.submitted,
        s.finished,
        s.failed
    )
}
