//! Damaged segment files: bytes flipped, zeroed or cut at many positions. No corrupt batch is
//! ever returned; recovery either cuts a torn tail, or refuses (Strict) / truncates (TruncateTail)
//! with an error naming the file and position.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::*;
use keel_engine::io::sim::{Hold, SimFs};
use keel_engine::{block_on, Engine, Error, PartitionConfig, PartitionId, RecoveryMode};

const BATCHES: u64 = 120;

fn config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes: 1024 * 1024,
        preallocate_bytes: 256 * 1024,
        max_message_bytes: 64 * 1024,
        ..Default::default()
    }
}

/// A log of `BATCHES` batches over a few segments, left as after a crash (no clean marker).
fn build_log() -> (SimFs, PartitionId, Vec<PathBuf>) {
    let fs = SimFs::default();
    let p = PartitionId::new("damaged", 0);
    let engine = Engine::open(no_journal(sim_config(&fs, 1))).unwrap();
    block_on(async {
        engine.create_partition(&p, config()).await.unwrap();
        for tag in 0..BATCHES {
            engine
                .append(
                    &p,
                    batch(tag, 1, 20_000 + tag as usize * 13, timestamp_of(tag)),
                    0,
                )
                .await
                .unwrap();
        }
    });
    drop(engine);
    let logs: Vec<PathBuf> = fs
        .files()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "log"))
        .collect();
    assert!(logs.len() >= 3, "{logs:?}");
    (fs, p, logs)
}

/// Batch `tag`'s timestamp: growing, so time lookups have something to find.
fn timestamp_of(tag: u64) -> i64 {
    1_000 + tag as i64 * 10
}

fn copy(fs: &SimFs) -> SimFs {
    fs.crash_image(keel_engine::io::sim::CrashKind::Process)
}

/// Read everything; returns the tags read and the error that stopped the read, if any.
fn read_all(engine: &Engine, p: &PartitionId) -> (Vec<u64>, Option<Error>) {
    block_on(async {
        let mut tags = Vec::new();
        let mut offset = 0;
        loop {
            match engine.read(p, offset, everything()).await {
                Ok(r) if r.is_empty() => return (tags, None),
                Ok(r) => {
                    tags.extend(batches_of(&r.chunks).iter().map(|b| tag_of(b)));
                    offset = r.next_offset;
                }
                Err(e) => return (tags, Some(e)),
            }
        }
    })
}

/// These tests damage segments: without a journal, no replay repairs what they damaged (the
/// journal's own damage handling is tested in `journal.rs`).
fn no_journal(mut c: keel_engine::EngineConfig) -> keel_engine::EngineConfig {
    c.journal_bytes = 0;
    c
}

fn open(fs: &SimFs, mode: RecoveryMode) -> Result<Engine, Error> {
    let mut c = no_journal(sim_config(fs, 1));
    c.recovery = mode;
    Engine::open(c)
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip,
    ZeroBlock,
    Cut,
}

fn damage(fs: &SimFs, file: &std::path::Path, position: usize, kind: Damage) {
    fs.with_file(file, |data| match kind {
        Damage::Flip => data[position] ^= 0x5a,
        Damage::ZeroBlock => {
            let start = position & !4095;
            let end = (start + 4096).min(data.len());
            data[start..end].fill(0);
        }
        Damage::Cut => data.truncate(position),
    })
    .unwrap();
}

