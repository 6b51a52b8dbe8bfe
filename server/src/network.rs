//! Sockets: one listener per shard on the same port (SO_REUSEPORT, the kernel spreads new
//! connections), each connection served on the shard that accepted it, inside that shard's
//! io_uring runtime. Requests of one connection are answered in order; produce appends are queued
//! in order while earlier responses are still being awaited (pipelining, up to
//! `connection_pipeline_depth` requests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};
use kafka_protocol::messages::ApiKey;
use socket2::{Domain, Socket, Type};

use crate::broker::{Broker, ResponseFuture};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::protocol::{self, FrameError};

/// Requests read ahead of the response being written, per connection (librdkafka and the Java
/// client keep up to 5 in flight; admin clients more).
const connection_pipeline_depth: usize = 32;
/// A request body is read into a buffer grown by at most this much at a time, so a client that
/// announces a large frame and sends nothing does not pin that much memory.
const read_step_bytes: usize = 1024 * 1024;

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
    let (mut reader, mut writer) = stream.into_split();
    let (tx, rx) = flume::bounded::<Outgoing>(connection_pipeline_depth);
    let writer_broker = broker.clone();
    let writer_task = compio::runtime::spawn(async move {
        while let Ok(out) = rx.recv_async().await {
            let frames: Vec<bytes::Bytes> = match out {
                Outgoing::Raw(frame) => vec![frame.freeze()],
                Outgoing::Response(job) => {
                    let Some(reply) = job.response.await else {
                        continue;
                    };
                    match reply.encode(job.key, job.version, job.correlation_id) {
                        Ok(frames) => frames,
                        Err(e) => {
                            tracing::error!(api = ?job.key, version = job.version, error = %e, "cannot encode a response; closing");
                            break;
                        }
                    }
                }
            };
            let len: u64 = frames.iter().map(|f| f.len() as u64).sum();
            let result = if frames.len() == 1 {
                let frame = frames.into_iter().next().expect("one frame");
                writer.write_all(frame).await.0
            } else {
                // Record bytes go from the engine's buffers to the socket in one writev.
                writer.write_vectored_all(frames).await.0
            };
            if result.is_err() {
                break;
            }
            Metrics::add(&writer_broker.metrics.bytes_sent, len);
        }
    });
    let max = broker.config.socket_request_max_bytes;
    loop {
        let frame = match read_frame(&mut reader, max).await {
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
                if let Some(reply) = e.reply() {
                    let _ = tx.send_async(Outgoing::Raw(reply)).await;
                }
                break;
            }
        };
        let inflight = Inflight::new(net);
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
            break;
        }
    }
    drop(tx);
    // The writer sends what was already accepted, then the connection closes.
    let _ = writer_task.await;
}

enum ReadError {
    Io(std::io::Error),
    Size(i64),
}

/// One frame body, or `None` at a clean end of stream.
async fn read_frame<R: AsyncRead>(reader: &mut R, max: usize) -> Result<Option<Bytes>, ReadError> {
    let BufResult(result, size) = reader.read_exact(Vec::with_capacity(4).slice(0..4)).await;
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    }
    let size = size.into_inner();
    let size = i32::from_be_bytes([size[0], size[1], size[2], size[3]]);
    if size < 0 || size as usize > max {
        return Err(ReadError::Size(size as i64));
    }
    let n = size as usize;
    let mut body: Vec<u8> = Vec::with_capacity(n.min(read_step_bytes));
    while body.len() < n {
        if body.len() == body.capacity() {
            body.reserve((n - body.len()).min(read_step_bytes));
        }
        let (start, end) = (body.len(), body.capacity().min(n));
        let BufResult(result, slice) = reader.read(body.slice(start..end)).await;
        body = slice.into_inner();
        match result {
            Ok(0) => {
                return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(Some(Bytes::from(body)))
}
