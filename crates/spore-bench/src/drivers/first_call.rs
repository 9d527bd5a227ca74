//! `spore bench first-call`: what a new instance's first call costs against a warm call of
//! the same function (the floor: no start can make a call cheaper than a warm one), with
//! automatic warm-up on (the default) and off, for instances forked from a cfork template and
//! restored from a snapshot. None of the functions has a `warmup_event`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use spore_core::SandboxKind;

use super::report::{host_meta, save_and_print};
use super::setup::{deploy_variant, Daemon};
use crate::cold_start::{bounded, invoke_with, Sample};
use crate::{summarize, Series};

/// Options of `spore bench first-call`.
#[derive(Debug, Clone)]
pub struct FirstCallOptions {
    /// New instances per series (and as many warm calls).
    pub n: usize,
    /// Sample functions to measure (folder names under `functions`), comma-separated.
    pub only: String,
    /// Where results go.
    pub out: PathBuf,
    /// Folder of sample functions.
    pub functions: PathBuf,
}

/// How the measured instances start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Forked from the function's cfork template (`X-Spore-Cold: fork`).
    Fork,
    /// Restored from the function's snapshot (`X-Spore-Cold: restore`).
    Restore,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Fork => "fork",
            Path::Restore => "restore",
        }
    }
}

/// One line of the table: a function, a start path, warm-up on or off.
#[derive(Debug, Clone)]
pub struct FirstCallRow {
    /// Sample function.
    pub function: String,
    /// `fork` or `restore`.
    pub path: &'static str,
    /// Automatic warm-up on.
    pub auto_warmup: bool,
    /// Handler time of each new instance's first call, ms.
    pub first_ms: Vec<f64>,
    /// Handler time of warm calls of the same function, ms (the floor).
    pub warm_ms: Vec<f64>,
}

/// The table of `rows`: first call vs warm call p50 (p99, n), and the ratio of the p50s.
pub fn table(rows: &[FirstCallRow]) -> String {
    let mut t = String::from(
        "First call of a new instance vs a warm call (the floor), handler time, no warmup_event\n\n\
         | function | start | automatic warm-up | first call p50 (p99, n) | warm call p50 (p99, n) | first / warm |\n\
         |---|---|---|---|---|---:|\n",
    );
    for r in rows {
        let (f, w) = (summarize(&r.first_ms), summarize(&r.warm_ms));
        t.push_str(&format!(
            "| {} | {} | {} | {:.2} ms ({:.2}, {}) | {:.2} ms ({:.2}, {}) | {:.2}x |\n",
            r.function,
            r.path,
            if r.auto_warmup { "on" } else { "off" },
            f.p50,
            f.p99,
            f.n,
            w.p50,
            w.p99,
            w.n,
            f.p50 / w.p50,
        ));
    }
    t
}

/// `spore bench first-call`.
pub fn first_call(endpoint: Option<&str>, opts: &FirstCallOptions) -> Result<()> {
    anyhow::ensure!(
        (1..=1000).contains(&opts.n),
        "-n {} is out of range: give 1 to 1000 instances per series",
        opts.n
    );
    let functions: Vec<&str> = opts.only.split(',').filter(|s| !s.is_empty()).collect();
    anyhow::ensure!(!functions.is_empty(), "--only names no function");
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let (client, ep) = (&daemon.client, daemon.endpoint.clone());
    let http = crate::cold_start::client()?;
    let limit = Duration::from_secs(300);
    let mut rows = Vec::new();
    for f in &functions {
        let dir = opts.functions.join(f);
        let payload = std::fs::read(dir.join("event.json")).unwrap_or_else(|_| b"{}".to_vec());
        for path in [Path::Fork, Path::Restore] {
            for on in [true, false] {
                let name = format!(
                    "{f}-first-{}-{}",
                    path.as_str(),
                    if on { "aw" } else { "noaw" }
                );
                let sandbox = match path {
                    Path::Fork => SandboxKind::Cfork,
                    Path::Restore => SandboxKind::Container,
                };
                let most = u32::try_from(opts.n + 4).unwrap_or(1024);
                deploy_variant(client, &dir, &name, sandbox, |m| {
                    m.warmup_event = None;
                    m.auto_warmup = on;
                    m.snapshot = path == Path::Restore;
                    m.max_instances = Some(most);
                })
                .with_context(|| format!("deploying {name}"))?;
                eprintln!(
                    "   {f}: {} starts, automatic warm-up {}",
                    path.as_str(),
                    if on { "on" } else { "off" }
                );
                let call = |how: Option<&str>| -> Result<Sample> {
                    invoke_with(&http, &ep, &name, &payload, how)
                        .with_context(|| format!("invoking {name}"))
                };
                // The first call records what it imports. For a fork, the template imports
                // that before the next fork; for a snapshot, the image is retaken by the next
                // init. Neither of those starts is measured.
                call(Some("init"))?;
                call(Some(match path {
                    Path::Fork => "fork",
                    Path::Restore => "init",
                }))?;
                let first = bounded(opts.n, limit, || {
                    let s = call(Some(path.as_str()))
                        .map_err(|e| crate::BenchError::Check(format!("{e:#}")))?;
                    if s.start != path.as_str() {
                        return Err(crate::BenchError::Check(format!(
                            "expected a {} start of {name}, got {:?}",
                            path.as_str(),
                            s.start
                        )));
                    }
                    Ok(s.handler_ms)
                })?;
                let warm = bounded(opts.n, limit, || {
                    let s = call(None).map_err(|e| crate::BenchError::Check(format!("{e:#}")))?;
                    Ok(s.handler_ms)
                })?;
                client.delete(&name).ok();
                rows.push(FirstCallRow {
                    function: (*f).to_owned(),
                    path: path.as_str(),
                    auto_warmup: on,
                    first_ms: first,
                    warm_ms: warm,
                });
            }
        }
    }
    let series: Vec<Series> = rows
        .iter()
        .flat_map(|r| {
            let tag = format!(
                "{} {} warm-up {}",
                r.function,
                r.path,
                if r.auto_warmup { "on" } else { "off" }
            );
            [
                Series {
                    name: format!("{tag}: first call"),
                    samples_ms: r.first_ms.clone(),
                },
                Series {
                    name: format!("{tag}: warm call"),
                    samples_ms: r.warm_ms.clone(),
                },
            ]
        })
        .collect();
    let plotted: Vec<Series> = series
        .iter()
        .filter(|s| s.name.ends_with("first call"))
        .cloned()
        .collect();
    save_and_print(
        &opts.out,
        "first-call",
        &series,
        &table(&rows),
        host_meta(serde_json::json!({ "functions": functions, "n": opts.n })),
        (
            "First call of a new instance (handler time), automatic warm-up on and off",
            &plotted,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_the_ratio_to_the_warm_call() {
        let rows = vec![FirstCallRow {
            function: "linpack".into(),
            path: "fork",
            auto_warmup: false,
            first_ms: vec![20.0, 22.0, 24.0],
            warm_ms: vec![4.0, 5.0, 6.0],
        }];
        let t = table(&rows);
        assert!(
            t.contains(
                "| linpack | fork | off | 22.00 ms (24.00, 3) | 5.00 ms (6.00, 3) | 4.40x |"
            ),
            "{t}"
        );
    }
}
