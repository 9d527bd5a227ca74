//! `spore bench burst`: N simultaneous first requests to a cfork function (each forced onto
//! a fresh instance), against the floor the CPUs set: N forks of a warm interpreter cannot
//! finish sooner than `N x fork floor / cores`. A burst that queues requests behind one
//! another (a lock held across a fork, forks issued one at a time) shows up as start overhead
//! far above that.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use crate::cold_start::{client, invoke_with, Sample};
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
    /// The daemon's time from each request's arrival to its handler running, ms.
    pub to_handler_ms: Vec<f64>,
    /// Each start-up step (`X-Spore-Breakdown`) over the starts that had it, in the order
    /// steps first appear.
    pub steps: Vec<(String, Vec<f64>)>,
    /// Where the CPU went from the requests' release to the last response.
    pub cpu: Option<BurstCpu>,
}

/// The CPU over one burst, from the requests' release to the last response.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BurstCpu {
    /// That time, ms.
    pub wall_ms: f64,
    /// The share of all CPUs' time that was busy (1.0: every CPU all the time).
    pub busy: f64,
    /// CPU time per start, by who used it (the load generator: the bench's request threads).
    pub per_start: crate::cpu::PerRequest,
}

/// A burst's samples, and its CPU when `daemon` (the daemon's pid) is given.
pub struct Fired {
    /// What each request measured.
    pub samples: Vec<Sample>,
    /// Where the CPU went.
    pub cpu: Option<BurstCpu>,
}

/// Fires `n` requests at once (threads released together by a barrier once each has its
/// client), each with `X-Spore-Cold: 1`; returns what each one measured and, when the
/// daemon's pid is known, where the CPU went meanwhile.
pub fn fire(
    endpoint: &str,
    function: &str,
    n: usize,
    daemon: Option<u32>,
) -> Result<Fired, BenchError> {
    // Every thread makes its client, then all wait at `ready`; the CPU is read once they
    // all have, and `go` releases them.
    let (ready, go) = (Arc::new(Barrier::new(n + 1)), Arc::new(Barrier::new(n + 1)));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (ready, go, endpoint, function) = (
                ready.clone(),
                go.clone(),
                endpoint.to_owned(),
                function.to_owned(),
            );
            std::thread::spawn(move || {
                let http = client();
                ready.wait();
                go.wait();
                invoke_with(&http?, &endpoint, &function, b"{}", Some("1"))
            })
        })
        .collect();
    let gen = crate::cpu::GeneratorIn::Self_;
    ready.wait();
    // A failed reading only leaves the CPU out.
    let before = daemon.and_then(|d| crate::cpu::read(Some(d), gen).ok());
    go.wait();
    let t0 = std::time::Instant::now();
    let samples = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| BenchError::Check("a burst request's thread panicked".into()))?
        })
        .collect::<Result<Vec<_>, _>>()?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = before.and_then(|a| {
        let b = crate::cpu::read(daemon, gen).ok()?;
        Some(BurstCpu {
            wall_ms: wall * 1000.0,
            busy: crate::cpu::busy(&a, &b, wall),
            per_start: crate::cpu::per_request(&a, &b, n as u64),
        })
    });
    Ok(Fired { samples, cpu })
}

/// Turns a burst into a row: overheads over `warm_p50`, floor from `fork_p50`.
pub fn row(fired: Fired, warm_p50: f64, fork_p50: f64, cpus: usize) -> BurstRow {
    let samples = &fired.samples;
    let mut starts = BTreeMap::new();
    for s in samples {
        *starts.entry(s.start.clone()).or_insert(0) += 1;
    }
    let steps = crate::cold_start::steps_by_name(samples);
    let n = samples.len();
    BurstRow {
        n,
        latency_ms: samples.iter().map(|s| s.latency_ms).collect(),
        overhead_ms: samples
            .iter()
            .map(|s| (s.latency_ms - warm_p50).max(0.0))
            .collect(),
        starts,
        floor_ms: n as f64 * fork_p50 / cpus.max(1) as f64,
        to_handler_ms: samples.iter().map(|s| s.to_handler_ms).collect(),
        steps,
        cpu: fired.cpu,
    }
}

