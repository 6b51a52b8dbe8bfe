//! Faults injected by the simulator: failed writes and fdatasyncs, a full disk, a slow disk, and
//! power cuts at random moments. Every test states what the engine guarantees and checks it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use keel_engine::io::sim::{CrashKind, FaultConfig, Hold, SimFs};
use keel_engine::io::Storage;
use keel_engine::{block_on, constants, Durability, Engine, Error, PartitionConfig, PartitionId};

fn config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 2 * 1024 * 1024,
        preallocate_bytes: 512 * 1024,
        max_message_bytes: 256 * 1024,
        cache_bytes: 256 * 1024,
        ..Default::default()
    }
}

/// Append `count` batches with `concurrency` in flight; returns offset → tag of those acknowledged
/// and the number that failed.
async fn append_many(
    engine: &Engine,
    p: &PartitionId,
    tags: std::ops::Range<u64>,
    concurrency: usize,
) -> (BTreeMap<u64, u64>, usize) {
    let mut acked = BTreeMap::new();
    let mut failed = 0;
    let mut inflight = FuturesUnordered::new();
    let mut next = tags.start;
    loop {
        while inflight.len() < concurrency && next < tags.end {
            let tag = next;
            next += 1;
            let size = 200 + (tag as usize * 7919) % 20_000;
            inflight.push(async move {
                (
                    tag,
                    engine.append(p, batch(tag, 1, size, tag as i64), 0).await,
                )
            });
        }
        match inflight.next().await {
            Some((tag, Ok(out))) => {
                acked.insert(out.base_offset, tag);
            }
            Some((_, Err(_))) => failed += 1,
            None => return (acked, failed),
        }
    }
}

/// A disk whose operations complete in random order: each takes 20 µs plus up to `jitter_ms`
/// (the runtime's timers tick in milliseconds: more jitter, more reordering).
fn out_of_order_disk(seed: u64, jitter_ms: u64) -> SimFs {
    SimFs::new(FaultConfig {
        seed,
        latency: Duration::from_micros(20),
        latency_jitter: Duration::from_millis(jitter_ms),
        ..Default::default()
    })
}

/// The log holds exactly `acked`: read live, then from disk after each of `crashes`.
fn assert_log_is(
    engine: Engine,
    fs: &SimFs,
    p: &PartitionId,
    acked: &BTreeMap<u64, u64>,
    crashes: &[CrashKind],
    seed: u64,
) {
    assert_eq!(&log_contents(&engine, p), acked, "seed {seed}: live");
    let images: Vec<_> = crashes.iter().map(|&k| (k, fs.crash_image(k))).collect();
    drop(engine);
    for (kind, image) in images {
        let engine = Engine::open(sim_config(&image, 1)).unwrap();
        assert_eq!(
            &log_contents(&engine, p),
            acked,
            "seed {seed}: from disk after a {kind:?} crash"
        );
        // A recovery point the engine wrote always lies on its log (decision 39).
        assert_eq!(
            engine.metrics().recovery_points_mismatched,
            0,
            "seed {seed}: a recovery point off the log after a {kind:?} crash"
        );
    }
}

#[test]
fn failed_writes_and_fdatasyncs_roll_back_and_the_log_carries_on() {
    // A lone small append goes out as one write durable by itself (`RWF_DSYNC`): a failed flush
    // fails that write. An append larger than one write goes out as plain writes and an
    // fdatasync. Each failure rolls the log back to its last durable point.
    for (what, inject, size) in [
        ("write", Inject::Write, 100),
        ("write", Inject::Flush, 100),
        ("fdatasync", Inject::Flush, 1536 * 1024),
    ] {
        let fs = SimFs::default();
        let p = PartitionId::new("fail", 0);
        // The segment path's own rollback (with the journal, a failed journal write turns the
        // journal off instead: `a_failed_journal_write_or_sync_loses_nothing`).
        let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
        block_on(async {
            let large = PartitionConfig {
                max_message_bytes: 2 * 1024 * 1024,
                segment_bytes: 4 * 1024 * 1024,
                ..config()
            };
            engine.create_partition(&p, large).await.unwrap();
            // Large enough that no runway of zeros follows it (`runway_group_bytes_max`): a zero
            // write in flight would take the injected failure. And the leader-epoch file
            // written beside it must have landed, or it would take an injected flush failure.
            engine.append(&p, batch(1, 1, 100_000, 0), 0).await.unwrap();
            wait_for_epoch_file(&fs, &p);
            let durable_writes = engine.metrics().segment_durable_writes;
            match inject {
                Inject::Write => fs.fail_next_writes(1),
                Inject::Flush => fs.fail_next_syncs(1),
            }
            let err = match engine.append(&p, batch(2, 1, size, 0), 0).await {
                Ok(out) => panic!("{what}, {size} bytes: answered {out:?}"),
                Err(err) => err,
            };
            assert!(
                matches!(err, Error::Io { op, .. } if op == what),
                "{what}, {size} bytes: {err}"
            );
            assert_eq!(
                engine.metrics().segment_durable_writes - durable_writes,
                u64::from(size < 4096),
                "{what}, {size} bytes: only a lone small write goes out durable by itself"
            );
            // The failed append is gone, and its offset is reused.
            let out = engine.append(&p, batch(3, 1, 100, 0), 0).await.unwrap();
            assert_eq!(out.base_offset, 1, "{what}, {size} bytes");
        });
        assert_eq!(
            log_contents(&engine, &p),
            BTreeMap::from([(0, 1), (1, 3)]),
            "{what}, {size} bytes"
        );
        assert_eq!(engine.metrics().io_errors, 1);
        drop(engine);
        let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
        assert_eq!(
            log_contents(&engine, &p),
            BTreeMap::from([(0, 1), (1, 3)]),
            "{what}, {size} bytes, after reopen"
        );
    }
}

/// An append answered with an error is not in the log, even after a crash right at the answer:
/// the error waits for the rollback's cut to reach the disk. The append's write lands and its
/// fdatasync fails, so its bytes are on disk whole; every operation takes 2 ms, so a cut still
/// in flight when the engine is dropped (a crash: completed writes stay, nothing else runs)
/// would leave them there, and the reopened log would have the failed batch back.
#[test]
fn a_failed_append_stays_gone_after_a_crash_at_its_error() {
    for round in 0..3 {
        let fs = SimFs::new(FaultConfig {
            latency: Duration::from_millis(2),
            ..Default::default()
        });
        let p = PartitionId::new("gone", 0);
        let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
        block_on(async {
            let large = PartitionConfig {
                max_message_bytes: 2 * 1024 * 1024,
                ..config()
            };
            engine.create_partition(&p, large).await.unwrap();
            // No runway of zeros after it, and its leader-epoch file landed: neither may take
            // the injected failure (see `failed_writes_and_fdatasyncs_roll_back_and_the_log_carries_on`).
            engine.append(&p, batch(1, 1, 100_000, 0), 0).await.unwrap();
            wait_for_epoch_file(&fs, &p);
            fs.fail_next_syncs(1);
            let err = engine
                .append(&p, batch(2, 1, 1536 * 1024 + round * 1000, 0), 0)
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::Io { op, .. } if op == "fdatasync"),
                "{err}"
            );
        });
        drop(engine);
        let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
        assert_eq!(
            log_contents(&engine, &p),
            BTreeMap::from([(0, 1)]),
            "round {round}: the failed append came back"
        );
    }
}

/// A disk that keeps refusing a rollback's cut: the failed append is answered after
/// `rollback_answer_attempts` tries, and a clean shutdown then leaves the partition without
/// its marker (the file may hold batches past the log's end, which the next appends would
/// land in front of), so the next start scans it.
#[test]
fn a_shutdown_while_the_disk_refuses_a_rollback_leaves_the_log_to_be_scanned() {
    let fs = SimFs::default();
    let p = PartitionId::new("refused-cut", 0);
    let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
    block_on(async {
        engine.create_partition(&p, config()).await.unwrap();
        engine.append(&p, batch(1, 1, 100, 0), 0).await.unwrap();
        // Every O_DIRECT write fails: the append's, then the cut's rewrite of the block that
        // ends the log (small files are written another way and still succeed).
        fs.fail_next_writes(u32::MAX);
        let err = engine
            .append(&p, batch(2, 1, 10_000, 0), 0)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        engine.shutdown().await.unwrap();
    });
    assert!(engine.metrics().io_errors >= u64::from(constants::rollback_answer_attempts));
    drop(engine);
    let marker = "/sim/data/refused-cut-0/.clean-shutdown";
    assert_eq!(fs.file_len(std::path::Path::new(marker)), None);
    fs.fail_next_writes(0);
    let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
    assert_eq!(log_contents(&engine, &p), BTreeMap::from([(0, 1)]));
}

