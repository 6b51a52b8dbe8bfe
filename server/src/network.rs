//! Sockets: one listener per shard on the same port (SO_REUSEPORT, the kernel spreads new
//! connections), each connection served on the shard that accepted it, inside that shard's
//! io_uring runtime. Requests of one connection are answered in order; produce appends are queued
//! in order while earlier responses are still being awaited (pipelining, up to
//! `connection_pipeline_depth` requests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};
use futures::future::Either;
use kafka_protocol::messages::ApiKey;
use socket2::{Domain, Socket, Type};

use crate::broker::{Broker, ResponseFuture};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::protocol::{self, FrameError, Request};

/// Requests read ahead of the response being written, per connection (librdkafka and the Java
/// client keep up to 5 in flight; admin clients more).
const connection_pipeline_depth: usize = 32;
/// A request body is read into a buffer grown by at most this much at a time, so a client that
/// announces a large frame and sends nothing does not pin that much memory.
const read_step_bytes: usize = 1024 * 1024;
/// Requests read while more bytes are already waiting are handed to the broker together, up to
/// this many bytes or requests.
const hold_bytes_max: usize = 4 * 1024 * 1024;
const hold_requests_max: usize = 16;
/// How long held requests wait for the rest of one already arriving.
const hold_wait_max: std::time::Duration = std::time::Duration::from_millis(1);
/// Responses gathered into one socket write at most.
const write_frames_max: usize = 256;
/// Pieces per writev at most (Linux's IOV_MAX is 1024).
const iovecs_max: usize = 1024;
/// A connection's read buffer while a large request arrives: one read takes up to this much of
/// what the socket holds (the rest of the request and those pipelined behind it).
const read_buffer_bytes: usize = 128 * 1024;
/// Between requests: what an idle connection's read buffer holds (10,000 idle connections pin
/// 80 MiB, not 1.25 GiB).
const idle_read_bytes: usize = 8 * 1024;

/// What the shards share about the listeners and the connections they serve.
#[derive(Debug, Default)]
pub struct NetState {
    pub stopping: AtomicBool,
    /// Requests read and not yet answered (or dropped), across all connections.
    pub inflight: AtomicUsize,
    pub connections: AtomicUsize,
}

/// Bind one listening socket per shard on `addr` (the first decides the port when it is 0).
pub fn bind(addr: SocketAddr, count: usize) -> Result<Vec<Socket>, Error> {
    let mut sockets: Vec<Socket> = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = (|| -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(s)
        })()
        .map_err(|e| Error::io("listen on", addr, e))?;
        if let Some(bound) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
            addr = bound;
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Accept connections on `listener` until the broker stops. Runs on a shard's runtime.
pub async fn accept_loop(listener: std::net::TcpListener, broker: Arc<Broker>, net: Arc<NetState>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener with io_uring");
            return;
        }
    };
    loop {
        let accepted = listener.accept().await;
        if net.stopping.load(Ordering::Acquire) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                compio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        Metrics::bump(&broker.metrics.connections_accepted);
        if net.connections.load(Ordering::Relaxed) >= broker.config.max_connections {
            Metrics::bump(&broker.metrics.connections_rejected);
            tracing::warn!(%peer, limit = broker.config.max_connections, "max.connections reached; closing");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (broker, net) = (broker.clone(), net.clone());
        compio::runtime::spawn(async move {
            net.connections.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&broker.metrics.connections_open, 1);
            serve_connection(stream, peer, &broker, &net).await;
            net.connections.fetch_sub(1, Ordering::Relaxed);
            broker
                .metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        })
        .detach();
    }
}

/// A response on its way to the writer, in request order.
struct Job {
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    response: ResponseFuture,
    _inflight: Inflight,
}

/// Counts a request from the moment it is read until its response is written or dropped.
struct Inflight(Arc<NetState>);

