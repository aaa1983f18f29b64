//! rdask transport: the wire protocol, framing, handshake and the pluggable
//! transport backends (TCP always; in-process for tests; UCX and MPI behind
//! cargo features in later work).

pub mod backend;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod ids;
pub mod inproc;
pub mod peer;
pub mod protocol;
pub mod tcp;

pub use backend::{connect, listen, Backend, Connection, FrameRead, FrameSender, Listener};
pub use error::{Result, TransportError};
pub use frame::{Frame, Limits};
pub use handshake::{handshake_accept, handshake_connect, Role};
pub use ids::{ClientId, TaskId, WorkerId};
pub use protocol::WireMessage;

/// Re-exported so dependants use the same rkyv as the protocol.
pub use rkyv;
pub use bytes;