#[derive(Clone, Copy)]
enum Inject {
    Write,
    Flush,
}

#[test]
fn random_io_errors_never_lose_or_invent_an_acknowledged_append() {
    let mut deferred_writes = 0;
    // Seeds 5 to 8: a few appends in flight on a disk that completes out of order, without the
    // journal, so that failures also hit writes whose carried block is queued behind another.
    for seed in 1..=8 {
        let queued = seed > 4;
        let fs = SimFs::new(FaultConfig {
            seed,
            write_error_rate: 0.03,
            sync_error_rate: 0.03,
            latency: Duration::from_micros(if queued { 20 } else { 0 }),
            latency_jitter: Duration::from_millis(if queued { 2 } else { 0 }),
            failed_sync_drops_writes: true,
            ..Default::default()
        });
        let p = PartitionId::new("flaky", 0);
        let engine = Engine::open(recovery_points_every(
            if queued {
                without_journal(sim_config(&fs, 1))
            } else {
                sim_config(&fs, 1)
            },
            128 * 1024,
        ))
        .unwrap();
        let (acked, failed) = block_on(async {
            engine.create_partition(&p, config()).await.unwrap();
            append_many(&engine, &p, 0..600, if queued { 4 } else { 16 }).await
        });
        deferred_writes += engine.metrics().deferred_writes;
        // With the journal an append may survive every fault (the journal made it durable, or
        // the segment path took over): the faults hit something if anything failed.
        assert!(
            failed > 0 || engine.metrics().io_errors > 0,
            "seed {seed}: the faults should have hit something"
        );
        fs.set_faults(FaultConfig::default());
        // Exactly the acknowledged appends, nothing else, at the offsets they were given: live,
        // after a process crash, and after a power cut on a disk that lost for good every write
        // a failed sync covered (nothing acknowledged rests on one).
        assert_log_is(
            engine,
            &fs,
            &p,
            &acked,
            &[CrashKind::Process, CrashKind::PowerCut],
            seed,
        );
    }
    assert!(deferred_writes > 0, "no carried block was ever queued");
}

/// Writes complete in any order on a real device. With batches that are not whole blocks a
/// write's partial last block is rewritten by the next write, so two writes of one block must
/// never be in flight together, or the older version could land last. Random completion order,
/// many unaligned appends in flight (a deep pipeline, then a few at a time, where a write's
/// carried block is queued behind the write before while its later blocks go at once); then
/// every acknowledged append is read back from memory and, after a crash that keeps completed
/// writes, from disk.
#[test]
fn writes_completing_out_of_order_never_mix_up_a_block() {
    for (seed, concurrency) in [(0u64, 64), (1, 64), (2, 3), (3, 3), (4, 5), (5, 5)] {
        let fs = out_of_order_disk(seed, 2);
        let p = PartitionId::new("jitter", 0);
        // A few in flight: without the journal (which would take such small groups and leave
        // the segment writes to the background), every append waits for its segment write.
        let engine = Engine::open(if concurrency < 64 {
            without_journal(sim_config(&fs, 1))
        } else {
            sim_config(&fs, 1)
        })
        .unwrap();
        let (acked, failed) = block_on(async {
            engine.create_partition(&p, config()).await.unwrap();
            append_many(&engine, &p, 0..800, concurrency).await
        });
        assert_eq!((acked.len(), failed), (800, 0), "seed {seed}");
        if concurrency < 64 {
            assert!(
                engine.metrics().deferred_writes > 0,
                "seed {seed}: no carried block was queued behind an earlier write"
            );
        }
        assert_log_is(engine, &fs, &p, &acked, &[CrashKind::Process], seed);
    }
}

/// A lightly loaded `every-batch` partition writes zeros ahead of its log (the runway). Those
/// zero writes must never land on a block that holds, or is about to hold, log data, whatever
/// order writes complete in. Single appends (small groups: the runway extends after each)
/// alternate with appends of over 1 MiB whose first write reaches into the stretch being zeroed.
#[test]
fn the_runway_of_zeros_never_overwrites_the_log() {
    for seed in 0..3u64 {
        let fs = out_of_order_disk(seed, 5);
        let p = PartitionId::new("runway", 0);
        // The runway serves small groups that sync their own segment: without a journal.
        let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
        let config = PartitionConfig {
            segment_bytes: 8 * 1024 * 1024,
            preallocate_bytes: 4 * 1024 * 1024,
            max_message_bytes: 256 * 1024,
            ..Default::default()
        };
        let acked = block_on(async {
            engine.create_partition(&p, config).await.unwrap();
            let mut acked = BTreeMap::new();
            for tag in 0..80u64 {
                // One append alone: a small group, after which the runway extends...
                let size = 20_000 + (tag as usize * 104_729) % 40_000;
                let out = engine.append(&p, batch(tag, 1, size, 0), 0).await.unwrap();
                acked.insert(out.base_offset, tag);
                if tag % 2 == 0 {
                    continue;
                }
                // ...and at once over 1 MiB in one append: its first write (1 MiB from the
                // head) reaches into the stretch being zeroed.
                let tags: Vec<u64> = (0..8).map(|t| 10_000 + tag * 100 + t).collect();
                let mut bytes = bytes::BytesMut::new();
                for &t in &tags {
                    bytes.extend_from_slice(&batch(
                        t,
                        1,
                        140_000 + (t as usize * 7919) % 40_000,
                        0,
                    ));
                }
                let out = engine.append(&p, bytes.freeze(), 0).await.unwrap();
                for (i, t) in tags.into_iter().enumerate() {
                    acked.insert(out.base_offset + i as u64, t);
                }
            }
            acked
        });
        assert!(
            engine.metrics().runway_writes > 0,
            "seed {seed}: the runway should have run"
        );
        let crashes = [CrashKind::Process, CrashKind::PowerCut];
        assert_log_is(engine, &fs, &p, &acked, &crashes, seed);
    }
}

#[test]
fn a_full_disk_rejects_appends_cleanly_and_recovers_when_space_returns() {
    // 3 MiB for the log, and the journal's file (which is allocated whole when the engine opens).
    let journal = constants::journal_bytes_min + 8192;
    let capacity = 3 * 1024 * 1024 + journal;
    let fs = SimFs::new(FaultConfig {
        capacity_bytes: Some(capacity),
        ..Default::default()
    });
    let p = PartitionId::new("full", 0);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let (acked, failed) = block_on(async {
        engine.create_partition(&p, config()).await.unwrap();
        append_many(&engine, &p, 0..400, 4).await
    });
    assert!(failed > 0 && !acked.is_empty());
    assert!(engine.metrics().disk_full_errors > 0);
    assert!(fs.used_bytes() <= capacity);
    // Readable and consistent while full.
    assert_eq!(log_contents(&engine, &p), acked);
    // One at a time, appends are taken while the space already allocated holds them (a group of
    // four may have needed more), then refused.
    let mut expected = acked.clone();
    let err = append_until_refused(&engine, &p, 9_000..9_100, &mut expected);
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert_eq!(log_contents(&engine, &p), expected);
    // Space comes back: appends succeed again, right after the last acknowledged one.
    fs.set_faults(FaultConfig::default());
    let out = block_on(engine.append(&p, batch(10_000, 1, 20_000, 0), 0)).unwrap();
    assert_eq!(out.base_offset, *expected.keys().last().unwrap() + 1);
    expected.insert(out.base_offset, 10_000);
    assert_eq!(log_contents(&engine, &p), expected);
}

