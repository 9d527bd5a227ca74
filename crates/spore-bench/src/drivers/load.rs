//! The `spore bench` commands that load one function with many requests at once: `burst`
//! (simultaneous first requests to a cfork function) and `throughput` (warm invocations at
//! fixed concurrency levels). Both measure their floor in the same run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use spore_core::SandboxKind;

use super::report::{host_meta, save_and_print};
use super::setup::{deploy_variant, Daemon};
use crate::{summarize, Series};

/// Options of `spore bench burst`.
#[derive(Debug, Clone)]
pub struct BurstOptions {
    /// Concurrent first requests per burst, e.g. `16,64,256`.
    pub sizes: String,
    /// Where results go.
    pub out: PathBuf,
    /// Folder of sample functions (hello is deployed from here).
    pub functions: PathBuf,
}

/// `spore bench burst`.
pub fn burst(endpoint: Option<&str>, opts: &BurstOptions) -> Result<()> {
    let sizes = crate::burst::parse_sizes(&opts.sizes)?;
    let largest = sizes.iter().copied().max().unwrap_or(1);
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let (client, ep) = (&daemon.client, daemon.endpoint.clone());
    // Where the CPU goes is read only for a daemon this run started (its pid is known).
    let daemon_pid = daemon.started.as_ref().map(|d| d.pid());
    let name = "hello-burst";
    let limit = u32::try_from(largest + 1).unwrap_or(1025);
    deploy_variant(
        client,
        &opts.functions.join("hello"),
        name,
        SandboxKind::Cfork,
        |m| m.max_instances = Some(limit),
    )?;
    let http = crate::cold_start::client()?;
    eprintln!("   warm calls and the fork floor");
    let warm = crate::cold_start::warm(&http, &ep, name, b"{}", 50, Duration::from_secs(60))?;
    let fork = crate::floor::fork_reply(spore_runtime::PYTHON_INTERPRETER, 50)?;
    let (warm_p50, fork_p50, cpus) = (
        summarize(&warm).p50,
        summarize(&fork).p50,
        crate::floor::cpus(),
    );
    let mut rows = Vec::new();
    let mut series = vec![
        Series {
            name: "warm call".into(),
            samples_ms: warm,
        },
        Series {
            name: crate::cold_start::FORK_FLOOR.into(),
            samples_ms: fork,
        },
    ];
    for &n in &sizes {
        // Each burst meets the same pool: a warm template, no idle instances.
        client
            .evict(name)
            .with_context(|| format!("evicting {name} before the burst of {n}"))?;
        crate::cold_start::invoke(&http, &ep, name, b"{}", true)?;
        client.evict(name).ok();
        crate::cold_start::invoke(&http, &ep, name, b"{}", false)?;
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("   burst of {n} simultaneous first requests");
        let fired = crate::burst::fire(&ep, name, n, daemon_pid)?;
        let r = crate::burst::row(fired, warm_p50, fork_p50, cpus);
        series.push(Series {
            name: format!("burst {n}: start overhead"),
            samples_ms: r.overhead_ms.clone(),
        });
        rows.push(r);
    }
    client.evict(name).ok();
    let mut table = crate::burst::table(&rows, warm_p50, fork_p50, cpus);
    table.push_str(&crate::burst::steps_table(&rows));
    table.push_str(&crate::burst::cpu_table(&rows, cpus));
    let plotted: Vec<Series> = series
        .iter()
        .filter(|s| s.name.starts_with("burst"))
        .cloned()
        .collect();
    save_and_print(
        &opts.out,
        "burst",
        &series,
        &table,
        host_meta(serde_json::json!({
            "sizes": sizes,
            "function": name,
            "cpus": cpus,
            "cpu": rows.iter().map(|r| serde_json::json!({"n": r.n, "cpu": r.cpu})).collect::<Vec<_>>(),
        })),
        (
            "Burst of first requests to a cfork function: start overhead",
            &plotted,
        ),
    )
}

/// Options of `spore bench throughput`.
#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    /// Concurrent clients per level, e.g. `1,8,32`.
    pub levels: String,
    /// Measured seconds per level (after one second of warm-up).
    pub seconds: u64,
    /// Where results go.
    pub out: PathBuf,
    /// Folder of sample functions (hello is deployed from here).
    pub functions: PathBuf,
}

