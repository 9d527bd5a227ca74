//! The CLI's commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use spore_bench::{summarize, Series};
use spore_control::{Control, ControlConfig};
use spore_core::FunctionManifest;

use crate::client::Client;
use crate::daemon::ManagedDaemon;
use crate::{BenchCommand, DemoArgs, ServeArgs};

fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/spore");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("spore")
}

/// `spore serve`.
pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let exe = std::env::current_exe().context("locating the spore binary")?;
    let mut cfg = ControlConfig::new(data_dir.clone(), exe);
    cfg.packages_dir = args.packages_dir.clone();
    cfg.max_instances = args.max_instances;
    cfg.keep_alive = Duration::from_secs(args.keep_alive_s);
    cfg.cpu_millis = args.cpu_millis;
    cfg.pids_max = args.pids_max;
    cfg.tmp_mb = args.tmp_mb;
    let grace = Duration::from_secs(args.grace_s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let (control, warnings) = Control::open(cfg).with_context(|| format!("opening the data dir {}", data_dir.display()))?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let endpoint_file = data_dir.join("run").join("endpoint");
        spore_control::store::write_atomic(&endpoint_file, endpoint.as_bytes()).context("writing the endpoint file")?;
        let metrics = spore_gateway::install_metrics();
        control.spawn_reaper();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(spore_gateway::serve(listener, control.clone(), metrics, async {
            let _ = stop_rx.await;
        }));
        tracing::info!("spore listening on {endpoint} (data dir {})", data_dir.display());
        tokio::select! {
            res = &mut server => {
                let _ = std::fs::remove_file(&endpoint_file);
                control.shutdown(Duration::ZERO).await;
                res.context("the HTTP server task failed")?.context("the HTTP server failed")?;
                bail!("the HTTP server stopped unexpectedly");
            }
            sig = shutdown_signal() => tracing::info!("{sig}: shutting down, letting in-flight invocations finish (up to {}s)", grace.as_secs()),
        }
        let _ = stop_tx.send(());
        control.shutdown(grace).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        let _ = std::fs::remove_file(&endpoint_file);
        tracing::info!("stopped; all sandboxes removed");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        unreachable!()
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn read_manifest(dir: &Path) -> Result<FunctionManifest> {
    let path = dir.join("spore.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: a function folder needs a spore.toml",
            path.display()
        )
    })?;
    FunctionManifest::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

fn deploy_dir(client: &Client, dir: &Path) -> Result<FunctionManifest> {
    let m = read_manifest(dir)?;
    let zip = spore_control::code::zip_dir(dir)
        .with_context(|| format!("packaging {}", dir.display()))?;
    client
        .deploy(&m, &zip)
        .with_context(|| format!("deploying {}", m.name))?;
    Ok(m)
}

/// `spore deploy DIR`.
pub fn deploy(endpoint: &str, dir: &Path) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let m = deploy_dir(&client, dir)?;
    println!(
        "deployed {} ({}, handler {}, {} MB, {} s timeout, sandbox {})",
        m.name, m.runtime, m.handler, m.memory_mb, m.timeout_s, m.sandbox
    );
    Ok(ExitCode::SUCCESS)
}

fn read_payload(arg: &str) -> Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some(file) => {
            std::fs::read(file).with_context(|| format!("reading the payload file {file}"))
        }
        None => Ok(arg.as_bytes().to_vec()),
    }
}

