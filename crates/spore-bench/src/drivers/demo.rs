//! `spore demo`: starts (or finds) a daemon, deploys the sample functions, and shows what
//! Spore does in one run: cold starts in containers and by cfork, warm calls, snapshots,
//! function DAGs, a second processing unit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use spore_client::{Client, ManagedDaemon};
use spore_core::SandboxKind;

use super::dag::{dag_hops, dag_run, deploy_dags};
use super::setup::{deploy_on, deploy_samples, deploy_snapshotted, deploy_variant, Daemon};
use super::shim::{join_token, ShimProcess};
use crate::summarize;

/// Options of `spore demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder of sample functions.
    pub functions: PathBuf,
    /// Warm invocations per function.
    pub warm: usize,
    /// Cold invocations per function.
    pub cold: usize,
}

/// `spore demo`.
pub fn run(endpoint: Option<&str>, opts: &DemoOptions) -> Result<()> {
    let daemon = Daemon::for_run(endpoint, "demo")?;
    let (client, ep) = (&daemon.client, &daemon.endpoint);
    println!(
        "== deploying the sample functions from {} (each as a container and as a cfork function)",
        opts.functions.display()
    );
    let workloads = deploy_samples(client, &opts.functions)?;
    for w in &workloads {
        println!("   {:<18} -> {} and {}", w.container, w.container, w.cfork);
    }
    println!(
        "== invoking each: {} fresh containers, {} cfork starts, {} warm",
        opts.cold, opts.cold, opts.warm
    );
    let results = crate::functionbench::run(
        ep,
        &workloads,
        opts.cold.max(1),
        opts.warm.max(1),
        Duration::from_secs(120),
        &|msg| println!("   {msg}"),
    )?;
    println!();
    println!("== latency of one invocation, request to response through the HTTP API (p50 / p99)");
    print!("{}", crate::functionbench::table(&results));
    for w in workloads.iter().take(1) {
        let ans = client.invoke(&w.cfork, w.payload.clone(), true)?;
        println!();
        println!(
            "a cfork start of {} ({}, {:.2} ms in the daemon) answered: {}",
            w.cfork,
            ans.start,
            ans.init_ms,
            String::from_utf8_lossy(&ans.body)
        );
    }
    let floor = summarize(&floor_samples(20));
    println!();
    println!(
        "floor: `{} -c pass` p50 {:.1} ms (n={})",
        spore_runtime::PYTHON_INTERPRETER,
        floor.p50,
        floor.n
    );
    demo_snapshots(client, ep, &opts.functions, opts.cold.max(3))?;
    demo_dags(client, &opts.functions.join("dag"))?;
    demo_units(
        client,
        daemon.started.as_ref(),
        &opts.functions,
        opts.warm.max(5),
    )?;
    Ok(())
}

