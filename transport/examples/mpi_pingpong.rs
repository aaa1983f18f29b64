//! Bandwidth and latency of the MPI transport against a plain MPI
//! ping-pong of the same sizes, measured in the same run between ranks 0
//! and 1:
//!
//!     cargo build --release -p rdask-transport --features mpi --example mpi_pingpong
//!     mpirun -np 2 target/release/examples/mpi_pingpong [OUT.json]
//!
//! Each size goes back and forth `rounds` times; the figure is one-way
//! bandwidth (size / half a round trip) and half the round trip time.

use std::time::Instant;

use mpi::point_to_point::{Destination, Source};
use mpi::topology::Communicator;
use rdask_transport::bytes::Bytes;
use rdask_transport::mpi as engine;
use rdask_transport::protocol::{FromClientMessage, WireMessage};
use rdask_transport::{Frame, Limits};

const SIZES: [usize; 7] = [8, 1 << 10, 64 << 10, 1 << 20, 8 << 20, 16 << 20, 64 << 20];

fn rounds(size: usize) -> usize {
    if size >= 16 << 20 { 20 } else if size >= 1 << 20 { 50 } else { 500 }
}

fn main() {
    let world = engine::start().expect("MPI start");
    assert_eq!(world.size, 2, "run with mpirun -np 2");
    let out = std::env::args().nth(1);
    // Plain MPI on the engine thread.
    let raw: Vec<f64> = engine::with_world(move |w| {
        let me = w.rank();
        let other = w.process_at_rank(1 - me);
        SIZES
            .iter()
            .map(|&size| {
                let mut buf = vec![1u8; size];
                let n = rounds(size);
                w.barrier_compat();
                let t = Instant::now();
                for _ in 0..n {
                    if me == 0 {
                        other.send(&buf[..]);
                        other.receive_into(&mut buf[..]);
                    } else {
                        other.receive_into(&mut buf[..]);
                        other.send(&buf[..]);
                    }
                }
                t.elapsed().as_secs_f64() / n as f64 / 2.0
            })
            .collect()
    })
    .unwrap();
    // The rdask transport: rank 1 echoes every frame back.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rdask: Vec<f64> = rt.block_on(async move {
        let limits = Limits::default();
        if world.rank == 1 {
            let mut listener = rdask_transport::listen("mpi://1:1", limits).await.unwrap();
            let mut conn = listener.accept().await.unwrap();
            while let Ok(Some(frame)) = conn.receiver.recv().await {
                conn.sender.send(frame).unwrap();
            }
            Vec::new()
        } else {
            let mut conn = loop {
                match rdask_transport::connect("mpi://1:1", limits).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            };
            let control = FromClientMessage::Close.encode();
            let mut times = Vec::new();
            for &size in &SIZES {
                let data = Bytes::from(vec![1u8; size]);
                let n = rounds(size);
                let t = Instant::now();
                for _ in 0..n {
                    conn.sender.send(Frame { control: control.clone(), data: vec![data.clone()], device: None }).unwrap();
                    let back = conn.receiver.recv().await.unwrap().unwrap();
                    assert_eq!(back.data[0].len(), size);
                }
                times.push(t.elapsed().as_secs_f64() / n as f64 / 2.0);
            }
            times
        }
    });
    if world.rank == 0 {
        println!("{:>10} {:>14} {:>14} {:>12} {:>12} {:>7}", "bytes", "MPI MiB/s", "rdask MiB/s", "MPI µs", "rdask µs", "ratio");
        let mut rows = Vec::new();
        for ((size, r), t) in SIZES.iter().zip(&raw).zip(&rdask) {
            let mib = |s: f64| *size as f64 / s / (1u64 << 20) as f64;
            println!("{:>10} {:>14.1} {:>14.1} {:>12.2} {:>12.2} {:>6.0}%", size, mib(*r), mib(*t), r * 1e6, t * 1e6, 100.0 * r / t);
            rows.push(format!(
                "{{\"bytes\": {size}, \"mpi_one_way_s\": {r:e}, \"rdask_one_way_s\": {t:e}, \"mpi_mib_s\": {:.1}, \"rdask_mib_s\": {:.1}}}",
                mib(*r),
                mib(*t)
            ));
        }
        if let Some(path) = out {
            std::fs::write(&path, format!("[\n  {}\n]\n", rows.join(",\n  "))).unwrap();
        }
    }
    engine::finalize().unwrap();
}

/// A barrier that needs no extra rsmpi traits in scope.
trait BarrierCompat {
    fn barrier_compat(&self);
}

impl BarrierCompat for mpi::topology::SimpleCommunicator {
    fn barrier_compat(&self) {
        use mpi::collective::CommunicatorCollectives;
        self.barrier();
    }
}
