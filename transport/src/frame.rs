//! A frame is one control message plus any number of raw data frames.
//!
//! Wire layout (all integers little-endian), see docs/protocol.md:
//!
//! ```text
//! u32 control_len | u32 n_data | n_data × u64 data_len | control bytes | data bytes...
//! ```
//!
//! The data frames are written with vectored I/O straight from the caller's
//! buffers and read into one contiguous buffer that is then split, so a value
//! is never copied into or out of the control archive.

use bytes::{Bytes, BytesMut};
use rkyv::util::AlignedVec;

use crate::error::{Result, TransportError};
use crate::protocol::WireMessage;

/// Default maximum size of one frame (control + all data): 4 GiB.
pub const DEFAULT_MAX_FRAME_SIZE: u64 = 4 << 30;
/// Upper bound on data frames in one frame, so a hostile header cannot make
/// us allocate a huge length table.
pub const MAX_DATA_FRAMES: u32 = 1 << 24;
/// Fixed part of the frame header.
pub const HEADER_LEN: usize = 8;

/// Default time a frame may stall half-received (no byte arriving) before
/// the connection is dropped.
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Limits a connection enforces on what it receives and sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame_size: u64,
    /// Once a frame has started to arrive, the rest must keep coming: a read
    /// that waits longer than this for the next bytes fails the connection,
    /// so a peer cannot pin a half-sent frame's buffer forever. Idle time
    /// between frames is not limited.
    pub stall_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_frame_size: DEFAULT_MAX_FRAME_SIZE, stall_timeout: DEFAULT_STALL_TIMEOUT }
    }
}

/// One unit of transfer: a control archive and its data frames.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    /// rkyv archive (or the fixed-layout handshake). 16-byte aligned so it can
    /// be read in place.
    pub control: AlignedVec,
    pub data: Vec<Bytes>,
    /// A payload in device memory, after the data frames (only on
    /// connections that carry it: `FrameSender::carries`).
    pub device: Option<crate::device::DevicePayload>,
}

impl Frame {
    pub fn new(control: AlignedVec) -> Self {
        Frame { control, data: Vec::new(), device: None }
    }

    pub fn from_message<M: WireMessage>(msg: &M) -> Self {
        Frame::new(msg.encode())
    }

    pub fn with_data<M: WireMessage>(msg: &M, data: Vec<Bytes>) -> Self {
        Frame { control: msg.encode(), data, device: None }
    }

    /// Validates the control part as `M` and returns an in-place view.
    pub fn access<M: WireMessage>(&self) -> Result<&M::Archived> {
        M::access(&self.control)
    }

    /// Data frame `idx`, or a validation error naming the bad index.
    pub fn data_frame(&self, idx: u32) -> Result<&Bytes> {
        self.data.get(idx as usize).ok_or_else(|| {
            TransportError::Invalid(format!("data frame index {idx} out of range (frame has {})", self.data.len()))
        })
    }

    /// Total payload size as it will appear on the wire (a device payload
    /// included).
    pub fn wire_size(&self) -> u64 {
        self.host_size() + self.device.as_ref().map_or(0, |d| d.len() as u64)
    }

    /// The size of the host part: header, length table, control, data frames.
    pub fn host_size(&self) -> u64 {
        (HEADER_LEN + 8 * self.data.len() + self.control.len()) as u64
            + self.data.iter().map(|d| d.len() as u64).sum::<u64>()
    }

    /// Checks the frame against `limits` before it is sent, so an oversized
    /// frame fails at the sender with a clear error instead of killing the link.
    pub fn check(&self, limits: &Limits) -> Result<()> {
        let size = self.wire_size();
        if size > limits.max_frame_size {
            return Err(TransportError::FrameTooLarge { size, max: limits.max_frame_size });
        }
        if self.data.len() as u64 > MAX_DATA_FRAMES as u64 {
            return Err(TransportError::Malformed(format!("{} data frames exceed the limit of {MAX_DATA_FRAMES}", self.data.len())));
        }
        if self.control.len() as u64 > u32::MAX as u64 {
            return Err(TransportError::FrameTooLarge { size, max: u32::MAX as u64 });
        }
        Ok(())
    }

