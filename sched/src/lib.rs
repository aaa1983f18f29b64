//! rdask scheduler: a pure core (`core`), its outbox (`comm`) and a thin
//! tokio reactor (`reactor`) that connects it to the network.

pub mod alloc;
pub mod comm;
pub mod core;
pub mod dashboard;
pub mod error;
pub mod reactor;

pub use crate::comm::{Comm, CommSink};
pub use crate::core::{Core, CoreConfig};
pub use crate::error::SchedError;
