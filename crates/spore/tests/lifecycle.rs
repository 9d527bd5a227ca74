//! Daemon lifecycle: restart recovery, clean shutdown, the data-dir lock, and the CLI.

mod common;

use std::process::Command;

use common::{can_sandbox, fixture, Daemon, BIN};
use serde_json::{json, Value};

#[test]
fn functions_survive_a_restart_and_nothing_leaks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_at(&data, &[]);
    d.deploy(&fixture("echo"));
    d.deploy(&fixture("err"));
    let sandboxes = can_sandbox("functions_survive_a_restart_and_nothing_leaks (invoke part)");
    if sandboxes {
        let (err, _, _) = d.invoke("echo", json!({}));
        assert!(!err);
    }
    d.stop();

    // A second daemon on the same data dir while one runs is refused.
    let mut d2 = Daemon::start_at(&data, &[]);
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another spore daemon"), "{stderr}");

    let list: Value = d2.get_json("/2015-03-31/functions");
    let names: Vec<&str> = list["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["FunctionName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "err"]);
    if sandboxes {
        let (err, start, v) = d2.invoke("echo", json!({"again": 1}));
        assert!(!err, "{v}");
        assert_eq!(start, "cold");
    }
    d2.stop();
}

#[test]
fn a_corrupt_record_is_skipped_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_at(&data, &[]);
    d.deploy(&fixture("echo"));
    d.stop();
    std::fs::create_dir_all(data.join("functions/broken")).unwrap();
    std::fs::write(data.join("functions/broken/function.json"), "{ not json").unwrap();
    let mut d = Daemon::start_at(&data, &[]);
    let list: Value = d.get_json("/2015-03-31/functions");
    assert_eq!(list["Functions"].as_array().unwrap().len(), 1);
    d.stop();
    assert!(
        d.log_text().contains("broken"),
        "the skipped record is reported: {}",
        d.log_text()
    );
}

#[test]
fn sandboxes_left_by_a_killed_daemon_are_swept() {
    if !can_sandbox("sandboxes_left_by_a_killed_daemon_are_swept") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_at(&data, &[]);
    d.deploy(&fixture("echo"));
    d.invoke("echo", json!({}));
    // SIGKILL: no chance to clean up; the warm instance and its cgroup stay.
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let parent = spore_control::cgroup_parent_name(&data);
    let memory = std::path::Path::new("/sys/fs/cgroup/memory").join(&parent);
    if memory.exists() {
        assert!(
            std::fs::read_dir(&memory)
                .unwrap()
                .flatten()
                .any(|e| e.path().is_dir()),
            "expected a leftover sandbox cgroup"
        );
    }
    let mut d = Daemon::start_at(&data, &[]);
    assert!(
        d.log_text().contains("left by a previous daemon"),
        "{}",
        d.log_text()
    );
    let (err, _, _) = d.invoke("echo", json!({}));
    assert!(!err);
    d.stop();
}

fn spore(d: &Daemon, args: &[&str]) -> std::process::Output {
    d.cli(args)
}

