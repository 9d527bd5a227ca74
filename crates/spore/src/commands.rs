//! The CLI's commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use spore_bench::{summarize, Series};
use spore_control::{Control, ControlConfig};
use spore_core::{FunctionManifest, SandboxKind};

use spore_client::{read_manifest, Client, ManagedDaemon};

use crate::{BenchCommand, DemoArgs, ServeArgs, ShimArgs};

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

/// `spore shim`.
pub fn shim(args: ShimArgs) -> Result<ExitCode> {
    let accelerators = match args.accelerator.as_slice() {
        [] => None,
        [one] if one == "none" => Some(Vec::new()),
        many => Some(many.to_vec()),
    };
    let unit = spore_shim::UnitInfo::detect(args.id, args.arch.clone(), accelerators);
    serve(args.serve, Some((unit, args.control)))
}

/// `spore units`.
pub fn units(endpoint: &str) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let v = client.units()?;
    let units = v["Units"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<5} {:<5} {:<8} {:>5} {:>8} {:<12} {:>8} {:>9} {:<22} FUNCTIONS",
        "UNIT", "STATE", "ARCH", "CORES", "MEM_MB", "ACCEL", "INFLIGHT", "INSTANCES", "PEER"
    );
    for u in units {
        let accel: Vec<&str> = u["accelerators"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let funcs: Vec<&str> = u["functions"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let peer = if u["local"].as_bool() == Some(true) {
            "(control plane)".to_owned()
        } else {
            u["peer"].as_str().unwrap_or("").to_owned()
        };
        println!(
            "{:<5} {:<5} {:<8} {:>5} {:>8} {:<12} {:>8} {:>9} {:<22} {}",
            u["id"].to_string(),
            u["state"].as_str().unwrap_or("?"),
            u["arch"].as_str().unwrap_or("?"),
            u["cores"].to_string(),
            u["memory_mb"].to_string(),
            if accel.is_empty() {
                "-".to_owned()
            } else {
                accel.join(",")
            },
            u["inflight"].to_string(),
            u["load"]["instances"].to_string(),
            peer,
            funcs.join(","),
        );
        if let Some(e) = u["etcd"].as_str() {
            println!("      etcd: {e}");
        }
        if let Some(addr) = u["link"].as_str() {
            let linked: Vec<String> = u["load"]["neighbours"]
                .as_array()
                .map(|a| a.iter().map(|x| x.to_string()).collect())
                .unwrap_or_default();
            println!(
                "      takes neighbour links on {addr}; linked to units: {}",
                if linked.is_empty() {
                    "none yet".to_owned()
                } else {
                    linked.join(",")
                }
            );
        }
        if u["state"] == "down" {
            println!(
                "      down for {:.0} s: {}",
                u["since_s"].as_f64().unwrap_or(0.0),
                u["reason"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore serve`, or with `shim` (this unit, the control plane's link address) a shim.
pub fn serve(
    args: ServeArgs,
    shim: Option<(spore_shim::UnitInfo, Option<String>)>,
) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A shim's --link-listen takes neighbour links from other shims; its address is part of
    // the unit's description, so it is bound before the unit greets anyone.
    let mut shim = shim;
    let neighbour_listener = match (&mut shim, &args.link_listen) {
        (Some((unit, _)), Some(addr)) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--link-listen {addr}"))?;
            l.set_nonblocking(true)?;
            let bound = l.local_addr()?;
            anyhow::ensure!(
                !bound.ip().is_unspecified(),
                "--link-listen {addr}: give the address other units reach this one at (it is announced to them), not {}",
                bound.ip()
            );
            unit.link = Some(bound.to_string());
            Some(l)
        }
        _ => None,
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(|| match &shim {
        Some((u, _)) => default_data_dir().join(format!("unit-{}", u.id)),
        None => default_data_dir(),
    });
    let listen = args.listen.clone().unwrap_or_else(|| {
        if shim.is_some() {
            "127.0.0.1:0"
        } else {
            "127.0.0.1:9000"
        }
        .to_owned()
    });
    let exe = std::env::current_exe().context("locating the spore binary")?;
    let mut cfg = ControlConfig::new(data_dir.clone(), exe);
    cfg.packages_dir = args.packages_dir.clone();
    cfg.max_instances = args.max_instances;
    cfg.keep_alive = Duration::from_secs(args.keep_alive_s);
    cfg.cpu_millis = args.cpu_millis;
    cfg.pids_max = args.pids_max;
    cfg.tmp_mb = args.tmp_mb;
    cfg.idle_memory_mb = args.idle_memory_mb;
    cfg.unit = shim.as_ref().map(|(u, _)| u.clone());
    cfg.snapshot_mode = args
        .snapshot_mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--snapshot-mode: {e}"))?;
    cfg.snapshot_codec = args
        .snapshot_codec
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--snapshot-codec: {e}"))?;
    let etcd = args
        .etcd
        .as_deref()
        .map(|e| spore_control::etcd::Etcd::new(e, &args.etcd_prefix))
        .transpose()
        .context("--etcd")?;
    if etcd.is_some() && shim.is_none() && args.link_listen.is_none() {
        bail!("--etcd announces the control plane's link address: give --link-listen too");
    }
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
        let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listening on {listen}"))?;
        let link_file = data_dir.join("run").join("link-endpoint");
        // Stops the shim's dialing and the etcd registrations at shutdown.
        let (shim_stop, shim_stop_rx) = tokio::sync::watch::channel(false);
        if let Some(l) = neighbour_listener {
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!("accepting neighbour links from other shims on {}", l.local_addr()?);
            let c = control.clone();
            tokio::spawn(async move { c.serve_neighbours(l).await });
        } else if let Some(addr) = &args.link_listen {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--link-listen {addr}"))?;
            let bound = l.local_addr()?.to_string();
            spore_control::store::write_atomic(&link_file, bound.as_bytes()).context("writing the link endpoint file")?;
            tracing::info!("accepting unit links on {bound}");
            let c = control.clone();
            tokio::spawn(async move { c.serve_links(l).await });
            if let (Some(client), None) = (&etcd, &shim) {
                let c = control.clone();
                let (client, stop) = (client.clone(), shim_stop_rx.clone());
                tokio::spawn(async move { c.join_etcd(client, bound, stop).await });
            }
        }
        let shim_task = shim.map(|(unit, addr)| {
            tracing::info!(unit = unit.id, arch = %unit.arch, accelerators = ?unit.accelerators, control = ?addr, "running as a unit's shim");
            let c = control.clone();
            let stop = shim_stop_rx.clone();
            tokio::spawn(async move { c.run_shim(addr, etcd, stop).await })
        });
        let endpoint = format!("http://{}", listener.local_addr()?);
        control.set_gateway_url(endpoint.clone());
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
        let _ = shim_stop.send(true);
        if let Some(t) = shim_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        // Let the etcd registrations delete their keys.
        if args.etcd.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = std::fs::remove_file(&link_file);
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

/// `spore deploy DIR`.
pub fn deploy(endpoint: &str, dir: &Path) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let m = read_manifest(dir)?;
    client.deploy_dir(dir, &m)?;
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
    cold: Option<&str>,
    log: bool,
    verbose: bool,
) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let ans = client.invoke_with(name, read_payload(payload)?, cold)?;
    if verbose {
        eprintln!(
            "start={} unit={} init_ms={:.2} duration_ms={:.2}",
            ans.start, ans.unit, ans.init_ms, ans.duration_ms
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

/// `spore snapshot ...`.
/// `spore evict NAME`.
pub fn evict(endpoint: &str, name: &str) -> Result<ExitCode> {
    let v = Client::new(endpoint)?.evict(name)?;
    let template = if v["Template"].as_bool() == Some(true) {
        " and its cfork template"
    } else {
        ""
    };
    let next = if v["Restorable"].as_bool() == Some(true) {
        "restores from its snapshot"
    } else {
        "starts from scratch (no snapshot)"
    };
    println!(
        "evicted {name}: {} idle instances{template}; its next start {next}",
        v["Instances"]
    );
    Ok(ExitCode::SUCCESS)
}

pub fn snapshot(endpoint: &str, which: crate::SnapshotCommand) -> Result<ExitCode> {
    use crate::SnapshotCommand as S;
    match which {
        S::Ls => {
            let list = Client::new(endpoint)?.get_json("/spore/v1/snapshots")?;
            println!(
                "{:<20} {:>4} {:>9} {:>9} {:>9} {:>6} {:<8} STATE",
                "FUNCTION", "REV", "FILE", "MAPPED", "STORED", "ZERO", "CODEC"
            );
            let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1048576.0;
            for s in list["Snapshots"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<20} {:>4} {:>7.1}Mi {:>7.1}Mi {:>7.1}Mi {:>6} {:<8} {}",
                    s["function"].as_str().unwrap_or("?"),
                    s["revision"],
                    mib(&s["file_bytes"]),
                    mib(&s["mapped_bytes"]),
                    s["stored_pages"].as_f64().unwrap_or(0.0) * 4096.0 / 1048576.0,
                    s["zero_pages"],
                    s["codec"].as_str().unwrap_or(""),
                    s["error"].as_str().unwrap_or("ok"),
                );
            }
        }
        S::Inspect { target } => {
            let path = if target.exists() {
                target
            } else {
                let list = Client::new(endpoint)?.get_json("/spore/v1/snapshots")?;
                let name = target.to_string_lossy();
                let found = list["Snapshots"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .rfind(|s| s["function"] == *name)
                    .ok_or_else(|| {
                        anyhow::anyhow!("no file and no snapshot of a function named {name}")
                    })?;
                PathBuf::from(found["path"].as_str().unwrap_or_default())
            };
            inspect_snapshot(&path)?;
        }
        S::Rm { name } => {
            Client::new(endpoint)?.delete_snapshot(&name)?;
            println!("removed the snapshots of {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect_snapshot(path: &Path) -> Result<()> {
    use spore_snapshot::image::{Image, RegionKind};
    let img = Image::open(path).with_context(|| format!("reading {}", path.display()))?;
    let m = &img.meta;
    let stored = m.stored_pages() * 4096;
    println!(
        "{}: function {:?}, codec {}",
        path.display(),
        m.function,
        m.codec
    );
    println!(
        "  file {:.2} MiB; {} regions mapping {:.1} MiB; {:.2} MiB of pages stored ({:.1}x smaller on disk), {} zero pages elided",
        img.file_size as f64 / 1048576.0,
        m.regions.len(),
        m.mapped_bytes() as f64 / 1048576.0,
        stored as f64 / 1048576.0,
        stored as f64 / img.file_size.max(1) as f64,
        m.zero_pages()
    );
    println!(
        "  {} page runs, {} partitions; descriptors {:?}",
        m.runs.len(),
        m.partitions.len(),
        m.fds
            .iter()
            .map(|f| format!("{}={}", f.fd, f.target))
            .collect::<Vec<_>>()
    );
    println!("  {:<33} {:<4} {:>8}  BACKING", "RANGE", "PROT", "STORED");
    for r in &m.regions {
        let pages: u64 = m
            .runs
            .iter()
            .filter(|run| !run.zero && run.addr >= r.start && run.addr < r.end)
            .map(|run| run.pages)
            .sum();
        let prot = format!(
            "{}{}{}",
            if r.prot & 1 != 0 { 'r' } else { '-' },
            if r.prot & 2 != 0 { 'w' } else { '-' },
            if r.prot & 4 != 0 { 'x' } else { '-' }
        );
        let backing = match &r.kind {
            RegionKind::Anon { name } if name.is_empty() => "anonymous".to_owned(),
            RegionKind::Anon { name } => name.clone(),
            RegionKind::File {
                path,
                offset,
                shared,
                ..
            } => format!(
                "{}{} @{offset:#x}",
                path.display(),
                if *shared { " (shared)" } else { "" }
            ),
            RegionKind::Special { name } => name.clone(),
        };
        println!(
            "  {:#016x}-{:#016x} {prot:<4} {:>6}KiB  {backing}",
            r.start,
            r.end,
            pages * 4
        );
    }
    Ok(())
}

/// `spore dag ...`.
pub fn dag(endpoint: &str, which: crate::DagCommand) -> Result<ExitCode> {
    use crate::DagCommand as D;
    let client = Client::new(endpoint)?;
    match which {
        D::Deploy { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Checked here first, for an error that names the file.
            let spec = spore_core::dag::DagSpec::from_toml(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {}",
                    file.display(),
                    spore_control::instance::error_chain(&e)
                )
            })?;
            client.put_dag(&text)?;
            println!(
                "deployed DAG {} ({} nodes, transport {})",
                spec.name,
                spec.nodes.len(),
                spec.transport
            );
        }
        D::Ls => {
            let list = client.get_json("/dags")?;
            println!("{:<20} {:<9} {:>5}  NODES", "NAME", "TRANSPORT", "COUNT");
            for d in list["Dags"].as_array().cloned().unwrap_or_default() {
                let nodes: Vec<String> = d["nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|n| {
                        format!(
                            "{}={}{}",
                            n["id"].as_str().unwrap_or("?"),
                            n["function"].as_str().unwrap_or("?"),
                            if n["each"] == true { "[each]" } else { "" }
                        )
                    })
                    .collect();
                println!(
                    "{:<20} {:<9} {:>5}  {}",
                    d["name"].as_str().unwrap_or("?"),
                    d["transport"].as_str().unwrap_or("?"),
                    nodes.len(),
                    nodes.join(" ")
                );
            }
        }
        D::Rm { name } => {
            client.delete_dag(&name)?;
            println!("removed DAG {name}");
        }
        D::Invoke {
            name,
            payload,
            transport,
            timing,
        } => {
            let (body, failed) =
                client.invoke_dag(&name, read_payload(&payload)?, transport.as_deref(), timing)?;
            if timing && !failed {
                let v: serde_json::Value =
                    serde_json::from_slice(&body).context("malformed timing answer")?;
                let t = &v["Timing"];
                eprintln!(
                    "transport={} total_ms={:.3}",
                    t["transport"].as_str().unwrap_or("?"),
                    t["total_ms"].as_f64().unwrap_or(0.0)
                );
                eprintln!(
                    "{:<12} {:>5} {:<16} {:<5} {:>12} {:>12} {:>10}",
                    "NODE", "INDEX", "FUNCTION", "START", "START_US", "HANDLER_MS", "HOP_US"
                );
                for n in t["nodes"].as_array().cloned().unwrap_or_default() {
                    eprintln!(
                        "{:<12} {:>5} {:<16} {:<5} {:>12.1} {:>12.3} {:>10}",
                        n["node"].as_str().unwrap_or("?"),
                        n["index"],
                        n["function"].as_str().unwrap_or("?"),
                        n["start"].as_str().unwrap_or("?"),
                        n["handler_start_us"].as_f64().unwrap_or(0.0),
                        n["handler_ms"].as_f64().unwrap_or(0.0),
                        n["hop_us"]
                            .as_f64()
                            .map_or("-".to_owned(), |h| format!("{h:.1}")),
                    );
                }
                println!("{}", v["Result"]);
            } else {
                use std::io::Write;
                std::io::stdout().write_all(&body)?;
                println!();
            }
            if failed {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore ls`.
pub fn ls(endpoint: &str) -> Result<ExitCode> {
    let list = Client::new(endpoint)?.get_json("/2015-03-31/functions")?;
    let functions = list["Functions"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<24} {:<8} {:<9} {:<20} {:>7} {:>8}  LAST MODIFIED",
        "NAME", "RUNTIME", "SANDBOX", "HANDLER", "MEMORY", "TIMEOUT"
    );
    for f in &functions {
        println!(
            "{:<24} {:<8} {:<9} {:<20} {:>4} MB {:>6} s  {}",
            f["FunctionName"].as_str().unwrap_or("?"),
            f["Runtime"].as_str().unwrap_or("?"),
            f["SporeSandbox"].as_str().unwrap_or("?"),
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
    // It takes unit links on loopback, for the demo's processing-units part.
    let d = ManagedDaemon::start(
        &dir,
        packages,
        &["--link-listen".into(), "127.0.0.1:0".into()],
    )?;
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

fn deploy_variant(
    client: &Client,
    dir: &Path,
    name: &str,
    sandbox: SandboxKind,
    max_instances: Option<u32>,
) -> Result<FunctionManifest> {
    let mut m = read_manifest(dir)?;
    m.name = name.to_owned();
    m.sandbox = sandbox;
    if max_instances.is_some() {
        m.max_instances = max_instances;
    }
    client.deploy_dir(dir, &m)?;
    Ok(m)
}

/// Deploys every sample function twice: as a container function and as `<name>-cfork`.
fn deploy_samples(
    client: &Client,
    functions: &Path,
) -> Result<Vec<spore_bench::functionbench::Workload>> {
    let mut out = Vec::new();
    for dir in function_dirs(functions)? {
        let m = read_manifest(&dir)?;
        deploy_variant(client, &dir, &m.name, SandboxKind::Container, None)?;
        let cfork = format!("{}-cfork", m.name);
        deploy_variant(client, &dir, &cfork, SandboxKind::Cfork, None)?;
        let payload = std::fs::read(dir.join("event.json")).unwrap_or_else(|_| b"{}".to_vec());
        out.push(spore_bench::functionbench::Workload {
            container: m.name,
            cfork,
            payload,
        });
    }
    Ok(out)
}

/// `spore bench dag`.
/// Deploys the functions under `dir` and the DAG files (`*.toml`) in it; returns the DAGs'
/// names.
fn deploy_dags(client: &Client, dir: &Path) -> Result<Vec<String>> {
    for f in function_dirs(dir)? {
        let m = read_manifest(&f)?;
        deploy_variant(client, &f, &m.name, m.sandbox, None)?;
    }
    let mut dags = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&p)?;
            let spec = spore_core::dag::DagSpec::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            client.put_dag(&text)?;
            dags.push(spec.name);
        }
    }
    dags.sort();
    Ok(dags)
}

/// Invokes a DAG with timing: (request to response at the client, ms; the answer).
pub(crate) fn dag_run(
    client: &Client,
    name: &str,
    input: &serde_json::Value,
    transport: &str,
) -> Result<(f64, serde_json::Value)> {
    let t0 = Instant::now();
    let (body, failed) =
        client.invoke_dag(name, input.to_string().into_bytes(), Some(transport), true)?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    anyhow::ensure!(!failed, "DAG {name} over {transport} failed: {v}");
    Ok((ms, v))
}

/// The hops (ms) in a timed DAG answer, of every node or of one.
pub(crate) fn dag_hops(v: &serde_json::Value, node: Option<&str>) -> Vec<f64> {
    v["Timing"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| node.is_none_or(|id| x["node"] == id))
        .filter_map(|x| x["hop_us"].as_f64())
        .map(|us| us / 1000.0)
        .collect()
}

fn bench_dag(endpoint: &str, n: usize, out: &Path, functions: &Path) -> Result<ExitCode> {
    let (client, daemon) = daemon_for(endpoint, "bench")?;
    let _keep = daemon;
    let dags = deploy_dags(&client, functions)?;
    let run = |name: &str, input: &serde_json::Value, transport: &str| {
        dag_run(&client, name, input, transport)
    };
    let hops = dag_hops;
    // 1. Hop latency: every hop of the 10-function pychain, 1 KiB payload.
    eprintln!("   hop latency: pychain (10 functions, 1 KiB), {n} runs per transport");
    let pad = serde_json::json!({"n": 0, "pad": "x".repeat(1000)});
    let mut series = Vec::new();
    for transport in ["shm", "http"] {
        for _ in 0..3 {
            run("pychain", &pad, transport)?; // warm the instances
        }
        let mut s = Vec::new();
        for _ in 0..n {
            s.extend(hops(&run("pychain", &pad, transport)?.1, None));
        }
        series.push(spore_bench::Series {
            name: format!("{transport} hop, 1 KiB"),
            samples_ms: s,
        });
    }
    let mut table = spore_bench::table(&series, "http hop, 1 KiB");
    // 2. Payload sweep, shm only, with memcpy of the same size in this process.
    eprintln!("   payload sweep: 1 KiB .. 64 MiB, producer to consumer");
    table.push_str("\nPayload hop (median of the runs; hop = producer's handler returns -> consumer's handler starts with the payload in hand):\n\n| size | mode | runs | hop | GB/s | memcpy | GB/s | hop / memcpy bandwidth |\n|---:|---|---:|---:|---:|---:|---:|---:|\n");
    let mut sweep = Vec::new();
    for size in [1usize << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        let k = if size >= 16 << 20 { 5 } else { 15 };
        let src = vec![7u8; size];
        let mut dst = vec![0u8; size];
        let mut copies: Vec<f64> = (0..k)
            .map(|_| {
                let t0 = Instant::now();
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&dst);
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        copies.sort_by(f64::total_cmp);
        let memcpy = copies[k / 2];
        for mode in ["buffer", "bytes"] {
            let input = serde_json::json!({"size": size, "mode": mode});
            run("payload", &input, "shm")?;
            let mut hs: Vec<f64> = Vec::new();
            for _ in 0..k {
                hs.extend(hops(&run("payload", &input, "shm")?.1, Some("sink")));
            }
            hs.sort_by(f64::total_cmp);
            let hop = hs[hs.len() / 2];
            let gbps = |ms: f64| size as f64 / (ms / 1000.0) / 1e9;
            table.push_str(&format!(
                "| {} KiB | {mode} | {k} | {hop:.3} ms | {:.2} | {memcpy:.3} ms | {:.2} | {:.0}% |\n",
                size >> 10, gbps(hop), gbps(memcpy), 100.0 * gbps(hop) / gbps(memcpy)
            ));
            sweep.push(
                serde_json::json!({"size": size, "mode": mode, "hop_ms": hop, "memcpy_ms": memcpy}),
            );
        }
    }
    // 3. End to end, each workload, shm vs http, client-side request to response.
    table.push_str("\nEnd to end, request to response at the client (warm instances):\n\n| DAG | n | shm p50 | shm p99 | http p50 | http p99 | http / shm (p50) |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let inputs = [
        (
            "chain2",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "chain5",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "fanout",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "fanin",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "pychain",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "alexa",
            serde_json::json!({"user": "ann", "utterance": "open the door, lights on, watch TV"}),
        ),
        (
            "wordcount",
            serde_json::json!({"words": 20000, "parts": 4, "seed": 7}),
        ),
    ];
    for (name, input) in &inputs {
        eprintln!("   end to end: {name}");
        let mut per = Vec::new();
        for transport in ["shm", "http"] {
            for _ in 0..3 {
                run(name, input, transport)?;
            }
            let s: Vec<f64> = (0..n)
                .map(|_| run(name, input, transport).map(|r| r.0))
                .collect::<Result<_>>()?;
            per.push(spore_bench::summarize(&s));
            series.push(spore_bench::Series {
                name: format!("{name} e2e {transport}"),
                samples_ms: s,
            });
        }
        table.push_str(&format!(
            "| {name} | {n} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.1}x |\n",
            per[0].p50,
            per[0].p99,
            per[1].p50,
            per[1].p99,
            per[1].p50 / per[0].p50
        ));
    }
    // Hops and whole runs differ by an order of magnitude: one plot each.
    let (hop, e2e): (Vec<Series>, Vec<Series>) = series
        .iter()
        .cloned()
        .partition(|s| s.name.contains(" hop"));
    let png = out.join("dag").join("dag-e2e.png");
    save_and_print(
        out,
        "dag",
        &series,
        &table,
        host_meta(serde_json::json!({ "n": n, "dags": dags, "sweep": sweep })),
        (
            "DAG hop latency (1 KiB), shm vs http through the gateway",
            &hop,
        ),
    )?;
    match spore_bench::plot::cdf(&png, "DAG end to end, shm vs http", &e2e) {
        Ok(()) => eprintln!("   plot: {}", png.display()),
        Err(e) => eprintln!("   no plot: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore demo`.
pub fn demo(endpoint: &str, args: DemoArgs) -> Result<ExitCode> {
    let (client, daemon) = daemon_for(endpoint, "demo")?;
    let ep = daemon
        .as_ref()
        .map_or(endpoint.to_owned(), |d| d.endpoint.clone());
    println!(
        "== deploying the sample functions from {} (each as a container and as a cfork function)",
        args.functions.display()
    );
    let workloads = deploy_samples(&client, &args.functions)?;
    for w in &workloads {
        println!("   {:<18} -> {} and {}", w.container, w.container, w.cfork);
    }
    println!(
        "== invoking each: {} fresh containers, {} cfork starts, {} warm",
        args.cold, args.cold, args.warm
    );
    let results = spore_bench::functionbench::run(
        &ep,
        &workloads,
        args.cold.max(1),
        args.warm.max(1),
        Duration::from_secs(120),
        &|msg| println!("   {msg}"),
    )?;
    println!();
    println!("== latency of one invocation, request to response through the HTTP API (p50 / p99)");
    print!("{}", spore_bench::functionbench::table(&results));
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
    demo_snapshots(&client, &ep, &args.functions, args.cold.max(3))?;
    demo_dags(&client, &args.functions.join("dag"))?;
    demo_units(&client, daemon.as_ref(), &args.functions, args.warm.max(5))?;
    Ok(ExitCode::SUCCESS)
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
    let shim = crate::xpu_bench::ShimProcess::spawn(
        None,
        1,
        link.trim(),
        &PathBuf::from(".spore").join("demo"),
        &[],
    )?;
    shim.wait_up(client)?;
    let hello = functions.join("hello");
    for unit in [0u32, 1] {
        crate::xpu_bench::deploy_on(
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
    crate::xpu_bench::deploy_on(client, &step, "demo-step", SandboxKind::Cfork, 0)?;
    crate::xpu_bench::deploy_as(client, &step, "demo-step-any", SandboxKind::Cfork, None)?;
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

/// The snapshot benchmarks' shared options: sample function names, codecs, and whether the
/// dropped-page-cache series run (they need root).
fn snapshot_bench_args<'a>(
    only: &'a str,
    codecs: &str,
    warm_cache_only: bool,
) -> Result<(Vec<&'a str>, Vec<spore_snapshot::image::Codec>, bool)> {
    let names = only
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let codecs = codecs
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

/// Deploys `<name>-snap` (a container function with `snapshot = true`) and, with `twins`,
/// `<name>-tsnap` (its cfork twin, whose template is snapshotted) for each name.
fn deploy_snapshotted(
    client: &Client,
    functions: &Path,
    names: &[&str],
    twins: bool,
) -> Result<Vec<spore_bench::snapshot::Workload>> {
    let mut out = Vec::new();
    for name in names {
        let dir = functions.join(name);
        let mut m = read_manifest(&dir)?;
        m.name = format!("{name}-snap");
        m.sandbox = SandboxKind::Container;
        m.snapshot = true;
        // Primed like SnapStart: the handler's first-call loads are then in the image.
        if m.warmup_event.is_none() && dir.join("event.json").is_file() {
            m.warmup_event = Some("event.json".into());
        }
        client.deploy_dir(&dir, &m)?;
        let payload = std::fs::read(dir.join("event.json")).unwrap_or_else(|_| b"{}".to_vec());
        let mut cfork = None;
        if twins {
            let mut t = m.clone();
            t.name = format!("{name}-tsnap");
            t.sandbox = SandboxKind::Cfork;
            client.deploy_dir(&dir, &t)?;
            cfork = Some(t.name);
        }
        out.push(spore_bench::snapshot::Workload {
            function: m.name,
            cfork,
            payload,
        });
    }
    Ok(out)
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
    let cfg = spore_bench::snapshot::Config {
        endpoint: ep.to_owned(),
        n,
        codecs: vec![spore_snapshot::image::Codec::None],
        cold_cache: false,
        scratch: scratch.path().to_owned(),
        max_per_series: Duration::from_secs(60),
        lazy_modes: false,
    };
    let results = spore_bench::snapshot::run(&cfg, &workloads, &|m| println!("   {m}"))?;
    println!();
    print!("{}", spore_bench::snapshot::table(&results));
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

fn instance_pids(
    client: &Client,
    name: &str,
) -> std::result::Result<Vec<i64>, spore_bench::BenchError> {
    let v = client
        .get_json(&format!("/2015-03-31/functions/{name}"))
        .map_err(|e| spore_bench::BenchError::Http(e.to_string()))?;
    Ok(v["Spore"]["Instances"]["IdlePids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_i64)
        .collect())
}

pub(crate) fn save_and_print(
    out: &Path,
    bench: &str,
    series: &[Series],
    table: &str,
    meta: serde_json::Value,
    (title, plotted): (&str, &[Series]),
) -> Result<()> {
    let dir = out.join(bench);
    let files = spore_bench::write_results(&dir, bench, series, table, meta)?;
    let png = dir.join(format!("{bench}.png"));
    match spore_bench::plot::cdf(&png, title, plotted) {
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
    Ok(())
}

pub(crate) fn host_meta(extra: serde_json::Value) -> serde_json::Value {
    let mut meta = serde_json::json!({
        "host_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    });
    if let (Some(m), Some(e)) = (meta.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    meta
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
            let sandbox: SandboxKind = sandbox.parse()?;
            let (client, daemon) = daemon_for(endpoint, "bench")?;
            let ep = daemon
                .as_ref()
                .map_or(endpoint.to_owned(), |d| d.endpoint.clone());
            let hello = functions.join("hello");
            deploy_variant(&client, &hello, "hello", SandboxKind::Container, None)?;
            let cfork = match sandbox {
                SandboxKind::Cfork => Some(
                    deploy_variant(&client, &hello, "hello-cfork", SandboxKind::Cfork, None)?.name,
                ),
                SandboxKind::Container => None,
            };
            let cfg = spore_bench::cold_start::ColdStartConfig {
                endpoint: ep,
                container_function: "hello".into(),
                cfork_function: cfork,
                n,
                python: spore_runtime::PYTHON_INTERPRETER.to_owned(),
                max_per_series: Duration::from_secs(300),
            };
            let res = spore_bench::cold_start::run(&cfg, &|msg| eprintln!("   {msg}"))?;
            let baseline = match sandbox {
                SandboxKind::Cfork => spore_bench::cold_start::CONTAINER,
                SandboxKind::Container => spore_bench::cold_start::FLOOR,
            };
            let mut table = spore_bench::table(&res.series, baseline);
            if !res.breakdown.is_empty() {
                table.push_str("\nWhere a cfork start goes (p50 per step; the steps add up to the daemon's request-to-ready time):\n\n| step | p50 | p99 | what |\n|---|---:|---:|---|\n");
                for s in &res.breakdown {
                    let sum = summarize(&s.samples_ms);
                    table.push_str(&format!(
                        "| {} | {:.3} ms | {:.3} ms | {} |\n",
                        s.name,
                        sum.p50,
                        sum.p99,
                        spore_bench::cold_start::step_meaning(&s.name)
                    ));
                }
            }
            let title = format!("Spore cold start ({sandbox}) vs warm vs python3 -c pass");
            save_and_print(
                &out,
                &format!("cold-start-{sandbox}"),
                &res.series,
                &table,
                host_meta(
                    serde_json::json!({ "sandbox": sandbox.as_str(), "n": n, "function": "hello" }),
                ),
                (&title, &res.series),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Functionbench { n, out, functions } => {
            let (client, daemon) = daemon_for(endpoint, "bench")?;
            let ep = daemon
                .as_ref()
                .map_or(endpoint.to_owned(), |d| d.endpoint.clone());
            let workloads = deploy_samples(&client, &functions)?;
            let results = spore_bench::functionbench::run(
                &ep,
                &workloads,
                n,
                n,
                Duration::from_secs(300),
                &|msg| eprintln!("   {msg}"),
            )?;
            let table = spore_bench::functionbench::table(&results);
            let series: Vec<Series> = results
                .iter()
                .flat_map(|(_, s)| s.iter().take(2).cloned())
                .collect();
            save_and_print(
                &out,
                "functionbench",
                &series,
                &table,
                host_meta(serde_json::json!({ "n": n })),
                ("FunctionBench: fresh instance, container vs cfork", &series),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Ipc { n, spin_us, out } => {
            eprintln!("   hop latency: {n} round trips of 1 KiB per series");
            let series = spore_bench::ipc::hop_latency(n, 1024, Duration::from_micros(spin_us))?;
            let mut table = spore_bench::table(&series, "unix socketpair (baseline), 1024 B");
            eprintln!("   payload sweep: sealed memfd hand-off vs memcpy");
            let sizes = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
            let rows = spore_bench::ipc::payload_sweep(&sizes, 7)?;
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
                &out,
                "ipc",
                &series,
                &table,
                host_meta(serde_json::json!({ "n": n, "spin_us": spin_us, "sweep": rows })),
                ("Shared-memory ring hop (1 KiB) vs Unix socketpair", &series),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Dag { n, out, functions } => bench_dag(endpoint, n, &out, &functions),
        BenchCommand::Xpu { n, out, functions } => crate::xpu_bench::bench_xpu(n, &out, &functions),
        BenchCommand::MemoryRestore {
            n,
            only,
            codecs,
            threads,
            warm_cache_only,
            out,
            functions,
        } => {
            let (names, codecs, cold_cache) = snapshot_bench_args(&only, &codecs, warm_cache_only)?;
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
            let (client, _daemon) = daemon_for(endpoint, "bench")?;
            // The images: each function's runtime snapshotted at an init.
            let mut images = Vec::new();
            for w in deploy_snapshotted(&client, &functions, &names, false)? {
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
            let cfg = spore_bench::memory_restore::Config {
                n,
                codecs,
                threads,
                cold_cache,
                scratch: out.join("memory-restore").join("images"),
                max_per_series: Duration::from_secs(60),
            };
            let rows = spore_bench::memory_restore::run(&cfg, &images, &|m| eprintln!("   {m}"))?;
            let table = spore_bench::memory_restore::table(&rows);
            let series = spore_bench::memory_restore::series(&rows);
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
                &out,
                "memory-restore",
                &series,
                &table,
                host_meta(serde_json::json!({ "n": n, "cold_cache": cold_cache })),
                ("Memory restore alone (first function)", &first),
            )?;
            let _ = std::fs::remove_dir(out.join("memory-restore").join("images"));
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::SnapshotColdStart {
            n,
            only,
            codecs,
            warm_cache_only,
            out,
            functions,
        } => {
            let (names, codecs, cold_cache) = snapshot_bench_args(&only, &codecs, warm_cache_only)?;
            let (client, daemon) = daemon_for(endpoint, "bench")?;
            let ep = daemon
                .as_ref()
                .map_or(endpoint.to_owned(), |d| d.endpoint.clone());
            let workloads = deploy_snapshotted(&client, &functions, &names, true)?;
            let cfg = spore_bench::snapshot::Config {
                endpoint: ep,
                n,
                codecs,
                cold_cache,
                scratch: out.join("snapshot-cold-start").join("images"),
                max_per_series: Duration::from_secs(120),
                lazy_modes: true,
            };
            let results = spore_bench::snapshot::run(&cfg, &workloads, &|m| eprintln!("   {m}"))?;
            let table = spore_bench::snapshot::table(&results);
            let series: Vec<Series> = results
                .iter()
                .flat_map(|r| {
                    r.series.iter().map(|s| Series {
                        name: format!("{}/{}", r.function, s.name),
                        samples_ms: s.samples_ms.clone(),
                    })
                })
                .collect();
            let sizes: Vec<_> = results
                .iter()
                .map(|r| serde_json::json!({"function": r.function, "sizes": r.sizes}))
                .collect();
            let first = results
                .first()
                .map(|r| r.series.clone())
                .unwrap_or_default();
            save_and_print(
                &out,
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
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Density {
            n,
            container_n,
            out,
            functions,
        } => {
            let (client, _daemon) = daemon_for(endpoint, "bench")?;
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
                deploy_variant(&client, &hello, name, kind, Some(limit))?;
                let ep = _daemon
                    .as_ref()
                    .map_or(endpoint.to_owned(), |d| d.endpoint.clone());
                let d = spore_bench::density::measure(
                    &ep,
                    name,
                    kind.as_str(),
                    count,
                    Duration::from_secs(600),
                    &|| instance_pids(&client, name),
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
            Ok(ExitCode::SUCCESS)
        }
    }
}