/// A disk so full that a rollback's cut cannot write even its small files (the leader-epoch
/// checkpoint and the recovery point, each written to a new file first): the partition tries
/// again every `rewrite_backoff`, not in a tight loop (a soak on a full ext4 found a reopened
/// engine spinning on a core, ~1,700 cuts a second), and carries on once space returns.
#[test]
fn a_cut_refused_for_space_is_retried_at_a_bounded_rate() {
    let fs = SimFs::new(FaultConfig::default());
    let p = PartitionId::new("refused-cut", 0);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let config = PartitionConfig {
        preallocate_bytes: 64 * 1024,
        ..Default::default()
    };
    create_partitions(&engine, std::slice::from_ref(&p), &config);
    // Not a byte left: the first append that needs more file is refused, and so is its cut.
    fs.set_faults(FaultConfig {
        capacity_bytes: Some(fs.used_bytes()),
        ..Default::default()
    });
    let mut acked = BTreeMap::new();
    let err = append_until_refused(&engine, &p, 0..100, &mut acked);
    assert!(matches!(err, Error::Full { .. }), "{err}");
    let before = engine.metrics().disk_full_errors;
    std::thread::sleep(Duration::from_millis(500));
    let refused = engine.metrics().disk_full_errors - before;
    // One try per 100 ms backoff is about five; the tight loop made thousands.
    assert!(
        refused <= 20,
        "{refused} operations refused for space in 500 ms"
    );
    // Space returns: appends are taken again once the cut's next try has gone through (they
    // are refused with `Full` until then, as a producer retrying would see).
    fs.set_faults(FaultConfig::default());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        match block_on(engine.append(&p, batch(1000, 1, 20_000, 0), 0)) {
            Ok(out) => break out,
            Err(Error::Full { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    acked.insert(out.base_offset, 1000);
    assert_eq!(log_contents(&engine, &p), acked);
}

/// Append 20 KB batches one at a time, tagged from `tags`, recording each acknowledged one in
/// `acked`, until one is refused: its error (the test fails if every tag is taken).
fn append_until_refused(
    engine: &Engine,
    p: &PartitionId,
    tags: std::ops::Range<u64>,
    acked: &mut BTreeMap<u64, u64>,
) -> Error {
    tags.into_iter()
        .find_map(
            |tag| match block_on(engine.append(p, batch(tag, 1, 20_000, 0), 0)) {
                Ok(out) => {
                    acked.insert(out.base_offset, tag);
                    None
                }
                Err(e) => Some(e),
            },
        )
        .expect("an append was refused")
}

/// Segment files grow in doubling steps, so partitions holding little reserve little: with the
/// default 64 MiB `preallocate.bytes`, forty partitions of a few appends each took 2.5 GiB.
#[test]
fn segment_files_grow_with_their_data_so_small_partitions_reserve_little() {
    let fs = SimFs::new(FaultConfig::default());
    let engine = Engine::open(sim_config(&fs, 2)).unwrap();
    let ids: Vec<_> = (0..40).map(|i| PartitionId::new("small", i)).collect();
    let hot = PartitionId::new("hot", 0);
    let defaults = PartitionConfig::default();
    create_partitions(&engine, &ids, &defaults);
    create_partitions(&engine, std::slice::from_ref(&hot), &defaults);
    block_on(async {
        for (i, p) in ids.iter().enumerate() {
            for tag in 0..3 {
                engine
                    .append(p, batch(tag, 1, 3000 + i * 100, 0), 0)
                    .await
                    .unwrap();
            }
        }
        // 6 MB into one partition, 250 KB at a time.
        for tag in 0..24 {
            engine
                .append(&hot, batch(tag, 1, 250_000, 0), 0)
                .await
                .unwrap();
        }
        engine.shutdown().await.unwrap();
    });
    let log_len = |p: &PartitionId| {
        let path = format!("/sim/data/{p}/00000000000000000000.log");
        fs.file_len(std::path::Path::new(&path))
            .expect("segment exists")
    };
    let first = keel_engine::constants::preallocate_first_bytes;
    for p in &ids {
        assert_eq!(
            log_len(p),
            first,
            "{p}: one first step holds three small appends"
        );
    }
    // Doubling from 1 MiB: 1, 2, 4, 8 MiB; 6 MB of data fits the fourth.
    let hot_len = log_len(&hot);
    assert!(
        (6_000_000..=8 * first).contains(&hot_len),
        "the hot partition's segment is {hot_len} bytes"
    );
    assert_eq!(engine.metrics().allocations_short, 0);
}

/// An engine of one shard on a simulated disk of `capacity` bytes, with two partitions of
/// `topic` created (default configuration).
fn two_partitions_on_a_disk_of(capacity: u64, topic: &str) -> (SimFs, Engine, [PartitionId; 2]) {
    let fs = SimFs::new(FaultConfig {
        capacity_bytes: Some(capacity),
        ..Default::default()
    });
    let ids = [PartitionId::new(topic, 0), PartitionId::new(topic, 1)];
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    create_partitions(&engine, &ids, &PartitionConfig::default());
    (fs, engine, ids)
}

/// When the disk cannot hold a full preallocation step, what the write at hand needs is allocated
/// instead: every append that fits is taken, and a full disk is reported only when none does.
/// What the journal acknowledged always has its segment space, so a crash on the full disk
/// replays it all.
#[test]
fn a_nearly_full_disk_takes_every_append_that_fits_and_replays_it_after_a_crash() {
    let journal = constants::journal_bytes_min + 8192;
    // Room for 1.5 MiB of log besides the journal and the partitions' small files: two
    // partitions' doubling steps do not fit, their data does.
    let room = 1536 * 1024usize;
    let capacity = journal + room as u64 + 64 * 1024;
    let (fs, engine, ids) = two_partitions_on_a_disk_of(capacity, "nearly-full");
    let mut acked = vec![BTreeMap::new(), BTreeMap::new()];
    let mut bytes = 0usize;
    let err = block_on(async {
        for tag in 0.. {
            let i = tag as usize % 2;
            let b = batch(tag, 1, 20_000, 0);
            let len = b.len();
            match engine.append(&ids[i], b, 0).await {
                Ok(out) => {
                    acked[i].insert(out.base_offset, tag);
                    bytes += len;
                }
                Err(e) => return e,
            }
        }
        unreachable!("the disk fills")
    });
    assert!(matches!(err, Error::Full { .. }), "{err}");
    // Reported full only when less than one batch and a block was free (steps that must fit
    // whole stopped both logs at their first 1 MiB, half the room unused). The refused append's
    // rollback cuts its log while this runs: a cut that gave its blocks back and took them
    // again showed ~27 KB free here in about one run of ten.
    let free = capacity - fs.used_bytes();
    assert!(
        free < 20_100 + 4096,
        "the disk was reported full with {free} bytes free, after {bytes} bytes of appends"
    );
    assert!(bytes > room / 2, "only {bytes} bytes were taken");
    assert!(engine.metrics().allocations_short > 0);
    for (p, expected) in ids.iter().zip(&acked) {
        assert_eq!(&log_contents(&engine, p), expected);
    }
    // After a power cut (much of it only in the journal), all of it is there again.
    let image = fs.crash_image(CrashKind::PowerCut);
    drop(engine);
    let engine = Engine::open(sim_config(&image, 1)).unwrap();
    assert!(engine.metrics().journal_replayed > 0);
    for (p, expected) in ids.iter().zip(&acked) {
        assert_eq!(&log_contents(&engine, p), expected);
    }
}

/// A clean shutdown on a disk that another tenant has filled: the logs are durable, only the
/// shutdown's index files and clean-shutdown markers cannot be written. The shutdown succeeds
/// (the refusals counted as disk-full errors), no marker vouches for an index that was not
/// written, and the next start scans the logs and finds every append.
#[test]
fn a_shutdown_on_a_full_disk_succeeds_and_the_next_start_scans_the_logs() {
    let journal = constants::journal_bytes_min + 8192;
    let capacity = journal + 4 * 1024 * 1024;
    let (fs, engine, ids) = two_partitions_on_a_disk_of(capacity, "full-at-shutdown");
    let mut acked = vec![BTreeMap::new(), BTreeMap::new()];
    block_on(async {
        for tag in 0..40u64 {
            let i = tag as usize % 2;
            let out = engine
                .append(&ids[i], batch(tag, 1, 10_000, 0), 0)
                .await
                .unwrap();
            acked[i].insert(out.base_offset, tag);
        }
    });
    let free = capacity - fs.used_bytes();
    fs.create_file(
        std::path::Path::new("/sim/other-tenant"),
        vec![0; free as usize],
    );
    block_on(engine.shutdown()).unwrap();
    assert!(engine.metrics().disk_full_errors >= ids.len() as u64);
    drop(engine);
    for p in &ids {
        let marker = format!("/sim/data/{}-{}/.clean-shutdown", p.topic, p.partition);
        assert_eq!(fs.file_len(std::path::Path::new(&marker)), None, "{marker}");
    }
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    for (p, expected) in ids.iter().zip(&acked) {
        assert_eq!(&log_contents(&engine, p), expected, "{p}");
    }
}

/// A power cut on a full disk: recovery cuts each log's torn tail but keeps the space its
/// partition had reserved, so replaying the journal into one partition cannot take the room
/// another one's replay needs, and the engine opens with every acknowledged append. Another
/// tenant of the disk takes every block a file gives back the moment it is free: a cut that
/// truncated and then allocated again would lose its reservation to it. Run with zero range
/// working and refused (the cut then overwrites the stale blocks itself).
#[test]
fn a_power_cut_on_a_full_disk_replays_every_partition() {
    a_power_cut_on_a_full_disk_replays_every_partition_with(false);
    a_power_cut_on_a_full_disk_replays_every_partition_with(true);
}

fn a_power_cut_on_a_full_disk_replays_every_partition_with(zero_range_unsupported: bool) {
    let journal = constants::journal_bytes_min + 8192;
    let capacity = journal + 12 * 100 * 1024 + 128 * 1024;
    let fs = SimFs::new(FaultConfig {
        capacity_bytes: Some(capacity),
        freed_space_taken: true,
        zero_range_unsupported,
        ..Default::default()
    });
    let ids: Vec<_> = (0..12).map(|i| PartitionId::new("full-cut", i)).collect();
    let config = PartitionConfig {
        preallocate_bytes: 64 * 1024,
        ..Default::default()
    };
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    create_partitions(&engine, &ids, &config);
    let mut acked = vec![BTreeMap::new(); ids.len()];
    let (mut full, mut tag) = (0, 0u64);
    block_on(async {
        // Round after round over every partition, until each has been refused once.
        while full < ids.len() * 2 {
            for (i, p) in ids.iter().enumerate() {
                let size = 3000 + (tag as usize * 7919) % 9000;
                match engine.append(p, batch(tag, 1, size, 0), 0).await {
                    Ok(out) => {
                        acked[i].insert(out.base_offset, tag);
                    }
                    Err(Error::Full { .. }) => full += 1,
                    Err(e) => panic!("{e}"),
                }
                tag += 1;
            }
        }
    });
    let image = fs.crash_image(CrashKind::PowerCut);
    drop(engine);
    let engine = Engine::open(sim_config(&image, 1)).unwrap();
    assert!(engine.metrics().journal_replayed > 0);
    for (p, expected) in ids.iter().zip(&acked) {
        assert_eq!(
            &log_contents(&engine, p),
            expected,
            "{p}, zero range unsupported: {zero_range_unsupported}"
        );
    }
}

/// A disk that fills and frees again, over and over, while appends go on across segment rolls,
/// the journal and its checkpoints; then a power cut at a random moment. Every acknowledged
/// append is there after reopening, the log is contiguous, and nothing on disk is damaged.
#[test]
fn a_disk_filling_and_freeing_under_load_never_damages_the_log() {
    for seed in 0..16u64 {
        let journal = constants::journal_bytes_min + 8192;
        let tight = |room: u64| FaultConfig {
            seed,
            latency: Duration::from_micros(50),
            latency_jitter: Duration::from_micros(400),
            capacity_bytes: Some(journal + room),
            ..Default::default()
        };
        let fs = SimFs::new(FaultConfig {
            capacity_bytes: None,
            ..tight(0)
        });
        let ids = [PartitionId::new("fills", 0), PartitionId::new("fills", 1)];
        let config = PartitionConfig {
            segment_bytes: 1024 * 1024,
            preallocate_bytes: 256 * 1024,
            max_message_bytes: 256 * 1024,
            ..Default::default()
        };
        let engine = Engine::open(recovery_points_every(sim_config(&fs, 1), 64 * 1024)).unwrap();
        create_partitions(&engine, &ids, &config);
        let cut_after = 150 + (seed as usize * 53) % 250;
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize
        };
        let (image, acked, refused) = block_on(async {
            let mut acked = vec![BTreeMap::new(), BTreeMap::new()];
            let (mut done, mut refused) = (0, 0);
            let mut inflight = FuturesUnordered::new();
            for tag in 0..100_000u64 {
                if tag % 40 == 0 {
                    // Now a little room beyond what is in use, now plenty.
                    match next() % 3 {
                        0 => fs.set_faults(FaultConfig {
                            capacity_bytes: None,
                            ..tight(0)
                        }),
                        _ => fs.set_faults(tight(
                            fs.used_bytes().saturating_sub(journal) + (next() % 300_000) as u64,
                        )),
                    }
                }
                let i = next() % 2;
                let size = 100 + next() % 40_000;
                let (e, p) = (&engine, &ids[i]);
                inflight
                    .push(async move { (i, tag, e.append(p, batch(tag, 1, size, 0), 0).await) });
                if inflight.len() >= 8 {
                    let (i, tag, r) = inflight.next().await.unwrap();
                    match r {
                        Ok(out) => {
                            acked[i].insert(out.base_offset, tag);
                        }
                        Err(Error::Full { .. }) => refused += 1,
                        Err(e) => panic!("seed {seed}: {e}"),
                    }
                    done += 1;
                    if done == cut_after {
                        return (fs.crash_image(CrashKind::PowerCut), acked, refused);
                    }
                }
            }
            unreachable!("the cut comes first");
        });
        drop(engine);
        let engine = Engine::open(sim_config(&image, 1))
            .unwrap_or_else(|e| panic!("seed {seed}: reopening after the power cut: {e}"));
        for (p, expected) in ids.iter().zip(&acked) {
            let log = log_contents(&engine, p);
            for (offset, tag) in expected {
                assert_eq!(
                    log.get(offset),
                    Some(tag),
                    "seed {seed}: {p} lost offset {offset}"
                );
            }
            assert_eq!(
                log.keys().copied().collect::<Vec<_>>(),
                (0..log.len() as u64).collect::<Vec<_>>(),
                "seed {seed}: gap in {p}"
            );
        }
        assert_eq!(
            engine.metrics().recovery_points_mismatched,
            0,
            "seed {seed}: a recovery point off the log after the power cut"
        );
        eprintln!("seed {seed}: {refused} appends refused for a full disk");
    }
}

#[test]
fn a_slow_disk_delays_but_loses_nothing() {
    let fs = SimFs::new(FaultConfig {
        latency: Duration::from_millis(3),
        ..Default::default()
    });
    let p = PartitionId::new("slow", 0);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let (acked, failed) = block_on(async {
        engine.create_partition(&p, config()).await.unwrap();
        append_many(&engine, &p, 0..300, 32).await
    });
    assert_eq!((acked.len(), failed), (300, 0));
    assert_eq!(log_contents(&engine, &p), acked);
}

/// Guarantee 3 with `every-batch`: an acknowledged append survives a power cut at any moment.
#[test]
fn power_cuts_at_random_moments_keep_every_acknowledged_append() {
    let mut deferred_writes = 0;
    for seed in 0..12u64 {
        let fs = SimFs::new(FaultConfig {
            seed,
            latency: Duration::from_micros(100),
            latency_jitter: Duration::from_micros(600),
            ..Default::default()
        });
        let p = PartitionId::new("power", 0);
        let engine = Engine::open(recovery_points_every(sim_config(&fs, 1), 256 * 1024)).unwrap();
        let cut_after = 20 + (seed as usize * 37) % 200;
        let (image, acked_before_cut) = block_on(async {
            engine.create_partition(&p, config()).await.unwrap();
            let mut acked = BTreeMap::new();
            let mut inflight = FuturesUnordered::new();
            for tag in 0..400u64 {
                let size = 500 + (tag as usize * 104_729) % 60_000;
                let e = &engine;
                let p = &p;
                inflight.push(async move { (tag, e.append(p, batch(tag, 1, size, 0), 0).await) });
                if inflight.len() >= 24 {
                    let (tag, r) = inflight.next().await.unwrap();
                    acked.insert(r.unwrap().base_offset, tag);
                    if acked.len() == cut_after {
                        // The power fails now; whatever completes later does not count.
                        return (fs.crash_image(CrashKind::PowerCut), acked);
                    }
                }
            }
            unreachable!("the cut happens before the loop ends");
        });
        deferred_writes += engine.metrics().deferred_writes;
        drop(engine);
        let engine = Engine::open(sim_config(&image, 1)).unwrap();
        let recovered = log_contents(&engine, &p);
        for (offset, tag) in &acked_before_cut {
            assert_eq!(
                recovered.get(offset),
                Some(tag),
                "seed {seed}: acknowledged offset {offset} lost"
            );
        }
        // What survived is a contiguous log from 0.
        for (expect, &offset) in recovered.keys().enumerate() {
            assert_eq!(
                offset, expect as u64,
                "seed {seed}: gap in the recovered log"
            );
        }
        // And it accepts appends again after the recovered end.
        let out = block_on(engine.append(&p, batch(1_000_000, 1, 100, 0), 0)).unwrap();
        assert_eq!(out.base_offset, recovered.len() as u64);
    }
    assert!(
        deferred_writes > 0,
        "no carried block was ever queued behind an earlier write"
    );
}

/// `interval` flushing that never syncs by itself: appends are answered once written.
fn never_by_itself() -> keel_engine::FlushPolicy {
    keel_engine::FlushPolicy::Interval {
        ms: 3_600_000,
        bytes: 0,
    }
}

/// Create `p` with `config`, append the batches tagged `durable` and flush them, then append
/// those tagged `written` (`size` bytes each, one at a time, each answered).
async fn durable_then_written(
    engine: &Engine,
    p: &PartitionId,
    config: PartitionConfig,
    durable: std::ops::Range<u64>,
    written: std::ops::Range<u64>,
    size: usize,
) {
    engine.create_partition(p, config).await.unwrap();
    for tag in durable {
        engine.append(p, batch(tag, 1, size, 0), 0).await.unwrap();
    }
    engine.flush(p).await.unwrap();
    for tag in written {
        engine.append(p, batch(tag, 1, size, 0), 0).await.unwrap();
    }
}

/// A segment roll fsyncs the segment it seals; if that fails, what was written since the last
/// good sync is in doubt, as after a failed group commit: the log goes back to its durable
/// point, not to what was written (an `interval` partition answers appends once written).
#[test]
fn a_failed_fsync_at_a_roll_rolls_back_to_the_durable_point() {
    let fs = SimFs::default();
    let p = PartitionId::new("roll-sync", 0);
    let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
    block_on(async {
        durable_then_written(&engine, &p, full_after_five(), 0..3, 3..5, 200_000).await;
        // The sixth 200 KB batch needs a new segment: the roll's fsync is the next sync.
        fs.fail_next_syncs(1);
        let err = engine
            .append(&p, batch(5, 1, 200_000, 0), 0)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { op: "fsync", .. }), "{err}");
        let state = engine.partition_state(&p).await.unwrap();
        assert_eq!((state.appended.0, state.durable.0), (3, 3));
    });
}

