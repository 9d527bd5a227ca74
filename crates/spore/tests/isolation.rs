//! A function cannot reach beyond its sandbox, and a misbehaving one does not hurt others.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{can_sandbox, fixture, Daemon};
use serde_json::json;

#[test]
fn sandbox_hides_the_host() {
    if !can_sandbox("sandbox_hides_the_host") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("probe"));
    // A port open on the host's loopback, which the function must not reach.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (err, _, v) = d.invoke("probe", json!({"port": port}));
    assert!(!err, "{v}");
    for path in ["/root", "/var/lib/spore", "/etc/shadow"] {
        assert_ne!(v[path], "READABLE", "{path} readable: {v}");
    }
    assert_eq!(v["pids"], json!([1]), "host pids visible: {v}");
    assert_eq!(
        v["tcp"], "ConnectionRefusedError",
        "host loopback reachable: {v}"
    );
    // mount, ptrace and unshare fail with EPERM (seccomp and no capabilities).
    for call in ["mount", "ptrace", "unshare"] {
        assert_eq!(v[call], json!([-1, 1]), "{call}: {v}");
    }
    assert!(
        v["uid"].as_u64().unwrap() >= 1000,
        "runs as an unprivileged uid: {v}"
    );
    drop(listener);
    d.stop();
}

#[test]
fn memory_hog_is_killed_and_others_keep_working() {
    if !can_sandbox("memory_hog_is_killed_and_others_keep_working") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("hog"));
    d.deploy(&fixture("echo"));
    std::thread::scope(|s| {
        let hog = s.spawn(|| d.invoke("hog", json!({})));
        // Meanwhile, another function answers.
        for i in 0..5 {
            let (err, _, v) = d.invoke("echo", json!({"i": i}));
            assert!(!err, "{v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (err, _, v) = hog.join().unwrap();
        assert!(err);
        assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");
        assert!(v["errorMessage"].as_str().unwrap().contains("64 MB"), "{v}");
    });
    let (err, _, _) = d.invoke("echo", json!({"after": true}));
    assert!(!err);
    d.stop();
}

#[test]
fn fork_bomb_is_stopped_by_the_pids_limit() {
    if !can_sandbox("fork_bomb_is_stopped_by_the_pids_limit") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("bomb"));
    d.deploy(&fixture("echo"));
    let (err, _, v) = d.invoke("bomb", json!({}));
    assert!(!err, "{v}");
    let forked = v["forked"].as_u64().unwrap();
    assert!(
        forked < 64,
        "forked {forked} processes past the limit of 64"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("Resource temporarily unavailable"),
        "{v}"
    );
    // The instance with stray children is not reused: the next call is a fresh start.
    let (_, start, _) = d.invoke("bomb", json!({}));
    assert_eq!(start, "cold");
    let (err, _, _) = d.invoke("echo", json!({}));
    assert!(!err);
    d.stop();
}