#[test]
fn damage_in_the_last_segment_is_cut_as_a_torn_tail_or_refused_as_corruption() {
    let (pristine, p, logs) = build_log();
    let last = logs.last().unwrap().clone();
    // Only the bytes that hold batches: past the log end lie preallocated zeros.
    let size_bytes = {
        let engine = open(&copy(&pristine), RecoveryMode::Strict).unwrap();
        block_on(engine.partition_state(&p)).unwrap().size_bytes as usize
    };
    let sealed: usize = logs[..logs.len() - 1]
        .iter()
        .map(|f| pristine.with_file(f, |d| d.len()).unwrap())
        .sum();
    let len = size_bytes - sealed;
    assert!(len > 100_000 && len < pristine.with_file(&last, |d| d.len()).unwrap());
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for step in 0..40 {
        let position = 7 + step * (len - 100) / 40;
        for kind in [Damage::Flip, Damage::ZeroBlock, Damage::Cut] {
            let fs = copy(&pristine);
            damage(&fs, &last, position, kind);
            match open(&fs, RecoveryMode::Strict) {
                Ok(engine) => {
                    // Opened: the damage was taken for a torn tail. What is left is a clean prefix.
                    let (tags, error) = read_all(&engine, &p);
                    assert!(error.is_none(), "{kind:?}@{position}: {error:?}");
                    assert_eq!(
                        tags,
                        (0..tags.len() as u64).collect::<Vec<_>>(),
                        "{kind:?}@{position}"
                    );
                    assert!(
                        matches!(kind, Damage::ZeroBlock | Damage::Cut),
                        "a flipped byte is never a torn tail ({position})"
                    );
                    *outcomes.entry("torn tail cut").or_default() += 1;
                }
                Err(Error::Corruption {
                    file,
                    position: at,
                    reason,
                }) => {
                    assert_eq!(file, last);
                    assert!(
                        at as usize <= position,
                        "{kind:?}: reported {at} after the damage at {position}"
                    );
                    assert!(!reason.is_empty());
                    // TruncateTail opens, keeping exactly the batches before the damage.
                    let engine = open(&fs, RecoveryMode::TruncateTail).unwrap();
                    let (tags, error) = read_all(&engine, &p);
                    assert!(error.is_none());
                    assert_eq!(tags, (0..tags.len() as u64).collect::<Vec<_>>());
                    assert!(tags.len() < BATCHES as usize);
                    *outcomes.entry("refused").or_default() += 1;
                }
                Err(other) => panic!("{kind:?}@{position}: unexpected {other}"),
            }
        }
    }
    // Both outcomes happen (flips are refused; cuts are torn tails).
    assert!(outcomes.len() == 2, "{outcomes:?}");
}

#[test]
fn damage_in_a_sealed_segment_is_found_on_read_and_never_served() {
    let (pristine, p, logs) = build_log();
    let first = &logs[0];
    let len = pristine.with_file(first, |d| d.len()).unwrap();
    for step in 0..20 {
        let position = 100 + step * (len - 200) / 20;
        let fs = copy(&pristine);
        damage(&fs, first, position, Damage::Flip);
        let engine = open(&fs, RecoveryMode::Strict).unwrap();
        let (tags, error) = read_all(&engine, &p);
        match error {
            Some(Error::Corruption {
                file, position: at, ..
            }) => {
                assert_eq!(&file, first);
                assert!(at as usize <= position);
            }
            other => panic!("damage at {position} was not reported: {other:?}"),
        }
        assert_eq!(tags, (0..tags.len() as u64).collect::<Vec<_>>());
        assert!(
            engine.metrics().crc_failures >= 1,
            "damage at {position} was not counted"
        );
        // Reads past the damaged batch still work.
        let resume = block_on(engine.read(&p, tags.len() as u64 + 1, everything()));
        assert!(resume.is_ok());
    }
}

#[test]
fn a_clean_shutdown_skips_the_scan_but_reads_still_check_every_crc() {
    let (pristine, p, logs) = build_log();
    let engine = open(&pristine, RecoveryMode::Strict).unwrap();
    block_on(engine.shutdown()).unwrap();
    drop(engine);
    assert!(pristine
        .files()
        .iter()
        .any(|f| f.ends_with(".clean-shutdown")));
    let last = logs.last().unwrap();
    damage(&pristine, last, 5000, Damage::Flip);
    // The marker vouches for the log, so open does not look...
    let engine = open(&pristine, RecoveryMode::Strict).unwrap();
    assert!(!pristine
        .files()
        .iter()
        .any(|f| f.ends_with(".clean-shutdown")));
    // ...but the damaged batch is still never served.
    let (tags, error) = read_all(&engine, &p);
    assert!(matches!(error, Some(Error::Corruption { .. })), "{error:?}");
    assert!((tags.len() as u64) < BATCHES);
    assert!(engine.metrics().crc_failures >= 1);
}

