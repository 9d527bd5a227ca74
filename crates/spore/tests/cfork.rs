//! cfork: instances forked from a warm template into sandboxes of their own.

mod common;

use std::time::Duration;

use common::{can_sandbox, fixture, sample, Daemon};
use serde_json::{json, Value};

fn invoke_cold(d: &Daemon, name: &str, payload: Value) -> (bool, String, Value) {
    let r = d.invoke_raw(
        name,
        payload.to_string().as_bytes(),
        &[("X-Spore-Cold", "1")],
    );
    assert_eq!(r.status(), 200, "invoke {name}");
    let err = r.headers().get("x-amz-function-error").is_some();
    let start = r.headers()["x-spore-start"].to_str().unwrap().to_owned();
    (err, start, r.json().unwrap())
}

#[test]
fn forked_instances_start_from_the_template_and_are_independent() {
    if !can_sandbox("forked_instances_start_from_the_template_and_are_independent") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy_cfork(&fixture("rng"), "rng");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = d.invoke_raw("rng", b"{}", &[("X-Spore-Cold", "1")]);
        assert_eq!(r.status(), 200);
        let start = r.headers()["x-spore-start"].to_str().unwrap().to_owned();
        assert!(
            start == "fork" || (start == "cold" && seen.is_empty()),
            "start {start}"
        );
        if start == "fork" {
            let breakdown = r.headers()["x-spore-breakdown"]
                .to_str()
                .unwrap()
                .to_owned();
            for step in [
                "request=",
                "forked=",
                "cgroup=",
                "unshare=",
                "privileges=",
                "response=",
            ] {
                assert!(breakdown.contains(step), "{breakdown}");
            }
        }
        let v: Value = r.json().unwrap();
        assert_eq!(
            v["pid"], 1,
            "each child is pid 1 of its own pid namespace: {v}"
        );
        assert_eq!(v["threads"], 1, "{v}");
        // Only stdin/stdout/stderr, the control socket, and the one listdir itself opened.
        assert!(
            v["fds"].as_array().unwrap().len() <= 5,
            "template descriptors leaked: {v}"
        );
        assert!(
            v["fds"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f.as_u64().unwrap() <= 4),
            "{v}"
        );
        assert!(v["uid"].as_u64().unwrap() >= 1000, "{v}");
        seen.push(v);
    }
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            assert_ne!(
                a["random"], b["random"],
                "random state shared between children"
            );
            assert_ne!(a["uuid"], b["uuid"]);
            assert_ne!(a["hostname"], b["hostname"]);
        }
    }
    // Warm reuse still works in front of cfork.
    let (_, start, _) = d.invoke("rng", json!({}));
    assert_eq!(start, "warm");
    d.stop();
}

#[test]
fn forked_instances_are_isolated_like_containers() {
    if !can_sandbox("forked_instances_are_isolated_like_containers") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy_cfork(&fixture("probe"), "probe");
    d.deploy_cfork(&fixture("hog"), "hog");
    d.deploy_cfork(&fixture("bomb"), "bomb");
    d.deploy_cfork(&fixture("echo"), "echo");
    d.deploy_cfork(&fixture("err"), "err");
    d.deploy_cfork(&fixture("crash"), "crash");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (err, _, v) = invoke_cold(&d, "probe", json!({"port": port}));
    assert!(!err, "{v}");
    for path in ["/root", "/var/lib/spore", "/etc/shadow"] {
        assert_ne!(v[path], "READABLE", "{path}: {v}");
    }
    assert_eq!(v["pids"], json!([1]), "{v}");
    assert_eq!(v["tcp"], "ConnectionRefusedError", "{v}");
    for call in ["mount", "ptrace", "unshare"] {
        assert_eq!(v[call], json!([-1, 1]), "{call}: {v}");
    }

    let (err, _, v) = invoke_cold(&d, "hog", json!({}));
    assert!(err);
    assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");

    let (err, _, v) = invoke_cold(&d, "bomb", json!({}));
    assert!(!err, "{v}");
    assert!(v["forked"].as_u64().unwrap() < 64, "{v}");

    let (err, _, v) = invoke_cold(&d, "err", json!({"k": 1}));
    assert!(err);
    assert_eq!(v["errorType"], "ValueError");

    let (err, _, v) = invoke_cold(&d, "crash", json!({}));
    assert!(err);
    assert_eq!(v["errorType"], "Runtime.ExitError");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("exit status 7"),
        "{v}"
    );

    let (err, _, _) = invoke_cold(&d, "echo", json!({}));
    assert!(!err, "others keep working");
    drop(listener);
    d.stop();
}

