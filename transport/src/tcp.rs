//! TCP backend (tokio). One writer task per connection drains the send queue
//! and writes everything queued with vectored I/O; the receiving side reads
//! frames directly from a buffered socket in the caller's task.

use std::io::IoSlice;

use bytes::BytesMut;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::backend::{host_port, Backend, BoxFuture, Connection, FrameRead, FrameSender, Listener};
use crate::error::{Result, TransportError};
use crate::bufpool;
use crate::frame::{check_lengths, split_bytes, split_data, FixedHeader, Frame, Limits, HEADER_LEN};

pub struct TcpBackend;

/// Pieces smaller than this are copied into the staging buffer rather than
/// given their own iovec: a copy of a few bytes is cheaper than a slice entry.
const COPY_BELOW: usize = 2048;
/// Stop coalescing queued frames into one write past this many bytes.
const MAX_COALESCE: usize = 8 << 20;
const IOV_MAX: usize = 1024;
const READ_BUFFER: usize = 256 << 10;
/// Receive buffers start at this size and at most double per step.
const GROW_STEP: usize = 1 << 20;

impl Backend for TcpBackend {
    fn scheme(&self) -> &'static str {
        "tcp"
    }

    fn listen<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Listener>> {
        Box::pin(async move {
            crate::tls::check_plain_allowed(addr)?;
            let (listener, bound, local) = bind(host_port(addr, "tcp")?).await?;
            let (tx, rx) = mpsc::channel(256);
            let closed = tx.clone();
            tokio::spawn(accept_loop(listener, async move { closed.closed().await }, move |stream, peer| {
                let tx = tx.clone();
                async move { tx.send(wrap(stream, peer, limits)).await.is_ok() }
            }));
            Ok(Listener::new(format!("tcp://{local}"), rx, None).bound_to(format!("tcp://{bound}")))
        })
    }

    fn connect<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Connection>> {
        Box::pin(async move {
            crate::tls::check_plain_allowed(addr)?;
            let stream = TcpStream::connect(host_port(addr, "tcp")?).await?;
            Ok(wrap(stream, addr.to_string(), limits))
        })
    }
}

/// Binds a listening socket: (listener, bound address, address to advertise).
pub(crate) async fn bind(host_port: &str) -> Result<(TcpListener, std::net::SocketAddr, std::net::SocketAddr)> {
    let listener = TcpListener::bind(host_port).await?;
    let bound = listener.local_addr()?;
    let mut local = bound;
    if local.ip().is_unspecified() {
        // Bound to all interfaces: advertise an address other hosts
        // can reach (a scheduler file on a shared file system is
        // read by workers on other nodes).
        local.set_ip(crate::netif::contact_ip());
    }
    Ok((listener, bound, local))
}

/// Accepts connections until `closed` completes (the `Listener` was
/// dropped: the port is let go at once) or `on_accept` returns false.
/// Accept errors (EMFILE and friends) are retried.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, closed: impl std::future::Future<Output = ()>, on_accept: F)
where
    F: Fn(TcpStream, String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut last_warning: Option<std::time::Instant> = None;
    tokio::pin!(closed);
    loop {
        let accepted = tokio::select! {
            _ = &mut closed => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if !on_accept(stream, peer.to_string()).await {
                    break;
                }
            }
            Err(e) => {
                // Keep serving the connections we have, retry shortly, and
                // say so once in a while.
                if last_warning.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(5)) {
                    tracing::warn!("accept failed (will retry): {e}");
                    last_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn wrap(stream: TcpStream, peer: String, limits: Limits) -> Connection {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    wrap_io(read, write, peer, limits)
}

/// The TCP backend's frame reader over any byte stream: what a socket's
/// receiving side runs, for the fuzzer to drive with arbitrary bytes.
#[doc(hidden)]
pub fn frame_reader_over<R: AsyncRead + Unpin + Send + 'static>(read: R, limits: Limits) -> Box<dyn FrameRead> {
    Box::new(TcpFrameReader { reader: BufReader::with_capacity(READ_BUFFER, read), limits })
}

/// A connection over any byte stream (a TCP socket, or TLS over one).
pub(crate) fn wrap_io<R, W>(read: R, write: W, peer: String, limits: Limits) -> Connection
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let peer_for_log = peer.clone();
    tokio::spawn(async move {
        if let Err(e) = writer_loop(write, rx).await {
            tracing::debug!(peer = %peer_for_log, "writer stopped: {e}");
        }
    });
    Connection {
        sender: FrameSender::new(tx, limits),
        receiver: Box::new(TcpFrameReader { reader: BufReader::with_capacity(READ_BUFFER, read), limits }),
        peer,
    }
}

async fn writer_loop<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::UnboundedReceiver<Frame>) -> std::io::Result<()> {
    let mut batch: Vec<Frame> = Vec::new();
    let mut staging: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut bytes = first.wire_size() as usize;
        batch.push(first);
        while bytes < MAX_COALESCE {
            match rx.try_recv() {
                Ok(f) => {
                    bytes += f.wire_size() as usize;
                    batch.push(f);
                }
                Err(_) => break,
            }
        }
        write_frames(&mut write, &batch, &mut staging).await?;
        batch.clear();
        // A write may leave bytes inside the stream (TLS keeps the records
        // of a partly accepted write in rustls's buffer): without a flush
        // they would wait for the next frame, and a peer waiting for the
        // end of this one would stall. On a plain socket this is a no-op.
        write.flush().await?;
    }
    let _ = write.shutdown().await;
    Ok(())
}

