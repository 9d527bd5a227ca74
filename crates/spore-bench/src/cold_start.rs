//! `spore bench cold-start`: start of a fresh sandboxed Python instance, request to response
//! through the gateway, for container sandboxes and (with `--sandbox cfork`) instances forked
//! from a template, next to warm invocations and the same-run floor of a plain
//! `python3 -c pass` process start. For cfork it also reports where the start-up time goes
//! (`X-Spore-Breakdown`).

use spore_client::Http;
use std::time::{Duration, Instant};

use crate::{BenchError, Series};

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct ColdStartConfig {
    /// Daemon endpoint, e.g. `http://127.0.0.1:9000`.
    pub endpoint: String,
    /// A deployed container function (`hello`).
    pub container_function: String,
    /// The same code deployed as a cfork function, to measure cfork.
    pub cfork_function: Option<String>,
    /// Samples per series.
    pub n: usize,
    /// Interpreter for the floor (the one sandboxes use).
    pub python: String,
    /// Stop a series early after this long.
    pub max_per_series: Duration,
    /// With cfork, also a series of starts this far apart (zero: none): each then finds the
    /// work the previous start left behind (a replacement cgroup and network namespace, the
    /// instance it evicted) done, as an isolated cold start does.
    pub gap: Duration,
    /// The daemon's pid, when this run started it: the CPU each series used is then read.
    pub daemon_pid: Option<u32>,
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
    /// `X-Spore-Breakdown`, step -> ms.
    pub breakdown: Vec<(String, f64)>,
    /// `X-Spore-To-Handler-Ms`: the request reaching the daemon to the handler being called.
    pub to_handler_ms: f64,
    /// The handler's own run time (`X-Spore-Handler-End-Ns` - `X-Spore-Handler-Start-Ns`),
    /// ms; NaN when not given.
    pub handler_ms: f64,
    /// Response body.
    pub body: Vec<u8>,
}

/// The key benchmarks sign their requests with: that of the daemon under test.
static KEY: std::sync::Mutex<Option<spore_auth::Credentials>> = std::sync::Mutex::new(None);

/// Sets the key [`client`] signs with (the daemon under test's).
pub fn use_credentials(creds: Option<spore_auth::Credentials>) {
    *KEY.lock().expect("bench key lock") = creds;
}

/// The key set by [`use_credentials`].
pub fn key() -> Option<spore_auth::Credentials> {
    KEY.lock().expect("bench key lock").clone()
}

/// A blocking HTTP client for benchmarks, signing with the key set by [`use_credentials`].
pub fn client() -> Result<Http, BenchError> {
    let key = KEY.lock().expect("bench key lock").clone();
    Http::new(Duration::from_secs(120), key).map_err(|e| BenchError::Http(e.to_string()))
}

/// Invokes `function` once; checks that it succeeded.
pub fn invoke(
    client: &Http,
    endpoint: &str,
    function: &str,
    payload: &[u8],
    cold: bool,
) -> Result<Sample, BenchError> {
    invoke_with(client, endpoint, function, payload, cold.then_some("1"))
}

/// Invokes `function` once with `X-Spore-Cold: <cold>` if given; checks that it succeeded.
pub fn invoke_with(
    client: &Http,
    endpoint: &str,
    function: &str,
    payload: &[u8],
    cold: Option<&str>,
) -> Result<Sample, BenchError> {
    let headers: Vec<(&str, &str)> = cold.map(|c| ("X-Spore-Cold", c)).into_iter().collect();
    invoke_headers(client, endpoint, function, payload, &headers)
}