/// The same failure when the log is durable exactly up to the segment it seals: the rollback
/// lands on the base of the new segment, which has no file yet (the roll failed before
/// creating it), and the log stays at the end of the segment before (decision 26). The next
/// append rolls again and succeeds: the failed fsync came before that roll started, with nothing
/// in doubt, so it puts nothing the roll vouches for in doubt (decision 29). Until the roll noted
/// the count of failed flushes as a write does, that append failed too ("a flush failed on
/// this node"), once.
#[test]
fn after_a_failed_roll_at_the_durable_point_the_next_append_rolls_again() {
    let (fs, engine) = strict_disk(1);
    let p = PartitionId::new("roll-boundary", 0);
    block_on(async {
        // Five 200 KB batches fill the first segment and are durable; the sixth needs a new one.
        durable_then_written(&engine, &p, full_after_five(), 0..5, 5..5, 200_000).await;
        fs.fail_next_syncs(1);
        fails_then_carries_on(&engine, &p, [5, 6], 200_000, "fsync", 5).await;
        assert_eq!(engine.partition_state(&p).await.unwrap().segments, 2);
    });
    let expected: BTreeMap<u64, u64> = (0..5).map(|t| (t, t)).chain([(5, 6)]).collect();
    assert_log_is(
        engine,
        &fs,
        &p,
        &expected,
        &[CrashKind::Process, CrashKind::PowerCut],
        0,
    );
}