#[test]
fn a_damaged_clean_shutdown_marker_is_not_trusted() {
    let (pristine, p, logs) = build_log();
    let last: u64 = logs
        .last()
        .unwrap()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let engine = open(&pristine, RecoveryMode::Strict).unwrap();
    block_on(engine.shutdown()).unwrap();
    drop(engine);
    let marker = pristine
        .files()
        .into_iter()
        .find(|f| f.ends_with(".clean-shutdown"))
        .unwrap();
    let bad_markers = [
        format!("{last} 999999999 {}\n", last + 1), // size past the end of the file
        format!("{last} 100 0\n"),                  // next offset below the segment's base
        "garbage\n".to_string(),
    ];
    for bad in bad_markers {
        let fs = copy(&pristine);
        fs.with_file(&marker, |d| *d = bad.as_bytes().to_vec())
            .unwrap();
        // A marker that does not fit the files is ignored and the log is scanned.
        let engine = open(&fs, RecoveryMode::Strict).unwrap();
        let (tags, error) = read_all(&engine, &p);
        assert!(error.is_none(), "{bad:?}: {error:?}");
        assert_eq!(tags, (0..BATCHES).collect::<Vec<_>>(), "{bad:?}");
    }
}

/// `batch(tag, 1, payload, 0)` of exactly `size` bytes.
fn batch_of_size(tag: u64, size: usize) -> bytes::Bytes {
    let overhead = batch(tag, 1, size, 0).len() - size;
    let b = batch(tag, 1, size - overhead, 0);
    assert_eq!(b.len(), size, "varint lengths shifted; pick another size");
    b
}

#[test]
fn a_batch_starting_a_few_bytes_before_a_read_boundary_is_recovered_and_read() {
    // A header begins with the base offset, whose high bytes are zeros: a read window that ends
    // 1-8 bytes into a header shows only zeros there. Recovery reads 1 MiB windows from the
    // segment's start and fetches read `max_bytes` + one block; neither may take those zeros for
    // the end of the log (both did: recovery refused to open a healthy log, a fetch reported
    // "zeros inside the log").
    let mut big = config();
    big.max_message_bytes = 2 * 1024 * 1024;
    big.segment_bytes = 4 * 1024 * 1024;
    for short in 1..=8usize {
        let fs = SimFs::default();
        let p = PartitionId::new("boundary", 0);
        let engine = Engine::open(no_journal(sim_config(&fs, 1))).unwrap();
        block_on(async {
            engine.create_partition(&p, big.clone()).await.unwrap();
            let first = batch_of_size(0, 1024 * 1024 - short);
            engine.append(&p, first, 0).await.unwrap();
            for tag in 1..3 {
                engine.append(&p, batch(tag, 1, 300, 0), 0).await.unwrap();
            }
        });
        drop(engine); // a crash: the next open scans the segment
        let engine = open(&copy(&fs), RecoveryMode::Strict)
            .unwrap_or_else(|e| panic!("{short} bytes short: {e}"));
        let (tags, error) = read_all(&engine, &p);
        assert!(error.is_none(), "{short} bytes short: {error:?}");
        assert_eq!(tags, vec![0, 1, 2], "{short}");
        // A fetch whose window ends exactly at 1 MiB: the first batch, and no error.
        let read = block_on(engine.read(
            &p,
            0,
            keel_engine::ReadOptions {
                max_bytes: 1024 * 1024 - 4096,
                upper: keel_engine::ReadUpper::Appended,
            },
        ))
        .unwrap_or_else(|e| panic!("{short} bytes short: {e}"));
        assert_eq!(read.next_offset, 1, "{short}");
    }
}

