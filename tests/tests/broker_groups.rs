//! Consumer groups with librdkafka: partitions split between members and move when members join
//! or die; a killed member's partitions are taken over from the last committed offset; offsets
//! survive broker restarts; and the two commit patterns, shown by crashing a consumer between
//! commit and processing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures::executor::block_on;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{GroupId, OffsetCommitRequest, OffsetFetchRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;

const CHILD: &str = "KEEL_GROUP_CHILD";
const GROUP_SETTINGS: &[(&str, &str)] = &[("group.initial.rebalance.delay.ms", "200")];

fn create_topic(addr: SocketAddr, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", addr.to_string())
        .create()
        .unwrap();
    for r in block_on(admin.create_topics(
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))
    .unwrap()
    {
        r.unwrap();
    }
}

fn produce_n(addr: SocketAddr, topic: &str, partitions: i32, from: usize, n: usize) {
    let p = producer(addr, &[("acks", "all")]);
    let deliveries: Vec<_> = (from..from + n)
        .map(|i| {
            p.send_result(
                FutureRecord::to(topic)
                    .partition((i % partitions as usize) as i32)
                    .key("k")
                    .payload(&format!("m{i}")),
            )
            .map_err(|(e, _)| e)
            .unwrap()
        })
        .collect();
    for d in deliveries {
        block_on(d).unwrap().unwrap();
    }
}

fn group_consumer(addr: SocketAddr, group: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr.to_string())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("fetch.wait.max.ms", "100")
        .set("log_level", "3");
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c.create().unwrap()
}

