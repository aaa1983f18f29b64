//! Frames the transport tests send, and the check that one arrived intact.

#![allow(dead_code)] // each test file uses its own subset

use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::ToPeerMessage;
use rdask_transport::rkyv::util::AlignedVec;
use rdask_transport::{Frame, TaskId, WireMessage};

/// A control message that is a real archive (any type works for framing).
pub fn control() -> AlignedVec {
    ToPeerMessage::Fetch { request_id: 42, tasks: vec![TaskId(1), TaskId(2), TaskId(3)], ipc: None, direct: None }.encode()
}

/// A small frame (for cutting at every byte position, and for ordering).
pub fn small_frame() -> Frame {
    Frame { control: control(), data: vec![Bytes::from_static(b"abc"), Bytes::new(), Bytes::from_static(b"defgh")], device: None }
}

pub fn assert_same_frame(got: &Frame, want: &Frame) {
    assert_eq!(&got.control[..], &want.control[..], "control bytes differ");
    assert_eq!(got.data.len(), want.data.len(), "number of data frames differs");
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        assert_eq!(g.len(), w.len(), "length of data frame {i} differs");
        assert!(g == w, "bytes of data frame {i} differ");
    }
}