#[test]
fn a_stored_offset_outside_kafkas_range_is_damage_not_a_panic() {
    // The base offset lies outside the CRC'd range, so a damaged one still passes the CRC. Offsets
    // that do not fit Kafka's signed 64-bit range (negative, or a last offset at i64::MAX) made
    // recovery overflow its offset arithmetic and take the shard down (found by the recovery fuzz
    // target). They are damage like any other: refused in Strict, cut in TruncateTail.
    let (pristine, p, logs) = build_log();
    let last = logs.last().unwrap().clone();
    // The position of the last batch of the last segment.
    let last_batch = pristine
        .with_file(&last, |data| {
            let (mut at, mut previous) = (0, None);
            // Zeros past the log's end parse as magic 0, an error: the walk stops there.
            while let Ok(h) = keel_engine::batch::BatchHeader::parse(&data[at..]) {
                previous = Some(at);
                at += h.size_bytes;
            }
            previous
        })
        .unwrap()
        .expect("the last segment holds batches");
    // The last batch holds one record: i64::MAX - 1 would still fit (its next offset is i64::MAX).
    for bad in [-1i64, -2_000_000_000, i64::MIN, i64::MAX] {
        let fs = copy(&pristine);
        fs.with_file(&last, |data| {
            keel_engine::batch::set_base_offset(&mut data[last_batch..], bad as u64)
        })
        .unwrap();
        match open(&fs, RecoveryMode::Strict) {
            Err(Error::Corruption { file, position, .. }) => {
                assert_eq!(file, last, "{bad}");
                assert_eq!(position as usize, last_batch, "{bad}");
            }
            Err(other) => panic!("{bad}: unexpected {other}"),
            Ok(_) => panic!("{bad}: a log holding offset {bad} opened in Strict mode"),
        }
        let engine = open(&fs, RecoveryMode::TruncateTail).unwrap();
        let (tags, error) = read_all(&engine, &p);
        assert!(error.is_none(), "{bad}: {error:?}");
        assert_eq!(tags, (0..BATCHES - 1).collect::<Vec<_>>(), "{bad}");
    }
}

/// Time lookups find the first batch at or after each batch's time (the last batch of every
/// segment included: a reopened segment's max timestamp comes from its time index), between two
/// batches' times, before the log and past it.
fn assert_time_lookups(engine: &Engine, p: &PartitionId, what: &str) {
    let probes = (0..BATCHES).flat_map(|tag| [timestamp_of(tag), timestamp_of(tag) - 3]);
    for at in probes.chain([0, timestamp_of(BATCHES - 1) + 1]) {
        let expected = (0..BATCHES)
            .find(|&tag| timestamp_of(tag) >= at)
            .map(|tag| (tag, timestamp_of(tag)));
        let found = block_on(engine.offset_for_timestamp(p, at)).unwrap();
        assert_eq!(
            found.map(|t| (t.offset, t.timestamp)),
            expected,
            "{what}: first at or after {at}"
        );
    }
}

#[test]
fn time_lookups_find_every_batch_after_a_crash_and_after_a_clean_shutdown() {
    let (crashed, p, _) = build_log();
    let reopened = copy(&crashed);
    let engine = open(&reopened, RecoveryMode::Strict).unwrap();
    assert_time_lookups(&engine, &p, "after a crash");
    block_on(engine.shutdown()).unwrap();
    // Reopened from the indexes written at shutdown and at each roll, without a scan.
    let engine = open(&reopened, RecoveryMode::Strict).unwrap();
    assert_time_lookups(&engine, &p, "after a clean shutdown");
}

