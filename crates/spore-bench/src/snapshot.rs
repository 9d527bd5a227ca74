//! `spore bench snapshot-cold-start`: Sabre's Table 2 and Figures 9 and 11-12 at the process
//! level. Per function (deployed with `snapshot = true`): the image's size raw, with zero
//! pages elided, and compressed by each codec; and the cold start to first response through
//! the gateway for an init (the baseline, same run) and for a restore from each codec's
//! image, with the page cache warm and (optionally) dropped before every start.
//!
//! The daemon keeps one image per function; the bench rewrites that image in each codec
//! (`spore_snapshot::image::transcode`) and puts each in place in turn, so every series
//! restores the same pages. Starts are 50 ms apart, as cold starts arrive, so that what the
//! daemon prepares between them (a spare sandbox for the next restore) counts.
//!
//! The floor of a restore's first response, measured in the same run: installing the image's
//! pages into fresh memory (the fastest of its codecs and of 1 or 2 install threads, page
//! cache warm), plus a warm call of the same function through the gateway. No restore can
//! beat both: it must put those pages in place and then serve a call.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spore_snapshot::image::{transcode, Codec, Image, DEFAULT_PARTITION_PAGES};

use crate::cold_start::{bounded, client, invoke_headers, invoke_with};
use crate::{summarize, BenchError, Series};

/// Pause before each measured start.
const BETWEEN_STARTS: Duration = Duration::from_millis(50);

/// One function to measure.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Deployed name (with `snapshot = true`).
    pub function: String,
    /// The same code deployed as a cfork function with `snapshot = true`: its template is
    /// evicted before each start and comes back imported (`tpl-init`) or restored
    /// (`tpl-restore`), then forks; `fork` is a fork from the live template.
    pub cfork: Option<String>,
    /// Event JSON.
    pub payload: Vec<u8>,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Daemon endpoint (on this host: the bench reads and replaces its image files).
    pub endpoint: String,
    /// Starts per series.
    pub n: usize,
    /// Codecs to restore from.
    pub codecs: Vec<Codec>,
    /// Also measure with the page cache dropped before each start (root).
    pub cold_cache: bool,
    /// Where the transcoded images are kept during the run.
    pub scratch: PathBuf,
    /// Stop a series early after this long.
    pub max_per_series: Duration,
    /// Also restore the raw image lazily (userfaultfd) and with a recorded working set.
    pub lazy_modes: bool,
}

/// Sizes of one function's image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sizes {
    /// Bytes of all the runtime's mappings.
    pub mapped: u64,
    /// Private pages the runtime had (stored + zero), the raw image without elision.
    pub private: u64,
    /// Pages stored once zero pages are elided.
    pub stored: u64,
    /// Image file per codec.
    pub files: Vec<(String, u64)>,
}

/// Results for one function.
#[derive(Debug, Clone)]
pub struct FunctionResult {
    /// Function.
    pub function: String,
    /// Image sizes.
    pub sizes: Sizes,
    /// Request to first response: `init` first, then `restore-<codec>`, then (cold cache)
    /// the same with `+dropcache`.
    pub series: Vec<Series>,
    /// The same starts' start-up alone (`X-Spore-Init-Ms`: sandbox spawn to runtime ready),
    /// same names.
    pub startup: Vec<Series>,
    /// The floor's parts: `floor-install` (the fastest install of the image's pages) and
    /// `floor-warm-call`.
    pub floor: Vec<Series>,
    /// Which variant installed fastest (`<codec>/t<threads>`).
    pub floor_install: String,
}

impl FunctionResult {
    /// The floor of a restore's first response: install p50 + warm call p50 (None: not
    /// measured).
    pub fn floor_ms(&self) -> Option<f64> {
        let p50 = |name: &str| {
            self.floor
                .iter()
                .find(|s| s.name == name)
                .map(|s| summarize(&s.samples_ms).p50)
        };
        Some(p50("floor-install")? + p50("floor-warm-call")?)
    }
}

