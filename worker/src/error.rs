use thiserror::Error;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Transport(#[from] rdask_transport::TransportError),
    #[error("cannot reach scheduler at {address}: {source}")]
    Connect { address: String, source: rdask_transport::TransportError },
    #[error("scheduler refused this worker: {0}")]
    Refused(String),
    #[error("unexpected message from scheduler: {0}")]
    Protocol(String),
    #[error("bad worker configuration: {0}")]
    Config(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
