use thiserror::Error;

/// Everything that can go wrong below the scheduler/worker logic.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {size} bytes exceeds the maximum frame size of {max} bytes")]
    FrameTooLarge { size: u64, max: u64 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("message failed validation: {0}")]
    Invalid(String),
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The peer refused our token (wrong or missing).
    #[error("TLS: {0}")]
    Tls(String),
    #[error("not authorised: {0}")]
    Unauthorized(String),
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("connection closed by peer")]
    Closed,
    #[error("unknown transport scheme in address {0:?} (expected tcp://host:port, tls://host:port, ucx://host:port or inproc://name)")]
    UnknownScheme(String),
    #[error("invalid address {0:?}: {1}")]
    InvalidAddress(String, String),
    #[error("timed out: {0}")]
    Timeout(String),
}

pub type Result<T, E = TransportError> = std::result::Result<T, E>;
