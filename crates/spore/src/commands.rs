//! The CLI's commands.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use spore_bench::drivers::{self, RunOptions, SnapshotSelection};
use spore_client::{read_manifest, Client};
use spore_control::{Control, ControlConfig};

use crate::cli::{
    BenchCommand, ClusterCommand, DagCommand, DemoArgs, ServeArgs, ShimArgs, SnapshotCommand,
};
use crate::out::{self, Table};

use spore_client::default_data_dir;

/// `spore shim`.
pub fn shim(args: ShimArgs) -> Result<ExitCode> {
    let accelerators = match args.accelerator.as_slice() {
        [] => None,
        [one] if one == "none" => Some(Vec::new()),
        many => Some(many.to_vec()),
    };
    let unit = spore_shim::UnitInfo::detect(args.id, args.arch.clone(), accelerators);
    // The control plane refuses a greeting out of bounds: say so before starting.
    unit.validate()
        .map_err(|e| anyhow::anyhow!("unit {}: {e}", args.id))?;
    let token = args
        .join
        .as_deref()
        .map(str::parse::<spore_cluster::tokens::JoinToken>)
        .transpose()
        .context("--join")?;
    serve(args.serve, Some((unit, args.control, token)))
}

/// `spore cluster init|token`.
pub fn cluster(which: ClusterCommand) -> Result<ExitCode> {
    use spore_cluster::pki::ClusterCa;
    use spore_cluster::tokens::Tokens;
    let dir = |d: Option<PathBuf>| d.unwrap_or_else(default_data_dir);
    match which {
        ClusterCommand::Init { data_dir } => {
            let d = dir(data_dir);
            let (ca, made) = ClusterCa::init(&d)
                .with_context(|| format!("the cluster CA in {}", d.display()))?;
            println!(
                "{} the cluster CA in {} (sha256 {})",
                if made { "made" } else { "found" },
                ca.dir().display(),
                ca.fingerprint_hex()
            );
        }
        ClusterCommand::Token {
            ttl,
            once,
            unit,
            list,
            revoke,
            data_dir,
        } => {
            let d = dir(data_dir);
            // A token pins the CA: there must be one (the tokens live beside it).
            let ca = ClusterCa::load(&d)?;
            let tokens =
                Tokens::open(&d).with_context(|| format!("the tokens in {}", d.display()))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs());
            if list {
                println!("{:<9} {:>12} {:<5} UNIT", "ID", "EXPIRES_IN", "ONCE");
                for t in tokens.list()? {
                    println!(
                        "{:<9} {:>11}s {:<5} {}",
                        t.id,
                        t.expires.saturating_sub(now),
                        t.once,
                        t.unit.map_or("any".to_owned(), |u| u.to_string())
                    );
                }
            } else if let Some(id) = revoke {
                if !tokens.revoke(&id)? {
                    bail!("no token {id} (it may have expired or been used up)");
                }
                eprintln!("revoked token {id} (certificates already issued with it stay valid)");
            } else {
                let (token, rec) = tokens.create(ca.fingerprint(), ttl, once, unit)?;
                eprintln!(
                    "token {} for {}{}, valid {} s; give it to `spore shim --join` (or SPORE_JOIN_TOKEN)",
                    rec.id,
                    unit.map_or("any unit".to_owned(), |u| format!("unit {u}")),
                    if once { ", single use" } else { "" },
                    ttl.as_secs()
                );
                println!("{token}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The etcd client of `--etcd` and its TLS and auth options.
fn etcd_client(args: &ServeArgs) -> Result<Option<spore_cluster::etcd::Etcd>> {
    let Some(endpoints) = args.etcd.as_deref() else {
        return Ok(None);
    };
    let user = match &args.etcd_user {
        None => None,
        Some(u) => {
            let password = match (&args.etcd_password_file, std::env::var("SPORE_ETCD_PASSWORD")) {
                (Some(f), _) => std::fs::read_to_string(f)
                    .with_context(|| format!("--etcd-password-file {}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                (None, Ok(p)) => p,
                (None, Err(_)) => bail!(
                    "--etcd-user {u}: give the password in SPORE_ETCD_PASSWORD or --etcd-password-file"
                ),
            };
            Some((u.clone(), password))
        }
    };
    let auth = spore_cluster::etcd::EtcdAuth {
        ca: args.etcd_ca.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
        user,
    };
    let client = spore_cluster::etcd::Etcd::with_auth(endpoints, &args.etcd_prefix, auth)
        .context("--etcd")?;
    Ok(Some(client))
}

/// `spore serve`, or with `shim` (this unit, the control plane's link address) a shim.
pub fn serve(
    args: ServeArgs,
    shim: Option<(
        spore_shim::UnitInfo,
        Option<String>,
        Option<spore_cluster::tokens::JoinToken>,
    )>,
) -> Result<ExitCode> {
    init_logging(&args.log_format);
    // A shim's --link-listen takes neighbour links from other shims; its address is part of
    // the unit's description, so it is bound before the unit greets anyone.
    let mut shim = shim;
    let neighbour_listener = match (&mut shim, &args.link_listen) {
        (Some((unit, _, _)), Some(addr)) => {
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
        Some((u, _, _)) => default_data_dir().join(format!("unit-{}", u.id)),
        None => default_data_dir(),
    });
    // A shim needs its unit certificate, or a token to get one.
    let shim = match shim {
        Some((unit, control, token)) => {
            let creds = spore_cluster::ShimCredentials {
                data_dir: data_dir.clone(),
                token,
            };
            if let Err(why) = creds.usable(unit.id) {
                bail!("unit {} cannot join the cluster: {why}", unit.id);
            }
            Some((unit, control, creds))
        }
        None => None,
    };
    // The control plane's link port is mutual TLS with the cluster CA (made on first use).
    let control_tls = match (&shim, &args.link_listen) {
        (None, Some(_)) => Some(std::sync::Arc::new(
            spore_cluster::tls::ControlTls::open(&data_dir)
                .with_context(|| format!("the cluster CA in {}", data_dir.display()))?,
        )),
        _ => None,
    };
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
    cfg.build_index_dir = args.build_index_dir.clone();
    cfg.build_limits.timeout = Duration::from_secs(args.build_timeout_s.max(1));
    cfg.build_limits.max_output_mb = args.build_max_mb.max(1);
    cfg.max_instances = args.max_instances;
    cfg.keep_alive = Duration::from_secs(args.keep_alive_s);
    cfg.cpu_millis = args.cpu_millis;
    cfg.pids_max = args.pids_max;
    cfg.tmp_mb = args.tmp_mb;
    cfg.region = args.region.clone();
    cfg.account_id = args.account_id.clone();
    cfg.idle_memory_mb = args.idle_memory_mb;
    cfg.default_network = args
        .default_network
        .parse()
        .map_err(|e: spore_core::ManifestError| anyhow::anyhow!("--default-network: {e}"))?;
    cfg.egress_subnet = args
        .egress_subnet
        .as_deref()
        .map(str::parse::<spore_sandbox::egress::Subnet>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--egress-subnet: {e}"))?;
    cfg.unit = shim.as_ref().map(|(u, _, _)| u.clone());
    cfg.snapshot_mode = args
        .snapshot_mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--snapshot-mode: {e}"))?;
    cfg.snapshot_codec = args
        .snapshot_codec
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--snapshot-codec: {e}"))?;
    let etcd = etcd_client(&args)?;
    if etcd.is_some() && shim.is_none() && args.link_listen.is_none() {
        bail!("--etcd announces the control plane's link address: give --link-listen too");
    }
    let grace = Duration::from_secs(args.grace_s);
    let no_auth = args.auth == "none";
    if no_auth {
        let loopback = listen
            .to_socket_addrs()
            .with_context(|| format!("--listen {listen}"))?
            .all(|a| a.ip().is_loopback());
        anyhow::ensure!(
            loopback,
            "--auth none is refused on --listen {listen}: without authentication anyone who reaches the port may deploy and run code; listen on a loopback address or drop --auth none"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let (control, warnings) = Control::open(cfg).with_context(|| format!("opening the data dir {}", data_dir.display()))?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let (keys, note) = spore_auth::KeyStore::open(&data_dir, spore_registry::store::now_unix_ms())
            .context("opening the access keys")?;
        if let Some(n) = note {
            tracing::info!("{n}");
        }
        let admin = keys.get(spore_auth::keys::ADMIN).map(spore_auth::Key::credentials);
        let auth = if no_auth {
            tracing::warn!("--auth none: the API on {listen} checks no signatures; anyone who reaches it may deploy and run code");
            spore_gateway::Auth::None
        } else {
            control.set_gateway_credentials(admin);
            spore_gateway::Auth::keys(keys)
        };
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
            spore_registry::store::write_atomic(&link_file, bound.as_bytes()).context("writing the link endpoint file")?;
            let tls = control_tls.clone().expect("a control plane with --link-listen has its TLS");
            tracing::info!(ca = %tls.ca().fingerprint_hex(), "accepting unit links on {bound} (mutual TLS)");
            let c = control.clone();
            let grace = args.unit_grace;
            tokio::spawn(async move { c.serve_links(l, tls, grace).await });
            if let (Some(client), None) = (&etcd, &shim) {
                let c = control.clone();
                let (client, stop) = (client.clone(), shim_stop_rx.clone());
                tokio::spawn(async move { c.join_etcd(client, bound, stop).await });
            }
        }
        let shim_task = shim.map(|(unit, addr, creds)| {
            tracing::info!(unit = unit.id, arch = %unit.arch, accelerators = ?unit.accelerators, control = ?addr, "running as a unit's shim");
            let c = control.clone();
            let stop = shim_stop_rx.clone();
            tokio::spawn(async move { c.run_shim(addr, etcd, creds, stop).await })
        });
        let endpoint = format!("http://{}", listener.local_addr()?);
        control.set_gateway_url(endpoint.clone());
        let endpoint_file = data_dir.join("run").join("endpoint");
        spore_registry::store::write_atomic(&endpoint_file, endpoint.as_bytes()).context("writing the endpoint file")?;
        let metrics = spore_gateway::install_metrics();
        control.spawn_reaper();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        if let Some(addr) = &args.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
            tracing::info!("serving /metrics without authentication on {}", l.local_addr()?);
            let router = spore_gateway::metrics_router(control.clone(), metrics.clone());
            tokio::spawn(async move { axum_serve(l, router).await });
        }
        let mut server = tokio::spawn(spore_gateway::serve(listener, control.clone(), metrics, auth, async {
            let _ = stop_rx.await;
        }));
        tracing::info!("spore listening on {endpoint} (data dir {})", data_dir.display());
        if let Some(f) = &args.ready_file {
            spore_registry::store::write_atomic(f, endpoint.as_bytes())
                .with_context(|| format!("--ready-file {}", f.display()))?;
        }
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
        if let Some(f) = &args.ready_file {
            let _ = std::fs::remove_file(f);
        }
        tracing::info!("stopped; all sandboxes removed");
        Ok(ExitCode::SUCCESS)
    })
}

/// The daemon's own log on stderr: `RUST_LOG` filters (default `info`); `text` has colours
/// only on a terminal (and never with `NO_COLOR`), `json` is one object a line.
fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        builder.with_ansi(colour).init();
    }
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
pub fn deploy(endpoint: &str, dir: &Path, build: bool) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let m = read_manifest(dir)?;
    // A progress bar for the upload (drawn only on a terminal).
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("uploading {bytes}/{total_bytes} {wide_bar} {eta}")
            .expect("a valid template"),
    );
    let hook = {
        let bar = bar.clone();
        std::sync::Arc::new(move |sent: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(sent);
        })
    };
    let deployed = client.deploy_dir_with(dir, &m, build, (!out::json()).then_some(hook));
    bar.finish_and_clear();
    let mut conf = deployed?;
    if conf["State"] == "Pending" || conf["LastUpdateStatus"] == "InProgress" {
        if !out::json() {
            eprintln!("building the dependencies of {}", m.name);
        }
        conf = client.wait_for_build(&m.name, Duration::from_secs(900), |line| {
            if !out::json() {
                eprintln!("  | {}", out::printable(line));
            }
        })?;
    }
    if conf["State"] == "Failed" || conf["LastUpdateStatus"] == "Failed" {
        let why = conf["LastUpdateStatusReason"]
            .as_str()
            .or(conf["StateReason"].as_str())
            .unwrap_or("unknown");
        let previous = if conf["State"] == "Failed" {
            ""
        } else {
            " (the previous revision keeps serving)"
        };
        let why: Vec<String> = why.lines().map(out::printable).collect();
        anyhow::bail!("deploying {}: {}{previous}", m.name, why.join("\n"));
    }
    if out::json() {
        out::print_json(&conf);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "deployed {} ({}, handler {}, {} MB, {} s timeout, sandbox {})",
        m.name,
        m.runtime_str(),
        m.handler,
        m.memory_mb,
        m.timeout_s,
        m.sandbox
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
    if ans.function_error && !out::json() {
        print_function_error(name, &ans.body);
        return Ok(ExitCode::from(3));
    }
    println!("{}", String::from_utf8_lossy(&ans.body));
    Ok(if ans.function_error {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// A function's error as people read it: type and message, then the traceback's lines.
fn print_function_error(name: &str, body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        eprintln!(
            "{name} failed: {}",
            out::printable(&String::from_utf8_lossy(body))
        );
        return;
    };
    eprintln!(
        "{name} failed: {}: {}",
        out::printable(v["errorType"].as_str().unwrap_or("Error")),
        out::printable(v["errorMessage"].as_str().unwrap_or(""))
    );
    let trace = v["stackTrace"].as_array().or_else(|| v["trace"].as_array());
    for line in trace.into_iter().flatten() {
        for l in line.as_str().unwrap_or_default().lines() {
            eprintln!("  {}", out::printable(l));
        }
    }
}

/// `spore evict NAME`.
pub fn evict(endpoint: &str, name: &str) -> Result<ExitCode> {
    let v = Client::new(endpoint)?.evict(name)?;
    if out::json() {
        out::print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
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

/// `spore snapshot ...`.
pub fn snapshot(endpoint: &str, which: SnapshotCommand) -> Result<ExitCode> {
    use SnapshotCommand as S;
    match which {
        S::Ls => {
            let list = Client::new(endpoint)?.get_json("/spore/v1/snapshots")?;
            if out::json() {
                out::print_json(&list);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&[
                "FUNCTION", ">REV", ">FILE", ">MAPPED", ">STORED", ">ZERO", "CODEC", "STATE",
            ]);
            let mib = |v: f64| format!("{:.1} MiB", v / 1048576.0);
            for s in list["Snapshots"].as_array().cloned().unwrap_or_default() {
                let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
                t.row(vec![
                    s["function"].as_str().unwrap_or("?").to_owned(),
                    s["revision"].to_string(),
                    mib(f("file_bytes")),
                    mib(f("mapped_bytes")),
                    mib(f("stored_pages") * 4096.0),
                    s["zero_pages"].to_string(),
                    s["codec"].as_str().unwrap_or("").to_owned(),
                    s["error"].as_str().unwrap_or("ok").to_owned(),
                ]);
            }
            t.print();
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
pub fn dag(endpoint: &str, which: DagCommand) -> Result<ExitCode> {
    use DagCommand as D;
    let client = Client::new(endpoint)?;
    match which {
        D::Deploy { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Checked here first, for an error that names the file.
            let spec = spore_core::dag::DagSpec::from_toml(&text).map_err(|e| {
                anyhow::anyhow!("{}: {}", file.display(), spore_core::error_chain(&e))
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
            if out::json() {
                out::print_json(&list);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["NAME", "TRANSPORT", ">COUNT", "NODES"]);
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
                t.row(vec![
                    d["name"].as_str().unwrap_or("?").to_owned(),
                    d["transport"].as_str().unwrap_or("?").to_owned(),
                    nodes.len().to_string(),
                    nodes.join(" "),
                ]);
            }
            t.print();
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

/// `spore demo`.
pub fn demo(endpoint: Option<&str>, args: DemoArgs) -> Result<ExitCode> {
    let DemoArgs {
        functions,
        warm,
        cold,
        ..
    } = args;
    let functions = samples(functions);
    drivers::demo::run(
        endpoint,
        &drivers::demo::DemoOptions {
            functions,
            warm,
            cold,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `spore bench ...`.
pub fn bench(endpoint: Option<&str>, which: BenchCommand) -> Result<ExitCode> {
    use drivers::bench;
    let which = which.with_samples(samples);
    match which {
        BenchCommand::ColdStart {
            sandbox,
            n,
            gap_ms,
            out,
            functions,
        } => bench::cold_start(
            endpoint,
            &RunOptions { n, out, functions },
            &sandbox,
            gap_ms.map(Duration::from_millis),
        ),
        BenchCommand::Functionbench { n, out, functions } => {
            bench::functionbench(endpoint, &RunOptions { n, out, functions })
        }
        BenchCommand::Ipc { n, spin_us, out } => bench::ipc(&bench::IpcOptions { n, spin_us, out }),
        BenchCommand::Dag { n, out, functions } => {
            drivers::dag::run(endpoint, &RunOptions { n, out, functions })
        }
        BenchCommand::Xpu { n, out, functions } => {
            drivers::xpu::run(&RunOptions { n, out, functions })
        }
        BenchCommand::MemoryRestore {
            n,
            only,
            codecs,
            threads,
            warm_cache_only,
            out,
            functions,
        } => bench::memory_restore(
            endpoint,
            &RunOptions { n, out, functions },
            &selection(only, codecs, warm_cache_only),
            &threads,
        ),
        BenchCommand::SnapshotColdStart {
            n,
            only,
            codecs,
            warm_cache_only,
            out,
            functions,
        } => bench::snapshot_cold_start(
            endpoint,
            &RunOptions { n, out, functions },
            &selection(only, codecs, warm_cache_only),
        ),
        BenchCommand::Density {
            n,
            container_n,
            out,
            functions,
        } => bench::density(endpoint, &RunOptions { n, out, functions }, container_n),
        BenchCommand::Burst {
            sizes,
            out,
            functions,
        } => drivers::load::burst(
            endpoint,
            &drivers::load::BurstOptions {
                sizes,
                out,
                functions,
            },
        ),
        BenchCommand::FirstCall {
            n,
            only,
            out,
            functions,
        } => drivers::first_call::first_call(
            endpoint,
            &drivers::first_call::FirstCallOptions {
                n,
                only,
                out,
                functions,
            },
        ),
        BenchCommand::Throughput {
            clients,
            seconds,
            out,
            functions,
        } => drivers::load::throughput(
            endpoint,
            &drivers::load::ThroughputOptions {
                levels: clients,
                seconds,
                out,
                functions,
            },
        ),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// The snapshot benchmarks' `--only`, `--codecs` and `--warm-cache-only`.
fn selection(only: String, codecs: String, warm_cache_only: bool) -> SnapshotSelection {
    SnapshotSelection {
        only,
        codecs,
        warm_cache_only,
    }
}

/// Serves a router until the process ends (the metrics listener).
async fn axum_serve(l: tokio::net::TcpListener, router: spore_gateway::Router) {
    if let Err(e) = spore_gateway::serve_router(l, router).await {
        tracing::warn!("the metrics listener stopped: {e}");
    }
}

/// The sample functions' folder: `dir` as given when it exists, else the same relative path
/// beside the binary (a build tree: `target/release/spore` finds the repository's
/// `functions/`) or in its installed `share/spore/` (so that `spore demo` and `spore bench`
/// work from anywhere).
fn samples(dir: PathBuf) -> PathBuf {
    if dir.exists() || dir.is_absolute() {
        return dir;
    }
    let Ok(exe) = std::env::current_exe() else {
        return dir;
    };
    for base in exe.ancestors().skip(1) {
        for candidate in [base.join(&dir), base.join("share/spore").join(&dir)] {
            if candidate.exists() {
                return candidate;
            }
        }
    }
    dir
}
