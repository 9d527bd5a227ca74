//! Function DAGs: every workload gives the same result over shm and http, large payloads
//! arrive byte-exact, failures name their node and leak nothing, malformed specs are refused.

mod common;

use common::{can_sandbox, repo_root, Daemon};
use serde_json::{json, Value};
use sha2::Digest;

const FUNCTIONS: &[&str] = &[
    "chain-step",
    "payload-source",
    "payload-sink",
    "dag-fail",
    "alexa-frontend",
    "alexa-interact",
    "alexa-smarthome",
    "alexa-device",
    "alexa-report",
    "wc-split",
    "wc-map",
    "wc-reduce",
];

fn dag_file(name: &str) -> String {
    std::fs::read_to_string(
        repo_root()
            .join("functions/dag")
            .join(format!("{name}.toml")),
    )
    .unwrap()
}

fn put_dag(d: &Daemon, text: &str) -> reqwest::blocking::Response {
    d.http
        .post(d.url("/dags"))
        .body(text.to_owned())
        .send()
        .unwrap()
}

/// Invokes a DAG: (node failed, body as JSON).
fn run(d: &Daemon, name: &str, input: &Value, transport: &str) -> (bool, Value) {
    let r = d
        .http
        .post(d.url(&format!("/dags/{name}/invocations?transport={transport}")))
        .body(input.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "invoking DAG {name}");
    let failed = r.headers().get("x-amz-function-error").is_some();
    (failed, r.json().unwrap())
}

fn daemon_with_functions() -> Daemon {
    let d = Daemon::start();
    for f in FUNCTIONS {
        d.deploy(&repo_root().join("functions/dag").join(f));
    }
    d
}

/// Whether `pid` is `root` or one of its descendants (other daemons' runtimes, e.g. of
/// tests running beside this one, are not).
fn descends_from(mut pid: u32, root: u32) -> bool {
    for _ in 0..64 {
        if pid == root {
            return true;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        match status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            Some(parent) if parent > 1 => pid = parent,
            _ => return false,
        }
    }
    false
}

/// Memfds (rings, payloads, pipeline pages) the daemon and its sandboxed processes hold.
fn memfds(d: &Daemon) -> Vec<String> {
    let mut found = Vec::new();
    let daemon = d.child.as_ref().unwrap().id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if !descends_from(pid, daemon) {
            continue;
        }
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if [
                    "memfd:spore-ring",
                    "memfd:spore-payload",
                    "memfd:spore-pipeline",
                ]
                .iter()
                .any(|m| t.contains(m))
                {
                    found.push(format!("pid {pid}: {t}"));
                }
            }
        }
    }
    found
}

