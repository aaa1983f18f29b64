//! `rdask-net-bench`: frame bandwidth and small-message latency between two
//! processes over rdask's transports, next to `ucx_perftest` (tag_bw,
//! tag_lat) on the same UCX transports in the same run.
//!
//! The parent runs, for every UCX_TLS variant, a server and a client process
//! of this binary per protocol (UCX reads its settings once per process), and
//! ucx_perftest's server and client with the same environment. Figures go to
//! stdout and to `--out` as JSON. Sizes are MiB-based and bandwidth is in
//! MB/s of 2^20 bytes, as ucx_perftest prints it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdask_transport::bytes::Bytes;
use rdask_transport::rkyv::util::AlignedVec;
use rdask_transport::{Connection, Frame, Limits};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// server | client (internal) or bench (the default: runs everything).
    #[arg(long, default_value = "bench")]
    role: String,
    /// Transports to measure: tcp, ucx.
    #[arg(long, value_delimiter = ',', default_value = "tcp,ucx")]
    protocols: Vec<String>,
    /// UCX_TLS settings to run UCX and ucx_perftest under ("default": unset).
    #[arg(long, value_delimiter = ';', default_value = "tcp;shm,tcp;default")]
    ucx_tls: Vec<String>,
    /// Frame sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    sizes_mib: Vec<usize>,
    /// Frames per size (after one warm-up frame).
    #[arg(long, default_value_t = 8)]
    iters: usize,
    /// Ping-pongs of an 8-byte frame.
    #[arg(long, default_value_t = 10000)]
    lat_iters: usize,
    #[arg(long, default_value = "tcp")]
    protocol: String,
    #[arg(long, default_value = "")]
    addr: String,
    #[arg(long, default_value = "bench-results/net.json")]
    out: std::path::PathBuf,
}

fn frame(tag: &[u8], data: Vec<Bytes>) -> Frame {
    let mut control = AlignedVec::new();
    control.extend_from_slice(tag);
    Frame { control, data }
}

async fn recv(c: &mut Connection) -> anyhow::Result<Frame> {
    c.receiver.recv().await?.context("peer closed")
}

/// Echoes: "ack" after "done", "pong" for "ping"; data frames are dropped.
async fn server(protocol: &str) -> anyhow::Result<()> {
    let mut l = rdask_transport::listen(&format!("{protocol}://127.0.0.1:0"), Limits::default()).await?;
    println!("ADDR {}", l.address);
    let mut c = l.accept().await.context("no connection")?;
    loop {
        let f = match c.receiver.recv().await? {
            Some(f) => f,
            None => return Ok(()),
        };
        match &f.control[..] {
            b"done" => c.sender.send(frame(b"ack", vec![]))?,
            b"ping" => c.sender.send(frame(b"pong", f.data))?,
            _ => {}
        }
    }
}

async fn client(a: &Args) -> anyhow::Result<()> {
    let mut c = rdask_transport::connect(&a.addr, Limits::default()).await?;
    let mut out = serde_json::Map::new();
    for &mib in &a.sizes_mib {
        let value = Bytes::from(vec![0x5au8; mib << 20]);
        // Warm-up (connection, buffers, rendezvous set-up).
        c.sender.send(frame(b"data", vec![value.clone()]))?;
        c.sender.send(frame(b"done", vec![]))?;
        recv(&mut c).await?;
        let t0 = Instant::now();
        for _ in 0..a.iters {
            c.sender.send(frame(b"data", vec![value.clone()]))?;
        }
        c.sender.send(frame(b"done", vec![]))?;
        recv(&mut c).await?;
        let secs = t0.elapsed().as_secs_f64();
        out.insert(format!("bw_{mib}MiB_MBps"), ((a.iters * (mib << 20)) as f64 / secs / (1 << 20) as f64).into());
    }
    let small = Bytes::from(vec![1u8; 8]);
    for _ in 0..100 {
        c.sender.send(frame(b"ping", vec![small.clone()]))?;
        recv(&mut c).await?;
    }
    let t0 = Instant::now();
    for _ in 0..a.lat_iters {
        c.sender.send(frame(b"ping", vec![small.clone()]))?;
        recv(&mut c).await?;
    }
    out.insert("lat_8B_us".into(), (t0.elapsed().as_secs_f64() * 1e6 / a.lat_iters as f64 / 2.0).into());
    println!("RESULT {}", serde_json::Value::Object(out));
    Ok(())
}

fn with_tls(cmd: &mut Command, tls: &str) {
    if tls != "default" {
        cmd.env("UCX_TLS", tls);
    }
}

