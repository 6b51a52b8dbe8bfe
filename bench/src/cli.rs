//! Command line: `keel-bench raw`, `keel-bench engine` and `keel-bench broker`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::broker_load::{self, BrokerLoadConfig};
use crate::engine_load::{self, EngineLoadConfig};
use crate::raw::{self, RawConfig, RawResult};
use crate::recovery::{self, RecoveryConfig};
use crate::report::{
    histogram, mb_per_s, median, parse_batch_bytes, parse_block_bytes, parse_bytes, parse_count,
    parse_duration, parse_run_duration, ratio, summarize_rounds, Percentiles,
};

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
    /// Producers and consumers over the Kafka protocol against `keel serve`, next to the
    /// engine alone with the same settings and to the baseline.
    Broker(BrokerArgs),
    /// `broker` over a matrix (message size × partitions × acks), one baseline for all, one
    /// table out.
    Sweep(SweepArgs),
    /// The engine's restart after a crash: a child process fills partitions and is killed
    /// (SIGKILL); the time to open again, next to the device's read bandwidth over the same
    /// files.
    Recovery(RecoveryArgs),
    /// `recovery`'s child (internal).
    #[command(hide = true)]
    RecoveryChild(RecoveryShape),
    /// SVG charts (latency over time, throughput over time, latency by percentile) from the
    /// `--json` files of earlier runs.
    Plot {
        /// Result files (`broker`, `engine` or `sweep`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Where to write the charts.
        #[arg(long, default_value = "keel-bench-plots")]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// Every other setting, as for `broker` (its --message-bytes, --partitions, --acks are
    /// replaced by the lists below).
    #[command(flatten)]
    broker: BrokerArgs,
    /// Comma-separated message sizes.
    #[arg(long, default_value = "1KiB,16KiB", value_delimiter = ',', value_parser = parse_bytes)]
    sizes: Vec<u64>,
    /// Comma-separated partition counts.
    #[arg(long, default_value = "1,4", value_delimiter = ',', value_parser = parse_count::<u32>)]
    partition_counts: Vec<u32>,
    /// Comma-separated acks values (all, 1, 0).
    #[arg(long, default_value = "all,1", value_delimiter = ',', value_enum)]
    acks_list: Vec<Acks>,
}

#[derive(Args, Debug, Clone)]
struct RecoveryShape {
    /// Directory on the file system to measure (created; benchmark files are removed after).
    #[arg(long, default_value = "keel-bench-data")]
    dir: PathBuf,
    #[arg(long, default_value_t = 4, value_parser = parse_count::<u32>)]
    partitions: u32,
    /// Bytes appended to each partition before the kill.
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    bytes_per_partition: u64,
    #[arg(long, default_value = "64KiB", value_parser = parse_batch_bytes)]
    batch_bytes: u64,
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    segment_bytes: u64,
    /// A partition's recovery point moves into its active segment each time this much more of
    /// it is durable (`log.recovery.point.bytes`); 0: only at rolls, so a crash rescans whole
    /// active segments.
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    recovery_point_bytes: u64,
    /// Engine shards (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
}

impl RecoveryShape {
    fn config(&self, baseline: bool) -> RecoveryConfig {
        RecoveryConfig {
            dir: self.dir.clone(),
            partitions: self.partitions,
            bytes_per_partition: self.bytes_per_partition,
            batch_bytes: self.batch_bytes as usize,
            segment_bytes: self.segment_bytes,
            recovery_point_bytes: self.recovery_point_bytes,
            shards: self.shards,
            baseline,
        }
    }
}

