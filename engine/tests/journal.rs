//! The shard journal (ARCHITECTURE.md, decision 10): many partitions' small appends durable through
//! one write and one fdatasync, replayed after a crash, never replayed into a log it no longer
//! belongs to (truncation, deletion), and out of the way when it fails.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::stream::{FuturesUnordered, StreamExt};
use keel_engine::io::sim::{CrashKind, FaultConfig, Hold, SimFs};
use keel_engine::{block_on, Engine, PartitionConfig, PartitionId};

fn config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 4 * 1024 * 1024,
        preallocate_bytes: 512 * 1024,
        max_message_bytes: 256 * 1024,
        cache_bytes: 256 * 1024,
        ..Default::default()
    }
}

/// What each partition acknowledged: offset → tag.
type Acked = BTreeMap<PartitionId, BTreeMap<u64, u64>>;

fn ids(n: u32) -> Vec<PartitionId> {
    (0..n).map(|i| PartitionId::new("j", i)).collect()
}

/// Small appends spread over `parts` with `concurrency` in flight until `stop` says so; returns
/// per partition offset → tag of every acknowledged append, and the crash image taken at `stop`.
fn small_appends(
    engine: &Engine,
    fs: &SimFs,
    parts: &[PartitionId],
    concurrency: usize,
    total: u64,
    crash_after: Option<usize>,
) -> (Acked, Option<SimFs>) {
    let (acked, failed, image) =
        spread_appends(engine, fs, parts, concurrency, total, crash_after, None);
    assert_eq!(failed, 0, "appends failed on a disk without faults");
    (acked, image)
}

/// `total` appends of 300–6,300 bytes spread over `parts`, `concurrency` in flight; the next
/// sync fails once `sync_failure_at` appends are issued. Returns offset → tag of those
/// acknowledged per partition, how many failed, and a power-cut image if `crash_after` of them
/// completed.
fn spread_appends(
    engine: &Engine,
    fs: &SimFs,
    parts: &[PartitionId],
    concurrency: usize,
    total: u64,
    crash_after: Option<usize>,
    sync_failure_at: Option<u64>,
) -> (Acked, usize, Option<SimFs>) {
    block_on(async {
        let mut acked = Acked::new();
        let mut failed = 0;
        let mut inflight = FuturesUnordered::new();
        let mut done = 0;
        for tag in 0..total {
            if sync_failure_at == Some(tag) {
                fs.fail_next_syncs(1);
            }
            let p = &parts[(tag as usize * 7) % parts.len()];
            let size = 300 + (tag as usize * 7919) % 6000;
            inflight
                .push(async move { (p, tag, engine.append(p, batch(tag, 1, size, 0), 0).await) });
            while inflight.len() >= concurrency || (tag + 1 == total && !inflight.is_empty()) {
                match inflight.next().await.unwrap() {
                    (p, tag, Ok(out)) => {
                        acked
                            .entry(p.clone())
                            .or_default()
                            .insert(out.base_offset, tag);
                    }
                    (_, _, Err(_)) => failed += 1,
                }
                done += 1;
                if crash_after == Some(done) {
                    return (acked, failed, Some(fs.crash_image(CrashKind::PowerCut)));
                }
            }
        }
        (acked, failed, None)
    })
}

fn create(engine: &Engine, parts: &[PartitionId]) {
    create_partitions(engine, parts, &config());
}

/// `shards` shards on a simulated disk whose operations take 0.1–1 ms and complete out of
/// order, with `parts` created.
fn jittery_engine(seed: u64, parts: &[PartitionId], shards: usize) -> (SimFs, Engine) {
    let fs = SimFs::new(FaultConfig {
        seed,
        latency: Duration::from_micros(100),
        latency_jitter: Duration::from_micros(900),
        ..Default::default()
    });
    let mut config = sim_config(&fs, shards);
    // A journal a fault turns off starts again soon, so faults also meet restarted journals.
    config.journal_restart_after = Duration::from_millis(20);
    let engine = Engine::open(config).unwrap();
    create(&engine, parts);
    (fs, engine)
}

