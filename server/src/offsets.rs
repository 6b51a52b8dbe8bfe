//! Committed consumer offsets, stored durably in an internal partitioned log of the engine
//! (`__consumer_offsets-<n>`, Kafka's name; not listed in Metadata), as RecordBatch v2 records
//! whose key is (group, topic, partition) and whose value is the commit (a null value deletes).
//!
//! A group maps to one of the partitions by a stable hash of its id; commits to one partition are
//! serialised (an async lock held across the append), appended with the `every-batch` policy and
//! applied to the in-memory table only once durable, so a commit is acknowledged only when it
//! survives a power cut. Each partition writes a snapshot of its table every
//! `snapshot_every_commits` commits and at shutdown; a start loads the snapshot and replays only
//! the log after it, so restart time does not grow with history. The snapshot before the latest
//! is kept too (`.previous-snapshot`), and once a new one is durable the log's segments below the
//! previous one's end are deleted: the log stays a few segments long whatever the history, and
//! either snapshot can restore the table if the other is unreadable.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::records::{
    Compression as Codec, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType,
};
use keel_engine::{Engine, FlushPolicy, PartitionConfig, PartitionId, ReadOptions, ReadUpper};

use crate::error::Error;
use crate::metadata::{blocking, write_durably};

/// Kafka's name for the internal topic.
pub const offsets_topic: &str = "__consumer_offsets";
/// Write a snapshot after this many commits to a partition (and at shutdown).
const snapshot_every_commits: u64 = 1000;
const record_format: u8 = 1;
const replay_read_bytes: usize = 4 * 1024 * 1024;

/// One committed offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The next offset the group will read.
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_ms: i64,
}

/// (topic, partition) → commit, for one group.
pub type GroupOffsets = BTreeMap<(String, i32), Committed>;

#[derive(Debug, Default)]
struct Table {
    groups: HashMap<String, GroupOffsets>,
    commits_since_snapshot: u64,
    /// The log offset the latest snapshot file covers up to (none yet).
    snapshot_end: Option<u64>,
}

#[derive(Debug)]
struct Shard {
    id: PartitionId,
    table: futures::lock::Mutex<Table>,
}

#[derive(Debug)]
pub struct OffsetStore {
    engine: Engine,
    partitions: Vec<Shard>,
    snapshot_dir: PathBuf,
}

