//! `keel-bench engine`: a closed-loop load on the embedded engine. `concurrency` appends are kept
//! in flight, spread round-robin over `partitions`; each completion is timed and replaced.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use keel_engine::batch::BatchBuilder;
use keel_engine::metrics::MetricsSnapshot;
use keel_engine::{block_on, Engine, EngineConfig, FlushPolicy, PartitionConfig, PartitionId};

use crate::cpu::{self, CpuUse};
use crate::report::{histogram, mb_per_s, percentile_curve, Percentiles, Progress, Timeline};

#[derive(Clone, Debug)]
pub struct EngineLoadConfig {
    pub dir: PathBuf,
    pub partitions: u32,
    pub batch_bytes: usize,
    pub records_per_batch: i32,
    pub flush: FlushPolicy,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub shards: usize,
    pub journal_bytes: u64,
    pub segment_bytes: u64,
    pub shard_cache_bytes: usize,
    /// `EngineConfig::recovery_point_bytes`.
    pub recovery_point_bytes: u64,
}

#[derive(Clone, Debug, Default)]
pub struct EngineLoadResult {
    pub bytes: u64,
    pub batches: u64,
    pub seconds: f64,
    pub throughput_mb_s: f64,
    pub batches_per_s: f64,
    pub latency: Percentiles,
    /// Per-second throughput and latency (JSON, see `Timeline::to_json`).
    pub timeline: serde_json::Value,
    /// The latency distribution as `[[percentile, µs], ...]`.
    pub curve: serde_json::Value,
    /// The engine's counters over the measured window (from the end of the warm-up to the last
    /// completion: not the partitions' creation, nor the shutdown's flush).
    pub metrics: MetricsSnapshot,
    /// How long the engine's clean shutdown took (making every partition durable in its
    /// segments, then writing each one's metadata files and clean-shutdown marker).
    pub shutdown_s: f64,
    /// CPU spent from the end of the warm-up to the end of the run.
    pub cpu: CpuUse,
}

/// A producer batch of about `batch_bytes` (header included) holding `records` records.
pub fn batch_template(batch_bytes: usize, records: i32) -> Vec<u8> {
    let payload: Vec<u8> = (0..batch_bytes.saturating_sub(61))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    BatchBuilder {
        records_count: records,
        timestamp_ms: 1,
        ..Default::default()
    }
    .build(&payload)
}

pub fn run(config: &EngineLoadConfig) -> keel_engine::Result<EngineLoadResult> {
    let data = config.dir.join("engine-data");
    let _ = std::fs::remove_dir_all(&data);
    let mut engine_config = EngineConfig::new(&data);
    engine_config.shards = config.shards;
    engine_config.journal_bytes = config.journal_bytes;
    engine_config.shard_cache_bytes = config.shard_cache_bytes;
    engine_config.recovery_point_bytes = config.recovery_point_bytes;
    let engine = Engine::open(engine_config)?;
    let ids: Vec<PartitionId> = (0..config.partitions)
        .map(|i| PartitionId::new("bench", i))
        .collect();
    let partition_config = PartitionConfig {
        flush: config.flush,
        segment_bytes: config.segment_bytes,
        max_message_bytes: config.batch_bytes.max(1 << 20),
        ..Default::default()
    };
    let template = batch_template(config.batch_bytes, config.records_per_batch);

    let result = block_on(async {
        // All at once, as a topic's creation does: each shard opens several at a time.
        let creating = Instant::now();
        let created = futures::future::join_all(
            ids.iter()
                .map(|id| engine.create_partition(id, partition_config.clone())),
        )
        .await;
        created.into_iter().collect::<Result<(), _>>()?;
        if ids.len() > 1 {
            eprintln!(
                "engine: created {} partitions in {} ms",
                ids.len(),
                creating.elapsed().as_millis()
            );
        }
        let mut h = histogram();
        let mut timeline = None;
        let progress = Progress::start("engine", config.warmup + config.duration);
        let done_bytes = progress.counter();
        let mut inflight = FuturesUnordered::new();
        let mut next_partition = 0usize;
        let start = Instant::now();
        let measure_from = start + config.warmup;
        let end = measure_from + config.duration;
        let (mut bytes, mut batches) = (0u64, 0u64);
        let mut first_in_window: Option<Instant> = None;
        let mut last_completion = start;
        // Each completion is replaced at once: the replacement is queued at its shard before the
        // next completion is looked at, so `concurrency` appends stay in flight at the engine
        // (a generator that first collected every completion of a group commit, then sent the
        // replacements, left the engine idle while it did).
        let mut to_issue = config.concurrency;
        let (mut cpu_from, mut metrics_from) = (None, None);
        loop {
            if cpu_from.is_none() && Instant::now() >= measure_from {
                cpu_from = Some(cpu::sample());
                metrics_from = Some(engine.metrics());
            }
            while to_issue > 0 && Instant::now() < end {
                to_issue -= 1;
                let id = &ids[next_partition % ids.len()];
                next_partition += 1;
                // A fresh buffer per append, as a socket read would hand the engine.
                let batch = Bytes::from(template.clone());
                let issued = Instant::now();
                let pending = engine.append_enqueued(id, batch, 0, None).await?;
                inflight.push(async move { (pending.await, issued) });
            }
            let Some((result, issued)) = inflight.next().await else {
                break;
            };
            result?;
            to_issue += 1;
            done_bytes.fetch_add(template.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let now = Instant::now();
            last_completion = now;
            if issued >= measure_from {
                first_in_window.get_or_insert(issued);
                let us = now.duration_since(issued).as_micros().max(1) as u64;
                h.record(us).ok();
                timeline
                    .get_or_insert_with(|| Timeline::new(measure_from, Duration::from_secs(1)))
                    .record(now, template.len() as u64, us);
                bytes += template.len() as u64;
                batches += 1;
            }
        }
        let cpu = cpu_from.map_or_else(CpuUse::default, |from| {
            CpuUse::between(&from, &cpu::sample())
        });
        // The engine's counters over the measured window: not the creation, the warm-up, nor
        // the shutdown's flush (up to one write per partition).
        let metrics = engine.metrics().since(&metrics_from.unwrap_or_default());
        progress.finish();
        let seconds =
            first_in_window.map_or(0.0, |f| last_completion.duration_since(f).as_secs_f64());
        let shutdown_from = Instant::now();
        engine.shutdown().await?;
        let shutdown_s = shutdown_from.elapsed().as_secs_f64();
        Ok::<_, keel_engine::Error>(EngineLoadResult {
            bytes,
            batches,
            seconds,
            throughput_mb_s: mb_per_s(bytes, seconds),
            batches_per_s: if seconds > 0.0 {
                batches as f64 / seconds
            } else {
                0.0
            },
            latency: Percentiles::of(&h),
            timeline: timeline.map_or(serde_json::Value::Array(Vec::new()), |t| t.to_json()),
            curve: percentile_curve(&h),
            metrics,
            shutdown_s,
            cpu,
        })
    });
    drop(engine);
    let _ = std::fs::remove_dir_all(&data);
    result
}
