//! `keel-bench plot`: SVG charts from result files: latency over time (p50, p99 per second) and
//! the latency distribution on a "nines" scale (p50 … p99.999, max).
//!
//! A small SVG writer rather than the plotters crate: plotters needs a font backend to lay out
//! text (system libraries or a bundled font file); SVG leaves text to the viewer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

const width: f64 = 800.0;
const height: f64 = 450.0;
const margin_left: f64 = 80.0;
const margin_right: f64 = 150.0;
const margin_top: f64 = 40.0;
const margin_bottom: f64 = 50.0;
const colors: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// One line: its name and its points.
pub type Series = (String, Vec<(f64, f64)>);

/// How the x axis is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    Linear,
    /// x is a percentile (0–100), drawn as the number of nines: 90 → 1, 99 → 2, 99.9 → 3.
    Nines,
}

fn nines(p: f64) -> f64 {
    let rest = (1.0 - p / 100.0).max(1e-6);
    -rest.log10()
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart as an SVG document.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_axis: XAxis,
    series: &[Series],
) -> String {
    let tx = |x: f64| if x_axis == XAxis::Nines { nines(x) } else { x };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, y)| (tx(x), y)))
        .collect();
    let x_max = match x_axis {
        XAxis::Linear => nice_max(all.iter().map(|p| p.0).fold(0.0, f64::max)),
        XAxis::Nines => all.iter().map(|p| p.0).fold(1.0, f64::max).ceil(),
    };
    let y_max = nice_max(all.iter().map(|p| p.1).fold(0.0, f64::max));
    let plot_w = width - margin_left - margin_right;
    let plot_h = height - margin_top - margin_bottom;
    let px = |x: f64| margin_left + x / x_max * plot_w;
    let py = |y: f64| margin_top + plot_h - y / y_max * plot_h;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    // Axes, grid and ticks.
    let _ = writeln!(
        svg,
        r#"<path d="M{l},{t} V{b} H{r}" stroke="black" fill="none"/>"#,
        l = margin_left,
        t = margin_top,
        b = margin_top + plot_h,
        r = margin_left + plot_w
    );
    for i in 0..=5 {
        let y = y_max * i as f64 / 5.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{}" x2="{}" y1="{py}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            margin_left,
            margin_left + plot_w,
            margin_left - 6.0,
            py(y) + 4.0,
            if y >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            },
            py = py(y)
        );
    }
    let x_ticks: Vec<(f64, String)> = match x_axis {
        XAxis::Linear => (0..=5)
            .map(|i| x_max * i as f64 / 5.0)
            .map(|x| (x, format!("{x:.0}")))
            .collect(),
        XAxis::Nines => (0..=x_max as usize)
            .map(|n| {
                let label = if n == 0 {
                    "0".to_string()
                } else {
                    format!("{}", 100.0 - 100.0 / 10f64.powi(n as i32))
                };
                (n as f64, label)
            })
            .collect(),
    };
    for (x, label) in x_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            margin_top + plot_h + 18.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        margin_left + plot_w / 2.0,
        height - 10.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        margin_top + plot_h / 2.0,
        margin_top + plot_h / 2.0,
        escape(y_label)
    );
    // Lines and legend.
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let d: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(tx(x)), py(y)))
            .collect();
        if !d.is_empty() {
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                d.join(" ")
            );
        }
        let ly = margin_top + 20.0 * i as f64 + 10.0;
        let lx = margin_left + plot_w + 15.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn points(v: &Value, x: &str, y: &str) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[x].as_f64()?, p[y].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn curve(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Charts for one result (a `broker` or `engine` run); returns the files written.
pub fn plot_result(result: &Value, out: &Path, stem: &str) -> Result<Vec<PathBuf>, String> {
    let mode = result["mode"].as_str().unwrap_or("run");
    let label = match mode {
        "broker" => "produce",
        _ => "append",
    };
    let mut written = Vec::new();
    let timeline = &result["timeline"];
    if timeline.as_array().is_some_and(|a| !a.is_empty()) {
        let series = vec![
            (format!("{label} p50"), points(timeline, "t_s", "p50")),
            (format!("{label} p99"), points(timeline, "t_s", "p99")),
        ];
        let svg = line_chart(
            &format!("keel-bench {mode}: latency over time"),
            "seconds",
            "µs",
            XAxis::Linear,
            &series,
        );
        let path = out.join(format!("{stem}-latency-over-time.svg"));
        std::fs::write(&path, svg).map_err(|e| format!("write {}: {e}", path.display()))?;
        written.push(path);
        let series = vec![("MB/s".to_string(), points(timeline, "t_s", "mb_s"))];
        let svg = line_chart(
            &format!("keel-bench {mode}: throughput over time"),
            "seconds",
            "MB/s",
            XAxis::Linear,
            &series,
        );
        let path = out.join(format!("{stem}-throughput-over-time.svg"));
        std::fs::write(&path, svg).map_err(|e| format!("write {}: {e}", path.display()))?;
        written.push(path);
    }
    let mut series = Vec::new();
    for (key, name) in [
        ("latency_curve", label),
        ("e2e_latency_curve", "end-to-end"),
    ] {
        let c = curve(&result[key]);
        if !c.is_empty() {
            series.push((name.to_string(), c));
        }
    }
    if !series.is_empty() {
        let svg = line_chart(
            &format!("keel-bench {mode}: latency by percentile"),
            "percentile",
            "µs",
            XAxis::Nines,
            &series,
        );
        let path = out.join(format!("{stem}-percentiles.svg"));
        std::fs::write(&path, svg).map_err(|e| format!("write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Charts for every result in `files` (a sweep file gives one set per run).
pub fn plot_files(files: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut written = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).map_err(|e| format!("read {}: {e}", file.display()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("result")
            .to_string();
        match value["runs"].as_array() {
            Some(runs) => {
                for (i, run) in runs.iter().enumerate() {
                    written.extend(plot_result(run, out, &format!("{stem}-{i}"))?);
                }
            }
            None => written.extend(plot_result(&value, out, &stem)?),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_every_series() {
        let svg = line_chart(
            "t",
            "x",
            "y",
            XAxis::Nines,
            &[
                (
                    "a<b".into(),
                    vec![(50.0, 10.0), (99.0, 20.0), (100.0, 30.0)],
                ),
                ("c".into(), vec![]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("a&lt;b"));
        assert!(
            svg.contains(">99.9<") || svg.contains(">99<"),
            "nines ticks"
        );
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nice_max(730.0), 1000.0);
        assert_eq!(nice_max(180.0), 200.0);
    }
}
