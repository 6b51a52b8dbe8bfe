//! Hostile input: each malformed frame gets the documented reaction (the connection closes, or a
//! Kafka error code), is counted in metrics, and neither stops the broker nor changes stored data.

mod common;

use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};
use common::*;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiVersionsRequest, CreateTopicsRequest, FetchRequest, ListOffsetsRequest, MetadataRequest,
    ProduceRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use keel_server::Server;

fn name(s: &'static str) -> TopicName {
    TopicName(StrBytes::from_static_str(s))
}

fn produce(
    topic: &'static str,
    partition: i32,
    records: bytes::Bytes,
    acks: i16,
) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(records))])])
}

fn produce_code(w: &mut Wire, request: &ProduceRequest) -> i16 {
    w.send(9, request);
    produce_answer(w).0
}

/// A Fetch of one partition from `offset`: up to `max_bytes` in all and for the partition, waiting
/// up to `wait_ms` for `min_bytes`.
fn fetch_request(
    topic: &'static str,
    offset: i64,
    max_bytes: i32,
    wait_ms: i32,
    min_bytes: i32,
) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(wait_ms)
        .with_min_bytes(min_bytes)
        .with_max_bytes(max_bytes)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(vec![FetchPartition::default()
                .with_fetch_offset(offset)
                .with_partition_max_bytes(max_bytes)])])
}

fn log_end(w: &mut Wire, topic: &'static str) -> i64 {
    let r = w.call(
        5,
        &ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(name(topic))
                .with_partitions(vec![
                    ListOffsetsPartition::default().with_timestamp(-1)
                ])]),
    );
    r.topics[0].partitions[0].offset
}

fn create(w: &mut Wire, topic: &'static str, max_message_bytes: &'static str) {
    let r = w.call(
        5,
        &CreateTopicsRequest::default()
            .with_timeout_ms(10_000)
            .with_topics(vec![CreatableTopic::default()
                .with_name(name(topic))
                .with_num_partitions(1)
                .with_replication_factor(1)
                .with_configs(vec![CreatableTopicConfig::default()
                    .with_name(StrBytes::from_static_str("max.message.bytes"))
                    .with_value(Some(StrBytes::from_static_str(
                        max_message_bytes,
                    )))])]),
    );
    assert_eq!(r.topics[0].error_code, 0, "{:?}", r.topics[0].error_message);
}

/// The broker still answers a new, well-behaved connection.
fn still_serving(server: &Server) {
    let mut w = Wire::connect(server.local_addr());
    let r = w.call(3, &ApiVersionsRequest::default());
    assert_eq!(r.error_code, 0);
    assert!(!r.api_keys.is_empty());
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as i32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("socket.request.max.bytes", "1048576")]);
    let addr = server.local_addr();
    let metrics = &server.broker().metrics;
    // A bystander connection opened before the attacks keeps working after them.
    let mut bystander = Wire::connect(addr);
    create(&mut bystander, "safe", "1048588");
    let batch = kafka_batch(&[b"kept"], None);
    assert_eq!(
        produce_code(&mut bystander, &produce("safe", 0, batch, -1)),
        0
    );

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage (an HTTP request)",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("a size field of 2 GiB", vec![0x7f, 0xff, 0xff, 0xff, 0, 0]),
        ("a negative size", vec![0x80, 0, 0, 0]),
        ("a frame shorter than a header", frame(&[0, 3, 0])),
        (
            "an unknown API key",
            frame(&[0x27, 0x0f, 0, 0, 0, 0, 0, 1, 0xff, 0xff]),
        ),
        // Metadata v1 header, then a topic array claiming 2^31-1 entries.
        (
            "a huge array length",
            frame(&[0, 3, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]),
        ),
        // Metadata v1 header, then a truncated body.
        (
            "a truncated body",
            frame(&[0, 3, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0, 0]),
        ),
    ];
    for (what, bytes) in &cases {
        let mut w = Wire::connect(addr);
        w.send_raw(bytes);
        assert!(
            w.closed_by_broker(),
            "{what}: the broker closes the connection"
        );
        still_serving(&server);
    }
    // A frame cut short by the client: the broker waits for the rest, then sees the end.
    let mut w = Wire::connect(addr);
    w.send_raw(&[0, 0, 0, 100, 0, 3, 0, 1]);
    w.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(w.closed_by_broker());

    assert_eq!(metrics.frames_oversized.load(Ordering::Relaxed), 3);
    assert_eq!(metrics.unknown_api_keys.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.frames_malformed.load(Ordering::Relaxed), 3);

    // An ApiVersions of a future version is answered (v0, UNSUPPORTED_VERSION, the list) first.
    let mut w = Wire::connect(addr);
    w.send_raw(&frame(&[0, 18, 0, 99, 0, 0, 0, 42]));
    let reply = w.read_frame().expect("an answer before closing");
    assert_eq!(&reply[0..4], &42i32.to_be_bytes());
    assert_eq!(
        &reply[4..6],
        &ResponseError::UnsupportedVersion.code().to_be_bytes()
    );
    assert!(w.closed_by_broker());

    // Nothing stored was touched, and the bystander's connection still works.
    assert_eq!(log_end(&mut bystander, "safe"), 1);
    let r = bystander.call(1, &MetadataRequest::default().with_topics(None));
    assert_eq!(r.topics.len(), 1);
    server.shutdown().unwrap();
}