/// A failed flush puts in doubt only writes made before it (decision 29). A partition with
/// everything durable whose next append needs a new segment rolls, and that roll's fsync
/// vouches for nothing the failure could have dropped: the append succeeds. (Before the roll
/// noted the storage's count of failed flushes, it failed with "a flush failed on this node".)
#[test]
fn a_failed_flush_elsewhere_does_not_fail_a_settled_partitions_roll() {
    let (fs, engine) = strict_disk(1);
    let (full, other) = (PartitionId::new("full", 0), PartitionId::new("other", 0));
    block_on(async {
        durable_then_written(&engine, &full, full_after_five(), 0..5, 5..5, 200_000).await;
        durable_then_written(&engine, &other, by_hand(), 0..1, 1..2, 10_000).await;
        fs.fail_next_syncs(1);
        engine.flush(&other).await.unwrap_err();
        let out = engine
            .append(&full, batch(5, 1, 200_000, 0), 0)
            .await
            .unwrap();
        assert_eq!(out.base_offset, 5);
        engine.flush(&full).await.unwrap();
    });
    let expected: BTreeMap<u64, u64> = (0..6).map(|t| (t, t)).collect();
    assert_log_is(engine, &fs, &full, &expected, &[CrashKind::PowerCut], 0);
}

/// `p`'s next append (tagged `tags[0]`, `size` bytes) fails with an I/O error of `op`, after
/// which the log ends, durable, at `back_to`; the append after it (`tags[1]`) succeeds, flushed.
async fn fails_then_carries_on(
    engine: &Engine,
    p: &PartitionId,
    tags: [u64; 2],
    size: usize,
    op: &str,
    back_to: u64,
) {
    let err = engine
        .append(p, batch(tags[0], 1, size, 0), 0)
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Io { op: o, .. } if *o == op), "{err}");
    let state = engine.partition_state(p).await.unwrap();
    assert_eq!((state.appended.0, state.durable.0), (back_to, back_to));
    engine
        .append(p, batch(tags[1], 1, size, 0), 0)
        .await
        .unwrap();
    engine.flush(p).await.unwrap();
}

/// Flushed by hand, 1 MiB segments: five 200 KB batches fill one, a sixth starts the next.
fn full_after_five() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 1024 * 1024,
        max_message_bytes: 1024 * 1024,
        ..by_hand()
    }
}

/// A rollback's cut ends with an fsync. If that fails, what was written before it is in doubt for
/// good (the device may have dropped it, and a second fsync that succeeds does not vouch for
/// it), so the rollback goes on to the durable point instead of trying the fsync again.
#[test]
fn a_failed_fsync_in_a_rollbacks_cut_goes_back_to_the_durable_point() {
    let (fs, engine) = strict_disk(1);
    let p = PartitionId::new("cut-sync", 0);
    block_on(async {
        durable_then_written(&engine, &p, by_hand(), 0..3, 3..5, 10_000).await;
        // The next append's write fails: the rollback keeps what was written (3 and 4) and cuts
        // the file after it; the cut's fsync fails too.
        fs.fail_next_writes(1);
        fs.fail_next_syncs(1);
        fails_then_carries_on(&engine, &p, [5, 6], 10_000, "write", 3).await;
    });
    let expected = BTreeMap::from([(0, 0), (1, 1), (2, 2), (3, 6)]);
    assert_log_is(engine, &fs, &p, &expected, &[CrashKind::PowerCut], 0);
}

/// An engine of `shards` shards, without the journal, on a disk whose failed flushes lose for
/// good the writes they covered, in every file (`FaultConfig::failed_sync_drops_writes`).
fn strict_disk(shards: usize) -> (SimFs, Engine) {
    let fs = SimFs::new(FaultConfig {
        failed_sync_drops_writes: true,
        ..Default::default()
    });
    let engine = Engine::open(without_journal(sim_config(&fs, shards))).unwrap();
    (fs, engine)
}

/// `config()` flushed by hand: appends are answered once written, made durable by `flush`.
fn by_hand() -> PartitionConfig {
    PartitionConfig {
        flush: never_by_itself(),
        ..config()
    }
}

/// Three partitions of one shard on a disk whose failed syncs lose what they covered, flushed
/// by hand (`never_by_itself`, `config` otherwise): one outside the group a test fails, and the
/// group's two members. Each holds one durable 10 KB batch (tagged 0, 10, 20), so every
/// leader-epoch file is written before a failure is injected (its sync would take it otherwise).
fn outside_and_a_group(config: PartitionConfig) -> (SimFs, Engine, [PartitionId; 3]) {
    let config = PartitionConfig {
        flush: never_by_itself(),
        ..config
    };
    let (fs, engine) = strict_disk(1);
    let parts = ["outside", "member-b", "member-c"].map(|t| PartitionId::new(t, 0));
    create_partitions(&engine, &parts, &config);
    block_on(async {
        for (p, tag) in parts.iter().zip([0, 10, 20]) {
            engine.append(p, batch(tag, 1, 10_000, 0), 0).await.unwrap();
            engine.flush(p).await.unwrap();
        }
    });
    (fs, engine, parts)
}

/// The group's members each write a batch (11, 21) and become due together (the shard takes
/// both flushes in one go): one syncfs, which fails.
async fn fail_a_group_syncfs(fs: &SimFs, engine: &Engine, members: [&PartitionId; 2]) {
    fail_a_group_syncfs_then(fs, engine, members, async {}).await;
}

