//! rdask transport: the wire protocol, framing, handshake and the pluggable
//! transport backends (TCP always; in-process for tests; UCX and MPI behind
//! cargo features).

pub mod backend;
pub mod bufpool;
pub mod device;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod inproc;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod netif;
pub mod peer;
pub mod protocol;
pub mod tcp;
pub mod tls;
#[cfg(all(feature = "ucx", ucx_bindings))]
pub mod ucx;
pub mod warn_limit;

pub use backend::{choose_scheme, connect, listen, ucx_memory_kinds, ucx_status, Backend, Connection, FrameRead, FrameSender, Listener};
pub use error::{Result, TransportError};
pub use frame::{Frame, Limits};
pub use handshake::{handshake_accept, handshake_connect, Role};
pub use ids::{ClientId, TaskId, WorkerId};
pub use protocol::WireMessage;

/// Re-exported so dependants use the same rkyv as the protocol.
pub use rkyv;
pub use bytes;

/// Raises this process's open-file limit to its hard limit: a scheduler with
/// a thousand workers, or a process hosting hundreds of workers, needs more
/// sockets than the usual soft limit of 1024. Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid out-pointer have no other preconditions.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur as u64;
            }
        }
    }
    lim.rlim_cur as u64
}
