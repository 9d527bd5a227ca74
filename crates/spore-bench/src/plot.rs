//! PNG plots of latency distributions (CDFs on a logarithmic time axis).

use std::path::Path;

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
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
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
            .map_err(|e| err(&e))?
            .label(format!("{} (n={})", s.name, v.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