/// `spore invoke NAME`.
pub fn invoke(
    endpoint: &str,
    name: &str,
    payload: &str,
    cold: bool,
    log: bool,
    verbose: bool,
) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let ans = client.invoke(name, read_payload(payload)?, cold)?;
    if verbose {
        eprintln!(
            "start={} init_ms={:.2} duration_ms={:.2}",
            ans.start, ans.init_ms, ans.duration_ms
        );
    }
    if log {
        if let Some(l) = &ans.log {
            eprint!("{l}");
        }
    }
    println!("{}", String::from_utf8_lossy(&ans.body));
    Ok(if ans.function_error {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// `spore ls`.
pub fn ls(endpoint: &str) -> Result<ExitCode> {
    let list = Client::new(endpoint)?.get_json("/2015-03-31/functions")?;
    let functions = list["Functions"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<24} {:<8} {:<24} {:>7} {:>8}  LAST MODIFIED",
        "NAME", "RUNTIME", "HANDLER", "MEMORY", "TIMEOUT"
    );
    for f in &functions {
        println!(
            "{:<24} {:<8} {:<24} {:>4} MB {:>6} s  {}",
            f["FunctionName"].as_str().unwrap_or("?"),
            f["Runtime"].as_str().unwrap_or("?"),
            f["Handler"].as_str().unwrap_or("?"),
            f["MemorySize"],
            f["Timeout"],
            f["LastModified"].as_str().unwrap_or("?")
        );
    }
    if functions.is_empty() {
        println!("(no functions deployed; try `spore deploy functions/hello`)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore rm NAME`.
pub fn rm(endpoint: &str, name: &str) -> Result<ExitCode> {
    Client::new(endpoint)?.delete(name)?;
    println!("deleted {name}");
    Ok(ExitCode::SUCCESS)
}

/// `spore logs NAME`.
pub fn logs(endpoint: &str, name: &str, lines: usize) -> Result<ExitCode> {
    let v = Client::new(endpoint)?
        .get_json(&format!("/spore/v1/functions/{name}/logs?lines={lines}"))?;
    for l in v["lines"].as_array().into_iter().flatten() {
        println!("{}", l.as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

/// Uses the daemon at `endpoint` if it answers, else starts one under `.spore/<what>`.
fn daemon_for(endpoint: &str, what: &str) -> Result<(Client, Option<ManagedDaemon>)> {
    let client = Client::new(endpoint)?;
    if client.healthy() {
        eprintln!("using the daemon at {endpoint}");
        return Ok((client, None));
    }
    let dir = PathBuf::from(".spore").join(what);
    eprintln!(
        "no daemon at {endpoint}; starting one (log: {}/daemon.log)",
        dir.display()
    );
    let packages = std::env::var_os("SPORE_PACKAGES_DIR").map(PathBuf::from);
    let d = ManagedDaemon::start(&dir, packages)?;
    Ok((Client::new(&d.endpoint)?, Some(d)))
}

fn function_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("reading the functions folder {} (run from the repository root, or pass --functions)", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("spore.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

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

/// `spore demo`.
pub fn demo(endpoint: &str, args: DemoArgs) -> Result<ExitCode> {
    let dirs = function_dirs(&args.functions)?;
    let (client, _daemon) = daemon_for(endpoint, "demo")?;
    println!(
        "== deploying {} sample functions from {}",
        dirs.len(),
        args.functions.display()
    );
    let mut rows = Vec::new();
    let mut failures = 0;
    for dir in &dirs {
        let m = deploy_dir(&client, dir)?;
        let payload = std::fs::read(dir.join("event.json")).unwrap_or_else(|_| b"{}".to_vec());
        print!("   {:<18} cold x{} ", m.name, args.cold);
        let mut cold = Vec::new();
        let mut init = Vec::new();
        let mut warm = Vec::new();
        let mut result = String::new();
        for i in 0..args.cold + args.warm {
            let is_cold = i < args.cold;
            let t0 = Instant::now();
            let ans = client.invoke(&m.name, payload.clone(), is_cold)?;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if ans.function_error {
                result = format!("ERROR {}", String::from_utf8_lossy(&ans.body));
                failures += 1;
                break;
            }
            if is_cold {
                cold.push(ms);
                init.push(ans.init_ms);
            } else {
                warm.push(ms);
            }
            result = String::from_utf8_lossy(&ans.body).into_owned();
            if i + 1 == args.cold {
                print!("warm x{} ", args.warm);
            }
        }
        println!("done");
        let mut short: String = result.chars().take(46).collect();
        if result.chars().count() > 46 {
            short.push_str("...");
        }
        rows.push((
            m.name.clone(),
            summarize(&cold),
            summarize(&init),
            summarize(&warm),
            short,
        ));
    }
    let floor = summarize(&floor_samples(20));
    println!();
    println!("== cold vs warm invocation latency (client-side, through the HTTP API; container sandboxes)");
    println!(
        "{:<18} {:>10} {:>12} {:>10} {:>10}  result",
        "function", "cold p50", "init p50", "warm p50", "warm p99"
    );
    for (name, c, i, w, r) in &rows {
        println!(
            "{name:<18} {:>7.1} ms {:>9.1} ms {:>7.2} ms {:>7.2} ms  {r}",
            c.p50, i.p50, w.p50, w.p99
        );
    }
    println!();
    println!("floor: `{} -c pass` p50 {:.1} ms (n={}) -- a cold start above includes this, plus the sandbox and the imports", spore_runtime::PYTHON_INTERPRETER, floor.p50, floor.n);
    println!("not in this build yet: cfork starts, snapshot restores, DAGs (they return a clear error if asked for)");
    Ok(if failures > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// `spore bench ...`.
pub fn bench(endpoint: &str, which: BenchCommand) -> Result<ExitCode> {
    match which {
        BenchCommand::ColdStart {
            sandbox,
            n,
            out,
            functions,
        } => {
            if sandbox != "container" {
                bail!("sandbox kind {sandbox:?} cannot be benchmarked in this build: only \"container\" is available");
            }
            let (client, daemon) = daemon_for(endpoint, "bench")?;
            let m = deploy_dir(&client, &functions.join("hello"))?;
            let ep = daemon
                .as_ref()
                .map_or(endpoint.to_owned(), |d| d.endpoint.clone());
            let cfg = spore_bench::cold_start::ColdStartConfig {
                endpoint: ep,
                function: m.name,
                n,
                python: spore_runtime::PYTHON_INTERPRETER.to_owned(),
                max_per_series: Duration::from_secs(300),
            };
            let series: Vec<Series> =
                spore_bench::cold_start::run(&cfg, &|msg| eprintln!("   {msg}"))?;
            let table = spore_bench::table(&series, "python3 -c pass (floor)");
            let dir = out.join("cold-start");
            let meta = serde_json::json!({ "sandbox": sandbox, "n": n, "function": "hello", "host_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) });
            let files = spore_bench::write_results(&dir, "cold-start", &series, &table, meta)?;
            let png = dir.join("cold-start.png");
            match spore_bench::plot::cdf(
                &png,
                "Spore cold start (container) vs warm vs python3 -c pass",
                &series,
            ) {
                Ok(()) => eprintln!("   plot: {}", png.display()),
                Err(e) => eprintln!("   no plot: {e}"),
            }
            println!("{table}");
            println!(
                "results: {}, {}, {}",
                files.csv.display(),
                files.json.display(),
                files.markdown.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
