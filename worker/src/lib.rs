//! rdask worker runtime.

pub mod config_parse;
pub mod device_tier;
pub mod error;
pub mod executor;
pub mod memory;
pub mod peer_server;
pub mod procinfo;
pub mod runqueue;
pub mod runtime;
pub mod spill;
pub mod store;
pub mod topology;

pub use error::WorkerError;
pub use executor::{Executor, NullExecutor, NullTask, TaskFailure, TaskRun, Value};
pub use runtime::{run_worker, run_worker_until, WorkerConfig};
