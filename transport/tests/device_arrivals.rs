//! Where an arriving device payload lands (UCX): in memory the process's
//! allocator hands out, or in host memory when it has none to give (a full
//! device), so nothing is lost either way. A test binary of its own: the
//! allocator is process-wide.

mod common;
use common::control;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdask_transport::bytes::Bytes;
use rdask_transport::device::{set_device_allocator, DeviceAllocator, DevicePayload, MemoryKind};
use rdask_transport::{Frame, Limits};

/// "Device" memory of the test: a host buffer the allocator made.
struct Slot(Mutex<Vec<u8>>);

/// Gives memory for payloads of up to `most` bytes; larger ones find the
/// "device" full.
struct TestAllocator {
    most: usize,
    given: AtomicUsize,
}

impl DeviceAllocator for TestAllocator {
    fn alloc(&self, kind: MemoryKind, len: usize) -> Option<DevicePayload> {
        if kind != MemoryKind::Host || len > self.most {
            return None;
        }
        self.given.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; len];
        let address = buf.as_mut_ptr() as u64;
        // SAFETY: the buffer lives in the owner; only the transport writes it.
        Some(unsafe { DevicePayload::new(address, len, kind, Arc::new(Slot(Mutex::new(buf)))) })
    }
}

fn pattern(seed: u8, n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed)).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_land_in_allocated_memory_or_on_the_host_when_there_is_none() {
    if let Err(why) = rdask_transport::ucx_status() {
        assert!(std::env::var_os("RDASK_REQUIRE_UCX").is_none(), "UCX cannot start here: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let alloc = Arc::new(TestAllocator { most: 1 << 20, given: AtomicUsize::new(0) });
    set_device_allocator(alloc.clone());
    let mut listener = rdask_transport::listen("ucx://127.0.0.1:0", Limits::default()).await.unwrap();
    let client = rdask_transport::connect(&listener.address, Limits::default()).await.unwrap();
    let mut server = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.unwrap().unwrap();
    let (fits, too_big) = (pattern(1, 700_000), pattern(2, 3 << 20));
    for p in [&fits, &too_big] {
        client.sender.send(Frame { control: control(), data: vec![], device: Some(DevicePayload::host(p.clone())) }).unwrap();
    }
    let wait = Duration::from_secs(30);
    let landed = tokio::time::timeout(wait, server.receiver.recv()).await.unwrap().unwrap().unwrap().device.unwrap();
    assert!(landed.owner().downcast_ref::<Slot>().is_some(), "the payload did not land in the allocator's memory");
    let slot = landed.owner().downcast_ref::<Slot>().unwrap();
    assert!(slot.0.lock().unwrap()[..] == fits[..], "bytes differ");
    assert_eq!(alloc.given.load(Ordering::Relaxed), 1);
    let on_host = tokio::time::timeout(wait, server.receiver.recv()).await.unwrap().unwrap().unwrap().device.unwrap();
    assert!(on_host.owner().downcast_ref::<Bytes>().is_some(), "a payload the allocator had no room for lands in host memory");
    assert!(on_host.into_host_bytes().unwrap() == too_big);
}