/// Invokes `function` once with extra request headers; checks that it succeeded.
pub fn invoke_headers(
    client: &Http,
    endpoint: &str,
    function: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) -> Result<Sample, BenchError> {
    let url = format!("{endpoint}/2015-03-31/functions/{function}/invocations");
    let t0 = Instant::now();
    let mut req = client.post(&url).body(payload.to_vec());
    for (k, v) in headers {
        req = req.header(k, v);
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
    let breakdown = header("x-spore-breakdown")
        .map(|b| {
            b.split(',')
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let to_handler_ms = header("x-spore-to-handler-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let ns = |n: &str| header(n).and_then(|v| v.parse::<u64>().ok());
    let handler_ms = match (ns("x-spore-handler-start-ns"), ns("x-spore-handler-end-ns")) {
        (Some(a), Some(b)) if b >= a && a > 0 => (b - a) as f64 / 1e6,
        _ => f64::NAN,
    };
    let failed = header("x-amz-function-error").is_some();
    let body = resp
        .bytes()
        .map_err(|e| BenchError::Http(e.to_string()))?
        .to_vec();
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
        breakdown,
        to_handler_ms,
        handler_ms,
        body,
    })
}

/// Runs `f` up to `n` times, stopping early once `max` has passed.
pub fn bounded<T>(
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

/// How many times to repeat a start, for how long at most, and how far apart.
#[derive(Debug, Clone, Copy)]
pub struct Repeat {
    /// Starts.
    pub n: usize,
    /// Stop early after this long.
    pub max: Duration,
    /// Pause before each start.
    pub gap: Duration,
}

impl Repeat {
    /// `n` starts back to back, for `max` at most.
    pub fn back_to_back(n: usize, max: Duration) -> Repeat {
        Repeat {
            n,
            max,
            gap: Duration::ZERO,
        }
    }
}

/// Each start-up step (`X-Spore-Breakdown`) of `samples` with its times, in the order steps
/// first appear: a start that had an extra step (waiting for a template or a network
/// namespace) must not shift the others.
pub fn steps_by_name(samples: &[Sample]) -> Vec<(String, Vec<f64>)> {
    let mut steps: Vec<(String, Vec<f64>)> = Vec::new();
    for s in samples {
        for (name, ms) in &s.breakdown {
            match steps.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => v.push(*ms),
                None => steps.push((name.clone(), vec![*ms])),
            }
        }
    }
    steps
}

/// Adds two series of `starts`: request to response as `latency`, and the daemon's request
/// to handler running as `to_handler`.
fn push_starts(series: &mut Vec<Series>, latency: &str, to_handler: &str, starts: &[Sample]) {
    series.push(Series {
        name: latency.into(),
        samples_ms: starts.iter().map(|s| s.latency_ms).collect(),
    });
    series.push(Series {
        name: to_handler.into(),
        samples_ms: starts.iter().map(|s| s.to_handler_ms).collect(),
    });
}

/// `repeat.n` forced fresh starts of `function`, each checked to be served as `expect`.
pub fn fresh_starts(
    client: &Http,
    endpoint: &str,
    function: &str,
    payload: &[u8],
    expect: &str,
    repeat: Repeat,
) -> Result<Vec<Sample>, BenchError> {
    bounded(repeat.n, repeat.max, || {
        std::thread::sleep(repeat.gap);
        let s = invoke(client, endpoint, function, payload, true)?;
        if s.start != expect {
            return Err(BenchError::Check(format!(
                "a forced fresh start of {function} was served {:?}, expected {expect:?}",
                s.start
            )));
        }
        Ok(s)
    })
}

/// `n` warm invocations (after one to warm up).
pub fn warm(
    client: &Http,
    endpoint: &str,
    function: &str,
    payload: &[u8],
    n: usize,
    max: Duration,
) -> Result<Vec<f64>, BenchError> {
    invoke(client, endpoint, function, payload, false)?;
    bounded(n, max, || {
        let s = invoke(client, endpoint, function, payload, false)?;
        if s.start != "warm" {
            return Err(BenchError::Check(format!(
                "expected a warm start of {function}, got {:?}",
                s.start
            )));
        }
        Ok(s.latency_ms)
    })
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct ColdStartResult {
    /// Latency series.
    pub series: Vec<Series>,
    /// cfork start-up steps (empty without cfork).
    pub breakdown: Vec<Series>,
    /// The CPU each series of starts used, per start (when the daemon's pid was given).
    pub cpu: Vec<(String, crate::cpu::PerRequest)>,
}

/// Runs `f` (a series of starts) and reads the CPU around it when `daemon` is known, per
/// start it made.
fn with_cpu(
    daemon: Option<u32>,
    f: impl FnOnce() -> Result<Vec<Sample>, BenchError>,
) -> Result<(Vec<Sample>, Option<crate::cpu::PerRequest>), BenchError> {
    let gen = crate::cpu::GeneratorIn::Self_;
    let before = daemon.and_then(|d| crate::cpu::read(Some(d), gen).ok());
    let out = f()?;
    let cpu = before.and_then(|a| {
        let b = crate::cpu::read(daemon, gen).ok()?;
        Some(crate::cpu::per_request(&a, &b, out.len() as u64))
    });
    Ok((out, cpu))
}

/// Where the CPU went per start, for each series measured for it.
pub fn cpu_table(cpu: &[(String, crate::cpu::PerRequest)]) -> String {
    if cpu.is_empty() {
        return String::new();
    }
    let mut t = format!(
        "\nWhere the CPU went, per start (the machine's CPU time over the series divided by \
         its starts, what the previous starts left behind included: eviction, clean-up, \
         replacements made ahead; by who used it: the daemon, the processes under it \
         (templates, instances, sandbox helpers), this bench's client, and {}):\n\n\
         | series | machine | daemon | under the daemon | client | rest | context switches |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        crate::cpu::REST
    );
    for (name, p) in cpu {
        t.push_str(&format!(
            "| {name} | {} | {:.0} |\n",
            p.cells(true),
            p.switches
        ));
    }
    t
}

/// Series name of the container cold start.
pub const CONTAINER: &str = "container cold (request to response)";
/// Series name of the cfork start.
pub const CFORK: &str = "cfork (request to response)";
/// Series name of the spaced cfork starts.
pub const CFORK_SPACED: &str = "cfork, starts apart (request to response)";
/// Series name of the floor.
pub const FLOOR: &str = "python3 -c pass (floor)";
/// Series name of the fork part of the cfork floor.
pub const FORK_FLOOR: &str = "fork of a warm python + reply over a pipe";
/// Series name of the cfork floor: a fork's floor plus a warm call's (no design can start a
/// forked instance and answer through the gateway faster).
pub const CFORK_FLOOR: &str = "floor: fork + pipe reply + warm call";

/// Runs the benchmark.
pub fn run(cfg: &ColdStartConfig, progress: &dyn Fn(&str)) -> Result<ColdStartResult, BenchError> {
    let client = client()?;
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
    let mut series = vec![Series {
        name: FLOOR.into(),
        samples_ms: floor,
    }];

    progress(&format!(
        "container: {} x invoke {} with X-Spore-Cold: 1",
        cfg.n, cfg.container_function
    ));
    let mut cpu = Vec::new();
    let (cold, used) = with_cpu(cfg.daemon_pid, || {
        fresh_starts(
            &client,
            &cfg.endpoint,
            &cfg.container_function,
            b"{}",
            "cold",
            Repeat::back_to_back(cfg.n, cfg.max_per_series),
        )
    })?;
    cpu.extend(used.map(|u| (CONTAINER.to_owned(), u)));
    push_starts(
        &mut series,
        CONTAINER,
        "container cold (daemon: request to handler running)",
        &cold,
    );

    let mut breakdown = Vec::new();
    if let Some(cf) = &cfg.cfork_function {
        progress(&format!(
            "cfork: {} x invoke {cf} with X-Spore-Cold: 1",
            cfg.n
        ));
        // The first start may have to start the template; it is not a fork.
        invoke(&client, &cfg.endpoint, cf, b"{}", true)?;
        let forks_apart = |gap| {
            let (n, max) = (cfg.n, cfg.max_per_series);
            with_cpu(cfg.daemon_pid, || {
                fresh_starts(
                    &client,
                    &cfg.endpoint,
                    cf,
                    b"{}",
                    "fork",
                    Repeat { n, max, gap },
                )
            })
        };
        let (forks, used) = forks_apart(Duration::ZERO)?;
        cpu.extend(used.map(|u| (CFORK.to_owned(), u)));
        push_starts(
            &mut series,
            CFORK,
            "cfork (daemon: request to handler running)",
            &forks,
        );
        series.push(Series {
            name: "cfork (daemon: request to child ready)".into(),
            samples_ms: forks.iter().map(|s| s.init_ms).collect(),
        });
        if !cfg.gap.is_zero() {
            progress(&format!(
                "cfork: {} x invoke {cf} with X-Spore-Cold: 1, {} ms apart",
                cfg.n,
                cfg.gap.as_millis()
            ));
            let (spaced, used) = forks_apart(cfg.gap)?;
            cpu.extend(used.map(|u| (CFORK_SPACED.to_owned(), u)));
            push_starts(
                &mut series,
                CFORK_SPACED,
                "cfork, starts apart (daemon: request to handler running)",
                &spaced,
            );
        }
        breakdown = steps_by_name(&forks)
            .into_iter()
            .map(|(name, samples_ms)| Series { name, samples_ms })
            .collect();
    }

    progress(&format!(
        "warm: {} x invoke {}",
        cfg.n, cfg.container_function
    ));
    let warm = warm(
        &client,
        &cfg.endpoint,
        &cfg.container_function,
        b"{}",
        cfg.n,
        cfg.max_per_series,
    )?;
    if cfg.cfork_function.is_some() {
        progress(&format!(
            "floor: {} x fork of a warm {} + reply over a pipe",
            cfg.n, cfg.python
        ));
        let fork = crate::floor::fork_reply(&cfg.python, cfg.n)?;
        series.push(crate::floor::composite(CFORK_FLOOR, &[&fork, &warm]));
        series.push(Series {
            name: FORK_FLOOR.into(),
            samples_ms: fork,
        });
    }
    series.push(Series {
        name: "warm (request to response)".into(),
        samples_ms: warm,
    });
    Ok(ColdStartResult {
        series,
        breakdown,
        cpu,
    })
}

/// What each cfork step is, for the breakdown table.
pub fn step_meaning(step: &str) -> &'static str {
    match step {
        "request" => {
            "daemon sends the fork request -> template moves into the child's cgroup, calls fork"
        }
        "forked" => "os.fork in the template (page tables, copy-on-write set-up)",
        "cgroup" => {
            "child reaches its native set-up call (Python; no attach: it is born in its cgroup)"
        }
        "unshare" => "child joins a pooled net ns, unshares mount/ipc/uts",
        "mounts" => "child mounts its /proc and /tmp (/dev/shm links to /tmp)",
        "net" => "hostname (loopback is up in pooled namespaces)",
        "privileges" => "drop to an unprivileged uid, install the seccomp filter",
        "ready" => "fds closed, RNG reseeded, ready frame sent",
        "response" => "daemon reads the child's ready frame",
        "netns_wait" => "(egress) daemon waits for a pooled net ns to be equipped with a veth",
        "template" => "the call waited for the function's cfork template to be built",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_table_names_each_series_and_who_used_the_cpu() {
        assert_eq!(cpu_table(&[]), "");
        let p = crate::cpu::PerRequest {
            machine_us: 9_500.0,
            daemon_us: Some(2_000.0),
            under_us: None,
            generator_us: 500.0,
            rest_us: 7_000.0,
            switches: 30.4,
        };
        let t = cpu_table(&[(CFORK.to_owned(), p)]);
        assert!(
            t.contains(
                "| cfork (request to response) | 9.50 ms | 2.00 ms | - | 0.50 ms | 7.00 ms | 30 |"
            ),
            "{t}"
        );
    }
}