/// FNV-1a: stable across versions and platforms (the mapping is persistent).
fn group_hash(group: &str) -> u64 {
    group.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `offsets.topic.segment.bytes` unless set.
pub const offsets_segment_bytes_default: u64 = 16 * 1024 * 1024;

fn internal_config(segment_bytes: u64) -> PartitionConfig {
    PartitionConfig {
        segment_bytes,
        max_message_bytes: PartitionConfig::default()
            .max_message_bytes
            .min(segment_bytes as usize),
        preallocate_bytes: 1024 * 1024,
        cache_bytes: 1024 * 1024,
        flush: FlushPolicy::EveryBatch,
        ..PartitionConfig::default()
    }
}

impl OffsetStore {
    /// Open (creating if needed) the internal partitions and load every committed offset. The
    /// partition count is fixed by the first start: later `wanted` values are ignored.
    pub async fn open(
        engine: Engine,
        data_dir: &std::path::Path,
        wanted: u32,
        segment_bytes: u64,
    ) -> Result<OffsetStore, Error> {
        let existing = engine
            .partitions()
            .await?
            .into_iter()
            .filter(|p| &*p.topic == offsets_topic)
            .count() as u32;
        let count = if existing > 0 {
            existing
        } else {
            wanted.max(1)
        };
        let snapshot_dir = data_dir.join(".keel").join("offsets");
        let mut partitions = Vec::new();
        for i in 0..count {
            let id = PartitionId::new(offsets_topic, i);
            if existing == 0 {
                engine
                    .create_partition(&id, internal_config(segment_bytes))
                    .await?;
            }
            partitions.push(Shard {
                id,
                table: futures::lock::Mutex::new(Table::default()),
            });
        }
        let store = OffsetStore {
            engine,
            partitions,
            snapshot_dir,
        };
        for shard in &store.partitions {
            store.load(shard).await?;
        }
        Ok(store)
    }

    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    pub fn is_internal(id: &PartitionId) -> bool {
        &*id.topic == offsets_topic
    }

    fn shard(&self, group: &str) -> &Shard {
        &self.partitions[(group_hash(group) % self.partitions.len() as u64) as usize]
    }

    fn snapshot_path(&self, id: &PartitionId) -> PathBuf {
        self.snapshot_dir.join(format!("{id}.snapshot"))
    }

    fn previous_snapshot_path(&self, id: &PartitionId) -> PathBuf {
        self.snapshot_dir.join(format!("{id}.previous-snapshot"))
    }

    async fn load(&self, shard: &Shard) -> Result<(), Error> {
        let state = self.engine.partition_state(&shard.id).await?;
        let mut table = Table::default();
        let mut from = state.log_start_offset;
        let latest = self.snapshot_path(&shard.id);
        let previous = self.previous_snapshot_path(&shard.id);
        for path in [&latest, &previous] {
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            match parse_snapshot(&text) {
                Some((groups, end)) if end >= state.log_start_offset && end <= state.durable.0 => {
                    table.groups = groups;
                    table.snapshot_end = Some(end);
                    from = end;
                    if path == &previous {
                        // The latest is unusable: the previous one takes its place, so the next
                        // snapshot keeps it as the previous and deletes nothing it still needs.
                        let (previous, latest) = (previous.clone(), latest.clone());
                        blocking(move || {
                            std::fs::rename(&previous, &latest)
                                .map_err(|e| Error::io("rename", previous.display(), e))
                        })
                        .await?;
                    }
                    break;
                }
                _ => {
                    tracing::warn!(path = %path.display(), "ignoring an offsets snapshot that does not fit the log")
                }
            }
        }
        if table.snapshot_end.is_none() && state.log_start_offset > 0 {
            tracing::error!(
                partition = %shard.id,
                log_start = state.log_start_offset,
                "no usable offsets snapshot and the log's older segments are deleted: commits older than what the log still holds are lost"
            );
        }
        let end = state.durable.0;
        while from < end {
            let read = self
                .engine
                .read(
                    &shard.id,
                    from,
                    ReadOptions {
                        max_bytes: replay_read_bytes,
                        upper: ReadUpper::Durable,
                    },
                )
                .await?;
            if read.is_empty() {
                break;
            }
            for chunk in &read.chunks {
                let mut buf = chunk.clone();
                while buf.has_remaining() {
                    let set =
                        RecordBatchDecoder::decode(&mut buf).map_err(|e| Error::Metadata {
                            path: PathBuf::from(shard.id.to_string()),
                            why: format!("undecodable offsets batch: {e:#}"),
                        })?;
                    for r in set.records {
                        apply_record(&mut table.groups, &r);
                    }
                }
            }
            from = read.next_offset;
        }
        *shard.table.lock().await = table;
        Ok(())
    }

    /// Commit offsets for `group`: returns once durable (and then visible to `fetch`).
    pub async fn commit(
        &self,
        group: &str,
        entries: Vec<((String, i32), Committed)>,
    ) -> Result<(), keel_engine::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let shard = self.shard(group);
        let mut table = shard.table.lock().await;
        let records: Vec<Record> = entries
            .iter()
            .enumerate()
            .map(|(i, ((topic, partition), c))| {
                record(i, key(group, topic, *partition), Some(value(c)))
            })
            .collect();
        self.engine.append(&shard.id, encode(&records), 0).await?;
        let offsets = table.groups.entry(group.to_string()).or_default();
        for (k, c) in entries {
            offsets.insert(k, c);
        }
        table.commits_since_snapshot += 1;
        if table.commits_since_snapshot >= snapshot_every_commits {
            self.snapshot(shard, &mut table).await;
        }
        Ok(())
    }

    /// Every committed offset of `group`.
    pub async fn fetch(&self, group: &str) -> GroupOffsets {
        self.shard(group)
            .table
            .lock()
            .await
            .groups
            .get(group)
            .cloned()
            .unwrap_or_default()
    }

    /// Every group with committed offsets, and its offsets.
    pub async fn all(&self) -> Vec<(String, GroupOffsets)> {
        let mut out = Vec::new();
        for shard in &self.partitions {
            let table = shard.table.lock().await;
            out.extend(table.groups.iter().map(|(g, o)| (g.clone(), o.clone())));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Delete every committed offset of `group` (tombstones, durable before returning).
    pub async fn delete_group(&self, group: &str) -> Result<bool, keel_engine::Error> {
        let shard = self.shard(group);
        let mut table = shard.table.lock().await;
        let Some(offsets) = table.groups.get(group) else {
            return Ok(false);
        };
        let records: Vec<Record> = offsets
            .keys()
            .enumerate()
            .map(|(i, (topic, partition))| record(i, key(group, topic, *partition), None))
            .collect();
        if !records.is_empty() {
            self.engine.append(&shard.id, encode(&records), 0).await?;
        }
        table.groups.remove(group);
        Ok(true)
    }

    /// Write every partition's snapshot (at shutdown).
    pub async fn snapshot_all(&self) {
        for shard in &self.partitions {
            let mut table = shard.table.lock().await;
            self.snapshot(shard, &mut table).await;
        }
    }

    async fn snapshot(&self, shard: &Shard, table: &mut Table) {
        let Ok(state) = self.engine.partition_state(&shard.id).await else {
            return;
        };
        // Commits are applied only once durable and serialised by the table lock: the table is
        // exactly the log up to its durable end.
        let end = state.durable.0;
        if table.snapshot_end == Some(end) {
            table.commits_since_snapshot = 0;
            return; // nothing committed since the latest snapshot
        }
        let text = render_snapshot(&table.groups, end);
        let latest = self.snapshot_path(&shard.id);
        let previous = self.previous_snapshot_path(&shard.id);
        let keep_from = table.snapshot_end;
        let written = blocking(move || {
            // The latest becomes the previous (a crash in between leaves one of them in place;
            // `write_durably` syncs the directory, so both renames are durable after it).
            if keep_from.is_some() {
                match std::fs::rename(&latest, &previous) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("rename", latest.display(), e));
                    }
                    _ => {}
                }
            }
            write_durably(&latest, text.as_bytes())
        })
        .await;
        match written {
            Ok(()) => {
                table.commits_since_snapshot = 0;
                table.snapshot_end = Some(end);
                // Both snapshots now cover the log from the previous one's end: the segments
                // below it are not needed any more.
                if let Some(below) = keep_from {
                    if let Err(e) = self.engine.delete_segments_below(&shard.id, below).await {
                        tracing::warn!(partition = %shard.id, error = %e, "cannot delete old offsets segments");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write an offsets snapshot (the log is replayed instead)")
            }
        }
    }
}

fn record(i: usize, key: Bytes, value: Option<Bytes>) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: i as i64,
        sequence: -1,
        timestamp: crate::now_ms(),
        key: Some(key),
        value,
        headers: Default::default(),
    }
}

