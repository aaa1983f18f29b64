//! The README's demo: connects to a running scheduler, runs a few graphs of
//! null tasks on its workers, and prints what happened.
//!
//! `cargo run --release -p rdask-client --example demo -- tcp://127.0.0.1:8786 [workers]`

use std::time::{Duration, Instant};

use rdask_client::{graphs, Client, ClientError, TaskDef};
use rdask_transport::bytes::Bytes;

/// A null-executor payload that makes the task raise. The layout is the
/// worker's `NullTask`: sleep_us u32, output_bytes u32, flags u32 (bit 0 = fail).
fn failing_payload() -> Bytes {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    Bytes::from(v)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "tcp://127.0.0.1:8786".into());
    let want_workers: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);

    let client = Client::connect(&address, None, Duration::from_secs(10)).await?;
    let info = client.wait_for_workers(want_workers, Duration::from_secs(30)).await?;
    println!("connected to {address} ({}), {} workers:", info.scheduler_id, info.workers.len());
    for w in &info.workers {
        println!("  {:<24} {:<26} {} thread(s)", w.name, w.address, w.nthreads);
    }

    for graph in [graphs::tree(14, "demo-"), graphs::merge(50_000, "demo-"), graphs::shuffle(64, "demo-")] {
        let (name, n, root, expected) = (graph.name.clone(), graph.len(), graph.root.clone(), graph.expected);
        let t0 = Instant::now();
        client.submit(graph.tasks)?;
        let value = client.gather(std::slice::from_ref(&root)).await?;
        let secs = t0.elapsed().as_secs_f64();
        let got = u64::from_le_bytes(value[0][0][..8].try_into()?);
        println!(
            "{name:<14} {n:>7} tasks in {:>7.1} ms = {:>9.0} tasks/s; root {root} = {got} (expected {expected}) {}",
            secs * 1e3,
            n as f64 / secs,
            if got == expected { "ok" } else { "WRONG" }
        );
        client.release(&[root])?;
        if got != expected {
            return Err("wrong result".into());
        }
    }

    // A task that raises: its dependent errs with the original message; the
    // cluster keeps working.
    client.submit(vec![
        TaskDef::new("demo-boom", vec![]).with_payload(failing_payload()),
        TaskDef::new("demo-after-boom", vec!["demo-boom".into()]).wanted(),
    ])?;
    match client.wait(&["demo-after-boom".to_string()]).await {
        Err(ClientError::TaskFailed { key, failed_key, message, .. }) => {
            println!("failure propagates: {key} erred because {failed_key} raised: {message}")
        }
        other => return Err(format!("expected a task failure, got {other:?}").into()),
    }
    client.release(&["demo-after-boom".to_string()])?;

    tokio::time::sleep(Duration::from_millis(50)).await;
    let info = client.cluster_info().await?;
    println!(
        "scheduler: {} submitted, {} finished, {} failed, {} tasks still held",
        info.submitted, info.finished, info.failed, info.tasks
    );
    client.close().await;
    Ok(())
}