#[test]
fn bad_batches_get_kafka_error_codes_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "small", "1024");
    let good = kafka_batch(&[b"first"], None);
    assert_eq!(
        produce_code(&mut w, &produce("small", 0, good.clone(), -1)),
        0
    );

    let mut bad_crc = BytesMut::from(&good[..]);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let big = kafka_batch(&[&[7u8; 4000]], None);
    let mut two = BytesMut::from(&good[..]);
    two.extend_from_slice(&good);
    let mut old_magic = BytesMut::from(&good[..]);
    old_magic[16] = 1;
    let mut truncated = BytesMut::from(&good[..]);
    truncated.truncate(good.len() - 3);
    let cases: Vec<(&str, ProduceRequest, ResponseError)> = vec![
        (
            "wrong CRC",
            produce("small", 0, bad_crc.freeze(), -1),
            ResponseError::CorruptMessage,
        ),
        (
            "too large",
            produce("small", 0, big, -1),
            ResponseError::MessageTooLarge,
        ),
        (
            "two batches",
            produce("small", 0, two.freeze(), -1),
            ResponseError::InvalidRecord,
        ),
        (
            "magic 1",
            produce("small", 0, old_magic.freeze(), -1),
            ResponseError::UnsupportedForMessageFormat,
        ),
        (
            "truncated batch",
            produce("small", 0, truncated.freeze(), -1),
            ResponseError::CorruptMessage,
        ),
        (
            "unknown topic",
            produce("nope", 0, good.clone(), -1),
            ResponseError::UnknownTopicOrPartition,
        ),
        (
            "unknown partition",
            produce("small", 9, good.clone(), -1),
            ResponseError::UnknownTopicOrPartition,
        ),
        (
            "acks=5",
            produce("small", 0, good.clone(), 5),
            ResponseError::InvalidRequiredAcks,
        ),
    ];
    let metrics = &server.broker().metrics;
    for (what, request, expected) in &cases {
        let before = metrics.error_count(expected.code());
        assert_eq!(produce_code(&mut w, request), expected.code(), "{what}");
        assert!(
            metrics.error_count(expected.code()) > before,
            "{what} is counted"
        );
    }
    assert_eq!(
        log_end(&mut w, "small"),
        1,
        "no rejected batch reached the log"
    );

    // Fetching past the end is OFFSET_OUT_OF_RANGE; at the end it is an empty answer.
    let fetch = |offset: i64| fetch_request("small", offset, 1 << 20, 0, 0);
    let r = w.call(11, &fetch(5));
    assert_eq!(
        r.responses[0].partitions[0].error_code,
        ResponseError::OffsetOutOfRange.code()
    );
    let r = w.call(11, &fetch(0));
    let p = &r.responses[0].partitions[0];
    assert_eq!((p.error_code, p.high_watermark), (0, 1));
    // Served byte for byte as produced, but for the offset and leader epoch the broker assigned
    // (both outside the CRC).
    assert_eq!(p.records.as_ref().unwrap().len(), good.len());
    assert_eq!(
        &p.records.as_ref().unwrap()[17..],
        &good[17..],
        "bytes served as produced"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_frame_above_socket_request_max_bytes_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("socket.request.max.bytes", "1024")]);
    let mut w = Wire::connect(server.local_addr());
    let mut body = BytesMut::new();
    body.put_i32(2048);
    body.put_slice(&[0u8; 16]);
    w.send_raw(&body);
    assert!(w.closed_by_broker());
    assert_eq!(
        server
            .broker()
            .metrics
            .frames_oversized
            .load(Ordering::Relaxed),
        1
    );
    still_serving(&server);
    server.shutdown().unwrap();
}