fn encode(records: &[Record]) -> Bytes {
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        records,
        &RecordEncodeOptions {
            version: 2,
            compression: Codec::None,
        },
    )
    .expect("encoding uncompressed records into memory cannot fail");
    out.freeze()
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len().min(u16::MAX as usize) as u16);
    out.put_slice(&s.as_bytes()[..s.len().min(u16::MAX as usize)]);
}

fn get_str(buf: &mut Bytes) -> Option<String> {
    if buf.remaining() < 2 {
        return None;
    }
    let n = buf.get_u16() as usize;
    if buf.remaining() < n {
        return None;
    }
    String::from_utf8(buf.split_to(n).to_vec()).ok()
}

fn key(group: &str, topic: &str, partition: i32) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(record_format);
    put_str(&mut out, group);
    put_str(&mut out, topic);
    out.put_i32(partition);
    out.freeze()
}

fn value(c: &Committed) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(record_format);
    out.put_i64(c.offset);
    out.put_i32(c.leader_epoch);
    out.put_i64(c.commit_ms);
    put_str(&mut out, &c.metadata);
    out.freeze()
}

fn apply_record(groups: &mut HashMap<String, GroupOffsets>, r: &Record) {
    let Some(mut k) = r.key.clone() else { return };
    if k.remaining() < 1 || k.get_u8() != record_format {
        return;
    }
    let (Some(group), Some(topic)) = (get_str(&mut k), get_str(&mut k)) else {
        return;
    };
    if k.remaining() < 4 {
        return;
    }
    let partition = k.get_i32();
    match &r.value {
        None => {
            if let Some(g) = groups.get_mut(&group) {
                g.remove(&(topic, partition));
                if g.is_empty() {
                    groups.remove(&group);
                }
            }
        }
        Some(v) => {
            let mut v = v.clone();
            if v.remaining() < 21 || v.get_u8() != record_format {
                return;
            }
            let (offset, leader_epoch, commit_ms) = (v.get_i64(), v.get_i32(), v.get_i64());
            let Some(metadata) = get_str(&mut v) else {
                return;
            };
            groups.entry(group).or_default().insert(
                (topic, partition),
                Committed {
                    offset,
                    leader_epoch,
                    metadata,
                    commit_ms,
                },
            );
        }
    }
}

