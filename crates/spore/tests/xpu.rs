//! Processing units: shims in network namespaces of their own, linked to the control plane
//! over veth pairs that the tests create (and remove).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{can_sandbox, packages_dir, sample, Daemon, Shim, BIN};
use serde_json::{json, Value};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this machine can run these tests; prints the reason when not.
fn can_link(test: &str) -> bool {
    if !can_sandbox(test) {
        return false;
    }
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP {test}: `ip netns` is not available (iproute2)");
    }
    ok
}

/// A network namespace joined to this one by a veth pair: the host end has `.1`, the
/// namespace end `.2` of a /30.
struct NetNs {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl NetNs {
    fn new() -> NetNs {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("spore-xpu-{pid}-{k}");
        let host_if = format!("sxh{}x{k}", pid % 100_000);
        let ns_if = format!("sxn{}x{k}", pid % 100_000);
        let octet = (pid * 7 + k * 13) % 250 + 1;
        let (host_ip, ns_ip) = (format!("10.213.{octet}.1"), format!("10.213.{octet}.2"));
        for stale in [["netns", "del", &name], ["link", "del", &host_if]] {
            let _ = Command::new("ip")
                .args(stale)
                .stderr(Stdio::null())
                .status();
        }
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs {
            name,
            host_if,
            host_ip,
            ns_ip,
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Shim {
    /// Unit `id` in `ns`, dialing `control` and joining with `token`.
    fn start(
        ns: &NetNs,
        id: u32,
        (control, token): (&str, &str),
        data: &Path,
        accelerators: &[&str],
    ) -> Shim {
        let acc: Vec<String> = accelerators
            .iter()
            .map(|a| format!("--accelerator={a}"))
            .collect();
        let acc: Vec<&str> = acc.iter().map(String::as_str).collect();
        Shim::start_with(ns, id, (control, token), data, &acc)
    }

    fn start_with(
        ns: &NetNs,
        id: u32,
        (control, token): (&str, &str),
        data: &Path,
        extra: &[&str],
    ) -> Shim {
        std::fs::create_dir_all(data).unwrap();
        let log = data.with_extension(format!("shim-log-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        let f = std::fs::File::create(&log).unwrap();
        // nsenter switches only the network namespace (`ip netns exec` would also mount a
        // new /sys, hiding the cgroup hierarchies the shim's sandboxes need).
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.name))
            .args(["--", BIN, "shim", "--id", &id.to_string()])
            .args(["--control", control, "--grace-s", "5", "--data-dir"])
            .arg(data);
        cmd.args(extra);
        if let Some(p) = packages_dir() {
            cmd.arg("--packages-dir").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .env("RUST_LOG", "info")
            .env_remove("SPORE_JOIN_TOKEN");
        if !token.is_empty() {
            cmd.env("SPORE_JOIN_TOKEN", token);
        }
        Shim {
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }
}

/// A join token of the control plane `d` (`spore cluster token`).
fn token(d: &Daemon) -> String {
    common::cluster(&["token"], &d.data)
}

/// The control plane, accepting links on the host end of `ns`.
fn control(ns: &NetNs) -> (tempfile::TempDir, Daemon, String) {
    let tmp = tempfile::Builder::new()
        .prefix("spore-xpu-")
        .tempdir()
        .unwrap();
    let d = Daemon::start_at(
        &tmp.path().join("d0"),
        &["--link-listen", &format!("{}:0", ns.host_ip)],
    );
    let link = std::fs::read_to_string(d.data.join("run/link-endpoint"))
        .unwrap()
        .trim()
        .to_owned();
    (tmp, d, link)
}

fn units(d: &Daemon) -> Vec<Value> {
    d.get_json("/spore/v1/units")["Units"]
        .as_array()
        .cloned()
        .unwrap()
}

fn wait_unit(d: &Daemon, id: u64, state: &str, shim_log: &dyn Fn() -> String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(u) = units(d)
            .into_iter()
            .find(|u| u["id"] == id && u["state"] == state)
        {
            return u;
        }
        assert!(
            Instant::now() < deadline,
            "unit {id} is not {state}: {:?}\nshim log:\n{}\ndaemon log:\n{}",
            units(d),
            shim_log(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates a function from a folder under `name` with Spore tags.
/// Deploys a DAG from its TOML text.
fn put_dag(d: &Daemon, spec: &str) {
    let r = d
        .http
        .post(d.url("/dags"))
        .header("content-type", "application/toml")
        .body(spec.to_owned())
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{spec}: {}", r.text().unwrap());
}

fn create(d: &Daemon, dir: &Path, name: &str, tags: Value) {
    let m = spore_core::FunctionManifest::from_toml(
        &std::fs::read_to_string(dir.join("spore.toml")).unwrap(),
    )
    .unwrap();
    let zip = spore_registry::code::zip_dir(dir).unwrap();
    let body = json!({
        "FunctionName": name, "Runtime": m.runtime.as_str(), "Handler": m.handler,
        "MemorySize": m.memory_mb, "Timeout": m.timeout_s,
        "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) },
        "Tags": tags,
    });
    let r = d
        .http
        .post(d.url("/2015-03-31/functions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "create {name}: {}", r.text().unwrap());
}

struct Answer {
    status: u16,
    unit: String,
    start: String,
    body: Value,
}

fn invoke(d: &Daemon, name: &str, payload: Value, cold: Option<&str>) -> Answer {
    let mut req = d
        .http
        .post(d.url(&format!("/2015-03-31/functions/{name}/invocations")))
        .json(&payload);
    if let Some(c) = cold {
        req = req.header("x-spore-cold", c);
    }
    let r = req.send().unwrap();
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (unit, start) = (h("x-spore-unit"), h("x-spore-start"));
    let status = r.status().as_u16();
    let body = r.json().unwrap_or(Value::Null);
    Answer {
        status,
        unit,
        start,
        body,
    }
}

#[test]
fn functions_and_dags_run_on_the_units_they_are_placed_on() {
    if !can_link("functions_and_dags_run_on_the_units_they_are_placed_on") {
        return;
    }
    let ns = NetNs::new();
    let (tmp, d, link) = control(&ns);
    assert!(link.starts_with(&ns.host_ip), "{link}");
    let t = token(&d);
    let shim = Shim::start(&ns, 1, (&link, &t), &tmp.path().join("d1"), &["fpga"]);
    let log = || shim.log_text();
    let u1 = wait_unit(&d, 1, "up", &log);
    assert_eq!(u1["accelerators"], json!(["fpga"]));
    assert_eq!(u1["arch"], std::env::consts::ARCH);
    assert!(
        u1["peer"].as_str().unwrap().starts_with(&ns.ns_ip),
        "the link comes from the namespace: {u1}"
    );

    let hello = sample("hello");
    create(&d, &hello, "hello-local", json!({}));
    create(&d, &hello, "hello-u1", json!({"spore:unit": "1"}));
    create(
        &d,
        &hello,
        "hello-u1-fork",
        json!({"spore:unit": "1", "spore:sandbox": "cfork"}),
    );
    create(
        &d,
        &hello,
        "hello-fpga",
        json!({"spore:accelerator": "fpga"}),
    );
    create(&d, &hello, "hello-tpu", json!({"spore:accelerator": "tpu"}));
    create(&d, &hello, "hello-u9", json!({"spore:unit": "9"}));

    let a = invoke(&d, "hello-local", json!({"name": "zero"}), None);
    assert_eq!((a.status, a.unit.as_str()), (200, "0"), "{:?}", a.body);
    for name in ["hello-u1", "hello-u1-fork", "hello-fpga"] {
        let a = invoke(&d, name, json!({"name": "one"}), None);
        assert_eq!(a.status, 200, "{name}: {}\n{}", a.body, log());
        assert_eq!(a.unit, "1", "{name} ran on unit {}", a.unit);
        assert_eq!(a.body["message"], "hello, one", "{name}: {}", a.body);
        // Warm on the unit afterwards.
        let w = invoke(&d, name, json!({"name": "again"}), None);
        assert_eq!((w.unit.as_str(), w.start.as_str()), ("1", "warm"), "{name}");
    }
    // Concurrent first calls each find the code missing on the unit and bring it: all succeed.
    create(&d, &hello, "hello-u1-par", json!({"spore:unit": "1"}));
    let go = std::sync::Arc::new(std::sync::Barrier::new(8));
    let par: Vec<_> = (0..8)
        .map(|i| {
            let (ep, http, go) = (d.endpoint.clone(), d.http.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                let r = http
                    .post(format!(
                        "{ep}/2015-03-31/functions/hello-u1-par/invocations"
                    ))
                    .json(&json!({"name": i}))
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.text().unwrap())
            })
        })
        .collect();
    for t in par {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // A fresh instance forked from the unit's template, across the link.
    let f = invoke(&d, "hello-u1-fork", json!({}), Some("fork"));
    assert_eq!(
        (f.status, f.unit.as_str(), f.start.as_str()),
        (200, "1", "fork"),
        "{}",
        f.body
    );
    let c = invoke(&d, "hello-u1", json!({}), Some("init"));
    assert_eq!(
        (c.status, c.unit.as_str(), c.start.as_str()),
        (200, "1", "cold")
    );

    // Placement errors name what is missing.
    let t = invoke(&d, "hello-tpu", json!({}), None);
    assert_eq!(t.status, 503, "{}", t.body);
    let msg = t.body["message"].as_str().unwrap();
    assert!(
        msg.contains("no unit can run function hello-tpu (it needs accelerator tpu)")
            && msg.contains("unit 1 has no tpu"),
        "{msg}"
    );
    let n = invoke(&d, "hello-u9", json!({}), None);
    assert_eq!(n.status, 503);
    assert!(
        n.body["message"]
            .as_str()
            .unwrap()
            .contains("pinned to unit 9, which has not registered"),
        "{}",
        n.body
    );

    // A function's errors come back from the unit the Lambda way.
    create(
        &d,
        &common::fixture("err"),
        "err-u1",
        json!({"spore:unit": "1"}),
    );
    let e = invoke(&d, "err-u1", json!({}), None);
    assert_eq!((e.status, e.unit.as_str()), (200, "1"));
    assert!(e.body["errorType"].is_string(), "{}", e.body);

    // A DAG across the two units gives the same result as on one.
    let step = sample("dag/chain-step");
    create(&d, &step, "step-a", json!({}));
    create(&d, &step, "step-b", json!({}));
    create(&d, &step, "step-b-u1", json!({"spore:unit": "1"}));
    let node = |id: &str, f: &str, after: &str, extra: &str| {
        format!("[[nodes]]\nid = \"{id}\"\nfunction = \"{f}\"\nafter = [{after}]\n{extra}")
    };
    let mut dags: Vec<(String, String)> = [("two-local", "step-b"), ("two-units", "step-b-u1")]
        .iter()
        .map(|(dag, second)| {
            let nodes = node("a", "step-a", "", "") + &node("b", second, "\"a\"", "");
            (dag.to_string(), nodes)
        })
        .collect();
    // Four nodes over two units, one of them placed by a node pin (`unit = 1` in the DAG),
    // and a fan-out/fan-in: a(0) -> b(1) -> c(1) -> d(0), a -> d.
    dags.push((
        "four-units".into(),
        node("a", "step-a", "", "")
            + &node("b", "step-b-u1", "\"a\"", "")
            + &node("c", "step-a", "\"b\"", "unit = 1\n")
            + &node("d", "step-b", "\"c\", \"a\"", ""),
    ));
    // A node on unit 1 that fails on request, between two on unit 0.
    dags.push((
        "fragile-units".into(),
        node("a", "step-a", "", "")
            + &node("f", "dag-fail", "\"a\"", "unit = 1\n")
            + &node("z", "step-b", "\"f\"", ""),
    ));
    create(&d, &sample("dag/dag-fail"), "dag-fail", json!({}));
    // Word count, its mappers (`each`) on unit 1 by a node pin, on one unit and on two: a DAG
    // with `each` nodes spread over units is relayed node by node.
    for f in ["wc-split", "wc-map", "wc-reduce"] {
        create(&d, &sample(&format!("dag/{f}")), f, json!({}));
    }
    for (dag, pin) in [("wc-local", ""), ("wc-units", "unit = 1\n")] {
        dags.push((
            dag.into(),
            node("split", "wc-split", "", "")
                + &node("map", "wc-map", "\"split\"", &format!("each = true\n{pin}"))
                + &node("reduce", "wc-reduce", "\"map\"", ""),
        ));
    }
    // Every node on unit 1: the control plane only routes.
    dags.push((
        "all-remote".into(),
        node("a", "step-b-u1", "", "") + &node("b", "step-a", "\"a\"", "unit = 1\n"),
    ));
    for (dag, nodes) in dags {
        put_dag(
            &d,
            &format!("name = \"{dag}\"\ntransport = \"shm\"\n{nodes}"),
        );
    }
    let run = |dag: &str| {
        let r = d
            .http
            .post(d.url(&format!("/dags/{dag}/invocations?timing=1")))
            .json(&json!({"n": 0, "tag": "x"}))
            .send()
            .unwrap();
        let transport = r
            .headers()
            .get("x-spore-transport")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let v: Value = r.json().unwrap();
        (transport, v)
    };
    let node_units = |v: &Value| -> Vec<(String, u64, String)> {
        let mut u: Vec<_> = v["Timing"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap().to_owned(),
                    n["unit"].as_u64().unwrap(),
                    n["start"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        u.sort();
        u
    };
    let run_with_transport = |dag: &str, input: &Value| {
        let r = d
            .http
            .post(d.url(&format!("/dags/{dag}/invocations?timing=1")))
            .json(input)
            .send()
            .unwrap();
        let transport = r.headers()["x-spore-transport"]
            .to_str()
            .unwrap()
            .to_owned();
        let v: Value = r.json().unwrap();
        (transport, v)
    };
    let (t_local, local) = run("two-local");
    assert_eq!(t_local, "shm");
    assert_eq!(local["Result"], json!({"n": 2, "tag": "x"}), "{local}");
    // Twice: the second run reuses the spread pipeline (its instances stay wired).
    for round in 0..2 {
        let (t_units, across) = run("two-units");
        assert_eq!(t_units, "shm+link", "{across}");
        assert_eq!(across["Result"], local["Result"], "{across}");
        let units: Vec<(String, u64)> = node_units(&across)
            .into_iter()
            .map(|(n, u, start)| {
                if round == 1 {
                    assert_eq!(start, "warm", "{across}");
                }
                (n, u)
            })
            .collect();
        assert_eq!(units, [("a".into(), 0), ("b".into(), 1)], "{across}");
    }
    // The cross-unit hop is timed (timing is best effort on a loaded host: a few tries).
    let hop = |v: &Value| {
        v["Timing"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "b")
            .and_then(|n| n["hop_us"].as_f64())
    };
    let timed = (0..5).find_map(|_| hop(&run("two-units").1));
    assert!(
        timed.is_some_and(|h| h > 0.0),
        "the cross-unit hop is never timed"
    );
    let units_of = |v: &Value| -> Vec<(String, u64)> {
        node_units(v).into_iter().map(|(n, u, _)| (n, u)).collect()
    };
    // Where each node ran comes from its timing, which a loaded host may report too late for
    // a run's answer: a few tries, each with the right result.
    let mut four = Value::Null;
    for _ in 0..5 {
        let (t, v) = run("four-units");
        assert_eq!(t, "shm+link", "{v}");
        // d sums c's count (3 steps) and a's (1), plus its own step.
        assert_eq!(v["Result"], json!({"n": 5, "tag": "x"}), "{v}");
        four = v;
        if units_of(&four).len() == 4 {
            break;
        }
    }
    assert_eq!(
        units_of(&four),
        [
            ("a".into(), 0),
            ("b".into(), 1),
            ("c".into(), 1),
            ("d".into(), 0)
        ],
        "{four}"
    );
    // A node failing on unit 1 fails the run, named, from the unit; the next run rebuilds
    // the pipeline and succeeds.
    let run_with = |dag: &str, input: Value| -> (bool, Value) {
        let r = d
            .http
            .post(d.url(&format!("/dags/{dag}/invocations")))
            .json(&input)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{dag}");
        let failed = r.headers().get("x-amz-function-error").is_some();
        (failed, r.json().unwrap())
    };
    assert_eq!(
        run_with("fragile-units", json!({"n": 0})),
        (false, json!({"n": 2}))
    );
    for (how, error_type) in [("raise", "ValueError"), ("crash", "Runtime.ExitError")] {
        let (failed, got) = run_with("fragile-units", json!({"n": 0, "fail": how}));
        assert!(failed, "{how}: {got}");
        assert_eq!(got["node"], "f", "{how}: {got}");
        assert_eq!(got["errorType"], error_type, "{how}: {got}");
        let (failed, got) = run_with("fragile-units", json!({"n": 0}));
        assert!(!failed, "after {how}: {got}");
        assert_eq!(got, json!({"n": 2}), "after {how}");
    }
    let words = json!({"words": 2000, "parts": 3, "seed": 7});
    let (t, wc_local) = run_with_transport("wc-local", &words);
    assert_eq!(t, "shm");
    let (t, wc_units) = run_with_transport("wc-units", &words);
    assert_eq!(t, "link", "{wc_units}");
    assert_eq!(wc_units["Result"], wc_local["Result"], "{wc_units}");
    assert_eq!(
        units_of(&wc_units),
        [
            ("map".into(), 1),
            ("map".into(), 1),
            ("map".into(), 1),
            ("reduce".into(), 0),
            ("split".into(), 0)
        ],
        "{wc_units}"
    );
    let (t, all) = run("all-remote");
    assert_eq!(t, "shm+link", "{all}");
    assert_eq!(all["Result"], json!({"n": 2, "tag": "x"}), "{all}");

    // `spore units` lists both, with what runs where.
    let out = Command::new(BIN)
        .args(["--endpoint", &d.endpoint, "units"])
        .env("SPORE_DATA_DIR", &d.data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(control plane)"), "{text}");
    let line1 = text.lines().find(|l| l.starts_with("1 ")).unwrap();
    assert!(
        line1.contains("up") && line1.contains("fpga") && line1.contains("hello-u1"),
        "{text}"
    );
    drop(shim);
    drop(d);
    drop(ns);
}

#[test]
fn dag_edges_between_two_shims_take_their_neighbour_link() {
    let test = "dag_edges_between_two_shims_take_their_neighbour_link";
    if !can_link(test) {
        return;
    }
    let ns = NetNs::new();
    let (tmp, d, link) = control(&ns);
    // Both shims in one namespace, each taking neighbour links on the namespace's address.
    let listen = format!("--link-listen={}:0", ns.ns_ip);
    let t = token(&d);
    let shim1 = Shim::start_with(&ns, 1, (&link, &t), &tmp.path().join("d1"), &[&listen]);
    let shim2 = Shim::start_with(&ns, 2, (&link, &t), &tmp.path().join("d2"), &[&listen]);
    wait_unit(&d, 1, "up", &|| shim1.log_text());
    wait_unit(&d, 2, "up", &|| shim2.log_text());
    create(&d, &sample("dag/chain-step"), "step", json!({}));
    // a (unit 1) -> b (unit 2) -> c (unit 0): the a -> b edge joins two shims.
    put_dag(&d, "name = \"shims\"\n[[nodes]]\nid = \"a\"\nfunction = \"step\"\nunit = 1\n[[nodes]]\nid = \"b\"\nfunction = \"step\"\nafter = [\"a\"]\nunit = 2\n[[nodes]]\nid = \"c\"\nfunction = \"step\"\nafter = [\"b\"]\n");
    for _ in 0..3 {
        let r = d
            .http
            .post(d.url("/dags/shims/invocations"))
            .json(&json!({"n": 0}))
            .send()
            .unwrap();
        let transport = r.headers().get("x-spore-transport").cloned();
        let v: Value = r.json().unwrap();
        assert_eq!(v, json!({"n": 3}));
        assert_eq!(transport.unwrap(), "shm+link");
    }
    // Unit 1 dialed unit 2: its heartbeat lists the neighbour link.
    wait_for("unit 1 to report its neighbour link to unit 2", || {
        units(&d)
            .iter()
            .find(|u| u["id"] == 1)
            .is_some_and(|u| u["load"]["neighbours"] == json!([2]))
    });
    assert!(
        shim1.log_text().contains("neighbour link up"),
        "{}",
        shim1.log_text()
    );
    assert!(
        !shim1.log_text().contains("through the control plane"),
        "{}",
        shim1.log_text()
    );
    drop(shim2);
    drop(shim1);
    drop(d);
}

#[test]
fn a_unit_that_dies_mid_invocation_fails_it_clearly_and_work_moves_on() {
    let test = "a_unit_that_dies_mid_invocation_fails_it_clearly_and_work_moves_on";
    if !can_link(test) {
        return;
    }
    let ns1 = NetNs::new();
    let ns2 = NetNs::new();
    // The control plane listens on every address, so both namespaces reach it.
    let tmp = tempfile::Builder::new()
        .prefix("spore-xpu-")
        .tempdir()
        .unwrap();
    let d = Daemon::start_at(&tmp.path().join("d0"), &["--link-listen", "0.0.0.0:0"]);
    let port = std::fs::read_to_string(d.data.join("run/link-endpoint"))
        .unwrap()
        .trim()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_owned();
    let t = token(&d);
    let mut shim1 = Shim::start(
        &ns1,
        1,
        (&format!("{}:{port}", ns1.host_ip), &t),
        &tmp.path().join("d1"),
        &["fpga"],
    );
    let shim2 = Shim::start(
        &ns2,
        2,
        (&format!("{}:{port}", ns2.host_ip), &t),
        &tmp.path().join("d2"),
        &["fpga"],
    );
    wait_unit(&d, 1, "up", &|| shim1.log_text());
    wait_unit(&d, 2, "up", &|| shim2.log_text());

    // Needs an fpga: placed on unit 1 (both fit and are idle; lower id first).
    create(
        &d,
        &common::fixture("sleepy"),
        "sleepy",
        json!({"spore:accelerator": "fpga"}),
    );
    let a = invoke(&d, "sleepy", json!({"s": 0.01}), None);
    assert_eq!((a.status, a.unit.as_str()), (200, "1"), "{}", a.body);

    // A DAG whose second node runs on unit 1 (a node pin) and is slow.
    create(&d, &sample("dag/chain-step"), "step", json!({}));
    put_dag(&d, "name = \"slow-units\"\n[[nodes]]\nid = \"a\"\nfunction = \"step\"\n[[nodes]]\nid = \"s\"\nfunction = \"sleepy\"\nafter = [\"a\"]\nunit = 1\n");
    let (endpoint, http) = (d.endpoint.clone(), d.http.clone());
    let slow_dag = std::thread::spawn(move || {
        http.post(format!("{endpoint}/dags/slow-units/invocations"))
            .json(&json!({"s": 5}))
            .send()
            .unwrap()
    });

    // Kill unit 1 in the middle of an invocation.
    let (endpoint, http) = (d.endpoint.clone(), d.http.clone());
    let slow = std::thread::spawn(move || {
        http.post(format!(
            "{endpoint}/2015-03-31/functions/sleepy/invocations"
        ))
        .json(&json!({"s": 5}))
        .send()
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(800));
    let t = Instant::now();
    shim1.kill();
    let r = slow.join().unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().unwrap();
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("unit 1 went down while running sleepy"),
        "{msg}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the failure took {:?}",
        t.elapsed()
    );
    // The DAG fails too, naming the node and the unit.
    let r = slow_dag.join().unwrap();
    assert!(r.headers().get("x-amz-function-error").is_some());
    let v: Value = r.json().unwrap();
    assert_eq!(
        (v["node"].as_str(), v["errorType"].as_str()),
        (Some("s"), Some("Spore.UnitDown")),
        "{v}"
    );
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("unit 1 went down"),
        "{v}"
    );
    let down = wait_unit(&d, 1, "down", &|| shim1.log_text());
    assert!(!down["reason"].as_str().unwrap().is_empty(), "{down}");

    // The next invocation goes to the live unit.
    let b = invoke(&d, "sleepy", json!({"s": 0.01}), None);
    assert_eq!((b.status, b.unit.as_str()), (200, "2"), "{}", b.body);
    // The platform kept serving local functions all along.
    create(&d, &sample("hello"), "hello", json!({}));
    assert_eq!(invoke(&d, "hello", json!({}), None).status, 200);

    // Unit 1 comes back on the same data dir and registers again.
    // Its certificate is in the data dir: no token needed this time.
    let shim1b = Shim::start(
        &ns1,
        1,
        (&format!("{}:{port}", ns1.host_ip), ""),
        &tmp.path().join("d1"),
        &["fpga"],
    );
    wait_unit(&d, 1, "up", &|| shim1b.log_text());
    // A shim that stops cleanly says so, and is marked down at once.
    drop(shim1b);
    wait_unit(&d, 1, "down", &|| String::new());
    drop(shim2);
    drop(d);
}

/// A throwaway etcd listening on `ip` (the veth's host end, so that namespaces reach it).
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_url: String,
    peer_url: String,
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    fn start(ip: &str, dir: &Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: dir.to_owned(),
            client_url: format!("http://{ip}:{}", free_port(ip)),
            peer_url: format!("http://127.0.0.1:{}", free_port("127.0.0.1")),
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("etcd-log"))
            .unwrap();
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("default={}", self.peer_url)])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get("/spore/none").is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One key's value, through etcd's JSON gateway.
    fn get(&self, key: &str) -> Result<Option<String>, reqwest::Error> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let v: Value = reqwest::blocking::Client::new()
            .post(format!("{}/v3/kv/range", self.client_url))
            .json(&json!({ "key": b64.encode(key) }))
            .timeout(Duration::from_secs(2))
            .send()?
            .json()?;
        Ok(v["kvs"][0]["value"]
            .as_str()
            .map(|s| String::from_utf8(b64.decode(s).unwrap()).unwrap()))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn membership_in_etcd_survives_etcd_and_control_plane_restarts() {
    let test = "membership_in_etcd_survives_etcd_and_control_plane_restarts";
    if !can_link(test) {
        return;
    }
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("SKIP {test}: no etcd binary (Debian package etcd-server)");
        return;
    }
    let ns = NetNs::new();
    let tmp = tempfile::Builder::new()
        .prefix("spore-xpu-")
        .tempdir()
        .unwrap();
    let mut etcd = Etcd::start(&ns.host_ip, &tmp.path().join("etcd"));
    let url = etcd.client_url.clone();
    let link_listen = format!("{}:0", ns.host_ip);
    let args = [
        "--link-listen",
        link_listen.as_str(),
        "--etcd",
        url.as_str(),
    ];
    let d0 = tmp.path().join("d0");
    let d = Daemon::start_at(&d0, &args);

    // The shim has no --control: it finds the control plane in etcd (and checks it holds
    // the CA its token names).
    let t = token(&d);
    let log = tmp.path().join("d1.shim-log");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name))
        .args([
            "--",
            BIN,
            "shim",
            "--id",
            "1",
            "--etcd",
            &url,
            "--accelerator",
            "fpga",
            "--join",
            &t,
        ])
        .args(["--grace-s", "5", "--data-dir"])
        .arg(tmp.path().join("d1"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .env("RUST_LOG", "info");
    if let Some(p) = packages_dir() {
        cmd.arg("--packages-dir").arg(p);
    }
    let shim = Shim {
        child: Some(cmd.spawn().unwrap()),
        log: log.with_extension("err"),
    };
    wait_unit(&d, 1, "up", &|| shim.log_text());
    let control_key = etcd
        .get("/spore/control")
        .unwrap()
        .expect("the control plane's key");
    assert!(control_key.contains(&ns.host_ip), "{control_key}");
    let member = etcd.get("/spore/units/1").unwrap().expect("unit 1's key");
    assert!(member.contains("fpga"), "{member}");
    wait_for("unit 1 registered in etcd", || {
        units(&d)
            .iter()
            .any(|u| u["id"] == 1 && u["etcd"] == "registered")
    });

    create(
        &d,
        &sample("hello"),
        "hello-fpga",
        json!({"spore:accelerator": "fpga"}),
    );
    let a = invoke(&d, "hello-fpga", json!({}), None);
    assert_eq!((a.status, a.unit.as_str()), (200, "1"), "{}", a.body);
    wait_for("the placement in etcd", || {
        etcd.get("/spore/placement/hello-fpga").unwrap().as_deref() == Some("1")
    });
    // New code reaches the unit, which replaces the function in its own registry: the
    // placement, the control plane's record, stays.
    let zip = spore_registry::code::zip_dir(&common::fixture("echo")).unwrap();
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/hello-fpga/code"))
        .json(&json!({ "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) }))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    let a = invoke(&d, "hello-fpga", json!({"x": 1}), None);
    assert_eq!((a.status, a.unit.as_str()), (200, "1"), "{}", a.body);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        etcd.get("/spore/placement/hello-fpga").unwrap().as_deref(),
        Some("1"),
        "a unit's own registry change removed the control plane's placement"
    );

    // etcd goes away: the cluster keeps serving.
    etcd.kill();
    for _ in 0..3 {
        let a = invoke(&d, "hello-fpga", json!({}), None);
        assert_eq!((a.status, a.unit.as_str()), (200, "1"), "{}", a.body);
    }
    wait_for("the control plane to notice", || {
        units(&d)[0]["etcd"]
            .as_str()
            .is_some_and(|s| s.starts_with("unreachable"))
    });
    assert_eq!(
        units(&d).iter().find(|u| u["id"] == 1).unwrap()["state"],
        "up"
    );
    // etcd comes back (past the leases' TTL): membership is registered again.
    std::thread::sleep(Duration::from_secs(7));
    etcd.spawn();
    wait_for("membership to recover", || {
        let u = units(&d);
        u[0]["etcd"] == "registered" && u.iter().any(|x| x["id"] == 1 && x["etcd"] == "registered")
    });
    assert!(etcd.get("/spore/units/1").unwrap().is_some());
    assert!(etcd.get("/spore/control").unwrap().is_some());

    // The control plane restarts on another port: the shim finds it through etcd, and the
    // placement is read back before any invocation.
    drop(d);
    let d = Daemon::start_at(&d0, &args);
    wait_unit(&d, 1, "up", &|| shim.log_text());
    let u1 = units(&d).into_iter().find(|u| u["id"] == 1).unwrap();
    assert_eq!(u1["functions"], json!(["hello-fpga"]), "{u1}");
    let a = invoke(&d, "hello-fpga", json!({}), None);
    assert_eq!((a.status, a.unit.as_str()), (200, "1"), "{}", a.body);
    drop(shim);
    wait_for("unit 1 to leave etcd", || {
        etcd.get("/spore/units/1").unwrap().is_none()
    });
    drop(d);
}

/// Reads one frame (header and payload) from a raw link connection.
fn read_frame(s: &mut impl std::io::Read) -> (u8, Vec<u8>) {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[1], p)
}

/// Accepts one TLS connection as the control plane `tls` would (a unit certificate
/// required).
fn accept_tls(
    l: &std::net::TcpListener,
    tls: &spore_cluster::tls::ControlTls,
) -> rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream> {
    let (s, _) = l.accept().unwrap();
    rustls::StreamOwned::new(rustls::ServerConnection::new(tls.link_config()).unwrap(), s)
}

#[test]
fn a_shim_survives_malformed_frames_from_its_control_plane() {
    use std::io::Write;
    let test = "a_shim_survives_malformed_frames_from_its_control_plane";
    if !can_sandbox(test) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("spore-xpu-")
        .tempdir()
        .unwrap();
    // A fake control plane on loopback, with a real cluster CA: unit 3's certificate is
    // put in the shim's data dir as a join would, so the shim links at once.
    let tls = spore_cluster::tls::ControlTls::open(&tmp.path().join("cp")).unwrap();
    let (key, csr) = spore_cluster::pki::unit_key(3).unwrap();
    let cert = tls.ca().sign_unit(3, &csr).unwrap();
    spore_cluster::pki::UnitCredentials::store(
        &tmp.path().join("d3"),
        &key,
        &cert,
        tls.ca().cert_pem(),
    )
    .unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let log = tmp.path().join("shim.log");
    let child = Command::new(BIN)
        .args(["shim", "--id", "3", "--control", &addr, "--data-dir"])
        .arg(tmp.path().join("d3"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env("RUST_LOG", "info")
        .env_remove("SPORE_JOIN_TOKEN")
        .spawn()
        .unwrap();
    let mut shim = Shim {
        child: Some(child),
        log,
    };
    // Greets the shim properly, then sends garbage.
    let mut s = accept_tls(&l, &tls);
    let (kind, hello) = read_frame(&mut s);
    assert_eq!(kind, 1, "the shim greets first");
    let hello: Value = serde_json::from_slice(&hello).unwrap();
    assert_eq!(hello["unit"]["id"], 3);
    assert_eq!(hello["role"], "shim");
    let ack = serde_json::to_vec(&json!({
        "version": 1, "role": "control",
        "unit": {"id": 0, "arch": "x86_64", "cores": 1, "memory_mb": 1},
    }))
    .unwrap();
    let mut frame = vec![0xA7, 2, 0, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&(ack.len() as u32).to_le_bytes());
    frame.extend_from_slice(&ack);
    s.write_all(&frame).unwrap();
    s.flush().unwrap();
    // A request frame whose message claims 1 TiB.
    let mut bad = vec![0xA7, 3, 1, 0, 2, 0, 0, 0, 8, 0, 0, 0];
    bad.extend_from_slice(&(1u64 << 40).to_le_bytes());
    s.write_all(&bad).unwrap();
    s.flush().unwrap();
    // The shim answers with a GoAway naming the problem (after any heartbeat it sent
    // first), and closes.
    let (kind, why) = loop {
        let (kind, payload) = read_frame(&mut s);
        if kind != 6 {
            break (kind, payload);
        }
    };
    assert_eq!(kind, 8, "expected a GoAway");
    let why = String::from_utf8_lossy(&why).into_owned();
    assert!(
        why.contains("malformed message from unit 0") && why.contains("exceeds"),
        "{why}"
    );
    // It keeps running and dials again.
    let mut s2 = accept_tls(&l, &tls);
    let (kind, _) = read_frame(&mut s2);
    assert_eq!(kind, 1, "the shim greets again");
    assert!(
        shim.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the shim exited: {}",
        shim.log_text()
    );
}