#[test]
fn metrics_are_served_as_prometheus_text() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("metrics.listener", "127.0.0.1:0")]);
    let mut w = Wire::connect(server.local_addr());
    w.send_raw(&frame(&[0x27, 0x0f, 0, 0, 0, 0, 0, 1]));
    assert!(w.closed_by_broker());
    still_serving(&server);
    let mut http = std::net::TcpStream::connect(server.metrics_addr().unwrap()).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("keel_broker_unknown_api_keys 1"), "{text}");
    assert!(
        text.contains("keel_broker_requests{api=\"ApiVersions\"} 1"),
        "{text}"
    );
    assert!(text.contains("keel_engine_fsyncs"), "{text}");
    server.shutdown().unwrap();
}

#[test]
fn a_full_disk_is_kafka_storage_error_and_nothing_is_lost() {
    use keel_engine::io::sim::{FaultConfig, SimFs};
    let dir = tempfile::tempdir().unwrap();
    // The partitions live on the simulator with a 3 MiB disk (plus a 4 MiB journal per shard,
    // allocated whole at start); metadata on the real one.
    let journal = keel_engine::constants::journal_bytes_min;
    let fs = SimFs::new(FaultConfig {
        capacity_bytes: Some(3 * 1024 * 1024 + 2 * (journal + 8192)),
        ..Default::default()
    });
    let journal = journal.to_string();
    let mut c = config(
        dir.path(),
        &[
            ("log.segment.bytes", "1048576"),
            ("log.journal.bytes", &journal),
            ("num.shards", "2"),
        ],
    );
    c.backend = keel_engine::io::Backend::Sim(fs.clone());
    let server = Server::start(c).unwrap();
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "filling", "1048588");
    let value = [5u8; 60_000];
    let (mut stored, mut full) = (0, 0);
    for _ in 0..200 {
        match produce_code(
            &mut w,
            &produce("filling", 0, kafka_batch(&[&value], None), -1),
        ) {
            0 => stored += 1,
            code if code == ResponseError::KafkaStorageError.code() => {
                full += 1;
                if full == 3 {
                    break;
                }
            }
            other => panic!("unexpected error code {other}"),
        }
    }
    assert!(stored > 0 && full == 3, "stored {stored}, full {full}");
    assert!(
        server
            .broker()
            .metrics
            .error_count(ResponseError::KafkaStorageError.code())
            >= 3
    );
    assert!(server.broker().engine.metrics().disk_full_errors > 0);
    // Still serving, and everything acknowledged is there.
    still_serving(&server);
    assert_eq!(log_end(&mut w, "filling"), stored);
    // Space comes back: appends continue right after the last acknowledged one.
    fs.set_faults(FaultConfig::default());
    w.send(
        9,
        &produce("filling", 0, kafka_batch(&[b"again"], None), -1),
    );
    assert_eq!(produce_answer(&mut w), (0, stored));
    server.shutdown().unwrap();
}

#[test]
fn fetch_max_bytes_caps_a_greedy_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("fetch.max.bytes", "100000")]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "big", "1048588");
    for _ in 0..10 {
        let batch = kafka_batch(&[&[1u8; 30_000]], None);
        assert_eq!(produce_code(&mut w, &produce("big", 0, batch, -1)), 0);
    }
    let r = w.call(11, &fetch_request("big", 0, i32::MAX, 0, 0));
    let records = r.responses[0].partitions[0].records.as_ref().unwrap();
    assert!(
        !records.is_empty() && records.len() <= 100_000,
        "{} bytes",
        records.len()
    );
    server.shutdown().unwrap();
}

