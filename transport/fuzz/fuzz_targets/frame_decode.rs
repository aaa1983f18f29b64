//! Frame decoding from an arbitrary byte stream.
//!
//! The TCP reader (`TcpFrameReader::read_frame` in transport/src/tcp.rs) is
//! private and reads from a tokio TCP socket only, so it cannot be driven from
//! a byte slice. This target runs the frame.rs code it is built from on the
//! input, treated as a stream of back-to-back frames, in two ways:
//!
//! * `frame::decode_frame` (whole-frame decoder over a slice);
//! * `tcp_like` below: the same steps, in the same order and with the same
//!   arithmetic, as `read_frame` (`FixedHeader::parse`, the length table
//!   word by word, `check_lengths`, the control part, the data length
//!   `total - table - control`, `split_bytes`), reading from a slice cursor
//!   instead of a socket.
//!
//! * the real reader itself (`tcp::frame_reader_over`, the TCP backend's
//!   reader over an in-memory byte stream instead of a socket).
//!
//! All must agree (frame for frame, error for error), must never panic, and
//! every frame they accept must respect the limits it was read under.
//!
//! Input: byte 0 picks the limit (the default 4 GiB, the 4 KiB pre-auth cap of
//! the handshake, or a u16 taken from bytes 1..3); the rest is the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rdask_transport::bytes::Bytes;
use rdask_transport::frame::{
    check_lengths, decode_frame, encode_frame, split_bytes, FixedHeader, Frame, Limits, DEFAULT_MAX_FRAME_SIZE,
    HEADER_LEN, MAX_DATA_FRAMES,
};
use rdask_transport::handshake::MAX_HANDSHAKE_FRAME;
use rdask_transport::rkyv::util::AlignedVec;

/// The steps of `TcpFrameReader::read_frame` over a slice: `Ok(None)` on a
/// clean end between frames, else the frame and the bytes it took.
fn tcp_like(stream: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, ()> {
    if stream.is_empty() {
        return Ok(None);
    }
    let mut pos = 0usize;
    let mut take = |n: usize| -> Result<&[u8], ()> {
        let end = pos.checked_add(n).ok_or(())?;
        let s = stream.get(pos..end).ok_or(())?;
        pos = end;
        Ok(s)
    };
    let fixed: [u8; HEADER_LEN] = take(HEADER_LEN)?.try_into().unwrap();
    let header = FixedHeader::parse(fixed, limits).map_err(|_| ())?;
    let mut lengths = Vec::with_capacity((header.n_data as usize).min((1 << 20) / 8));
    for _ in 0..header.n_data {
        lengths.push(u64::from_le_bytes(take(8)?.try_into().unwrap()));
    }
    let total = check_lengths(&header, &lengths, limits).map_err(|_| ())?;
    let control_len = header.control_len as usize;
    let mut control = AlignedVec::with_capacity(control_len.min(1 << 20));
    control.extend_from_slice(take(control_len)?);
    let data_len = (total - (HEADER_LEN + 8 * lengths.len()) as u64 - header.control_len as u64) as usize;
    let data = Bytes::copy_from_slice(take(data_len)?);
    let frame = Frame { control, data: split_bytes(data, &lengths), device: None };
    Ok(Some((frame, pos)))
}

fn check_accepted(frame: &Frame, raw: &[u8], limits: &Limits) {
    let size = frame.wire_size();
    assert_eq!(size as usize, raw.len(), "wire size differs from the bytes taken");
    assert!(size <= limits.max_frame_size, "accepted a frame of {size} bytes over the limit {}", limits.max_frame_size);
    assert!(!frame.control.is_empty(), "accepted an empty control part");
    assert!(frame.data.len() <= MAX_DATA_FRAMES as usize, "accepted {} data frames", frame.data.len());
    assert_eq!(frame.control.as_ptr() as usize % 16, 0, "control part not 16-byte aligned");
    // What was received can be sent again under the same limits...
    frame.check(limits).expect("an accepted frame fails Frame::check under the same limits");
    // ...and encodes back to exactly the bytes it came from.
    assert_eq!(encode_frame(frame), raw, "re-encoding differs from the input");
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
}

/// The real reader over the stream: the frames it accepts, and whether it
/// ended with an error (after them) or cleanly.
fn real_reader(stream: &[u8], limits: &Limits) -> (Vec<Frame>, bool) {
    let mut reader = rdask_transport::tcp::frame_reader_over(std::io::Cursor::new(stream.to_vec()), *limits);
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let mut frames = Vec::new();
            for _ in 0..16 {
                match reader.recv().await {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => return (frames, false),
                    Err(_) => return (frames, true),
                }
            }
            (frames, false)
        })
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, rest)) = input.split_first() else { return };
    let (max, mut stream) = match sel % 3 {
        0 => (DEFAULT_MAX_FRAME_SIZE, rest),
        1 => (MAX_HANDSHAKE_FRAME, rest),
        _ => {
            if rest.len() < 2 {
                return;
            }
            (u16::from_le_bytes([rest[0], rest[1]]) as u64, &rest[2..])
        }
    };
    let limits = Limits { max_frame_size: max, ..Limits::default() };
    let (real, real_failed) = real_reader(stream, &limits);
    let mut accepted = 0usize;
    // At most a few frames: each one is re-checked in full.
    for _ in 0..16 {
        let mirrored = tcp_like(stream, &limits);
        if stream.is_empty() {
            assert!(matches!(mirrored, Ok(None)));
            assert!(!real_failed && real.len() == accepted, "the real reader disagrees at a clean end");
            return;
        }
        match decode_frame(stream, &limits) {
            Ok(frame) => {
                let (same, taken) = match mirrored {
                    Ok(Some(f)) => f,
                    other => panic!("decode_frame accepted a frame the TCP steps refuse: {:?}", other.map(|o| o.map(|f| f.1))),
                };
                assert_eq!(taken as u64, frame.wire_size());
                assert_eq!(&same.control[..], &frame.control[..]);
                assert_eq!(same.data, frame.data);
                check_accepted(&frame, &stream[..taken], &limits);
                let r = real.get(accepted).expect("the real reader refused a frame decode_frame accepts");
                assert_eq!(&r.control[..], &frame.control[..], "the real reader read another control part");
                assert_eq!(r.data, frame.data, "the real reader read other data frames");
                accepted += 1;
                stream = &stream[taken..];
            }
            Err(_) => {
                assert!(mirrored.is_err(), "the TCP steps accepted a frame decode_frame refuses");
                assert!(real.len() == accepted && real_failed, "the real reader accepted a frame decode_frame refuses");
                return;
            }
        }
    }
});