/// Removes the DAGs (which stops their idle pipelines), then checks that no ring, payload
/// or pipeline page is left open anywhere.
fn remove_and_expect_nothing_open(d: &Daemon, dags: &[&str]) {
    for name in dags {
        let r = d
            .http
            .delete(d.url(&format!("/dags/{name}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 204, "removing DAG {name}");
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !memfds(d).is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(memfds(d), Vec::<String>::new());
}

#[test]
fn every_workload_gives_the_same_result_over_shm_and_http() {
    if !can_sandbox("every_workload_gives_the_same_result_over_shm_and_http") {
        return;
    }
    let mut d = daemon_with_functions();
    let cases = [
        (
            "chain2",
            json!({"n": 0, "pad": "x"}),
            json!({"n": 2, "pad": "x"}),
        ),
        (
            "chain5",
            json!({"n": 0, "pad": "yy"}),
            json!({"n": 5, "pad": "yy"}),
        ),
        ("fanout", json!({"n": 0}), json!({"n": 9})),
        ("fanin", json!({"n": 1}), json!({"n": 9})),
        ("pychain", json!({"n": 0}), json!({"n": 10})),
    ];
    for (name, input, want) in &cases {
        assert_eq!(put_dag(&d, &dag_file(name)).status(), 201, "deploy {name}");
        for transport in ["shm", "http"] {
            let (failed, got) = run(&d, name, input, transport);
            assert!(!failed, "{name} over {transport}: {got}");
            assert_eq!(&got, want, "{name} over {transport}");
        }
    }
    // The application workloads: the same answer either way, and the right one.
    assert_eq!(put_dag(&d, &dag_file("alexa")).status(), 201);
    let utterance = json!({"user": "ann", "utterance": "open the door, lights on, watch TV, open"});
    let (f1, shm) = run(&d, "alexa", &utterance, "shm");
    let (f2, http) = run(&d, "alexa", &utterance, "http");
    assert!(!f1 && !f2, "{shm} {http}");
    assert_eq!(shm, http);
    assert_eq!(
        shm["states"],
        json!({"door": "open", "light": "on", "tv": "on", "plug": "off"})
    );
    assert_eq!(put_dag(&d, &dag_file("wordcount")).status(), 201);
    let text = json!({"words": 20000, "parts": 4, "seed": 7});
    let (f1, shm) = run(&d, "wordcount", &text, "shm");
    let (f2, http) = run(&d, "wordcount", &text, "http");
    assert!(!f1 && !f2, "{shm} {http}");
    assert_eq!(shm, http);
    assert_eq!(shm["words"], 20000);
    // The fixed DAGs keep pre-wired pipelines (rings and pages stay open between
    // invocations); removing the DAGs stops them, and nothing is left open.
    assert!(
        memfds(&d).iter().any(|m| m.contains("spore-pipeline")),
        "idle pipelines hold their pages"
    );
    remove_and_expect_nothing_open(
        &d,
        &[
            "chain2",
            "chain5",
            "fanout",
            "fanin",
            "pychain",
            "alexa",
            "wordcount",
        ],
    );
    d.stop();
}

#[test]
fn a_64_mib_payload_arrives_byte_exact() {
    if !can_sandbox("a_64_mib_payload_arrives_byte_exact") {
        return;
    }
    let mut d = daemon_with_functions();
    assert_eq!(put_dag(&d, &dag_file("payload")).status(), 201);
    let size = 64 << 20;
    let block: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let want: Vec<u8> = block.iter().copied().cycle().take(size).collect();
    let digest = hex(&sha2::Sha256::digest(&want));
    for mode in ["buffer", "bytes"] {
        let (failed, got) = run(&d, "payload", &json!({"size": size, "mode": mode}), "shm");
        assert!(!failed, "{mode}: {got}");
        assert_eq!(got["len"], size, "{mode}");
        assert_eq!(got["sha256"], digest.as_str(), "{mode}");
    }
    // Small payloads go through the ring itself.
    let (_, got) = run(
        &d,
        "payload",
        &json!({"size": 1000, "mode": "bytes"}),
        "shm",
    );
    assert_eq!(
        got["sha256"],
        hex(&sha2::Sha256::digest(&want[..1000])).as_str()
    );
    remove_and_expect_nothing_open(&d, &["payload"]);
    d.stop();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_failing_node_is_named_and_nothing_leaks() {
    if !can_sandbox("a_failing_node_is_named_and_nothing_leaks") {
        return;
    }
    let mut d = daemon_with_functions();
    let spec = r#"
name = "fragile"
[[nodes]]
id = "first"
function = "chain-step"
[[nodes]]
id = "middle"
function = "dag-fail"
after = ["first"]
[[nodes]]
id = "last"
function = "chain-step"
after = ["middle"]
"#;
    assert_eq!(put_dag(&d, spec).status(), 201);
    // chain-step passes the failure mode on to dag-fail.
    for (how, error_type) in [
        ("raise", "ValueError"),
        ("timeout", "Sandbox.Timedout"),
        ("crash", "Runtime.ExitError"),
    ] {
        for transport in ["shm", "http"] {
            let (failed, got) = run(&d, "fragile", &json!({"n": 0, "fail": how}), transport);
            assert!(failed, "{how} over {transport}: {got}");
            assert_eq!(got["node"], "middle", "{how} over {transport}: {got}");
            assert_eq!(
                got["errorType"], error_type,
                "{how} over {transport}: {got}"
            );
            assert!(
                got["errorMessage"]
                    .as_str()
                    .unwrap()
                    .contains("node \"middle\""),
                "{got}"
            );
        }
    }
    // The DAG still works afterwards, and no ring or payload is left open anywhere.
    let (failed, got) = run(&d, "fragile", &json!({"n": 0}), "shm");
    assert!(!failed, "{got}");
    remove_and_expect_nothing_open(&d, &["fragile"]);
    d.stop();
}

#[test]
fn malformed_dags_are_refused_with_the_reason() {
    if !can_sandbox("malformed_dags_are_refused_with_the_reason") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&repo_root().join("functions/dag/chain-step"));
    let cases = [
        ("name = \"c\"\n[[nodes]]\nid = \"a\"\nfunction = \"chain-step\"\nafter = [\"b\"]\n[[nodes]]\nid = \"b\"\nfunction = \"chain-step\"\nafter = [\"a\"]\n", "cycle"),
        ("name = \"u\"\n[[nodes]]\nid = \"a\"\nfunction = \"no-such-function\"\n", "does not exist"),
        ("name = \"d\"\n[[nodes]]\nid = \"a\"\nfunction = \"chain-step\"\nafter = [\"ghost\"]\n", "not a node"),
        ("name = \"x\"\nnodes = 3\n", "Malformed"),
        ("this is not toml", "Malformed"),
    ];
    for (text, reason) in cases {
        let r = put_dag(&d, text);
        assert_eq!(r.status(), 400, "{text}");
        let body: Value = r.json().unwrap();
        let msg = body["message"].as_str().unwrap_or_default();
        assert!(msg.contains(reason), "{text:?}: {msg}");
    }
    let r = d
        .http
        .post(d.url("/dags/nope/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(d.get_json("/dags")["Dags"], json!([]));
    d.stop();
}

#[test]
fn pipelines_follow_redeploys_pass_logs_on_and_serve_concurrent_runs() {
    use base64::Engine as _;
    if !can_sandbox("pipelines_follow_redeploys_pass_logs_on_and_serve_concurrent_runs") {
        return;
    }
    let mut d = daemon_with_functions();
    // A function of our own, redeployed between runs.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("stamp");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |v: u32| {
        std::fs::write(
            dir.join("main.py"),
            format!(
                "def handler(event, context):\n    print('stamp v{v} for', context.aws_request_id)\n    return {{'v': {v}, 'n': event['n']}}\n"
            ),
        )
        .unwrap();
    };
    write(1);
    std::fs::write(
        dir.join("spore.toml"),
        "name = \"stamp\"\nruntime = \"python3\"\nhandler = \"main.handler\"\nsandbox = \"cfork\"\nmax_instances = 8\n",
    )
    .unwrap();
    d.deploy(&dir);
    let spec = r#"
name = "stamped"
[[nodes]]
id = "step"
function = "chain-step"
[[nodes]]
id = "stamp"
function = "stamp"
after = ["step"]
"#;
    assert_eq!(put_dag(&d, spec).status(), 201);
    for _ in 0..2 {
        let (failed, got) = run(&d, "stamped", &json!({"n": 0}), "shm");
        assert!(!failed, "{got}");
        assert_eq!(got, json!({"v": 1, "n": 1}));
    }
    // What the handler printed inside the pipeline reaches the function's log.
    let logs = d.get_json("/spore/v1/functions/stamp/logs");
    assert!(logs.to_string().contains("stamp v1 for"), "{logs}");
    // A new revision of a function: the next run uses it (the old pipeline is stale).
    write(2);
    let zip = spore_registry::code::zip_dir(&dir).unwrap();
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/stamp/code"))
        .json(&json!({"ZipFile": base64::engine::general_purpose::STANDARD.encode(zip)}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    let (failed, got) = run(&d, "stamped", &json!({"n": 5}), "shm");
    assert!(!failed, "{got}");
    assert_eq!(got, json!({"v": 2, "n": 6}));
    // Concurrent runs get pipelines of their own, each with its own input.
    let results: Vec<(bool, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|t| {
                let d = &d;
                s.spawn(move || {
                    (0..4)
                        .map(|i| run(d, "stamped", &json!({"n": t * 10 + i}), "shm"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut seen: Vec<i64> = results
        .iter()
        .map(|(failed, got)| {
            assert!(!failed, "{got}");
            assert_eq!(got["v"], 2);
            got["n"].as_i64().unwrap()
        })
        .collect();
    seen.sort();
    let want: Vec<i64> = (0..3)
        .flat_map(|t| (0..4).map(move |i| t * 10 + i + 1))
        .collect();
    assert_eq!(seen, want);
    remove_and_expect_nothing_open(&d, &["stamped"]);
    d.stop();
}

#[test]
fn node_functions_on_shm_and_deletes_of_functions_in_use_are_refused() {
    if !can_sandbox("node_functions_on_shm_and_deletes_of_functions_in_use_are_refused") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&repo_root().join("functions/dag/chain-step"));
    d.deploy(&common::fixture("node-echo"));
    // A Node function cannot be a node of an shm DAG: refused at deploy with the reason.
    let spec = "name = \"mixed\"\n[[nodes]]\nid = \"a\"\nfunction = \"chain-step\"\n[[nodes]]\nid = \"b\"\nfunction = \"node-echo\"\nafter = [\"a\"]\n";
    let r = put_dag(&d, spec);
    assert_eq!(r.status(), 400);
    let msg = r.json::<Value>().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("node \"b\" runs function \"node-echo\" (node20); the shm transport serves Python functions only"),
        "{msg}"
    );
    let r = put_dag(&d, &format!("transport = \"http\"\n{spec}"));
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    // Deleting a function a DAG uses is refused with the DAG's name...
    let out = d.cli(&["rm", "node-echo"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Function node-echo is used by DAG mixed"),
        "{err}"
    );
    let r = d
        .http
        .delete(d.url("/2015-03-31/functions/chain-step"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(common::error_type(&r), "ResourceConflictException");
    assert!(d
        .log_text()
        .contains("delete refused: DAGs use the function"));
    // ... unless forced, which says which DAGs are now broken (they stay deployed).
    let out = d.cli(&["rm", "--force", "node-echo"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DAGs that use node-echo are now broken") && err.contains("mixed"),
        "{err}"
    );
    let r = d
        .http
        .get(d.url("/2015-03-31/functions/node-echo"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        d.get_json("/dags")["Dags"][0]["name"],
        "mixed",
        "the DAG stays"
    );
    d.stop();
}