/// `fail_a_group_syncfs`, running `then` once the syncfs has failed, before the members'
/// answers: those wait for their rollbacks to reach the disk (decision 23), so a test holding
/// file syncs releases them there.
async fn fail_a_group_syncfs_then<T>(
    fs: &SimFs,
    engine: &Engine,
    [b, c]: [&PartitionId; 2],
    then: impl std::future::Future<Output = T>,
) -> T {
    for (p, tag) in [(b, 11), (c, 21)] {
        engine.append(p, batch(tag, 1, 10_000, 0), 0).await.unwrap();
    }
    let syncs_before = engine.metrics().group_syncs;
    let failures_before = fs.flush_failures();
    fs.fail_next_syncs(1);
    let release = hold_shard(engine, engine.shard_of(b)).await;
    let (fb, fc, out) = futures::join!(engine.flush(b), engine.flush(c), async {
        release.send(()).unwrap();
        wait_until("the group's syncfs fails", || {
            fs.flush_failures() > failures_before
        });
        then.await
    });
    assert!(fb.is_err() && fc.is_err(), "{fb:?} {fc:?}");
    assert_eq!(engine.metrics().group_syncs, syncs_before + 1);
    out
}

/// Append `bytes` to `p` with every file sync held; once one waits (the sync the append led to:
/// a rollback's cut, a roll), fail a syncfs of the group `members`, then release the syncs.
async fn append_while_a_group_syncfs_fails(
    fs: &SimFs,
    engine: &Engine,
    p: &PartitionId,
    bytes: bytes::Bytes,
    members: [&PartitionId; 2],
) -> keel_engine::Result<keel_engine::AppendOutcome> {
    fs.hold(Hold::FileSyncs, true);
    let (appended, ()) = futures::join!(engine.append(p, bytes, 0), async {
        wait_until("no file sync ever waited", || {
            fs.waiting(Hold::FileSyncs) > 0
        });
        fail_a_group_syncfs_then(fs, engine, members, async {
            fs.hold(Hold::FileSyncs, false)
        })
        .await;
    });
    appended
}

/// Append a `size`-byte batch for each tag to `p`, one at a time, each answered.
async fn append_each(
    engine: &Engine,
    p: &PartitionId,
    tags: impl IntoIterator<Item = u64>,
    size: usize,
) {
    for tag in tags {
        engine.append(p, batch(tag, 1, size, 0), 0).await.unwrap();
    }
}

/// `p`'s next flush finds that a flush failed on the node since its writes (decision 29): it
/// fails with op `flush`, taking the log back to its durable point, and the one after succeeds.
async fn flush_finds_a_failed_flush(engine: &Engine, p: &PartitionId) {
    let err = engine.flush(p).await.unwrap_err();
    assert!(matches!(err, Error::Io { op: "flush", .. }), "{err}");
    engine.flush(p).await.unwrap();
}

/// `p` holds only its durable first batch (tag 0), live and after a power cut.
fn assert_back_to_its_first_batch(engine: Engine, fs: &SimFs, p: &PartitionId) {
    let expected = BTreeMap::from([(0, 0)]);
    assert_log_is(engine, fs, p, &expected, &[CrashKind::PowerCut], 0);
}

/// A syncfs is the file system's flush: when it fails, every file's unflushed writes may be
/// gone, not only its members'. A partition outside the failed group, with writes not yet
/// durable, rolls back to its durable point too; otherwise its next fdatasync would succeed and
/// vouch for bytes the disk no longer has (ARCHITECTURE.md, decision 27).
#[test]
fn a_failed_syncfs_rolls_back_the_partitions_outside_its_group_too() {
    let (fs, engine, [a, b, c]) = outside_and_a_group(config());
    block_on(async {
        // Written, not durable: a's 1 and 2.
        append_each(&engine, &a, [1, 2], 10_000).await;
        fail_a_group_syncfs(&fs, &engine, [&b, &c]).await;
        engine.flush(&a).await.unwrap();
    });
    // a went back to its durable point with the members.
    assert_back_to_its_first_batch(engine, &fs, &a);
}

/// A flush that meets a rollback is answered only once the rollback is on disk (decision 41).
/// Here a failed syncfs of a group rolls back a partition outside it, whose written batches had
/// been answered; its cut waits at its fsync when the partition is flushed. Answered at once,
/// that flush (nothing appended is past the durable point) would let a crash bring the removed
/// batches back after a flush that had succeeded — what the random power cuts of
/// `a_failed_syncfs_rolls_back_the_partitions_outside_its_group_too` caught now and then.
#[test]
fn a_flush_waits_for_the_rollback_it_meets_to_reach_the_disk() {
    let (fs, engine, [a, b, c]) = outside_and_a_group(config());
    block_on(async {
        // Written, not durable: a's 1 and 2.
        append_each(&engine, &a, [1, 2], 10_000).await;
        fs.hold(Hold::FileSyncs, true);
        fail_a_group_syncfs_then(&fs, &engine, [&b, &c], async {
            // The three rollbacks' cuts (a's and the members') wait at their fsyncs.
            wait_until("every rollback's cut waits", || {
                fs.waiting(Hold::FileSyncs) == 3
            });
            let mut flush = Box::pin(engine.flush(&a));
            assert!(futures::poll!(&mut flush).is_pending());
            // The shard takes a partition's commands in order: once this is answered, so would
            // the flush be if it did not wait.
            engine.partition_state(&a).await.unwrap();
            let early = futures::poll!(&mut flush);
            fs.hold(Hold::FileSyncs, false);
            assert!(
                early.is_pending(),
                "the flush was answered while the rollback's cut waited: {early:?}"
            );
            flush.await.unwrap();
        })
        .await;
    });
    assert_back_to_its_first_batch(engine, &fs, &a);
}

/// A failed write rolls the log back to the end of what was written before it, which stays as
/// far from durable as it was. When a file system flush fails while that rollback's cut is on
/// its way (here: held before its fsync), the partition has unflushed writes like any other and
/// goes back to its durable point (decision 28: the rollback had counted the kept bytes as
/// durable, and the failed flush passed the partition by).
#[test]
fn a_failed_syncfs_during_a_failed_writes_rollback_goes_back_to_the_durable_point() {
    let (fs, engine, [a, b, c]) = outside_and_a_group(config());
    block_on(async {
        append_each(&engine, &a, [1, 2], 10_000).await;
        // a's next write fails: the rollback keeps 1 and 2, and its cut waits before its fsync.
        fs.fail_next_writes(1);
        let appended = batch(3, 1, 10_000, 0);
        let err = append_while_a_group_syncfs_fails(&fs, &engine, &a, appended, [&b, &c])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { op: "write", .. }), "{err}");
        engine.flush(&a).await.unwrap();
    });
    assert_back_to_its_first_batch(engine, &fs, &a);
}

/// A roll fsyncs the segment it seals. If a file system flush fails while that fsync waits, the
/// fsync's success does not vouch for the writes the failed flush covered: the roll does not
/// advance the durable point, and the rollback goes back into the sealed segment (decision 28).
#[test]
fn a_failed_syncfs_while_a_roll_waits_for_its_fsync_goes_back_to_the_durable_point() {
    let (fs, engine, [a, b, c]) = outside_and_a_group(full_after_five());
    block_on(async {
        // 10 KB + 5 × 200 KB written; the sixth 200 KB batch needs a new segment.
        append_each(&engine, &a, 1..=5, 200_000).await;
        let appended = batch(6, 1, 200_000, 0);
        let err = append_while_a_group_syncfs_fails(&fs, &engine, &a, appended, [&b, &c])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { op: "syncfs", .. }), "{err}");
        engine.flush(&a).await.unwrap();
    });
    assert_back_to_its_first_batch(engine, &fs, &a);
}

/// The roll in the test above fsyncs the segment it seals, and the failed syncfs voids that
/// fsync. The roll must not then seal the segment behind a recovery point: a restart trusts the
/// segments before the point whole, without scanning them, and this one lost its unsynced
/// writes. Before decision 41 the roll finished (next segment created, recovery point moved to
/// it), and a power cut before the rollback's cut was on disk reopened a log whose first segment
/// failed its CRC checks at the first lost batch. Here the power cut comes while that cut waits
/// at its fsync: the log must reopen whole, some prefix of what was appended.
#[test]
fn a_roll_whose_fsync_a_failed_flush_voids_moves_no_recovery_point() {
    let (fs, engine, [a, b, c]) = outside_and_a_group(full_after_five());
    let image = block_on(async {
        append_each(&engine, &a, 1..=5, 200_000).await;
        fs.hold(Hold::FileSyncs, true);
        let (appended, image) =
            futures::join!(engine.append(&a, batch(6, 1, 200_000, 0), 0), async {
                wait_until("the roll's fsync waits", || {
                    fs.waiting(Hold::FileSyncs) == 1
                });
                fail_a_group_syncfs_then(&fs, &engine, [&b, &c], async {
                    // The members' cuts wait beside the roll's fsync: let the three go on, and
                    // catch what comes next, a's rollback's cut.
                    wait_until("the members' cuts wait", || {
                        fs.waiting(Hold::FileSyncs) == 3
                    });
                    fs.release_waiting(Hold::FileSyncs);
                })
                .await;
                wait_until("a's rollback's cut waits", || {
                    fs.waiting(Hold::FileSyncs) == 1
                });
                let image = fs.crash_image(CrashKind::PowerCut);
                fs.hold(Hold::FileSyncs, false);
                image
            });
        let err = appended.unwrap_err();
        assert!(matches!(err, Error::Io { op: "syncfs", .. }), "{err}");
        image
    });
    let reopened = Engine::open(without_journal(sim_config(&image, 1))).unwrap();
    let log = log_contents(&reopened, &a);
    assert!(
        log.get(&0) == Some(&0) && log.iter().all(|(offset, tag)| offset == tag),
        "not a prefix of the appends: {log:?}"
    );
    assert_eq!(reopened.metrics().recovery_points_mismatched, 0);
}

