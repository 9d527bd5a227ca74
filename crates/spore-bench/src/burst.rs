//! `spore bench burst`: N simultaneous first requests to a cfork function (each forced onto
//! a fresh instance), against the floor the CPUs set: N forks of a warm interpreter cannot
//! finish sooner than `N x fork floor / cores`. A burst that queues requests behind one
//! another (a lock held across a fork, forks issued one at a time) shows up as start overhead
//! far above that.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use crate::cold_start::{client, invoke_with};
use crate::{summarize, BenchError};

/// One burst's measurements.
#[derive(Debug, Clone)]
pub struct BurstRow {
    /// Concurrent requests.
    pub n: usize,
    /// Request to response of each, ms.
    pub latency_ms: Vec<f64>,
    /// Start overhead of each: its latency less the warm call's p50, ms.
    pub overhead_ms: Vec<f64>,
    /// How each was served (`X-Spore-Start` -> count).
    pub starts: BTreeMap<String, usize>,
    /// The CPU's floor for the whole burst: `n x fork floor p50 / cores`, ms.
    pub floor_ms: f64,
}

/// Fires `n` requests at once (threads released together by a barrier), each with
/// `X-Spore-Cold: 1`; returns each one's latency and start kind.
pub fn fire(endpoint: &str, function: &str, n: usize) -> Result<Vec<(f64, String)>, BenchError> {
    let gate = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (gate, endpoint, function) =
                (gate.clone(), endpoint.to_owned(), function.to_owned());
            std::thread::spawn(move || {
                let http = client();
                gate.wait();
                let s = invoke_with(&http?, &endpoint, &function, b"{}", Some("1"))?;
                Ok::<_, BenchError>((s.latency_ms, s.start))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| BenchError::Check("a burst request's thread panicked".into()))?
        })
        .collect()
}

/// Turns a burst's samples into a row: overheads over `warm_p50`, floor from `fork_p50`.
pub fn row(samples: &[(f64, String)], warm_p50: f64, fork_p50: f64, cpus: usize) -> BurstRow {
    let mut starts = BTreeMap::new();
    for (_, s) in samples {
        *starts.entry(s.clone()).or_insert(0) += 1;
    }
    let n = samples.len();
    BurstRow {
        n,
        latency_ms: samples.iter().map(|(ms, _)| *ms).collect(),
        overhead_ms: samples
            .iter()
            .map(|(ms, _)| (ms - warm_p50).max(0.0))
            .collect(),
        starts,
        floor_ms: n as f64 * fork_p50 / cpus.max(1) as f64,
    }
}

/// The Markdown table of the rows.
pub fn table(rows: &[BurstRow], warm_p50: f64, fork_p50: f64, cpus: usize) -> String {
    let mut t = format!(
        "Burst: N simultaneous first requests to a cfork function, each on a fresh instance. \
         Start overhead = latency - warm call p50 ({warm_p50:.2} ms). Floor = N x fork floor \
         p50 ({fork_p50:.2} ms) / {cpus} CPUs: the CPU time N forks need, spread over every core.\n\n\
         | N | served as | latency p50 | latency p99 | overhead p50 | overhead p99 | floor | overhead p99 / floor |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let lat = summarize(&r.latency_ms);
        let ovh = summarize(&r.overhead_ms);
        let starts: Vec<String> = r.starts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        t.push_str(&format!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x |\n",
            r.n,
            starts.join(", "),
            lat.p50,
            lat.p99,
            ovh.p50,
            ovh.p99,
            r.floor_ms,
            if r.floor_ms > 0.0 {
                ovh.p99 / r.floor_ms
            } else {
                f64::NAN
            }
        ));
    }
    t
}

/// Parses `16,64,256`.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>, BenchError> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or_else(|| {
                    BenchError::Check(format!(
                        "burst size {p:?} is not a number of requests from 1 to 1024"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_count_starts_and_floor() {
        let samples = vec![
            (12.0, "fork".to_owned()),
            (20.0, "fork".to_owned()),
            (2.0, "warm".to_owned()),
        ];
        let r = row(&samples, 4.0, 1.0, 2);
        assert_eq!(r.n, 3);
        assert_eq!(r.starts["fork"], 2);
        assert_eq!(r.overhead_ms, vec![8.0, 16.0, 0.0]);
        assert_eq!(r.floor_ms, 1.5);
        let t = table(&[r], 4.0, 1.0, 2);
        assert!(t.contains("| 3 | 2 fork, 1 warm |"), "{t}");
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(parse_sizes("16, 64,256").unwrap(), vec![16, 64, 256]);
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("many")
            .unwrap_err()
            .to_string()
            .contains("many"));
    }
}
