//! Shared helpers of the broker tests: an in-process broker on a free port, rdkafka clients, and
//! a raw Kafka-protocol client for requests a well-behaved client never sends.

#![allow(dead_code)] // each test binary uses a different subset
#![allow(non_upper_case_globals)] // snake_case constants, as in the engine

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::RequestHeader;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use keel_server::{BrokerConfig, Server};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};

/// Every wait in these tests gives up after this long (a hung broker fails the test, it does not
/// hang CI).
pub const patience: Duration = Duration::from_secs(30);

pub fn config(dir: &Path, settings: &[(&str, &str)]) -> BrokerConfig {
    let mut c = BrokerConfig::default();
    c.set("log.dirs", &dir.display().to_string()).unwrap();
    c.set("listeners", "127.0.0.1:0").unwrap();
    c.set("num.shards", "2").unwrap();
    c.set("log.segment.bytes", "8388608").unwrap();
    c.set("shutdown.timeout.ms", "5000").unwrap();
    for (k, v) in settings {
        c.set(k, v).unwrap();
    }
    c
}

pub fn start(dir: &Path, settings: &[(&str, &str)]) -> Server {
    Server::start(config(dir, settings)).expect("broker starts")
}

pub fn producer(addr: SocketAddr, settings: &[(&str, &str)]) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr.to_string())
        .set("message.timeout.ms", "20000")
        .set("linger.ms", "0")
        .set("log_level", "3");
    for (k, v) in settings {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

pub fn consumer(addr: SocketAddr) -> BaseConsumer {
    consumer_with(addr, &[])
}

pub fn consumer_with(addr: SocketAddr, settings: &[(&str, &str)]) -> BaseConsumer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr.to_string())
        // librdkafka wants a group id even for assign(); no group API is used.
        .set("group.id", "keel-tests")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set("log_level", "3");
    for (k, v) in settings {
        c.set(*k, *v);
    }
    c.create().expect("consumer")
}

/// A consumed record: offset, key, value, timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub timestamp: Option<i64>,
}

/// Read `topic`/`partition` from `from` until `want` records arrived or `idle` passed without any.
pub fn consume(
    c: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: Offset,
    want: usize,
    idle: Duration,
) -> Vec<Record> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, from).unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + patience;
    let mut last = Instant::now();
    while out.len() < want && Instant::now() < deadline && last.elapsed() < idle {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                out.push(Record {
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    timestamp: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// A raw Kafka-protocol connection. Requests may be pipelined: responses are matched to the
/// requests sent, oldest first.
pub struct Wire {
    pub stream: TcpStream,
    correlation: i32,
    awaiting: std::collections::VecDeque<i32>,
}

impl Wire {
    pub fn connect(addr: SocketAddr) -> Wire {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(patience)).unwrap();
        Wire {
            stream,
            correlation: 0,
            awaiting: Default::default(),
        }
    }

    /// Send one request and read its response.
    pub fn call<R: Request>(&mut self, version: i16, request: &R) -> R::Response {
        self.send(version, request);
        self.receive::<R>(version)
    }

    pub fn send<R: Request>(&mut self, version: i16, request: &R) {
        let frame = self.frame(version, request);
        self.stream.write_all(&frame).unwrap();
    }

    /// The frame of a request (size prefix included), counted as sent: the caller sends it, for
    /// example together with others in one write.
    pub fn frame<R: Request>(&mut self, version: i16, request: &R) -> BytesMut {
        self.correlation += 1;
        self.awaiting.push_back(self.correlation);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("keel-tests")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .unwrap();
        request.encode(&mut body, version).unwrap();
        let mut frame = BytesMut::new();
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(&body);
        frame
    }

    /// The response to the oldest request not yet answered.
    pub fn receive<R: Request>(&mut self, version: i16) -> R::Response {
        let mut body = self.read_frame().expect("a response");
        let header = kafka_protocol::messages::ResponseHeader::decode(
            &mut body,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .unwrap();
        assert_eq!(
            Some(header.correlation_id),
            self.awaiting.pop_front(),
            "responses come in order"
        );
        R::Response::decode(&mut body, version).unwrap()
    }

    pub fn read_frame(&mut self) -> Option<Bytes> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).ok()?;
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some(Bytes::from(body))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// True once the broker has closed the connection (end of stream or reset).
    pub fn closed_by_broker(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // a final frame (e.g. an error answer) before closing
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false, // timed out: still open
            }
        }
    }
}

/// A record batch of the given record count, in real Kafka v2 record format (clients can read
/// it back), with optional producer fields.
pub fn kafka_batch(values: &[&[u8]], producer: Option<(i64, i16, i32)>) -> Bytes {
    use kafka_protocol::records::{
        Compression, Record as KRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let (pid, epoch, seq) = producer.unwrap_or((-1, -1, -1));
    let records: Vec<KRecord> = values
        .iter()
        .enumerate()
        .map(|(i, v)| KRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: if seq < 0 { -1 } else { seq + i as i32 },
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(Bytes::copy_from_slice(v)),
            headers: Default::default(),
        })
        .collect();
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    out.freeze()
}

/// Skip the first `n` bytes of a buffer (for hand-built frames).
pub fn skip(mut b: Bytes, n: usize) -> Bytes {
    b.advance(n);
    b
}

/// This test binary run again as a child process that runs only `test` with `env` set: how a test
/// gets a broker or a consumer it can SIGKILL. The child's stdout lines arrive on `lines` (the
/// first carries libtest's "test name ... " prefix: search lines, do not match their start). The
/// child is killed when this is dropped, so a failing assertion leaves no process behind.
pub struct ChildTest {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl ChildTest {
    pub fn spawn(test: &str, env: &[(&str, String)]) -> ChildTest {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        ChildTest { child, lines }
    }

    /// Wait (at most `patience`) for a line containing `needle`.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {needle:?} from the child: {e}"),
            }
        }
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