#[test]
fn cli_deploy_invoke_ls_logs_rm() {
    if !can_sandbox("cli_deploy_invoke_ls_logs_rm") {
        return;
    }
    let mut d = Daemon::start();
    let echo = fixture("echo");
    let out = spore(&d, &["deploy", echo.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployed echo"));
    // Deploying again updates in place.
    assert!(spore(&d, &["deploy", echo.to_str().unwrap()])
        .status
        .success());

    let out = spore(
        &d,
        &[
            "invoke",
            "echo",
            "--payload",
            r#"{"cli": true}"#,
            "--verbose",
        ],
    );
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"], json!({"cli": true}));
    assert!(String::from_utf8_lossy(&out.stderr).contains("start=cold"));

    let payload = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(payload.path(), r#"{"from": "file"}"#).unwrap();
    let out = spore(
        &d,
        &[
            "invoke",
            "echo",
            "--payload",
            &format!("@{}", payload.path().display()),
            "--cold",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"], json!({"from": "file"}));

    let err_dir = fixture("err");
    assert!(spore(&d, &["deploy", err_dir.to_str().unwrap()])
        .status
        .success());
    let out = spore(&d, &["invoke", "err"]);
    assert_eq!(out.status.code(), Some(3), "a function error exits 3");
    // Readable on stderr; the error JSON itself with -o json.
    assert!(String::from_utf8_lossy(&out.stderr).contains("ValueError"));
    let out = spore(&d, &["-o", "json", "invoke", "err"]);
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errorType"], "ValueError");

    let out = spore(&d, &["ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("echo") && text.contains("err"), "{text}");
    assert!(
        text.contains("SANDBOX") && text.contains("container"),
        "{text}"
    );

    let out = spore(&d, &["logs", "echo", "-n", "50"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo got {'cli': True}"));

    let out = spore(&d, &["invoke", "echo", "--payload", "{broken"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidRequestContentException"));

    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("spore.toml"),
        "name = \"x\"\nhandler = \"nodot\"\n",
    )
    .unwrap();
    let out = spore(&d, &["deploy", bad.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("handler") && stderr.contains("spore.toml"),
        "{stderr}"
    );

    assert!(spore(&d, &["rm", "echo"]).status.success());
    let out = spore(&d, &["invoke", "echo"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ResourceNotFoundException"));

    let out = Command::new(BIN)
        .args(["ls"])
        .env("SPORE_ENDPOINT", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `spore serve` running?"));
    d.stop();
}

#[test]
fn shutdown_lets_in_flight_invocations_finish_and_refuses_new_ones() {
    if !can_sandbox("shutdown_lets_in_flight_invocations_finish_and_refuses_new_ones") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_at(&data, &[]);
    d.deploy(&fixture("slow"));
    d.deploy(&fixture("echo"));
    d.invoke("echo", json!({}));
    std::thread::scope(|s| {
        let slow = s.spawn(|| d.invoke_raw("slow", br#"{"s": 1.5}"#, &[]));
        std::thread::sleep(std::time::Duration::from_millis(500));
        let pid = d.child.as_ref().unwrap().id() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Draining: no new invocations (the listener may already be closed, or answer 503).
        if let Ok(r) = d
            .http
            .post(d.url("/2015-03-31/functions/echo/invocations"))
            .body("{}")
            .send()
        {
            assert_eq!(r.status(), 503, "a new invocation during the drain");
        }
        let r = slow.join().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.json::<Value>().unwrap(),
            json!("woke"),
            "the in-flight call finished"
        );
    });
    let status = d.child.as_mut().unwrap().wait().unwrap();
    assert!(status.success(), "{status}");
    d.child = None;
    common::assert_no_leaks(&data);
}

#[test]
fn idle_instances_are_reaped_after_the_keep_alive() {
    if !can_sandbox("idle_instances_are_reaped_after_the_keep_alive") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_at(&data, &["--keep-alive-s", "1"]);
    d.deploy(&fixture("echo"));
    d.deploy_cfork(&fixture("echo"), "echo-cfork");
    d.invoke("echo", json!({}));
    d.invoke("echo-cfork", json!({}));
    let total = |name: &str| -> u64 {
        let v: Value = d.get_json(&format!("/2015-03-31/functions/{name}"));
        v["Spore"]["Instances"]["Total"].as_u64().unwrap()
    };
    assert_eq!((total("echo"), total("echo-cfork")), (1, 1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while total("echo") + total("echo-cfork") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle instances were not reaped"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The next call starts afresh (a fork: the template outlives its instances).
    let (_, start, _) = d.invoke("echo", json!({}));
    assert_eq!(start, "cold");
    let (_, start, _) = d.invoke("echo-cfork", json!({}));
    assert_eq!(start, "fork");
    d.stop();
}

#[test]
fn a_daemon_without_root_keeps_the_registry_and_refuses_invocations_clearly() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP a_daemon_without_root_keeps_the_registry_and_refuses_invocations_clearly: needs root to start a daemon as another user (the other tests already run unprivileged here)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = tmp.path().join("data");
    let log = std::fs::File::create(tmp.path().join("log")).unwrap();
    // A copy the unprivileged user can reach, wherever the checkout lives.
    let bin = tmp.path().join("spore");
    std::fs::copy(BIN, &bin).unwrap();
    // Another test thread forking while the copy was open for writing holds that descriptor
    // in its child until the child execs: exec then fails with ETXTBSY for a moment. Retry.
    let mut tries = 0;
    let mut child = loop {
        let r = Command::new(&bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .uid(65534)
            .gid(65534)
            .stdout(log.try_clone().unwrap())
            .stderr(log.try_clone().unwrap())
            .spawn();
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let endpoint = loop {
        if let Ok(e) = std::fs::read_to_string(data.join("run/endpoint")) {
            break e.trim().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "daemon did not start: {}",
            std::fs::read_to_string(tmp.path().join("log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    use base64::Engine as _;
    let zip = base64::engine::general_purpose::STANDARD
        .encode(spore_registry::code::zip_dir(&fixture("echo")).unwrap());
    let creds =
        spore_auth::credentials::read_profile(&data.join("credentials"), "default").unwrap();
    let http = spore_client::Http::new(std::time::Duration::from_secs(60), creds).unwrap();
    let r = http
        .post(format!("{endpoint}/2015-03-31/functions"))
        .json(&json!({"FunctionName": "echo", "Runtime": "python3", "Handler": "main.handler", "Code": {"ZipFile": zip}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "the registry works without root");
    let r = http
        .post(format!("{endpoint}/2015-03-31/functions/echo/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    let msg = r.json::<Value>().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("need root"), "{msg}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(tmp.path().join("log")).unwrap();
    assert!(text.contains("invocations are disabled"), "{text}");
}
