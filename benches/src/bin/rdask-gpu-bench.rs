//! `rdask-gpu-bench`: the device data plane's figures (issue 12).
//!
//! - Staging throughput, device → host and host → device, in chunks through
//!   the staging pool, against one whole-buffer copy to/from page-locked
//!   memory on the same device in the same run (the bus's limit).
//! - A device value moved over a real connection (`--protocol`, loopback):
//!   staged out in chunks on one side and into device memory on the other,
//!   against moving the same bytes from host memory; over UCX that carries
//!   the device's memory, also as one device frame (sent from device memory,
//!   received into device memory).
//! - Spilling: device values three times the device memory limit written
//!   through a `DeviceStore` and all read back; time and bytes moved.
//!
//! `--device cuda:N` uses GPU N (cudarc); `--device standin` the host-memory
//! stand-in (runs anywhere; its figures are memcpy speeds, a check that the
//! pipeline works, not GPU figures).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use rdask_gpu::device::{Device, DeviceBuffer, HostStandIn};
use rdask_gpu::device_store::DeviceStore;
use rdask_gpu::staging::{stage_out, StageIn, StagingPool};
use rdask_transport::bytes::Bytes;
use rdask_transport::device::{DeviceAllocator, DevicePayload, MemoryKind};
use rdask_transport::rkyv::util::AlignedVec;
use rdask_transport::{Frame, Limits};

#[derive(Parser, Debug)]
struct Args {
    /// cuda:N or standin.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Size of the staged value and of the transferred value, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Staging chunk, MiB, and staging buffers per pool.
    #[arg(long, default_value_t = 8)]
    chunk_mib: usize,
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Device memory limit for the spilling run, MiB (values: 3x this).
    #[arg(long, default_value_t = 2048)]
    limit_mib: usize,
    /// Transport for the transfer: tcp or ucx.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    #[arg(long, default_value = "bench-results/gpu.json")]
    out: std::path::PathBuf,
}

