//! `spore bench functionbench`: Molecule's FunctionBench comparison (Figure 14): end-to-end
//! latency of each sample function on a fresh instance, container vs cfork, with warm
//! invocations for reference, all in the same run.

use std::fmt::Write as _;
use std::time::Duration;

use crate::cold_start::{client, fresh_starts, invoke, warm, Repeat};
use crate::{summarize, BenchError, Series};

/// One function to measure: its container and cfork deployments and its event.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Function name as deployed with `sandbox = "container"`.
    pub container: String,
    /// The same code deployed with `sandbox = "cfork"`.
    pub cfork: String,
    /// Event JSON.
    pub payload: Vec<u8>,
}

/// Per-function series, in order: container cold, cfork (`n` each), warm (`n_warm`).
pub fn run(
    endpoint: &str,
    workloads: &[Workload],
    n: usize,
    n_warm: usize,
    max_per_series: Duration,
    progress: &dyn Fn(&str),
) -> Result<Vec<(String, [Series; 3])>, BenchError> {
    let client = client()?;
    let mut out = Vec::new();
    for w in workloads {
        progress(&format!(
            "{}: {n} container cold, {n} cfork, {n_warm} warm",
            w.container
        ));
        let cold = fresh_starts(
            &client,
            endpoint,
            &w.container,
            &w.payload,
            "cold",
            Repeat::back_to_back(n, max_per_series),
        )?;
        invoke(&client, endpoint, &w.cfork, &w.payload, true)?; // may start the template
        let forks = fresh_starts(
            &client,
            endpoint,
            &w.cfork,
            &w.payload,
            "fork",
            Repeat::back_to_back(n, max_per_series),
        )?;
        let warm = warm(
            &client,
            endpoint,
            &w.container,
            &w.payload,
            n_warm,
            max_per_series,
        )?;
        out.push((
            w.container.clone(),
            [
                Series {
                    name: format!("{} container", w.container),
                    samples_ms: cold.iter().map(|s| s.latency_ms).collect(),
                },
                Series {
                    name: format!("{} cfork", w.container),
                    samples_ms: forks.iter().map(|s| s.latency_ms).collect(),
                },
                Series {
                    name: format!("{} warm", w.container),
                    samples_ms: warm,
                },
            ],
        ));
    }
    Ok(out)
}

/// The Markdown table: p50/p99 per mode and the container/cfork ratio of p50s.
pub fn table(results: &[(String, [Series; 3])]) -> String {
    let mut t = String::from("| function | n | container cold p50 / p99 | cfork p50 / p99 | warm p50 / p99 | cfork speed-up (p50) |\n|---|---:|---:|---:|---:|---:|\n");
    for (name, [c, f, w]) in results {
        let (c, f, w) = (
            summarize(&c.samples_ms),
            summarize(&f.samples_ms),
            summarize(&w.samples_ms),
        );
        let _ = writeln!(
            t,
            "| {name} | {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1}x |",
            c.n.min(f.n),
            c.p50,
            c.p99,
            f.p50,
            f.p99,
            w.p50,
            w.p99,
            c.p50 / f.p50
        );
    }
    t
}
