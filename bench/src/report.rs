//! Results: latency percentiles from HdrHistogram, ratios against the baseline, JSON.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
    pub count: u64,
}

/// A histogram of microseconds: 1 µs to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.50) as f64,
            p90: h.value_at_quantile(0.90) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            p9999: h.value_at_quantile(0.9999) as f64,
            max: h.max() as f64,
            count: h.len(),
        }
    }

    pub fn to_json(self) -> Value {
        json!({ "p50": self.p50, "p90": self.p90, "p99": self.p99, "p999": self.p999, "p9999": self.p9999, "max": self.max, "count": self.count })
    }
}

/// `numerator ÷ denominator`, or `None` when there is no baseline to divide by.
pub fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0 && numerator.is_finite()).then(|| numerator / denominator)
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The figures of each round that a summary of several rounds reports as medians.
pub const round_figures: [&str; 8] = [
    "throughput_mb_s",
    "baseline_mb_s",
    "ratio",
    "ratio_before",
    "baseline_drift",
    "latency_ratio",
    "engine_mb_s",
    "engine_ratio",
];

/// Bracket a run between its baseline (taken just before it, in `baseline_mb_s` and
/// `baseline_latency_us`) and the next one (taken just after): its ratios then divide by the mean
/// of the two, so a device whose speed drifts steadily during the run is compared with what it
/// could do on average over that time, not only at its start. Keeps the before-only ratio as
/// `ratio_before` and both baselines as `baseline_before_mb_s` / `baseline_after_mb_s`.
pub fn bracket(result: &mut Value, after_mb_s: f64, after_latency: Percentiles) {
    let Some(before_mb_s) = result["baseline_mb_s"].as_f64().filter(|b| *b > 0.0) else {
        return;
    };
    let throughput = result["throughput_mb_s"].as_f64().unwrap_or(f64::NAN);
    let mean_mb_s = (before_mb_s + after_mb_s) / 2.0;
    result["ratio_before"] = json!(ratio(throughput, before_mb_s));
    result["baseline_before_mb_s"] = json!(before_mb_s);
    result["baseline_after_mb_s"] = json!(after_mb_s);
    result["baseline_mb_s"] = json!(mean_mb_s);
    result["ratio"] = json!(ratio(throughput, mean_mb_s));
    // How far the device moved between the two baselines, and the ratios the run would have if
    // it ran all along at the faster or at the slower of them: how much the ratio can be trusted.
    let (low, high) = (before_mb_s.min(after_mb_s), before_mb_s.max(after_mb_s));
    result["baseline_drift"] = json!((high - low) / mean_mb_s);
    result["ratio_range"] = json!([ratio(throughput, high), ratio(throughput, low)]);
    result["baseline_after_latency_us"] = after_latency.to_json();
    if !result["latency_ratio"].is_null() {
        let p99 = result["latency_us"]["p99"].as_f64().unwrap_or(f64::NAN);
        let before_p99 = result["baseline_latency_us"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN);
        result["latency_ratio"] = json!(ratio(p99, (before_p99 + after_latency.p99) / 2.0));
    }
}