#[test]
fn sample_functions_give_the_same_results_in_cfork_and_container() {
    if !can_sandbox("sample_functions_give_the_same_results_in_cfork_and_container") {
        return;
    }
    if common::packages_dir().is_none() {
        if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
            panic!("the Python packages are not installed; run scripts/setup.sh");
        }
        eprintln!("SKIP sample_functions_give_the_same_results_in_cfork_and_container: packages not installed");
        return;
    }
    let mut d = Daemon::start();
    // Deterministic parts of each result (timings differ).
    let checks: &[(&str, Value, &[&str])] = &[
        ("hello", json!({"name": "x"}), &["message"]),
        ("float_operation", json!({"n": 1000}), &["n", "checksum"]),
        ("linpack", json!({"n": 50}), &["n", "residual_ok"]),
        ("matmul", json!({"n": 32}), &["n", "trace"]),
        (
            "json_dumps_loads",
            json!({"records": 100}),
            &["records", "bytes"],
        ),
        (
            "pyaes",
            json!({"length_of_message": 100, "num_of_iterations": 2}),
            &["ok", "length"],
        ),
        (
            "image_processing",
            json!({"size": 64}),
            &["size", "png_bytes"],
        ),
    ];
    for (name, event, keys) in checks {
        d.deploy(&sample(name));
        let forked = format!("{name}-cfork");
        d.deploy_cfork(&sample(name), &forked);
        let (e1, _, a) = d.invoke(name, event.clone());
        let (e2, _, b) = invoke_cold(&d, &forked, event.clone());
        assert!(!e1 && !e2, "{name}: {a} / {b}");
        for k in *keys {
            assert_eq!(a[k], b[k], "{name}.{k}: container {a} vs cfork {b}");
        }
    }
    d.stop();
}

#[test]
fn a_template_killed_mid_fork_fails_that_call_clearly_and_is_recreated() {
    if !can_sandbox("a_template_killed_mid_fork_fails_that_call_clearly_and_is_recreated") {
        return;
    }
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut d = Daemon::start();
    d.deploy_cfork(&fixture("echo"), "echo");
    let (err, _, _) = invoke_cold(&d, "echo", json!({}));
    assert!(!err);
    let info: Value = d.get_json("/2015-03-31/functions/echo");
    let pids: Vec<i32> = info["Spore"]["Template"]["Pids"]
        .as_array()
        .expect("a live template")
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    assert!(!pids.is_empty());
    // Freeze the template so that the next fork request is stuck in it, then kill it.
    for p in &pids {
        kill(Pid::from_raw(*p), Signal::SIGSTOP).unwrap();
    }
    std::thread::scope(|s| {
        let call = s.spawn(|| d.invoke_raw("echo", b"{}", &[("X-Spore-Cold", "1")]));
        std::thread::sleep(Duration::from_millis(300));
        for p in &pids {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        let r = call.join().unwrap();
        assert_eq!(r.status(), 500, "the call in flight fails");
        let body: Value = r.json().unwrap();
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains("template died during the fork"), "{msg}");
    });
    // The next call gets a new template.
    let (err, start, v) = invoke_cold(&d, "echo", json!({"after": 1}));
    assert!(!err, "{v}");
    assert_eq!(start, "cold", "a new template was started");
    let (_, start, _) = invoke_cold(&d, "echo", json!({}));
    assert_eq!(start, "fork");
    d.stop();
}

