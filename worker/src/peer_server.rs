//! Serves this worker's values to peers and clients.

use std::sync::Arc;

use rdask_transport::bytes::Bytes;
use rdask_transport::handshake::{handshake_accept, HandshakeGate, Role};
use rdask_transport::warn_limit::WarnLimiter;
use rdask_transport::protocol::{ArchivedToPeerMessage, DataItem, FromPeerMessage, ToPeerMessage, WireMessage};
use rdask_transport::{Connection, Frame, Listener};

use crate::store::Store;

/// Accepts peers until dropped or aborted. Connection tasks live in a
/// `JoinSet` owned by this future, so stopping the server also stops every
/// connection it serves (a stopped worker must not keep serving values).
/// `sent` counts the value bytes served (for the heartbeat's transfer rate).
pub async fn serve_peers(mut listener: Listener, store: Arc<Store>, token: Option<String>, sent: Arc<std::sync::atomic::AtomicU64>) {
    let token = Arc::new(token);
    let gate = HandshakeGate::default();
    let mut connections = tokio::task::JoinSet::new();
    while let Some(conn) = listener.accept().await {
        // Reap finished connection tasks so the set does not grow forever.
        while connections.try_join_next().is_some() {}
        let Some(permit) = gate.try_enter() else {
            if let Some(held_back) = PEER_WARNINGS.allow() {
                tracing::warn!(peer = %conn.peer, held_back, "too many peer connections in the handshake; closing this one");
            }
            continue;
        };
        let store = store.clone();
        let token = token.clone();
        let sent = sent.clone();
        connections.spawn(async move {
            let peer = conn.peer.clone();
            if let Err(e) = serve_one(conn, store, token.as_deref(), permit, sent).await {
                tracing::debug!(%peer, "peer connection ended: {e}");
            }
        });
    }
}

static PEER_WARNINGS: WarnLimiter = WarnLimiter::new(std::time::Duration::from_secs(5));

async fn serve_one(
    mut conn: Connection,
    store: Arc<Store>,
    token: Option<&str>,
    permit: tokio::sync::OwnedSemaphorePermit,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> rdask_transport::Result<()> {
    handshake_accept(&mut conn, &[Role::Peer], token).await?;
    drop(permit);
    while let Some(frame) = conn.receiver.recv().await? {
        let ArchivedToPeerMessage::Fetch { request_id, tasks } = ToPeerMessage::access(&frame.control)?;
        let values = store.get_many(tasks.iter().map(|t| t.get()));
        let mut items = Vec::with_capacity(values.len());
        let mut data: Vec<Bytes> = Vec::with_capacity(values.len());
        for (t, v) in tasks.iter().zip(values) {
            let id = t.get();
            let first = data.len() as u32;
            let frames = match v.map(|v| v.to_frames()) {
                Some(Ok(frames)) => frames,
                Some(Err(e)) => {
                    // The requester fails the tasks that needed it with this
                    // error; the value itself stays (another reader may be a
                    // task on this worker, which needs no serialising).
                    tracing::warn!(task = %id, "cannot serialise value for a peer: {}", e.message);
                    let count = u32::from(!e.payload.is_empty());
                    if count == 1 {
                        data.push(e.payload);
                    }
                    items.push(DataItem { id, found: true, first, count, error: Some(e.message) });
                    continue;
                }
                None => {
                    items.push(DataItem { id, found: false, first: 0, count: 0, error: None });
                    continue;
                }
            };
            items.push(DataItem { id, found: true, first, count: frames.len() as u32, error: None });
            data.extend(frames);
        }
        let reply = FromPeerMessage::Data { request_id: request_id.to_native(), items };
        let bytes: u64 = data.iter().map(|d| d.len() as u64).sum();
        sent.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        conn.sender.send(Frame::with_data(&reply, data))?;
    }
    Ok(())
}