/// Every acknowledged append is there, in a gap-free log from 0.
fn assert_holds(engine: &Engine, acked: &Acked, what: &str) -> usize {
    let mut total = 0;
    for (p, expected) in acked {
        let got = log_contents(engine, p);
        for (offset, tag) in expected {
            assert_eq!(
                got.get(offset),
                Some(tag),
                "{what}: {p} offset {offset} lost"
            );
        }
        for (i, &offset) in got.keys().enumerate() {
            assert_eq!(offset, i as u64, "{what}: gap in {p}");
        }
        total += got.len();
    }
    total
}

#[test]
fn small_appends_of_many_partitions_share_journal_writes_and_survive_power_cuts() {
    let parts = ids(48);
    for seed in 0..6u64 {
        let (fs, engine) = jittery_engine(seed, &parts, 1);
        // 1,500-2,400 appends of ~3 KiB: more than half the 4 MiB ring, so checkpoints run.
        let crash_after = 1500 + (seed as usize * 181) % 900;
        let (acked, image) = small_appends(&engine, &fs, &parts, 48, 3000, Some(crash_after));
        let m = engine.metrics();
        assert!(
            m.journal_writes > 0 && m.journal_writes * 4 < m.appends,
            "seed {seed}: {} journal writes for {} appends",
            m.journal_writes,
            m.appends
        );
        assert!(
            m.fsyncs < m.appends / 4,
            "seed {seed}: {} segment syncs",
            m.fsyncs
        );
        assert!(
            m.journal_checkpoints > 0,
            "seed {seed}: the ring was never reused"
        );
        // Every journal write is made durable by itself (RWF_DSYNC, issued when nothing else
        // was pending) or by a sync, and a sync covers at least one plain write.
        assert!(
            m.journal_durable_writes + m.journal_syncs > 0
                && m.journal_syncs <= m.journal_writes - m.journal_durable_writes,
            "seed {seed}: {} journal syncs, {} durable writes, {} journal writes",
            m.journal_syncs,
            m.journal_durable_writes,
            m.journal_writes
        );
        drop(engine);
        let engine = Engine::open(sim_config(&image.unwrap(), 1)).unwrap();
        assert_holds(&engine, &acked, &format!("seed {seed}"));
        // And the log goes on after the recovered end.
        let p = &parts[0];
        let end = block_on(engine.partition_state(p)).unwrap().appended.0;
        let out = block_on(engine.append(p, batch(1_000_000, 1, 100, 0), 0)).unwrap();
        assert_eq!(out.base_offset, end);
    }
}

#[test]
fn a_process_crash_replays_what_only_the_journal_holds_even_with_fewer_shards() {
    let parts = ids(16);
    let fs = SimFs::default();
    let engine = Engine::open(sim_config(&fs, 2)).unwrap();
    create(&engine, &parts);
    let (acked, _) = small_appends(&engine, &fs, &parts, 16, 400, None);
    // Small groups are written to their segments lazily: some acknowledged data is only in the
    // journal now (replay must find something to append).
    drop(engine); // like kill -9: no clean shutdown
    fs.crash(CrashKind::Process);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    assert!(
        engine.metrics().journal_replayed > 0,
        "nothing was replayed"
    );
    assert_eq!(assert_holds(&engine, &acked, "after replay"), 400);
    // The second shard's journal was replayed and removed; one journal is left.
    let journals: Vec<_> = fs
        .files()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "journal"))
        .collect();
    assert_eq!(journals.len(), 1, "{journals:?}");
    // A clean shutdown leaves nothing to replay.
    block_on(engine.shutdown()).unwrap();
    drop(engine);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    assert_eq!(engine.metrics().journal_replayed, 0);
    assert_eq!(assert_holds(&engine, &acked, "after a clean restart"), 400);
}

