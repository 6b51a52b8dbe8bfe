//! The broker driven by a real client (librdkafka through the `rdkafka` crate): topics, produce
//! with each acks value, consume from earliest and latest, ListOffsets by time, order.

mod common;

use std::time::Duration;

use common::*;
use futures::executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

fn admin(addr: std::net::SocketAddr) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", addr.to_string())
        .create()
        .unwrap()
}

fn create_topic(addr: std::net::SocketAddr, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let results = block_on(admin(addr).create_topics(&[topic], &AdminOptions::new())).unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Send and wait for the acknowledgement; returns (partition, offset).
fn send(
    p: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    value: &str,
    ts: Option<i64>,
) -> (i32, i64) {
    let mut record = FutureRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(value);
    if let Some(ts) = ts {
        record = record.timestamp(ts);
    }
    let delivery = p.send_result(record).map_err(|(e, _)| e).unwrap();
    let d = block_on(delivery)
        .expect("delivery reported")
        .expect("delivered");
    (d.partition, d.offset)
}

#[test]
fn produce_with_each_acks_and_consume_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    create_topic(addr, "orders", 3, &[("retention.ms", "3600000")]);
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 3];
    for acks in ["0", "1", "all"] {
        let p = producer(addr, &[("acks", acks)]);
        for i in 0..60 {
            let partition = i % 3;
            let value = format!("acks={acks} #{i}");
            let (got_partition, offset) = send(&p, "orders", partition, "k", &value, None);
            assert_eq!(got_partition, partition);
            if acks != "0" {
                assert_eq!(
                    offset,
                    expected[partition as usize].len() as i64,
                    "offsets are dense"
                );
            }
            expected[partition as usize].push(value);
        }
    }
    let c = consumer(addr);
    for (partition, want) in expected.iter().enumerate() {
        let got = consume(
            &c,
            "orders",
            partition as i32,
            Offset::Beginning,
            want.len(),
            Duration::from_secs(5),
        );
        let values: Vec<String> = got
            .iter()
            .map(|r| String::from_utf8(r.value.clone()).unwrap())
            .collect();
        assert_eq!(
            &values, want,
            "partition {partition}: every message, once, in order"
        );
        let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..want.len() as i64).collect::<Vec<_>>());
    }
    let (low, high) = c
        .fetch_watermarks("orders", 1, Duration::from_secs(10))
        .unwrap();
    assert_eq!((low, high), (0, expected[1].len() as i64));
    server.shutdown().unwrap();
}

#[test]
fn consume_from_latest_sees_only_what_comes_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("num.partitions", "1")]);
    let addr = server.local_addr();
    let p = producer(addr, &[("acks", "all")]);
    for i in 0..10 {
        send(&p, "events", 0, "k", &format!("old {i}"), None);
    }
    let c = consumer(addr);
    // Nothing new yet: a consumer at the end gets nothing (its fetches long-poll and return empty).
    let none = consume(&c, "events", 0, Offset::End, 1, Duration::from_millis(800));
    assert!(none.is_empty(), "{none:?}");
    for i in 0..5 {
        send(&p, "events", 0, "k", &format!("new {i}"), None);
    }
    let got = consume(
        &c,
        "events",
        0,
        Offset::Offset(10),
        5,
        Duration::from_secs(5),
    );
    let values: Vec<_> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).to_string())
        .collect();
    assert_eq!(
        values,
        (0..5).map(|i| format!("new {i}")).collect::<Vec<_>>()
    );
    server.shutdown().unwrap();
}