enum Piece<'a> {
    Staged(usize, usize),
    Borrowed(&'a [u8]),
}

/// Writes frames with as few syscalls as possible: small pieces (headers,
/// small control messages and values) are copied into `staging`, large ones
/// are written from their own buffers.
async fn write_frames<W: AsyncWrite + Unpin>(write: &mut W, frames: &[Frame], staging: &mut Vec<u8>) -> std::io::Result<()> {
    staging.clear();
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    let stage = |staging: &mut Vec<u8>, pieces: &mut Vec<Piece<'_>>, start: usize| {
        let end = staging.len();
        if end > start {
            match pieces.last_mut() {
                Some(Piece::Staged(_, e)) if *e == start => *e = end,
                _ => pieces.push(Piece::Staged(start, end)),
            }
        }
    };
    for frame in frames {
        let start = staging.len();
        frame.encode_header(staging);
        stage(staging, &mut pieces, start);
        for part in std::iter::once(&frame.control[..]).chain(frame.data.iter().map(|d| &d[..])) {
            if part.len() < COPY_BELOW {
                let start = staging.len();
                staging.extend_from_slice(part);
                stage(staging, &mut pieces, start);
            } else {
                pieces.push(Piece::Borrowed(part));
            }
        }
    }
    let mut slices: Vec<IoSlice<'_>> = pieces
        .iter()
        .map(|p| match p {
            Piece::Staged(s, e) => IoSlice::new(&staging[*s..*e]),
            Piece::Borrowed(b) => IoSlice::new(b),
        })
        .collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let upto = bufs.len().min(IOV_MAX);
        let n = write.write_vectored(&bufs[..upto]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

struct TcpFrameReader<R> {
    reader: BufReader<R>,
    limits: Limits,
}

impl<R: AsyncRead + Unpin + Send> TcpFrameReader<R> {
    async fn read_frame(&mut self) -> Result<Option<Frame>> {
        let mut fixed = [0u8; HEADER_LEN];
        // A clean close is only legal between frames.
        let first = self.reader.read(&mut fixed).await?;
        if first == 0 {
            return Ok(None);
        }
        if first < HEADER_LEN {
            self.read_exact(&mut fixed[first..], "frame header").await?;
        }
        let header = FixedHeader::parse(fixed, &self.limits)?;
        // Buffers grow with the bytes that actually arrive, never to a size a
        // header merely announces: a hostile peer must send what it claims.
        let mut lengths = Vec::with_capacity((header.n_data as usize).min(GROW_STEP / 8));
        let mut word = [0u8; 8];
        for _ in 0..header.n_data {
            self.read_exact(&mut word, "length table").await?;
            lengths.push(u64::from_le_bytes(word));
        }
        let total = check_lengths(&header, &lengths, &self.limits)?;
        let control_len = header.control_len as usize;
        let mut control = AlignedVec::with_capacity(control_len.min(GROW_STEP));
        while control.len() < control_len {
            let start = control.len();
            let step = (control_len - start).min(start.max(GROW_STEP));
            control.resize(start + step, 0);
            self.read_exact(&mut control[start..], "control message").await?;
        }
        let data_len = (total - (HEADER_LEN + 8 * lengths.len()) as u64 - header.control_len as u64) as usize;
        if data_len >= bufpool::POOL_MIN {
            // Large values land in reused memory when there is some. The
            // first step arrives before the full size is taken, so a header
            // alone commits no more than that.
            let mut first = Vec::with_capacity(GROW_STEP);
            self.read_data_into(&mut first, GROW_STEP, data_len).await?;
            let mut buf = bufpool::take(data_len, bufpool::advise_huge_pages_vec);
            buf.extend_from_slice(&first);
            drop(first);
            self.read_data_into(&mut buf, data_len, data_len).await?;
            return Ok(Some(Frame { control, data: split_bytes(bufpool::into_bytes(buf), &lengths), device: None }));
        }
        let mut data = BytesMut::with_capacity(data_len.min(GROW_STEP));
        while data.len() < data_len {
            let want = data_len - data.len();
            if data.capacity() == data.len() {
                // Once a first step of real bytes has arrived, the rest is
                // reserved at once: growing by doubling would copy the whole
                // value again and again. The reservation is address space
                // only; pages are committed as bytes land in them.
                data.reserve(want);
                bufpool::advise_huge_pages_spare(data.spare_capacity_mut());
            }
            let stall = self.limits.stall_timeout;
            let read = async { Ok((&mut self.reader).take(want as u64).read_buf(&mut data).await?) };
            let n = or_stall(stall, "data frames", read).await?;
            if n == 0 {
                return Err(TransportError::Malformed(format!(
                    "connection closed inside data frames ({} of {data_len} bytes)",
                    data.len()
                )));
            }
        }
        Ok(Some(Frame { control, data: split_data(data, &lengths), device: None }))
    }

    /// Reads data-frame bytes into `buf` until it holds `upto` (of a frame's
    /// `data_len`), into its spare capacity.
    async fn read_data_into(&mut self, buf: &mut Vec<u8>, upto: usize, data_len: usize) -> Result<()> {
        while buf.len() < upto {
            let want = upto - buf.len();
            let stall = self.limits.stall_timeout;
            let read = async { Ok((&mut self.reader).take(want as u64).read_buf(buf).await?) };
            if or_stall(stall, "data frames", read).await? == 0 {
                return Err(TransportError::Malformed(format!(
                    "connection closed inside data frames ({} of {data_len} bytes)",
                    buf.len()
                )));
            }
        }
        Ok(())
    }

    /// Reads bytes of a frame that has started (so under the stall timeout).
    async fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let read = async {
            match self.reader.read_exact(buf).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(TransportError::Malformed(format!("connection closed inside {what}")))
                }
                Err(e) => Err(e.into()),
            }
        };
        or_stall(self.limits.stall_timeout, what, read).await
    }
}