impl Inflight {
    fn new(net: &Arc<NetState>) -> Inflight {
        net.inflight.fetch_add(1, Ordering::AcqRel);
        Inflight(net.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Outgoing {
    Response(Job),
    /// A last frame before closing (ApiVersions of an unknown version).
    Raw(bytes::BytesMut),
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: &Arc<Broker>,
    net: &Arc<NetState>,
) {
    let probe = stream.clone();
    let (mut reader, mut writer) = stream.into_split();
    let (tx, rx) = flume::bounded::<Outgoing>(connection_pipeline_depth);
    let writer_broker = broker.clone();
    let writer_task = compio::runtime::spawn(async move {
        let mut held: Option<Outgoing> = None;
        loop {
            let first = match held.take() {
                Some(out) => out,
                None => match rx.recv_async().await {
                    Ok(out) => out,
                    Err(_) => break,
                },
            };
            // Wait for the oldest response, then take every later one that is already done:
            // they go out in one write, so a client with several requests in flight gets the
            // answers of one group commit together rather than one socket write apart.
            let mut frames: Vec<Bytes> = Vec::new();
            let mut closing = false;
            let mut next = Some(first);
            while let Some(out) = next.take() {
                match ready(out, frames.is_empty()).await {
                    Ready::Send(encoded) => frames.extend(encoded),
                    Ready::SendAndClose(encoded) => {
                        frames.extend(encoded);
                        closing = true;
                        break;
                    }
                    Ready::NotYet(out) => {
                        held = Some(out);
                        break;
                    }
                }
                if frames.len() < write_frames_max {
                    next = rx.try_recv().ok();
                }
            }
            if !frames.is_empty() {
                let len: u64 = frames.iter().map(|f| f.len() as u64).sum();
                if write_frames(&mut writer, frames).await.is_err() {
                    break;
                }
                Metrics::add(&writer_broker.metrics.bytes_sent, len);
            }
            if closing {
                break;
            }
        }
    });
    let max = broker.config.socket_request_max_bytes;
    let mut frames = FrameReader::new(max);
    // Produce requests read while more bytes are already waiting in the socket are held and
    // handed to the broker together: a client that pipelines its requests (several produce
    // requests sent at once) then reaches the engine as one group, which it writes and syncs
    // together, instead of the first one alone and the rest behind it. Each is held with its
    // frame's length.
    let mut held: Vec<(Request, Inflight, usize)> = Vec::new();
    loop {
        let more_waiting = || {
            frames.frame_buffered()
                || (held.iter().map(|h| h.2).sum::<usize>() < hold_bytes_max
                    && held.len() < hold_requests_max
                    && readable_now(&probe))
        };
        if !held.is_empty() && !more_waiting() && !dispatch_all(&mut held, broker, peer, &tx).await
        {
            break;
        }
        let next = frames.next(&mut reader);
        let read = if held.is_empty() {
            next.await
        } else {
            // The rest was on its way; should it stall, what is held goes without it.
            let mut next = std::pin::pin!(next);
            let stall = std::pin::pin!(compio::time::sleep(hold_wait_max));
            match futures::future::select(next.as_mut(), stall).await {
                Either::Left((read, _)) => read,
                Either::Right(((), _)) => {
                    if !dispatch_all(&mut held, broker, peer, &tx).await {
                        break;
                    }
                    next.await
                }
            }
        };
        let frame = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(ReadError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "connection closed");
                break;
            }
            Err(ReadError::Size(size)) => {
                Metrics::bump(&broker.metrics.frames_oversized);
                tracing::warn!(%peer, size, limit = max, "request frame size out of range (socket.request.max.bytes); closing the connection");
                break;
            }
        };
        Metrics::add(&broker.metrics.bytes_received, 4 + frame.len() as u64);
        if net.stopping.load(Ordering::Acquire) {
            break;
        }
        let len = frame.len();
        let request = match protocol::decode_request(frame) {
            Ok(r) => r,
            Err(e) => {
                let counter = match e {
                    FrameError::UnknownApiKey(_) => &broker.metrics.unknown_api_keys,
                    FrameError::UnsupportedVersion { .. } => &broker.metrics.unsupported_versions,
                    FrameError::TooShort(_) | FrameError::Malformed { .. } => {
                        &broker.metrics.frames_malformed
                    }
                };
                Metrics::bump(counter);
                tracing::warn!(%peer, error = %e, "bad request; closing the connection");
                // The requests before it are answered first, in order.
                if !dispatch_all(&mut held, broker, peer, &tx).await {
                    break;
                }
                if let Some(reply) = e.reply() {
                    let _ = tx.send_async(Outgoing::Raw(reply)).await;
                }
                break;
            }
        };
        // Only produce requests gain from arriving together; any other goes at once (with what
        // is held before it, in order).
        let produce = request.key == ApiKey::Produce;
        // Counted from here: a shutdown waits for held requests too.
        held.push((request, Inflight::new(net), len));
        if !produce && !dispatch_all(&mut held, broker, peer, &tx).await {
            break;
        }
    }
    dispatch_all(&mut held, broker, peer, &tx).await;
    drop(tx);
    // The writer sends what was already accepted, then the connection closes.
    let _ = writer_task.await;
}

/// Whether the socket holds bytes not yet read, without waiting.
fn readable_now(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    socket2::SockRef::from(stream)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .is_ok_and(|n| n > 0)
}

/// Hand the held requests to the broker in order and their answers to the writer; false once
/// the writer is gone.
async fn dispatch_all(
    held: &mut Vec<(Request, Inflight, usize)>,
    broker: &Arc<Broker>,
    peer: SocketAddr,
    tx: &flume::Sender<Outgoing>,
) -> bool {
    for (request, inflight, _) in held.drain(..) {
        let (key, version, correlation_id) = (
            request.key,
            request.header.request_api_version,
            request.header.correlation_id,
        );
        let response = broker.submit(request, Some(peer)).await;
        let job = Job {
            key,
            version,
            correlation_id,
            response,
            _inflight: inflight,
        };
        if tx.send_async(Outgoing::Response(job)).await.is_err() {
            return false;
        }
    }
    true
}

/// What the writer does with one queued item.
enum Ready {
    /// Frames to send (none for a request that gets no answer, e.g. an acks=0 produce).
    Send(Vec<Bytes>),
    /// Frames to send, then close the connection.
    SendAndClose(Vec<Bytes>),
    /// Not done yet (only when not waiting): it stays first in line.
    NotYet(Outgoing),
}

/// The frames of `out`: waiting for its response if `wait`, else only if it is already done.
async fn ready(out: Outgoing, wait: bool) -> Ready {
    let mut job = match out {
        Outgoing::Raw(frame) => return Ready::SendAndClose(vec![frame.freeze()]),
        Outgoing::Response(job) => job,
    };
    let reply = if wait {
        (&mut job.response).await
    } else {
        match futures::poll!(&mut job.response) {
            Poll::Ready(reply) => reply,
            Poll::Pending => return Ready::NotYet(Outgoing::Response(job)),
        }
    };
    let Some(reply) = reply else {
        return Ready::Send(Vec::new());
    };
    match reply.encode(job.key, job.version, job.correlation_id) {
        Ok(encoded) => Ready::Send(encoded),
        Err(e) => {
            tracing::error!(api = ?job.key, version = job.version, error = %e, "cannot encode a response; closing");
            Ready::SendAndClose(Vec::new())
        }
    }
}

/// Write `frames` in order: record bytes go from the engine's buffers to the socket by writev,
/// at most `iovecs_max` pieces per call (the kernel refuses more: a Fetch served from memory is
/// one piece per batch, and thousands of small batches are common).
async fn write_frames<W: AsyncWrite>(
    writer: &mut W,
    mut frames: Vec<Bytes>,
) -> std::io::Result<()> {
    if frames.len() == 1 {
        let frame = frames.pop().expect("one frame");
        return writer.write_all(frame).await.0;
    }
    while !frames.is_empty() {
        let rest = frames.split_off(frames.len().min(iovecs_max));
        writer.write_vectored_all(frames).await.0?;
        frames = rest;
    }
    Ok(())
}

enum ReadError {
    Io(std::io::Error),
    Size(i64),
}

/// Reads a connection's request frames through one buffer: a read takes whatever the socket
/// holds (several pipelined requests arrive in one read), and each frame is split off the buffer
/// without a copy.
struct FrameReader {
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    fn new(max: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::with_capacity(idle_read_bytes),
            max,
        }
    }

