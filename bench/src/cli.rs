//! Command line: `keel-bench raw` and `keel-bench engine`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::engine_load::{self, EngineLoadConfig};
use crate::raw::{self, RawConfig, RawResult};
use crate::report::{parse_bytes, parse_duration, ratio, Percentiles};

#[derive(Parser, Debug)]
#[command(
    name = "keel-bench",
    about = "Keel next to the raw device: same file system, same run"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// The physical baseline alone.
    Raw(RawArgs),
    /// The embedded engine under a closed-loop append load, next to the baseline.
    Engine(EngineArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Directory on the file system to measure (created; benchmark files are removed after).
    #[arg(long, default_value = "keel-bench-data")]
    dir: PathBuf,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the raw-device baseline (no ratios).
    #[arg(long)]
    no_baseline: bool,
    /// Bytes the baseline's bandwidth test writes at most.
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    baseline_bytes: u64,
    /// Time the baseline's bandwidth test runs at most.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    baseline_duration: Duration,
    /// Time the baseline's write+fdatasync latency test runs.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    latency_duration: Duration,
}

#[derive(Args, Debug)]
struct RawArgs {
    #[command(flatten)]
    common: Common,
    /// Write size of the bandwidth test.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    block_bytes: u64,
    #[arg(long, default_value_t = 4)]
    queue_depth: usize,
    /// fdatasync every this many bytes in the bandwidth test (0: once at the end).
    #[arg(long, default_value = "0", value_parser = parse_bytes)]
    sync_every_bytes: u64,
    /// Write size of the latency test.
    #[arg(long, default_value = "4KiB", value_parser = parse_bytes)]
    latency_block_bytes: u64,
    /// Lay the bandwidth file out before the timed writes (shows what extent allocation costs).
    #[arg(long)]
    prewrite: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    EveryBatch,
    Interval,
}

#[derive(Args, Debug)]
struct EngineArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Size of each appended batch, header included.
    #[arg(long, default_value = "64KiB", value_parser = parse_bytes)]
    batch_bytes: u64,
    #[arg(long, default_value_t = 1)]
    records_per_batch: i32,
    #[arg(long, value_enum, default_value = "every-batch")]
    policy: Policy,
    /// With `--policy interval`: fdatasync every this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    flush_ms: u64,
    /// Appends in flight (closed loop). Group commit needs a deep pipeline: throughput is at most
    /// concurrency × batch size ÷ (write + fdatasync latency).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Engine shards (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    segment_bytes: u64,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keel-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.mode {
        Mode::Raw(args) => {
            let base = baseline(
                &args.common,
                args.block_bytes as usize,
                args.queue_depth,
                args.sync_every_bytes,
                args.latency_block_bytes as usize,
                args.prewrite,
            )?;
            let result = json!({
                "mode": "raw",
                "config": {
                    "dir": args.common.dir, "block_bytes": args.block_bytes, "queue_depth": args.queue_depth,
                    "sync_every_bytes": args.sync_every_bytes, "latency_block_bytes": args.latency_block_bytes,
                    "prewrite": args.prewrite,
                    "bytes": args.common.baseline_bytes, "duration_s": args.common.baseline_duration.as_secs_f64(),
                },
                "throughput_mb_s": base.bandwidth_mb_s,
                "baseline_mb_s": base.bandwidth_mb_s,
                "ratio": 1.0,
                "latency_us": base.sync_latency.to_json(),
                "baseline_latency_us": base.sync_latency.to_json(),
            });
            println!(
                "raw: sequential O_DIRECT {} MiB writes, QD {}: {:.0} MB/s ({} bytes in {:.2} s)",
                args.block_bytes >> 20,
                args.queue_depth,
                base.bandwidth_mb_s,
                base.bandwidth_bytes,
                base.bandwidth_seconds
            );
            print_latency("raw: 4 KiB write + fdatasync", &base.sync_latency);
            write_json(&args.common, &result)
        }
        Mode::Engine(args) => engine(args),
    }
}

fn baseline(
    common: &Common,
    block: usize,
    qd: usize,
    sync_every: u64,
    latency_block: usize,
    prewrite: bool,
) -> Result<RawResult, String> {
    std::fs::create_dir_all(&common.dir)
        .map_err(|e| format!("create {}: {e}", common.dir.display()))?;
    raw::measure(&RawConfig {
        dir: common.dir.clone(),
        block_bytes: block,
        queue_depth: qd,
        bytes: common.baseline_bytes,
        duration: common.baseline_duration,
        sync_every_bytes: sync_every,
        latency_block_bytes: latency_block,
        latency_duration: common.latency_duration,
        prewrite,
    })
    .map_err(|e| format!("raw baseline in {}: {e}", common.dir.display()))
}

