//! The versioned handshake: the first frame in each direction.
//!
//! Its control part has a fixed layout that never changes between protocol
//! versions (it is not an rkyv archive), so a peer speaking another version
//! still gets a readable refusal instead of a validation error.
//!
//! ```text
//! hello:  b"RDASK\0" | u16 version | u8 role | u8 0 | u16 token_len | token
//! reply:  b"RDASK\0" | u16 version | u8 status | u8 0 | u16 msg_len | message (UTF-8)
//! ```

use std::time::Duration;

use rkyv::util::AlignedVec;

use crate::backend::Connection;
use crate::error::{Result, TransportError};
use crate::frame::Frame;
use crate::protocol::PROTOCOL_VERSION;

pub const MAGIC: &[u8; 6] = b"RDASK\0";
const FIXED: usize = 12;
pub const MAX_TOKEN_LEN: usize = 1024;
/// The largest frame read while the peer is not authenticated: a hello or a
/// reply (header, fixed part, token or message) always fits. Without this cap
/// anyone who can connect could make the endpoint allocate a frame's worth
/// of memory (up to the 4 GiB limit) before the token is checked.
pub const MAX_HANDSHAKE_FRAME: u64 = 4096;
/// How long either side waits for the other's handshake frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections an endpoint lets wait in the handshake at once; more are
/// closed at once (see [`HandshakeGate`]).
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Who is connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Client = 1,
    Worker = 2,
    /// A worker or client fetching data from a worker.
    Peer = 3,
}

impl Role {
    fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Client),
            2 => Some(Role::Worker),
            3 => Some(Role::Peer),
            _ => None,
        }
    }
}

#[repr(u8)]
enum Status {
    Ok = 0,
    BadVersion = 1,
    BadToken = 2,
    BadRole = 3,
}

fn fixed_part(version: u16, byte: u8, text: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(FIXED + text.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&[byte, 0]);
    v.extend_from_slice(&(text.len() as u16).to_le_bytes());
    v.extend_from_slice(text);
    v
}

/// Parses either handshake frame into (version, role-or-status byte, text).
fn parse(frame: &Frame) -> Result<(u16, u8, &[u8])> {
    let b = &frame.control[..];
    if b.len() < FIXED || &b[..6] != MAGIC {
        return Err(TransportError::Handshake("peer is not an rdask endpoint (bad magic)".into()));
    }
    let version = u16::from_le_bytes([b[6], b[7]]);
    let len = u16::from_le_bytes([b[10], b[11]]) as usize;
    if b.len() != FIXED + len {
        return Err(TransportError::Handshake("handshake frame has a wrong length".into()));
    }
    Ok((version, b[8], &b[FIXED..]))
}

/// The peer's handshake frame, read with the frame size capped at
/// [`MAX_HANDSHAKE_FRAME`]; the connection's own limit is restored after.
async fn recv_with_timeout(conn: &mut Connection) -> Result<Frame> {
    let previous = conn.receiver.set_max_frame_size(MAX_HANDSHAKE_FRAME);
    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.receiver.recv()).await;
    if let Some(max) = previous {
        conn.receiver.set_max_frame_size(max);
    }
    match r {
        Err(_) => Err(TransportError::Timeout("no handshake from peer".into())),
        Ok(r) => r?.ok_or(TransportError::Closed),
    }
}

/// A token kept in a file (`--token-file`): its first line, without the
/// line end. An empty or unreadable file is an error naming the file.
pub fn token_from_file(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read token file {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim_end_matches('\r').to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("token file {} is empty", path.display())));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("token in {} is longer than {MAX_TOKEN_LEN} bytes", path.display()),
        ));
    }
    Ok(token)
}

/// Compares two secrets in time that depends on their lengths only, not on
/// where they first differ (so a remote peer cannot find the token byte by
/// byte by timing refusals).
pub fn tokens_equal(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as u64;
    }
    // Keeps the loop from being turned into an early exit.
    std::hint::black_box(diff) == 0
}

/// Bounds the connections waiting in the handshake. Accept loops take a
/// permit per connection; with none left the connection is closed at once,
/// so a flood of silent connections cannot pile up until they time out.
#[derive(Clone)]
pub struct HandshakeGate(std::sync::Arc<tokio::sync::Semaphore>);

impl HandshakeGate {
    pub fn new(max_pending: usize) -> Self {
        HandshakeGate(std::sync::Arc::new(tokio::sync::Semaphore::new(max_pending)))
    }

    /// A permit to hold until the handshake is over, or None when too many
    /// connections are in the handshake already.
    pub fn try_enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

impl Default for HandshakeGate {
    fn default() -> Self {
        HandshakeGate::new(MAX_PENDING_HANDSHAKES)
    }
}


/// Connecting side: announces `role`, waits for the verdict.
pub async fn handshake_connect(conn: &mut Connection, role: Role, token: Option<&str>) -> Result<()> {
    handshake_connect_as(conn, PROTOCOL_VERSION, role, token).await
}

#[doc(hidden)]
pub async fn handshake_connect_as(conn: &mut Connection, version: u16, role: Role, token: Option<&str>) -> Result<()> {
    let token = token.unwrap_or("").as_bytes();
    if token.len() > MAX_TOKEN_LEN {
        return Err(TransportError::Handshake(format!("token longer than {MAX_TOKEN_LEN} bytes")));
    }
    conn.sender.send(Frame::new(fixed_part(version, role as u8, token)))?;
    let reply = recv_with_timeout(conn).await?;
    let (their_version, status, msg) = parse(&reply)?;
    if status == Status::Ok as u8 {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(msg).into_owned();
    if status == Status::BadVersion as u8 {
        return Err(TransportError::VersionMismatch { ours: version, theirs: their_version });
    }
    if status == Status::BadToken as u8 {
        return Err(TransportError::Unauthorized(format!("{} refused the connection: {msg}", conn.peer)));
    }
    Err(TransportError::Handshake(format!("{} refused the connection: {msg}", conn.peer)))
}

/// Accepting side: checks version, role and token; answers either way.
/// `allowed` lists the roles this endpoint serves.
pub async fn handshake_accept(conn: &mut Connection, allowed: &[Role], token: Option<&str>) -> Result<Role> {
    let hello = recv_with_timeout(conn).await?;
    let (version, role, their_token) = parse(&hello)?;
    let refuse = |status: Status, msg: String| {
        let _ = conn.sender.send(Frame::new(fixed_part(PROTOCOL_VERSION, status as u8, msg.as_bytes())));
        msg
    };
    if version != PROTOCOL_VERSION {
        refuse(Status::BadVersion, format!("protocol version {version} not supported; this endpoint speaks {PROTOCOL_VERSION}"));
        return Err(TransportError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
    }
    let role = match Role::from_u8(role).filter(|r| allowed.contains(r)) {
        Some(r) => r,
        None => {
            let m = refuse(Status::BadRole, format!("role {role} is not served here"));
            return Err(TransportError::Handshake(m));
        }
    };
    if let Some(expected) = token {
        if !tokens_equal(expected.as_bytes(), their_token) {
            let m = refuse(Status::BadToken, "wrong or missing token".into());
            return Err(TransportError::Handshake(m));
        }
    }
    conn.sender.send(Frame::new(fixed_part(PROTOCOL_VERSION, Status::Ok as u8, b"")))?;
    Ok(role)
}
