//! Every `keel-bench` mode, run tiny (well under a second of load each), writes a JSON result
//! with the fields scripts compare runs by. Checks the fields, never the speed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-bench-modes-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(dir: &Path, args: &[&str]) -> Value {
    let tiny_baseline = [
        "--baseline-bytes",
        "16MiB",
        "--baseline-duration",
        "200ms",
        "--latency-duration",
        "200ms",
    ];
    run_with(dir, args, &tiny_baseline)
}

/// `keel-bench` with `args`, `extra`, a scratch `--dir` and `--json`: the JSON it wrote.
fn run_with(dir: &Path, args: &[&str], extra: &[&str]) -> Value {
    let json = dir.join("result.json");
    let out = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args(args)
        .args([
            "--dir",
            dir.join("data").to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    value
}

fn has_percentiles(v: &Value, what: &str) {
    for p in ["p50", "p99", "p999"] {
        assert!(v[p].is_number(), "{what}.{p} in {v}");
    }
}

fn common_fields(v: &Value, mode: &str) {
    assert_eq!(v["mode"], mode);
    assert!(v["config"].is_object(), "config in {v}");
    for field in ["throughput_mb_s", "baseline_mb_s", "ratio"] {
        assert!(v[field].is_number(), "{field} in {v}");
    }
    assert!(v["throughput_mb_s"].as_f64().unwrap() > 0.0);
    has_percentiles(&v["latency_us"], "latency_us");
    has_percentiles(&v["baseline_latency_us"], "baseline_latency_us");
}

/// CPU spent in the measured window, by whose threads: Keel's shards did work, and so did the
/// load generator (per-thread nanosecond counters, so even a tiny run shows both).
fn has_cpu(v: &Value, what: &str) {
    let cpu = &v[what];
    for field in ["wall_s", "process_s", "keel_s", "io_workers_s", "load_s"] {
        assert!(cpu[field].is_number(), "{what}.{field} in {v}");
    }
    assert!(cpu["wall_s"].as_f64().unwrap() > 0.0, "{cpu}");
    assert!(cpu["keel_s"].as_f64().unwrap() > 0.0, "{cpu}");
    assert!(cpu["load_s"].as_f64().unwrap() > 0.0, "{cpu}");
    assert!(cpu["keel_s_per_gb"].as_f64().unwrap() > 0.0, "{cpu}");
}

#[test]
fn raw_mode() {
    let dir = scratch("raw");
    let md = std::env::temp_dir().join(format!("keel-bench-modes-{}-raw.md", std::process::id()));
    let v = run(&dir, &["raw", "--markdown", md.to_str().unwrap()]);
    common_fields(&v, "raw");
    let table = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    assert!(
        table.starts_with("| mode |") && table.contains("| raw |"),
        "{table}"
    );
}

/// A tiny engine run: 4 KiB batches, 4 in flight, for `duration`, plus `extra` flags.
fn tiny_engine(name: &str, duration: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "engine",
        "--duration",
        duration,
        "--warmup",
        "0s",
        "--batch-bytes",
        "4KiB",
        "--concurrency",
        "4",
        "--segment-bytes",
        "4MiB",
    ];
    args.extend_from_slice(extra);
    run(&scratch(name), &args)
}

#[test]
fn engine_mode() {
    let md =
        std::env::temp_dir().join(format!("keel-bench-modes-{}-engine.md", std::process::id()));
    let v = tiny_engine("engine", "300ms", &["--markdown", md.to_str().unwrap()]);
    common_fields(&v, "engine");
    has_cpu(&v, "cpu");
    let table = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    let row = table
        .lines()
        .find(|l| l.starts_with("| engine |"))
        .expect(&table);
    let cpu: f64 = row
        .trim_end_matches('|')
        .rsplit('|')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect(row);
    assert!(table.contains("| Keel CPU s/GB |") && cpu > 0.0, "{table}");
    assert_eq!(v["config"]["concurrency"], 4);
    assert_eq!(v["config"]["rounds"], 1);
    assert!(v.get("rounds").is_none(), "one round has no summary");
    // The engine's counters cover the measured window, and the shutdown is timed.
    let engine = &v["engine"];
    assert!(
        engine["appends"].as_u64().is_some_and(|a| a > 0),
        "{engine}"
    );
    assert!(
        engine["shutdown_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{engine}"
    );
}

#[test]
fn engine_mode_in_rounds() {
    let v = tiny_engine("engine-rounds", "200ms", &["--rounds", "3"]);
    common_fields(&v, "engine");
    assert_eq!(v["config"]["rounds"], 3);
    let rounds = v["rounds"].as_array().expect("every round's figures");
    assert_eq!(rounds.len(), 3);
    // The summary's figures are the medians of the rounds' own.
    for key in ["throughput_mb_s", "baseline_mb_s", "ratio"] {
        let mut values: Vec<f64> = rounds.iter().map(|r| r[key].as_f64().unwrap()).collect();
        values.sort_by(f64::total_cmp);
        assert_eq!(v[key].as_f64().unwrap(), values[1], "{key} in {v}");
    }
    let median_round = v["median_round"].as_u64().unwrap() as usize;
    assert_eq!(
        rounds[median_round]["throughput_mb_s"], v["throughput_mb_s"],
        "the reported latencies come from the median round"
    );
    // Each round lies between two baselines and divides by their mean.
    let (before, after) = (
        v["baseline_before_mb_s"].as_f64().unwrap(),
        v["baseline_after_mb_s"].as_f64().unwrap(),
    );
    assert!(before > 0.0 && after > 0.0, "{v}");
    let mean = (before + after) / 2.0;
    let ratio = v["throughput_mb_s"].as_f64().unwrap() / mean;
    assert!(
        (rounds[median_round]["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9,
        "{v}"
    );
    has_percentiles(&v["baseline_after_latency_us"], "baseline_after_latency_us");
    // How far apart its two baselines were, and the ratios at either of them, per round; the
    // summary keeps the median drift and no single round's range.
    let range = rounds[median_round]["ratio_range"]
        .as_array()
        .expect("a range");
    let (at_fast, at_slow) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
    assert!(at_fast <= ratio && ratio <= at_slow, "{v}");
    let drift = (before - after).abs() / mean;
    assert!((rounds[median_round]["baseline_drift"].as_f64().unwrap() - drift).abs() < 1e-9);
    assert!(
        v["baseline_drift"].is_number() && v["ratio_range"].is_null(),
        "{v}"
    );
}

#[test]
fn engine_mode_comparing_partition_counts() {
    let v = tiny_engine(
        "engine-compare",
        "200ms",
        &["--rounds", "2", "--compare-partitions", "3,8"],
    );
    assert_eq!(v["mode"], "engine-partitions");
    assert_eq!(v["config"]["partitions"], 1);
    assert_eq!(v["config"]["compare_partitions"], serde_json::json!([3, 8]));
    // Two rounds and a closing reference run.
    let reference: Vec<f64> = v["reference_runs_mb_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(reference.len(), 3, "{v}");
    let compared = v["compared"].as_array().unwrap();
    assert_eq!(compared.len(), 2);
    for (c, partitions) in compared.iter().zip([3, 8]) {
        assert_eq!(c["partitions"], partitions);
        // Four in flight, but at least one per partition.
        assert_eq!(c["concurrency"], 4.max(partitions));
        has_percentiles(&c["latency_us"], "latency_us");
        let rounds = c["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2);
        for (i, r) in rounds.iter().enumerate() {
            // Each round divides by the reference runs just before and after it.
            let around = (reference[i] + reference[i + 1]) / 2.0;
            let expect = r["throughput_mb_s"].as_f64().unwrap() / around;
            assert!((r["ratio"].as_f64().unwrap() - expect).abs() < 1e-9, "{v}");
        }
        let ratios: Vec<f64> = rounds
            .iter()
            .map(|r| r["ratio"].as_f64().unwrap())
            .collect();
        let median = (ratios[0] + ratios[1]) / 2.0;
        assert!((c["ratio"].as_f64().unwrap() - median).abs() < 1e-9, "{v}");
    }
}

/// A half-second broker run of tiny batches over `partitions`, with `extra` flags.
fn tiny_broker(dir: &Path, partitions: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "broker",
        "--duration",
        "500ms",
        "--warmup",
        "0s",
        "--message-bytes",
        "100",
        "--messages-per-batch",
        "4",
        "--partitions",
        partitions,
    ];
    args.extend_from_slice(extra);
    run(dir, &args)
}

#[test]
fn broker_mode() {
    let v = tiny_broker(&scratch("broker"), "2", &[]);
    common_fields(&v, "broker");
    has_cpu(&v, "cpu");
    has_cpu(&v, "engine_cpu");
    has_percentiles(&v["e2e_latency_us"], "e2e_latency_us");
    assert!(v["engine_mb_s"].as_f64().unwrap() > 0.0);
    assert!(v["engine_ratio"].is_number());
    assert_eq!(v["errors"], 0);
    assert!(!v["timeline"].as_array().unwrap().is_empty());
    assert!(!v["latency_curve"].as_array().unwrap().is_empty());
    assert!(!v["e2e_latency_curve"].as_array().unwrap().is_empty());
}

#[test]
fn broker_mode_with_several_partitions_per_request() {
    let dir = scratch("broker-per-request");
    let v = tiny_broker(&dir, "3", &["--partitions-per-request", "3"]);
    common_fields(&v, "broker");
    assert_eq!(v["config"]["partitions_per_request"], 3);
    assert_eq!(v["errors"], 0, "every partition of every request appended");
    // (broker_load's tiny runs check that every batch of such requests is consumed.)
    assert!(v["e2e_latency_us"]["count"].as_u64().unwrap() > 0, "{v}");
    // More partitions per request than a producer cycles through is refused, not run.
    let refused = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args([
            "broker",
            "--partitions",
            "4",
            "--producers",
            "2",
            "--partitions-per-request",
            "3",
        ])
        .args(["--duration", "100ms", "--no-baseline", "--dir"])
        .arg(dir.join("refused"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("between 1 and 2"));
}

#[test]
fn plot_mode() {
    let dir = scratch("plot");
    let json = dir.join("run.json");
    let ok = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args([
            "engine",
            "--no-baseline",
            "--duration",
            "300ms",
            "--warmup",
            "0s",
            "--batch-bytes",
            "4KiB",
        ])
        .args(["--concurrency", "4", "--segment-bytes", "4MiB", "--dir"])
        .arg(dir.join("data"))
        .arg("--json")
        .arg(&json)
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .arg("plot")
        .arg(&json)
        .arg("--out")
        .arg(dir.join("charts"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for chart in [
        "run-latency-over-time.svg",
        "run-throughput-over-time.svg",
        "run-percentiles.svg",
    ] {
        let svg = std::fs::read_to_string(dir.join("charts").join(chart)).unwrap();
        assert!(
            // A data line (the first series' colour, 2 px), not only the axes.
            svg.trim_start().starts_with("<svg")
                && svg.contains(r##"stroke="#1F77B4" stroke-width="2" points="##),
            "{chart}: {svg}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sweep_mode() {
    let v = run(
        &scratch("sweep"),
        &[
            "sweep",
            "--duration",
            "300ms",
            "--warmup",
            "0s",
            "--no-engine",
            "--messages-per-batch",
            "4",
            "--sizes",
            "100,1KiB",
            "--partition-counts",
            "1",
            "--acks-list",
            "all,1",
        ],
    );
    assert_eq!(v["mode"], "sweep");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "2 sizes x 1 partition count x 2 acks");
    for r in runs {
        common_fields(r, "broker");
    }
    // A baseline between every two cells: each cell's "after" is the next one's "before".
    for pair in runs.windows(2) {
        assert_eq!(
            pair[0]["baseline_after_mb_s"], pair[1]["baseline_before_mb_s"],
            "{v}"
        );
    }
    let mean = |r: &Value| {
        (r["baseline_before_mb_s"].as_f64().unwrap() + r["baseline_after_mb_s"].as_f64().unwrap())
            / 2.0
    };
    assert!(runs
        .iter()
        .all(|r| (r["baseline_mb_s"].as_f64().unwrap() - mean(r)).abs() < 1e-9));
}

#[test]
fn recovery_mode() {
    // Two partitions of 6 MiB in 2 MiB segments with recovery points every 1 MiB: the child is
    // killed, the engine opens again and finds every acknowledged batch (the mode fails if not).
    let dir = scratch("recovery");
    let md = std::env::temp_dir().join(format!(
        "keel-bench-modes-{}-recovery.md",
        std::process::id()
    ));
    let v = run_with(
        &dir,
        &["recovery", "--markdown", md.to_str().unwrap()],
        &[
            "--partitions",
            "2",
            "--bytes-per-partition",
            "6MiB",
            "--segment-bytes",
            "2MiB",
            "--recovery-point-bytes",
            "1MiB",
            "--rounds",
            "2",
        ],
    );
    common_fields(&v, "recovery");
    assert_eq!(v["rounds"].as_array().unwrap().len(), 2, "{v}");
    let written = v["written_bytes"].as_f64().unwrap();
    let scanned = v["scanned_bytes"].as_f64().unwrap();
    assert!(written >= 12.0 * 1024.0 * 1024.0, "{v}");
    // At most the active segment of each partition is scanned, never the sealed ones.
    assert!(
        scanned > 0.0 && scanned <= 2.0 * 2.0 * 1024.0 * 1024.0,
        "{v}"
    );
    assert!(v["open_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["clean_open_ms"].as_f64().unwrap() > 0.0, "{v}");
    let table = std::fs::read_to_string(&md).unwrap();
    let _ = std::fs::remove_file(&md);
    assert!(table.contains("| recovery |"), "{table}");
}

/// Settings that cannot make a run are refused before anything starts, with a message naming
/// the flag (clap's usage error, exit code 2), instead of a panic (`--partitions 0` divided by
/// zero), a run that reports 0 MB/s (no producer, nothing in flight), or a write the kernel
/// refuses mid-run (an O_DIRECT block that is not a multiple of 4 KiB).
#[test]
fn settings_that_cannot_make_a_run_are_refused_up_front() {
    let dir = scratch("refused");
    let data = dir.join("data");
    for args in [
        &["engine", "--partitions", "0"][..],
        &["engine", "--compare-partitions", "256,0"],
        &["engine", "--concurrency", "0"],
        &["engine", "--records-per-batch", "0"],
        &["engine", "--batch-bytes", "10"],
        &["broker", "--producers", "0"],
        &["broker", "--inflight", "0"],
        &["broker", "--messages-per-batch", "0"],
        &["raw", "--block-bytes", "1000"],
        &["raw", "--queue-depth", "0"],
        &["raw", "--latency-block-bytes", "0"],
        &["sweep", "--partition-counts", "1,0"],
        &["recovery", "--partitions", "0"],
        &["recovery", "--batch-bytes", "0"],
        &["engine", "--batch-bytes", "99999999999999g"],
        &["engine", "--duration", "0s"],
        &["broker", "--duration", "0ms"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
            .args(args)
            .arg("--dir")
            .arg(&data)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let flag = args[1];
        assert!(stderr.contains(flag), "{args:?} names {flag}: {stderr}");
        assert!(!data.exists(), "{args:?} started a run");
    }
    // A recovery run too small to fill one batch says so (and starts no child).
    let out = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args(["recovery", "--bytes-per-partition", "1KiB", "--no-baseline"])
        .arg("--dir")
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("less than one batch"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
