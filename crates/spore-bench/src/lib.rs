//! Benchmark harness: statistics (p50/p99), result files (CSV, JSON), plots (PNG), the
//! workloads behind `spore bench`, and ([`drivers`]) the benchmark and demo commands
//! themselves, which drive a daemon over HTTP.
//!
//! Every benchmark measures its baseline in the same run and reports ratios next to absolute
//! figures. Results go under `bench-results/<bench>/`.
//!
//! Linux only. Errors: [`BenchError`] in the measurement modules; `anyhow` in [`drivers`]
//! (see there why).
#![forbid(unsafe_code)]

pub mod burst;
pub mod cold_start;
pub mod cpu;
pub mod density;
pub mod drivers;
pub mod floor;
pub mod functionbench;
pub mod ipc;
pub mod memory_restore;
pub mod plot;
pub mod snapshot;
pub mod throughput;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Writing results failed.
    #[error("Cannot write benchmark results to {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the daemon failed.
    #[error("Request to the daemon failed: {0}")]
    Http(String),
    /// The system under test misbehaved (wrong start kind, function error, ...).
    #[error("Benchmark check failed: {0}")]
    Check(String),
    /// Drawing the plot failed.
    #[error("Cannot draw the plot: {0}")]
    Plot(String),
}

/// One measured series.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Label.
    pub name: String,
    /// Samples, milliseconds.
    pub samples_ms: Vec<f64>,
}

/// Summary statistics of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples (NaN fields for an empty series).
pub fn summarize(samples: &[f64]) -> Summary {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Summary {
        n,
        p50: percentile(&s, 50.0),
        p99: percentile(&s, 99.0),
        mean: if n == 0 {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / n as f64
        },
        min: s.first().copied().unwrap_or(f64::NAN),
        max: s.last().copied().unwrap_or(f64::NAN),
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0} us", ms * 1000.0)
    } else {
        format!("{ms:.2} ms")
    }
}

/// A Markdown table of the series with each p50 as a ratio to the `baseline` series' p50
/// (`baseline / series` when the series is faster, shown as `N.Nx faster`; else `slower`).
pub fn table(series: &[Series], baseline: &str) -> String {
    table_with_floor(series, baseline, None)
}

/// [`table`] with one more column when `floor` names a series: each p50 and p99 as a multiple
/// of the floor's p50 (`1.0x` is the floor itself; what no design can beat on this machine).
pub fn table_with_floor(series: &[Series], baseline: &str, floor: Option<&str>) -> String {
    let p50_of = |name: &str| {
        series
            .iter()
            .find(|s| s.name == name)
            .map(|s| summarize(&s.samples_ms).p50)
    };
    let base = p50_of(baseline);
    let floor_p50 = floor.and_then(p50_of).filter(|f| *f > 0.0);
    let mut out = String::from("| series | n | p50 | p99 | mean | vs ");
    out.push_str(baseline);
    out.push_str(" (p50) |");
    if floor_p50.is_some() {
        out.push_str(" x floor (p50 / p99) |");
    }
    out.push_str("\n|---|---:|---:|---:|---:|---:|");
    if floor_p50.is_some() {
        out.push_str("---:|");
    }
    out.push('\n');
    for s in series {
        let sum = summarize(&s.samples_ms);
        let ratio = match base {
            Some(_) if s.name == baseline => "baseline".to_owned(),
            Some(b) if sum.p50 > 0.0 && b >= sum.p50 => format!("{:.1}x faster", b / sum.p50),
            Some(b) if b > 0.0 => format!("{:.1}x slower", sum.p50 / b),
            _ => "-".to_owned(),
        };
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            s.name,
            sum.n,
            fmt_ms(sum.p50),
            fmt_ms(sum.p99),
            fmt_ms(sum.mean),
            ratio
        );
        if let Some(f) = floor_p50 {
            if floor == Some(s.name.as_str()) {
                out.push_str(" floor |");
            } else {
                let _ = write!(out, " {:.2}x / {:.2}x |", sum.p50 / f, sum.p99 / f);
            }
        }
        out.push('\n');
    }
    out
}

