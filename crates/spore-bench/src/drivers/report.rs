//! How the drivers hand in their results: files under `--out/<bench>/`, a plot, the table
//! on stdout.

use std::path::Path;

use anyhow::Result;

use crate::Series;

/// Writes a benchmark's results under `out/<bench>/` (CSV, JSON, Markdown, and a CDF plot of
/// `plotted` titled `title`), then prints the table and where the files went.
pub(crate) fn save_and_print(
    out: &Path,
    bench: &str,
    series: &[Series],
    table: &str,
    meta: serde_json::Value,
    (title, plotted): (&str, &[Series]),
) -> Result<()> {
    let dir = out.join(bench);
    let files = crate::write_results(&dir, bench, series, table, meta)?;
    let png = dir.join(format!("{bench}.png"));
    plot(&png, title, plotted);
    println!("{table}");
    println!(
        "results: {}, {}, {}",
        files.csv.display(),
        files.json.display(),
        files.markdown.display()
    );
    Ok(())
}

/// Draws a CDF plot of `series` to `png`, saying on stderr where it went or why it did not.
pub(crate) fn plot(png: &Path, title: &str, series: &[Series]) {
    match crate::plot::cdf(png, title, series) {
        Ok(()) => eprintln!("   plot: {}", png.display()),
        Err(e) => eprintln!("   no plot: {e}"),
    }
}

/// The run's metadata: the host's CPU count and kernel, and `extra`'s fields.
pub(crate) fn host_meta(extra: serde_json::Value) -> serde_json::Value {
    let mut meta = serde_json::json!({
        "host_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    });
    if let (Some(m), Some(e)) = (meta.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_meta_keeps_the_extra_fields() {
        let meta = host_meta(serde_json::json!({"n": 3, "kernel": "mine"}));
        assert_eq!(meta["n"], 3);
        assert_eq!(meta["kernel"], "mine");
        assert!(meta["host_cpus"].as_u64().is_some_and(|n| n > 0));
    }
}