#[test]
fn truncated_batches_are_never_replayed_back() {
    for kind in [CrashKind::Process, CrashKind::PowerCut] {
        let fs = SimFs::default();
        let p = PartitionId::new("cut", 0);
        let engine = Engine::open(sim_config(&fs, 1)).unwrap();
        create(&engine, std::slice::from_ref(&p));
        block_on(async {
            for tag in 0..20 {
                engine.append(&p, batch(tag, 1, 2000, 0), 0).await.unwrap();
            }
            assert!(engine.metrics().journal_writes >= 20);
            engine.truncate_to(&p, 10).await.unwrap();
            for tag in 100..105 {
                engine.append(&p, batch(tag, 1, 2000, 0), 0).await.unwrap();
            }
        });
        let expected: BTreeMap<u64, u64> = (0..10)
            .map(|t| (t, t))
            .chain((100..105).enumerate().map(|(i, t)| (10 + i as u64, t)))
            .collect();
        assert_eq!(log_contents(&engine, &p), expected, "{kind:?}: live");
        drop(engine);
        fs.crash(kind);
        let engine = Engine::open(sim_config(&fs, 1)).unwrap();
        assert_eq!(
            log_contents(&engine, &p),
            expected,
            "{kind:?}: after the crash"
        );
    }
}

#[test]
fn a_recreated_partition_gets_none_of_its_predecessors_records() {
    let fs = SimFs::default();
    let p = PartitionId::new("again", 0);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    block_on(async {
        engine.create_partition(&p, config()).await.unwrap();
        for tag in 0..10 {
            engine.append(&p, batch(tag, 1, 1000, 0), 0).await.unwrap();
        }
        engine.delete_partition(&p).await.unwrap();
        engine.create_partition(&p, config()).await.unwrap();
        for tag in 50..53 {
            engine.append(&p, batch(tag, 1, 1000, 0), 0).await.unwrap();
        }
    });
    drop(engine);
    fs.crash(CrashKind::Process);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    assert_eq!(
        log_contents(&engine, &p),
        BTreeMap::from([(0, 50), (1, 51), (2, 52)])
    );
}

/// A journal acknowledgement that lands after its partition was deleted and created again under
/// the same id reaches nobody (decision 37's journal half). Staged: q's journal write goes out
/// durable by itself and is held in flight; p's record follows in a plain write, whose
/// fdatasync waits for q's write and is then held; p is deleted and created again, and the new
/// p's first write is held too. The old record's sync then completes: had its acknowledgement
/// reached the new p, the new p's append would count as durable (its `journal_durable` raised
/// past it) while its write is still in flight.
#[test]
fn a_stale_journal_acknowledgement_never_reaches_the_partition_created_in_its_place() {
    let fs = SimFs::default();
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let (p, q) = (PartitionId::new("again", 0), PartitionId::new("other", 0));
    block_on(async {
        for id in [&p, &q] {
            engine.create_partition(id, config()).await.unwrap();
            // Small appends until the journal takes them (a new segment's allocation is synced
            // first, decision 24) and the leader-epoch file has landed.
            for tag in 0..5 {
                engine.append(id, batch(tag, 1, 1000, 0), 0).await.unwrap();
            }
            wait_for_epoch_file(&fs, id);
        }
        let journaled = engine.metrics().journal_writes;
        for (id, tag) in [(&p, 5), (&q, 5)] {
            engine.append(id, batch(tag, 1, 1000, 0), 0).await.unwrap();
        }
        assert!(
            engine.metrics().journal_writes >= journaled + 2,
            "the journal takes both"
        );

        fs.hold_next(Hold::Writes, 1);
        let mut on_q = Box::pin(engine.append(&q, batch(6, 1, 1000, 0), 0));
        assert!(futures::poll!(&mut on_q).is_pending());
        wait_until("q's journal write is in flight", || {
            fs.waiting(Hold::Writes) == 1
        });
        let written = fs.op_counts().0;
        let mut on_p = Box::pin(engine.append(&p, batch(6, 1, 1000, 0), 0));
        assert!(futures::poll!(&mut on_p).is_pending());
        wait_until("p's journal write completes", || fs.op_counts().0 > written);
        fs.hold_next(Hold::FileSyncs, 1);
        fs.hold(Hold::Writes, false);
        wait_until("the sync of p's journal write waits", || {
            fs.waiting(Hold::FileSyncs) == 1
        });
        on_q.await.unwrap();

        engine.delete_partition(&p).await.unwrap();
        assert!(on_p.await.is_err(), "the deleted partition's append fails");
        engine.create_partition(&p, config()).await.unwrap();
        fs.hold(Hold::Writes, true);
        let mut again = Box::pin(engine.append(&p, batch(50, 1, 1000, 0), 0));
        assert!(futures::poll!(&mut again).is_pending());
        wait_until("the new p's write is in flight", || {
            fs.waiting(Hold::Writes) >= 1
        });
        // The old record's sync completes; the new p's write is still held.
        let syncs = fs.op_counts().1;
        fs.hold(Hold::FileSyncs, false);
        wait_until("the old record's sync completes", || {
            fs.op_counts().1 > syncs
        });
        let state = engine.partition_state(&p).await.unwrap();
        let early = futures::poll!(&mut again);
        fs.hold(Hold::Writes, false);
        assert!(
            early.is_pending() && state.durable.0 == 0,
            "the new partition took the old one's acknowledgement: {early:?}, durable {:?}",
            state.durable
        );
        let out = again.await.unwrap();
        assert_eq!(out.base_offset, 0);
    });
    assert_eq!(log_contents(&engine, &p), BTreeMap::from([(0, 50)]));
}