/// The median throughput of `runs` and the run closest to it (the lower of the middle two for
/// an even count), whose latencies a summary reports.
fn median_round(runs: &[Value]) -> Option<(f64, usize)> {
    let throughputs: Vec<f64> = runs
        .iter()
        .map(|r| r["throughput_mb_s"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let mid = median(&throughputs)?;
    let pick = (0..runs.len())
        .min_by(|&a, &b| {
            (throughputs[a] - mid)
                .abs()
                .total_cmp(&(throughputs[b] - mid).abs())
        })
        .expect("a median implies a run");
    Some((mid, pick))
}

/// Runs compared with a reference configuration (`keel-bench engine --compare-partitions`):
/// `reference` holds one run per round plus a closing one, `compared[j]` one run per round of
/// configuration j. Round i of configuration j divides its throughput by the mean of reference
/// runs i and i + 1 (taken just before and just after it, as `bracket` does for the device);
/// each configuration reports the median of those ratios and of its throughputs, with the
/// latencies of its median-throughput round. The result is the reference runs' summary
/// (`summarize_rounds` over all of them) with a `compared` array.
pub fn compare_to_reference(reference: &[Value], compared: &[Vec<Value>]) -> Option<Value> {
    let mut out = summarize_rounds(reference)?;
    out["mode"] = json!("engine-partitions");
    let reference_mb_s: Vec<f64> = reference
        .iter()
        .map(|r| r["throughput_mb_s"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let mut list = Vec::new();
    for runs in compared {
        let mut rounds = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            let throughput = r["throughput_mb_s"].as_f64().unwrap_or(f64::NAN);
            let around = match (reference_mb_s.get(i), reference_mb_s.get(i + 1)) {
                (Some(a), Some(b)) => (a + b) / 2.0,
                (Some(a), None) => *a,
                _ => f64::NAN,
            };
            rounds.push(json!({
                "throughput_mb_s": throughput,
                "reference_mb_s": around,
                "ratio": ratio(throughput, around),
                "latency_p99_us": r["latency_us"]["p99"],
            }));
        }
        let column =
            |key: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[key].as_f64()).collect() };
        let Some((median_mb_s, pick)) = median_round(runs) else {
            continue;
        };
        let first = &runs[0];
        list.push(json!({
            "partitions": first["config"]["partitions"],
            "concurrency": first["config"]["concurrency"],
            "throughput_mb_s": median_mb_s,
            "ratio": median(&column("ratio")),
            "latency_us": runs[pick]["latency_us"],
            "median_round": pick,
            "rounds": rounds,
        }));
    }
    out["compared"] = Value::Array(list);
    out["reference_runs_mb_s"] = json!(reference_mb_s);
    Some(out)
}

/// One result from several interleaved rounds of the same measurement: each figure in
/// `round_figures` is the median over the rounds (a ratio is the median of the per-round ratios,
/// each taken between measurements seconds apart, not a ratio of medians); the latency
/// distributions and timelines are those of the round whose throughput is the median
/// (`median_round`); `rounds` lists every round's figures.
pub fn summarize_rounds(rounds: &[Value]) -> Option<Value> {
    let (_, pick) = median_round(rounds)?;
    let mut out = rounds[pick].clone();
    let mut listed = Vec::with_capacity(rounds.len());
    for r in rounds {
        let mut figures = serde_json::Map::new();
        for key in round_figures {
            if !r[key].is_null() {
                figures.insert(key.to_string(), r[key].clone());
            }
        }
        figures.insert("latency_p99_us".into(), r["latency_us"]["p99"].clone());
        if !r["ratio_range"].is_null() {
            figures.insert("ratio_range".into(), r["ratio_range"].clone());
        }
        listed.push(Value::Object(figures));
    }
    // A range belongs to its round; the summary's ratio is a median over rounds.
    if let Some(o) = out.as_object_mut() {
        o.remove("ratio_range");
    }
    for key in round_figures {
        let values: Vec<f64> = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
        if let Some(m) = median(&values) {
            out[key] = json!(m);
        }
    }
    out["median_round"] = json!(pick);
    out["rounds"] = Value::Array(listed);
    Some(out)
}

pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        0.0
    } else {
        bytes as f64 / seconds / 1_000_000.0
    }
}

/// Parse `10s`, `250ms`, `2m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {text:?} (use ms, s or m)")),
    };
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// A measured run's length: a duration above zero (a run of none measures nothing).
pub fn parse_run_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("a run must last longer than 0 s".to_string());
    }
    Ok(duration)
}

/// Parse `4096`, `64k`, `64KiB`, `1m`, `1MiB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (number, unit) = lower
        .find(|c: char| !c.is_ascii_digit())
        .map_or((lower.as_str(), ""), |i| lower.split_at(i));
    let value: u64 = number.parse().map_err(|_| format!("bad size {text:?}"))?;
    let multiplier = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(format!("bad size unit in {text:?}")),
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// A count that must be at least 1: partitions, producers, appends or requests in flight,
/// records per batch, queue depth.
pub fn parse_count<T: TryFrom<u64>>(text: &str) -> Result<T, String> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("bad count {text:?}"))?;
    if n == 0 {
        return Err("must be at least 1".to_string());
    }
    T::try_from(n).map_err(|_| format!("count {text:?} is too large"))
}