    /// The header bytes (fixed part + data length table).
    pub fn encode_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.control.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        for d in &self.data {
            out.extend_from_slice(&(d.len() as u64).to_le_bytes());
        }
    }
}

/// The parsed fixed header.
#[derive(Debug, Clone, Copy)]
pub struct FixedHeader {
    pub control_len: u32,
    pub n_data: u32,
}

impl FixedHeader {
    pub fn parse(bytes: [u8; HEADER_LEN], limits: &Limits) -> Result<Self> {
        let control_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        let n_data = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        if control_len == 0 {
            return Err(TransportError::Malformed("empty control message".into()));
        }
        if control_len as u64 > limits.max_frame_size {
            return Err(TransportError::FrameTooLarge { size: control_len as u64, max: limits.max_frame_size });
        }
        if n_data > MAX_DATA_FRAMES {
            return Err(TransportError::Malformed(format!("{n_data} data frames exceed the limit of {MAX_DATA_FRAMES}")));
        }
        // The length table counts too: it is read before the lengths can be
        // checked, so it must fit the limit on its own.
        let fixed = (HEADER_LEN as u64) + 8 * n_data as u64 + control_len as u64;
        if fixed > limits.max_frame_size {
            return Err(TransportError::FrameTooLarge { size: fixed, max: limits.max_frame_size });
        }
        Ok(FixedHeader { control_len, n_data })
    }
}

/// Checks the data length table and returns the total frame size.
pub fn check_lengths(header: &FixedHeader, lengths: &[u64], limits: &Limits) -> Result<u64> {
    let mut total = (HEADER_LEN + 8 * lengths.len()) as u64 + header.control_len as u64;
    for &l in lengths {
        total = total.checked_add(l).ok_or_else(|| TransportError::Malformed("data lengths overflow".into()))?;
    }
    if total > limits.max_frame_size {
        return Err(TransportError::FrameTooLarge { size: total, max: limits.max_frame_size });
    }
    Ok(total)
}

/// Splits one contiguous buffer holding all data frames into frames, without copying.
pub fn split_data(buf: BytesMut, lengths: &[u64]) -> Vec<Bytes> {
    split_bytes(buf.freeze(), lengths)
}

/// The data frames of one buffer, each a view into it (no copies).
pub fn split_bytes(mut buf: Bytes, lengths: &[u64]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(lengths.len());
    for &l in lengths {
        out.push(buf.split_to(l as usize));
    }
    out
}

/// Decodes a whole frame from a byte slice (used by tests and fuzzing of the
/// framing; the TCP reader parses incrementally instead).
pub fn decode_frame(bytes: &[u8], limits: &Limits) -> Result<Frame> {
    if bytes.len() < HEADER_LEN {
        return Err(TransportError::Malformed(format!("truncated header: {} bytes", bytes.len())));
    }
    let header = FixedHeader::parse(bytes[..HEADER_LEN].try_into().unwrap(), limits)?;
    let table_end = HEADER_LEN + 8 * header.n_data as usize;
    if bytes.len() < table_end {
        return Err(TransportError::Malformed("truncated length table".into()));
    }
    let lengths: Vec<u64> = bytes[HEADER_LEN..table_end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let total = check_lengths(&header, &lengths, limits)?;
    if (bytes.len() as u64) < total {
        return Err(TransportError::Malformed(format!("truncated frame: {} of {total} bytes", bytes.len())));
    }
    let control_end = table_end + header.control_len as usize;
    let mut control = AlignedVec::with_capacity(header.control_len as usize);
    control.extend_from_slice(&bytes[table_end..control_end]);
    let data = split_data(BytesMut::from(&bytes[control_end..total as usize]), &lengths);
    Ok(Frame { control, data, device: None })
}

/// Encodes a whole frame into one buffer (tests; the TCP writer uses vectored I/O).
pub fn encode_frame(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.host_size() as usize);
    frame.encode_header(&mut out);
    out.extend_from_slice(&frame.control);
    for d in &frame.data {
        out.extend_from_slice(d);
    }
    out
}