/// Where the CPU went during each burst that was measured for it.
pub fn cpu_table(rows: &[BurstRow], cpus: usize) -> String {
    let measured: Vec<_> = rows
        .iter()
        .filter_map(|r| r.cpu.as_ref().map(|c| (r.n, c)))
        .collect();
    if measured.is_empty() {
        return String::new();
    }
    let mut t = format!(
        "\nWhere the CPU went during each burst (from the requests' release to the last \
         response; busy: the share of the {cpus} CPUs' time in use; per start: CPU time over \
         the burst divided by N, by who used it: the daemon, the processes under it (template, \
         children, sandbox helpers), the bench's request threads, and {}):\n\n\
         | N | time | CPUs busy | per start: machine | daemon | under the daemon | requests | rest | context switches per start |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        crate::cpu::REST
    );
    for (n, c) in measured {
        t.push_str(&format!(
            "| {n} | {:.1} ms | {:.0}% | {} | {:.0} |\n",
            c.wall_ms,
            100.0 * c.busy,
            c.per_start.cells(true),
            c.per_start.switches
        ));
    }
    t
}

/// Where the bursts' starts spent their time: per burst, the p50 of the daemon's request to
/// handler time and of each start-up step (with how many starts had it).
pub fn steps_table(rows: &[BurstRow]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        for (name, _) in &r.steps {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let mut t = String::from(
        "\nWhere a burst's starts go (p50 over the burst's starts, ms; steps as in \
         `spore bench cold-start`, a step that only some starts had says in how many):\n\n| N | daemon: request to handler |",
    );
    for name in &names {
        t.push_str(&format!(" {name} |"));
    }
    t.push_str("\n|---:|---:|");
    t.push_str(&"---:|".repeat(names.len()));
    t.push('\n');
    for r in rows {
        t.push_str(&format!(
            "| {} | {:.2} |",
            r.n,
            summarize(&r.to_handler_ms).p50
        ));
        for name in &names {
            match r.steps.iter().find(|(n, _)| n == name) {
                Some((_, v)) if v.len() < r.n => t.push_str(&format!(
                    " {:.2} ({} of {}) |",
                    summarize(v).p50,
                    v.len(),
                    r.n
                )),
                Some((_, v)) => t.push_str(&format!(" {:.2} |", summarize(v).p50)),
                None => t.push_str(" - |"),
            }
        }
        t.push('\n');
    }
    t
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
        let sample = |ms: f64, start: &str, steps: &[(&str, f64)]| Sample {
            latency_ms: ms,
            start: start.to_owned(),
            init_ms: 0.0,
            breakdown: steps.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect(),
            to_handler_ms: ms / 2.0,
            handler_ms: f64::NAN,
            body: Vec::new(),
        };
        let samples = vec![
            sample(12.0, "fork", &[("request", 1.0), ("netns_wait", 3.0)]),
            sample(20.0, "fork", &[("request", 2.0)]),
            sample(2.0, "warm", &[]),
        ];
        let cpu = BurstCpu {
            wall_ms: 30.0,
            busy: 0.96,
            per_start: crate::cpu::PerRequest {
                machine_us: 19_200.0,
                daemon_us: Some(4_000.0),
                under_us: Some(12_000.0),
                generator_us: 1_000.0,
                rest_us: 2_200.0,
                switches: 40.0,
            },
        };
        let fired = Fired {
            samples,
            cpu: Some(cpu),
        };
        let r = row(fired, 4.0, 1.0, 2);
        assert_eq!(r.n, 3);
        assert_eq!(r.starts["fork"], 2);
        assert_eq!(r.overhead_ms, vec![8.0, 16.0, 0.0]);
        assert_eq!(r.floor_ms, 1.5);
        let t = table(std::slice::from_ref(&r), 4.0, 1.0, 2);
        assert!(t.contains("| 3 | 2 fork, 1 warm |"), "{t}");
        let t = cpu_table(std::slice::from_ref(&r), 2);
        assert!(
            t.contains(
                "| 3 | 30.0 ms | 96% | 19.20 ms | 4.00 ms | 12.00 ms | 1.00 ms | 2.20 ms | 40 |"
            ),
            "{t}"
        );
        let t = steps_table(&[r]);
        assert!(
            t.contains("| 3 | 6.00 | 1.00 (2 of 3) | 3.00 (1 of 3) |"),
            "{t}"
        );
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