#[test]
fn a_waiting_consumer_is_woken_by_a_produce() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    create_topic(addr, "wake", 1, &[]);
    // Each fetch waits up to 20 s for data: the record can only arrive within the 10 s below if
    // the produce wakes the parked fetch. With acks=1 the producer is answered at write time,
    // before the batch is durable and visible: the fetch must be woken again when it is.
    let c = consumer_with(addr, &[("fetch.wait.max.ms", "20000")]);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("wake", 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let p = producer(addr, &[("acks", "1")]);
    // Produce only once the consumer's first fetch has reached the broker and found nothing (it
    // is then parked), not after a guessed delay.
    let broker = server.broker().clone();
    let producer_thread = std::thread::spawn(move || {
        let fetches = || broker.metrics.requests[1].load(std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + patience;
        while fetches() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer never fetched"
            );
            std::thread::yield_now();
        }
        send(&p, "wake", 0, "k", "late", None)
    });
    let got = consume(&c, "wake", 0, Offset::Beginning, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, b"late");
    producer_thread.join().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn list_offsets_by_time_earliest_and_latest() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    create_topic(addr, "timed", 1, &[]);
    let p = producer(addr, &[("acks", "all")]);
    let t0 = 1_750_000_000_000i64;
    for i in 0..20 {
        send(&p, "timed", 0, "k", &format!("{i}"), Some(t0 + i * 1000));
    }
    let c = consumer(addr);
    for (ts, want) in [
        (t0, 0),
        (t0 + 7_000, 7),
        (t0 + 6_500, 7),
        (t0 + 19_000, 19),
        (t0 + 60_000, -1),
    ] {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("timed", 0, Offset::Offset(ts))
            .unwrap();
        let found = c.offsets_for_times(tpl, Duration::from_secs(10)).unwrap();
        let offset = found.find_partition("timed", 0).unwrap().offset();
        let want = if want < 0 {
            Offset::End
        } else {
            Offset::Offset(want)
        };
        assert_eq!(offset, want, "first offset at or after {ts}");
    }
    let (low, high) = c
        .fetch_watermarks("timed", 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!((low, high), (0, 20));
    server.shutdown().unwrap();
}

