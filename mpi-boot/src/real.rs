//! The MPI calls: all of them run on the transport's MPI engine thread
//! (`rdask_transport::mpi`), which owns MPI in this process, so the start-up
//! and `mpi://` connections share one MPI_Init.

use rdask_transport::mpi as engine;

use super::{MpiError, World};

fn other(e: rdask_transport::TransportError) -> MpiError {
    MpiError::Other(e.to_string())
}

pub fn init() -> Result<World, MpiError> {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(MpiError::AlreadyInitialised);
    }
    let w = engine::start().map_err(|e| match e {
        rdask_transport::TransportError::Handshake(m) if m.contains("thread level") => {
            MpiError::ThreadLevel { given: m, needed: "Funneled".into() }
        }
        e => other(e),
    })?;
    tracing::debug!(rank = w.rank, size = w.size, "MPI initialised");
    Ok(World { rank: w.rank, size: w.size })
}

/// Rank 0 passes `Some(value)`, every other rank `None`; all return rank
/// 0's value (the scheduler address).
pub fn broadcast(value: Option<&str>) -> Result<String, MpiError> {
    engine::broadcast(value).map_err(other)
}

/// The client rank tells rank 0 that the script ended.
pub fn send_done(code: i32) -> Result<(), MpiError> {
    engine::send_done(code).map_err(other)
}

/// Rank 0: the client's exit code if its "done" has arrived (does not block).
pub fn recv_done() -> Result<Option<i32>, MpiError> {
    engine::take_done().map_err(other)
}

/// Ends the whole job at once (every rank), with `code`.
pub fn abort(code: i32) -> ! {
    engine::abort(code)
}

/// MPI_Finalize. A rank that exits without it is seen by mpirun as failed.
pub fn finalize() -> Result<(), MpiError> {
    engine::finalize().map_err(other)
}