fn open(spec: &str) -> anyhow::Result<Arc<dyn Device>> {
    if spec == "standin" {
        return Ok(Arc::new(HostStandIn::default()));
    }
    if let Some(n) = spec.strip_prefix("cuda:") {
        return Ok(Arc::new(rdask_gpu::cuda::CudaDevice::open(n.parse().context("cuda:N")?)?));
    }
    bail!("unknown --device {spec:?} (cuda:N or standin)")
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn fill(dev: &dyn Device, len: usize) -> anyhow::Result<DeviceBuffer> {
    let mut buf = dev.alloc(len)?;
    let chunk = vec![0x5au8; 64 << 20];
    let mut off = 0;
    while off < len {
        let n = chunk.len().min(len - off);
        dev.copy_from_host(&mut buf, off, &chunk[..n])?;
        off += n;
    }
    Ok(buf)
}

/// Device frames arriving in this process land on the bench's device.
struct Arrivals(Arc<dyn Device>);

impl DeviceAllocator for Arrivals {
    fn alloc(&self, kind: MemoryKind, len: usize) -> Option<DevicePayload> {
        let buf = self.0.alloc(len).ok()?;
        let address = self.0.address(&buf);
        // SAFETY: the buffer lives in the owner; only the transport writes it.
        Some(unsafe { DevicePayload::new(address, len, kind, Arc::new(buf)) })
    }

    fn prepare_thread(&self, _kind: MemoryKind) {
        let _ = self.0.bind_to_thread();
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dev = open(&a.device)?;
    let len = a.size_mib << 20;
    let chunk = a.chunk_mib << 20;
    let mut figures = serde_json::Map::new();
    figures.insert("device".into(), dev.describe().into());

    // The reference: one whole copy each way through page-locked memory.
    let src = fill(dev.as_ref(), len)?;
    let mut pinned = dev.alloc_staging(len)?;
    let t = Instant::now();
    dev.copy_to_host(&src, 0, &mut pinned, len)?;
    let d2h_ref = gbps(len, t.elapsed().as_secs_f64());
    let mut dst = dev.alloc(len)?;
    let t = Instant::now();
    dev.copy_from_host(&mut dst, 0, pinned.bytes())?;
    let h2d_ref = gbps(len, t.elapsed().as_secs_f64());
    drop(pinned);
    dev.free(dst);

    // Staged, in chunks, through the pool; the chunks are dropped at once.
    let pool = StagingPool::new(dev.clone(), chunk, a.depth);
    let t = Instant::now();
    stage_out::<anyhow::Error>(&pool, &src, |b| {
        drop(b);
        Ok(())
    })?;
    let d2h = gbps(len, t.elapsed().as_secs_f64());
    let host_chunk = vec![0x5au8; chunk];
    let t = Instant::now();
    let mut into = StageIn::new(dev.clone(), len)?;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        into.push(&host_chunk[..n])?;
        off += n;
    }
    let got = into.finish()?;
    let h2d = gbps(len, t.elapsed().as_secs_f64());
    dev.free(got);
    println!("staging D2H {d2h:.2} GB/s vs whole pinned copy {d2h_ref:.2} GB/s ({:.0}%)", 100.0 * d2h / d2h_ref);
    println!("staging H2D {h2d:.2} GB/s vs whole pinned copy {h2d_ref:.2} GB/s ({:.0}%)", 100.0 * h2d / h2d_ref);
    for (k, v) in [("d2h_staged_GBps", d2h), ("d2h_pinned_whole_GBps", d2h_ref), ("h2d_staged_GBps", h2d), ("h2d_pinned_whole_GBps", h2d_ref)] {
        figures.insert(k.into(), v.into());
    }

    // A device value over a real connection, against host bytes.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (dev_secs, host_secs, direct_secs) = rt.block_on(async {
        let mut l = rdask_transport::listen(&format!("{}://127.0.0.1:0", a.protocol), Limits::default()).await?;
        let client = rdask_transport::connect(&l.address, Limits::default()).await?;
        let mut server = l.accept().await.context("no connection")?;
        let control = || {
            let mut c = AlignedVec::new();
            c.extend_from_slice(b"chunk");
            c
        };
        // Device: staged out chunk by chunk (blocking thread), staged in as chunks arrive.
        let t = Instant::now();
        let (pool2, src_len, sender) = (pool.clone(), len, client.sender.clone());
        let src = Arc::new(src);
        let src2 = src.clone();
        let out = tokio::task::spawn_blocking(move || {
            stage_out::<anyhow::Error>(&pool2, &src2, |b| Ok(sender.send(Frame { control: control(), data: vec![b], device: None })?))
        });
        let mut into = StageIn::new(dev.clone(), src_len)?;
        let mut got = 0;
        while got < src_len {
            let f = server.receiver.recv().await?.context("closed")?;
            into.push(&f.data[0])?;
            got += f.data[0].len();
        }
        out.await??;
        dev.free(into.finish()?);
        let dev_secs = t.elapsed().as_secs_f64();
        // Host: the same bytes as one value.
        let host = Bytes::from(vec![0x5au8; src_len]);
        let t = Instant::now();
        client.sender.send(Frame { control: control(), data: vec![host], device: None })?;
        let f = server.receiver.recv().await?.context("closed")?;
        anyhow::ensure!(f.data[0].len() == src_len);
        let host_secs = t.elapsed().as_secs_f64();
        // Device frame: the value's memory itself, where the transport carries it.
        let kind = if dev.is_host_memory() { MemoryKind::Host } else { MemoryKind::Cuda };
        let mut direct_secs = None;
        if client.sender.carries(kind) {
            rdask_transport::device::set_device_allocator(Arc::new(Arrivals(dev.clone())));
            let address = dev.address(&src);
            let t = Instant::now();
            // SAFETY: `src` lives in the owner until the send is done.
            let payload = unsafe { DevicePayload::new(address, src_len, kind, src.clone()) };
            client.sender.send(Frame { control: control(), data: vec![], device: Some(payload) })?;
            let f = server.receiver.recv().await?.context("closed")?;
            let got = f.device.context("no device payload")?;
            anyhow::ensure!(got.len() == src_len && got.owner().downcast_ref::<DeviceBuffer>().is_some(), "the payload did not land on the device");
            direct_secs = Some(t.elapsed().as_secs_f64());
        }
        anyhow::Ok((dev_secs, host_secs, direct_secs))
    })?;
    println!(
        "{} MiB device value over {}://: {:.2} GB/s; the same bytes from host memory: {:.2} GB/s",
        a.size_mib,
        a.protocol,
        gbps(len, dev_secs),
        gbps(len, host_secs)
    );
    figures.insert("transfer_device_GBps".into(), gbps(len, dev_secs).into());
    figures.insert("transfer_host_GBps".into(), gbps(len, host_secs).into());
    match direct_secs {
        Some(secs) => {
            println!("{} MiB device value as one device frame over {}://: {:.2} GB/s", a.size_mib, a.protocol, gbps(len, secs));
            figures.insert("transfer_device_frame_GBps".into(), gbps(len, secs).into());
        }
        None => println!("device frames: {}:// does not carry this device's memory (UCX without its memory kind, or TCP)", a.protocol),
    }

    // Spilling: values 3x the limit, all written, then all read back.
    let limit = (a.limit_mib << 20) as u64;
    let value = 256usize << 20;
    let n = (3 * limit as usize).div_ceil(value);
    let mut store = DeviceStore::new(dev.clone(), limit);
    let t = Instant::now();
    for i in 0..n {
        let b = fill(dev.as_ref(), value)?;
        store.insert(i, b)?;
    }
    let mut check = dev.alloc_staging(4096)?;
    for i in 0..n {
        let b = store.get(&i)?;
        dev.copy_to_host(b, value - 4096, &mut check, 4096)?;
        anyhow::ensure!(check.bytes().iter().all(|x| *x == 0x5a), "value {i} came back wrong");
    }
    let secs = t.elapsed().as_secs_f64();
    let s = store.stats();
    println!(
        "spilling: {n} values of 256 MiB (3x a {} MiB limit) written and read back in {secs:.2} s; {} spills ({:.2} GB), {} back to the device",
        a.limit_mib,
        s.spills,
        s.spilled_bytes as f64 / 1e9,
        s.unspills
    );
    figures.insert("spill_seconds".into(), secs.into());
    figures.insert("spilled_bytes".into(), s.spilled_bytes.into());
    figures.insert("spills".into(), s.spills.into());
    figures.insert("unspills".into(), s.unspills.into());
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&serde_json::Value::Object(figures))?)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
