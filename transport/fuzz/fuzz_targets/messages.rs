//! Validation of every archived control message type.
//!
//! Byte 0 picks one of the `WireMessage` types of protocol.rs; the rest is
//! copied into an `AlignedVec` (16-byte aligned, as `Frame::control` is when
//! a reader receives it) and handed to that type's validating `access`, as a
//! receiver does. When validation passes, the archive is deserialised in full
//! (every field is read), `decode` must agree, and the owned value must
//! survive an encode / access / deserialise round trip unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rdask_transport::protocol::{
    FromClientMessage, FromPeerMessage, FromWorkerMessage, ToClientMessage, ToPeerMessage, ToWorkerMessage,
};
use rdask_transport::rkyv::{self, rancor, util::AlignedVec};
use rdask_transport::WireMessage;

macro_rules! check_type {
    ($ty:ty, $bytes:expr) => {{
        let bytes: &[u8] = $bytes;
        match <$ty as WireMessage>::access(bytes) {
            Ok(archived) => {
                let value: $ty = rkyv::deserialize::<$ty, rancor::Error>(archived)
                    .expect(concat!("a validated ", stringify!($ty), " failed to deserialise"));
                let decoded = <$ty as WireMessage>::decode(bytes).expect("decode refuses what access accepted");
                // Compared through their encodings: f64/f32 fields may hold NaN.
                let encoded = value.encode();
                assert_eq!(&encoded[..], &decoded.encode()[..], "decode and access+deserialise differ");
                let again = <$ty as WireMessage>::decode(&encoded).expect("a re-encoded message fails validation");
                assert_eq!(&encoded[..], &again.encode()[..], "round trip changed the message");
                // Debug walks every field once more (strings, options, nested vectors).
                std::hint::black_box(format!("{value:?}"));
            }
            Err(e) => {
                assert!(<$ty as WireMessage>::decode(bytes).is_err(), "decode accepts what access refused: {e}");
            }
        }
    }};
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, rest)) = input.split_first() else { return };
    let mut control = AlignedVec::<16>::with_capacity(rest.len());
    control.extend_from_slice(rest);
    match sel % 6 {
        0 => check_type!(FromClientMessage, &control),
        1 => check_type!(ToClientMessage, &control),
        2 => check_type!(FromWorkerMessage, &control),
        3 => check_type!(ToWorkerMessage, &control),
        4 => check_type!(ToPeerMessage, &control),
        _ => check_type!(FromPeerMessage, &control),
    }
});
