//! The `spore bench` commands that measure one daemon (or none): cold-start, functionbench,
//! ipc, memory-restore, snapshot-cold-start, density. Each deploys what it measures, runs
//! the measurement module of the same name, and writes and prints the results.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use spore_client::Client;
use spore_core::SandboxKind;

use super::report::{host_meta, save_and_print};
use super::setup::{deploy_samples, deploy_snapshotted, deploy_variant, Daemon};
use super::{RunOptions, SnapshotSelection};
use crate::{summarize, Series};

/// Options of `spore bench ipc`.
#[derive(Debug, Clone)]
pub struct IpcOptions {
    /// Round trips per series.
    pub n: usize,
    /// Microseconds the ring polls before sleeping on its doorbell, for the spinning series.
    pub spin_us: u64,
    /// Where results go.
    pub out: PathBuf,
}

/// `spore bench cold-start`: fresh-instance starts of `hello` in `sandbox` (container, or
/// cfork with container as the baseline) vs warm calls vs `python3 -c pass`; with cfork, also
/// cfork starts `gap` apart (default 50 ms; zero: none). A gap is refused for container,
/// which has no spaced series.
pub fn cold_start(
    endpoint: Option<&str>,
    opts: &RunOptions,
    sandbox: &str,
    gap: Option<Duration>,
) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    let sandbox: SandboxKind = sandbox.parse()?;
    let gap = match (sandbox, gap) {
        (SandboxKind::Container, Some(_)) => anyhow::bail!(
            "--gap-ms spaces the cfork starts apart: it needs --sandbox cfork (a container start \
             has no spaced series)"
        ),
        (_, gap) => gap.unwrap_or(Duration::from_millis(50)),
    };
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let (client, ep) = (&daemon.client, daemon.endpoint.clone());
    let hello = functions.join("hello");
    deploy_variant(client, &hello, "hello", SandboxKind::Container, |_| {})?;
    let cfork = match sandbox {
        SandboxKind::Cfork => {
            Some(deploy_variant(client, &hello, "hello-cfork", SandboxKind::Cfork, |_| {})?.name)
        }
        SandboxKind::Container => None,
    };
    let cfg = crate::cold_start::ColdStartConfig {
        endpoint: ep,
        container_function: "hello".into(),
        cfork_function: cfork,
        n,
        python: spore_runtime::PYTHON_INTERPRETER.to_owned(),
        max_per_series: Duration::from_secs(300),
        gap,
        daemon_pid: daemon.started.as_ref().map(|d| d.pid()),
    };
    let res = crate::cold_start::run(&cfg, &|msg| eprintln!("   {msg}"))?;
    let (baseline, floor) = match sandbox {
        SandboxKind::Cfork => (crate::cold_start::CONTAINER, crate::cold_start::CFORK_FLOOR),
        SandboxKind::Container => (crate::cold_start::FLOOR, crate::cold_start::FLOOR),
    };
    let mut table = crate::table_with_floor(&res.series, baseline, Some(floor));
    if !res.breakdown.is_empty() {
        table.push_str("\nWhere a cfork start goes (p50 per step; the steps add up to the daemon's request-to-ready time):\n\n| step | starts with it | p50 | p99 | what |\n|---|---:|---:|---:|---|\n");
        let starts = res
            .breakdown
            .iter()
            .map(|s| s.samples_ms.len())
            .max()
            .unwrap_or(0);
        for s in &res.breakdown {
            let sum = summarize(&s.samples_ms);
            table.push_str(&format!(
                "| {} | {} of {starts} | {:.3} ms | {:.3} ms | {} |\n",
                s.name,
                s.samples_ms.len(),
                sum.p50,
                sum.p99,
                crate::cold_start::step_meaning(&s.name)
            ));
        }
    }
    table.push_str(&crate::cold_start::cpu_table(&res.cpu));
    let title = format!("Spore cold start ({sandbox}) vs warm vs python3 -c pass");
    save_and_print(
        out,
        &format!("cold-start-{sandbox}"),
        &res.series,
        &table,
        host_meta(serde_json::json!({
            "sandbox": sandbox.as_str(),
            "n": n,
            "function": "hello",
            "gap_ms": gap.as_millis() as u64,
        })),
        (&title, &res.series),
    )?;
    Ok(())
}

/// `spore bench functionbench`: every sample function on a fresh instance, container vs
/// cfork.
pub fn functionbench(endpoint: Option<&str>, opts: &RunOptions) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let (client, ep) = (&daemon.client, daemon.endpoint.clone());
    let workloads = deploy_samples(client, functions)?;
    let results =
        crate::functionbench::run(&ep, &workloads, n, n, Duration::from_secs(300), &|msg| {
            eprintln!("   {msg}")
        })?;
    let table = crate::functionbench::table(&results);
    let series: Vec<Series> = results
        .iter()
        .flat_map(|(_, s)| s.iter().take(2).cloned())
        .collect();
    save_and_print(
        out,
        "functionbench",
        &series,
        &table,
        host_meta(serde_json::json!({ "n": n })),
        ("FunctionBench: fresh instance, container vs cfork", &series),
    )?;
    Ok(())
}