impl<R: AsyncRead + Unpin + Send> FrameRead for TcpFrameReader<R> {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>>> {
        Box::pin(self.read_frame())
    }

    fn set_max_frame_size(&mut self, max: u64) -> Option<u64> {
        Some(std::mem::replace(&mut self.limits.max_frame_size, max))
    }
}

/// `io` unless no byte arrives for `limit`: a frame that has started must
/// keep coming (`Limits::stall_timeout`).
async fn or_stall<T>(limit: std::time::Duration, what: &str, io: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, io).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout(format!("peer stopped sending inside {what} for {limit:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FromPeerMessage;

    /// A stream that keeps written bytes until it is flushed (as TLS keeps
    /// records that the socket did not take) must still deliver a frame that
    /// is followed by no other.
    #[tokio::test]
    async fn a_frame_left_in_a_buffering_stream_is_flushed() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_a_read, a_write) = tokio::io::split(a);
        let (b_read, b_write) = tokio::io::split(b);
        let sender = wrap_io(tokio::io::empty(), tokio::io::BufWriter::with_capacity(1 << 16, a_write), "a".into(), Limits::default());
        let mut receiver = wrap_io(b_read, b_write, "b".into(), Limits::default());
        let msg = FromPeerMessage::Data { request_id: 1, items: vec![], more: false };
        sender.sender.send(Frame::with_data(&msg, vec![bytes::Bytes::from_static(b"tail")])).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), receiver.receiver.recv()).await;
        let frame = got.expect("the frame stayed in the writer's buffer").unwrap().unwrap();
        assert_eq!(&frame.data[0][..], b"tail");
    }
}
