//! `spore bench cold-start`: cold start of a fresh sandboxed Python instance (request to
//! response, through the gateway), warm invocation latency, and the same-run floor of a plain
//! `python3 -c pass` process start.

use std::time::{Duration, Instant};

use crate::{BenchError, Series};

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct ColdStartConfig {
    /// Daemon endpoint, e.g. `http://127.0.0.1:9000`.
    pub endpoint: String,
    /// Function to invoke (deployed already).
    pub function: String,
    /// Samples per series.
    pub n: usize,
    /// Interpreter for the floor (the one sandboxes use).
    pub python: String,
    /// Stop a series early after this long.
    pub max_per_series: Duration,
}

/// One invocation's client-side latency and the daemon's headers.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Request to response, ms.
    pub latency_ms: f64,
    /// `X-Spore-Start`.
    pub start: String,
    /// `X-Spore-Init-Ms`.
    pub init_ms: f64,
}

/// Invokes `function` once; checks that it succeeded.
pub fn invoke(
    client: &reqwest::blocking::Client,
    endpoint: &str,
    function: &str,
    payload: &[u8],
    cold: bool,
) -> Result<Sample, BenchError> {
    let url = format!("{endpoint}/2015-03-31/functions/{function}/invocations");
    let t0 = Instant::now();
    let mut req = client.post(&url).body(payload.to_vec());
    if cold {
        req = req.header("X-Spore-Cold", "1");
    }
    let resp = req.send().map_err(|e| BenchError::Http(e.to_string()))?;
    let status = resp.status();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let start = header("x-spore-start").unwrap_or_default();
    let init_ms = header("x-spore-init-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let failed = header("x-amz-function-error").is_some();
    let body = resp.bytes().map_err(|e| BenchError::Http(e.to_string()))?;
    let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !status.is_success() || failed {
        return Err(BenchError::Check(format!(
            "{function} returned {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(Sample {
        latency_ms,
        start,
        init_ms,
    })
}

fn bounded<T>(
    n: usize,
    max: Duration,
    mut f: impl FnMut() -> Result<T, BenchError>,
) -> Result<Vec<T>, BenchError> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f()?);
        if t0.elapsed() > max {
            break;
        }
    }
    Ok(out)
}

/// Runs the benchmark. Series: `python3 -c pass` (floor), `container cold`, `container cold
/// (daemon init)`, `warm`.
pub fn run(cfg: &ColdStartConfig, progress: &dyn Fn(&str)) -> Result<Vec<Series>, BenchError> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| BenchError::Http(e.to_string()))?;
    progress(&format!("floor: {} x `{} -c pass`", cfg.n, cfg.python));
    let floor = bounded(cfg.n, cfg.max_per_series, || {
        let t0 = Instant::now();
        let status = std::process::Command::new(&cfg.python)
            .args(["-c", "pass"])
            .status()
            .map_err(|e| BenchError::Check(format!("running {}: {e}", cfg.python)))?;
        if !status.success() {
            return Err(BenchError::Check(format!(
                "{} -c pass exited with {status}",
                cfg.python
            )));
        }
        Ok(t0.elapsed().as_secs_f64() * 1000.0)
    })?;

    progress(&format!(
        "cold: {} x invoke {} with X-Spore-Cold: 1",
        cfg.n, cfg.function
    ));
    let cold = bounded(cfg.n, cfg.max_per_series, || {
        let s = invoke(&client, &cfg.endpoint, &cfg.function, b"{}", true)?;
        if s.start != "cold" {
            return Err(BenchError::Check(format!(
                "a forced cold start was served {:?}",
                s.start
            )));
        }
        Ok(s)
    })?;

    progress(&format!("warm: {} x invoke {}", cfg.n, cfg.function));
    invoke(&client, &cfg.endpoint, &cfg.function, b"{}", false)?;
    let warm = bounded(cfg.n, cfg.max_per_series, || {
        let s = invoke(&client, &cfg.endpoint, &cfg.function, b"{}", false)?;
        if s.start != "warm" {
            return Err(BenchError::Check(format!(
                "expected a warm start, got {:?}",
                s.start
            )));
        }
        Ok(s.latency_ms)
    })?;

    Ok(vec![
        Series {
            name: "python3 -c pass (floor)".into(),
            samples_ms: floor,
        },
        Series {
            name: "container cold (request to response)".into(),
            samples_ms: cold.iter().map(|s| s.latency_ms).collect(),
        },
        Series {
            name: "container cold (daemon: spawn to ready)".into(),
            samples_ms: cold.iter().map(|s| s.init_ms).collect(),
        },
        Series {
            name: "warm (request to response)".into(),
            samples_ms: warm,
        },
    ])
}
