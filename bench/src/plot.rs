//! `keel-bench plot`: SVG charts from result files: latency over time (p50, p99 per second) and
//! the latency distribution on a "nines" scale (p50 … p99.999, max), drawn with plotters' SVG
//! backend. Its text is left to the viewer (no font library is linked, so no PNG: a bitmap
//! needs glyphs rendered by a font backend).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

const size: (u32, u32) = (800, 450);
const colors: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

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

/// The percentile at `n` nines: 1 → 90, 2 → 99, 3 → 99.9.
fn percentile_at(n: f64) -> String {
    if n <= 0.0 {
        "0".to_string()
    } else {
        format!("{}", 100.0 - 100.0 / 10f64.powi(n.round() as i32))
    }
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

/// A line to draw: its name, colour and points in chart coordinates.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// A line chart as an SVG document.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_axis: XAxis,
    series: &[Series],
) -> Result<String, String> {
    let tx = |x: f64| if x_axis == XAxis::Nines { nines(x) } else { x };
    // Colours follow the series' places, so a series without points leaves its colour unused.
    let lines: Vec<Line> = series
        .iter()
        .enumerate()
        .filter(|(_, (_, points))| !points.is_empty())
        .map(|(i, (name, points))| {
            let points = points.iter().map(|&(x, y)| (tx(x), y)).collect();
            (name.as_str(), colors[i % colors.len()], points)
        })
        .collect();
    let all = || lines.iter().flat_map(|(_, _, points)| points.iter());
    let x_max = match x_axis {
        XAxis::Linear => nice_max(all().map(|p| p.0).fold(0.0, f64::max)),
        XAxis::Nines => all().map(|p| p.0).fold(1.0, f64::max).ceil(),
    };
    let y_max = nice_max(all().map(|p| p.1).fold(0.0, f64::max));
    let mut svg = String::new();
    draw(
        &mut svg,
        title,
        (x_label, y_label),
        x_axis,
        &lines,
        (x_max, y_max),
    )
    .map_err(|e| format!("chart {title:?}: {e}"))?;
    Ok(svg)
}

fn draw(
    svg: &mut String,
    title: &str,
    (x_label, y_label): (&str, &str),
    x_axis: XAxis,
    lines: &[Line],
    (x_max, y_max): (f64, f64),
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(err)?;
    let percentile = |x: &f64| percentile_at(*x);
    let value = |y: &f64| {
        if y_max >= 100.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.1}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .y_label_formatter(&value);
    if x_axis == XAxis::Nines {
        mesh.x_labels(x_max as usize + 1)
            .x_label_formatter(&percentile);
    }
    mesh.draw().map_err(err)?;
    for &(name, color, ref points) in lines {
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
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
        )?;
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
        )?;
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
        )?;
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
                    vec![(50.0, 10.0), (99.0, 20.0), (99.99, 30.0)],
                ),
                ("c".into(), vec![]),
            ],
        )
        .unwrap();
        assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // The series with points: its line and its legend sample; none for the empty one.
        assert_eq!(svg.matches(r##"stroke="#1F77B4""##).count(), 2, "{svg}");
        assert_eq!(svg.matches(r##"stroke="#D62728""##).count(), 0, "{svg}");
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
            .collect();
        assert!(texts.contains(&"a&lt;b"), "{texts:?}");
        assert!(!texts.contains(&"c"), "{texts:?}");
        for tick in ["90", "99", "99.9", "99.99"] {
            assert!(texts.contains(&tick), "nines tick {tick}: {texts:?}");
        }
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(percentile_at(3.0), "99.9");
        assert_eq!(nice_max(730.0), 1000.0);
        assert_eq!(nice_max(180.0), 200.0);
    }
}