#[test]
fn admin_requests_on_the_wire() {
    use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::DescribeConfigsRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("num.partitions", "3")]);
    let mut w = Wire::connect(server.local_addr());
    // validate_only checks and creates nothing.
    let r = w.call(
        5,
        &CreateTopicsRequest::default()
            .with_validate_only(true)
            .with_topics(vec![CreatableTopic::default()
                .with_name(name("checked"))
                .with_num_partitions(-1)
                .with_replication_factor(-1)]),
    );
    assert_eq!((r.topics[0].error_code, r.topics[0].num_partitions), (0, 3));
    assert!(server.broker().registry.topic("checked").is_none());
    // A client that does not allow auto-creation gets UNKNOWN_TOPIC_OR_PARTITION (v4+).
    let m = w.call(
        9,
        &MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(name("checked")))
            ])),
    );
    assert_eq!(
        m.topics[0].error_code,
        ResponseError::UnknownTopicOrPartition.code()
    );
    assert!(server.broker().registry.topic("checked").is_none());
    // The internal offsets topic is neither listed nor creatable.
    let m = w.call(9, &MetadataRequest::default().with_topics(None));
    assert!(m.topics.is_empty(), "{:?}", m.topics);
    let r = w.call(
        5,
        &CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
            .with_name(name("__consumer_offsets"))
            .with_num_partitions(1)
            .with_replication_factor(1)]),
    );
    assert_eq!(
        r.topics[0].error_code,
        ResponseError::TopicAlreadyExists.code()
    );
    // DescribeConfigs of the broker: its settings by Kafka name, filtered by key.
    let r = w.call(
        4,
        &DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(StrBytes::from_static_str("0"))
            .with_configuration_keys(Some(vec![
                StrBytes::from_static_str("num.partitions"),
                StrBytes::from_static_str("log.retention.ms"),
            ]))]),
    );
    let configs: Vec<(String, String)> = r.results[0]
        .configs
        .iter()
        .map(|c| (c.name.to_string(), c.value.as_ref().unwrap().to_string()))
        .collect();
    assert_eq!(
        configs,
        [
            ("num.partitions".to_string(), "3".to_string()),
            ("log.retention.ms".to_string(), "604800000".to_string())
        ]
    );
    server.shutdown().unwrap();
}

#[test]
fn shutdown_answers_parked_fetches_instead_of_waiting_them_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("shutdown.timeout.ms", "60000")]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "quiet", "1048588");
    // A fetch that would wait a minute for data that never comes.
    w.send(11, &fetch_request("quiet", 0, 1 << 20, 60_000, 1));
    // Parked: the request is counted in flight.
    let broker = server.broker().clone();
    let parked = std::time::Instant::now() + patience;
    while broker.metrics.requests[1].load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < parked,
            "the fetch never arrived"
        );
        std::thread::yield_now();
    }
    let stopper = std::thread::spawn(move || server.shutdown());
    // The parked fetch is answered (empty) by the shutdown, well before its minute is up (the
    // Wire read gives up after `patience`, 30 s).
    let r = w.receive::<FetchRequest>(11);
    assert_eq!(r.responses[0].partitions[0].error_code, 0);
    assert!(r.responses[0].partitions[0]
        .records
        .as_ref()
        .is_none_or(|b| b.is_empty()));
    stopper.join().unwrap().unwrap();
}

#[test]
fn lost_topic_metadata_loses_no_data_and_deletions_finish_after_a_restart() {
    use kafka_protocol::messages::DeleteTopicsRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "kept", "1048588");
    for _ in 0..3 {
        assert_eq!(
            produce_code(&mut w, &produce("kept", 0, kafka_batch(&[b"x"], None), -1)),
            0
        );
    }
    server.shutdown().unwrap();
    // The topic's metadata file is lost: the data is adopted, not deleted.
    std::fs::remove_file(dir.path().join(".keel/topics/kept.properties")).unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    assert_eq!(
        log_end(&mut w, "kept"),
        3,
        "the partition and its batches are still served"
    );
    // A real deletion, then a restart: the partition stays gone.
    let r = w.call(
        4,
        &DeleteTopicsRequest::default()
            .with_topic_names(vec![name("kept")])
            .with_timeout_ms(10_000),
    );
    assert_eq!(r.responses[0].error_code, 0);
    server.shutdown().unwrap();
    assert!(!dir.path().join("kept-0").exists());
    let server = start(dir.path(), &[]);
    assert!(server.broker().registry.topic("kept").is_none());
    assert!(server.broker().registry.pending_deletions().is_empty());
    // A crash in the middle of a deletion (tombstone written, metadata removed, partition still
    // there): the next start finishes it.
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "gone", "1048588");
    server.shutdown().unwrap();
    std::fs::create_dir_all(dir.path().join(".keel/deleted")).unwrap();
    std::fs::write(dir.path().join(".keel/deleted/gone"), b"").unwrap();
    std::fs::remove_file(dir.path().join(".keel/topics/gone.properties")).unwrap();
    let server = start(dir.path(), &[]);
    assert!(server.broker().registry.topic("gone").is_none());
    assert!(!dir.path().join("gone-0").exists());
    assert!(server.broker().registry.pending_deletions().is_empty());
    server.shutdown().unwrap();
}