/// Paths of a benchmark's result files.
#[derive(Debug, Clone)]
pub struct ResultFiles {
    /// Raw samples.
    pub csv: PathBuf,
    /// Summary and metadata.
    pub json: PathBuf,
    /// The Markdown table.
    pub markdown: PathBuf,
}

/// Writes `samples.csv` (series,i,ms), `summary.json` and `table.md` under `dir`.
pub fn write_results(
    dir: &Path,
    bench: &str,
    series: &[Series],
    table_md: &str,
    meta: serde_json::Value,
) -> Result<ResultFiles, BenchError> {
    // Quoted as RFC 4180 says when a series name holds a comma, a quote or a line break; three
    // columns of our own making do not warrant a CSV crate.
    fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\"")).into()
        } else {
            s.into()
        }
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BenchError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let csv = dir.join("samples.csv");
    let mut text = String::from("series,iteration,latency_ms\n");
    for s in series {
        for (i, v) in s.samples_ms.iter().enumerate() {
            let _ = writeln!(text, "{},{i},{v:.6}", csv_field(&s.name));
        }
    }
    std::fs::write(&csv, text).map_err(io(&csv))?;
    let json = dir.join("summary.json");
    let summaries: Vec<_> = series
        .iter()
        .map(|s| serde_json::json!({ "series": s.name, "summary": summarize(&s.samples_ms) }))
        .collect();
    let doc = serde_json::json!({ "bench": bench, "meta": meta, "series": summaries });
    std::fs::write(&json, serde_json::to_vec_pretty(&doc).expect("json")).map_err(io(&json))?;
    let markdown = dir.join("table.md");
    std::fs::write(&markdown, table_md).map_err(io(&markdown))?;
    Ok(ResultFiles {
        csv,
        json,
        markdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let sum = summarize(&s);
        assert_eq!(
            (sum.n, sum.p50, sum.p99, sum.min, sum.max),
            (100, 50.0, 99.0, 1.0, 100.0)
        );
        assert_eq!(summarize(&[7.0]).p99, 7.0);
        assert!(summarize(&[]).p50.is_nan());
    }

    #[test]
    fn table_ratios() {
        let series = vec![
            Series {
                name: "base".into(),
                samples_ms: vec![10.0; 5],
            },
            Series {
                name: "fast".into(),
                samples_ms: vec![2.0; 5],
            },
            Series {
                name: "slow".into(),
                samples_ms: vec![40.0; 5],
            },
        ];
        let t = table(&series, "base");
        assert!(
            t.contains("| fast | 5 | 2.00 ms | 2.00 ms | 2.00 ms | 5.0x faster |"),
            "{t}"
        );
        assert!(t.contains("4.0x slower"));
        assert!(t.contains("| base | 5 | 10.00 ms | 10.00 ms | 10.00 ms | baseline |"));
        let t = table_with_floor(&series, "base", Some("fast"));
        assert!(t.contains("x floor"), "{t}");
        assert!(
            t.contains(
                "| slow | 5 | 40.00 ms | 40.00 ms | 40.00 ms | 4.0x slower | 20.00x / 20.00x |"
            ),
            "{t}"
        );
        assert!(t.contains("5.0x faster | floor |"), "{t}");
    }

    #[test]
    fn writes_files() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            Series {
                name: "a".into(),
                samples_ms: vec![1.0, 2.0],
            },
            Series {
                name: "b, \"apart\"".into(),
                samples_ms: vec![3.0],
            },
        ];
        let files = write_results(dir.path(), "t", &series, "x", serde_json::json!({})).unwrap();
        let csv = std::fs::read_to_string(files.csv).unwrap();
        assert_eq!(csv.lines().count(), 4);
        assert_eq!(csv.lines().nth(1), Some("a,0,1.000000"));
        // A name with a comma and quotes stays one field.
        assert_eq!(csv.lines().nth(3), Some("\"b, \"\"apart\"\"\",0,3.000000"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(files.json).unwrap()).unwrap();
        assert_eq!(json["series"][0]["summary"]["n"], 2);
    }
}