/// One protocol under one UCX_TLS: a server and a client of this binary.
fn run_pair(a: &Args, protocol: &str, tls: &str) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut s = Command::new(&exe);
    s.args(["--role", "server", "--protocol", protocol]).stdout(Stdio::piped());
    with_tls(&mut s, tls);
    let mut server = s.spawn()?;
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().context("server ended before listening")??;
        if let Some(addr) = line.strip_prefix("ADDR ") {
            break addr.to_string();
        }
    };
    let mut c = Command::new(&exe);
    c.args(["--role", "client", "--addr", &addr, "--iters", &a.iters.to_string(), "--lat-iters", &a.lat_iters.to_string()]);
    c.arg("--sizes-mib").arg(a.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","));
    with_tls(&mut c, tls);
    let out = c.output()?;
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT ")).with_context(|| format!("client failed: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(serde_json::from_str(line)?)
}

/// ucx_perftest's "Final:" figure: overall bandwidth (MB/s) for *_bw tests,
/// overall latency (µs) for *_lat tests.
fn perftest(test: &str, size: usize, iters: usize, tls: &str, port: u16, extra: &[&str]) -> anyhow::Result<f64> {
    let common = |cmd: &mut Command| {
        cmd.args(["-t", test, "-s", &size.to_string(), "-n", &iters.to_string(), "-p", &port.to_string()]).args(extra);
        with_tls(cmd, tls);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    };
    let mut s = Command::new("ucx_perftest");
    common(&mut s);
    let mut server = s.spawn().context("ucx_perftest not found (apt-get install ucx-utils)")?;
    let started = Instant::now();
    let out = loop {
        std::thread::sleep(Duration::from_millis(300));
        let mut c = Command::new("ucx_perftest");
        c.arg("127.0.0.1");
        common(&mut c);
        let out = c.output()?;
        if out.status.success() || started.elapsed() > Duration::from_secs(20) {
            break out;
        }
    };
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<f64> = text
        .lines()
        .find(|l| l.starts_with("Final:"))
        .with_context(|| format!("ucx_perftest gave no result: {text}{}", String::from_utf8_lossy(&out.stderr)))?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // iterations, p50 latency, average latency, overall latency, average bw, overall bw, ...
    if fields.len() < 6 {
        bail!("unexpected ucx_perftest line: {fields:?}");
    }
    Ok(if test.ends_with("_lat") { fields[3] } else { fields[5] })
}

fn bench(a: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut port = 13340;
    if a.protocols.iter().any(|p| p == "tcp") {
        eprintln!("tcp ...");
        let r = run_pair(a, "tcp", "default")?;
        rows.push(serde_json::json!({"transport": "rdask tcp://", "ucx_tls": null, "figures": r}));
    }
    for tls in a.ucx_tls.iter().filter(|_| a.protocols.iter().any(|p| p == "ucx")) {
        eprintln!("ucx UCX_TLS={tls} ...");
        let r = run_pair(a, "ucx", tls)?;
        rows.push(serde_json::json!({"transport": "rdask ucx://", "ucx_tls": tls, "figures": r}));
        // Its defaults (tag matching, busy polling, no failure handling),
        // and rdask's way (active messages, peer-failure handling, sleeping
        // on the event fd between events).
        for (name, bw, lat, extra) in [
            ("ucx_perftest tag_bw/tag_lat", "tag_bw", "tag_lat", &[][..]),
            ("ucx_perftest ucp_am_* -e -E sleep", "ucp_am_bw", "ucp_am_lat", &["-e", "-E", "sleep"][..]),
        ] {
            let mut p = serde_json::Map::new();
            for &mib in &a.sizes_mib {
                port += 1;
                p.insert(format!("bw_{mib}MiB_MBps"), perftest(bw, mib << 20, a.iters, tls, port, extra)?.into());
            }
            port += 1;
            p.insert("lat_8B_us".into(), perftest(lat, 8, a.lat_iters, tls, port, extra)?.into());
            rows.push(serde_json::json!({"transport": name, "ucx_tls": tls, "figures": p}));
        }
    }
    println!("{:<34} {:<10} {}", "transport", "UCX_TLS", "figures (bandwidth MB/s of 2^20 B; one-way latency µs)");
    for r in &rows {
        println!("{:<34} {:<10} {}", r["transport"].as_str().unwrap(), r["ucx_tls"].as_str().unwrap_or("-"), r["figures"]);
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    match a.role.as_str() {
        "bench" => bench(&a),
        "server" => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(server(&a.protocol)),
        "client" => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(client(&a)),
        other => bail!("unknown role {other}"),
    }
}
