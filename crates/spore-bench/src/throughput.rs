//! `spore bench throughput`: warm invocations through the gateway at fixed concurrency
//! levels, driven by a closed-loop load generator in this process (one thread and one
//! keep-alive connection per concurrent client, each request signed as a real client signs
//! it), next to the floor: the same load on the gateway's `/healthz`, which crosses the same
//! HTTP server and nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spore_client::Http;

use crate::cold_start::client;
use crate::{summarize, BenchError};

/// Most requests one client thread sends in a level (a bound besides the time).
const MAX_PER_CLIENT: usize = 1_000_000;

/// One concurrency level's result.
#[derive(Debug, Clone)]
pub struct Level {
    /// Concurrent clients.
    pub concurrency: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Request to response of each request, ms.
    pub latency_ms: Vec<f64>,
    /// Requests that failed.
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

impl Level {
    /// Completed requests per second.
    pub fn rps(&self) -> f64 {
        self.latency_ms.len() as f64 / self.seconds.max(1e-9)
    }
}

/// A request the load generator sends.
pub type Request = Arc<dyn Fn(&Http) -> Result<(), BenchError> + Send + Sync>;

/// Runs `concurrency` clients sending `request` back to back for `warmup` (not recorded),
/// then for `duration`.
pub fn drive(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    request: Request,
) -> Result<Level, BenchError> {
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let request = request.clone();
            std::thread::spawn(
                move || -> Result<(Vec<f64>, usize, Option<String>), BenchError> {
                    let http = client()?;
                    let t0 = Instant::now();
                    while t0.elapsed() < warmup {
                        let _ = request(&http);
                    }
                    let (start, mut lat, mut errors, mut first) =
                        (Instant::now(), Vec::new(), 0, None);
                    while start.elapsed() < duration && lat.len() + errors < MAX_PER_CLIENT {
                        let r0 = Instant::now();
                        match request(&http) {
                            Ok(()) => lat.push(r0.elapsed().as_secs_f64() * 1000.0),
                            Err(e) => {
                                errors += 1;
                                first.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                    Ok((lat, errors, first))
                },
            )
        })
        .collect();
    let t0 = Instant::now();
    let mut level = Level {
        concurrency,
        seconds: 0.0,
        latency_ms: Vec::new(),
        errors: 0,
        first_error: None,
    };
    for h in handles {
        let (lat, errors, first) = h
            .join()
            .map_err(|_| BenchError::Check("a load thread panicked".into()))??;
        level.latency_ms.extend(lat);
        level.errors += errors;
        if level.first_error.is_none() {
            level.first_error = first;
        }
    }
    // Every client measured for `duration` after its own warm-up; the wall time of the
    // measured part is the duration (the join adds only the last request's tail).
    level.seconds = (t0.elapsed().saturating_sub(warmup))
        .as_secs_f64()
        .max(duration.as_secs_f64());
    Ok(level)
}

/// A warm invocation of `function` with an empty event.
pub fn invoke_request(endpoint: &str, function: &str) -> Request {
    let url = format!("{endpoint}/2015-03-31/functions/{function}/invocations");
    Arc::new(move |http: &Http| {
        let resp = http
            .post(&url)
            .body(b"{}".to_vec())
            .send()
            .map_err(|e| BenchError::Http(e.to_string()))?;
        let status = resp.status();
        let failed = resp.headers().contains_key("x-amz-function-error");
        let body = resp.bytes().map_err(|e| BenchError::Http(e.to_string()))?;
        if !status.is_success() || failed {
            return Err(BenchError::Check(format!(
                "invoke returned {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(())
    })
}

/// `GET /healthz`: the gateway's HTTP path alone (the floor).
pub fn health_request(endpoint: &str) -> Request {
    let url = format!("{endpoint}/healthz");
    Arc::new(move |http: &Http| {
        let resp = http
            .get(&url)
            .send()
            .map_err(|e| BenchError::Http(e.to_string()))?;
        let status = resp.status();
        let _ = resp.bytes();
        if !status.is_success() {
            return Err(BenchError::Check(format!("/healthz returned {status}")));
        }
        Ok(())
    })
}

/// The Markdown table: per level, invoke req/s and latency next to the floor's.
pub fn table(invoke: &[Level], floor: &[Level]) -> String {
    let mut t = String::from(
        "Warm invocations of `hello`, closed loop, load generator on the same host. Floor: the \
         same clients on `/healthz` (the gateway's HTTP server and nothing else).\n\n\
         | clients | invoke req/s | p50 | p99 | errors | floor req/s | floor p50 | floor p99 | invoke / floor (req/s) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, f) in invoke.iter().zip(floor) {
        let (si, sf) = (summarize(&i.latency_ms), summarize(&f.latency_ms));
        t.push_str(&format!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.0} | {:.2} ms | {:.2} ms | {:.0}% |\n",
            i.concurrency,
            i.rps(),
            si.p50,
            si.p99,
            i.errors,
            f.rps(),
            sf.p50,
            sf.p99,
            100.0 * i.rps() / f.rps().max(1e-9)
        ));
    }
    t
}

/// Parses `1,8,32`.
pub fn parse_levels(s: &str) -> Result<Vec<usize>, BenchError> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| {
                    BenchError::Check(format!(
                        "concurrency {p:?} is not a number of clients from 1 to 256"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_checked() {
        assert_eq!(parse_levels("1,8, 32").unwrap(), vec![1, 8, 32]);
        assert!(parse_levels("0").is_err());
        assert!(parse_levels("300").is_err());
    }

    #[test]
    fn drive_counts_successes_and_errors() {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = n.clone();
        let req: Request = Arc::new(move |_http: &Http| {
            let i = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
            if i % 2 == 0 {
                Ok(())
            } else {
                Err(BenchError::Check("odd".into()))
            }
        });
        let l = drive(2, Duration::ZERO, Duration::from_millis(50), req).unwrap();
        assert!(!l.latency_ms.is_empty());
        assert!(l.errors > 0);
        assert_eq!(
            l.first_error.as_deref(),
            Some("Benchmark check failed: odd")
        );
        assert!(l.rps() > 0.0);
        let t = table(std::slice::from_ref(&l), std::slice::from_ref(&l));
        assert!(t.contains("| 2 |"), "{t}");
    }
}
