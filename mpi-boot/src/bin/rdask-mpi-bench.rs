//! Null-worker scaling on an MPI job, over TCP or over the MPI transport:
//!
//!     mpirun -np 66 --oversubscribe target/release/rdask-mpi-bench --protocol mpi --graphs merge-100000,tree-17
//!
//! Rank 0 runs the scheduler, rank 1 the client that submits each graph and
//! checks its root, ranks 2.. null workers (the Rust executor: the figure is
//! the runtime's own overhead). Prints one line per graph and run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdask_client::{graphs, Client};
use rdask_sched::reactor::{SchedulerConfig, SchedulerHandle};
use rdask_worker::{run_worker, NullExecutor, WorkerConfig};

struct Args {
    protocol: String,
    graphs: Vec<String>,
    repeat: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { protocol: "mpi".into(), graphs: vec!["merge-100000".into(), "tree-17".into()], repeat: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--protocol" => a.protocol = value,
            "--graphs" => a.graphs = value.split(',').map(str::to_string).collect(),
            "--repeat" => a.repeat = value.parse()?,
            _ => bail!("unknown flag {flag} (--protocol tcp|mpi, --graphs A,B, --repeat N)"),
        }
    }
    if a.protocol != "tcp" && a.protocol != "mpi" {
        bail!("--protocol is tcp or mpi");
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let world = rdask_mpi_boot::init()?;
    if world.size < 3 {
        bail!("run with at least 3 ranks (scheduler, client, workers)");
    }
    let workers = (world.size - 2) as usize;
    let code = match world.rank {
        0 => {
            let addr = if a.protocol == "mpi" { "mpi://0:0".to_string() } else { "tcp://127.0.0.1:0".to_string() };
            let sched = SchedulerHandle::start(&addr, SchedulerConfig::default())?;
            rdask_mpi_boot::broadcast(Some(&sched.address))?;
            while rdask_mpi_boot::recv_done()?.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            sched.stop();
            0
        }
        1 => {
            let address = rdask_mpi_boot::broadcast(None)?;
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            let result = rt.block_on(async {
                let client = Client::connect(&address, None, Duration::from_secs(60)).await?;
                let t0 = Instant::now();
                client.wait_for_workers(workers, Duration::from_secs(300)).await?;
                println!("{workers} null workers over {} ready {:.2} s after the client connected", a.protocol, t0.elapsed().as_secs_f64());
                for spec in &a.graphs {
                    for run in 0..a.repeat {
                        let graph = graphs::by_name(spec, &format!("r{run}-")).map_err(anyhow::Error::msg)?;
                        let (n, root, expected) = (graph.len(), vec![graph.root.clone()], graph.expected);
                        let t = Instant::now();
                        client.submit(graph.tasks)?;
                        let values = client.gather(&root).await?;
                        let secs = t.elapsed().as_secs_f64();
                        let got = u64::from_le_bytes(values[0][0][..8].try_into()?);
                        client.release(&root)?;
                        println!(
                            "{spec:>14} {:>4} workers over {}: {:>8.3} s, {:>9.0} tasks/s {}",
                            workers,
                            a.protocol,
                            secs,
                            n as f64 / secs,
                            if got == expected { "ok" } else { "WRONG RESULT" }
                        );
                    }
                }
                client.close().await;
                anyhow::Ok(())
            });
            rdask_mpi_boot::send_done(0)?;
            if let Err(e) = result {
                eprintln!("rdask-mpi-bench: {e:#}");
                1
            } else {
                0
            }
        }
        rank => {
            let address = rdask_mpi_boot::broadcast(None)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let listen = if a.protocol == "mpi" { format!("mpi://{rank}:0") } else { "tcp://127.0.0.1:0".into() };
            let config = WorkerConfig {
                scheduler: address,
                name: format!("null-{rank}"),
                listen,
                connect_timeout: Duration::from_secs(120),
                ..Default::default()
            };
            match rt.block_on(run_worker(config, Arc::new(NullExecutor::default()))) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("rank {rank}: {e}");
                    1
                }
            }
        }
    };
    rdask_mpi_boot::finalize()?;
    std::process::exit(code)
}
