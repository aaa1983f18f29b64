//! A value sent in parts (`DataItem::partial`: a device value leaving its
//! device in staging chunks) is joined by the requester, between values sent
//! whole, and a value that fails half-way is that failure. The holder is
//! played by this test over TCP.

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_accept, Role};
use rdask_transport::peer::{FetchedValue, PeerConnection};
use rdask_transport::protocol::{ArchivedToPeerMessage, DataItem, FromPeerMessage, ToPeerMessage};
use rdask_transport::{Frame, TaskId, WireMessage};

fn item(id: u64, first: u32, count: u32, partial: bool, error: Option<&str>) -> DataItem {
    DataItem { id: TaskId(id), found: true, first, count, error: error.map(String::from), partial }
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

type Reply<'a> = &'a dyn Fn(Vec<DataItem>, Vec<Bytes>, bool);

/// A holder on `scheme` that answers each request with `answer(sender,
/// request id, first task asked for)`; `None` where the scheme cannot listen.
async fn holder_on<F>(scheme: &str, answer: F) -> Option<String>
where
    F: Fn(&rdask_transport::FrameSender, u64, u64) + Copy + Send + Sync + 'static,
{
    let mut listener = rdask_transport::listen(&format!("{scheme}://127.0.0.1:0"), Default::default()).await.ok()?;
    let address = listener.address.clone();
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                handshake_accept(&mut conn, &[Role::Peer], None).await.unwrap();
                while let Ok(Some(frame)) = conn.receiver.recv().await {
                    let ArchivedToPeerMessage::Fetch { request_id, tasks, .. } = ToPeerMessage::access(&frame.control).unwrap() else { continue };
                    answer(&conn.sender, request_id.to_native(), tasks[0].get().0);
                }
            });
        }
    });
    Some(address)
}

/// A holder over TCP that answers each request with `answer(send, first
/// task asked for)`.
async fn holder_with(answer: fn(Reply<'_>, u64)) -> String {
    let reply = move |sender: &rdask_transport::FrameSender, request_id: u64, first: u64| {
        let send = |items: Vec<DataItem>, data: Vec<Bytes>, more: bool| {
            sender.send(Frame::with_data(&FromPeerMessage::Data { request_id, items, more }, data)).unwrap();
        };
        answer(&send, first);
    };
    holder_on("tcp", reply).await.expect("TCP listens")
}

/// Answers every request with: 1 whole; 2 in three parts (a head of two
/// frames, a chunk, a chunk with the close); 3 missing; 4 in parts that end
/// in an error.
async fn holder() -> String {
    holder_with(|send, _| {
        send(vec![item(1, 0, 1, false, None), item(2, 1, 2, true, None)], vec![bytes("one"), bytes("h0"), bytes("h1")], true);
        send(vec![item(2, 0, 1, true, None)], vec![bytes("c0")], true);
        send(vec![item(2, 0, 1, false, None)], vec![bytes("c1")], true);
        let missing = DataItem { id: TaskId(3), found: false, first: 0, count: 0, error: None, partial: false };
        send(vec![missing, item(4, 0, 1, true, None)], vec![bytes("x")], true);
        send(vec![item(4, 0, 1, false, Some("device copy failed"))], vec![bytes("payload")], false);
    })
    .await
}

#[tokio::test]
async fn values_sent_in_parts_are_joined_in_order() {
    let address = holder().await;
    let conn = PeerConnection::connect(&address, None, Default::default()).await.unwrap();
    for _ in 0..2 {
        let got = conn.fetch((1..=4).map(TaskId).collect()).await.unwrap();
        let ids: Vec<u64> = got.iter().map(|(t, _)| t.0).collect();
        assert_eq!(ids, vec![1, 2, 3, 4]);
        let frames = |v: &FetchedValue| match v {
            FetchedValue::Value(f) => f.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect::<Vec<_>>(),
            other => panic!("a value expected, got {other:?}"),
        };
        assert_eq!(frames(&got[0].1), vec!["one"]);
        assert_eq!(frames(&got[1].1), vec!["h0", "h1", "c0", "c1"], "the parts of 2 joined in order");
        assert_eq!(got[2].1, FetchedValue::Missing);
        assert_eq!(got[3].1, FetchedValue::Unserializable { message: "device copy failed".into(), payload: bytes("payload") });
    }
}

/// A sink for heads that start with "SINK": it joins the parts itself into
/// one frame, and fails on a part that reads "bad".
struct TestSink;
struct Joined(Vec<u8>);

impl rdask_transport::peer::PartSink for TestSink {
    fn begin(&self, head: &[Bytes]) -> Option<Box<dyn rdask_transport::peer::PartReceiver>> {
        head[0].starts_with(b"SINK").then(|| Box::new(Joined(head[0].to_vec())) as Box<dyn rdask_transport::peer::PartReceiver>)
    }
}

impl rdask_transport::peer::PartReceiver for Joined {
    fn push(&mut self, frames: &[Bytes]) -> Result<(), String> {
        for f in frames {
            if &f[..] == b"bad" {
                return Err("no room on the device".into());
            }
            self.0.extend_from_slice(f);
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<rdask_transport::peer::Frames, String> {
        Ok(std::iter::once(Bytes::from(self.0)).collect())
    }
}

/// Task 5 goes through the sink; task 6 fails in it half-way (its later
/// parts are dropped); asking for task 7 gets parts interrupted by another
/// task, which breaks the connection.
async fn sink_holder() -> String {
    holder_with(|send, first| {
        if first == 7 {
            send(vec![item(7, 0, 1, true, None)], vec![bytes("SINK7")], true);
            send(vec![item(8, 0, 1, false, None)], vec![bytes("other")], false);
            return;
        }
        send(vec![item(5, 0, 1, true, None)], vec![bytes("SINK:")], true);
        send(vec![item(5, 0, 1, true, None)], vec![bytes("a")], true);
        send(vec![item(5, 0, 0, false, None), item(6, 0, 1, true, None)], vec![bytes("SINK6")], true);
        send(vec![item(6, 0, 1, true, None)], vec![bytes("bad")], true);
        send(vec![item(6, 0, 1, true, None)], vec![bytes("late")], true);
        send(vec![item(6, 0, 0, false, None)], vec![], false);
    })
    .await
}

#[tokio::test]
async fn a_part_sink_takes_parts_as_they_arrive_and_its_failures_stick() {
    rdask_transport::peer::set_part_sink(std::sync::Arc::new(TestSink));
    let conn = PeerConnection::connect(&sink_holder().await, None, Default::default()).await.unwrap();
    let got = conn.fetch(vec![TaskId(5), TaskId(6)]).await.unwrap();
    assert_eq!(got[0], (TaskId(5), FetchedValue::Value(std::iter::once(bytes("SINK:a")).collect())));
    match &got[1].1 {
        FetchedValue::Unserializable { message, .. } => assert!(message.contains("no room on the device"), "{message}"),
        other => panic!("the sink's failure is the value's: {other:?}"),
    }
    let err = conn.fetch(vec![TaskId(7)]).await.unwrap_err().to_string();
    assert!(!err.is_empty());
    assert!(conn.is_closed(), "parts interrupted by another task break the connection");
}

/// The requester tells the holder when an answer that came in parts is in
/// (what was shared by IPC has been copied), also when the fetch that asked
/// was dropped before the answer ended; an answer sent whole needs no word.
#[tokio::test]
async fn an_answer_in_parts_is_released_even_when_its_fetch_was_dropped() {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Default::default()).await.unwrap();
    let address = listener.address.clone();
    let (released_tx, mut released) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        handshake_accept(&mut conn, &[Role::Peer], None).await.unwrap();
        while let Ok(Some(frame)) = conn.receiver.recv().await {
            let (request_id, first) = match ToPeerMessage::access(&frame.control).unwrap() {
                ArchivedToPeerMessage::Fetch { request_id, tasks, .. } => (request_id.to_native(), tasks[0].get().0),
                ArchivedToPeerMessage::Release { request_id } => {
                    released_tx.send(request_id.to_native()).unwrap();
                    continue;
                }
            };
            let send = |items: Vec<DataItem>, data: Vec<Bytes>, more: bool| {
                conn.sender.send(Frame::with_data(&FromPeerMessage::Data { request_id, items, more }, data)).unwrap();
            };
            if first == 1 {
                send(vec![item(1, 0, 1, false, None)], vec![bytes("whole")], false);
                continue;
            }
            // Task 2 in parts, the end of it late.
            send(vec![item(2, 0, 1, true, None)], vec![bytes("h")], true);
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            send(vec![item(2, 0, 1, false, None)], vec![bytes("c")], false);
        }
    });
    let conn = PeerConnection::connect(&address, None, Default::default()).await.unwrap();
    conn.fetch(vec![TaskId(1)]).await.unwrap();
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), conn.fetch(vec![TaskId(2)])).await;
    assert!(dropped.is_err(), "the fetch was given up before its answer ended");
    let id = tokio::time::timeout(std::time::Duration::from_secs(10), released.recv()).await.expect("no release came").unwrap();
    assert_eq!(id, 2, "the request answered in parts, not the one answered whole");
}