#[test]
fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "mine", "1048588");
    let before = log_end(&mut w, "mine");
    let topics = || {
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join(".keel").join("topics"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let files = topics();
    assert!(!files.is_empty());

    let second = Server::start(config(dir.path(), &[]));
    let message = second.expect_err("refused").to_string();
    assert!(
        message.contains("in use by another Keel process"),
        "{message}"
    );

    // The refused start touched nothing: the first broker's metadata and log are as they were.
    assert_eq!(topics(), files);
    still_serving(&server);
    assert_eq!(log_end(&mut w, "mine"), before);
    server.shutdown().unwrap();
}

#[test]
fn a_fetch_of_thousands_of_small_batches_is_answered_whole() {
    // Recent batches are served from memory, one buffer each: a response of 3,000 of them is
    // more pieces than one writev takes (IOV_MAX = 1024).
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "tiny", "1048588");
    let count = 3000;
    let mut produced = 0usize;
    for i in 0..count {
        let value = format!("v{i}");
        let b = kafka_batch(&[value.as_bytes()], None);
        produced += b.len();
        assert_eq!(produce_code(&mut w, &produce("tiny", 0, b, 1)), 0);
    }
    let r = w.call(
        11,
        &fetch_request("tiny", 0, 64 << 20, 1000, produced as i32),
    );
    let p = &r.responses[0].partitions[0];
    assert_eq!(p.error_code, 0);
    assert_eq!(p.records.as_ref().map_or(0, |r| r.len()), produced);
    still_serving(&server);
    server.shutdown().unwrap();
}

/// The answer to the oldest Produce request sent on `w`: (error code, base offset).
fn produce_answer(w: &mut Wire) -> (i16, i64) {
    let r = w.receive::<ProduceRequest>(9);
    let p = &r.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[test]
fn pipelined_requests_sent_at_once_are_all_answered_in_order_even_before_a_bad_frame() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "piped", "1048588");
    // 24 requests of ~60 KiB in one write: the broker reads them over many reads and hands
    // those that arrive together to the engine together. Then a frame it cannot decode.
    let value = vec![7u8; 60_000];
    let mut all = BytesMut::new();
    for _ in 0..24 {
        all.extend_from_slice(&w.frame(
            9,
            &produce("piped", 0, kafka_batch(&[&value[..]], None), -1),
        ));
    }
    all.extend_from_slice(&frame(&[0x27, 0x0f, 0, 0, 0, 0, 0, 1, 0xff, 0xff]));
    w.send_raw(&all);
    for i in 0..24 {
        assert_eq!(produce_answer(&mut w), (0, i), "request {i}");
    }
    assert!(w.closed_by_broker(), "the bad frame closes the connection");
    assert_eq!(
        log_end(&mut Wire::connect(server.local_addr()), "piped"),
        24
    );
    server.shutdown().unwrap();
}

#[test]
fn a_request_is_answered_while_the_one_behind_it_is_still_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create(&mut w, "slow", "2097152");
    // The first request whole, then half of a 1 MiB one: the broker finds more bytes waiting
    // after the first and reads on, but must not hold the first back until the second is whole.
    let first = w.frame(9, &produce("slow", 0, kafka_batch(&[b"first"], None), -1));
    let big = vec![1u8; 1 << 20];
    let second = w.frame(9, &produce("slow", 0, kafka_batch(&[&big[..]], None), -1));
    let half = second.len() / 2;
    let mut sent = first.to_vec();
    sent.extend_from_slice(&second[..half]);
    w.send_raw(&sent);
    assert_eq!(
        produce_answer(&mut w),
        (0, 0),
        "answered before the rest arrives"
    );
    w.send_raw(&second[half..]);
    assert_eq!(produce_answer(&mut w), (0, 1));
    server.shutdown().unwrap();
}