#[test]
fn damaged_metadata_files_are_rebuilt_or_ignored_and_the_log_is_served_whole() {
    // Indexes, time indexes, the leader-epoch checkpoint and the recovery point are derived from
    // the log: garbage in any of them (after a crash, or after a clean shutdown, when the scan is
    // skipped) may cost a rescan but never a batch, and lookups stay within the log.
    let (crashed, p, _) = build_log();
    let clean = copy(&crashed);
    {
        let engine = open(&clean, RecoveryMode::Strict).unwrap();
        block_on(engine.shutdown()).unwrap();
    }
    for (state, pristine) in [
        ("after a crash", &crashed),
        ("after a clean shutdown", &clean),
    ] {
        let metadata: Vec<PathBuf> = pristine
            .files()
            .into_iter()
            .filter(|f| {
                let name = f.file_name().unwrap().to_str().unwrap();
                name.ends_with(".index")
                    || name.ends_with(".timeindex")
                    || name == "leader-epoch-checkpoint"
                    || name == "recovery-point"
            })
            .collect();
        assert!(metadata.len() >= 4, "{state}: {metadata:?}");
        for file in &metadata {
            for garbage in [&b"garbage\n"[..], &[0xa5; 37][..], &[]] {
                let fs = copy(pristine);
                fs.with_file(file, |d| *d = garbage.to_vec()).unwrap();
                let what = format!("{state}, {} holding {garbage:?}", file.display());
                let engine =
                    open(&fs, RecoveryMode::Strict).unwrap_or_else(|e| panic!("{what}: {e}"));
                let (tags, error) = read_all(&engine, &p);
                assert!(error.is_none(), "{what}: {error:?}");
                assert_eq!(tags, (0..BATCHES).collect::<Vec<_>>(), "{what}");
                let end = block_on(engine.partition_state(&p)).unwrap().appended.0;
                assert_time_lookups(&engine, &p, &what);
                if let Some((_, epoch_end)) = block_on(engine.end_offset_for_epoch(&p, 0)).unwrap()
                {
                    assert!(
                        epoch_end <= end,
                        "{what}: epoch 0 ends at {epoch_end}, log at {end}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_lost_sector_holding_only_a_batchs_last_bytes_is_a_torn_tail() {
    // A power cut kept every block of the last write but its final one, into which the last
    // batch reaches by `k` < 512 bytes: no whole sector of the batch is zero, yet the sector it
    // ends in is (nothing follows it). That is a torn tail, cut; it was refused as damage ("a
    // batch that was written whole") when only sectors lying wholly inside the batch counted.
    // The same zeros with a batch following in that sector are damage: that sector was written
    // (its header's length and CRC lie in it, not zeros).
    for k in [1usize, 61, 300, 450] {
        for followed in [false, true] {
            let fs = SimFs::default();
            let p = PartitionId::new("lost-sector", 0);
            let engine = Engine::open(no_journal(sim_config(&fs, 1))).unwrap();
            let lost_at = 4 * 4096;
            block_on(async {
                engine.create_partition(&p, config()).await.unwrap();
                engine
                    .append(&p, batch_of_size(0, 10_000), 0)
                    .await
                    .unwrap();
                engine
                    .append(&p, batch_of_size(1, lost_at + k - 10_000), 0)
                    .await
                    .unwrap();
                if followed {
                    engine.append(&p, batch(2, 1, 300, 0), 0).await.unwrap();
                }
            });
            drop(engine); // a crash: the next open scans the segment
            let image = copy(&fs);
            let log = image
                .files()
                .into_iter()
                .find(|f| f.extension().is_some_and(|e| e == "log"))
                .unwrap();
            image
                .with_file(&log, |d| d[lost_at..lost_at + k].fill(0))
                .unwrap();
            match open(&image, RecoveryMode::Strict) {
                Ok(engine) if !followed => {
                    let (tags, error) = read_all(&engine, &p);
                    assert!(error.is_none(), "k={k}: {error:?}");
                    assert_eq!(
                        tags,
                        vec![0],
                        "k={k}: the torn batch is cut, the one before kept"
                    );
                }
                Err(Error::Corruption { position, .. }) if followed => {
                    assert_eq!(position, 10_000, "k={k}");
                }
                Ok(_) => {
                    panic!("k={k}: zeros inside the log, data after them, taken for a torn tail")
                }
                Err(e) => panic!("k={k} followed={followed}: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery points inside the active segment (ARCHITECTURE.md, decision 39)

/// Recovery points every this many durable bytes in these tests (batches are ~20–22 KB).
const POINT_INTERVAL: u64 = 64 * 1024;
/// The largest batch `append_tags` makes, and the offset index's spacing: how far before a
/// recovery point the scan may resume (at the last index entry before it).
const RESUME_SLACK: u64 = 22_000 + 4096;

fn with_points(mut c: keel_engine::EngineConfig) -> keel_engine::EngineConfig {
    c.recovery_point_bytes = POINT_INTERVAL;
    c
}

fn append_tags(engine: &Engine, p: &PartitionId, tags: std::ops::Range<u64>) {
    block_on(async {
        for tag in tags {
            let b = batch(
                tag,
                1,
                20_000 + (tag as usize % 120) * 13,
                timestamp_of(tag),
            );
            engine.append(p, b, 0).await.unwrap();
        }
    });
}

/// `p`'s `recovery-point` file on `fs`: segment, position, next offset, and the incarnation
/// a point inside a segment carries.
fn recovery_point(fs: &SimFs, p: &PartitionId) -> Vec<u64> {
    let path = keel_engine::segment::path::partition_dir(std::path::Path::new("/sim/data"), p)
        .join(keel_engine::segment::path::RECOVERY_POINT_FILE);
    let text = fs
        .with_file(&path, |d| String::from_utf8(d.clone()))
        .unwrap();
    let text = text.unwrap();
    text.split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Bytes of the batches from offset `from` to the log end.
fn bytes_from(engine: &Engine, p: &PartitionId, from: u64) -> u64 {
    block_on(async {
        let mut total = 0;
        let mut offset = from;
        loop {
            let read = engine.read(p, offset, everything()).await.unwrap();
            if read.is_empty() {
                return total;
            }
            total += read.chunks.iter().map(|c| c.len() as u64).sum::<u64>();
            offset = read.next_offset;
        }
    })
}

/// An engine with recovery points over a log of `BATCHES` batches, once a recovery point inside
/// its last segment, less than an interval from the log's end, is on disk.
fn log_with_points() -> (SimFs, Engine, PartitionId) {
    let fs = SimFs::default();
    let p = PartitionId::new("pointed", 0);
    let engine = Engine::open(with_points(no_journal(sim_config(&fs, 1)))).unwrap();
    block_on(engine.create_partition(&p, config())).unwrap();
    append_tags(&engine, &p, 0..BATCHES);
    settle_point(&fs, &engine, &p);
    (fs, engine, p)
}

/// The base offsets of the segment files on `fs`, in order.
fn segment_bases(fs: &SimFs) -> Vec<u64> {
    let mut bases: Vec<u64> = fs
        .files()
        .into_iter()
        .filter_map(|f| keel_engine::segment::path::parse_log_file_name(f.file_name()?.to_str()?))
        .collect();
    bases.sort_unstable();
    bases
}

/// Wait until the recovery point on disk lies inside `p`'s last segment, within an interval of
/// its end (it is written beside the data path after the appends that crossed it).
fn settle_point(fs: &SimFs, engine: &Engine, p: &PartitionId) {
    wait_until("a recovery point near the log's end", || {
        let point = recovery_point(fs, p);
        let state = block_on(engine.partition_state(p)).unwrap();
        let last = *segment_bases(fs).last().unwrap();
        point.len() == 4
            && point[0] == last
            && bytes_from(engine, p, point[2]) < POINT_INTERVAL + 22_000
            && state.durable.0 == state.appended.0
    });
}

#[test]
fn a_crash_rescans_only_what_follows_the_last_recovery_point() {
    let (fs, engine, p) = log_with_points();
    let mut end = BATCHES;
    for round in 0..2 {
        // Two batches more: past the point, unless they moved it.
        append_tags(&engine, &p, end..end + 2);
        end += 2;
        let image = copy(&fs);
        let point = recovery_point(&image, &p);
        let reopened = Engine::open(with_points(no_journal(sim_config(&image, 1)))).unwrap();
        let scanned = reopened.metrics().recovery_scanned_bytes;
        let segment_bytes = bytes_from(&reopened, &p, point[0]);
        let after_point = bytes_from(&reopened, &p, point[2]);
        assert!(
            scanned >= after_point
                && scanned <= after_point + RESUME_SLACK
                && scanned < segment_bytes,
            "round {round}: scanned {scanned} bytes of a {segment_bytes}-byte segment whose \
             recovery point {point:?} leaves {after_point}"
        );
        let (tags, error) = read_all(&reopened, &p);
        assert!(error.is_none(), "round {round}: {error:?}");
        assert_eq!(tags, (0..end).collect::<Vec<_>>(), "round {round}");
        assert_eq!(
            block_on(reopened.end_offset_for_epoch(&p, 0)).unwrap(),
            Some((0, end)),
            "round {round}"
        );
        // Time lookups through the restored and the rebuilt part of the time index.
        for tag in (0..end).step_by(7) {
            let found = block_on(reopened.offset_for_timestamp(&p, timestamp_of(tag) - 3))
                .unwrap()
                .map(|t| t.offset);
            assert_eq!(found, Some(tag), "round {round}: time of batch {tag}");
        }
        drop(reopened);
        // The log goes on: more appends, more points, and another crash.
        append_tags(&engine, &p, end..end + BATCHES);
        end += BATCHES;
        settle_point(&fs, &engine, &p);
    }
}

#[test]
fn a_recovery_point_the_log_does_not_pass_through_is_not_trusted() {
    // A point whose position, offset or incarnation does not fit the log (stale, or left by a
    // partition deleted and created again) costs a scan of the whole segment, never a batch.
    let (fs, engine, p) = log_with_points();
    let crashed = copy(&fs);
    drop(engine);
    let point = recovery_point(&crashed, &p);
    let (segment, position, next, incarnation) = (point[0], point[1], point[2], point[3]);
    let lies = [
        (
            "one byte further",
            [segment, position + 1, next, incarnation],
        ),
        ("one byte short", [segment, position - 1, next, incarnation]),
        (
            "an offset too far",
            [segment, position, next + 1, incarnation],
        ),
        (
            "an offset short",
            [segment, position, next - 1, incarnation],
        ),
        (
            "another incarnation",
            [segment, position, next, incarnation ^ 1],
        ),
        ("past the file", [segment, 1 << 40, next, incarnation]),
        (
            "a batch earlier",
            [segment, position - 20_000, next - 1, incarnation],
        ),
    ];
    let path = keel_engine::segment::path::partition_dir(std::path::Path::new("/sim/data"), &p)
        .join(keel_engine::segment::path::RECOVERY_POINT_FILE);
    let index = path.with_file_name(format!("{segment:020}.index"));
    // The index entry the scan would resume at: the last before the point.
    let entry = crashed
        .with_file(&index, |d| {
            d.chunks_exact(8)
                .rposition(|e| (u32::from_be_bytes(e[4..8].try_into().unwrap()) as u64) < position)
        })
        .unwrap()
        .unwrap();
    let stale_index = [
        ("an index entry one offset off", 3),
        ("an index entry one byte off", 7),
    ];
    let cases = lies
        .iter()
        .map(|&(what, lie)| (what, Some(lie), None))
        .chain(
            stale_index
                .iter()
                .map(|&(what, byte)| (what, None, Some(byte))),
        );
    for (what, lie, index_byte) in cases {
        let image = copy(&crashed);
        if let Some(lie) = lie {
            let text = format!("{} {} {} {}\n", lie[0], lie[1], lie[2], lie[3]);
            image.with_file(&path, |d| *d = text.into_bytes()).unwrap();
        }
        if let Some(byte) = index_byte {
            image
                .with_file(&index, |d| {
                    d[entry * 8 + byte] = d[entry * 8 + byte].wrapping_add(1)
                })
                .unwrap();
        }
        let engine = open(&image, RecoveryMode::Strict).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (tags, error) = read_all(&engine, &p);
        assert!(error.is_none(), "{what}: {error:?}");
        assert_eq!(tags, (0..BATCHES).collect::<Vec<_>>(), "{what}");
        let (scanned, segment_bytes) = (
            engine.metrics().recovery_scanned_bytes,
            bytes_from(&engine, &p, segment),
        );
        // These two are always tried and refused by the pass-through check; the others may be
        // refused before it (another incarnation, past the file, or the index entry before the
        // point not before its offset), depending on where the point lies.
        let mismatched = engine.metrics().recovery_points_mismatched;
        let always_tried = matches!(what, "one byte short" | "an offset too far");
        assert!(
            mismatched == 1 || (!always_tried && mismatched == 0),
            "{what}: {mismatched} points refused"
        );
        assert!(
            scanned >= segment_bytes,
            "{what}: the whole segment is scanned ({scanned} of {segment_bytes} bytes)"
        );
        assert_time_lookups(&engine, &p, what);
    }
}

/// Truncate `p` to `to` on another thread; return once the truncation's cut waits at its sync
/// (held until `fs.hold(Hold::FileSyncs, false)`).
fn truncate_to_the_cuts_sync(
    fs: &SimFs,
    engine: &Engine,
    p: &PartitionId,
    to: u64,
) -> std::thread::JoinHandle<keel_engine::Result<()>> {
    fs.hold_next(Hold::FileSyncs, 1);
    let truncation = std::thread::spawn({
        let (engine, p) = (engine.clone(), p.clone());
        move || block_on(engine.truncate_to(&p, to))
    });
    wait_until("the cut's sync is held", || {
        fs.waiting(Hold::FileSyncs) == 1
    });
    truncation
}

#[test]
fn a_truncation_moves_the_recovery_point_back_before_it_cuts() {
    let (fs, engine, p) = log_with_points();
    let point = recovery_point(&fs, &p);
    let to = point[2] - 10;
    // Stop the cut at its sync: the file is being changed below the point by then.
    let truncation = truncate_to_the_cuts_sync(&fs, &engine, &p, to);
    assert_eq!(
        recovery_point(&fs, &p),
        vec![point[0], 0, point[0]],
        "the point is back at the segment's start before the cut"
    );
    fs.hold(Hold::FileSyncs, false);
    truncation.join().unwrap().unwrap();
    let after = recovery_point(&fs, &p);
    assert!(after[2] <= to, "{after:?} after a truncation to {to}");
    let image = copy(&fs);
    let reopened = open(&image, RecoveryMode::Strict).unwrap();
    let (tags, error) = read_all(&reopened, &p);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(tags, (0..to).collect::<Vec<_>>());
    drop(reopened);
    // New batches where the truncated ones were, and a point among them.
    append_tags(&engine, &p, 1000..1000 + 60);
    settle_point(&fs, &engine, &p);
    let image = copy(&fs);
    let reopened = open(&image, RecoveryMode::Strict).unwrap();
    let expected: Vec<u64> = (0..to).chain(1000..1060).collect();
    let (tags, error) = read_all(&reopened, &p);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(tags, expected);
}

/// A truncation that reaches back into an earlier segment removes the later segments and moves
/// the recovery point to that segment's start before the cut changes it (decision 41). A point
/// still naming a later segment would have a restart trust the cut segment whole, unscanned,
/// while the cut is half done: the zeros past its new end inside a trusted segment.
#[test]
fn a_truncation_into_an_earlier_segment_moves_the_point_back_before_it_cuts() {
    let fs = SimFs::default();
    let p = PartitionId::new("back-a-segment", 0);
    let engine = Engine::open(no_journal(sim_config(&fs, 1))).unwrap();
    block_on(engine.create_partition(&p, config())).unwrap();
    append_tags(&engine, &p, 0..BATCHES);
    let segments = || segment_bases(&fs);
    let before = segments();
    assert!(before.len() >= 3, "{before:?}");
    assert_eq!(recovery_point(&fs, &p)[..2], [*before.last().unwrap(), 0]);
    let to = 5;
    // Stop the cut at its sync: the first segment is being changed by then.
    let truncation = truncate_to_the_cuts_sync(&fs, &engine, &p, to);
    assert_eq!(segments(), vec![0], "the later segments go first");
    assert_eq!(
        recovery_point(&fs, &p)[..2],
        [0, 0],
        "the point is back at the first segment's start before the cut"
    );
    let image = copy(&fs);
    fs.hold(Hold::FileSyncs, false);
    truncation.join().unwrap().unwrap();
    let reopened = open(&image, RecoveryMode::Strict).unwrap();
    let (tags, error) = read_all(&reopened, &p);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(tags, (0..to).collect::<Vec<_>>());
}
