//! Guarantee 3 under kill -9 on the real disk (io_uring, O_DIRECT): a child process appends with
//! `every-batch` and prints each acknowledgement; the parent kills it with SIGKILL at a random
//! moment, reopens the log and checks that every acknowledged append is there, intact, at its
//! offset, and that the log is a contiguous run of valid batches. Repeated over many rounds on the
//! same data directory, with clean and unclean reopenings in between.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use keel_engine::{block_on, Engine, PartitionConfig, PartitionId};
use rand::Rng;

const CHILD_DIR: &str = "KEEL_KILL_CHILD_DIR";
const CHILD_START_TAG: &str = "KEEL_KILL_CHILD_START_TAG";
const TEST_NAME: &str = "sigkill_at_random_moments_loses_no_acknowledged_append";

fn partition() -> PartitionId {
    PartitionId::new("killed", 0)
}

fn partition_config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 4 * 1024 * 1024,
        preallocate_bytes: 1024 * 1024,
        max_message_bytes: 128 * 1024,
        ..Default::default()
    }
}

/// The child: append forever (until killed), printing `ack <offset> <tag>` after each completes.
fn child(dir: &str, start_tag: u64) {
    let engine = Engine::open(uring_config(std::path::Path::new(dir), 1)).unwrap();
    let p = partition();
    block_on(async {
        engine
            .create_partition(&p, partition_config())
            .await
            .unwrap();
        let mut inflight = FuturesUnordered::new();
        let mut tag = start_tag;
        loop {
            while inflight.len() < 8 {
                let size = 100 + (tag as usize * 7919) % 100_000;
                let (e, p) = (&engine, &p);
                let t = tag;
                inflight.push(async move { (t, e.append(p, batch(t, 1, size, 0), 0).await) });
                tag += 1;
            }
            let (t, result) = inflight.next().await.unwrap();
            let out = result.unwrap();
            println!("ack {} {t}", out.base_offset);
        }
    });
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_append() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let start: u64 = std::env::var(CHILD_START_TAG).unwrap().parse().unwrap();
        child(&dir, start);
        return;
    }
    let rounds: u64 = std::env::var("KEEL_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_START_TAG, (round * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ack ") {
                    let (o, t) = rest.split_once(' ').unwrap();
                    let _ = tx.send((o.parse::<u64>().unwrap(), t.parse::<u64>().unwrap()));
                }
            }
        });
        // Kill after a random number of acknowledgements (bounded in time either way).
        let kill_after = rng.random_range(1..400);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        while seen < kill_after && Instant::now() < deadline {
            if let Ok((offset, tag)) = rx.recv_timeout(Duration::from_millis(100)) {
                acked.insert(offset, tag);
                seen += 1;
            }
        }
        assert!(
            seen > 0,
            "round {round}: the child acknowledged nothing in 30 s"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());

        let engine = Engine::open(uring_config(dir.path(), 1)).unwrap();
        let p = partition();
        let log = log_contents(&engine, &p);
        for (offset, tag) in &acked {
            assert_eq!(
                log.get(offset),
                Some(tag),
                "seed {seed} round {round}: acknowledged offset {offset} lost"
            );
        }
        assert_eq!(
            log.keys().copied().collect::<Vec<_>>(),
            (0..log.len() as u64).collect::<Vec<_>>(),
            "seed {seed}: gap"
        );
        // Unacknowledged appends that survived are kept: later rounds must see them unchanged.
        acked = log;
        if round % 2 == 0 {
            block_on(engine.shutdown()).unwrap();
        }
    }
}
