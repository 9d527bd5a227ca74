//! `spore bench throughput`: warm invocations through the gateway at fixed concurrency
//! levels, next to the floor: the same load on the gateway's `/healthz`, which crosses the
//! same HTTP server and nothing else. Two load generators, both closed-loop with one
//! keep-alive connection per client:
//! - `wrk`, when installed: written in C on epoll, it leaves the two CPUs of these machines
//!   to the daemon. Its requests are signed once per level (SigV4 allows 15 minutes of clock
//!   skew) and replayed, as a client reusing a signature would.
//! - the built-in one (a thread per client in this process, each request signed as a real
//!   client signs it), when `wrk` is missing: it takes about a CPU itself, so its figures are
//!   lower for the invocations and the floor alike.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
    /// Request to response of each request, ms (the built-in generator), or the latency at
    /// every 0.1% quantile (`wrk`, which keeps a histogram, not each request).
    pub latency_ms: Vec<f64>,
    /// Requests completed, when the generator counted them itself (`wrk`).
    pub completed: Option<u64>,
    /// Requests that failed.
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Where the CPU went during the measured seconds, per request.
    pub cpu: Option<crate::cpu::PerRequest>,
}

impl Level {
    /// A level with nothing measured yet.
    fn empty(concurrency: usize) -> Level {
        Level {
            concurrency,
            seconds: 0.0,
            latency_ms: Vec::new(),
            completed: None,
            errors: 0,
            first_error: None,
            cpu: None,
        }
    }

    /// Completed requests.
    pub fn requests(&self) -> u64 {
        self.completed.unwrap_or(self.latency_ms.len() as u64)
    }

    /// Completed requests per second.
    pub fn rps(&self) -> f64 {
        self.requests() as f64 / self.seconds.max(1e-9)
    }
}

/// Which program generates the load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generator {
    /// `wrk` at this path.
    Wrk(PathBuf),
    /// Threads in this process.
    Builtin,
}

impl Generator {
    /// `wrk` if it is on `PATH`, else the built-in generator.
    pub fn detect() -> Generator {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("wrk"))
            .find(|p| p.is_file())
            .map_or(Generator::Builtin, Generator::Wrk)
    }

    /// How the table names it.
    pub fn describe(&self) -> String {
        match self {
            Generator::Wrk(p) => format!("`wrk` ({})", p.display()),
            Generator::Builtin => "the built-in generator (a thread per client in the bench \
                                   process; with `wrk` installed, `wrk` is used)"
                .into(),
        }
    }
}

/// A request for `wrk` to replay.
#[derive(Debug, Clone)]
pub struct Target {
    /// Full address.
    pub url: String,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Body (a JSON text).
    pub body: String,
    /// Whether to sign it with the bench's key.
    pub signed: bool,
}

impl Target {
    /// A warm invocation of `function` with an empty event.
    pub fn invoke(endpoint: &str, function: &str) -> Target {
        Target {
            url: format!("{endpoint}/2015-03-31/functions/{function}/invocations"),
            method: "POST",
            body: "{}".into(),
            signed: true,
        }
    }

    /// `GET /healthz`.
    pub fn health(endpoint: &str) -> Target {
        Target {
            url: format!("{endpoint}/healthz"),
            method: "GET",
            body: String::new(),
            signed: false,
        }
    }

