//! PNG plots of latency distributions (CDFs on a logarithmic time axis).

use std::path::Path;

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;

use crate::{BenchError, Series};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn ensure_font() -> Result<(), BenchError> {
    static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| {
                format!(
                    "no DejaVu font found (looked in {FONT_PATHS:?}); install fonts-dejavu-core"
                )
            })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "unreadable font file".to_owned())
    })
    .clone()
    .map_err(BenchError::Plot)
}

/// Tick values between `lo` and `hi` on a 1-2-5 sequence, so that a narrow range (a few ms)
/// gets several labels, not one power of ten.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    if out.len() < 4 {
        // Fewer than four: add the midpoints of each step too.
        let more: Vec<f64> = out.windows(2).map(|w| (w[0] * w[1]).sqrt()).collect();
        out.extend(more);
        out.sort_by(f64::total_cmp);
    }
    out
}

/// Draws the CDF of each series into a PNG at `path`.
pub fn cdf(path: &Path, title: &str, series: &[Series]) -> Result<(), BenchError> {
    ensure_font()?;
    let err = |e: &dyn std::fmt::Display| BenchError::Plot(e.to_string());
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.samples_ms.iter().copied())
        .filter(|v| *v > 0.0)
        .collect();
    if all.is_empty() {
        return Err(BenchError::Plot("no samples to plot".into()));
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min) * 0.8;
    let hi = all.iter().copied().fold(0.0, f64::max) * 1.25;
    // The legend goes in a strip below the chart, where it covers no curve.
    let legend_h = 30 + 24 * series.len().div_ceil(2) as u32;
    let root = BitMapBackend::new(path, (1000, 620 + legend_h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (plot_area, legend_area) = root.split_vertically(620);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(ticks(lo, hi)),
            0.0..1.0,
        )
        .map_err(|e| err(&e))?;
    let fmt = |v: &f64| {
        if *v >= 100.0 {
            format!("{v:.0}")
        } else if *v >= 1.0 {
            format!("{v:.1}")
        } else if *v >= 0.01 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        }
    };
    chart
        .configure_mesh()
        .x_label_formatter(&fmt)
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of requests")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let mut v: Vec<f64> = s.samples_ms.iter().copied().filter(|x| *x > 0.0).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let color = Palette99::pick(i).to_rgba().stroke_width(3);
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .map(|(k, x)| (*x, (k + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color))
            .map_err(|e| err(&e))?;
        let (col, row) = (i % 2, i / 2);
        let (x, y) = (70 + 470 * col as i32, 18 + 24 * row as i32);
        legend_area
            .draw(&PathElement::new(vec![(x, y), (x + 28, y)], color))
            .map_err(|e| err(&e))?;
        legend_area
            .draw(&Text::new(
                format!("{} (n={})", s.name, v.len()),
                (x + 36, y - 9),
                ("sans-serif", 16),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cdf_plot_is_drawn() {
        if ensure_font().is_err() {
            eprintln!("SKIP a_cdf_plot_is_drawn: no DejaVu font (fonts-dejavu-core)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cdf.png");
        let series: Vec<Series> = (0..5)
            .map(|i| Series {
                name: format!("series {i}"),
                samples_ms: (1..200)
                    .map(|k| f64::from(k) * 0.01 * f64::from(i + 1))
                    .collect(),
            })
            .collect();
        cdf(&path, "test", &series).unwrap();
        let keep = std::env::var_os("SPORE_KEEP_PLOT").map(std::path::PathBuf::from);
        if let Some(k) = keep {
            std::fs::copy(&path, k).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() > 10_000);
    }
}