/// Four journaled partitions on one shard of a disk whose failed flushes lose what they covered
/// for good (ARCHITECTURE.md, decision 26), each with ~10 small appends acknowledged through the
/// journal (none on a segment yet), and nothing in flight. `restart_after`: the engine's
/// `journal_restart_after`, if not the default.
fn quiet_journaled_engine(
    restart_after: Option<Duration>,
) -> (SimFs, Engine, Vec<PartitionId>, Acked) {
    let fs = SimFs::new(FaultConfig {
        failed_sync_drops_writes: true,
        ..Default::default()
    });
    let parts = ids(4);
    let mut config = sim_config(&fs, 1);
    if let Some(after) = restart_after {
        config.journal_restart_after = after;
    }
    let engine = Engine::open(config).unwrap();
    create(&engine, &parts);
    let (acked, _) = small_appends(&engine, &fs, &parts, 4, 40, None);
    (fs, engine, parts, acked)
}

/// The next small append's journal write (`inject_sync`: its flush) fails: the journal turns
/// off, and the append is acknowledged through its partition's segment instead.
fn fail_the_journal(
    fs: &SimFs,
    engine: &Engine,
    parts: &[PartitionId],
    acked: &mut Acked,
    inject_sync: bool,
) {
    if inject_sync {
        fs.fail_next_syncs(1);
    } else {
        fs.fail_next_writes(1);
    }
    let out = block_on(engine.append(&parts[0], batch(7777, 1, 500, 0), 0)).unwrap();
    acked
        .get_mut(&parts[0])
        .unwrap()
        .insert(out.base_offset, 7777);
    assert_eq!(engine.metrics().io_errors, 1, "sync {inject_sync}");
}

/// Each partition's log is exactly what it acknowledged: nothing lost, nothing invented.
fn assert_exactly(engine: &Engine, acked: &Acked, what: &str) {
    for (p, expected) in acked {
        assert_eq!(&log_contents(engine, p), expected, "{what}: {p}");
    }
}