/// The floor's parts for one function: the fastest install of its image's pages into fresh
/// memory over `variants` and 1-2 threads (page cache warm), and warm calls of `function`.
fn measure_floor(
    cfg: &Config,
    http: &spore_client::Http,
    w: &Workload,
    variants: &[(Codec, PathBuf)],
    progress: &dyn Fn(&str),
) -> Result<(Vec<Series>, String), BenchError> {
    let check = |e: spore_snapshot::SnapshotError| BenchError::Check(e.to_string());
    let mut best: Option<(f64, String, Vec<f64>)> = None;
    for (codec, path) in variants {
        for threads in [1, 2] {
            let install = || -> Result<f64, BenchError> {
                let t = Instant::now();
                let image = Image::open(path).map_err(check)?;
                spore_snapshot::restore::install_scratch(&image, threads).map_err(check)?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            };
            install()?; // the page cache holds the file from here on
            let samples = bounded(cfg.n, cfg.max_per_series / 4, install)?;
            let p50 = summarize(&samples).p50;
            if best.as_ref().is_none_or(|(b, _, _)| p50 < *b) {
                best = Some((p50, format!("{codec}/t{threads}"), samples));
            }
        }
    }
    let Some((_, how, install)) = best else {
        return Ok((Vec::new(), String::new()));
    };
    progress(&format!("{}: floor: {} warm calls", w.function, cfg.n));
    invoke_with(http, &cfg.endpoint, &w.function, &w.payload, None)?;
    let warm = bounded(cfg.n, cfg.max_per_series, || {
        let s = invoke_headers(http, &cfg.endpoint, &w.function, &w.payload, &[])?;
        check_start(&w.function, &s.start, "warm")?;
        Ok(s.latency_ms)
    })?;
    Ok((
        vec![
            Series {
                name: "floor-install".into(),
                samples_ms: install,
            },
            Series {
                name: "floor-warm-call".into(),
                samples_ms: warm,
            },
        ],
        how,
    ))
}

/// Drops the page cache (clean pages), as Sabre's cold-cache runs do.
pub fn drop_caches() -> Result<(), BenchError> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|source| BenchError::Io {
        path: "/proc/sys/vm/drop_caches".into(),
        source,
    })
}

fn snapshot_path(
    http: &spore_client::Http,
    endpoint: &str,
    function: &str,
) -> Result<Option<PathBuf>, BenchError> {
    let list: serde_json::Value = http
        .get(format!("{endpoint}/spore/v1/snapshots"))
        .send()
        .and_then(|r| r.json())
        .map_err(|e| BenchError::Http(e.to_string()))?;
    Ok(list["Snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["function"] == function && s["error"].is_null())
        .filter_map(|s| s["path"].as_str().map(PathBuf::from))
        .next_back())
}

fn put_in_place(variant: &Path, target: &Path) -> Result<(), BenchError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BenchError::Io { path, source }
    };
    let tmp = target.with_extension("bench-tmp");
    std::fs::copy(variant, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, target).map_err(io(target))
}

