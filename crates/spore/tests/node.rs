//! The Node.js runtime (container sandboxes).

mod common;

use common::{can_sandbox, fixture, Daemon};
use serde_json::{json, Value};

fn have_node(test: &str) -> bool {
    if std::path::Path::new(spore_runtime::NODE_INTERPRETER).exists() {
        return true;
    }
    eprintln!(
        "SKIP {test}: Node.js is not installed at {}",
        spore_runtime::NODE_INTERPRETER
    );
    false
}

#[test]
fn node_functions_run_in_containers() {
    if !can_sandbox("node_functions_run_in_containers")
        || !have_node("node_functions_run_in_containers")
    {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("node-echo"));
    d.deploy(&fixture("node-cb"));
    d.deploy(&fixture("node-bad"));

    let r = d.invoke_raw(
        "node-echo",
        br#"{"x": [1, 2]}"#,
        &[("X-Amz-Log-Type", "Tail")],
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-spore-start"], "cold");
    use base64::Engine as _;
    let log = base64::engine::general_purpose::STANDARD
        .decode(r.headers()["x-amz-log-result"].as_bytes())
        .unwrap();
    assert!(String::from_utf8_lossy(&log).contains(r#"node got {"x":[1,2]}"#));
    let v: Value = r.json().unwrap();
    assert_eq!(v["event"], json!({"x": [1, 2]}));
    assert_eq!(v["functionName"], "node-echo");
    assert_eq!(v["pid"], 1);
    assert_eq!(v["remainingOk"], true);

    let (err, start, v) = d.invoke("node-echo", json!({"fail": true}));
    assert!(err);
    assert_eq!(start, "warm");
    assert_eq!(v["errorType"], "TypeError");
    assert_eq!(v["errorMessage"], "asked to fail");
    assert!(
        v["trace"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("/var/task/index.js")),
        "{v}"
    );

    let (err, _, v) = d.invoke("node-cb", json!({"a": 2, "b": 40}));
    assert!(!err, "{v}");
    assert_eq!(v, json!({"sum": 42}));

    let (err, _, v) = d.invoke("node-bad", json!({}));
    assert!(err);
    assert_eq!(v["errorType"], "Runtime.ImportModuleError", "{v}");

    // Under the sandbox's filter (no io_uring, netlink but no other exotic sockets), files,
    // loopback TCP, interface listing and name lookups work.
    d.deploy(&fixture("node-sys"));
    let (err, _, v) = d.invoke("node-sys", json!({}));
    assert!(!err, "{v}");
    assert_eq!(v["back"], "hello", "{v}");
    assert_eq!(v["echoed"], "ping", "{v}");
    assert!(
        v["ifaces"].as_array().unwrap().contains(&json!("lo")),
        "{v}"
    );
    assert!(v["addr"].is_string(), "{v}");
    d.stop();
}

#[test]
fn node_in_cfork_is_refused_with_the_reason() {
    let d = Daemon::start();
    let r = d.create_as(&fixture("node-echo"), None, Some("cfork"));
    assert_eq!(r.status(), 400);
    let msg = r.json::<Value>().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("multi-threaded") && msg.contains("container"),
        "{msg}"
    );
}
