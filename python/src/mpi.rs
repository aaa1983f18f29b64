//! MPI start-up for `rdask.mpi` (the `mpi-boot` crate). Every call is made
//! from the Python thread that initialised MPI (MPI_THREAD_FUNNELED).

use pyo3::prelude::*;

use crate::RdaskError;

fn err(e: rdask_mpi_boot::MpiError) -> PyErr {
    RdaskError::new_err(e.to_string())
}

/// Whether this build has MPI.
#[pyfunction]
pub fn mpi_built() -> bool {
    cfg!(feature = "mpi")
}

/// Whether mpirun/srun started this process.
#[pyfunction]
pub fn mpi_launched() -> bool {
    rdask_mpi_boot::launched_by_mpi()
}

/// MPI_Init_thread (FUNNELED, checked); returns (rank, size).
#[pyfunction]
pub fn mpi_init() -> PyResult<(i32, i32)> {
    rdask_mpi_boot::init().map(|w| (w.rank, w.size)).map_err(err)
}

/// Rank 0 gives `value`; every rank gets it back.
#[pyfunction]
#[pyo3(signature = (value=None))]
pub fn mpi_broadcast(py: Python<'_>, value: Option<String>) -> PyResult<String> {
    // Waiting for rank 0 may take a while: other Python threads run meanwhile.
    py.detach(|| rdask_mpi_boot::broadcast(value.as_deref())).map_err(err)
}

#[pyfunction]
pub fn mpi_send_done(code: i32) -> PyResult<()> {
    rdask_mpi_boot::send_done(code).map_err(err)
}

/// The client's exit code once it has said it is done; None before.
#[pyfunction]
pub fn mpi_recv_done() -> PyResult<Option<i32>> {
    rdask_mpi_boot::recv_done().map_err(err)
}

#[pyfunction]
pub fn mpi_finalize(py: Python<'_>) -> PyResult<()> {
    py.detach(rdask_mpi_boot::finalize).map_err(err)
}

/// Ends every rank of the job with `code`.
#[pyfunction]
pub fn mpi_abort(code: i32) {
    rdask_mpi_boot::abort(code)
}