/// Runs the benchmark.
pub fn run(
    cfg: &Config,
    workloads: &[Workload],
    progress: &dyn Fn(&str),
) -> Result<Vec<FunctionResult>, BenchError> {
    let http = client()?;
    let ep = &cfg.endpoint;
    std::fs::create_dir_all(&cfg.scratch).map_err(|source| BenchError::Io {
        path: cfg.scratch.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for w in workloads {
        // The first init takes the snapshot.
        invoke_with(&http, ep, &w.function, &w.payload, Some("init"))?;
        let image = snapshot_path(&http, ep, &w.function)?.ok_or_else(|| {
            BenchError::Check(format!(
                "{} has no snapshot after an init (see the daemon log)",
                w.function
            ))
        })?;
        let original = Image::open(&image).map_err(|e| BenchError::Check(e.to_string()))?;
        let meta = &original.meta;
        let stored = meta.stored_pages() * 4096;
        let mut sizes = Sizes {
            mapped: meta.mapped_bytes(),
            private: stored + meta.zero_pages() * 4096,
            stored,
            files: Vec::new(),
        };
        let mut variants = Vec::new();
        for &codec in &cfg.codecs {
            let path = cfg.scratch.join(format!("{}.{codec}", w.function));
            transcode(&original, &path, codec, DEFAULT_PARTITION_PAGES, 2)
                .map_err(|e| BenchError::Check(format!("transcoding to {codec}: {e}")))?;
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            sizes.files.push((codec.to_string(), len));
            variants.push((codec, path));
        }
        drop(original);
        progress(&format!(
            "{}: floor: installing the image's pages",
            w.function
        ));
        let (floor, floor_install) = measure_floor(cfg, &http, w, &variants, progress)?;
        let (mut series, mut startup) = (Vec::new(), Vec::new());
        // `n` fresh starts with these headers, each checked to start as `expect`; with
        // `cold`, the page cache is dropped before each.
        let starts = |cold: bool, headers: &[(&str, &str)], expect: &str| {
            bounded(cfg.n, cfg.max_per_series, || {
                // Cold starts arrive apart, not back to back: what the daemon does between
                // them (a spare sandbox for the next restore) is part of what is measured.
                std::thread::sleep(BETWEEN_STARTS);
                if cold {
                    drop_caches()?;
                }
                let s = invoke_headers(&http, ep, &w.function, &w.payload, headers)?;
                check_start(&w.function, &s.start, expect)?;
                Ok((s.latency_ms, s.init_ms))
            })
        };
        let caches: &[bool] = if cfg.cold_cache {
            &[false, true]
        } else {
            &[false]
        };
        for &cold in caches {
            let suffix = if cold { "+dropcache" } else { "" };
            progress(&format!("{}: {} init{suffix}", w.function, cfg.n));
            let init = starts(cold, &[("X-Spore-Cold", "init")], "cold")?;
            push(&mut series, &mut startup, format!("init{suffix}"), init);
            for (codec, path) in &variants {
                put_in_place(path, &image)?;
                progress(&format!(
                    "{}: {} restore from {codec}{suffix}",
                    w.function, cfg.n
                ));
                let restores = starts(cold, &[("X-Spore-Cold", "restore")], "restore")?;
                push(
                    &mut series,
                    &mut startup,
                    format!("restore-{codec}{suffix}"),
                    restores,
                );
            }
        }
        if cfg.lazy_modes {
            if let Some((_, raw)) = variants.iter().find(|(c, _)| *c == Codec::None) {
                put_in_place(raw, &image)?;
                let ws = spore_snapshot::lazy::working_set_path(&image);
                let _ = std::fs::remove_file(&ws);
                // The first reap restore records the working set once the runtime is quiet.
                let headers = [
                    ("X-Spore-Cold", "restore"),
                    ("X-Spore-Restore-Mode", "reap"),
                ];
                let s = invoke_headers(&http, ep, &w.function, &w.payload, &headers)?;
                check_start(&w.function, &s.start, "restore")?;
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !ws.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if !ws.exists() {
                    return Err(BenchError::Check(format!(
                        "{}: no working set recorded after a reap restore",
                        w.function
                    )));
                }
                for &cold in caches {
                    let suffix = if cold { "+dropcache" } else { "" };
                    for mode in ["lazy", "reap"] {
                        progress(&format!(
                            "{}: {} {mode} restores{suffix}",
                            w.function, cfg.n
                        ));
                        let headers = [("X-Spore-Cold", "restore"), ("X-Spore-Restore-Mode", mode)];
                        let s = starts(cold, &headers, "restore")?;
                        push(
                            &mut series,
                            &mut startup,
                            format!("restore-{mode}{suffix}"),
                            s,
                        );
                    }
                }
            }
        }
        if let Some(cfork) = &w.cfork {
            cfork_series(
                cfg,
                &http,
                w,
                cfork,
                caches,
                &mut series,
                &mut startup,
                progress,
            )?;
        }
        for (_, path) in &variants {
            let _ = std::fs::remove_file(path);
        }
        out.push(FunctionResult {
            function: w.function.clone(),
            sizes,
            series,
            startup,
            floor,
            floor_install,
        });
    }
    Ok(out)
}

/// The cfork twin's series: each start evicts the template first (outside the timing), so
/// that it comes back by the path measured.
#[allow(clippy::too_many_arguments)]
fn cfork_series(
    cfg: &Config,
    http: &spore_client::Http,
    w: &Workload,
    cfork: &str,
    caches: &[bool],
    series: &mut Vec<Series>,
    startup: &mut Vec<Series>,
    progress: &dyn Fn(&str),
) -> Result<(), BenchError> {
    let ep = &cfg.endpoint;
    // The first start makes the template, which snapshots itself.
    invoke_with(http, ep, cfork, &w.payload, Some("init"))?;
    if snapshot_path(http, ep, cfork)?.is_none() {
        return Err(BenchError::Check(format!(
            "{cfork} has no template snapshot after an init (see the daemon log)"
        )));
    }
    let evict = || -> Result<(), BenchError> {
        let r = http
            .post(format!("{ep}/spore/v1/functions/{cfork}/evict"))
            .send()
            .map_err(|e| BenchError::Http(e.to_string()))?;
        if !r.status().is_success() {
            return Err(BenchError::Http(format!(
                "evicting {cfork}: {}",
                r.status()
            )));
        }
        Ok(())
    };
    for &cold in caches {
        let suffix = if cold { "+dropcache" } else { "" };
        for (name, header, expect) in [
            ("tpl-init", "init", "cold"),
            ("tpl-restore", "1", "restore"),
        ] {
            progress(&format!(
                "{cfork}: {} {name}{suffix} (template evicted before each)",
                cfg.n
            ));
            let s = bounded(cfg.n, cfg.max_per_series, || {
                evict()?;
                std::thread::sleep(BETWEEN_STARTS);
                if cold {
                    drop_caches()?;
                }
                let s = invoke_headers(http, ep, cfork, &w.payload, &[("X-Spore-Cold", header)])?;
                check_start(cfork, &s.start, expect)?;
                Ok((s.latency_ms, s.init_ms))
            })?;
            push(series, startup, format!("{name}{suffix}"), s);
        }
    }
    // Forks from the live template (the page cache does not matter to a fork).
    invoke_with(http, ep, cfork, &w.payload, None)?;
    progress(&format!("{cfork}: {} forks", cfg.n));
    let s = bounded(cfg.n, cfg.max_per_series, || {
        std::thread::sleep(BETWEEN_STARTS);
        let s = invoke_headers(http, ep, cfork, &w.payload, &[("X-Spore-Cold", "1")])?;
        check_start(cfork, &s.start, "fork")?;
        Ok((s.latency_ms, s.init_ms))
    })?;
    push(series, startup, "fork".into(), s);
    Ok(())
}

fn push(series: &mut Vec<Series>, startup: &mut Vec<Series>, name: String, s: Vec<(f64, f64)>) {
    startup.push(Series {
        name: name.clone(),
        samples_ms: s.iter().map(|x| x.1).collect(),
    });
    series.push(Series {
        name,
        samples_ms: s.iter().map(|x| x.0).collect(),
    });
}

fn check_start(function: &str, got: &str, want: &str) -> Result<(), BenchError> {
    if got != want {
        return Err(BenchError::Check(format!(
            "{function} started as {got:?}, expected {want:?} (see the daemon log)"
        )));
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / 1048576.0)
}

/// The Table-2-style Markdown: sizes, then start latency per series with ratios to `init`.
pub fn table(results: &[FunctionResult]) -> String {
    let mut out = String::from("| function | mapped MiB | private MiB | zero-elided MiB | ");
    let codecs: Vec<String> = results
        .first()
        .map(|r| r.sizes.files.iter().map(|(c, _)| c.clone()).collect())
        .unwrap_or_default();
    for c in &codecs {
        let _ = write!(out, "{c} MiB | ");
    }
    out.push_str("best ratio |\n|---|---:|---:|---:|");
    for _ in &codecs {
        out.push_str("---:|");
    }
    out.push_str("---:|\n");
    for r in results {
        let s = &r.sizes;
        let _ = write!(
            out,
            "| {} | {} | {} | {} | ",
            r.function,
            mib(s.mapped),
            mib(s.private),
            mib(s.stored)
        );
        for (_, len) in &s.files {
            let _ = write!(out, "{} | ", mib(*len));
        }
        let best = s.files.iter().map(|(_, l)| *l).min().unwrap_or(0).max(1);
        let _ = writeln!(out, "{:.1}x |", s.private as f64 / best as f64);
    }
    out.push_str(
        "\nCold start: first response = request to response through the gateway (handler \
         included); start-up = sandbox spawn to runtime ready (`X-Spore-Init-Ms`). Ratios are \
         init's p50 over the row's, with the same page-cache state; `tpl-*` and `fork` rows are \
         the cfork twin (template evicted before each start, then imported or restored, and \
         forked; `fork`: from the live template), against `tpl-init`. `x floor`: the row's p50 \
         over the floor of a restore's first response, measured in the same run (installing \
         the image's pages into fresh memory, the fastest codec and thread count, plus a warm \
         call of the function; page cache warm, so only for warm-cache restore rows).\n\n",
    );
    for r in results {
        let p50 = |name: &str| {
            r.floor
                .iter()
                .find(|s| s.name == name)
                .map(|s| summarize(&s.samples_ms))
        };
        if let (Some(i), Some(c), Some(total)) =
            (p50("floor-install"), p50("floor-warm-call"), r.floor_ms())
        {
            let _ = writeln!(
                out,
                "Floor, {}: install {:.2} ms ({}, p99 {:.2}, n {}) + warm call {:.2} ms (p99 {:.2}, \
                 n {}) = **{total:.2} ms**\n",
                r.function, i.p50, r.floor_install, i.p99, i.n, c.p50, c.p99, c.n
            );
        }
    }
    out.push_str("| function | series | n | first response p50 | p99 | vs init | x floor | start-up p50 | p99 | vs init |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in results {
        let p50 = |list: &[Series], name: &str| {
            list.iter()
                .find(|s| s.name == name)
                .map(|s| summarize(&s.samples_ms).p50)
        };
        for (s, st) in r.series.iter().zip(&r.startup) {
            let (sum, sst) = (summarize(&s.samples_ms), summarize(&st.samples_ms));
            // A cfork row against its template's init, a container row against an init.
            let family = if s.name.starts_with("tpl-") || s.name == "fork" {
                "tpl-init"
            } else {
                "init"
            };
            let base = if s.name.ends_with("+dropcache") {
                format!("{family}+dropcache")
            } else {
                family.to_owned()
            };
            let base = base.as_str();
            let ratio = |b: Option<f64>, v: f64| match b {
                Some(b) if v > 0.0 => format!("{:.1}x", b / v),
                _ => "-".into(),
            };
            let floor = match r.floor_ms() {
                Some(f) if s.name.contains("restore") && !s.name.ends_with("+dropcache") => {
                    format!("{:.1}x", sum.p50 / f)
                }
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} ms | {:.2} ms | {} | {floor} | {:.2} ms | {:.2} ms | {} |",
                r.function,
                s.name,
                sum.n,
                sum.p50,
                sum.p99,
                ratio(p50(&r.series, base), sum.p50),
                sst.p50,
                sst.p99,
                ratio(p50(&r.startup, base), sst.p50),
            );
        }
    }
    out
}
