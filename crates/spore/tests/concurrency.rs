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

/// Deploys the `sleepy` fixture as `name` with one instance at most and a timeout.
fn deploy_single_sleepy(d: &Daemon, name: &str, timeout_s: u32) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("sleepy").join("main.py"),
        tmp.path().join("main.py"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("spore.toml"),
        format!(
            "name = \"{name}\"\nhandler = \"main.handler\"\ntimeout_s = {timeout_s}\nmax_instances = 1\n"
        ),
    )
    .unwrap();
    d.deploy(tmp.path());
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
    deploy_single_sleepy(&d, "one", 1);
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

#[test]
fn a_caller_that_gives_up_leaves_the_invocation_to_finish_and_free_its_instance() {
    let test = "a_caller_that_gives_up_leaves_the_invocation_to_finish_and_free_its_instance";
    if !can_sandbox(test) {
        return;
    }
    let d = Daemon::start();
    deploy_single_sleepy(&d, "single", 20);
    // The client hangs up after 0.5 s of a 1.5 s invocation.
    let impatient = d.http.clone();
    let r = impatient
        .post(d.url("/2015-03-31/functions/single/invocations"))
        .body(r#"{"s": 1.5}"#)
        .timeout(Duration::from_millis(500))
        .send();
    assert!(r.is_err(), "the client should have timed out");
    // The one instance comes back once that invocation ends: the next call is served (it
    // waits at most ~1 s), not refused after the 20 s timeout.
    let t = Instant::now();
    let r = d.invoke_raw("single", br#"{"s": 0}"#, &[]);
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "served after {:?}",
        t.elapsed()
    );
    // The abandoned invocation ran to its end and reported.
    let logs = d.get_json("/spore/v1/functions/single/logs?lines=50");
    let reports = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l.as_str().unwrap().starts_with("REPORT"))
        .count();
    assert_eq!(reports, 2, "{logs}");
}
