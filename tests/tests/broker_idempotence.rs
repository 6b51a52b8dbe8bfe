//! The idempotent producer: duplicates return the original offsets and are not appended again,
//! gaps and fenced epochs are refused, and the state survives a restart (from the snapshot of a
//! clean shutdown, and rebuilt from the log without one). Then librdkafka, its connection cut
//! after produce requests reach the broker, retries without duplicating or losing anything.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::executor::block_on;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    InitProducerIdRequest, ListOffsetsRequest, MetadataRequest, ProduceRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use rdkafka::producer::FutureRecord;
use rdkafka::Offset;

const TOPIC: &str = "idem";

fn topic() -> TopicName {
    TopicName(StrBytes::from_static_str(TOPIC))
}

/// Produce one batch of `n` records for (pid, epoch, seq); returns (error code, base offset).
fn produce(w: &mut Wire, pid: i64, epoch: i16, seq: i32, n: usize) -> (i16, i64) {
    let values: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("{pid}/{epoch}/{}", seq + i as i32).into_bytes())
        .collect();
    let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    let request = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic())
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(kafka_batch(&refs, Some((pid, epoch, seq)))))])]);
    let r = w.call(9, &request);
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

fn log_end(w: &mut Wire) -> i64 {
    let r = w.call(
        5,
        &ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(topic())
                .with_partitions(vec![
                    ListOffsetsPartition::default().with_timestamp(-1)
                ])]),
    );
    r.topics[0].partitions[0].offset
}

fn init(w: &mut Wire, known: Option<(i64, i16)>) -> (i64, i16) {
    let (pid, epoch) = known.unwrap_or((-1, -1));
    let r = w.call(
        4,
        &InitProducerIdRequest::default()
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(pid.into())
            .with_producer_epoch(epoch),
    );
    assert_eq!(r.error_code, 0);
    (r.producer_id.0, r.producer_epoch)
}

#[test]
fn duplicates_gaps_epochs_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    // Auto-create the topic through Metadata, as clients do.
    let m = w.call(
        9,
        &MetadataRequest::default()
            .with_allow_auto_topic_creation(true)
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic()))
            ])),
    );
    assert_eq!(m.topics[0].error_code, 0);

    let (pid, epoch) = init(&mut w, None);
    let (other, _) = init(&mut w, None);
    assert_ne!(pid, other, "every producer gets its own id");
    assert_eq!(produce(&mut w, pid, epoch, 0, 3), (0, 0));
    assert_eq!(produce(&mut w, pid, epoch, 3, 2), (0, 3));
    // A retry of either of the last batches: its original offsets, nothing appended.
    assert_eq!(produce(&mut w, pid, epoch, 0, 3), (0, 0));
    assert_eq!(produce(&mut w, pid, epoch, 3, 2), (0, 3));
    assert_eq!(log_end(&mut w), 5);
    // A gap.
    assert_eq!(
        produce(&mut w, pid, epoch, 9, 1).0,
        ResponseError::OutOfOrderSequenceNumber.code()
    );
    // A new epoch (KIP-360 bump) starts at 0 and fences the old one.
    let (same, bumped) = init(&mut w, Some((pid, epoch)));
    assert_eq!((same, bumped), (pid, epoch + 1));
    assert_eq!(produce(&mut w, pid, bumped, 0, 1), (0, 5));
    assert_eq!(
        produce(&mut w, pid, epoch, 5, 1).0,
        ResponseError::InvalidProducerEpoch.code()
    );
    assert_eq!(log_end(&mut w), 6);
    assert!(
        server
            .broker()
            .metrics
            .produce_duplicates
            .load(Ordering::Relaxed)
            >= 2
    );
    server.shutdown().unwrap();

    // Clean restart: the state comes back from the snapshot.
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    assert_eq!(
        produce(&mut w, pid, bumped, 0, 1),
        (0, 5),
        "a retry after restart is still a duplicate"
    );
    assert_eq!(produce(&mut w, pid, bumped, 1, 2), (0, 6));
    server.shutdown().unwrap();

    // Restart without a snapshot (as after a crash): the state is rebuilt from the log.
    let snapshots = dir.path().join(".keel").join("producers");
    for entry in std::fs::read_dir(&snapshots).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    assert_eq!(
        produce(&mut w, pid, bumped, 1, 2),
        (0, 6),
        "rebuilt from the log"
    );
    assert_eq!(produce(&mut w, pid, bumped, 3, 1), (0, 8));
    assert_eq!(
        produce(&mut w, pid, epoch, 9, 1).0,
        ResponseError::InvalidProducerEpoch.code()
    );
    let (fresh, _) = init(&mut w, None);
    assert!(
        fresh > other,
        "producer ids are never handed out twice, across restarts"
    );
    assert_eq!(log_end(&mut w), 9);
    server.shutdown().unwrap();
}

