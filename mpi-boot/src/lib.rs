//! rdask on an MPI job (`mpirun -np N rdask-mpi`, `rdask.mpi.initialize()`):
//! MPI start-up, each rank's role, the scheduler address sent from rank 0 to
//! every rank, and the client's "done, with this exit code" message to rank
//! 0. MPI carries only this bootstrap; rdask's own traffic goes over its
//! transport (TCP by default).
//!
//! MPI is owned by one engine thread (`rdask_transport::mpi`, which also
//! carries `mpi://` connections): it called MPI_Init_thread (FUNNELED, checked)
//! and makes every MPI call, fed by a channel. Nothing forks after MPI_Init
//! (a rank's worker runs in the rank's own process).

#[cfg(feature = "mpi")]
mod real;

/// Why an MPI call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MpiError {
    #[error("this rdask was built without MPI (cargo feature `mpi`); rebuild it with MPI to run under mpirun")]
    NotBuilt,
    #[error("MPI is already initialised in this process")]
    AlreadyInitialised,
    #[error("MPI was not initialised (call init first)")]
    NotInitialised,
    #[error("MPI gave thread level {given} but rdask needs at least {needed}")]
    ThreadLevel { given: String, needed: String },
    #[error("MPI: {0}")]
    Other(String),
}

/// This rank's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: i32,
    pub size: i32,
}

/// What a rank does in `rdask.mpi.initialize()` (dask-mpi's convention):
/// rank 0 the scheduler, rank 1 the client script, the others workers. In
/// the command form (`mpirun rdask-mpi`) there is no client rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Scheduler,
    Client,
    Worker,
}

pub fn role(rank: i32, with_client: bool) -> Role {
    match rank {
        0 => Role::Scheduler,
        1 if with_client => Role::Client,
        _ => Role::Worker,
    }
}

/// Whether this process was started by an MPI launcher (so `init` makes
/// sense), judged from the variables mpirun/srun set.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID", "SLURM_PROCID"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

#[cfg(feature = "mpi")]
pub use real::{abort, broadcast, finalize, init, recv_done, send_done};

#[cfg(not(feature = "mpi"))]
mod absent {
    use super::{MpiError, World};

    pub fn init() -> Result<World, MpiError> {
        Err(MpiError::NotBuilt)
    }
    pub fn broadcast(_value: Option<&str>) -> Result<String, MpiError> {
        Err(MpiError::NotBuilt)
    }
    pub fn send_done(_code: i32) -> Result<(), MpiError> {
        Err(MpiError::NotBuilt)
    }
    pub fn recv_done() -> Result<Option<i32>, MpiError> {
        Err(MpiError::NotBuilt)
    }
    pub fn abort(_code: i32) -> ! {
        std::process::exit(_code)
    }
    pub fn finalize() -> Result<(), MpiError> {
        Err(MpiError::NotBuilt)
    }
}
#[cfg(not(feature = "mpi"))]
pub use absent::{abort, broadcast, finalize, init, recv_done, send_done};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_dask_mpi() {
        assert_eq!(role(0, true), Role::Scheduler);
        assert_eq!(role(1, true), Role::Client);
        assert_eq!(role(2, true), Role::Worker);
        assert_eq!(role(1, false), Role::Worker);
        assert_eq!(role(0, false), Role::Scheduler);
    }
}
