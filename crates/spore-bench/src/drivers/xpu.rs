//! `spore bench xpu`: two processing units on one host, Molecule's CPU-DPU setting simulated
//! with a shim in a network namespace of its own, linked to the control plane over a veth pair.
//!
//! Everything is measured in the same run, next to its local counterpart: cfork starts and
//! warm calls on unit 0 vs unit 1; a DAG hop (1 KiB) over shared memory, across the link, and
//! over HTTP; the link's payload sweep against plain TCP over the same veth; and two DAG
//! workloads spread over the two units.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spore_client::{read_manifest, Client, ManagedDaemon};
use spore_core::SandboxKind;

use super::dag::{dag_hops, dag_run};
use super::report::{host_meta, save_and_print};
use super::setup::{deploy_on, deploy_variant};
use super::shim::{join_token, packages_dir, ShimProcess};
use super::RunOptions;
use crate::Series;

/// A network namespace joined to this one by a veth pair (removed on drop).
struct NetNs {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl NetNs {
    fn new() -> Result<NetNs> {
        let pid = std::process::id();
        let name = format!("spore-bench-{pid}");
        let (host_if, ns_if) = (format!("sbh{pid}"), format!("sbn{pid}"));
        let octet = pid % 250 + 1;
        let host_ip = format!("10.214.{octet}.1");
        let ns = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
        ])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.214.{octet}.2/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", &name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ns_ip(&self) -> String {
        self.host_ip.trim_end_matches(".1").to_owned() + ".2"
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// TCP echo round trips over the veth: a server thread inside the namespace (setns on that
/// thread only), the client here. Per size, the median round trip (ms) of `size` bytes each
/// way, twice: streamed (the server sends back each piece as it arrives, overlapping both
/// directions) and whole (the server takes the whole message, then sends it back, as a
/// message-passing link must).
fn tcp_baseline(
    ns: &NetNs,
    sizes: &[usize],
    reps: impl Fn(usize) -> usize,
) -> Result<Vec<(f64, f64)>> {
    let netns = std::fs::File::open(format!("/run/netns/{}", ns.name))
        .with_context(|| format!("opening the namespace {}", ns.name))?;
    let ns_ip = ns.ns_ip();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || -> Result<()> {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the namespace")?;
        let l = std::net::TcpListener::bind((ns_ip.as_str(), 0))?;
        tx.send(l.local_addr()?).ok();
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut whole = Vec::new();
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).is_err() {
                return Ok(());
            }
            let size = u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) as usize;
            if head[8] == 1 {
                whole.resize(size, 0);
                s.read_exact(&mut whole)?;
                s.write_all(&whole)?;
                continue;
            }
            let mut left = size;
            while left > 0 {
                let want = left.min(buf.len());
                let k = s.read(&mut buf[..want])?;
                ensure!(k > 0, "the client went away");
                s.write_all(&buf[..k])?;
                left -= k;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .context("the TCP echo server did not start")?;
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut medians = Vec::new();
    for &size in sizes {
        let data = std::sync::Arc::new(vec![0x5au8; size]);
        let mut back = vec![0u8; size];
        let mut pair = [0.0; 2];
        for (mode, slot) in pair.iter_mut().enumerate() {
            let mut times = Vec::new();
            for _ in 0..reps(size) {
                let t = Instant::now();
                let mut head = (size as u64).to_le_bytes().to_vec();
                head.push(mode as u8);
                c.write_all(&head)?;
                // Write and read at once so that large sizes do not deadlock.
                let mut w = c.try_clone()?;
                let d2 = std::sync::Arc::clone(&data);
                let writer = std::thread::spawn(move || w.write_all(&d2));
                c.read_exact(&mut back)?;
                writer.join().expect("writer thread")?;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            *slot = times[times.len() / 2];
        }
        medians.push((pair[0], pair[1]));
    }
    drop(c);
    let _ = server.join();
    Ok(medians)
}

fn link_echo(client: &Client, unit: u32, size: usize, n: usize) -> Result<Vec<f64>> {
    let v = client.unit_echo(unit, size, n)?;
    Ok(v["RoundTripsUs"]
        .as_array()
        .context("malformed echo answer")?
        .iter()
        .filter_map(|x| x.as_f64())
        .map(|us| us / 1000.0)
        .collect())
}

/// `spore bench xpu` (root only: it makes a network namespace). Starts its own daemon and
/// shims whatever `endpoint` the CLI was given.
pub fn run(opts: &RunOptions) -> Result<()> {
    let (n, out, functions) = (opts.n, &opts.out, &opts.functions);
    if !nix::unistd::geteuid().is_root() {
        bail!("spore bench xpu creates a network namespace and a veth pair: run it as root");
    }
    let parent = PathBuf::from(".spore").join("bench-xpu");
    std::fs::create_dir_all(&parent)?;
    let ns = NetNs::new().context("creating the unit's network namespace")?;
    eprintln!(
        "   unit 1 runs in network namespace {} ({}), linked over a veth pair",
        ns.name,
        ns.ns_ip()
    );
    let daemon = ManagedDaemon::start(
        &parent,
        packages_dir(),
        &["--link-listen".into(), format!("{}:0", ns.host_ip)],
    )?;
    let link = std::fs::read_to_string(daemon.data_dir().join("run/link-endpoint"))
        .context("reading the control plane's link endpoint")?;
    // Units 1 and 2 share the namespace and take neighbour links from each other there.
    let neighbour = vec![format!("--link-listen={}:0", ns.ns_ip())];
    // Links are mutual TLS: the shims join with a token of the daemon's cluster CA.
    let token = join_token(daemon.data_dir())?;
    let shim = ShimProcess::spawn(Some(&ns.name), 1, link.trim(), &token, &parent, &neighbour)?;
    let shim2 = ShimProcess::spawn(Some(&ns.name), 2, link.trim(), &token, &parent, &neighbour)?;
    let creds = daemon.credentials()?;
    crate::cold_start::use_credentials(creds.clone());
    let client = Client::with_credentials(&daemon.endpoint, creds)?;
    shim.wait_up(&client)?;
    shim2.wait_up(&client)?;

    let mut series = Vec::new();
    let mut table = String::new();
    // 1. Starts and calls: unit 0 vs unit 1.
    let hello = functions.join("hello");
    for (unit, name) in [(0, "hello-u0"), (1, "hello-u1")] {
        deploy_on(&client, &hello, name, SandboxKind::Cfork, unit)?;
    }
    eprintln!("   cfork starts and warm calls, unit 0 vs unit 1, n={n}");
    for (what, cold) in [("cfork start", Some("fork")), ("warm call", None)] {
        for (unit, name) in [(0, "hello-u0"), (1, "hello-u1")] {
            for _ in 0..3 {
                client.invoke_with(name, b"{}".to_vec(), cold)?;
            }
            let mut s = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let a = client.invoke_with(name, b"{}".to_vec(), cold)?;
                s.push(t.elapsed().as_secs_f64() * 1000.0);
                ensure!(
                    !a.function_error && a.unit == unit.to_string(),
                    "{name} ran on unit {} ({})",
                    a.unit,
                    String::from_utf8_lossy(&a.body)
                );
                if cold.is_some() {
                    ensure!(a.start == "fork", "{name} started {}", a.start);
                }
            }
            series.push(Series {
                name: format!(
                    "{what}, unit {unit}{}",
                    if unit == 0 {
                        " (local)"
                    } else {
                        " (cross-unit)"
                    }
                ),
                samples_ms: s,
            });
        }
    }
    table.push_str("Start and call, request to response at the client:\n\n");
    table.push_str(&crate::table(&series[..2], "cfork start, unit 0 (local)"));
    table.push('\n');
    table.push_str(&crate::table(&series[2..4], "warm call, unit 0 (local)"));

    // 2. DAG hop, 1 KiB: shared memory, across the link, HTTP.
    let step = functions.join("dag").join("chain-step");
    deploy_on(&client, &step, "xs-a", SandboxKind::Container, 0)?;
    deploy_on(&client, &step, "xs-b", SandboxKind::Container, 0)?;
    deploy_on(&client, &step, "xs-b-u1", SandboxKind::Container, 1)?;
    for (dag, b) in [("xhop-local", "xs-b"), ("xhop-units", "xs-b-u1")] {
        client.put_dag(&format!(
            "name = \"{dag}\"\n[[nodes]]\nid = \"a\"\nfunction = \"xs-a\"\n[[nodes]]\nid = \"b\"\nfunction = \"{b}\"\nafter = [\"a\"]\n"
        ))?;
    }
    // a on unit 1, b on unit 2 (node pins): the hop takes the shims' neighbour link.
    deploy_variant(&client, &step, "xs-any-free", SandboxKind::Container, |m| {
        m.unit = None
    })?;
    client.put_dag(
        "name = \"xhop-shims\"\n[[nodes]]\nid = \"a\"\nfunction = \"xs-any-free\"\nunit = 1\n[[nodes]]\nid = \"b\"\nfunction = \"xs-any-free\"\nafter = [\"a\"]\nunit = 2\n",
    )?;
    eprintln!("   DAG hop (1 KiB): shm vs cross-unit link vs http, n={n}");
    let pad = serde_json::json!({"n": 0, "pad": "x".repeat(1000)});
    let first = series.len();
    for (label, dag, transport) in [
        ("hop shm, local", "xhop-local", "shm"),
        ("hop cross-unit (link)", "xhop-units", "shm"),
        ("hop shim to shim (neighbour link)", "xhop-shims", "shm"),
        ("hop http, local", "xhop-local", "http"),
    ] {
        for _ in 0..3 {
            dag_run(&client, dag, &pad, transport)?;
        }
        let mut s = Vec::new();
        for _ in 0..n {
            s.extend(dag_hops(
                &dag_run(&client, dag, &pad, transport)?.1,
                Some("b"),
            ));
        }
        series.push(Series {
            name: label.into(),
            samples_ms: s,
        });
    }
    // The floor under any hop with a sleeping receiver on this machine: one wake-up of an
    // idle thread, measured in the same run.
    series.push(Series {
        name: "floor: wake an idle thread (one byte on a socketpair)".into(),
        samples_ms: crate::floor::idle_wakeups(n)?,
    });
    table.push_str(
        "\nDAG hop, 1 KiB (producer's handler returns -> consumer's handler starts), and the wake-up of an idle thread (after 1 ms of quiet: one byte written -> the reader blocked on it runs):\n\n",
    );
    table.push_str(&crate::table(&series[first..], "hop http, local"));

    // 3. Payload sweep over the link vs TCP over the same veth.
    eprintln!("   payload sweep over the link vs TCP over the same veth");
    let sizes = [1usize << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
    let reps = |size: usize| if size >= 16 << 20 { 7 } else { 31 };
    let tcp = tcp_baseline(&ns, &sizes, reps)?;
    table.push_str("\nLink payload sweep (echo: the size goes and comes back; median of the runs; GB/s counts both ways). TCP over the same veth in the same run, streamed (the echo overlaps both directions) and whole (the receiver takes the whole message before sending it back, as a message link does):\n\n| size | runs | link round trip | link GB/s | TCP whole | GB/s | link / TCP whole | TCP streamed | GB/s |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut sweep = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let k = reps(size);
        link_echo(&client, 1, size, 2)?;
        let mut s = link_echo(&client, 1, size, k)?;
        s.sort_by(f64::total_cmp);
        let link_ms = s[s.len() / 2];
        let (streamed, whole) = tcp[i];
        let gbps = |ms: f64| 2.0 * size as f64 / (ms / 1000.0) / 1e9;
        table.push_str(&format!(
            "| {} KiB | {k} | {link_ms:.3} ms | {:.2} | {whole:.3} ms | {:.2} | {:.0}% | {streamed:.3} ms | {:.2} |\n",
            size >> 10,
            gbps(link_ms),
            gbps(whole),
            100.0 * whole / link_ms,
            gbps(streamed),
        ));
        sweep.push(serde_json::json!({"size": size, "link_ms": link_ms, "tcp_whole_ms": whole, "tcp_streamed_ms": streamed}));
    }

    // 4. Workloads spread over the two units.
    eprintln!("   workloads over two units: chain5 and alexa");
    let dagdir = functions.join("dag");
    for f in [
        "chain-step",
        "alexa-frontend",
        "alexa-interact",
        "alexa-smarthome",
        "alexa-device",
        "alexa-report",
    ] {
        let m = read_manifest(&dagdir.join(f))?;
        deploy_on(&client, &dagdir.join(f), &format!("x0-{f}"), m.sandbox, 0)?;
        deploy_on(&client, &dagdir.join(f), &format!("x1-{f}"), m.sandbox, 1)?;
    }
    let chain = |name: &str, units: [u32; 5]| {
        let mut t = format!("name = \"{name}\"\n");
        for (i, u) in units.iter().enumerate() {
            t.push_str(&format!(
                "[[nodes]]\nid = \"s{}\"\nfunction = \"x{u}-chain-step\"\n",
                i + 1
            ));
            if i > 0 {
                t.push_str(&format!("after = [\"s{i}\"]\n"));
            }
        }
        t
    };
    client.put_dag(&chain("xchain5-local", [0; 5]))?;
    client.put_dag(&chain("xchain5-units", [0, 1, 0, 1, 0]))?;
    // Alexa: the front end and report on unit 0; interaction, smart home and devices on unit 1.
    let alexa = |name: &str, far: u32| {
        let fe = |f: &str, u: u32| format!("x{u}-alexa-{f}");
        format!(
            "name = \"{name}\"\n[[nodes]]\nid = \"frontend\"\nfunction = \"{}\"\n[[nodes]]\nid = \"interact\"\nfunction = \"{}\"\nafter = [\"frontend\"]\n[[nodes]]\nid = \"smarthome\"\nfunction = \"{}\"\nafter = [\"interact\"]\n{}[[nodes]]\nid = \"report\"\nfunction = \"{}\"\nafter = [\"door\", \"light\", \"tv\", \"plug\"]\n",
            fe("frontend", 0),
            fe("interact", far),
            fe("smarthome", far),
            ["door", "light", "tv", "plug"]
                .iter()
                .map(|d| format!("[[nodes]]\nid = \"{d}\"\nfunction = \"{}\"\nafter = [\"smarthome\"]\n", fe("device", far)))
                .collect::<String>(),
            fe("report", 0),
        )
    };
    client.put_dag(&alexa("xalexa-local", 0))?;
    client.put_dag(&alexa("xalexa-units", 1))?;
    table.push_str("\nWorkloads end to end, request to response at the client (warm instances):\n\n| DAG | n | one unit, shm p50 | p99 | two units, link p50 | p99 | one unit, http p50 | p99 |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let inputs = [
        (
            "chain5",
            serde_json::json!({"n": 0, "pad": "x".repeat(1000)}),
        ),
        (
            "alexa",
            serde_json::json!({"user": "ann", "utterance": "open the door, lights on, watch TV"}),
        ),
    ];
    for (w, input) in &inputs {
        let mut row = Vec::new();
        for (dag, transport) in [
            (format!("x{w}-local"), "shm"),
            (format!("x{w}-units"), "shm"),
            (format!("x{w}-local"), "http"),
        ] {
            for _ in 0..3 {
                dag_run(&client, &dag, input, transport)?;
            }
            let s: Vec<f64> = (0..n)
                .map(|_| dag_run(&client, &dag, input, transport).map(|r| r.0))
                .collect::<Result<_>>()?;
            row.push(crate::summarize(&s));
            series.push(Series {
                name: format!(
                    "{w} e2e, {}",
                    if dag.ends_with("units") {
                        "two units"
                    } else if transport == "http" {
                        "one unit http"
                    } else {
                        "one unit shm"
                    }
                ),
                samples_ms: s,
            });
        }
        table.push_str(&format!(
            "| {w} | {n} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |\n",
            row[0].p50, row[0].p99, row[1].p50, row[1].p99, row[2].p50, row[2].p99
        ));
    }
    let plotted: Vec<Series> = series[..first + 3].to_vec();
    save_and_print(
        out,
        "xpu",
        &series,
        &table,
        host_meta(
            serde_json::json!({ "n": n, "sweep": sweep, "link": link.trim(), "netns": ns.name }),
        ),
        ("Cross-unit cfork, calls and DAG hops vs local", &plotted),
    )?;
    drop(client);
    drop(shim);
    drop(daemon);
    drop(ns);
    Ok(())
}