/// The demo's processing-units part: a second unit (a shim on loopback), `hello` pinned to it
/// as a cfork function, started and called across the link next to the same on unit 0.
fn demo_units(
    client: &Client,
    daemon: Option<&ManagedDaemon>,
    functions: &Path,
    n: usize,
) -> Result<()> {
    println!();
    println!("== processing units: a shim as unit 1 (on loopback), hello forked and called there");
    let Some(daemon) = daemon else {
        println!("   skipped: the demo uses the daemon at the endpoint, which it did not start with --link-listen");
        return Ok(());
    };
    let link = std::fs::read_to_string(daemon.data_dir().join("run/link-endpoint"))
        .context("reading the daemon's link endpoint")?;
    let token = join_token(daemon.data_dir())?;
    let shim = ShimProcess::spawn(
        None,
        1,
        link.trim(),
        &token,
        &PathBuf::from(".spore").join("demo"),
        &[],
    )?;
    shim.wait_up(client)?;
    let hello = functions.join("hello");
    for unit in [0u32, 1] {
        deploy_on(
            client,
            &hello,
            &format!("hello-unit{unit}"),
            SandboxKind::Cfork,
            unit,
        )?;
    }
    println!("   | function | unit | cfork start p50 | warm call p50 |\n   |---|---:|---:|---:|");
    for unit in [0u32, 1] {
        let name = format!("hello-unit{unit}");
        let mut times = [Vec::new(), Vec::new()];
        for (i, cold) in [Some("fork"), None].into_iter().enumerate() {
            client.invoke_with(&name, b"{}".to_vec(), cold)?;
            for _ in 0..n {
                let t = Instant::now();
                let a = client.invoke_with(&name, b"{}".to_vec(), cold)?;
                anyhow::ensure!(a.unit == unit.to_string(), "{name} ran on unit {}", a.unit);
                times[i].push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        println!(
            "   | {name} | {unit} | {:.2} ms | {:.3} ms |",
            summarize(&times[0]).p50,
            summarize(&times[1]).p50
        );
    }
    // A DAG spread over both units: a (unit 0) -> b (unit 1, a node pin) -> c (unit 0).
    let step = functions.join("dag").join("chain-step");
    deploy_on(client, &step, "demo-step", SandboxKind::Cfork, 0)?;
    deploy_variant(client, &step, "demo-step-any", SandboxKind::Cfork, |m| {
        m.unit = None
    })?;
    client.put_dag(
        "name = \"demo-units\"\ntransport = \"shm\"\n\
         [[nodes]]\nid = \"a\"\nfunction = \"demo-step\"\n\
         [[nodes]]\nid = \"b\"\nfunction = \"demo-step-any\"\nafter = [\"a\"]\nunit = 1\n\
         [[nodes]]\nid = \"c\"\nfunction = \"demo-step\"\nafter = [\"b\"]\n",
    )?;
    let input = serde_json::json!({"n": 0});
    dag_run(client, "demo-units", &input, "shm")?;
    let (mut total, mut hops, mut last) = (Vec::new(), Vec::new(), serde_json::Value::Null);
    for _ in 0..n {
        let (ms, v) = dag_run(client, "demo-units", &input, "shm")?;
        total.push(ms);
        hops.extend(dag_hops(&v, None));
        last = v;
    }
    println!(
        "   DAG a(unit 0) -> b(unit 1) -> c(unit 0), transport {}: result {}, {:.2} ms p50 end to end, hop p50 {:.0} us (cross-unit, n={})",
        last["Timing"]["transport"].as_str().unwrap_or("?"),
        last["Result"],
        summarize(&total).p50,
        summarize(&hops).p50 * 1000.0,
        hops.len()
    );
    println!(
        "   (`spore units` lists the units; `spore bench xpu` measures them in network namespaces)"
    );
    drop(shim);
    Ok(())
}

/// The demo's snapshot part: `hello` and `linpack` snapshotted at their first init, then
/// started by importing (init) and by restoring.
fn demo_snapshots(client: &Client, ep: &str, functions: &Path, n: usize) -> Result<()> {
    println!();
    println!(
        "== snapshots: hello and linpack (numpy) copied at their first init, then {n} starts by init and {n} by restore"
    );
    let workloads = deploy_snapshotted(client, functions, &["hello", "linpack"], true)?;
    let scratch = tempfile::tempdir()?;
    let cfg = crate::snapshot::Config {
        endpoint: ep.to_owned(),
        n,
        codecs: vec![spore_snapshot::image::Codec::None],
        cold_cache: false,
        scratch: scratch.path().to_owned(),
        max_per_series: Duration::from_secs(60),
        lazy_modes: false,
    };
    let results = crate::snapshot::run(&cfg, &workloads, &|m| println!("   {m}"))?;
    println!();
    print!("{}", crate::snapshot::table(&results));
    Ok(())
}

/// The demo's DAG part: the Alexa skill and a 10-function chain, over shared memory and
/// over HTTP through the gateway.
fn demo_dags(client: &Client, dir: &Path) -> Result<()> {
    println!();
    if !dir.is_dir() {
        println!("(no DAGs: {} is missing)", dir.display());
        return Ok(());
    }
    println!(
        "== function DAGs from {}: the first run starts and wires the instances, later ones reuse the pipeline",
        dir.display()
    );
    let dags = deploy_dags(client, dir)?;
    println!("   deployed: {}", dags.join(", "));
    let runs = 20;
    let cases = [
        (
            "alexa",
            serde_json::json!({"user": "ann", "utterance": "open the door, lights on, watch TV"}),
        ),
        (
            "pychain",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
    ];
    println!();
    println!(
        "| DAG | transport | first run | warm p50 (n={runs}) | hop p50 |\n|---|---|---:|---:|---:|"
    );
    for (name, input) in &cases {
        for transport in ["shm", "http"] {
            let (first, _) = dag_run(client, name, input, transport)?;
            let mut e2e = Vec::with_capacity(runs);
            let mut hops = Vec::new();
            for _ in 0..runs {
                let (ms, v) = dag_run(client, name, input, transport)?;
                e2e.push(ms);
                hops.extend(dag_hops(&v, None));
            }
            println!(
                "| {name} | {transport} | {first:.2} ms | {:.2} ms | {:.0} us |",
                summarize(&e2e).p50,
                summarize(&hops).p50 * 1000.0
            );
        }
    }
    let (_, answer) = dag_run(client, "alexa", &cases[0].1, "shm")?;
    println!();
    println!("the Alexa skill answered: {}", answer["Result"]);
    Ok(())
}

/// Starts of `python3 -c pass`, ms: the floor under any Python start.
fn floor_samples(n: usize) -> Vec<f64> {
    (0..n)
        .filter_map(|_| {
            let t0 = Instant::now();
            let ok = std::process::Command::new(spore_runtime::PYTHON_INTERPRETER)
                .args(["-c", "pass"])
                .status()
                .ok()?
                .success();
            ok.then(|| t0.elapsed().as_secs_f64() * 1000.0)
        })
        .collect()
}