/// A holder over UCX whose answers carry device frames (host memory stands
/// for the device, as UCX carries it everywhere): task 1 in parts, its
/// second part a device frame; task 2 a device frame on an item that is not
/// a part of a value (a protocol error).
async fn device_frame_holder() -> Option<String> {
    use rdask_transport::device::DevicePayload;
    holder_on("ucx", |sender, request_id, first| {
        let message = |items: Vec<DataItem>, more: bool| FromPeerMessage::Data { request_id, items, more };
        let device = |items: Vec<DataItem>, more: bool, payload: &str| Frame {
            device: Some(DevicePayload::host(bytes(payload))),
            ..Frame::from_message(&message(items, more))
        };
        if first == 1 {
            sender.send(Frame::with_data(&message(vec![item(1, 0, 1, true, None)], true), vec![bytes("head")])).unwrap();
            sender.send(device(vec![item(1, 0, 0, true, None)], true, "device bytes")).unwrap();
            sender.send(Frame::from_message(&message(vec![item(1, 0, 0, false, None)], false))).unwrap();
        } else {
            sender.send(device(vec![item(2, 0, 0, false, None)], false, "stray")).unwrap();
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_frames_join_a_value_in_parts_and_nowhere_else() {
    let Some(address) = device_frame_holder().await else {
        assert!(std::env::var_os("RDASK_REQUIRE_UCX").is_none(), "UCX cannot start here");
        eprintln!("skipped: UCX is not available here");
        return;
    };
    let conn = PeerConnection::connect(&address, None, Default::default()).await.unwrap();
    let got = conn.fetch(vec![TaskId(1)]).await.unwrap();
    match &got[0].1 {
        // No device sink for this head: the host payload joins as a frame.
        FetchedValue::Value(f) => assert_eq!(f.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), vec![b"head".to_vec(), b"device bytes".to_vec()]),
        other => panic!("a value expected, got {other:?}"),
    }
    let stray = conn.fetch(vec![TaskId(2)]).await;
    assert!(stray.is_err(), "a device payload outside a value in parts ends the connection: {stray:?}");
}
