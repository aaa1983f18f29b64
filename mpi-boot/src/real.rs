//! The MPI calls, through rsmpi. The universe lives in a process-wide slot
//! owned by the thread that called `init`; MPI_Finalize runs in `finalize`.

use std::sync::Mutex;

use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Root;
use mpi::Threading;

use super::{MpiError, World};

/// Tag of the client's "done" message to rank 0.
const DONE_TAG: i32 = 7311;

struct State {
    universe: Option<mpi::environment::Universe>,
}

// SAFETY: the universe is only used from the thread that initialised MPI
// (MPI_THREAD_FUNNELED); the mutex only guards the slot itself.
unsafe impl Send for State {}

static STATE: Mutex<State> = Mutex::new(State { universe: None });

fn world() -> Result<SimpleCommunicator, MpiError> {
    let st = STATE.lock().unwrap();
    st.universe.as_ref().map(|u| u.world()).ok_or(MpiError::NotInitialised)
}

pub fn init() -> Result<World, MpiError> {
    let mut st = STATE.lock().unwrap();
    if st.universe.is_some() {
        return Err(MpiError::AlreadyInitialised);
    }
    let (universe, given) = mpi::initialize_with_threading(Threading::Funneled).ok_or(MpiError::AlreadyInitialised)?;
    if given < Threading::Funneled {
        return Err(MpiError::ThreadLevel { given: format!("{given:?}"), needed: "Funneled".into() });
    }
    let w = universe.world();
    let world = World { rank: w.rank(), size: w.size() };
    tracing::debug!(rank = world.rank, size = world.size, threading = ?given, "MPI initialised");
    st.universe = Some(universe);
    Ok(world)
}

/// Rank 0 passes `Some(value)`, every other rank `None`; all return rank
/// 0's value (the scheduler address).
pub fn broadcast(value: Option<&str>) -> Result<String, MpiError> {
    let w = world()?;
    let root = w.process_at_rank(0);
    let mut len: u64 = value.map_or(0, |v| v.len() as u64);
    root.broadcast_into(&mut len);
    let mut buf = value.map(|v| v.as_bytes().to_vec()).unwrap_or_else(|| vec![0u8; len as usize]);
    buf.resize(len as usize, 0);
    root.broadcast_into(&mut buf[..]);
    String::from_utf8(buf).map_err(|e| MpiError::Other(format!("broadcast value is not UTF-8: {e}")))
}

/// The client rank tells rank 0 that the script ended, with its exit code.
pub fn send_done(code: i32) -> Result<(), MpiError> {
    world()?.process_at_rank(0).send_with_tag(&code, DONE_TAG);
    Ok(())
}

/// Rank 0: the client's exit code if its "done" has arrived (does not block).
pub fn recv_done() -> Result<Option<i32>, MpiError> {
    let w = world()?;
    let from = w.any_process();
    match from.immediate_matched_probe_with_tag(DONE_TAG) {
        Some((msg, _status)) => {
            let (code, _) = msg.matched_receive::<i32>();
            Ok(Some(code))
        }
        None => Ok(None),
    }
}

/// Ends the whole job at once (every rank), with `code`.
pub fn abort(code: i32) -> ! {
    match world() {
        Ok(w) => w.abort(code),
        Err(_) => std::process::exit(code),
    }
}

/// MPI_Finalize (dropping the universe). A rank that exits without it is
/// seen by mpirun as having failed.
pub fn finalize() -> Result<(), MpiError> {
    let mut st = STATE.lock().unwrap();
    match st.universe.take() {
        Some(u) => {
            drop(u);
            Ok(())
        }
        None => Err(MpiError::NotInitialised),
    }
}