/// The size of an O_DIRECT write: a non-zero multiple of the 4 KiB block.
pub fn parse_block_bytes(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if bytes == 0 || !bytes.is_multiple_of(4096) {
        return Err(format!(
            "{bytes} B: O_DIRECT writes need a non-zero multiple of 4 KiB"
        ));
    }
    Ok(bytes)
}

/// The smallest `--batch-bytes`: a RecordBatch's 61-byte header and a record.
pub const min_batch_bytes: u64 = 64;

/// The size of an appended batch, header included: at least [`min_batch_bytes`].
pub fn parse_batch_bytes(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if bytes < min_batch_bytes {
        return Err(format!(
            "{bytes} B: a batch is at least {min_batch_bytes} B (a 61-byte header and a record)"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_merge_and_ratios() {
        let mut a = histogram();
        let mut b = histogram();
        for v in 1..=900 {
            a.record(v).unwrap();
        }
        for v in 901..=1000 {
            b.record(v).unwrap();
        }
        a.add(&b).unwrap();
        let p = Percentiles::of(&a);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() <= 1.0, "{p:?}");
        assert_eq!(p.max, 1000.0);
        assert_eq!(ratio(1.0, 4.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(mb_per_s(2_000_000, 2.0), 1.0);
    }

    #[test]
    fn rounds_report_medians_of_per_round_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[]), None);
        let round = |mb: f64, base: f64, p99: f64| {
            json!({ "mode": "engine", "throughput_mb_s": mb, "baseline_mb_s": base,
                    "ratio": mb / base, "latency_us": { "p99": p99 } })
        };
        // The baseline drifts: the per-round ratios (0.9, 0.5, 0.8) have median 0.8, while the
        // ratio of the medians would be 900 / 1000.
        let rounds = [
            round(900.0, 1000.0, 10.0),
            round(1000.0, 2000.0, 20.0),
            round(400.0, 500.0, 30.0),
        ];
        let s = summarize_rounds(&rounds).unwrap();
        assert_eq!(s["throughput_mb_s"], 900.0);
        assert_eq!(s["baseline_mb_s"], 1000.0);
        assert!((s["ratio"].as_f64().unwrap() - 0.8).abs() < 1e-12, "{s}");
        assert_eq!(s["median_round"], 0);
        assert_eq!(s["latency_us"]["p99"], 10.0);
        assert_eq!(s["rounds"].as_array().unwrap().len(), 3);
        assert_eq!(s["rounds"][2]["latency_p99_us"], 30.0);
        assert!(s.get("engine_ratio").is_none());
        assert!(summarize_rounds(&[]).is_none());
    }

    #[test]
    fn a_bracketed_run_divides_by_the_mean_of_the_baselines_around_it() {
        let latency = |p99: f64| Percentiles {
            p99,
            ..Default::default()
        };
        let mut r = json!({ "mode": "engine", "throughput_mb_s": 900.0, "baseline_mb_s": 1200.0,
                            "ratio": 0.75, "latency_ratio": 2.0,
                            "latency_us": { "p99": 600.0 }, "baseline_latency_us": { "p99": 300.0 } });
        // The device slowed from 1200 to 800 MB/s during the run: it averaged about 1000.
        bracket(&mut r, 800.0, latency(500.0));
        assert_eq!(r["baseline_mb_s"], 1000.0);
        assert_eq!(r["baseline_before_mb_s"], 1200.0);
        assert_eq!(r["baseline_after_mb_s"], 800.0);
        assert!((r["ratio"].as_f64().unwrap() - 0.9).abs() < 1e-12, "{r}");
        assert!(
            (r["ratio_before"].as_f64().unwrap() - 0.75).abs() < 1e-12,
            "{r}"
        );
        // 400 MB/s apart around a mean of 1000: 40% drift; 900 / 1200 .. 900 / 800.
        assert!(
            (r["baseline_drift"].as_f64().unwrap() - 0.4).abs() < 1e-12,
            "{r}"
        );
        assert!(
            (r["ratio_range"][0].as_f64().unwrap() - 0.75).abs() < 1e-12,
            "{r}"
        );
        assert!(
            (r["ratio_range"][1].as_f64().unwrap() - 1.125).abs() < 1e-12,
            "{r}"
        );
        assert!(
            (r["latency_ratio"].as_f64().unwrap() - 1.5).abs() < 1e-12,
            "{r}"
        );
        assert_eq!(r["baseline_after_latency_us"]["p99"], 500.0);

        // A broker result has no latency ratio, and a run without a baseline is left alone.
        let mut b = json!({ "mode": "broker", "throughput_mb_s": 300.0, "baseline_mb_s": 1000.0,
                            "ratio": 0.3, "latency_ratio": null, "latency_us": { "p99": 1.0 } });
        bracket(&mut b, 2000.0, latency(1.0));
        assert!((b["ratio"].as_f64().unwrap() - 0.2).abs() < 1e-12, "{b}");
        assert!(b["latency_ratio"].is_null());
        let mut none = json!({ "mode": "engine", "throughput_mb_s": 300.0, "baseline_mb_s": 0.0,
                               "ratio": null });
        let before = none.clone();
        bracket(&mut none, 2000.0, latency(1.0));
        assert_eq!(none, before);
    }

    #[test]
    fn compared_runs_divide_by_the_reference_runs_around_them() {
        let run = |partitions: u32, mb: f64| {
            json!({ "mode": "engine", "config": { "partitions": partitions, "concurrency": 256 },
                    "throughput_mb_s": mb, "latency_us": { "p99": mb } })
        };
        // The reference drifts from 800 to 1200 MB/s; the compared runs sit between.
        let reference = [run(1, 800.0), run(1, 1000.0), run(1, 1200.0)];
        let compared = vec![vec![run(256, 720.0), run(256, 990.0)]];
        let out = compare_to_reference(&reference, &compared).unwrap();
        assert_eq!(out["mode"], "engine-partitions");
        let c = &out["compared"][0];
        assert_eq!(c["partitions"], 256);
        // 720 / 900 = 0.8 and 990 / 1100 = 0.9: median 0.85.
        assert!((c["ratio"].as_f64().unwrap() - 0.85).abs() < 1e-12, "{out}");
        assert_eq!(c["rounds"][1]["reference_mb_s"], 1100.0);
        assert_eq!(c["throughput_mb_s"], 855.0);
        assert_eq!(out["reference_runs_mb_s"], json!([800.0, 1000.0, 1200.0]));
        assert!(compare_to_reference(&[], &compared).is_none());
    }

    #[test]
    fn units() {
        assert_eq!(parse_bytes("64k").unwrap(), 65536);
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("4q").is_err());
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("3").unwrap().as_secs(), 3);
        assert!(parse_duration("3h").is_err());
        assert!(parse_bytes("99999999999999g").is_err(), "overflow");
        assert_eq!(parse_count::<u32>("3"), Ok(3));
        assert!(parse_count::<u32>("0").is_err());
        assert!(parse_count::<i32>("3000000000").is_err());
        assert_eq!(parse_block_bytes("64KiB"), Ok(65536));
        assert!(parse_block_bytes("1000").is_err() && parse_block_bytes("0").is_err());
        assert_eq!(parse_batch_bytes("64"), Ok(64));
        assert!(parse_batch_bytes("63").is_err());
        assert!(parse_run_duration("0s").is_err() && parse_run_duration("1ms").is_ok());
    }
}

