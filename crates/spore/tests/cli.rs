//! The CLI for daily work: `-o json` on every command that prints data (and it parses),
//! `spore ps` and `spore describe`, readable function errors, shell completions, and client
//! commands that wait for a daemon that is still starting.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_sandbox, fixture, Daemon, BIN};
use serde_json::{json, Value};

#[test]
fn json_output_ps_describe_and_readable_errors() {
    if !can_sandbox("json_output_ps_describe_and_readable_errors") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("echo"));
    d.deploy_cfork(&fixture("echo"), "echo-fork");
    d.deploy(&fixture("err"));
    for f in ["echo", "echo-fork"] {
        assert!(!d.invoke(f, json!({})).0);
    }
    // Every command that prints data prints JSON with -o json.
    let echo = fixture("echo");
    for args in [
        &["deploy", echo.to_str().unwrap()][..],
        &["evict", "echo"],
        &["ui"],
        &["ls"],
        &["units"],
        &["ps"],
        &["describe", "echo"],
        &["snapshot", "ls"],
        &["dag", "ls"],
        &["keys", "ls"],
    ] {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = d.cli(&full);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Result<Value, _> = serde_json::from_slice(&out.stdout);
        assert!(
            v.is_ok(),
            "{args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The deploy and evict above stopped echo's instance: start one again for ps.
    assert!(!d.invoke("echo", json!({})).0);
    // A daemon's error comes as JSON too.
    let out = d.cli(&["-o", "json", "rm", "nope"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["type"], "ResourceNotFoundException", "{v}");
    let out = d.cli(&["-o", "json", "logs", "echo"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(
            v["timestamp"].is_u64() && v["message"].is_string(),
            "{line}"
        );
    }
    // ps: the warm instance, the template and its child.
    let out = d.cli(&["-o", "json", "ps"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let procs = v["Processes"].as_array().unwrap();
    assert!(procs
        .iter()
        .any(|p| p["function"] == "echo" && p["kind"] == "instance" && p["state"] == "idle"));
    assert!(procs
        .iter()
        .any(|p| p["function"] == "echo-fork" && p["kind"] == "template"));
    // The child forked for the first call (reported `cold` when that call waited for the
    // template's build after the deploy).
    assert!(
        procs.iter().any(|p| p["function"] == "echo-fork"
            && p["kind"] == "instance"
            && (p["start"] == "fork" || p["start"] == "cold")),
        "{v}"
    );
    let text = String::from_utf8_lossy(&d.cli(&["ps"]).stdout).into_owned();
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with("KIND") && header.contains("PIDS"),
        "{text}"
    );
    // describe
    let text = String::from_utf8_lossy(&d.cli(&["describe", "echo"]).stdout).into_owned();
    assert!(
        text.contains("Function:     echo") && text.contains("1 idle"),
        "{text}"
    );
    // A function error: type, message and traceback lines on stderr, exit 3.
    let out = d.cli(&["invoke", "err"]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("err failed: "), "{stderr}");
    assert!(!stderr.contains("\\n"), "escaped newlines: {stderr}");
    d.stop();
}

#[test]
fn a_bench_option_the_measurement_cannot_use_is_refused_by_name() {
    // Refused before any daemon starts: no root, no sandbox needed.
    let out = Command::new(BIN)
        .args([
            "bench",
            "cold-start",
            "--sandbox",
            "container",
            "--gap-ms",
            "10",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--gap-ms") && err.contains("--sandbox cfork"),
        "{err}"
    );
}

#[test]
fn completions_and_a_daemon_that_is_still_starting() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("describe"));
    }
    if !can_sandbox("completions_and_a_daemon_that_is_still_starting") {
        return;
    }
    // `spore serve &` then a client command at once: the client waits for it.
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let ready = tmp.path().join("ready");
    let mut daemon = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Command::new(BIN)
        .args(["ls"])
        .env("SPORE_ENDPOINT", &endpoint)
        .env("SPORE_DATA_DIR", tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the client did not wait for the daemon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), endpoint);
    common::terminate(daemon_take(&mut daemon), Duration::from_secs(10));
    assert!(!ready.exists(), "the ready file goes at shutdown");
}

fn daemon_take(c: &mut std::process::Child) -> std::process::Child {
    std::mem::replace(
        c,
        Command::new("/bin/true")
            .spawn()
            .expect("a placeholder child"),
    )
}

/// `spore deploy` passes every Spore setting of the manifest, and refuses, by name, a
/// redeploy that would change one that is fixed at creation instead of ignoring it.
#[test]
fn a_redeploy_that_changes_a_fixed_setting_is_refused_by_name() {
    if !can_sandbox("a_redeploy_that_changes_a_fixed_setting_is_refused_by_name") {
        return;
    }
    let mut d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path();
    std::fs::write(f.join("main.py"), "def handler(e, c):\n    return 1\n").unwrap();
    let manifest = |extra: &str| {
        std::fs::write(
            f.join("spore.toml"),
            format!("name = \"fixed\"\nhandler = \"main.handler\"\n{extra}"),
        )
        .unwrap();
    };
    manifest("network = \"none\"\nauto_warmup = false\n");
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = d.get_json("/2015-03-31/functions/fixed");
    assert_eq!(got["Tags"]["spore:network"], "none", "{got}");
    assert_eq!(got["Tags"]["spore:auto_warmup"], "false", "{got}");
    // The same settings redeploy; a changed one is refused and named.
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    manifest("network = \"egress\"\nauto_warmup = false\n");
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("network: none -> egress") && err.contains("spore rm fixed"),
        "{err}"
    );
    let got = d.get_json("/2015-03-31/functions/fixed");
    assert_eq!(got["Tags"]["spore:network"], "none", "unchanged: {got}");
    d.stop();
}