/// The child: a group member that prints `assigned <p,p,..>` on every change, and for each
/// message either commits then processes, or processes then commits (`got <partition> <value>`
/// is the processing). With a crash point it aborts between the two steps at that value.
fn child(spec: &str) {
    let f: Vec<&str> = spec.split(' ').collect();
    let [addr, topic, group, mode, crash_at, assignor] = f.as_slice() else {
        panic!("bad spec {spec}")
    };
    let c = group_consumer(
        addr.parse().unwrap(),
        group,
        &[("partition.assignment.strategy", assignor)],
    );
    c.subscribe(&[topic]).unwrap();
    let mut last_assignment = String::new();
    loop {
        let assignment: Vec<String> = c
            .assignment()
            .map(|t| {
                t.elements()
                    .iter()
                    .map(|e| e.partition().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let joined = assignment.join(",");
        if joined != last_assignment {
            println!("assigned {joined}");
            last_assignment = joined;
        }
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string();
        let crash = *crash_at == value;
        match *mode {
            "commit-first" => {
                c.commit_message(&m, CommitMode::Sync).unwrap();
                if crash {
                    std::process::abort();
                }
                println!("got {} {value}", m.partition());
            }
            _ => {
                println!("got {} {value}", m.partition());
                if crash {
                    std::process::abort();
                }
                // A commit that meets a rebalance is refused (REBALANCE_IN_PROGRESS while the
                // group completes it, ILLEGAL_GENERATION after): as a Kafka application does,
                // go on; the message may be processed again by whoever gets its partition.
                if let Err(e) = c.commit_message(&m, CommitMode::Sync) {
                    println!("commit-failed {} {value} {e}", m.partition());
                }
            }
        }
    }
}

fn spawn_member(
    test: &str,
    addr: SocketAddr,
    topic: &str,
    group: &str,
    mode: &str,
    crash_at: &str,
) -> ChildTest {
    spawn_member_with(test, addr, topic, group, mode, crash_at, "range,roundrobin")
}

fn spawn_member_with(
    test: &str,
    addr: SocketAddr,
    topic: &str,
    group: &str,
    mode: &str,
    crash_at: &str,
    assignor: &str,
) -> ChildTest {
    let spec = format!("{addr} {topic} {group} {mode} {crash_at} {assignor}");
    ChildTest::spawn(test, &[(CHILD, spec)])
}

/// Drain events: the latest assignment of each member, and every processed value. Returns how
/// many commits were refused (each may let one processed message be processed again).
fn drain(
    members: &mut [&mut ChildTest],
    assignments: &mut [BTreeSet<i32>],
    got: &mut Vec<String>,
) -> usize {
    let mut refused = 0;
    for (i, m) in members.iter_mut().enumerate() {
        for line in m.lines.try_iter() {
            if line.contains("commit-failed ") {
                refused += 1;
                continue;
            }
            // Lines may carry libtest's "test name ... " prefix: start at the event's word.
            let Some(at) = ["assigned ", "got "].iter().find_map(|w| line.find(w)) else {
                continue;
            };
            let e = &line[at..];
            if let Some(list) = e.strip_prefix("assigned ") {
                assignments[i] = list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|p| p.parse().unwrap())
                    .collect();
            } else if let Some(rest) = e.strip_prefix("got ") {
                got.push(rest.split_once(' ').unwrap().1.to_string());
            }
        }
    }
    refused
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn split_exactly(assignments: &[BTreeSet<i32>], partitions: i32) -> bool {
    let mut all = BTreeSet::new();
    for a in assignments {
        if a.is_empty() {
            return false;
        }
        for p in a {
            if !all.insert(*p) {
                return false;
            }
        }
    }
    all.len() == partitions as usize
}

const REBALANCE_TEST: &str = "members_split_partitions_and_a_killed_members_work_is_taken_over";
const COOPERATIVE_TEST: &str = "the_same_with_the_cooperative_sticky_assignor";

#[test]
fn members_split_partitions_and_a_killed_members_work_is_taken_over() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    rebalance_scenario(REBALANCE_TEST, "range,roundrobin");
}

#[test]
fn the_same_with_the_cooperative_sticky_assignor() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    rebalance_scenario(COOPERATIVE_TEST, "cooperative-sticky");
}

fn rebalance_scenario(test: &str, assignor: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), GROUP_SETTINGS);
    let addr = server.local_addr();
    create_topic(addr, "work", 6);
    produce_n(addr, "work", 6, 0, 300);
    let mut a = spawn_member_with(test, addr, "work", "g", "commit-after", "-", assignor);
    let mut b = spawn_member_with(test, addr, "work", "g", "commit-after", "-", assignor);
    let mut assignments = vec![BTreeSet::new(); 3];
    let mut got = Vec::new();
    let mut refused = 0;
    wait_for("two members to split six partitions", || {
        refused += drain(&mut [&mut a, &mut b], &mut assignments[..2], &mut got);
        split_exactly(&assignments[..2], 6)
    });
    let mut c = spawn_member_with(test, addr, "work", "g", "commit-after", "-", assignor);
    wait_for("a third member to get partitions", || {
        refused += drain(&mut [&mut a, &mut b, &mut c], &mut assignments, &mut got);
        split_exactly(&assignments, 6)
    });
    let described = server.broker().groups.describe("g").unwrap();
    assert_eq!(described.members.len(), 3);
    // b dies without leaving the group: its session expires and a and c take its partitions over.
    let b_partitions = assignments[1].clone();
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let mut ac = vec![assignments[0].clone(), assignments[2].clone()];
    wait_for("a and c to take over b's partitions", || {
        refused += drain(&mut [&mut a, &mut c], &mut ac, &mut got);
        split_exactly(&ac, 6)
    });
    produce_n(addr, "work", 6, 300, 300);
    let expected: BTreeSet<String> = (0..600).map(|i| format!("m{i}")).collect();
    wait_for("every message to be processed", || {
        refused += drain(&mut [&mut a, &mut c], &mut ac, &mut got);
        expected.iter().all(|m| got.contains(m))
    });
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for m in &got {
        *counts.entry(m).or_default() += 1;
    }
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    // Commit after each message: b can have processed at most one message per partition it owned
    // without committing it, and each refused commit leaves one more processed message
    // uncommitted.
    assert!(
        duplicates <= b_partitions.len() + refused,
        "{duplicates} duplicates for {} partitions and {refused} refused commits",
        b_partitions.len()
    );
    for mut m in [a, c] {
        m.child.kill().unwrap();
        m.child.wait().unwrap();
    }
    server.shutdown().unwrap();
}

const PATTERNS_TEST: &str =
    "commit_before_processing_loses_a_message_on_crash_commit_after_does_not";

#[test]
fn commit_before_processing_loses_a_message_on_crash_commit_after_does_not() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), GROUP_SETTINGS);
    let addr = server.local_addr();
    create_topic(addr, "jobs", 1);
    produce_n(addr, "jobs", 1, 0, 20);
    let mut outcome = BTreeMap::new();
    for (mode, group) in [("commit-first", "before"), ("commit-after", "after")] {
        // The first consumer crashes at m10, between the two steps; a second one takes over.
        let mut first = spawn_member(PATTERNS_TEST, addr, "jobs", group, mode, "m10");
        let status = first.child.wait().unwrap();
        assert!(!status.success(), "the first consumer crashed");
        let mut got = Vec::new();
        drain(&mut [&mut first], &mut [BTreeSet::new()], &mut got);
        let mut second = spawn_member(PATTERNS_TEST, addr, "jobs", group, mode, "-");
        wait_for("the second consumer to reach the end", || {
            drain(&mut [&mut second], &mut [BTreeSet::new()], &mut got);
            got.contains(&"m19".to_string())
        });
        second.child.kill().unwrap();
        second.child.wait().unwrap();
        outcome.insert(group, got);
    }
    let before = &outcome["before"];
    assert!(
        !before.contains(&"m10".to_string()),
        "commit-before-processing lost m10: {before:?}"
    );
    assert_eq!(before.len(), 19);
    let after = &outcome["after"];
    assert_eq!(
        after.iter().filter(|m| *m == "m10").count(),
        2,
        "m10 processed again, not lost: {after:?}"
    );
    assert!((0..20).all(|i| after.contains(&format!("m{i}"))));
    server.shutdown().unwrap();
}