#[derive(Args, Debug)]
struct RecoveryArgs {
    #[command(flatten)]
    shape: RecoveryShape,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a Markdown summary table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Skip reading the segment files for the device's read bandwidth (no ratios).
    #[arg(long)]
    no_baseline: bool,
    /// Repeat fill, kill and open this many times; report medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Directory on the file system to measure (created; benchmark files are removed after).
    #[arg(long, default_value = "keel-bench-data")]
    dir: PathBuf,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a Markdown summary table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
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
    /// Engine and broker modes: repeat the whole measurement (baseline, then the run) this many
    /// times and report medians; each ratio is the median of the per-round ratios. On a VM or a
    /// shared disk the device's speed drifts between runs, so a ratio is only as good as the
    /// nearness in time of its two measurements.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

#[derive(Args, Debug)]
struct RawArgs {
    #[command(flatten)]
    common: Common,
    /// Write size of the bandwidth test.
    #[arg(long, default_value = "1MiB", value_parser = parse_block_bytes)]
    block_bytes: u64,
    #[arg(long, default_value_t = 4, value_parser = parse_count::<usize>)]
    queue_depth: usize,
    /// fdatasync every this many bytes in the bandwidth test (0: once at the end).
    #[arg(long, default_value = "0", value_parser = parse_bytes)]
    sync_every_bytes: u64,
    /// Write size of the latency test.
    #[arg(long, default_value = "4KiB", value_parser = parse_block_bytes)]
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

#[derive(Args, Debug, Clone)]
struct EngineArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1, value_parser = parse_count::<u32>)]
    partitions: u32,
    /// Also run the same load over each of these partition counts (comma-separated; appends in
    /// flight: the larger of `--concurrency` and the count), interleaved with the `--partitions`
    /// run in every round, and report each one's throughput ÷ the `--partitions` runs just
    /// before and after it (their mean). No raw baseline in this mode. The engine issue's
    /// many-partitions target: `--compare-partitions 256,1000`.
    #[arg(long, value_delimiter = ',', value_parser = parse_count::<u32>)]
    compare_partitions: Vec<u32>,
    /// Size of each appended batch, header included.
    #[arg(long, default_value = "64KiB", value_parser = parse_batch_bytes)]
    batch_bytes: u64,
    #[arg(long, default_value_t = 1, value_parser = parse_count::<i32>)]
    records_per_batch: i32,
    #[arg(long, value_enum, default_value = "every-batch")]
    policy: Policy,
    /// With `--policy interval`: fdatasync every this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    flush_ms: u64,
    /// Appends in flight (closed loop). Group commit needs a deep pipeline: throughput is at most
    /// concurrency × batch size ÷ (write + fdatasync latency).
    #[arg(long, default_value_t = 256, value_parser = parse_count::<usize>)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = parse_run_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Engine shards (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    segment_bytes: u64,
    /// Each shard's journal ring (ARCHITECTURE.md, decision 10); 0 runs without a journal.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    journal_bytes: u64,
    /// Each shard's memory for recent batches, shared by its partitions (`log.cache.bytes`).
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    shard_cache_bytes: u64,
    /// A partition's recovery point moves into its active segment each time this much more of
    /// it is durable (`log.recovery.point.bytes`; ARCHITECTURE.md, decision 39); 0: only at rolls.
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    recovery_point_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Acks {
    All,
    #[value(name = "1")]
    One,
    #[value(name = "0")]
    Zero,
}