/// Per-interval throughput and latency over a run (for latency-over-time charts).
#[derive(Clone, Debug)]
pub struct Timeline {
    start: std::time::Instant,
    width: std::time::Duration,
    buckets: Vec<(u64, Histogram<u64>)>,
}

impl Timeline {
    pub fn new(start: std::time::Instant, width: std::time::Duration) -> Timeline {
        Timeline {
            start,
            width,
            buckets: Vec::new(),
        }
    }

    /// One completed operation of `bytes` at `at`, which took `latency_us`.
    pub fn record(&mut self, at: std::time::Instant, bytes: u64, latency_us: u64) {
        let Some(since) = at.checked_duration_since(self.start) else {
            return;
        };
        let i = (since.as_secs_f64() / self.width.as_secs_f64()) as usize;
        while self.buckets.len() <= i {
            self.buckets.push((0, histogram()));
        }
        self.buckets[i].0 += bytes;
        self.buckets[i].1.record(latency_us.max(1)).ok();
    }

    pub fn merge(&mut self, other: &Timeline) {
        for (i, (bytes, h)) in other.buckets.iter().enumerate() {
            while self.buckets.len() <= i {
                self.buckets.push((0, histogram()));
            }
            self.buckets[i].0 += bytes;
            self.buckets[i].1.add(h).ok();
        }
    }

