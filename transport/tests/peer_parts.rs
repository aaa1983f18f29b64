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

/// Answers every request with: 1 whole; 2 in three parts (a head of two
/// frames, a chunk, a chunk with the close); 3 missing; 4 in parts that end
/// in an error.
async fn holder() -> String {
    let mut listener = rdask_transport::listen("tcp://127.0.0.1:0", Default::default()).await.unwrap();
    let address = listener.address.clone();
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                handshake_accept(&mut conn, &[Role::Peer], None).await.unwrap();
                while let Ok(Some(frame)) = conn.receiver.recv().await {
                    let ArchivedToPeerMessage::Fetch { request_id, .. } = ToPeerMessage::access(&frame.control).unwrap();
                    let request_id = request_id.to_native();
                    let send = |items: Vec<DataItem>, data: Vec<Bytes>, more: bool| {
                        conn.sender.send(Frame::with_data(&FromPeerMessage::Data { request_id, items, more }, data)).unwrap();
                    };
                    send(vec![item(1, 0, 1, false, None), item(2, 1, 2, true, None)], vec![bytes("one"), bytes("h0"), bytes("h1")], true);
                    send(vec![item(2, 0, 1, true, None)], vec![bytes("c0")], true);
                    send(vec![item(2, 0, 1, false, None)], vec![bytes("c1")], true);
                    let missing = DataItem { id: TaskId(3), found: false, first: 0, count: 0, error: None, partial: false };
                    send(vec![missing, item(4, 0, 1, true, None)], vec![bytes("x")], true);
                    send(vec![item(4, 0, 1, false, Some("device copy failed"))], vec![bytes("payload")], false);
                }
            });
        }
    });
    address
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
