#![allow(dead_code)]
//! Helpers shared by the engine's integration tests.

use std::collections::BTreeMap;

use bytes::Bytes;
use keel_engine::batch::BatchBuilder;
use keel_engine::io::sim::SimFs;
use keel_engine::io::Backend;
use keel_engine::{
    block_on, Engine, EngineConfig, PartitionConfig, PartitionId, ReadOptions, ReadUpper,
};

/// A producer batch of `records` records whose payload encodes `tag` (so reads can be checked).
pub fn batch(tag: u64, records: i32, payload_bytes: usize, timestamp_ms: i64) -> Bytes {
    let mut payload = tag.to_be_bytes().to_vec();
    payload.resize(payload_bytes.max(8), (tag % 251) as u8);
    BatchBuilder {
        records_count: records,
        timestamp_ms,
        ..Default::default()
    }
    .build(&payload)
    .into()
}

/// The tag a `batch()` carries.
pub fn tag_of(batch: &[u8]) -> u64 {
    u64::from_be_bytes(batch[61..69].try_into().unwrap())
}

/// With `KEEL_TRACE` set (an env-filter, e.g. `keel::sim=trace,keel::durability=trace`), the
/// engine's log of a test: every simulated write, sync and cut, every durable point, rollback and
/// acknowledgement, shown with the test's output when it fails.
pub fn trace_from_env() {
    if let Ok(filter) = std::env::var("KEEL_TRACE") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    }
}

pub fn sim_config(fs: &SimFs, shards: usize) -> EngineConfig {
    trace_from_env();
    let mut c = EngineConfig::new("/sim/data");
    c.backend = Backend::Sim(fs.clone());
    c.shards = shards;
    c.pin_threads = false;
    c.journal_bytes = keel_engine::constants::journal_bytes_min;
    c
}

/// The same engine with a recovery point every `bytes` of each active segment's durable growth
/// (ARCHITECTURE.md, decision 39): random fault tests use small ones, so their failures and
/// crashes also meet points being written and logs resumed at them.
pub fn recovery_points_every(mut c: EngineConfig, bytes: u64) -> EngineConfig {
    c.recovery_point_bytes = bytes;
    c
}

/// The same engine without the shard journal: every partition syncs its own segment.
pub fn without_journal(mut c: EngineConfig) -> EngineConfig {
    c.journal_bytes = 0;
    c
}

pub fn uring_config(dir: &std::path::Path, shards: usize) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.shards = shards;
    c.pin_threads = false;
    c
}

pub fn everything() -> ReadOptions {
    ReadOptions {
        max_bytes: usize::MAX,
        upper: ReadUpper::Appended,
    }
}

/// Split read chunks into individual batches.
pub fn batches_of(chunks: &[Bytes]) -> Vec<Bytes> {
    let mut out = Vec::new();
    for c in chunks {
        let mut at = 0;
        while at < c.len() {
            let h = keel_engine::batch::BatchHeader::parse(&c[at..]).unwrap();
            out.push(c.slice(at..at + h.size_bytes));
            at += h.size_bytes;
        }
    }
    out
}

/// (base offset, tag) of every batch from `from` to the log end, reading through the engine.
pub fn batches_from(engine: &Engine, p: &PartitionId, from: u64) -> Vec<(u64, u64)> {
    block_on(async {
        let mut out = Vec::new();
        let mut offset = from;
        loop {
            let read = engine.read(p, offset, everything()).await.unwrap();
            if read.is_empty() {
                return out;
            }
            for b in batches_of(&read.chunks) {
                let h = keel_engine::batch::BatchHeader::parse(&b).unwrap();
                out.push((h.base_offset, tag_of(&b)));
            }
            offset = read.next_offset;
        }
    })
}

/// Offset → tag of every batch in the log, from the log start.
pub fn log_contents(engine: &Engine, p: &PartitionId) -> BTreeMap<u64, u64> {
    let start = block_on(engine.partition_state(p))
        .unwrap()
        .log_start_offset;
    batches_from(engine, p, start).into_iter().collect()
}

/// Create every partition in `ids` with `config`.
pub async fn create_all(
    engine: &Engine,
    ids: &[PartitionId],
    config: &keel_engine::PartitionConfig,
) {
    for id in ids {
        engine.create_partition(id, config.clone()).await.unwrap();
    }
}

/// Create (or open) each of `ids` with `config`.
pub fn create_partitions(engine: &Engine, ids: &[PartitionId], config: &PartitionConfig) {
    block_on(async {
        for id in ids {
            engine.create_partition(id, config.clone()).await.unwrap();
        }
    });
}

/// Wait (30 s at most) until `ready`: something on a shard reached a point the test holds it
/// at, or did what it does by itself.
pub fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Wait until `p`'s leader-epoch checkpoint file is on `fs` (an engine from `sim_config`). A
/// partition's first append writes it beside the data path (ARCHITECTURE.md, decision 34): a
/// test that injects the next fault lets it land first, or the fault may hit it instead.
pub fn wait_for_epoch_file(fs: &SimFs, p: &PartitionId) {
    let path = epoch_file(p);
    wait_until("the leader-epoch checkpoint file is written", || {
        fs.files().contains(&path)
    });
}

/// Where `p`'s leader-epoch checkpoint file is, for an engine from `sim_config`.
pub fn epoch_file(p: &PartitionId) -> std::path::PathBuf {
    keel_engine::segment::path::partition_dir(std::path::Path::new("/sim/data"), p)
        .join(keel_engine::segment::path::LEADER_EPOCH_FILE)
}

/// Hold shard `shard` until the returned sender sends (or 30 s pass): commands queued meanwhile
/// are taken by the shard in one go, before it schedules any I/O for them.
pub async fn hold_shard(engine: &Engine, shard: usize) -> std::sync::mpsc::Sender<()> {
    let (release, held) = std::sync::mpsc::channel::<()>();
    engine
        .run_on_shard(shard, move || {
            let _ = held.recv_timeout(std::time::Duration::from_secs(30));
        })
        .await
        .unwrap();
    release
}