/// `spore bench throughput`.
pub fn throughput(endpoint: Option<&str>, opts: &ThroughputOptions) -> Result<()> {
    let levels = crate::throughput::parse_levels(&opts.levels)?;
    anyhow::ensure!(
        (1..=600).contains(&opts.seconds),
        "--seconds {} is out of range: give 1 to 600 seconds per level",
        opts.seconds
    );
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let (client, ep) = (&daemon.client, daemon.endpoint.clone());
    let name = "hello-load";
    let most = levels.iter().copied().max().unwrap_or(1);
    deploy_variant(
        client,
        &opts.functions.join("hello"),
        name,
        SandboxKind::Cfork,
        |m| m.max_instances = Some(u32::try_from(most).unwrap_or(256)),
    )?;
    let (warmup, dur) = (Duration::from_secs(1), Duration::from_secs(opts.seconds));
    let generator = crate::throughput::Generator::detect();
    eprintln!("   load generator: {}", generator.describe());
    // `wrk` does not look at the answers: one invocation checked first.
    let http = crate::cold_start::client()?;
    crate::cold_start::invoke(&http, &ep, name, b"{}", false)
        .with_context(|| format!("a first invocation of {name}"))?;
    let scratch = tempfile::tempdir().context("a scratch folder for wrk's script")?;
    // Where the CPU goes is read around each measured run, after its warm-up.
    let daemon_pid = daemon.started.as_ref().map(|d| d.pid());
    let generator_in = match generator {
        crate::throughput::Generator::Wrk(_) => crate::cpu::GeneratorIn::Children,
        crate::throughput::Generator::Builtin => crate::cpu::GeneratorIn::Self_,
    };
    let run = |c: usize, what: &str, d: Duration| -> Result<crate::throughput::Level> {
        use crate::throughput::{drive, drive_wrk, health_request, invoke_request, Target};
        let target = if what == "invoke" {
            Target::invoke(&ep, name)
        } else {
            Target::health(&ep)
        };
        let level = match &generator {
            crate::throughput::Generator::Wrk(wrk) => {
                drive_wrk(wrk, c, d, &target, scratch.path())?
            }
            crate::throughput::Generator::Builtin => {
                let request = if what == "invoke" {
                    invoke_request(&ep, name)
                } else {
                    health_request(&ep)
                };
                drive(c, d, request)?
            }
        };
        Ok(level)
    };
    // Only for a daemon this run started: with another, its share would fall into the rest.
    let drive = |c: usize, what: &str| -> Result<crate::throughput::Level> {
        run(c, what, warmup)?;
        let Some(pid) = daemon_pid else {
            return run(c, what, dur);
        };
        let before = crate::cpu::read(Some(pid), generator_in)?;
        let mut level = run(c, what, dur)?;
        let after = crate::cpu::read(Some(pid), generator_in)?;
        level.cpu = Some(crate::cpu::per_request(&before, &after, level.requests()));
        Ok(level)
    };
    let (mut invoke, mut floor) = (Vec::new(), Vec::new());
    for &c in &levels {
        eprintln!("   {c} clients: invoke {name} for {} s", opts.seconds);
        let l = drive(c, "invoke")?;
        if let Some(e) = &l.first_error {
            eprintln!("   {} of the requests failed; the first: {e}", l.errors);
        }
        invoke.push(l);
        eprintln!(
            "   {c} clients: GET /healthz for {} s (floor)",
            opts.seconds
        );
        floor.push(drive(c, "floor")?);
    }
    let table = crate::throughput::table(&invoke, &floor, &generator);
    let series: Vec<Series> = invoke
        .iter()
        .map(|l| (l, "invoke"))
        .chain(floor.iter().map(|l| (l, "floor /healthz")))
        .map(|(l, what)| Series {
            name: format!("{what}, {} clients", l.concurrency),
            samples_ms: l.latency_ms.clone(),
        })
        .collect();
    let rps: Vec<_> = invoke
        .iter()
        .zip(&floor)
        .map(|(i, f)| serde_json::json!({"clients": i.concurrency, "invoke_rps": i.rps(), "floor_rps": f.rps(), "errors": i.errors, "invoke_cpu_per_request": i.cpu, "floor_cpu_per_request": f.cpu}))
        .collect();
    save_and_print(
        &opts.out,
        "throughput",
        &series,
        &table,
        host_meta(
            serde_json::json!({ "levels": levels, "seconds": opts.seconds, "rps": rps, "generator": generator.describe() }),
        ),
        ("Warm invocation latency under load", &series),
    )
}
