//! `rdask-net-bench`: frame bandwidth and small-message latency between two
//! processes over rdask's transports, next to `ucx_perftest` (tag_bw,
//! tag_lat) on the same UCX transports in the same run.
//!
//! The parent runs, for every UCX_TLS variant, a server and a client process
//! of this binary per protocol (UCX reads its settings once per process), and
//! ucx_perftest's server and client with the same environment. Figures go to
//! stdout and to `--out` as JSON. Sizes are MiB-based and bandwidth is in
//! MB/s of 2^20 bytes, as ucx_perftest prints it.
//!
//! This machine's figures swing by tens of percent from one run to the next
//! (ucx_perftest alone gave 3.9 to 9.3 GB/s for the same 64 MiB test within
//! minutes), so each comparison runs `--rounds` times, rdask and perftest
//! alternated, and reports every round and the medians.

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
    /// Frames per size; by default enough for `--gib-per-size` GiB (at
    /// least 4), after unmeasured frames that warm the receiver's buffers.
    #[arg(long)]
    iters: Option<usize>,
    #[arg(long, default_value_t = 2)]
    gib_per_size: usize,
    /// Times each comparison runs, rdask and perftest alternated.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
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
    Frame { control, data, device: None }
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
        // Warm-up: connection, rendezvous set-up, and the receive buffers
        // (a receiver keeps up to 256 MiB in flight, and one more buffer
        // while the last frame is handed up; memory the kernel hands out
        // fresh costs more to fault in on this VM than to copy into, and
        // perftest, too, times a buffer it has touched).
        for _ in 0..(512 / mib).max(2) {
            c.sender.send(frame(b"data", vec![value.clone()]))?;
        }
        c.sender.send(frame(b"done", vec![]))?;
        recv(&mut c).await?;
        let iters = a.iters_for(mib);
        let t0 = Instant::now();
        for _ in 0..iters {
            c.sender.send(frame(b"data", vec![value.clone()]))?;
        }
        c.sender.send(frame(b"done", vec![]))?;
        recv(&mut c).await?;
        let secs = t0.elapsed().as_secs_f64();
        out.insert(format!("bw_{mib}MiB_MBps"), ((iters * (mib << 20)) as f64 / secs / (1 << 20) as f64).into());
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
    c.args(["--role", "client", "--addr", &addr, "--gib-per-size", &a.gib_per_size.to_string(), "--lat-iters", &a.lat_iters.to_string()]);
    if let Some(n) = a.iters {
        c.args(["--iters", &n.to_string()]);
    }
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

impl Args {
    fn iters_for(&self, mib: usize) -> usize {
        self.iters.unwrap_or(((self.gib_per_size << 10) / mib).max(4))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Figures of several rounds as one row: the medians, and each round's.
fn merge_rounds(rounds: &[serde_json::Map<String, serde_json::Value>]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for key in rounds[0].keys() {
        let all: Vec<f64> = rounds.iter().filter_map(|r| r.get(key).and_then(|v| v.as_f64())).collect();
        let tenth = |x: f64| (x * 10.0).round() / 10.0;
        out.insert(key.clone(), tenth(median(all.clone())).into());
        out.insert(format!("{key}_rounds"), all.iter().map(|&x| tenth(x)).collect::<Vec<_>>().into());
    }
    serde_json::Value::Object(out)
}

fn bench(a: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut port = 13340;
    let as_map = |v: serde_json::Value| v.as_object().cloned().unwrap_or_default();
    if a.protocols.iter().any(|p| p == "tcp") {
        eprintln!("tcp ...");
        let rounds: Vec<_> = (0..a.rounds).map(|_| run_pair(a, "tcp", "default").map(as_map)).collect::<anyhow::Result<_>>()?;
        rows.push(serde_json::json!({"transport": "rdask tcp://", "ucx_tls": null, "figures": merge_rounds(&rounds)}));
    }
    // Its defaults (tag matching, busy polling, no failure handling), and
    // active messages with peer-failure handling and sleeping on the event
    // fd between events (what rdask does between hosts).
    let perftests = [("ucx_perftest tag_bw/tag_lat", "tag_bw", "tag_lat", &[][..]), ("ucx_perftest ucp_am_* -e -E sleep", "ucp_am_bw", "ucp_am_lat", &["-e", "-E", "sleep"][..])];
    for tls in a.ucx_tls.iter().filter(|_| a.protocols.iter().any(|p| p == "ucx")) {
        let mut ours = Vec::new();
        let mut theirs = vec![Vec::new(); perftests.len()];
        for round in 0..a.rounds {
            eprintln!("ucx UCX_TLS={tls}, round {} of {} ...", round + 1, a.rounds);
            ours.push(as_map(run_pair(a, "ucx", tls)?));
            for (i, (_, bw, lat, extra)) in perftests.iter().enumerate() {
                let mut p = serde_json::Map::new();
                for &mib in &a.sizes_mib {
                    port += 1;
                    p.insert(format!("bw_{mib}MiB_MBps"), perftest(bw, mib << 20, a.iters_for(mib), tls, port, extra)?.into());
                }
                port += 1;
                p.insert("lat_8B_us".into(), perftest(lat, 8, a.lat_iters, tls, port, extra)?.into());
                theirs[i].push(p);
            }
        }
        rows.push(serde_json::json!({"transport": "rdask ucx://", "ucx_tls": tls, "figures": merge_rounds(&ours)}));
        for ((name, ..), rounds) in perftests.iter().zip(&theirs) {
            rows.push(serde_json::json!({"transport": name, "ucx_tls": tls, "figures": merge_rounds(rounds)}));
        }
        // rdask's medians against perftest's defaults.
        let mut ratio = serde_json::Map::new();
        for &mib in &a.sizes_mib {
            let key = format!("bw_{mib}MiB_MBps");
            let r = rows[rows.len() - 3]["figures"][&key].as_f64().unwrap_or(0.0) / rows[rows.len() - 2]["figures"][&key].as_f64().unwrap_or(f64::NAN);
            ratio.insert(format!("bw_{mib}MiB_pct_of_tag_bw"), ((r * 1000.0).round() / 10.0).into());
        }
        rows.push(serde_json::json!({"transport": "rdask / perftest defaults", "ucx_tls": tls, "figures": ratio}));
    }
    println!("{:<34} {:<10} {}", "transport", "UCX_TLS", "figures (bandwidth MB/s of 2^20 B; one-way latency µs; medians of the rounds, then each round)");
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
