//! Guarantee 3 under kill -9 on the real disk (io_uring, O_DIRECT): a child process appends with
//! `every-batch` and prints each acknowledgement; the parent kills it with SIGKILL at a random
//! moment, reopens the log and checks that every acknowledged append is there, intact, at its
//! offset, and that the log is a contiguous run of valid batches. Repeated over many rounds on the
//! same data directory, with clean and unclean reopenings in between.
//!
//! `KEEL_KILL_DATA_DIR=DIR` puts the data directory in `DIR`, and `KEEL_KILL_FULL_DISK=1` lets
//! the disk fill during the run: the child skips appends refused with `Full` and retries its
//! opening, and a round may acknowledge nothing. `tests/soak/full-disk-kill.sh` runs it on a
//! small loop-mounted ext4 that another process fills over and over (not part of CI).

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

/// Is the disk expected to fill during the run (`KEEL_KILL_FULL_DISK=1`)?
fn full_disk_soak() -> bool {
    std::env::var("KEEL_KILL_FULL_DISK").is_ok_and(|v| v == "1")
}

/// One scenario: which test re-runs itself as the child, over how many partitions, with how many
/// appends in flight and of which sizes.
#[derive(Clone, Copy)]
struct Scenario {
    test_name: &'static str,
    partitions: u32,
    inflight: usize,
    max_batch_bytes: usize,
}

/// One partition, appends of 100 B to 100 KB: mostly the segment path.
const ONE_PARTITION: Scenario = Scenario {
    test_name: "sigkill_at_random_moments_loses_no_acknowledged_append",
    partitions: 1,
    inflight: 8,
    max_batch_bytes: 100_000,
};

/// Many partitions, small appends: the shard journal, several writes in flight, lazy segments
/// and checkpoints of a 4 MiB ring, then replay after each kill.
const MANY_PARTITIONS: Scenario = Scenario {
    test_name: "sigkill_with_many_partitions_loses_nothing_the_journal_acknowledged",
    partitions: 24,
    inflight: 48,
    max_batch_bytes: 6_000,
};

fn partition(i: u32) -> PartitionId {
    PartitionId::new("killed", i)
}

fn partition_config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 4 * 1024 * 1024,
        preallocate_bytes: 1024 * 1024,
        max_message_bytes: 128 * 1024,
        ..Default::default()
    }
}

fn engine_config(dir: &std::path::Path) -> keel_engine::EngineConfig {
    let mut config = uring_config(dir, 1);
    config.journal_bytes = keel_engine::constants::journal_bytes_min;
    // Recovery points inside the 4 MiB segments, so kills land before, during and after them.
    config.recovery_point_bytes = 512 * 1024;
    config
}