/// `spore bench ipc`: the shared-memory data plane alone (no daemon).
pub fn ipc(opts: &IpcOptions) -> Result<()> {
    let (n, spin_us, out) = (opts.n, opts.spin_us, &opts.out);
    eprintln!("   hop latency: {n} round trips of 1 KiB per series");
    let series = crate::ipc::hop_latency(n, 1024, Duration::from_micros(spin_us))?;
    let mut table = crate::table(&series, "unix socketpair (baseline), 1024 B");
    eprintln!("   payload sweep: sealed memfd hand-off vs memcpy");
    let sizes = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
    let rows = crate::ipc::payload_sweep(&sizes, 7)?;
    table.push_str("\nPayload hand-off (median of 7): the producer writes a sealed memfd, the consumer maps it and reads every byte; memcpy copies and reads the copy.\n\n| size | memfd hand-off | GB/s | memcpy | GB/s | hand-off / memcpy bandwidth |\n|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        table.push_str(&format!(
            "| {} KiB | {:.3} ms | {:.2} | {:.3} ms | {:.2} | {:.0}% |\n",
            r.size >> 10,
            r.memfd_ms,
            r.memfd_gbps(),
            r.memcpy_ms,
            r.memcpy_gbps(),
            100.0 * r.memfd_gbps() / r.memcpy_gbps()
        ));
    }
    save_and_print(
        out,
        "ipc",
        &series,
        &table,
        host_meta(serde_json::json!({ "n": n, "spin_us": spin_us, "sweep": rows })),
        ("Shared-memory ring hop (1 KiB) vs Unix socketpair", &series),
    )?;
    Ok(())
}

/// `spore bench memory-restore`: images of sample functions' runtimes restored into fresh
/// memory, per codec and install threads (`threads`: a comma-separated list, each 1-64).
pub fn memory_restore(
    endpoint: Option<&str>,
    opts: &RunOptions,
    selection: &SnapshotSelection,
    threads: &str,
) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    let (names, codecs, cold_cache) = snapshot_bench_args(selection)?;
    let threads = threads
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&t| (1..=64).contains(&t))
                .ok_or_else(|| anyhow::anyhow!("--threads: {t:?} is not 1..=64"))
        })
        .collect::<Result<Vec<usize>>>()?;
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let client = &daemon.client;
    // The images: each function's runtime snapshotted at an init.
    let mut images = Vec::new();
    for w in deploy_snapshotted(client, functions, &names, false)? {
        let answer = client
            .invoke_with(&w.function, w.payload.clone(), Some("init"))
            .with_context(|| format!("starting {}", w.function))?;
        if answer.function_error {
            anyhow::bail!(
                "{} failed at its init: {}",
                w.function,
                String::from_utf8_lossy(&answer.body)
            );
        }
        let list = client.get_json("/spore/v1/snapshots")?;
        let path = list["Snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["function"] == w.function.as_str() && s["error"].is_null())
            .find_map(|s| s["path"].as_str().map(PathBuf::from))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no snapshot after an init (see the daemon log)",
                    w.function
                )
            })?;
        images.push((w.function.clone(), path));
    }
    let cfg = crate::memory_restore::Config {
        n,
        codecs,
        threads,
        cold_cache,
        scratch: out.join("memory-restore").join("images"),
        max_per_series: Duration::from_secs(60),
    };
    let rows = crate::memory_restore::run(&cfg, &images, &|m| eprintln!("   {m}"))?;
    let table = crate::memory_restore::table(&rows);
    let series = crate::memory_restore::series(&rows);
    let first: Vec<Series> = series
        .iter()
        .filter(|s| {
            images
                .first()
                .is_some_and(|(f, _)| s.name.starts_with(f.as_str()))
        })
        .cloned()
        .collect();
    save_and_print(
        out,
        "memory-restore",
        &series,
        &table,
        host_meta(serde_json::json!({ "n": n, "cold_cache": cold_cache })),
        ("Memory restore alone (first function)", &first),
    )?;
    let _ = std::fs::remove_dir(out.join("memory-restore").join("images"));
    Ok(())
}