fn commit(w: &mut Wire, group: &'static str, offsets: &[(i32, i64)]) {
    let r = w.call(
        8,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str(group)))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("kept")))
                .with_partitions(
                    offsets
                        .iter()
                        .map(|&(p, o)| {
                            OffsetCommitRequestPartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(o)
                                .with_committed_metadata(Some(StrBytes::from_static_str("meta")))
                        })
                        .collect(),
                )]),
    );
    for p in &r.topics[0].partitions {
        assert_eq!(p.error_code, 0);
    }
}

fn fetch_committed(w: &mut Wire, group: &'static str) -> Vec<i64> {
    let r = w.call(
        7,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str(group)))
            .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("kept")))
                .with_partition_indexes(vec![0, 1])])),
    );
    r.topics[0]
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .collect()
}

const RESTART_TEST: &str = "committed_offsets_survive_restarts_clean_and_sigkill";

#[test]
fn committed_offsets_survive_restarts_clean_and_sigkill() {
    if let Ok(dir) = std::env::var("KEEL_GROUP_BROKER_DIR") {
        let server = start(std::path::Path::new(&dir), &[]);
        let mut w = Wire::connect(server.local_addr());
        // Many commits, so the log holds more than one snapshot's worth.
        for i in 0..1500 {
            commit(&mut w, "killed", &[(0, i), (1, 2 * i)]);
        }
        println!("committed");
        loop {
            std::thread::park();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    create_topic(server.local_addr(), "kept", 2);
    commit(&mut w, "clean", &[(0, 5), (1, 7)]);
    assert_eq!(fetch_committed(&mut w, "clean"), [5, 7]);
    server.shutdown().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    assert_eq!(
        fetch_committed(&mut w, "clean"),
        [5, 7],
        "after a clean restart"
    );
    // An rdkafka consumer in that group resumes at the committed offset.
    let c = group_consumer(server.local_addr(), "clean", &[]);
    let committed = c
        .committed_offsets(
            {
                let mut t = rdkafka::TopicPartitionList::new();
                t.add_partition("kept", 0);
                t
            },
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(committed.elements()[0].offset(), rdkafka::Offset::Offset(5));
    drop(c);
    server.shutdown().unwrap();

    // A broker killed with SIGKILL after its commits were acknowledged.
    let mut child = ChildTest::spawn(
        RESTART_TEST,
        &[("KEEL_GROUP_BROKER_DIR", dir.path().display().to_string())],
    );
    child.wait_for_line("committed");
    child.child.kill().unwrap();
    child.child.wait().unwrap();
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    assert_eq!(
        fetch_committed(&mut w, "killed"),
        [1499, 2998],
        "after SIGKILL"
    );
    assert_eq!(fetch_committed(&mut w, "clean"), [5, 7]);
    server.shutdown().unwrap();
}

#[test]
fn lag_is_reported_per_group_and_partition() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("metrics.listener", "127.0.0.1:0")]);
    create_topic(server.local_addr(), "kept", 2);
    produce_n(server.local_addr(), "kept", 2, 0, 40);
    let mut w = Wire::connect(server.local_addr());
    commit(&mut w, "slow", &[(0, 5), (1, 20)]);
    let mut http = std::net::TcpStream::connect(server.metrics_addr().unwrap()).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("keel_group_lag{group=\"slow\",topic=\"kept\",partition=\"0\"} 15"),
        "{text}"
    );
    assert!(
        text.contains("keel_group_lag{group=\"slow\",topic=\"kept\",partition=\"1\"} 0"),
        "{text}"
    );
    assert!(text.contains("keel_broker_offset_commits 1"), "{text}");
    server.shutdown().unwrap();
}

