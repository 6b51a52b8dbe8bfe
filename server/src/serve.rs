//! `keel serve`: start the broker, serve until SIGTERM/SIGINT, shut down cleanly.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::error::Error;
use crate::network::{self, NetState};

/// A running broker. Dropping it without [`Server::shutdown`] stops it like a crash would.
#[derive(Debug)]
pub struct Server {
    broker: Arc<Broker>,
    net: Arc<NetState>,
    listeners: Vec<Socket>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Open the data directory, bind the listeners (one per shard) and start serving.
    pub fn start(config: BrokerConfig) -> Result<Server, Error> {
        let broker = Broker::open(config)?;
        let shards = broker.engine.shard_count();
        let listeners = network::bind(broker.config.listen, shards)?;
        let local_addr = listeners[0]
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("a bound TCP socket has an address");
        let _ = broker.advertised.set(broker.config.advertised(local_addr));
        let net = Arc::new(NetState::default());
        for (shard, socket) in listeners.iter().enumerate() {
            let std_listener: std::net::TcpListener = socket
                .try_clone()
                .map_err(|e| Error::io("clone listener", local_addr, e))?
                .into();
            let (b, n) = (broker.clone(), net.clone());
            keel_engine::block_on(broker.engine.run_on_shard(shard, move || {
                compio::runtime::spawn(network::accept_loop(std_listener, b, n)).detach();
            }))?;
        }
        let metrics_addr = match broker.config.metrics_listen {
            Some(addr) => Some(serve_metrics(addr, broker.clone())?),
            None => None,
        };
        tracing::info!(listen = %local_addr, data_dir = %broker.config.data_dir.display(), shards, "keel is serving");
        Ok(Server {
            broker,
            net,
            listeners,
            local_addr,
            metrics_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Stop accepting, let in-flight requests finish (up to `shutdown.timeout.ms`), write producer
    /// snapshots, make everything durable and write the clean-shutdown markers.
    pub fn shutdown(self) -> Result<(), Error> {
        self.net.stopping.store(true, Ordering::Release);
        self.broker.begin_stop();
        for l in &self.listeners {
            // Wakes the accept waiting in each shard's ring (it fails with EINVAL).
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        let deadline =
            Instant::now() + Duration::from_millis(self.broker.config.shutdown_timeout_ms);
        while self.net.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.net.inflight.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(
                requests = left,
                "shutdown timeout: abandoning in-flight requests"
            );
        }
        keel_engine::block_on(self.broker.shutdown())?;
        tracing::info!("keel stopped cleanly");
        Ok(())
    }
}

/// `keel serve`: run until SIGTERM or SIGINT.
pub fn run(config: BrokerConfig) -> Result<(), Error> {
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| Error::io("install signal handlers", "SIGTERM/SIGINT", e))?;
    let server = Server::start(config)?;
    let mut signals = signals;
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down");
    }
    server.shutdown()
}

/// Prometheus text at `http://<addr>/metrics`, served by one plain thread (not the data path).
fn serve_metrics(addr: SocketAddr, broker: Arc<Broker>) -> Result<SocketAddr, Error> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| Error::io("listen on", addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("listen on", addr, e))?;
    std::thread::Builder::new()
        .name("keel-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).unwrap_or(0);
                let ok = request[..n].starts_with(b"GET /metrics");
                let (status, body) = if ok {
                    // Lag needs the engine's offsets: fine from this plain thread.
                    let mut text = broker.metrics.render(&broker.engine.metrics());
                    text.push_str(&keel_engine::block_on(broker.lag_metrics()));
                    ("200 OK", text)
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_string())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|e| Error::io("spawn", "metrics thread", e))?;
    Ok(bound)
}