    /// The next frame body, or `None` at a clean end of stream (between frames).
    async fn next<R: AsyncRead>(&mut self, reader: &mut R) -> Result<Option<Bytes>, ReadError> {
        loop {
            let needed = match self.buffered_frame()? {
                Ok(frame) => return Ok(Some(frame)),
                Err(needed) => needed,
            };
            // Between frames a connection waits with a small buffer (most are idle most of the
            // time, and there may be thousands). Once a frame's size is known: room for its
            // rest, grown by at most `read_step_bytes` or what has arrived (whichever is more)
            // at a time, so a client that announces a large frame and sends nothing pins little
            // memory and a large frame is not copied once per step; a large frame also gets room
            // for the requests pipelined behind it.
            let want = if self.buf.len() < 4 {
                idle_read_bytes
            } else {
                needed.min(read_step_bytes.max(self.buf.len()))
            };
            if self.buf.capacity() - self.buf.len() < want {
                let room = if want > idle_read_bytes {
                    want.max(read_buffer_bytes)
                } else {
                    want
                };
                self.buf.reserve(room);
            }
            let (start, end) = (self.buf.len(), self.buf.capacity());
            let buf = std::mem::take(&mut self.buf);
            let BufResult(result, slice) = reader.read(buf.slice(start..end)).await;
            self.buf = slice.into_inner();
            match result {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// The size the next frame announces, once its 4-byte prefix is buffered.
    fn announced_size(&self) -> Option<i32> {
        Some(i32::from_be_bytes(self.buf.get(..4)?.try_into().ok()?))
    }

    /// Whether a whole frame (or a size prefix [`buffered_frame`](Self::buffered_frame) rejects)
    /// is already buffered.
    fn frame_buffered(&self) -> bool {
        self.announced_size()
            .is_some_and(|size| size < 0 || self.buf.len() >= 4 + size as usize)
    }

    /// A complete frame split off the buffer, or how many more bytes the next frame needs.
    fn buffered_frame(&mut self) -> Result<Result<Bytes, usize>, ReadError> {
        let Some(size) = self.announced_size() else {
            return Ok(Err(4 - self.buf.len()));
        };
        if size < 0 || size as usize > self.max {
            return Err(ReadError::Size(size as i64));
        }
        let total = 4 + size as usize;
        if self.buf.len() < total {
            return Ok(Err(total - self.buf.len()));
        }
        let mut frame = self.buf.split_to(total);
        let _ = frame.split_to(4);
        Ok(Ok(frame.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that hands out at most `chunk` bytes per read.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        async fn read<B: compio::buf::IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
            let end = self.pos.saturating_add(self.chunk).min(self.data.len());
            let mut part = &self.data[self.pos..end];
            let BufResult(result, buf) = part.read(buf).await;
            if let Ok(n) = result {
                self.pos += n;
            }
            BufResult(result, buf)
        }
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as i32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn read_all(data: Vec<u8>, chunk: usize, max: usize) -> (Vec<Bytes>, Option<ReadError>) {
        compio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let mut stream = Chunked {
                    data,
                    pos: 0,
                    chunk,
                };
                let mut reader = FrameReader::new(max);
                let mut frames = Vec::new();
                loop {
                    match reader.next(&mut stream).await {
                        Ok(Some(f)) => frames.push(f),
                        Ok(None) => return (frames, None),
                        Err(e) => return (frames, Some(e)),
                    }
                }
            })
    }

    #[test]
    fn frames_are_split_off_whatever_the_reads_deliver() {
        let bodies: Vec<Vec<u8>> = vec![
            b"a".to_vec(),
            Vec::new(),
            (0..3_000_000u32).map(|i| (i % 251) as u8).collect(),
            (0..70_000u32).map(|i| (i % 13) as u8).collect(),
        ];
        let stream: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
        // One read holding several frames, reads cutting frames and length prefixes anywhere,
        // and one byte at a time (small frames only, to keep it quick).
        for chunk in [usize::MAX, 1 << 20, 65_537, 4093, 3] {
            let (frames, error) = read_all(stream.clone(), chunk, 4 << 20);
            assert!(error.is_none(), "chunk {chunk}");
            assert_eq!(frames.len(), bodies.len(), "chunk {chunk}");
            for (f, b) in frames.iter().zip(&bodies) {
                assert!(f[..] == b[..], "chunk {chunk}: a frame differs");
            }
        }
        let small: Vec<u8> = [frame(b"xy"), frame(b""), frame(b"z")].concat();
        let (frames, error) = read_all(small, 1, 1024);
        assert!(error.is_none());
        assert_eq!(frames, vec![&b"xy"[..], &b""[..], &b"z"[..]]);
    }

    #[test]
    fn a_cut_or_oversized_frame_is_an_error_and_earlier_frames_survive() {
        let mut cut = frame(b"whole");
        cut.extend_from_slice(&frame(b"truncated")[..7]);
        let (frames, error) = read_all(cut, 5, 1024);
        assert_eq!(frames, vec![&b"whole"[..]]);
        assert!(
            matches!(error, Some(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof)
        );

        // The size is refused before any of the body is awaited.
        let mut big = frame(b"ok");
        big.extend_from_slice(&2000i32.to_be_bytes());
        let (frames, error) = read_all(big, usize::MAX, 1024);
        assert_eq!(frames, vec![&b"ok"[..]]);
        assert!(matches!(error, Some(ReadError::Size(2000))));
        let (_, error) = read_all((-1i32).to_be_bytes().to_vec(), usize::MAX, 1024);
        assert!(matches!(error, Some(ReadError::Size(-1))));
    }
}