    /// The Lua script that makes `wrk` send this request, then print its latency at every
    /// 0.1% quantile and its counts.
    fn script(&self) -> String {
        // Rust's debug form of a plain ASCII string is a valid Lua string literal.
        let lua = |s: &str| format!("{s:?}");
        let mut out = format!(
            "wrk.method = {}\nwrk.body = {}\n",
            lua(self.method),
            lua(&self.body)
        );
        if let (true, Some(creds)) = (self.signed, crate::cold_start::key()) {
            let signed = spore_auth::sigv4::sign_request(
                self.method,
                &self.url,
                &[],
                self.body.as_bytes(),
                &creds,
                SystemTime::now(),
            );
            for (name, value) in signed {
                out.push_str(&format!("wrk.headers[{}] = {}\n", lua(&name), lua(&value)));
            }
        }
        out.push_str(
            r#"done = function(summary, latency, requests)
  for i = 1, 1000 do
    io.write(string.format("spore-q %.4f\n", latency:percentile(i / 10.0) / 1000.0))
  end
  local e = summary.errors
  io.write(string.format("spore-summary %d %d %d %d\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout))
end
"#,
        );
        out
    }
}

/// Runs `wrk` with `concurrency` connections on `target` for `duration`; its script goes in
/// `scratch`. A warm-up is a run of its own, so that what is read around a measured run (the
/// CPU) holds that run alone.
pub fn drive_wrk(
    wrk: &Path,
    concurrency: usize,
    duration: Duration,
    target: &Target,
    scratch: &Path,
) -> Result<Level, BenchError> {
    let script = scratch.join("spore-wrk.lua");
    std::fs::write(&script, target.script())
        .map_err(|e| BenchError::Check(format!("writing {}: {e}", script.display())))?;
    let run = |d: Duration| -> Result<String, BenchError> {
        let out = Command::new(wrk)
            .args(["-t", &concurrency.min(2).to_string()])
            .args(["-c", &concurrency.to_string()])
            .args(["-d", &format!("{}s", d.as_secs().max(1))])
            .args(["--timeout", "30s", "-s"])
            .arg(&script)
            .arg(&target.url)
            .output()
            .map_err(|e| BenchError::Check(format!("running {}: {e}", wrk.display())))?;
        if !out.status.success() {
            return Err(BenchError::Check(format!(
                "wrk failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let result = run(duration).and_then(|out| parse_wrk(&out, concurrency));
    let _ = std::fs::remove_file(&script);
    result
}

/// Reads what the script's `done` printed.
fn parse_wrk(text: &str, concurrency: usize) -> Result<Level, BenchError> {
    let mut level = Level::empty(concurrency);
    for line in text.lines() {
        if let Some(q) = line.strip_prefix("spore-q ") {
            if let Ok(ms) = q.trim().parse::<f64>() {
                level.latency_ms.push(ms);
            }
        } else if let Some(rest) = line.strip_prefix("spore-summary ") {
            let n: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [requests, duration_us, status, socket] = n[..] {
                level.completed = Some(requests.saturating_sub(status));
                level.seconds = duration_us as f64 / 1e6;
                level.errors = (status + socket) as usize;
                if status > 0 {
                    level.first_error = Some(format!("{status} responses were not 2xx or 3xx"));
                } else if socket > 0 {
                    level.first_error = Some(format!("{socket} socket errors or timeouts"));
                }
            }
        }
    }
    if level.completed.is_none() || level.latency_ms.is_empty() {
        return Err(BenchError::Check(format!(
            "wrk printed no summary: {}",
            text.chars().take(400).collect::<String>()
        )));
    }
    Ok(level)
}

/// A request the load generator sends.
pub type Request = Arc<dyn Fn(&Http) -> Result<(), BenchError> + Send + Sync>;

/// Runs `concurrency` clients sending `request` back to back for `duration`, each on a
/// keep-alive connection of its own (a warm-up is a run of its own, as for `wrk`).
pub fn drive(
    concurrency: usize,
    duration: Duration,
    request: Request,
) -> Result<Level, BenchError> {
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let request = request.clone();
            std::thread::spawn(
                move || -> Result<(Vec<f64>, usize, Option<String>), BenchError> {
                    let http = client()?;
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
    let mut level = Level::empty(concurrency);
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
    // Every client measured for `duration` from its own start; the join adds only the last
    // request's tail.
    level.seconds = duration.as_secs_f64();
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
pub fn table(invoke: &[Level], floor: &[Level], generator: &Generator) -> String {
    let mut t = format!(
        "Warm invocations of `hello`, closed loop, load generator on the same host: {}. \
         Floor: the same clients on `/healthz` (the gateway's HTTP server and nothing \
         else).\n\n\
         | clients | invoke req/s | p50 | p99 | errors | floor req/s | floor p50 | floor p99 | invoke / floor (req/s) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        generator.describe()
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
    t.push_str(&cpu_table(invoke, floor));
    t
}

/// Where the CPU went, per request, for each level that was measured for it.
fn cpu_table(invoke: &[Level], floor: &[Level]) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows: Vec<_> = invoke
        .iter()
        .map(|l| ("invoke", l))
        .chain(floor.iter().map(|l| ("floor /healthz", l)))
        .filter_map(|(what, l)| l.cpu.as_ref().map(|c| (what, l, c)))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut t = format!(
        "\nWhere the CPU went, per request (CPU time over the measured seconds divided by the \
         requests served; {cpus} CPUs give {cpus} s of CPU time a second): the daemon, the \
         processes under it (the function's runtimes, its template), the load generator, and \
         {}. Context switches are the machine's.\n\n\
         | clients | load | req/s | machine | daemon | under the daemon | load generator | rest | context switches |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        crate::cpu::REST
    );
    for (what, l, c) in rows {
        t.push_str(&format!(
            "| {} | {what} | {:.0} | {} | {:.1} |\n",
            l.concurrency,
            l.rps(),
            c.cells(false),
            c.switches
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
        let l = drive(2, Duration::from_millis(50), req).unwrap();
        assert!(!l.latency_ms.is_empty());
        assert!(l.errors > 0);
        assert_eq!(
            l.first_error.as_deref(),
            Some("Benchmark check failed: odd")
        );
        assert!(l.rps() > 0.0);
        let t = table(
            std::slice::from_ref(&l),
            std::slice::from_ref(&l),
            &Generator::Builtin,
        );
        assert!(t.contains("| 2 |"), "{t}");
        assert!(
            !t.contains("Where the CPU went"),
            "nothing was measured: {t}"
        );
        // With the CPU read, a row per load says who used it.
        let mut m = Level::empty(8);
        m.completed = Some(1000);
        m.seconds = 1.0;
        m.cpu = Some(crate::cpu::PerRequest {
            machine_us: 390.0,
            daemon_us: Some(220.0),
            under_us: Some(130.0),
            generator_us: 40.0,
            rest_us: 0.4,
            switches: 5.42,
        });
        let t = table(
            std::slice::from_ref(&m),
            std::slice::from_ref(&l),
            &Generator::Builtin,
        );
        assert!(
            t.contains("| 8 | invoke | 1000 | 390 us | 220 us | 130 us | 40 us | 0 us | 5.4 |"),
            "{t}"
        );
    }

    #[test]
    fn wrk_output_is_read_and_its_script_signs() {
        let mut text = String::from("Running 1s test @ http://x\n");
        for i in 1..=1000 {
            text.push_str(&format!("spore-q {:.4}\n", f64::from(i) / 100.0));
        }
        text.push_str("spore-summary 5000 2000000 10 0\n");
        let l = parse_wrk(&text, 8).unwrap();
        assert_eq!(l.completed, Some(4990));
        assert_eq!(l.errors, 10);
        assert!((l.rps() - 2495.0).abs() < 1e-6, "{}", l.rps());
        let s = summarize(&l.latency_ms);
        assert!(
            (s.p50 - 5.0).abs() < 0.02 && (s.p99 - 9.9).abs() < 0.02,
            "{s:?}"
        );
        assert!(parse_wrk("wrk: connection refused", 1).is_err());

        crate::cold_start::use_credentials(Some(spore_auth::Credentials {
            access_key_id: "SPKTEST".into(),
            secret_access_key: "secret".into(),
        }));
        let script = Target::invoke("http://127.0.0.1:9", "hello").script();
        assert!(script.contains("wrk.method = \"POST\""), "{script}");
        assert!(
            script.contains(
                "wrk.headers[\"authorization\"] = \"AWS4-HMAC-SHA256 Credential=SPKTEST/"
            ),
            "{script}"
        );
        let health = Target::health("http://127.0.0.1:9").script();
        assert!(!health.contains("authorization"), "{health}");
    }
}