/// `end <offset>` then one line per commit: group, topic, partition, offset, epoch, time, metadata
/// (the strings hex-encoded, so any byte is safe).
fn render_snapshot(groups: &HashMap<String, GroupOffsets>, end: u64) -> String {
    use std::fmt::Write as _;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut out = format!("end {end}\n");
    let mut names: Vec<_> = groups.keys().collect();
    names.sort();
    for g in names {
        for ((topic, partition), c) in &groups[g] {
            let _ = writeln!(
                out,
                "{} {} {partition} {} {} {} {}",
                hex(g),
                hex(topic),
                c.offset,
                c.leader_epoch,
                c.commit_ms,
                if c.metadata.is_empty() {
                    "-".to_string()
                } else {
                    hex(&c.metadata)
                }
            );
        }
    }
    out
}

fn parse_snapshot(text: &str) -> Option<(HashMap<String, GroupOffsets>, u64)> {
    let unhex = |s: &str| -> Option<String> {
        if s == "-" {
            return Some(String::new());
        }
        let bytes: Option<Vec<u8>> = (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect();
        String::from_utf8(bytes?).ok()
    };
    let mut lines = text.lines();
    let end = lines.next()?.strip_prefix("end ")?.parse().ok()?;
    let mut groups: HashMap<String, GroupOffsets> = HashMap::new();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        let [g, t, p, o, e, ms, m] = f.as_slice() else {
            return None;
        };
        groups.entry(unhex(g)?).or_default().insert(
            (unhex(t)?, p.parse().ok()?),
            Committed {
                offset: o.parse().ok()?,
                leader_epoch: e.parse().ok()?,
                commit_ms: ms.parse().ok()?,
                metadata: unhex(m)?,
            },
        );
    }
    Some((groups, end))
}

/// The store as the broker holds it.
pub type Offsets = Arc<OffsetStore>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_snapshots_round_trip() {
        let c = Committed {
            offset: 42,
            leader_epoch: 3,
            metadata: "héllo world".into(),
            commit_ms: 1_700_000_000_000,
        };
        let mut groups = HashMap::new();
        let r = record(0, key("g 1", "orders", 7), Some(value(&c)));
        apply_record(&mut groups, &r);
        assert_eq!(groups["g 1"][&("orders".to_string(), 7)], c);
        let text = render_snapshot(&groups, 99);
        let (again, end) = parse_snapshot(&text).unwrap();
        assert_eq!((again, end), (groups.clone(), 99));
        apply_record(&mut groups, &record(1, key("g 1", "orders", 7), None));
        assert!(groups.is_empty(), "a tombstone deletes");
        assert!(parse_snapshot("end 1\nzz").is_none());
    }
}

