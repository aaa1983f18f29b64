//! Spill throughput: a worker store writes values to disk (as the memory
//! monitor does) and reads them back (as a task that needs them does),
//! against `dd` writing and reading the same amount on the same disk.
//!
//! `rdask-spill-bench [--dir DIR] [--gib 2] [--value-mib 64] [--out FILE]`

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use rdask_transport::bytes::Bytes;
use rdask_transport::TaskId;
use rdask_worker::spill::SpillDir;
use rdask_worker::store::Store;
use rdask_worker::{NullExecutor, Value};

#[derive(Parser, Debug)]
struct Args {
    /// Disk to measure (the spill folder is made inside it).
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// Bytes spilled in all, GiB.
    #[arg(long, default_value_t = 2.0)]
    gib: f64,
    /// Size of each value, MiB.
    #[arg(long, default_value_t = 64)]
    value_mib: usize,
    #[arg(long, default_value = "bench-results/spill.json")]
    out: PathBuf,
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Drops the page cache so reads come from the disk (root only; reported).
fn drop_caches() -> bool {
    Command::new("sync").status().is_ok() && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn dd(args: &[String]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new("dd").args(args).output().context("running dd")?;
    if !out.status.success() {
        bail!("dd {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let value_bytes = args.value_mib << 20;
    let n = ((args.gib * (1u64 << 30) as f64) as usize / value_bytes).max(1);
    let total = (n * value_bytes) as u64;
    let work = args.dir.join(format!("rdask-spill-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    // The store, as a worker with a memory limit has it.
    let store = Store::with_spilling(SpillDir::new(Some(&work), "bench"), Arc::new(NullExecutor::default()));
    let ids: Vec<TaskId> = (1..=n as u64).map(TaskId::new).collect();
    store.insert_many(ids.iter().map(|&id| (id, Value::Bytes(Bytes::from(vec![id.as_num() as u8; value_bytes])))).collect());
    // Each write starts from the same state: an emptied page cache.
    drop_caches();
    let t = Instant::now();
    let round = store.spill_lru(|_| true);
    let spill_s = t.elapsed().as_secs_f64();
    if let Some(e) = round.error {
        bail!("{e}");
    }
    assert_eq!(round.bytes, total);
    let cold = drop_caches();
    let t = Instant::now();
    let mut check = 0u64;
    for (i, v) in store.load_many(ids.iter().copied()).into_iter().enumerate() {
        let Some(Value::Bytes(b)) = v else { bail!("value {i} did not come back") };
        // Touch every page (a mapped value is read when used).
        check += b.iter().step_by(4096).map(|&x| x as u64).sum::<u64>();
        if b[0] != ids[i].as_num() as u8 {
            bail!("value {i} came back wrong");
        }
    }
    let unspill_s = t.elapsed().as_secs_f64();
    std::hint::black_box(check);
    drop(store);

    // dd on the same disk: the same bytes written (page cache, as spilling,
    // and with fdatasync, the disk itself) and read back.
    let file = work.join("dd.bin");
    let of = format!("of={}", file.display());
    let count = format!("count={}", total >> 20);
    drop_caches();
    let dd_write_s = dd(&["if=/dev/zero".into(), of.clone(), "bs=1M".into(), count.clone()])?;
    drop_caches();
    let dd_sync_s = dd(&["if=/dev/zero".into(), of, "bs=1M".into(), count, "conv=fdatasync".into()])?;
    drop_caches();
    let dd_read_s = dd(&[format!("if={}", file.display()), "of=/dev/null".into(), "bs=1M".into()])?;
    let _ = std::fs::remove_dir_all(&work);

    let row = serde_json::json!({
        "dir": args.dir, "values": n, "value_bytes": value_bytes, "total_bytes": total,
        "spill_gb_s": gbps(total, spill_s), "unspill_gb_s": gbps(total, unspill_s), "unspill_from_disk": cold,
        "dd_write_gb_s": gbps(total, dd_write_s), "dd_write_fdatasync_gb_s": gbps(total, dd_sync_s),
        "dd_read_gb_s": gbps(total, dd_read_s),
    });
    println!("spill {n} x {} MiB to {}:", args.value_mib, args.dir.display());
    println!("  store spill (write)      {:6.2} GB/s   dd write {:6.2} GB/s (fdatasync: {:.2} GB/s)", gbps(total, spill_s), gbps(total, dd_write_s), gbps(total, dd_sync_s));
    println!("  store read back (+touch) {:6.2} GB/s   dd read  {:6.2} GB/s   ({})", gbps(total, unspill_s), gbps(total, dd_read_s), if cold { "page cache dropped first" } else { "page cache NOT dropped (not root)" });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&row)?)?;
    Ok(())
}