/// `spore bench snapshot-cold-start`: cold start to first response, from an init vs a restore
/// from each codec.
pub fn snapshot_cold_start(
    endpoint: Option<&str>,
    opts: &RunOptions,
    selection: &SnapshotSelection,
) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    let (names, codecs, cold_cache) = snapshot_bench_args(selection)?;
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let (client, ep) = (&daemon.client, daemon.endpoint.clone());
    let workloads = deploy_snapshotted(client, functions, &names, true)?;
    let cfg = crate::snapshot::Config {
        endpoint: ep,
        n,
        codecs,
        cold_cache,
        scratch: out.join("snapshot-cold-start").join("images"),
        max_per_series: Duration::from_secs(120),
        lazy_modes: true,
    };
    let results = crate::snapshot::run(&cfg, &workloads, &|m| eprintln!("   {m}"))?;
    let table = crate::snapshot::table(&results);
    let series: Vec<Series> = results
        .iter()
        .flat_map(|r| {
            r.series.iter().chain(&r.floor).map(|s| Series {
                name: format!("{}/{}", r.function, s.name),
                samples_ms: s.samples_ms.clone(),
            })
        })
        .collect();
    let sizes: Vec<_> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "function": r.function,
                "sizes": r.sizes,
                "floor_ms": r.floor_ms(),
                "floor_install": r.floor_install,
            })
        })
        .collect();
    let first = results
        .first()
        .map(|r| r.series.clone())
        .unwrap_or_default();
    save_and_print(
        out,
        "snapshot-cold-start",
        &series,
        &table,
        host_meta(serde_json::json!({ "n": n, "sizes": sizes, "cold_cache": cold_cache })),
        (
            "Cold start: init vs restore from a snapshot (first function)",
            &first,
        ),
    )?;
    let _ = std::fs::remove_dir(out.join("snapshot-cold-start").join("images"));
    Ok(())
}

/// `spore bench density`: memory per idle instance, `opts.n` cfork instances next to
/// `container_n` container ones (0 skips them).
pub fn density(endpoint: Option<&str>, opts: &RunOptions, container_n: usize) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    let daemon = Daemon::for_run(endpoint, "bench")?;
    let client = &daemon.client;
    let hello = functions.join("hello");
    let limit = u32::try_from(n.max(container_n) + 1)
        .unwrap_or(1024)
        .min(1024);
    let mut rows = Vec::new();
    for (name, kind, count) in [
        (
            "hello-density-container",
            SandboxKind::Container,
            container_n,
        ),
        ("hello-density-cfork", SandboxKind::Cfork, n),
    ] {
        if count == 0 {
            continue;
        }
        deploy_variant(client, &hello, name, kind, |m| {
            m.max_instances = Some(limit)
        })?;
        let d = crate::density::measure(
            &daemon.endpoint,
            name,
            kind.as_str(),
            count,
            Duration::from_secs(600),
            &|| instance_pids(client, name),
            &|m| eprintln!("   {m}"),
        )?;
        client.delete(name)?;
        std::thread::sleep(Duration::from_secs(2));
        rows.push(d);
    }
    let mut table = String::from("| kind | idle instances | host memory per instance | PSS per instance | USS per instance | would fit in this host | time to start them |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for d in &rows {
        table.push_str(&format!(
            "| {} | {} | {:.0} KiB | {:.0} KiB | {:.0} KiB | {} | {:.1} s |\n",
            d.kind,
            d.n,
            d.host_kib_per_instance,
            d.pss_kib,
            d.uss_kib,
            d.fit_in_host,
            d.start_seconds
        ));
    }
    let dir = out.join("density");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("density.json"), serde_json::to_vec_pretty(&rows)?)?;
    std::fs::write(dir.join("table.md"), &table)?;
    println!("{table}");
    println!("results: {}", dir.display());
    Ok(())
}

/// The snapshot benchmarks' shared options: sample function names, codecs, and whether the
/// dropped-page-cache series run (they need root).
fn snapshot_bench_args(
    selection: &SnapshotSelection,
) -> Result<(Vec<&str>, Vec<spore_snapshot::image::Codec>, bool)> {
    let warm_cache_only = selection.warm_cache_only;
    let names = selection
        .only
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let codecs = selection
        .codecs
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().parse().map_err(|e: String| anyhow::anyhow!(e)))
        .collect::<Result<Vec<spore_snapshot::image::Codec>>>()?;
    let cold_cache = !warm_cache_only && nix::unistd::geteuid().is_root();
    if !warm_cache_only && !cold_cache {
        eprintln!("   not root: the dropped-page-cache series are skipped");
    }
    Ok((names, codecs, cold_cache))
}

/// The pids of a function's idle instances.
fn instance_pids(client: &Client, name: &str) -> std::result::Result<Vec<i64>, crate::BenchError> {
    let v = client
        .get_json(&format!("/2015-03-31/functions/{name}"))
        .map_err(|e| crate::BenchError::Http(e.to_string()))?;
    Ok(v["Spore"]["Instances"]["IdlePids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_i64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_selection_parses() {
        let selection = SnapshotSelection {
            only: " hello, ,linpack".into(),
            codecs: "raw, lz4,".into(),
            warm_cache_only: true,
        };
        let (names, codecs, cold_cache) = snapshot_bench_args(&selection).unwrap();
        assert_eq!(names, ["hello", "linpack"]);
        assert_eq!(codecs.len(), 2);
        assert!(!cold_cache);
        let bad = SnapshotSelection {
            codecs: "lz5".into(),
            ..selection
        };
        assert!(snapshot_bench_args(&bad).is_err());
    }
}
