//! In-process backend: connections are channel pairs inside one process.
//! Frames still carry encoded archives, so everything a TCP peer would
//! validate is validated here too. Used by tests and single-process clusters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::sync::mpsc;

use crate::backend::{split_scheme, Backend, BoxFuture, Connection, FrameRead, FrameSender, Listener};
use crate::error::{Result, TransportError};
use crate::frame::{Frame, Limits};

pub struct InProcBackend;

type Registry = Mutex<HashMap<String, mpsc::Sender<Connection>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Removes the listener's name when the listener is dropped.
struct Unregister(String);

impl Drop for Unregister {
    fn drop(&mut self) {
        registry().lock().unwrap().remove(&self.0);
    }
}

struct ChannelReader(mpsc::UnboundedReceiver<Frame>);

impl FrameRead for ChannelReader {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>>> {
        Box::pin(async move { Ok(self.0.recv().await) })
    }
}

/// A connected pair of in-process connections.
pub fn pair(a_name: &str, b_name: &str, limits: Limits) -> (Connection, Connection) {
    let (a_tx, b_rx) = mpsc::unbounded_channel();
    let (b_tx, a_rx) = mpsc::unbounded_channel();
    (
        Connection {
            sender: FrameSender::new(a_tx, limits),
            receiver: Box::new(ChannelReader(a_rx)),
            peer: b_name.to_string(),
        },
        Connection {
            sender: FrameSender::new(b_tx, limits),
            receiver: Box::new(ChannelReader(b_rx)),
            peer: a_name.to_string(),
        },
    )
}

impl Backend for InProcBackend {
    fn scheme(&self) -> &'static str {
        "inproc"
    }

    fn listen<'a>(&'a self, addr: &'a str, _limits: Limits) -> BoxFuture<'a, Result<Listener>> {
        Box::pin(async move {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let (_, name) = split_scheme(addr);
            let name = if name.is_empty() {
                format!("auto-{}", NEXT.fetch_add(1, Ordering::Relaxed))
            } else {
                name.to_string()
            };
            let (tx, rx) = mpsc::channel(1024);
            let mut reg = registry().lock().unwrap();
            if reg.contains_key(&name) {
                return Err(TransportError::InvalidAddress(addr.to_string(), "name already in use".into()));
            }
            reg.insert(name.clone(), tx);
            Ok(Listener::new(format!("inproc://{name}"), rx, Some(Box::new(Unregister(name)))))
        })
    }

    fn connect<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Connection>> {
        Box::pin(async move {
            let (_, name) = split_scheme(addr);
            let accept = registry().lock().unwrap().get(name).cloned();
            let accept = accept.ok_or_else(|| {
                TransportError::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("no in-process listener named {name:?}"),
                ))
            })?;
            let (ours, theirs) = pair("inproc-client", addr, limits);
            accept.send(theirs).await.map_err(|_| TransportError::Closed)?;
            Ok(ours)
        })
    }
}