#[test]
fn a_failed_journal_write_or_sync_loses_nothing() {
    for inject_sync in [false, true] {
        let (fs, engine, parts, mut acked) = quiet_journaled_engine(None);
        // Everything is quiet: the next I/O is the journal's write of the next small append.
        fail_the_journal(&fs, &engine, &parts, &mut acked, inject_sync);
        // The journal is off; partitions sync their own segments and carry on.
        let writes = engine.metrics().journal_writes;
        let (more, _) = small_appends(&engine, &fs, &parts, 4, 40, None);
        assert_eq!(engine.metrics().journal_writes, writes);
        for (p, m) in more {
            let mine = acked.get_mut(&p).unwrap();
            mine.extend(m);
        }
        drop(engine);
        fs.crash(CrashKind::PowerCut);
        let engine = Engine::open(sim_config(&fs, 1)).unwrap();
        assert_holds(&engine, &acked, &format!("sync {inject_sync}"));
    }
}

/// A journal a failure turned off starts again once its wait is over and every partition's
/// segment holds what it had made durable: a new header whose checkpoint lies past every old
/// record. Appends go through it again, and a power cut after that loses nothing acknowledged
/// before, while or after it was off (ARCHITECTURE.md, decision 31).
#[test]
fn a_journal_turned_off_by_a_failure_starts_again_and_loses_nothing() {
    for inject_sync in [false, true] {
        let what = format!("sync {inject_sync}");
        let (fs, engine, parts, mut acked) =
            quiet_journaled_engine(Some(Duration::from_millis(50)));
        fail_the_journal(&fs, &engine, &parts, &mut acked, inject_sync);
        wait_until("the journal never started again", || {
            engine.metrics().journal_restarts == 1
        });
        let writes = engine.metrics().journal_writes;
        let (more, _) = small_appends(&engine, &fs, &parts, 4, 40, None);
        assert!(
            engine.metrics().journal_writes > writes,
            "{what}: the journal takes small appends again"
        );
        for (p, m) in more {
            acked.get_mut(&p).unwrap().extend(m);
        }
        let m = engine.metrics();
        assert_eq!((m.io_errors, m.journal_restarts), (1, 1), "{what}");
        drop(engine);
        fs.crash(CrashKind::PowerCut);
        let engine = Engine::open(sim_config(&fs, 1)).unwrap();
        assert_holds(&engine, &acked, &what);
        assert_exactly(&engine, &acked, &what);
    }
}

/// The restart waits for the segments: here one partition's catch-up write (its small groups,
/// durable only in the journal, go to its segment once the journal is off) fails too, and its
/// rewrite waits out `rewrite_backoff` (100 ms). A journal that started again meanwhile, with a
/// checkpoint past those records, would leave them nowhere after a power cut.
#[test]
fn a_journal_starts_again_only_once_the_segments_hold_what_it_made_durable() {
    let (fs, engine, parts, acked) = quiet_journaled_engine(Some(Duration::from_millis(1)));
    // The journal's next write fails, and so does the first segment write after it.
    fs.fail_next_writes(2);
    let _ = block_on(engine.append(&parts[0], batch(7777, 1, 500, 0), 0));
    wait_until("the journal never started again", || {
        engine.metrics().journal_restarts == 1
    });
    let image = fs.crash_image(CrashKind::PowerCut);
    assert_eq!(engine.metrics().io_errors, 2, "both writes failed");
    let reopened = Engine::open(sim_config(&image, 1)).unwrap();
    assert_holds(
        &reopened,
        &acked,
        "a power cut as the journal started again",
    );
}