#[derive(Args, Debug, Clone)]
struct BrokerArgs {
    #[command(flatten)]
    common: Common,
    /// An external broker to load (default: start one in-process on a scratch directory).
    #[arg(long)]
    bootstrap: Option<std::net::SocketAddr>,
    #[arg(long, default_value_t = 1, value_parser = parse_count::<u32>)]
    partitions: u32,
    /// Producer connections (each an idempotent producer).
    #[arg(long, default_value_t = 1, value_parser = parse_count::<usize>)]
    producers: usize,
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    #[arg(long, default_value = "1KiB", value_parser = parse_bytes)]
    message_bytes: u64,
    /// Messages per batch (like linger-filled client batches; one batch per request unless
    /// `--partitions-per-request` says more).
    #[arg(long, default_value_t = 64, value_parser = parse_count::<usize>)]
    messages_per_batch: usize,
    #[arg(long, value_enum, default_value = "all")]
    acks: Acks,
    /// Produce requests in flight per producer connection.
    #[arg(long, default_value_t = 5, value_parser = parse_count::<usize>)]
    inflight: usize,
    /// Batches per produce request, each for another partition of the producer's turn, as a
    /// Kafka producer's sender puts every partition with a batch ready into one request per
    /// broker. At most the partitions a producer cycles through (`--partitions` ÷ gcd of
    /// partitions and producers). The engine-alone run then keeps producers × in flight × this
    /// many appends in flight.
    #[arg(long, default_value_t = 1)]
    partitions_per_request: usize,
    #[arg(long, value_enum, default_value = "every-batch")]
    policy: Policy,
    #[arg(long, default_value_t = 1000)]
    flush_ms: u64,
    #[arg(long, default_value = "10s", value_parser = parse_run_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Stop after this many messages in all (0: only the duration bounds the run).
    #[arg(long, default_value_t = 0)]
    max_messages: u64,
    /// Open loop at this many messages per second in all (0: closed loop). Latency is measured
    /// from each batch's scheduled time. For a latency-at-load curve, run at fractions of the
    /// closed-loop peak.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// With `--rate`: like a client's `linger.ms`, send a batch when it is full or when this many
    /// ms have passed since its first message, so each batch holds what one producer's share of
    /// the rate brings in that time (at most `--messages-per-batch`). Produce latency still counts
    /// from the batch's send; a message also waited up to this long before it (the Kafka
    /// producer's record-queue-time).
    #[arg(long)]
    linger_ms: Option<f64>,
    /// Broker/engine shards (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Skip the engine-only run with the same settings.
    #[arg(long)]
    no_engine: bool,
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
                "raw: sequential O_DIRECT {} KiB writes, QD {}: {:.0} MB/s ({} bytes in {:.2} s)",
                args.block_bytes >> 10,
                args.queue_depth,
                base.bandwidth_mb_s,
                base.bandwidth_bytes,
                base.bandwidth_seconds
            );
            print_latency("raw: 4 KiB write + fdatasync", &base.sync_latency);
            write_json(&args.common, &result)?;
            write_markdown(&args.common, std::slice::from_ref(&result))
        }
        Mode::Engine(args) => engine(args),
        Mode::Broker(args) => broker(args),
        Mode::Sweep(args) => sweep(args),
        Mode::Recovery(args) => recovery_mode(args),
        Mode::RecoveryChild(shape) => recovery::child(&shape.config(false)),
        Mode::Plot { files, out } => {
            for path in crate::plot::plot_files(&files, &out)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

fn sweep(args: SweepArgs) -> Result<(), String> {
    let common = args.broker.common.clone();
    let measure = || ratio_baseline(&common);
    // A baseline between every two cells: each cell's ratio divides by the mean of the two
    // around it (`report::bracket`), as in the engine and broker modes.
    let mut before = measure()?;
    let mut results = Vec::new();
    for &size in &args.sizes {
        for &partitions in &args.partition_counts {
            for &acks in &args.acks_list {
                let mut run = args.broker.clone();
                run.message_bytes = size;
                run.partitions = partitions;
                run.acks = acks;
                println!("== sweep: {size} B messages, {partitions} partition(s), acks={acks:?}");
                let mut result = broker_run(&run, before)?;
                let after = measure()?;
                if let Some(a) = after {
                    crate::report::bracket(&mut result, a.bandwidth_mb_s, a.sync_latency);
                }
                results.push(result);
                before = after;
            }
        }
    }
    let value = json!({ "mode": "sweep", "runs": results });
    write_json(&common, &value)?;
    write_markdown(&common, &results)?;
    println!("{}", markdown_table(&results));
    Ok(())
}

/// A Markdown table of raw or engine results: one row per run.
fn markdown_simple(results: &[Value]) -> String {
    let mut out = String::from(
        "| mode | settings | MB/s | × raw | latency p50 / p99 / p99.9 µs | raw 4 KiB write+fdatasync p99 µs | Keel CPU s/GB |\n|---|---|---|---|---|---|---|\n",
    );
    let num = |v: &Value| v.as_f64().map_or("–".to_string(), |f| format!("{f:.0}"));
    for r in results {
        let c = &r["config"];
        let settings = match r["mode"].as_str() {
            Some("engine") => format!(
                "{} B batches, {} partition(s), {} in flight, {}",
                c["batch_bytes"],
                c["partitions"],
                c["concurrency"],
                c["flush_policy"].as_str().unwrap_or("?")
            ),
            _ => format!("{} B writes, QD {}", c["block_bytes"], c["queue_depth"]),
        };
        let lat = &r["latency_us"];
        out.push_str(&format!(
            "| {} | {settings} | {} | {} | {} / {} / {} | {} | {} |\n",
            r["mode"].as_str().unwrap_or("?"),
            num(&r["throughput_mb_s"]),
            r["ratio"]
                .as_f64()
                .map_or("–".to_string(), |f| format!("{f:.3}")),
            num(&lat["p50"]),
            num(&lat["p99"]),
            num(&lat["p999"]),
            num(&r["baseline_latency_us"]["p99"]),
            cpu_per_gb(r),
        ));
    }
    out
}

/// A Markdown table of broker/engine results: one row per run.
fn markdown_table(results: &[Value]) -> String {
    let mut out = String::from(
        "| mode | messages | partitions | producers × in flight | acks | policy | MB/s | msgs/s | × engine | × raw | produce p50 / p99 / p99.9 µs | e2e p99 µs | Keel CPU s/GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let num = |v: &Value| v.as_f64().map_or("–".to_string(), |f| format!("{f:.0}"));
    let ratio = |v: &Value| v.as_f64().map_or("–".to_string(), |f| format!("{f:.2}"));
    for r in results {
        let c = &r["config"];
        let lat = &r["latency_us"];
        out.push_str(&format!(
            "| {} | {} × {} B | {} | {} × {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
            r["mode"].as_str().unwrap_or("?"),
            c["messages_per_batch"],
            c["message_bytes"],
            c["partitions"],
            c["producers"],
            match c["partitions_per_request"].as_u64() {
                Some(n) if n > 1 => format!("{} ({n} partitions per request)", c["inflight"]),
                _ => c["inflight"].to_string(),
            },
            c["acks"].as_str().unwrap_or("?"),
            c["flush_policy"].as_str().unwrap_or("?"),
            num(&r["throughput_mb_s"]),
            num(&r["messages_per_s"]),
            ratio(&r["engine_ratio"]),
            ratio(&r["ratio"]),
            num(&lat["p50"]),
            num(&lat["p99"]),
            num(&lat["p999"]),
            num(&r["e2e_latency_us"]["p99"]),
            cpu_per_gb(r),
        ));
    }
    out
}

/// Keel's core-seconds per GB appended in a run (`cpu.keel_s_per_gb`), or "–" (raw runs).
fn cpu_per_gb(r: &Value) -> String {
    r["cpu"]["keel_s_per_gb"]
        .as_f64()
        .map_or("–".to_string(), |f| format!("{f:.2}"))
}

fn write_markdown(common: &Common, results: &[Value]) -> Result<(), String> {
    if let Some(path) = &common.markdown {
        let broker = results.iter().all(|r| r["mode"] == "broker");
        let table = if broker {
            markdown_table(results)
        } else {
            markdown_simple(results)
        };
        std::fs::write(path, table).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The baseline the engine, broker and sweep modes divide by (the (a) and (b): 1 MiB
/// writes at queue depth 4, 4 KiB write+fdatasync), unless `--no-baseline`.
fn ratio_baseline(common: &Common) -> Result<Option<RawResult>, String> {
    if common.no_baseline {
        return Ok(None);
    }
    baseline(common, 1 << 20, 4, 0, 4096, false).map(Some)
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
    if !args.compare_partitions.is_empty() {
        let result = engine_compare(&args)?;
        return write_json(&args.common, &result);
    }
    let results = in_rounds(&args.common, |base| engine_run(&args, base))?;
    write_json(&args.common, &results)?;
    write_markdown(&args.common, std::slice::from_ref(&results))
}

/// Bracketing baselines further apart than this (a fraction of their mean) get a warning with
/// the range their run's ratio could have.
const baseline_drift_warn: f64 = 0.10;

/// Run `round` `common.rounds` times, each after its own baseline (unless `--no-baseline`);
/// with more than one round, print and return the medians (`report::summarize_rounds`).
fn in_rounds(
    common: &Common,
    mut round: impl FnMut(Option<RawResult>) -> Result<Value, String>,
) -> Result<Value, String> {
    let mut results = Vec::new();
    let mut baselines = Vec::new();
    for i in 0..common.rounds {
        if common.rounds > 1 {
            println!("== round {} of {}", i + 1, common.rounds);
        }
        let base = ratio_baseline(common)?;
        baselines.extend(base);
        results.push(round(base)?);
    }
    if let Some(last) = ratio_baseline(common)? {
        // Each run lies between two baselines (its own and the next round's, or this last one):
        // its ratios divide by their mean (`report::bracket`).
        baselines.push(last);
        for (i, result) in results.iter_mut().enumerate() {
            let after = baselines[i + 1];
            crate::report::bracket(result, after.bandwidth_mb_s, after.sync_latency);
            println!(
                "bracketed{}: baseline {:.0} MB/s before, {:.0} after (4 KiB write+fdatasync p99 {:.0} µs after); ratio {:.3} of their mean ({:.3} of the one before){}",
                if common.rounds > 1 { format!(" round {}", i + 1) } else { String::new() },
                result["baseline_before_mb_s"].as_f64().unwrap_or(f64::NAN),
                after.bandwidth_mb_s,
                after.sync_latency.p99,
                result["ratio"].as_f64().unwrap_or(f64::NAN),
                result["ratio_before"].as_f64().unwrap_or(f64::NAN),
                result["latency_ratio"]
                    .as_f64()
                    .map_or(String::new(), |r| format!("; p99 latency {r:.2} x their mean")),
            );
            let drift = result["baseline_drift"].as_f64().unwrap_or(0.0);
            if drift > baseline_drift_warn {
                println!(
                    "  the device's bandwidth moved {:.0}% between these baselines: this run's ratio lies anywhere from {:.3} to {:.3}",
                    drift * 100.0,
                    result["ratio_range"][0].as_f64().unwrap_or(f64::NAN),
                    result["ratio_range"][1].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
    }
    if results.len() == 1 {
        let mut result = results.pop().expect("one round");
        result["config"]["rounds"] = json!(1);
        return Ok(result);
    }
    let mut summary = summarize_rounds(&results).expect("at least one round");
    summary["config"]["rounds"] = json!(results.len());
    let list = |key: &str| {
        results
            .iter()
            .map(|r| {
                r[key]
                    .as_f64()
                    .map_or("–".to_string(), |v| format!("{v:.3}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("== medians over {} rounds", results.len());
    for key in crate::report::round_figures {
        if common.no_baseline && key == "baseline_mb_s" {
            continue;
        }
        if let Some(m) = summary[key].as_f64() {
            println!("{key}: median {m:.3} (rounds: {})", list(key));
        }
    }
    Ok(summary)
}

/// `--compare-partitions`: in each round the reference run (`--partitions`), then one run per
/// listed count; one more reference run closes the last round. Each compared run divides by the
/// mean of the reference runs around it (`report::compare_to_reference`).
fn engine_compare(args: &EngineArgs) -> Result<Value, String> {
    let rounds = args.common.rounds.max(1) as usize;
    let variant = |partitions: u32| {
        let mut a = args.clone();
        a.partitions = partitions;
        a.concurrency = args.concurrency.max(partitions as usize);
        a.compare_partitions.clear();
        a
    };
    let mut reference = Vec::with_capacity(rounds + 1);
    let mut compared: Vec<Vec<Value>> =
        vec![Vec::with_capacity(rounds); args.compare_partitions.len()];
    for i in 0..rounds {
        println!("== round {} of {rounds}", i + 1);
        reference.push(engine_run(args, None)?);
        for (j, &p) in args.compare_partitions.iter().enumerate() {
            compared[j].push(engine_run(&variant(p), None)?);
        }
    }
    println!("== closing reference run");
    reference.push(engine_run(args, None)?);
    let mut result =
        crate::report::compare_to_reference(&reference, &compared).ok_or("no reference runs")?;
    result["config"]["rounds"] = json!(rounds);
    result["config"]["compare_partitions"] = json!(args.compare_partitions);
    for c in result["compared"].as_array().into_iter().flatten() {
        println!(
            "{} partitions: median {:.0} MB/s, {:.3} of {} partition(s) (rounds: {})",
            c["partitions"],
            c["throughput_mb_s"].as_f64().unwrap_or(f64::NAN),
            c["ratio"].as_f64().unwrap_or(f64::NAN),
            args.partitions,
            c["rounds"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| format!("{:.3}", r["ratio"].as_f64().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(result)
}

/// One engine run after `base`, the baseline measured just before it (if any).
fn engine_run(args: &EngineArgs, base: Option<RawResult>) -> Result<Value, String> {
    let common = &args.common;
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
        journal_bytes: args.journal_bytes,
        shard_cache_bytes: args.shard_cache_bytes as usize,
        recovery_point_bytes: args.recovery_point_bytes,
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
        "engine: {:.0} MB/s, {:.0} batches/s over {:.2} s; {} writes ({} durable by themselves), {} segment syncs ({} of them syncfs, for {} partition syncs; {:.1} appends per sync call); journal: {} writes ({} durable by themselves), {} fdatasyncs, {} checkpoints, {} waits (ring full or new lap)",
        r.throughput_mb_s, r.batches_per_s, r.seconds, r.metrics.writes,
        r.metrics.segment_durable_writes, r.metrics.segment_sync_calls, r.metrics.group_syncs, r.metrics.fsyncs,
        r.metrics.appends as f64
            / (r.metrics.segment_sync_calls + r.metrics.journal_syncs).max(1) as f64,
        r.metrics.journal_writes, r.metrics.journal_durable_writes, r.metrics.journal_syncs,
        r.metrics.journal_checkpoints, r.metrics.journal_full
    );
    print_latency("engine: append latency", &r.latency);
    println!(
        "engine: clean shutdown in {:.0} ms (every partition made durable in its segments, then its metadata files and marker written)",
        r.shutdown_s * 1000.0
    );
    let mb = r.bytes as f64 / 1e6;
    println!("{}", r.cpu.describe("engine", mb));
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
            "shards": args.shards, "segment_bytes": args.segment_bytes, "journal_bytes": args.journal_bytes,
            "shard_cache_bytes": args.shard_cache_bytes,
            "recovery_point_bytes": args.recovery_point_bytes,
            "baseline": !common.no_baseline,
            "baseline_bytes": common.baseline_bytes, "baseline_duration_s": common.baseline_duration.as_secs_f64(),
        },
        "throughput_mb_s": r.throughput_mb_s,
        "batches_per_s": r.batches_per_s,
        "baseline_mb_s": baseline_mb_s,
        "ratio": throughput_ratio,
        "latency_ratio": latency_ratio,
        "latency_us": r.latency.to_json(),
        "baseline_latency_us": baseline_latency.to_json(),
        "timeline": r.timeline,
        "latency_curve": r.curve,
        "cpu": r.cpu.to_json(mb),
        "engine": { "writes": r.metrics.writes, "write_bytes": r.metrics.write_bytes, "fsyncs": r.metrics.fsyncs, "segment_sync_calls": r.metrics.segment_sync_calls, "segment_durable_writes": r.metrics.segment_durable_writes, "group_syncs": r.metrics.group_syncs, "journal_writes": r.metrics.journal_writes, "journal_syncs": r.metrics.journal_syncs, "appends": r.metrics.appends, "shutdown_ms": r.shutdown_s * 1000.0 },
    });
    Ok(result)
}

fn broker(args: BrokerArgs) -> Result<(), String> {
    let result = in_rounds(&args.common, |base| broker_run(&args, base))?;
    write_json(&args.common, &result)?;
    write_markdown(&args.common, std::slice::from_ref(&result))
}

/// Messages in each produce request: `messages_per_batch`, or with a linger in an open loop,
/// what one producer's share of `rate` (messages/s over `producers`) brings in `linger_ms`.
fn lingered_batch(
    messages_per_batch: usize,
    rate: f64,
    producers: usize,
    linger_ms: Option<f64>,
) -> Result<usize, String> {
    let Some(linger_ms) = linger_ms else {
        return Ok(messages_per_batch);
    };
    if rate <= 0.0 {
        return Err(
            "--linger-ms needs --rate: in a closed loop a full batch is always ready".into(),
        );
    }
    if !(linger_ms >= 0.0 && linger_ms.is_finite()) {
        return Err(format!("--linger-ms {linger_ms}: not a duration"));
    }
    let per_producer = rate / producers.max(1) as f64;
    let filled = (per_producer * linger_ms / 1000.0).floor().max(1.0) as usize;
    Ok(filled.min(messages_per_batch))
}

/// One broker run (and the engine alone with the same settings); `base` is the raw baseline
/// measured once by the caller.
fn broker_run(args: &BrokerArgs, base: Option<RawResult>) -> Result<Value, String> {
    let common = &args.common;
    // Before a broker starts, not when the load does.
    broker_load::check_partitions_per_request(
        args.partitions,
        args.producers,
        args.partitions_per_request,
    )?;
    let messages_per_batch = lingered_batch(
        args.messages_per_batch,
        args.rate,
        args.producers,
        args.linger_ms,
    )?;
    std::fs::create_dir_all(&common.dir)
        .map_err(|e| format!("create {}: {e}", common.dir.display()))?;
    let (policy_name, flush) = match args.policy {
        Policy::EveryBatch => (
            "every-batch".to_string(),
            keel_engine::FlushPolicy::EveryBatch,
        ),
        Policy::Interval => (
            format!("interval ({} ms)", args.flush_ms),
            keel_engine::FlushPolicy::Interval {
                ms: args.flush_ms,
                bytes: 0,
            },
        ),
    };
    let mut topic_configs = vec![("segment.bytes".to_string(), "1073741824".to_string())];
    match args.policy {
        Policy::EveryBatch => topic_configs.push(("flush.policy".into(), "every-batch".into())),
        Policy::Interval => {
            topic_configs.push(("flush.policy".into(), "interval".into()));
            topic_configs.push(("flush.ms".into(), args.flush_ms.to_string()));
        }
    }
    let data = common.dir.join("broker-data");
    let _ = std::fs::remove_dir_all(&data);
    let server = match args.bootstrap {
        Some(_) => None,
        None => {
            let mut c = keel_server::BrokerConfig::default();
            let settings = [
                ("log.dirs", data.display().to_string()),
                ("listeners", "127.0.0.1:0".to_string()),
                ("num.shards", args.shards.to_string()),
                ("message.max.bytes", (64u64 << 20).to_string()),
            ];
            for (k, v) in settings {
                c.set(k, &v).map_err(|e| e.to_string())?;
            }
            Some(keel_server::Server::start(c).map_err(|e| format!("start broker: {e}"))?)
        }
    };
    let bootstrap = args
        .bootstrap
        .or(server.as_ref().map(|s| s.local_addr()))
        .expect("an address");
    let acks = match args.acks {
        Acks::All => -1,
        Acks::One => 1,
        Acks::Zero => 0,
    };
    let appends_in_flight = (args.producers * args.inflight * args.partitions_per_request).max(1);
    let load = BrokerLoadConfig {
        bootstrap,
        topic: format!("keel-bench-{}", std::process::id()),
        partitions: args.partitions,
        producers: args.producers,
        consumers: args.consumers,
        message_bytes: args.message_bytes as usize,
        messages_per_batch,
        acks,
        inflight: args.inflight,
        partitions_per_request: args.partitions_per_request,
        duration: args.duration,
        warmup: args.warmup,
        max_messages: args.max_messages,
        rate_messages_per_s: args.rate,
        topic_configs,
    };
    let r = broker_load::run(&load);
    let broker_engine = server.as_ref().map(|s| s.broker().engine.metrics());
    if let Some(m) = &broker_engine {
        println!(
            "broker's engine: {} appends, {} writes ({} of a carried block queued behind the write before, {} durable by themselves), {} segment syncs ({} of them syncfs), {} journal fdatasyncs ({:.1} appends per sync call)",
            m.appends,
            m.writes,
            m.deferred_writes,
            m.segment_durable_writes,
            m.segment_sync_calls,
            m.group_syncs,
            m.journal_syncs,
            m.appends as f64 / (m.segment_sync_calls + m.journal_syncs).max(1) as f64
        );
    }
    if let Some(server) = server {
        server
            .shutdown()
            .map_err(|e| format!("broker shutdown: {e}"))?;
    }
    let _ = std::fs::remove_dir_all(&data);
    let r = r?;
    let batch_bytes = (args.message_bytes as usize * messages_per_batch + 61) as u64;
    let engine = if args.no_engine {
        None
    } else {
        Some(
            engine_load::run(&EngineLoadConfig {
                dir: common.dir.clone(),
                partitions: args.partitions,
                batch_bytes: batch_bytes as usize,
                records_per_batch: messages_per_batch as i32,
                flush,
                concurrency: appends_in_flight,
                duration: args.duration,
                warmup: args.warmup,
                shards: args.shards,
                segment_bytes: 1 << 30,
                journal_bytes: keel_engine::constants::journal_bytes_default,
                shard_cache_bytes: keel_engine::constants::shard_cache_bytes_default,
                recovery_point_bytes: keel_engine::constants::recovery_point_bytes_default,
            })
            .map_err(|e| format!("engine run: {e}"))?,
        )
    };
    let acks_name = match args.acks {
        Acks::All => "all",
        Acks::One => "1",
        Acks::Zero => "0",
    };
    let per_request = match args.partitions_per_request {
        1 => String::new(),
        n => format!(" ({n} partitions' batches per request)"),
    };
    println!(
        "broker: {} partition(s), {} producer(s) x {} in flight{per_request}, {} consumer(s), {} B messages x {} per batch, acks={acks_name}, {policy_name}",
        args.partitions, args.producers, args.inflight, args.consumers, args.message_bytes, messages_per_batch
    );
    println!(
        "broker: {:.0} MB/s, {:.0} msgs/s over {:.2} s ({} batches, {} errors); consumers read {:.0} MB",
        r.throughput_mb_s, r.messages_per_s, r.seconds, r.batches, r.errors, r.consumed_bytes as f64 / 1e6
    );
    if acks != 0 {
        print_latency("broker: produce latency", &r.produce_latency);
    }
    if args.consumers > 0 {
        print_latency("broker: end-to-end latency", &r.e2e_latency);
    }
    let mb = r.bytes as f64 / 1e6;
    println!("{}", r.cpu.describe("broker", mb));
    let engine_mb_s = engine.as_ref().map_or(0.0, |e| e.throughput_mb_s);
    let engine_ratio = ratio(r.throughput_mb_s, engine_mb_s);
    if let Some(e) = &engine {
        println!(
            "engine alone, same settings ({} appends in flight): {:.0} MB/s; broker/engine {:.3}",
            appends_in_flight,
            e.throughput_mb_s,
            engine_ratio.unwrap_or(f64::NAN)
        );
        if args.consumers > 0 {
            println!(
                "engine alone has no reader; the broker also served {} consumer(s) on the same CPUs (--consumers 0 compares produce alone)",
                args.consumers
            );
        }
        print_latency("engine alone: append latency", &e.latency);
        println!("{}", e.cpu.describe("engine alone", e.bytes as f64 / 1e6));
    }
    let baseline_mb_s = base.map_or(0.0, |b| b.bandwidth_mb_s);
    let baseline_latency = base.map(|b| b.sync_latency).unwrap_or_default();
    let throughput_ratio = ratio(r.throughput_mb_s, baseline_mb_s);
    if let Some(b) = base {
        println!(
            "baseline: sequential {:.0} MB/s; 4 KiB write+fdatasync p50 {:.0} µs p99 {:.0} µs; broker/baseline {:.3}",
            b.bandwidth_mb_s, b.sync_latency.p50, b.sync_latency.p99, throughput_ratio.unwrap_or(f64::NAN)
        );
    }
    let result = json!({
        "mode": "broker",
        "config": {
            "dir": common.dir, "bootstrap": args.bootstrap.map(|a| a.to_string()), "partitions": args.partitions,
            "producers": args.producers, "consumers": args.consumers, "message_bytes": args.message_bytes,
            "messages_per_batch": messages_per_batch, "batch_bytes": batch_bytes, "acks": acks_name,
            "inflight": args.inflight, "partitions_per_request": args.partitions_per_request,
            "flush_policy": policy_name, "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(), "max_messages": args.max_messages, "shards": args.shards,
            "rate_messages_per_s": args.rate, "linger_ms": args.linger_ms,
            "baseline": !common.no_baseline, "engine": !args.no_engine,
        },
        "throughput_mb_s": r.throughput_mb_s,
        "messages_per_s": r.messages_per_s,
        "baseline_mb_s": baseline_mb_s,
        "ratio": throughput_ratio,
        "engine_mb_s": engine_mb_s,
        "engine_ratio": engine_ratio,
        "latency_us": r.produce_latency.to_json(),
        "e2e_latency_us": r.e2e_latency.to_json(),
        "engine_latency_us": engine.as_ref().map(|e| e.latency.to_json()),
        "baseline_latency_us": baseline_latency.to_json(),
        "errors": r.errors,
        "cpu": r.cpu.to_json(mb),
        "engine_cpu": engine.as_ref().map(|e| e.cpu.to_json(e.bytes as f64 / 1e6)),
        "timeline": r.timeline,
        "latency_curve": r.produce_curve,
        "e2e_latency_curve": r.e2e_curve,
    });
    Ok(result)
}

fn recovery_mode(args: RecoveryArgs) -> Result<(), String> {
    let shape = &args.shape;
    if shape.bytes_per_partition < shape.batch_bytes {
        return Err(format!(
            "--bytes-per-partition {} is less than one batch (--batch-bytes {}): nothing to recover",
            shape.bytes_per_partition, shape.batch_bytes
        ));
    }
    let config = shape.config(!args.no_baseline);
    println!(
        "recovery: {} partition(s) × {} MiB of {} KiB batches (segments of {} MiB, recovery \
         points every {} MiB), every append acknowledged durable, then the writer killed (SIGKILL)",
        shape.partitions,
        shape.bytes_per_partition >> 20,
        shape.batch_bytes >> 10,
        shape.segment_bytes >> 20,
        shape.recovery_point_bytes >> 20
    );
    let (mut open_h, mut device_h) = (histogram(), histogram());
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let r = recovery::run(&config)?;
        let scan_mb_s = mb_per_s(r.scanned_bytes, r.open_s);
        // What the device needs to read the bytes recovery checked: the floor for this open.
        let device_s = (r.read_mb_s > 0.0).then(|| r.scanned_bytes as f64 / 1e6 / r.read_mb_s);
        println!(
            "recovery: round {round}: opened in {:.0} ms, {:.0} MB of {:.0} MB scanned ({scan_mb_s:.0} MB/s); \
             the device reads those files at {:.0} MB/s{}; clean restart {:.0} ms",
            r.open_s * 1e3,
            r.scanned_bytes as f64 / 1e6,
            r.written_bytes as f64 / 1e6,
            r.read_mb_s,
            device_s.map_or(String::new(), |d| format!(" (the scanned bytes in {:.0} ms)", d * 1e3)),
            r.clean_open_s * 1e3
        );
        open_h.record(((r.open_s * 1e6) as u64).max(1)).ok();
        if let Some(d) = device_s {
            device_h.record(((d * 1e6) as u64).max(1)).ok();
        }
        rounds.push(json!({
            "written_bytes": r.written_bytes, "scanned_bytes": r.scanned_bytes,
            "open_ms": r.open_s * 1e3, "clean_open_ms": r.clean_open_s * 1e3,
            "throughput_mb_s": scan_mb_s, "baseline_mb_s": r.read_mb_s,
            "ratio": ratio(scan_mb_s, r.read_mb_s),
            "device_ms": device_s.map(|d| d * 1e3),
        }));
    }
    let field =
        |name: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[name].as_f64()).collect() };
    let med = |name: &str| median(&field(name)).unwrap_or(0.0);
    let (open, device) = (Percentiles::of(&open_h), Percentiles::of(&device_h));
    println!(
        "recovery: median open {:.0} ms, scanning {:.0} MB/s; device {:.0} MB/s; ratio {}; clean restart {:.0} ms",
        med("open_ms"),
        med("throughput_mb_s"),
        med("baseline_mb_s"),
        median(&field("ratio")).map_or("–".to_string(), |r| format!("{r:.3}")),
        med("clean_open_ms")
    );
    let result = json!({
        "mode": "recovery",
        "config": {
            "dir": shape.dir, "partitions": shape.partitions, "bytes_per_partition": shape.bytes_per_partition,
            "batch_bytes": shape.batch_bytes, "segment_bytes": shape.segment_bytes,
            "recovery_point_bytes": shape.recovery_point_bytes, "shards": shape.shards,
            "baseline": !args.no_baseline, "rounds": args.rounds,
        },
        "throughput_mb_s": med("throughput_mb_s"),
        "baseline_mb_s": med("baseline_mb_s"),
        "ratio": median(&field("ratio")),
        "latency_us": open.to_json(),
        "baseline_latency_us": device.to_json(),
        "written_bytes": med("written_bytes"),
        "scanned_bytes": med("scanned_bytes"),
        "open_ms": med("open_ms"),
        "clean_open_ms": med("clean_open_ms"),
        "rounds": rounds,
    });
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown_recovery(&result))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn markdown_recovery(r: &Value) -> String {
    let c = &r["config"];
    let num = |v: &Value| v.as_f64().map_or("–".to_string(), |f| format!("{f:.0}"));
    let mb = |v: &Value| {
        v.as_f64()
            .map_or("–".to_string(), |f| format!("{:.0}", f / 1e6))
    };
    format!(
        "| mode | settings | written MB | scanned MB | open after the kill ms | scan MB/s | device read MB/s | × device | clean restart ms |\n\
         |---|---|---|---|---|---|---|---|---|\n\
         | recovery | {} partition(s), {} B batches, {} B segments, recovery points every {} B | {} | {} | {} | {} | {} | {} | {} |\n",
        c["partitions"],
        c["batch_bytes"],
        c["segment_bytes"],
        c["recovery_point_bytes"],
        mb(&r["written_bytes"]),
        mb(&r["scanned_bytes"]),
        num(&r["open_ms"]),
        num(&r["throughput_mb_s"]),
        num(&r["baseline_mb_s"]),
        r["ratio"].as_f64().map_or("–".to_string(), |f| format!("{f:.3}")),
        num(&r["clean_open_ms"]),
    )
}

fn print_latency(what: &str, p: &Percentiles) {
    println!(
        "{what}: p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, p99.99 {:.0} µs, max {:.0} µs ({} samples)",
        p.p50, p.p90, p.p99, p.p999, p.p9999, p.max, p.count
    );
}

fn write_json(common: &Common, value: &Value) -> Result<(), String> {
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::lingered_batch;

    #[test]
    fn a_linger_fills_batches_with_what_the_rate_brings_in_that_time() {
        // 100,000 msgs/s over 4 producers = 25 per ms each: 2 ms of linger fill 50.
        assert_eq!(lingered_batch(64, 100_000.0, 4, Some(2.0)), Ok(50));
        // Capped by the batch size, at least one message.
        assert_eq!(lingered_batch(64, 100_000.0, 4, Some(10.0)), Ok(64));
        assert_eq!(lingered_batch(64, 10.0, 1, Some(1.0)), Ok(1));
        // Without a linger the batch size stands; without a rate a linger means nothing.
        assert_eq!(lingered_batch(64, 0.0, 1, None), Ok(64));
        assert!(lingered_batch(64, 0.0, 1, Some(5.0)).is_err());
        assert!(lingered_batch(64, 1000.0, 1, Some(f64::NAN)).is_err());
    }
}