/// Read one Kafka frame (size and body) from `from`.
fn read_frame(from: &mut TcpStream) -> Option<([u8; 4], Vec<u8>)> {
    let mut size = [0u8; 4];
    from.read_exact(&mut size).ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
    from.read_exact(&mut body).ok()?;
    Some((size, body))
}

/// A TCP proxy that, for every `every`-th produce request (at most `max_cuts` times), lets the
/// broker answer and then closes the client's connection instead of forwarding that answer: the
/// batch is in the log, but the client never hears so and must retry.
fn cutting_proxy(
    listener: TcpListener,
    target: Arc<std::sync::OnceLock<SocketAddr>>,
    every: usize,
    max_cuts: usize,
    cuts: Arc<AtomicUsize>,
) {
    std::thread::spawn(move || {
        let produced = Arc::new(AtomicUsize::new(0));
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Some(&addr) = target.get() else { return };
            let Ok(mut broker) = TcpStream::connect(addr) else {
                continue;
            };
            // Correlation ids of the requests whose answers are to be dropped.
            let doomed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
            let (mut client_back, mut broker_in) =
                (client.try_clone().unwrap(), broker.try_clone().unwrap());
            let (doomed_back, cuts) = (doomed.clone(), cuts.clone());
            std::thread::spawn(move || {
                while let Some((size, body)) = read_frame(&mut broker_in) {
                    let correlation = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    if doomed_back.lock().unwrap().contains(&correlation) {
                        cuts.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if client_back.write_all(&size).is_err()
                        || client_back.write_all(&body).is_err()
                    {
                        break;
                    }
                }
                let _ = client_back.shutdown(std::net::Shutdown::Both);
                let _ = broker_in.shutdown(std::net::Shutdown::Both);
            });
            let produced = produced.clone();
            std::thread::spawn(move || {
                while let Some((size, body)) = read_frame(&mut client) {
                    let is_produce = body[0..2] == [0, 0];
                    if is_produce {
                        let nth = produced.fetch_add(1, Ordering::Relaxed);
                        if nth % every == every - 1 && nth / every < max_cuts {
                            let correlation =
                                i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                            doomed.lock().unwrap().insert(correlation);
                        }
                    }
                    if broker.write_all(&size).is_err() || broker.write_all(&body).is_err() {
                        break;
                    }
                }
                let _ = broker.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

#[test]
fn librdkafka_retries_through_cut_connections_without_duplicates_or_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    let target = Arc::new(std::sync::OnceLock::new());
    let cuts = Arc::new(AtomicUsize::new(0));
    cutting_proxy(listener, target.clone(), 7, 6, cuts.clone());
    let server = start(
        dir.path(),
        &[("advertised.listeners", &format!("PLAINTEXT://{proxy}"))],
    );
    target.set(server.local_addr()).unwrap();

    let p = producer(
        proxy,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
            ("batch.num.messages", "20"),
            ("retry.backoff.ms", "20"),
            ("message.timeout.ms", "25000"),
            ("reconnect.backoff.ms", "10"),
            ("reconnect.backoff.max.ms", "100"),
        ],
    );
    let total = 2000;
    let deliveries: Vec<_> = (0..total)
        .map(|i| {
            p.send_result(
                FutureRecord::to(TOPIC)
                    .partition(0)
                    .key("k")
                    .payload(&format!("{i:06}")),
            )
            .map_err(|(e, _)| e)
            .unwrap()
        })
        .collect();
    for (i, d) in deliveries.into_iter().enumerate() {
        let result = block_on(d).expect("delivery reported");
        assert!(result.is_ok(), "message {i}: {:?}", result.err());
    }
    assert!(
        cuts.load(Ordering::Relaxed) > 0,
        "the proxy cut connections"
    );
    let duplicates = server
        .broker()
        .metrics
        .produce_duplicates
        .load(Ordering::Relaxed);
    assert!(
        duplicates > 0,
        "retried batches reached the broker twice and were recognised"
    );

    let got = consume(
        &consumer(server.local_addr()),
        TOPIC,
        0,
        Offset::Beginning,
        total,
        Duration::from_secs(5),
    );
    let values: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8(r.value.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..total).map(|i| format!("{i:06}")).collect();
    assert_eq!(values.len(), total, "no message lost or duplicated");
    assert_eq!(values, expected, "in order");
    server.shutdown().unwrap();
}
