//! Guarantee under kill -9 of the broker: a producer with acks=all on an `every-batch` topic
//! records every acknowledgement; the broker process is killed with SIGKILL at a random moment,
//! restarted on the same data, and killed again, several times. At the end every acknowledged
//! message is in the log exactly once, and each producer's messages are in the order it sent them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use futures::executor::block_on;
use rand::Rng;
use rdkafka::producer::FutureRecord;
use rdkafka::Offset;

const CHILD_DIR: &str = "KEEL_BROKER_CHILD_DIR";
const CHILD_PORT: &str = "KEEL_BROKER_CHILD_PORT";
const TEST_NAME: &str = "sigkill_during_acks_all_produce_loses_no_acknowledged_message";
const TOPIC: &str = "crash";

/// The child: a broker on the given port, until killed.
fn child(dir: &str, port: &str) {
    let listen = format!("127.0.0.1:{port}");
    let server = start(
        std::path::Path::new(dir),
        &[("listeners", &listen), ("num.partitions", "2")],
    );
    println!("ready {}", server.local_addr());
    loop {
        std::thread::park();
    }
}

fn spawn_broker(dir: &std::path::Path, port: u16) -> ChildTest {
    let broker = ChildTest::spawn(
        TEST_NAME,
        &[
            (CHILD_DIR, dir.display().to_string()),
            (CHILD_PORT, port.to_string()),
        ],
    );
    broker.wait_for_line("ready 127.0.0.1:");
    broker
}

#[test]
fn sigkill_during_acks_all_produce_loses_no_acknowledged_message() {
    if let (Ok(dir), Ok(port)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_PORT)) {
        child(&dir, &port);
        return;
    }
    let rounds: u32 = std::env::var("KEEL_BROKER_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // payload -> (partition, offset) of every acknowledged message
    let mut acked: HashMap<String, (i32, i64)> = HashMap::new();
    for round in 0..rounds {
        let mut broker = spawn_broker(dir.path(), port);
        let p = producer(
            addr,
            &[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                ("linger.ms", "1"),
                ("message.timeout.ms", "3000"),
                ("reconnect.backoff.max.ms", "100"),
            ],
        );
        let (tx, rx) = mpsc::channel();
        let sender = std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut pending = std::collections::VecDeque::new();
            let deadline = Instant::now() + patience;
            while Instant::now() < deadline {
                let payload = format!("r{round}-{sent:07}");
                match p.send_result(
                    FutureRecord::to(TOPIC)
                        .partition((sent % 2) as i32)
                        .key("k")
                        .payload(&payload),
                ) {
                    Ok(delivery) => pending.push_back((payload, delivery)),
                    Err(_) => break, // the broker is gone and the queue is full: stop
                }
                sent += 1;
                while pending.len() > 64 || (!pending.is_empty() && sent.is_multiple_of(8)) {
                    let (payload, delivery) = pending.pop_front().unwrap();
                    match block_on(delivery) {
                        Ok(Ok(d)) => {
                            if tx.send((payload, d.partition, d.offset)).is_err() {
                                return;
                            }
                        }
                        _ => return, // failures start once the broker is killed
                    }
                }
            }
        });
        let kill_after = rng.random_range(20..600);
        let mut seen = 0;
        let deadline = Instant::now() + patience;
        while seen < kill_after && Instant::now() < deadline {
            if let Ok((payload, partition, offset)) = rx.recv_timeout(Duration::from_millis(100)) {
                acked.insert(payload, (partition, offset));
                seen += 1;
            }
        }
        assert!(seen > 0, "round {round}: nothing acknowledged");
        broker.child.kill().unwrap(); // SIGKILL
        broker.child.wait().unwrap();
        sender.join().unwrap();
        for (payload, partition, offset) in rx.try_iter() {
            acked.insert(payload, (partition, offset));
        }
    }

    // Read everything back from a broker recovering the same data.
    let server = start(dir.path(), &[]);
    let c = consumer(server.local_addr());
    let mut found: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for partition in 0..2 {
        let records = consume(
            &c,
            TOPIC,
            partition,
            Offset::Beginning,
            usize::MAX,
            Duration::from_secs(3),
        );
        let mut last_in_round: HashMap<String, String> = HashMap::new();
        for r in records {
            let payload = String::from_utf8(r.value).unwrap();
            let (round, _) = payload.split_once('-').unwrap();
            if let Some(prev) = last_in_round.insert(round.to_string(), payload.clone()) {
                assert!(
                    prev < payload,
                    "partition {partition}: {payload} after {prev}: out of order"
                );
            }
            found
                .entry(payload)
                .or_default()
                .push((partition, r.offset));
        }
    }
    for (payload, places) in &found {
        assert_eq!(
            places.len(),
            1,
            "{payload} stored more than once: {places:?}"
        );
    }
    for (payload, place) in &acked {
        let places = found
            .get(payload)
            .unwrap_or_else(|| panic!("acknowledged {payload} at {place:?} is lost"));
        assert_eq!(&places[0], place, "{payload} moved");
    }
    println!(
        "{} acknowledged messages over {rounds} kills, all present once",
        acked.len()
    );
    server.shutdown().unwrap();
}
