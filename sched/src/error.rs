use thiserror::Error;

/// Errors the scheduler reports to the peer that caused them. None of them
/// stops the scheduler.
#[derive(Debug, Error)]
pub enum SchedError {
    #[error(transparent)]
    Transport(#[from] rdask_transport::TransportError),
    #[error("submit rejected: {0}")]
    Rejected(String),
    #[error("{0}")]
    BadMessage(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