#[test]
fn a_checkpoint_syncs_the_rests_it_forces_out_together() {
    // A checkpoint forces out every partition's rest; each becomes due for a sync as its write
    // completes. They share one sync (ARCHITECTURE.md, decision 19), not one per few partitions:
    // with 48 partitions the previous behaviour took ~13 per checkpoint.
    let parts = ids(48);
    for seed in 0..4u64 {
        let (fs, engine) = jittery_engine(seed, &parts, 1);
        let (acked, _) = small_appends(&engine, &fs, &parts, 48, 3000, None);
        let m = engine.metrics();
        assert!(
            m.journal_checkpoints >= 2,
            "seed {seed}: {} checkpoints",
            m.journal_checkpoints
        );
        // `journal_full` counts waits for room, each once, not every pass that finds the ring
        // still full (those were 40-52 here): a wait ends when room comes back, at a
        // checkpoint or at the end of a lap, and a write goes out.
        let laps = m.journal_bytes / keel_engine::constants::journal_bytes_min;
        assert!(
            m.journal_full <= 2 * (m.journal_checkpoints + laps + 1),
            "seed {seed}: {} waits for room, {} checkpoints, {laps} laps",
            m.journal_full,
            m.journal_checkpoints
        );
        assert!(
            m.segment_sync_calls <= m.journal_checkpoints + 2,
            "seed {seed}: {} segment syncs for {} checkpoints",
            m.segment_sync_calls,
            m.journal_checkpoints
        );
        // Every append here is small and within its segment's allocation, so the journal makes
        // each durable: a segment write durable by itself (`RWF_DSYNC`) would spend a device
        // flush on appends the journal takes anyway (decision 33; a checkpoint forcing a rest
        // out with a new append behind it did that, 1-3 times per seed).
        assert_eq!(
            m.segment_durable_writes, 0,
            "seed {seed}: segment writes durable by themselves"
        );
        assert_holds(&engine, &acked, &format!("seed {seed}"));
        // A clean shutdown writes every partition's rest to its segment: plain writes that the
        // shard's syncs cover together, not a lone durable write (and its flush) per partition
        // (decision 35; the previous engine made one per partition with a rest: 25 at seed 0).
        let before = engine.metrics();
        block_on(engine.shutdown()).unwrap();
        let m = engine.metrics().since(&before);
        assert_eq!(m.segment_durable_writes, 0, "seed {seed}: {m:?}");
        assert!(
            m.segment_sync_calls < parts.len() as u64 / 4,
            "seed {seed}: {m:?}"
        );
    }
}

/// Random write and sync failures over many journaled partitions, on one shard or two (the
/// journal taken off by a failure, checkpoints, syncfs groups), on a disk that loses for good
/// what a failed sync covered, in every file (ARCHITECTURE.md, decisions 26, 27 and 29); then a
/// power cut. Exactly the acknowledged appends come back (decision 28 fixed the last way one
/// was lost, about 1 run in 15 before).
#[test]
fn random_io_errors_across_many_partitions_then_a_power_cut_lose_nothing_acknowledged() {
    let parts = ids(16);
    for seed in 0..4u64 {
        // Odd seeds on two shards: a flush that fails on one puts the other's writes in doubt
        // too (decision 29).
        let (fs, engine) = jittery_engine(seed, &parts, 1 + seed as usize % 2);
        fs.set_faults(FaultConfig {
            seed,
            latency: Duration::from_micros(100),
            latency_jitter: Duration::from_micros(900),
            write_error_rate: 0.01,
            sync_error_rate: 0.01,
            failed_sync_drops_writes: true,
            ..Default::default()
        });
        // At least one fault halfway, whatever the random ones hit.
        let (acked, failed, _) = spread_appends(&engine, &fs, &parts, 32, 1500, None, Some(750));
        let m = engine.metrics();
        assert!(m.io_errors > 0, "seed {seed}: no fault hit anything");
        fs.set_faults(FaultConfig::default());
        assert_exactly(&engine, &acked, &format!("seed {seed}"));
        let image = fs.crash_image(CrashKind::PowerCut);
        let reopened = Engine::open(sim_config(&image, 1)).unwrap();
        assert_exactly(
            &reopened,
            &acked,
            &format!("seed {seed}, after a power cut ({failed} appends failed, {m:?})"),
        );
    }
}

