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

/// A TCP proxy that cuts the client's connection right after forwarding every `every`-th
/// produce request (at most `max_cuts` times), so the broker appends the batch but the client
/// never sees the answer.
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
            let (mut client_back, mut broker_in) =
                (client.try_clone().unwrap(), broker.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut broker_in, &mut client_back);
                let _ = client_back.shutdown(std::net::Shutdown::Both);
            });
            let (produced, cuts) = (produced.clone(), cuts.clone());
            std::thread::spawn(move || loop {
                let mut size = [0u8; 4];
                if client.read_exact(&mut size).is_err() {
                    let _ = broker.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
                if client.read_exact(&mut body).is_err()
                    || broker.write_all(&size).is_err()
                    || broker.write_all(&body).is_err()
                {
                    let _ = broker.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let is_produce = body[0..2] == [0, 0];
                let nth = if is_produce {
                    produced.fetch_add(1, Ordering::Relaxed)
                } else {
                    0
                };
                if is_produce && nth % every == every - 1 && cuts.load(Ordering::Relaxed) < max_cuts
                {
                    cuts.fetch_add(1, Ordering::Relaxed);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    // Let the broker read the whole request before its side goes too.
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = broker.shutdown(std::net::Shutdown::Both);
                    return;
                }
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
