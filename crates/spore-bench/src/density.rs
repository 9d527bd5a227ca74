//! `spore bench density`: memory cost of idle instances. N fresh instances of `hello` are
//! started and left idle in the pool; the cost per instance is the drop in the host's
//! `MemAvailable` (everything: processes, page tables, namespaces, cgroups, kernel objects)
//! divided by N, next to the processes' own PSS and USS from `smaps_rollup`. Container
//! instances are measured the same way in the same run, as the baseline.

use std::time::Duration;

use serde::Serialize;

use crate::cold_start::{client, invoke};
use crate::BenchError;

/// Memory figures of one kind of instance.
#[derive(Debug, Clone, Serialize)]
pub struct Density {
    /// Sandbox kind.
    pub kind: String,
    /// Instances started.
    pub n: usize,
    /// Host memory per instance (`MemAvailable` drop / n), KiB.
    pub host_kib_per_instance: f64,
    /// Proportional set size of an instance (all its processes), KiB.
    pub pss_kib: f64,
    /// Unique set size (private pages) of an instance, KiB.
    pub uss_kib: f64,
    /// Instances that fit in the host's total memory at this cost.
    pub fit_in_host: u64,
    /// Seconds it took to start them.
    pub start_seconds: f64,
}

fn meminfo(key: &str) -> Result<u64, BenchError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| BenchError::Check(format!("reading /proc/meminfo: {e}")))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| BenchError::Check(format!("{key} missing from /proc/meminfo")))
}

fn rollup(pid: i64) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(k)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    Some((
        field("Pss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    ))
}

/// Starts `n` idle instances of `function` (deployed with `max_instances >= n`) and measures
/// them. `pids` lists the host pids of the function's instances (from the daemon).
pub fn measure(
    endpoint: &str,
    function: &str,
    kind: &str,
    n: usize,
    max: Duration,
    pids: &dyn Fn() -> Result<Vec<i64>, BenchError>,
    progress: &dyn Fn(&str),
) -> Result<Density, BenchError> {
    let client = client()?;
    // One start first, so that a cfork template exists before the baseline is read.
    invoke(&client, endpoint, function, b"{}", false)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = meminfo("MemAvailable:")?;
    let t0 = std::time::Instant::now();
    let mut started = 0;
    for i in 0..n {
        invoke(&client, endpoint, function, b"{}", true)?;
        started += 1;
        if (i + 1) % 100 == 0 {
            progress(&format!("{kind}: {} idle instances", i + 1));
        }
        if t0.elapsed() > max {
            progress(&format!(
                "{kind}: stopping at {started} instances (time limit)"
            ));
            break;
        }
    }
    let start_seconds = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let after = meminfo("MemAvailable:")?;
    let total = meminfo("MemTotal:")?;
    let mut pss = Vec::new();
    let mut uss = Vec::new();
    for pid in pids()? {
        if let Some((p, u)) = rollup(pid) {
            pss.push(p as f64);
            uss.push(u as f64);
        }
    }
    // Per instance, not per process: a container instance has its init beside the runtime.
    let per_instance = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / started.max(1) as f64
        }
    };
    let per = before.saturating_sub(after) as f64 / started.max(1) as f64;
    Ok(Density {
        kind: kind.to_owned(),
        n: started,
        host_kib_per_instance: per,
        pss_kib: per_instance(&pss),
        uss_kib: per_instance(&uss),
        fit_in_host: if per > 0.0 {
            (total as f64 / per) as u64
        } else {
            0
        },
        start_seconds,
    })
}