#[cfg(test)]
mod trim_tests {
    use super::*;
    use keel_engine::{block_on, EngineConfig};

    /// An engine on `dir` with 1 MiB segments for the offsets log, and its store.
    fn start(dir: &std::path::Path) -> (Engine, OffsetStore) {
        let mut c = EngineConfig::new(dir);
        c.shards = 1;
        c.pin_threads = false;
        let engine = Engine::open(c).unwrap();
        let store = block_on(OffsetStore::open(engine.clone(), dir, 1, 1024 * 1024)).unwrap();
        (engine, store)
    }

    /// Stop as a crash would leave the store (no final snapshot), the engine cleanly.
    fn stop((engine, store): (Engine, OffsetStore)) {
        drop(store);
        block_on(engine.shutdown()).unwrap();
    }

    fn commit_round(store: &OffsetStore, round: i64) {
        let entries = (0..100)
            .map(|p| {
                (
                    ("orders".to_string(), p),
                    Committed {
                        offset: round,
                        leader_epoch: 0,
                        metadata: String::new(),
                        commit_ms: round,
                    },
                )
            })
            .collect();
        block_on(store.commit("billing", entries)).unwrap();
    }

    fn assert_all_at(store: &OffsetStore, round: i64) {
        let offsets = block_on(store.fetch("billing"));
        assert_eq!(offsets.len(), 100);
        assert!(offsets.values().all(|c| c.offset == round), "{offsets:?}");
        // Committed once, before everything else: only the snapshots hold it once the oldest
        // segments are gone.
        let early = block_on(store.fetch("early"));
        assert_eq!(
            early.get(&("audit".to_string(), 7)).map(|c| c.offset),
            Some(12_345)
        );
    }

    /// The offsets log is trimmed behind its snapshots: after two snapshots the segments below
    /// the older one's end are gone, the table still has every commit after a restart, and when
    /// the latest snapshot is unreadable the previous one (with the log after it) restores it.
    #[test]
    fn old_segments_go_once_two_snapshots_cover_them_and_either_snapshot_restores_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let id = PartitionId::new(offsets_topic, 0);
        let (e, store) = start(dir.path());
        let early = Committed {
            offset: 12_345,
            leader_epoch: 0,
            metadata: "once".into(),
            commit_ms: 0,
        };
        block_on(store.commit("early", vec![(("audit".to_string(), 7), early)])).unwrap();
        // ~13 KB per commit: 2100 commits are ~27 MB of log in 1 MiB segments, and two
        // snapshots.
        for round in 0..2100 {
            commit_round(&store, round);
        }
        let state = block_on(e.partition_state(&id)).unwrap();
        assert!(state.log_start_offset > 0, "nothing was deleted: {state:?}");
        // What is left starts in the segment holding the first snapshot's end (1000 commits of
        // 100 records and the early one, ~130 B each: a 1 MiB segment holds ~8000).
        assert!(
            (90_000..=100_001).contains(&state.log_start_offset),
            "{state:?}"
        );
        assert_all_at(&store, 2099);
        stop((e, store));

        // Restart: the latest snapshot and the log after it.
        let node = start(dir.path());
        assert_all_at(&node.1, 2099);
        stop(node);

        // An unreadable latest snapshot: the previous one and the log after it.
        let latest = dir
            .path()
            .join(".keel/offsets")
            .join(format!("{id}.snapshot"));
        std::fs::write(&latest, b"not a snapshot").unwrap();
        let node = start(dir.path());
        assert_all_at(&node.1, 2099);
        // The previous snapshot took the latest's place, and snapshots carry on.
        assert!(parse_snapshot(&std::fs::read_to_string(&latest).unwrap()).is_some());
        for round in 2100..3100 {
            commit_round(&node.1, round);
        }
        assert_all_at(&node.1, 3099);
        stop(node);
        let node = start(dir.path());
        assert_all_at(&node.1, 3099);
    }
}