/// The child: append forever (until killed), printing `ack <partition> <offset> <tag>` after
/// each completes.
fn child(s: Scenario, dir: &str, start_tag: u64) {
    let full_disk = full_disk_soak();
    let engine = loop {
        match Engine::open(engine_config(std::path::Path::new(dir))) {
            Ok(engine) => break engine,
            Err(e) if full_disk => {
                eprintln!("open refused: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let parts: Vec<_> = (0..s.partitions).map(partition).collect();
    block_on(async {
        for p in &parts {
            while let Err(e) = engine.create_partition(p, partition_config()).await {
                assert!(full_disk, "{e}");
                eprintln!("create refused: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let mut inflight = FuturesUnordered::new();
        let mut tag = start_tag;
        loop {
            while inflight.len() < s.inflight {
                let size = 100 + (tag as usize * 7919) % s.max_batch_bytes;
                let (e, i) = (&engine, (tag % s.partitions as u64) as u32);
                let p = &parts[i as usize];
                let t = tag;
                inflight.push(async move { (i, t, e.append(p, batch(t, 1, size, 0), 0).await) });
                tag += 1;
            }
            let (i, t, result) = inflight.next().await.unwrap();
            match result {
                Ok(out) => println!("ack {i} {} {t}", out.base_offset),
                Err(keel_engine::Error::Full { .. }) if full_disk => {}
                Err(e) => panic!("{e}"),
            }
        }
    });
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_append() {
    kill_rounds(ONE_PARTITION);
}

#[test]
fn sigkill_with_many_partitions_loses_nothing_the_journal_acknowledged() {
    kill_rounds(MANY_PARTITIONS);
}

fn kill_rounds(s: Scenario) {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let start: u64 = std::env::var(CHILD_START_TAG).unwrap().parse().unwrap();
        child(s, &dir, start);
        return;
    }
    let rounds: u64 = std::env::var("KEEL_KILL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let dir = match std::env::var("KEEL_KILL_DATA_DIR") {
        Ok(parent) => tempfile::tempdir_in(parent).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let full_disk = full_disk_soak();
    let mut acked: BTreeMap<u32, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut replayed = 0;
    let mut resumed = 0;
    for round in 0..rounds {
        // The child's stderr (a panic, say) is shown if it acknowledges nothing.
        let child_stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", s.test_name, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_START_TAG, (round * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(child_stderr.reopen().unwrap()))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ack ") {
                    let mut words = rest.split(' ').map(|w| w.parse::<u64>().unwrap());
                    let (i, o, t) = (words.next(), words.next(), words.next());
                    let _ = tx.send((i.unwrap() as u32, o.unwrap(), t.unwrap()));
                }
            }
        });
        // Kill after a random number of acknowledgements (bounded in time either way).
        let kill_after = rng.random_range(1..400 * s.partitions as usize);
        let deadline = Instant::now() + Duration::from_secs(if full_disk { 8 } else { 30 });
        let mut seen = 0;
        while seen < kill_after && Instant::now() < deadline {
            if let Ok((i, offset, tag)) = rx.recv_timeout(Duration::from_millis(100)) {
                acked.entry(i).or_default().insert(offset, tag);
                seen += 1;
            }
        }
        assert!(
            seen > 0 || full_disk,
            "seed {seed} round {round}: the child acknowledged nothing in 30 s; its stderr:\n{}",
            std::fs::read_to_string(child_stderr.path()).unwrap_or_default()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        for (i, offset, tag) in rx.try_iter() {
            acked.entry(i).or_default().insert(offset, tag);
        }

        // Reopenings that resume inside a segment, at a recovery point (decision 39).
        let point = dir
            .path()
            .join(partition(0).to_string())
            .join(keel_engine::segment::path::RECOVERY_POINT_FILE);
        let words = std::fs::read_to_string(point).unwrap_or_default();
        let words: Vec<&str> = words.split_whitespace().collect();
        resumed += u32::from(words.len() == 4 && words[1] != "0");
        let engine = Engine::open(engine_config(dir.path())).unwrap();
        replayed += engine.metrics().journal_replayed;
        for (&i, expected) in acked.iter_mut() {
            let log = log_contents(&engine, &partition(i));
            for (offset, tag) in expected.iter() {
                assert_eq!(
                    log.get(offset),
                    Some(tag),
                    "seed {seed} round {round}: {} acknowledged offset {offset} lost",
                    partition(i)
                );
            }
            assert_eq!(
                log.keys().copied().collect::<Vec<_>>(),
                (0..log.len() as u64).collect::<Vec<_>>(),
                "seed {seed}: gap in {}",
                partition(i)
            );
            // Unacknowledged appends that survived are kept: later rounds must see them unchanged.
            *expected = log;
        }
        if round % 2 == 0 {
            block_on(engine.shutdown()).unwrap();
        }
    }
    if s.partitions > 1 {
        assert!(
            replayed > 0,
            "seed {seed}: nothing was ever replayed from the journal"
        );
    } else if rounds >= 10 && !full_disk {
        assert!(
            resumed > 0,
            "seed {seed}: no reopening resumed at a recovery point inside a segment"
        );
    }
    println!("{resumed} of {rounds} reopenings resumed inside a segment");
}
