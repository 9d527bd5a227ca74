//! Many invocations at once: the pool scales out to its limit, queues the rest, and every call
//! is answered; a call that waits past the function's timeout gets 429.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{can_sandbox, fixture, Daemon};
use serde_json::{json, Value};

fn burst(d: &Daemon, name: &str, calls: usize) -> Vec<Value> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..calls)
            .map(|i| {
                s.spawn(move || {
                    let (err, _, v) = d.invoke(name, json!({"i": i, "s": 0.05}));
                    assert!(!err, "call {i}: {v}");
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn bursts_are_served_within_the_instance_limit() {
    if !can_sandbox("bursts_are_served_within_the_instance_limit") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("sleepy"));
    d.deploy_cfork(&fixture("sleepy"), "sleepy-cfork");
    for name in ["sleepy", "sleepy-cfork"] {
        let t0 = Instant::now();
        let results = burst(&d, name, 24);
        let answered: BTreeSet<i64> = results.iter().map(|v| v["i"].as_i64().unwrap()).collect();
        assert_eq!(answered.len(), 24, "{name}: every call answered once");
        let hosts: BTreeSet<&str> = results
            .iter()
            .map(|v| v["host"].as_str().unwrap())
            .collect();
        assert!(
            hosts.len() <= 3,
            "{name}: {} instances for max_instances = 3",
            hosts.len()
        );
        assert!(hosts.len() >= 2, "{name}: the pool scaled out ({hosts:?})");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name}: took {:?}",
            t0.elapsed()
        );
        let info: Value = d.get_json(&format!("/2015-03-31/functions/{name}"));
        assert!(
            info["Spore"]["Instances"]["Total"].as_u64().unwrap() <= 3,
            "{info}"
        );
    }
    d.stop();
}

#[test]
fn calls_waiting_past_the_timeout_get_429() {
    if !can_sandbox("calls_waiting_past_the_timeout_get_429") {
        return;
    }
    let d = Daemon::start();
    // One instance, a 1-second timeout, and calls that each hold it ~0.8 s.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("sleepy").join("main.py"),
        tmp.path().join("main.py"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("spore.toml"),
        "name = \"one\"\nhandler = \"main.handler\"\ntimeout_s = 1\nmax_instances = 1\n",
    )
    .unwrap();
    d.deploy(tmp.path());
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| d.invoke_raw("one", br#"{"s": 0.8}"#, &[]).status().as_u16()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let r = d.invoke_raw("one", br#"{"s": 0}"#, &[]);
    assert_eq!(r.status(), 200, "the function serves again afterwards");
}