#[test]
fn unknown_topics_and_bad_settings_get_kafka_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("auto.create.topics.enable", "false")]);
    let addr = server.local_addr();
    let p = producer(addr, &[("message.timeout.ms", "2000")]);
    let delivery = p
        .send_result(
            FutureRecord::to("missing")
                .partition(0)
                .key("k")
                .payload("v"),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    let err = block_on(delivery).unwrap().unwrap_err().0;
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::MessageTimedOut
            )
        ),
        "{err:?}"
    );
    let a = admin(addr);
    let bad = [
        NewTopic::new("bad/name", 1, TopicReplication::Fixed(1)),
        NewTopic::new("rf3", 1, TopicReplication::Fixed(3)),
        NewTopic::new("compacted", 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact"),
    ];
    let results = block_on(a.create_topics(&bad, &AdminOptions::new())).unwrap();
    let codes: Vec<_> = results.into_iter().map(|r| r.unwrap_err().1).collect();
    assert_eq!(
        codes,
        [
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::InvalidReplicationFactor,
            RDKafkaErrorCode::InvalidConfig
        ]
    );
    create_topic(addr, "dup", 1, &[]);
    let again = block_on(a.create_topics(
        &[NewTopic::new("dup", 1, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))
    .unwrap();
    assert_eq!(
        again[0].as_ref().unwrap_err().1,
        RDKafkaErrorCode::TopicAlreadyExists
    );
    let deleted = block_on(a.delete_topics(&["dup", "never"], &AdminOptions::new())).unwrap();
    assert!(deleted[0].is_ok());
    assert_eq!(
        deleted[1].as_ref().unwrap_err().1,
        RDKafkaErrorCode::UnknownTopicOrPartition
    );
    assert!(server.broker().registry.topic("dup").is_none());
    server.shutdown().unwrap();
}

#[test]
fn topic_configs_are_described_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    create_topic(
        addr,
        "conf",
        2,
        &[
            ("retention.bytes", "1048576"),
            ("flush.policy", "interval"),
            ("flush.ms", "20"),
        ],
    );
    server.shutdown().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    let a = admin(addr);
    let resource = rdkafka::admin::ResourceSpecifier::Topic("conf");
    let described = block_on(a.describe_configs([&resource], &AdminOptions::new())).unwrap();
    let config = described.into_iter().next().unwrap().unwrap();
    let get = |k: &str| config.get(k).and_then(|e| e.value.clone());
    assert_eq!(get("retention.bytes").as_deref(), Some("1048576"));
    assert_eq!(get("flush.policy").as_deref(), Some("interval"));
    assert_eq!(get("flush.ms").as_deref(), Some("20"));
    assert_eq!(get("cleanup.policy").as_deref(), Some("delete"));
    // An interval topic serves what was written (its high watermark is the written offset).
    let p = producer(addr, &[("acks", "all")]);
    send(&p, "conf", 1, "k", "v", None);
    let got = consume(
        &consumer(addr),
        "conf",
        1,
        Offset::Beginning,
        1,
        Duration::from_secs(5),
    );
    assert_eq!(got.len(), 1);
    server.shutdown().unwrap();
}

#[test]
fn compression_type_rewrites_batches_into_the_topic_codec() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    create_topic(addr, "as-produced", 1, &[]);
    create_topic(addr, "as-lz4", 1, &[("compression.type", "lz4")]);
    let p = producer(addr, &[("acks", "all"), ("compression.codec", "gzip")]);
    let values: Vec<String> = (0..20)
        .map(|i| format!("value {i} {}", "x".repeat(200)))
        .collect();
    for topic in ["as-produced", "as-lz4"] {
        for v in &values {
            send(&p, topic, 0, "k", v, None);
        }
        let got = consume(
            &consumer(addr),
            topic,
            0,
            Offset::Beginning,
            values.len(),
            Duration::from_secs(5),
        );
        let got: Vec<String> = got
            .into_iter()
            .map(|r| String::from_utf8(r.value).unwrap())
            .collect();
        assert_eq!(got, values, "{topic}");
    }
    // What is stored: gzip (codec 1) as produced, lz4 (codec 3) where the topic says so.
    let codecs = |topic: &str| -> Vec<u8> {
        let id = keel_engine::PartitionId::new(topic, 0);
        let read = block_on(server.broker().engine.read(
            &id,
            0,
            keel_engine::ReadOptions::default(),
        ))
        .unwrap();
        read.headers().iter().map(|h| h.compression()).collect()
    };
    assert!(codecs("as-produced").iter().all(|&c| c == 1));
    assert!(codecs("as-lz4").iter().all(|&c| c == 3));
    assert!(
        server
            .broker()
            .metrics
            .batches_recompressed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    server.shutdown().unwrap();
}

#[test]
fn a_consumer_reads_thousands_of_one_message_batches_in_order() {
    // Each message its own batch (no batching on the producer), all recent enough to be served
    // from memory: large fetch responses of many small pieces.
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let addr = server.local_addr();
    create_topic(addr, "single", 1, &[]);
    let p = producer(
        addr,
        &[
            ("acks", "1"),
            ("linger.ms", "0"),
            ("batch.num.messages", "1"),
        ],
    );
    let count = 4000;
    let deliveries: Vec<_> = (0..count)
        .map(|i| {
            let value = format!("m{i}");
            p.send_result(
                FutureRecord::to("single")
                    .partition(0)
                    .key("k")
                    .payload(&value),
            )
            .map_err(|(e, _)| e)
            .unwrap()
        })
        .collect();
    for (i, d) in deliveries.into_iter().enumerate() {
        let delivery = block_on(d).expect("delivery reported").expect("delivered");
        assert_eq!(delivery.offset, i as i64);
    }
    let c = consumer_with(addr, &[("fetch.max.bytes", "52428800")]);
    let got = consume(
        &c,
        "single",
        0,
        Offset::Beginning,
        count,
        Duration::from_secs(10),
    );
    assert_eq!(got.len(), count);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as i64);
        assert_eq!(r.value, format!("m{i}").as_bytes());
    }
    server.shutdown().unwrap();
}