    /// `[{t_s, mb_s, p50, p99, max, count}]`, one entry per interval.
    pub fn to_json(&self) -> Value {
        let w = self.width.as_secs_f64();
        Value::Array(
            self.buckets
                .iter()
                .enumerate()
                .map(|(i, (bytes, h))| {
                    let p = Percentiles::of(h);
                    json!({ "t_s": i as f64 * w, "mb_s": mb_per_s(*bytes, w), "p50": p.p50, "p99": p.p99, "max": p.max, "count": p.count })
                })
                .collect(),
        )
    }
}

/// Points of the latency distribution for a percentile chart: `[[percentile, µs], ...]` from p0
/// to the max, denser in the tail (1 − q halves each step).
pub fn percentile_curve(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Array(Vec::new());
    }
    let mut points = Vec::new();
    let mut q = 0.0f64;
    while q < 0.99999 {
        points.push(json!([q * 100.0, h.value_at_quantile(q) as f64]));
        q = 1.0 - (1.0 - q) / 2.0_f64.sqrt();
    }
    points.push(json!([100.0, h.max() as f64]));
    Value::Array(points)
}

#[cfg(test)]
mod timeline_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn timeline_buckets_and_merges() {
        let start = Instant::now();
        let mut a = Timeline::new(start, Duration::from_secs(1));
        let mut b = Timeline::new(start, Duration::from_secs(1));
        a.record(start + Duration::from_millis(100), 1_000_000, 10);
        b.record(start + Duration::from_millis(1500), 2_000_000, 30);
        b.record(start + Duration::from_millis(1600), 2_000_000, 50);
        a.merge(&b);
        let j = a.to_json();
        assert_eq!(j.as_array().unwrap().len(), 2);
        assert_eq!(j[0]["mb_s"], 1.0);
        assert_eq!(j[1]["mb_s"], 4.0);
        assert_eq!(j[1]["count"], 2);
        assert!((j[1]["max"].as_f64().unwrap() - 50.0).abs() < 1.0);
        let mut h = histogram();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let curve = percentile_curve(&h);
        let pts = curve.as_array().unwrap();
        assert_eq!(pts.last().unwrap()[0], 100.0);
        assert!(
            pts.windows(2).all(|w| w[0][1].as_f64() <= w[1][1].as_f64()),
            "monotone"
        );
    }
}

/// A live line on stderr with the current MB/s while a load runs; silent when stderr is not a
/// terminal (CI logs, redirected output).
#[derive(Debug)]
pub struct Progress {
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(label: &str, total: std::time::Duration) -> Progress {
        use std::io::IsTerminal;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let (bytes, stop) = (bytes.clone(), stop.clone());
            let label = label.to_string();
            std::thread::spawn(move || {
                let bar = indicatif::ProgressBar::new(total.as_millis() as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed} {msg}")
                        .expect("a valid template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(label);
                let start = std::time::Instant::now();
                let (mut last_bytes, mut last_at) = (0u64, start);
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    let (now, b) = (std::time::Instant::now(), bytes.load(Ordering::Relaxed));
                    let rate = mb_per_s(b - last_bytes, now.duration_since(last_at).as_secs_f64());
                    bar.set_position(now.duration_since(start).as_millis() as u64);
                    bar.set_message(format!("{rate:.0} MB/s"));
                    (last_bytes, last_at) = (b, now);
                }
                bar.finish_and_clear();
            })
        });
        Progress {
            bytes,
            stop,
            thread,
        }
    }

    /// Count bytes done (any thread).
    pub fn counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.bytes.clone()
    }

    pub fn finish(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}