/// A failed flush is the device's: an fdatasync that fails on one shard may have dropped the
/// unflushed writes of a partition on another shard, whose own fdatasync then succeeds. That
/// sync vouches for nothing written before the failure: the partition goes back to its durable
/// point (decision 29), as a partition of the failed sync's own shard would (decision 27).
#[test]
fn a_failed_fdatasync_on_one_shard_rolls_back_unflushed_writes_on_another() {
    let (fs, engine) = strict_disk(2);
    let on_shard = |shard: usize| {
        (0..)
            .map(|i| PartitionId::new(&format!("shard-{shard}-{i}"), 0))
            .find(|p| engine.shard_of(p) == shard)
            .unwrap()
    };
    let (a, b) = (on_shard(0), on_shard(1));
    block_on(async {
        // Durable: a's 0, b's 10. Written, not durable: a's 1 and 2, b's 11; then b's
        // fdatasync fails.
        durable_then_written(&engine, &a, by_hand(), 0..1, 1..3, 10_000).await;
        durable_then_written(&engine, &b, by_hand(), 10..11, 11..12, 10_000).await;
        fs.fail_next_syncs(1);
        assert!(engine.flush(&b).await.is_err());
        assert_eq!(engine.metrics().flush_failures, 1);
        // a's fdatasync succeeds, and vouches for nothing: a goes back to its durable point.
        flush_finds_a_failed_flush(&engine, &a).await;
    });
    assert_back_to_its_first_batch(engine, &fs, &a);
}

/// A leader-epoch checkpoint's fsync that fails is a failed flush like any other: the rollback
/// of the control operation keeps what was written, but the partition's next sync finds the
/// storage's count of failed flushes moved and vouches for nothing (decision 29).
#[test]
fn a_failed_fsync_of_a_metadata_file_leaves_no_unflushed_write_acknowledged() {
    let (fs, engine) = strict_disk(1);
    let p = PartitionId::new("epoch-file", 0);
    block_on(async {
        durable_then_written(&engine, &p, by_hand(), 0..1, 1..3, 10_000).await;
        // A new leader epoch: its checkpoint file's fsync fails. The append itself may be
        // answered either way (written before the failure, or rolled back by it).
        fs.fail_next_syncs(1);
        let _ = engine.append(&p, batch(3, 1, 10_000, 0), 1).await;
        wait_until("the epoch checkpoint never failed", || {
            engine.metrics().io_errors > 0
        });
        flush_finds_a_failed_flush(&engine, &p).await;
    });
    assert_back_to_its_first_batch(engine, &fs, &p);
}

/// A failed fdatasync rolls back to the durable offset even when the batches since then have
/// already left the in-memory tail (interval flushing, a small cache).
#[test]
fn a_failed_fdatasync_rolls_back_past_what_memory_still_holds() {
    let fs = SimFs::default();
    let p = PartitionId::new("deep-rollback", 0);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    block_on(async {
        let config = PartitionConfig {
            flush: never_by_itself(),
            cache_bytes: 32 * 1024,
            ..config()
        };
        // 5..50 written but never durable, and far more than the 32 KiB cache keeps.
        durable_then_written(&engine, &p, config, 0..5, 5..50, 10_000).await;
        fs.fail_next_syncs(1);
        assert!(engine.flush(&p).await.is_err());
        let state = engine.partition_state(&p).await.unwrap();
        assert_eq!((state.appended.0, state.durable.0), (5, 5));
        engine
            .append(&p, batch(100, 1, 10_000, 0), 0)
            .await
            .unwrap();
    });
    let expected: BTreeMap<u64, u64> = (0..5).map(|t| (t, t)).chain([(5, 100)]).collect();
    assert_eq!(log_contents(&engine, &p), expected);
    drop(engine);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    assert_eq!(log_contents(&engine, &p), expected, "after reopen");
}

/// A producer answered at write time (acks=1) that never lets the writes pause keeps the
/// partition's writes in flight without end. A `flush` (a consumer waiting to see that data) must
/// not wait for a pause, nor for the 8 MiB a sync otherwise waits for while writes are in flight.
#[test]
fn a_flush_does_not_wait_for_the_writes_to_pause() {
    // Every I/O takes 10 ms; a write carries at most 1 MiB, so the log grows ~1 MiB per 10 ms.
    let fs = SimFs::new(FaultConfig {
        seed: 7,
        latency: Duration::from_millis(10),
        ..Default::default()
    });
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let p = PartitionId::new("streaming", 0);
    let batch_bytes = 16 * 1024;
    let total = 3072u64; // 48 MiB
    let flushes = block_on(async {
        let config = PartitionConfig {
            segment_bytes: 128 * 1024 * 1024,
            ..Default::default()
        };
        engine.create_partition(&p, config).await.unwrap();
        let append = |tag: u64| {
            engine.append_waiting(&p, batch(tag, 1, batch_bytes, 0), 0, Durability::Written)
        };
        // 1.5 MiB in flight: more than one write takes, so a write always has data waiting.
        let mut inflight: FuturesUnordered<_> = (0..96).map(append).collect();
        let mut tag = 96;
        let new_flush = || futures::FutureExt::fuse(Box::pin(engine.flush(&p)));
        let mut flush = new_flush();
        let mut flushes = 0;
        while tag < total {
            futures::select! {
                done = flush => {
                    done.unwrap();
                    flushes += 1;
                    flush = new_flush();
                }
                appended = inflight.select_next_some() => {
                    appended.unwrap();
                    inflight.push(append(tag));
                    tag += 1;
                }
            }
        }
        while let Some(r) = inflight.next().await {
            r.unwrap();
        }
        drop(flush);
        engine.flush(&p).await.unwrap();
        eprintln!("{flushes} flushes completed while 48 MiB were appended");
        flushes
    });
    // Waiting for 8 MiB groups completes 6–8 flushes here (measured with the deadline removed);
    // syncing once flushed data has waited 2 ms completes 16–18.
    assert!(
        flushes >= 12,
        "{flushes} flushes completed while 48 MiB were appended"
    );
    assert_eq!(
        block_on(engine.partition_state(&p)).unwrap().durable.0,
        total
    );
}

#[test]
fn a_lone_append_written_durable_by_itself_survives_a_power_cut_at_once() {
    // One large unaligned append in flight at a time: each goes out as one write durable by
    // itself (no fdatasync follows it), so the moment it is acknowledged a power cut must find
    // it whole — on a disk that keeps an arbitrary part of every write not yet flushed.
    let fs = out_of_order_disk(7, 2);
    let p = PartitionId::new("lone", 0);
    let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
    let mut acked = BTreeMap::new();
    block_on(engine.create_partition(&p, config())).unwrap();
    for tag in 0..24u64 {
        let size = 70_000 + (tag as usize * 7919) % 30_000;
        let out = block_on(engine.append(&p, batch(tag, 1, size, 0), 0)).unwrap();
        acked.insert(out.base_offset, tag);
        let image = fs.crash_image(CrashKind::PowerCut);
        let reopened = Engine::open(without_journal(sim_config(&image, 1))).unwrap();
        assert_eq!(log_contents(&reopened, &p), acked, "after append {tag}");
    }
    // They went out alone, the first too (its leader-epoch file is written beside it).
    assert!(
        engine.metrics().segment_durable_writes >= 20,
        "{:?}",
        engine.metrics()
    );
}

