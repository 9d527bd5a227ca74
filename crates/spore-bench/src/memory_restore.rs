//! `spore bench memory-restore`: Sabre's Figure 9 at the process level. The memory part of
//! a restore alone, from images of real functions' runtimes: open the image (header and
//! metadata) and install every page into fresh memory with 1 or 2 threads, as a restore does
//! (read, CRC, decompress, the destination's page faults), for the same pages stored as a
//! plain memory file (`no-elision`: zero pages stored too), raw with zero pages elided
//! (`raw`), and compressed by each codec; with the page cache warm and dropped before every
//! restore. Ratios are against `no-elision` with the same threads and cache state.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use spore_snapshot::image::{
    transcode, transcode_with_zeros, Codec, Image, DEFAULT_PARTITION_PAGES,
};

use crate::cold_start::bounded;
use crate::snapshot::drop_caches;
use crate::{summarize, BenchError, Series};

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Restores per series.
    pub n: usize,
    /// Codecs besides `no-elision` and `raw`.
    pub codecs: Vec<Codec>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Also measure with the page cache dropped before each restore (root).
    pub cold_cache: bool,
    /// Where the image variants are written during the run.
    pub scratch: PathBuf,
    /// Stop a series early after this long.
    pub max_per_series: Duration,
}

/// One series: an image variant restored with some threads in some cache state.
#[derive(Debug, Clone)]
pub struct Row {
    /// Function whose runtime the image holds.
    pub function: String,
    /// `no-elision`, `raw`, or a codec.
    pub variant: String,
    /// Install threads.
    pub threads: usize,
    /// Page cache dropped before each restore.
    pub cold: bool,
    /// Bytes of memory restored (every private page, zeros included).
    pub memory_bytes: u64,
    /// Bytes of the image file.
    pub file_bytes: u64,
    /// Restore times, ms.
    pub samples_ms: Vec<f64>,
}

impl Row {
    /// `function/variant/tN[+dropcache]`.
    pub fn name(&self) -> String {
        format!(
            "{}/{}/t{}{}",
            self.function,
            self.variant,
            self.threads,
            if self.cold { "+dropcache" } else { "" }
        )
    }
}

fn check(e: spore_snapshot::SnapshotError) -> BenchError {
    BenchError::Check(e.to_string())
}

/// Restores the images (function name, image file) in every variant.
pub fn run(
    cfg: &Config,
    images: &[(String, PathBuf)],
    progress: &dyn Fn(&str),
) -> Result<Vec<Row>, BenchError> {
    std::fs::create_dir_all(&cfg.scratch).map_err(|source| BenchError::Io {
        path: cfg.scratch.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for (function, path) in images {
        let original = Image::open(path).map_err(check)?;
        let memory_bytes = (original.meta.stored_pages() + original.meta.zero_pages()) * 4096;
        let mut variants = Vec::new();
        let plain = cfg.scratch.join(format!("{function}.no-elision"));
        transcode_with_zeros(&original, &plain, DEFAULT_PARTITION_PAGES).map_err(check)?;
        variants.push(("no-elision".to_owned(), plain));
        for codec in std::iter::once(Codec::None).chain(cfg.codecs.iter().copied()) {
            if variants.iter().any(|(n, _)| *n == codec.to_string()) {
                continue;
            }
            let file = cfg.scratch.join(format!("{function}.{codec}"));
            transcode(&original, &file, codec, DEFAULT_PARTITION_PAGES, 2).map_err(check)?;
            variants.push((codec.to_string(), file));
        }
        drop(original);
        let caches: &[bool] = if cfg.cold_cache {
            &[false, true]
        } else {
            &[false]
        };
        for &cold in caches {
            for &threads in &cfg.threads {
                for (variant, file) in &variants {
                    progress(&format!(
                        "{function}: {} restores of {variant}, {threads} thread(s){}",
                        cfg.n,
                        if cold { ", page cache dropped" } else { "" }
                    ));
                    let restore = || -> Result<f64, BenchError> {
                        if cold {
                            drop_caches()?;
                        }
                        let t = Instant::now();
                        let image = Image::open(file).map_err(check)?;
                        spore_snapshot::restore::install_scratch(&image, threads).map_err(check)?;
                        Ok(t.elapsed().as_secs_f64() * 1e3)
                    };
                    if !cold {
                        restore()?; // the page cache holds the file from here on
                    }
                    let samples_ms = bounded(cfg.n, cfg.max_per_series, restore)?;
                    rows.push(Row {
                        function: function.clone(),
                        variant: variant.clone(),
                        threads,
                        cold,
                        memory_bytes,
                        file_bytes: std::fs::metadata(file).map_or(0, |m| m.len()),
                        samples_ms,
                    });
                }
            }
        }
        for (_, file) in &variants {
            let _ = std::fs::remove_file(file);
        }
    }
    Ok(rows)
}

/// The rows as series (for CSV and plots).
pub fn series(rows: &[Row]) -> Vec<Series> {
    rows.iter()
        .map(|r| Series {
            name: r.name(),
            samples_ms: r.samples_ms.clone(),
        })
        .collect()
}

/// The Figure-9-style Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "Memory restore alone (open the image, install every page into fresh memory): \
         `no-elision` stores zero pages too (a plain memory file), `raw` elides them, the \
         codecs compress the elided stream; GB/s = memory restored (zeros included) / p50; \
         ratios = `no-elision` p50 over the row's, same threads and page-cache state.\n\n\
         | function | image | file MiB | threads | page cache | n | p50 | p99 | GB/s | vs no-elision |\n\
         |---|---|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let s = summarize(&r.samples_ms);
        let base = rows
            .iter()
            .find(|b| {
                b.function == r.function
                    && b.variant == "no-elision"
                    && b.threads == r.threads
                    && b.cold == r.cold
            })
            .map(|b| summarize(&b.samples_ms).p50);
        let ratio = match base {
            Some(b) if s.p50 > 0.0 => format!("{:.2}x", b / s.p50),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} | {} |",
            r.function,
            r.variant,
            r.file_bytes as f64 / 1048576.0,
            r.threads,
            if r.cold { "dropped" } else { "warm" },
            s.n,
            s.p50,
            s.p99,
            r.memory_bytes as f64 / 1e9 / (s.p50 / 1e3).max(1e-9),
            ratio
        );
    }
    out
}