#[test]
fn the_python_child_set_up_works_where_the_native_one_is_unavailable() {
    if !can_sandbox("the_python_child_set_up_works_where_the_native_one_is_unavailable") {
        return;
    }
    let mut d = Daemon::start_with_env(&[("SPORE_CFORK_NATIVE", "0")]);
    d.deploy_cfork(&fixture("rng"), "rng");
    d.deploy_cfork(&fixture("probe"), "probe");
    let (_, _, a) = invoke_cold(&d, "rng", json!({}));
    let (err, start, b) = invoke_cold(&d, "rng", json!({}));
    assert!(!err && start == "fork", "{b}");
    assert_eq!(b["pid"], 1);
    assert!(b["fds"].as_array().unwrap().len() <= 5, "{b}");
    assert_ne!(a["random"], b["random"]);
    let (err, _, v) = invoke_cold(&d, "probe", json!({"port": 9}));
    assert!(!err, "{v}");
    assert_eq!(v["pids"], json!([1]));
    for call in ["mount", "ptrace", "unshare"] {
        assert_eq!(v[call], json!([-1, 1]), "{call}: {v}");
    }
    // The child empties its bounding set too (sandbox_security.rs checks the native one).
    d.deploy_cfork(&fixture("sysprobe"), "sysprobe");
    let (err, _, v) = invoke_cold(&d, "sysprobe", json!({}));
    assert!(!err, "{v}");
    for key in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(v[key], "0000000000000000", "{key}: {v}");
    }
    d.stop();
    let log = d.log_text();
    assert!(
        log.contains("child set-up: python"),
        "the Python set-up was not the one used: {log}"
    );
    assert!(!log.contains("child set-up: native"), "{log}");
}

#[test]
fn threaded_libraries_just_work_and_a_threaded_template_is_the_functions_error() {
    if !can_sandbox("threaded_libraries_just_work_and_a_threaded_template_is_the_functions_error") {
        return;
    }
    let mut d = Daemon::start();
    // numpy in a cfork function with no thread settings of its own.
    if common::packages_dir().is_some() {
        d.deploy(&fixture("numpyfork"));
        let (err, _, v) = d.invoke("numpyfork", json!({}));
        assert!(!err, "{v}");
        assert_eq!(v["openblas"], "1");
        assert_eq!(v["trace"], 1240.0);
        // Max Memory Used counts the template's pages the child maps (numpy's included),
        // not only the few the child copied.
        use base64::Engine;
        let r = d.invoke_raw("numpyfork", b"{}", &[("X-Amz-Log-Type", "Tail")]);
        let tail = base64::engine::general_purpose::STANDARD
            .decode(r.headers()["x-amz-log-result"].as_bytes())
            .unwrap();
        let tail = String::from_utf8_lossy(&tail);
        let used: u64 = tail
            .split("Max Memory Used: ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no Max Memory Used: {tail}"));
        assert!(used >= 20, "a numpy fork reports {used} MB: {tail}");
    } else {
        eprintln!("SKIP the numpy part: no packages dir with numpy (scripts/setup.sh)");
    }
    // A function whose import starts a thread: a function error naming the thread.
    d.deploy(&fixture("threads"));
    let r = d.invoke_raw("threads", b"{}", &[]);
    let status = r.status();
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(status, 200, "a function error, not a platform one: {v}");
    assert_eq!(v["errorType"], "Runtime.InitError", "{v}");
    let msg = v["errorMessage"].as_str().unwrap();
    assert!(msg.contains("poller") && msg.contains("2 threads"), "{msg}");
    d.stop();
}

#[test]
fn a_call_that_waits_for_the_template_build_says_so() {
    if !can_sandbox("a_call_that_waits_for_the_template_build_says_so") {
        return;
    }
    let mut d = Daemon::start();
    // The create starts the template in the background; the call right behind it waits for
    // that build (or makes it), which takes far longer than a fork.
    d.deploy_cfork(&fixture("echo"), "echofork");
    let r = d.invoke_raw("echofork", b"{}", &[]);
    assert_eq!(r.status(), 200);
    let h = |k: &str| {
        r.headers()
            .get(k)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(h("x-spore-start"), "cold", "{:?}", r.headers());
    let breakdown = h("x-spore-breakdown");
    let template_ms: f64 = breakdown
        .split(',')
        .find_map(|s| s.strip_prefix("template="))
        .unwrap_or_else(|| panic!("no template step: {breakdown}"))
        .parse()
        .unwrap();
    let init_ms: f64 = h("x-spore-init-ms").parse().unwrap();
    assert!(
        template_ms > 0.0 && init_ms >= template_ms,
        "{breakdown} init {init_ms}"
    );
    // The next fresh instance is a plain fork.
    let r = d.invoke_raw("echofork", b"{}", &[("X-Spore-Cold", "1")]);
    assert_eq!(r.headers()["x-spore-start"], "fork");
    assert!(!r.headers()["x-spore-breakdown"]
        .to_str()
        .unwrap()
        .contains("template="));
    d.stop();
}