#[test]
fn a_cohort_arriving_together_as_large_as_the_last_group_goes_out_in_one_durable_write() {
    // A pipelining producer's appends reach the shard together when a broker hands it the
    // requests it read together. Once as many wait as the last group commit answered, the one
    // write for them all goes out durable by itself (no fdatasync); a cohort still arriving
    // keeps the plain write and the fdatasync it shares. Each acknowledged cohort survives a
    // power cut at once, on a disk that keeps an arbitrary part of every unflushed write.
    let fs = out_of_order_disk(11, 2);
    let p = PartitionId::new("cohort", 0);
    let engine = Engine::open(without_journal(sim_config(&fs, 1))).unwrap();
    block_on(engine.create_partition(&p, config())).unwrap();
    let shard = engine.shard_of(&p);
    let mut acked = BTreeMap::new();
    let mut tag = 0;
    // (appends queued at the shard together, the last group's size, durable by itself?)
    for (n, last_group, durable) in [
        (1, 0, true), // the leader-epoch checkpoint file is written beside it
        (3, 1, true),
        (3, 3, true),
        (2, 3, false),
        (2, 2, true),
        (4, 2, true),
    ] {
        let before = engine.metrics();
        // The shard runs this task before it looks at the appends queued behind it, so it
        // takes them all in one go.
        let release = block_on(hold_shard(&engine, shard));
        let pending: Vec<_> = (0..n)
            .map(|i| {
                let size = 5000 + 313 * (tag + i) as usize;
                let pending = engine.append_enqueued(&p, batch(tag + i, 1, size, 0), 0, None);
                block_on(pending).unwrap()
            })
            .collect();
        release.send(()).unwrap();
        for (i, pending) in pending.into_iter().enumerate() {
            let out = block_on(pending).unwrap();
            acked.insert(out.base_offset, tag + i as u64);
        }
        tag += n;
        let after = engine.metrics();
        let what = format!("{n} appends after a group of {last_group}: {after:?}");
        assert_eq!(
            after.segment_durable_writes - before.segment_durable_writes,
            u64::from(durable),
            "{what}"
        );
        if durable {
            assert_eq!(after.writes - before.writes, 1, "{what}: one write, whole");
        }
        assert_eq!(
            after.segment_sync_calls - before.segment_sync_calls,
            u64::from(!durable),
            "{what}"
        );
        let image = fs.crash_image(CrashKind::PowerCut);
        let reopened = Engine::open(without_journal(sim_config(&image, 1))).unwrap();
        assert_eq!(log_contents(&reopened, &p), acked, "{what}");
    }
}

/// Creating a partition writes several small files durably; on a slow or stalled disk that takes
/// long. The shard's other partitions are served meanwhile (ARCHITECTURE.md, decision 20), and a
/// command for the partition being created waits for it instead of failing.
#[test]
fn a_partition_stalled_in_its_creation_holds_up_no_other() {
    let fs = SimFs::default();
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let serving = PartitionId::new("serving", 0);
    let new = PartitionId::new("new", 0);
    create_partitions(
        &engine,
        std::slice::from_ref(&serving),
        &PartitionConfig::default(),
    );
    fs.hold(Hold::FileWrites, true);
    let creating = {
        let (engine, new) = (engine.clone(), new.clone());
        std::thread::spawn(move || {
            block_on(engine.create_partition(&new, PartitionConfig::default()))
        })
    };
    wait_until("the creation never reached a file write", || {
        fs.waiting(Hold::FileWrites) > 0
    });
    // The serving partition appends and reads while the creation is stalled.
    let (tx, rx) = std::sync::mpsc::channel();
    let appending = {
        let (engine, serving) = (engine.clone(), serving.clone());
        std::thread::spawn(move || {
            for tag in 0..5 {
                let out = block_on(engine.append(&serving, batch(tag, 1, 100, 0), 0));
                let _ = tx.send(out.map(|o| o.base_offset));
            }
        })
    };
    for tag in 0..5u64 {
        let offset = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("an append waited for another partition's creation");
        assert_eq!(offset.unwrap(), tag);
    }
    appending.join().unwrap();
    assert_eq!(log_contents(&engine, &serving).len(), 5);
    assert!(
        !creating.is_finished(),
        "the creation's writes are still held"
    );
    // An append to the partition being created waits for it, then lands at offset 0.
    let appending_new = {
        let (engine, new) = (engine.clone(), new.clone());
        std::thread::spawn(move || block_on(engine.append(&new, batch(99, 1, 100, 0), 0)))
    };
    fs.hold(Hold::FileWrites, false);
    creating.join().unwrap().unwrap();
    assert_eq!(appending_new.join().unwrap().unwrap().base_offset, 0);
    assert_eq!(log_contents(&engine, &new), BTreeMap::from([(0, 99)]));
}

/// A new leader epoch's first append does not wait for the leader-epoch checkpoint file: the
/// file is written beside the data path, and until it lands a restart rebuilds the entry from the
/// batch, which lies past the recovery point; an explicit flush waits for it (ARCHITECTURE.md,
/// decision 34). Until 2026-12-02
/// the file was a control operation that stopped the partition's writes and syncs: at 1000
/// partitions every first append did, and the first journal checkpoint waited ~0.7 s for them.
#[test]
fn a_new_epochs_appends_do_not_wait_for_its_checkpoint_file() {
    for journal in [false, true] {
        let config_of = |fs: &SimFs| {
            let config = sim_config(fs, 1);
            if journal {
                config
            } else {
                without_journal(config)
            }
        };
        let fs = SimFs::default();
        let engine = Engine::open(config_of(&fs)).unwrap();
        let p = PartitionId::new("epochs", 0);
        create_partitions(
            &engine,
            std::slice::from_ref(&p),
            &PartitionConfig::default(),
        );
        fs.hold(Hold::FileWrites, true);
        let (tx, rx) = std::sync::mpsc::channel();
        let appending = {
            let (engine, p) = (engine.clone(), p.clone());
            std::thread::spawn(move || {
                for (tag, epoch) in [(0, 3), (1, 3), (2, 5)] {
                    let out = block_on(engine.append(&p, batch(tag, 1, 100, 0), epoch));
                    let _ = tx.send(out.map(|o| (o.base_offset, o.durability)));
                }
            })
        };
        for offset in 0..3u64 {
            let out = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| {
                    panic!("journal {journal}: append {offset} waited for the epoch file")
                });
            assert_eq!(
                out.unwrap(),
                (offset, Durability::Durable),
                "journal {journal}"
            );
        }
        appending.join().unwrap();
        assert!(fs.waiting(Hold::FileWrites) > 0, "journal {journal}");
        // A caller's flush covers the partition's metadata too: it waits for the file. Polled
        // once, the flush is queued at the shard; once the shard has run a task queued after
        // it, the flush has been taken, and it must still wait.
        let mut flushing = Box::pin(engine.flush(&p));
        assert!(block_on(async {
            futures::poll!(flushing.as_mut()).is_pending()
        }));
        block_on(engine.run_on_shard(engine.shard_of(&p), || ())).unwrap();
        // A power cut now: the checkpoint file never got written, the epochs come back from
        // the batches.
        let image = fs.crash_image(CrashKind::PowerCut);
        let reopened = Engine::open(config_of(&image)).unwrap();
        assert_eq!(
            log_contents(&reopened, &p),
            BTreeMap::from([(0, 0), (1, 1), (2, 2)]),
            "journal {journal}"
        );
        block_on(async {
            assert_eq!(
                reopened.end_offset_for_epoch(&p, 4).await.unwrap(),
                Some((3, 2)),
                "journal {journal}"
            );
            assert_eq!(
                reopened.end_offset_for_epoch(&p, 5).await.unwrap(),
                Some((5, 3)),
                "journal {journal}"
            );
            // A clean shutdown and restart now skip the scan: the rebuilt epochs must be in the
            // file (written after the recovery, or by the shutdown), which the crash left empty.
            reopened.shutdown().await.unwrap();
        });
        drop(reopened);
        let clean = Engine::open(config_of(&image)).unwrap();
        block_on(async {
            assert_eq!(
                clean.end_offset_for_epoch(&p, 4).await.unwrap(),
                Some((3, 2)),
                "journal {journal}: after a clean restart"
            );
            assert_eq!(
                clean.partition_state(&p).await.unwrap().latest_epoch,
                Some(5),
                "journal {journal}: after a clean restart"
            );
        });
        drop(clean);
        // Released, the file is written, the flush answered, and a clean restart reads it.
        assert!(
            block_on(async { futures::poll!(flushing.as_mut()).is_pending() }),
            "journal {journal}: flushed while the file was held"
        );
        fs.hold(Hold::FileWrites, false);
        block_on(flushing).unwrap();
        assert!(fs.files().contains(&epoch_file(&p)), "journal {journal}");
        block_on(engine.shutdown()).unwrap();
        drop(engine);
        let engine = Engine::open(config_of(&fs)).unwrap();
        block_on(async {
            assert_eq!(
                engine.end_offset_for_epoch(&p, 3).await.unwrap(),
                Some((3, 2)),
                "journal {journal}"
            );
        });
    }
}