/// Decision 26's segment-boundary rollback, staged: a rollback whose target is the base of a
/// segment the log has not rolled into (a batch is assigned to it, its file does not exist
/// because the roll waits) keeps the log at the end of the segment before, which is then cut
/// and sealed like any write segment. Entering the new segment instead left the one before it
/// unsealed in the middle of the log — its file longer than its data, zeros after it — and the
/// next start refused it.
///
/// How the roll is made to wait with the log durable exactly to the segment's end: a journaled
/// partition rolled back after a failed write writes its batches again and, before the journal
/// may take it again, writes a new incarnation file — a control operation, which the roll
/// waits for. That file's fsync fails: back to the durable point, the next segment's base.
#[test]
fn a_rollback_to_a_segment_the_log_has_not_rolled_into_leaves_the_one_before_sealed() {
    let fs = SimFs::default();
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    let p = PartitionId::new("boundary", 0);
    let config = PartitionConfig {
        segment_bytes: 1024 * 1024,
        ..config()
    };
    create_partitions(&engine, std::slice::from_ref(&p), &config);
    block_on(async {
        // Seventeen batches of ~60 KB fill most of the first 1 MiB segment, durable through the
        // journal (their segment writes lag behind: lazy); an eighteenth needs the next segment.
        for tag in 0..17 {
            engine
                .append(&p, batch(tag, 1, 60_000, 0), 0)
                .await
                .unwrap();
        }
        wait_for_epoch_file(&fs, &p);
        assert!(engine.metrics().journal_writes > 0, "the journal took them");
        // The eighteenth lies in the next segment, where the journal cannot take it (no space
        // allocated there): the first segment's rest goes out first, in two pieces (the
        // carried block, then the blocks after it: decision 6), and both fail. The rollback
        // keeps what the journal made durable (up to the next segment's base), writes the rest
        // again after its backoff, and before that cuts the file; the cut's last step, its
        // leader-epoch file, is held.
        fs.hold_next(Hold::FileWrites, 1);
        fs.fail_next_writes(2);
        let (failed, second) =
            futures::join!(engine.append(&p, batch(17, 1, 60_000, 0), 0), async {
                wait_until("the rollback's cut writes its epoch file", || {
                    fs.waiting(Hold::FileWrites) == 1
                });
                // The failure is handled, so the next append is taken: it lies in the next segment,
                // which has no file, and waits for the roll.
                let second = engine.append(&p, batch(18, 1, 60_000, 0), 0);
                let (second, state) = futures::join!(second, async {
                    let state = engine.partition_state(&p).await.unwrap();
                    // The cut goes on; the next file write (the new incarnation, once the batches
                    // are in the segment again and durable) is held, and its fsync fails.
                    fs.hold_next(Hold::FileWrites, 1);
                    fs.release_waiting(Hold::FileWrites);
                    wait_until("the partition writes a new incarnation", || {
                        fs.waiting(Hold::FileWrites) == 1
                    });
                    fs.fail_next_syncs(1);
                    fs.hold(Hold::FileWrites, false);
                    state
                });
                assert_eq!((state.appended.0, state.segments), (18, 2), "staged");
                second
            });
        assert!(failed.is_err(), "{failed:?}");
        // Rolled back to offset 17, the base of the segment with no file.
        let err = second.unwrap_err();
        assert!(matches!(err, keel_engine::Error::Io { .. }), "{err}");
        let state = engine.partition_state(&p).await.unwrap();
        assert_eq!((state.appended.0, state.durable.0), (17, 17));
        // The next append rolls into a new segment as usual.
        let out = engine.append(&p, batch(19, 1, 60_000, 0), 0).await.unwrap();
        assert_eq!(out.base_offset, 17);
        assert_eq!(engine.partition_state(&p).await.unwrap().segments, 2);
    });
    let expected: BTreeMap<u64, u64> = (0..17).map(|t| (t, t)).chain([(17, 19)]).collect();
    assert_eq!(log_contents(&engine, &p), expected);
    drop(engine);
    fs.crash(CrashKind::PowerCut);
    let engine = Engine::open(sim_config(&fs, 1)).unwrap();
    assert_eq!(log_contents(&engine, &p), expected, "after a power cut");
}