fn engine(args: EngineArgs) -> Result<(), String> {
    let common = &args.common;
    let base = if common.no_baseline {
        None
    } else {
        Some(baseline(common, 1 << 20, 4, 0, 4096, false)?)
    };
    let flush = match args.policy {
        Policy::EveryBatch => keel_engine::FlushPolicy::EveryBatch,
        Policy::Interval => keel_engine::FlushPolicy::Interval {
            ms: args.flush_ms,
            bytes: 0,
        },
    };
    std::fs::create_dir_all(&common.dir)
        .map_err(|e| format!("create {}: {e}", common.dir.display()))?;
    let config = EngineLoadConfig {
        dir: common.dir.clone(),
        partitions: args.partitions,
        batch_bytes: args.batch_bytes as usize,
        records_per_batch: args.records_per_batch,
        flush,
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: args.warmup,
        shards: args.shards,
        segment_bytes: args.segment_bytes,
    };
    let r = engine_load::run(&config).map_err(|e| format!("engine run: {e}"))?;
    let baseline_mb_s = base.map_or(0.0, |b| b.bandwidth_mb_s);
    let baseline_latency = base.map(|b| b.sync_latency).unwrap_or_default();
    let throughput_ratio = ratio(r.throughput_mb_s, baseline_mb_s);
    let latency_ratio = ratio(r.latency.p99, baseline_latency.p99);
    let policy = match flush {
        keel_engine::FlushPolicy::EveryBatch => "every-batch".to_string(),
        keel_engine::FlushPolicy::Interval { ms, .. } => format!("interval ({ms} ms)"),
    };
    println!(
        "engine: {} partition(s), {} B batches, {policy}, {} in flight, {} shard(s)",
        args.partitions,
        args.batch_bytes,
        args.concurrency,
        if args.shards == 0 {
            "auto".to_string()
        } else {
            args.shards.to_string()
        }
    );
    println!(
        "engine: {:.0} MB/s, {:.0} batches/s over {:.2} s; {} writes, {} fdatasyncs ({:.1} appends per fdatasync)",
        r.throughput_mb_s, r.batches_per_s, r.seconds, r.metrics.writes, r.metrics.fsyncs,
        r.metrics.appends as f64 / r.metrics.fsyncs.max(1) as f64
    );
    print_latency("engine: append latency", &r.latency);
    if let Some(b) = base {
        println!(
            "baseline: sequential {:.0} MB/s; 4 KiB write+fdatasync p50 {:.0} µs p99 {:.0} µs",
            b.bandwidth_mb_s, b.sync_latency.p50, b.sync_latency.p99
        );
        println!(
            "ratio: throughput {:.3} of baseline; p99 latency {:.2} x baseline",
            throughput_ratio.unwrap_or(f64::NAN),
            latency_ratio.unwrap_or(f64::NAN)
        );
    }
    let result = json!({
        "mode": "engine",
        "config": {
            "dir": common.dir, "partitions": args.partitions, "batch_bytes": args.batch_bytes,
            "records_per_batch": args.records_per_batch, "flush_policy": policy, "concurrency": args.concurrency,
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(),
            "shards": args.shards, "segment_bytes": args.segment_bytes, "baseline": !common.no_baseline,
            "baseline_bytes": common.baseline_bytes, "baseline_duration_s": common.baseline_duration.as_secs_f64(),
        },
        "throughput_mb_s": r.throughput_mb_s,
        "batches_per_s": r.batches_per_s,
        "baseline_mb_s": baseline_mb_s,
        "ratio": throughput_ratio,
        "latency_ratio": latency_ratio,
        "latency_us": r.latency.to_json(),
        "baseline_latency_us": baseline_latency.to_json(),
        "engine": { "writes": r.metrics.writes, "write_bytes": r.metrics.write_bytes, "fsyncs": r.metrics.fsyncs, "appends": r.metrics.appends },
    });
    write_json(common, &result)
}

fn print_latency(what: &str, p: &Percentiles) {
    println!(
        "{what}: p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs ({} samples)",
        p.p50, p.p90, p.p99, p.p999, p.max, p.count
    );
}

fn write_json(common: &Common, value: &Value) -> Result<(), String> {
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}