#[test]
fn auto_offset_reset_earliest_latest_and_none() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), GROUP_SETTINGS);
    let addr = server.local_addr();
    create_topic(addr, "reset", 1);
    produce_n(addr, "reset", 1, 0, 10);
    let read = |group: &str, reset: &str, want: usize| -> Result<Vec<String>, String> {
        let c = group_consumer(addr, group, &[("auto.offset.reset", reset)]);
        c.subscribe(&["reset"]).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < want && Instant::now() < deadline {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(String::from_utf8_lossy(m.payload().unwrap()).to_string()),
                Some(Err(e)) => return Err(e.to_string()),
                None => {}
            }
        }
        Ok(out)
    };
    // earliest: from the start.
    assert_eq!(read("e", "earliest", 10).unwrap().len(), 10);
    // none: no committed offset is an error for the client.
    let err = read("n", "error", 1).unwrap_err();
    assert!(err.to_lowercase().contains("offset"), "{err}");
    // latest: only what arrives after the member is positioned (at the end: offset 10). It is
    // positioned once the broker answered its ListOffsets; a Fetch after that proves the client
    // has the answer.
    let requests = |key: kafka_protocol::messages::ApiKey| {
        server.broker().metrics.requests[key as usize].load(std::sync::atomic::Ordering::Relaxed)
    };
    let (list_before, fetch_before) = (
        requests(kafka_protocol::messages::ApiKey::ListOffsets),
        requests(kafka_protocol::messages::ApiKey::Fetch),
    );
    let c = group_consumer(addr, "l", &[("auto.offset.reset", "latest")]);
    c.subscribe(&["reset"]).unwrap();
    let mut early = Vec::new();
    let mut fetches_after_list = None;
    wait_for("the latest consumer to be positioned", || {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            early.push(m.offset());
        }
        if fetches_after_list.is_none()
            && requests(kafka_protocol::messages::ApiKey::ListOffsets) > list_before
        {
            fetches_after_list =
                Some(requests(kafka_protocol::messages::ApiKey::Fetch).max(fetch_before));
        }
        fetches_after_list.is_some_and(|f| requests(kafka_protocol::messages::ApiKey::Fetch) > f)
    });
    assert!(early.is_empty(), "nothing before the end: {early:?}");
    produce_n(addr, "reset", 1, 10, 5);
    let mut latest = Vec::new();
    wait_for("the new messages", || {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            latest.push(String::from_utf8_lossy(m.payload().unwrap()).to_string());
        }
        latest.len() == 5
    });
    assert_eq!(
        latest,
        (10..15).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    server.shutdown().unwrap();
}

#[test]
fn groups_are_listed_described_and_deleted() {
    use kafka_protocol::messages::{DeleteGroupsRequest, DescribeGroupsRequest, ListGroupsRequest};
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), GROUP_SETTINGS);
    let addr = server.local_addr();
    create_topic(addr, "kept", 2);
    let mut w = Wire::connect(addr);
    commit(&mut w, "offsets-only", &[(0, 3)]);
    // An active member in another group.
    let c = group_consumer(addr, "active", &[]);
    c.subscribe(&["kept"]).unwrap();
    wait_for("the member to get partitions", || {
        let _ = c.poll(Duration::from_millis(50));
        c.assignment().is_ok_and(|a| a.count() == 2)
    });
    let listed = w.call(4, &ListGroupsRequest::default());
    let mut names: Vec<(String, String)> = listed
        .groups
        .iter()
        .map(|g| (g.group_id.0.to_string(), g.group_state.to_string()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("active".to_string(), "Stable".to_string()),
            ("offsets-only".to_string(), "Empty".to_string())
        ]
    );
    let group = |name: &'static str| GroupId(StrBytes::from_static_str(name));
    let described = w.call(
        5,
        &DescribeGroupsRequest::default().with_groups(vec![
            group("active"),
            group("offsets-only"),
            group("nobody"),
        ]),
    );
    let states: Vec<&str> = described
        .groups
        .iter()
        .map(|g| g.group_state.as_str())
        .collect();
    assert_eq!(states, ["Stable", "Empty", "Dead"]);
    assert_eq!(described.groups[0].members.len(), 1);
    assert_eq!(described.groups[0].protocol_type.as_str(), "consumer");
    assert!(!described.groups[0].members[0].member_assignment.is_empty());
    let deleted = w.call(
        2,
        &DeleteGroupsRequest::default().with_groups_names(vec![
            group("active"),
            group("offsets-only"),
            group("nobody"),
        ]),
    );
    let codes: Vec<i16> = deleted.results.iter().map(|r| r.error_code).collect();
    use kafka_protocol::ResponseError as E;
    assert_eq!(
        codes,
        [E::NonEmptyGroup.code(), 0, E::GroupIdNotFound.code()]
    );
    assert_eq!(
        fetch_committed(&mut w, "offsets-only"),
        [-1, -1],
        "a deleted group's offsets are gone"
    );
    drop(c);
    server.shutdown().unwrap();
    // ... also after a restart (the deletion is durable).
    let server = start(dir.path(), &[]);
    let mut w = Wire::connect(server.local_addr());
    assert_eq!(fetch_committed(&mut w, "offsets-only"), [-1, -1]);
    server.shutdown().unwrap();
}
