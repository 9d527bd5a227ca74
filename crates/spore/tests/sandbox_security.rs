//! What a sandboxed function may not do (io_uring, vsock, personas, capabilities) in every
//! kind of sandbox, and that no sandbox outlives a daemon killed with SIGKILL.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{can_sandbox, fixture, repo_root, Daemon};
use serde_json::{json, Value};

/// Invokes `name` with `X-Spore-Cold: how` and `headers`: (start kind, body).
fn invoke_start(d: &Daemon, name: &str, how: &str, headers: &[(&str, &str)]) -> (String, Value) {
    d.invoke_start(name, how, &json!({}), headers)
}

/// Checks what the `sysprobe` fixture reported from inside one sandbox (`what`).
fn assert_contained(what: &str, v: &Value) {
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(v[key], "0000000000000000", "{what}: {key}: {v}");
    }
    assert_eq!(v["NoNewPrivs"], "1", "{what}: {v}");
    assert_eq!(v["Seccomp"], "2", "{what}: {v}");
    assert_ne!(v["uid"], 0, "{what}: {v}");
    if v["machine"] != "x86_64" {
        eprintln!(
            "{what}: system call numbers are x86-64's; not checked on {}",
            v["machine"]
        );
        return;
    }
    for call in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "pidfd_getfd",
        "kcmp",
        "mbind",
        "get_mempolicy",
        "fanotify_init",
        "x32_getpid",
        "socket_vsock",
        "socket_alg",
        "personality_linux32",
    ] {
        assert_eq!(v[call], json!([-1, libc::EPERM]), "{what}: {call}: {v}");
    }
    for family in ["unix", "inet", "inet6", "netlink"] {
        let key = format!("socket_{family}");
        assert!(v[&key][0].as_i64().unwrap() >= 0, "{what}: {key}: {v}");
    }
    assert_eq!(v["personality_query"], json!([0, 0]), "{what}: {v}");
}

#[test]
fn every_kind_of_sandbox_denies_io_uring_vsock_and_personas_and_keeps_no_capabilities() {
    let test = "every_kind_of_sandbox_denies_io_uring_vsock_and_personas_and_keeps_no_capabilities";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    let probe = fixture("sysprobe");
    d.deploy(&probe);
    let (start, v) = invoke_start(&d, "sysprobe", "1", &[]);
    assert_eq!(start, "cold");
    assert_contained("a container instance", &v);
    // Dropping to its uid cleared pid 1's parent-death signal; it is set again, so that
    // killing the sandbox's init kills the sandbox.
    assert_eq!(v["pdeathsig"], libc::SIGKILL, "{v}");

    d.deploy_cfork(&probe, "sysprobe-fork");
    let (_, v) = invoke_start(&d, "sysprobe-fork", "1", &[]);
    assert_contained("a cfork child", &v);

    d.deploy_snapshotted(&probe, "sysprobe-snap");
    invoke_start(&d, "sysprobe-snap", "1", &[]);
    for mode in ["full", "lazy"] {
        let (start, v) = invoke_start(
            &d,
            "sysprobe-snap",
            "restore",
            &[("X-Spore-Restore-Mode", mode)],
        );
        assert_eq!(start, "restore", "{mode}");
        assert_contained(&format!("a restored instance ({mode})"), &v);
        assert_eq!(v["pdeathsig"], libc::SIGKILL, "{mode}: {v}");
    }

    // A restored template has no exec to cut its capabilities to the bounding set; its
    // children end up the same.
    d.deploy_snapshotted_in(&probe, "sysprobe-tpl", Some("cfork"));
    invoke_start(&d, "sysprobe-tpl", "1", &[]);
    let (start, v) = invoke_start(&d, "sysprobe-tpl", "restore", &[]);
    assert_eq!(start, "restore");
    assert_contained("a child of a restored template", &v);
    d.stop();
}

/// Every process in the cgroups of the daemon on `data` (all hierarchies).
fn cgroup_pids(data: &Path) -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), out);
            }
        }
    }
    let parent = spore_control::cgroup_parent_name(data);
    let mut out = Vec::new();
    for root in ["", "memory", "cpu", "pids", "unified"] {
        walk(
            &Path::new("/sys/fs/cgroup").join(root).join(&parent),
            &mut out,
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Sandbox inits (`spore __sandbox-init`) whose spec names `data`.
fn sandbox_inits(data: &Path) -> Vec<u32> {
    let needle = data.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(spore_sandbox::INIT_SUBCOMMAND)
                && String::from_utf8_lossy(&environ).contains(&needle)
        })
        .collect()
}

/// What of the daemon on `data` still runs: its cgroups' processes and its sandbox inits.
fn left_running(data: &Path) -> Vec<u32> {
    let mut pids = cgroup_pids(data);
    pids.extend(sandbox_inits(data));
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            format!("{pid}: {}", cmd.chars().take(80).collect::<String>())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Kills the daemon with SIGKILL and expects every process of its sandboxes gone within a
/// few seconds; then a daemon started on the same data dir sweeps the cgroups it left and
/// stops cleanly.
fn kill_and_expect_nothing_left(mut d: Daemon) {
    let data: PathBuf = d.data.clone();
    let before = left_running(&data);
    assert!(
        !before.is_empty(),
        "the daemon has sandboxes to leave behind"
    );
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = left_running(&data);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 5 s after the daemon was killed: {}",
            describe(&left)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut again = Daemon::start_at(&data, &[]);
    again.stop();
    drop(d);
}

#[test]
fn kill_9_of_the_daemon_leaves_no_idle_sandbox_running() {
    let test = "kill_9_of_the_daemon_leaves_no_idle_sandbox_running";
    if !can_sandbox(test) {
        return;
    }
    let d = Daemon::start();
    // Idle: a container instance, a cfork template and its child, a restored instance with
    // its fault server, and the spare sandbox built after a restore.
    d.deploy(&fixture("echo"));
    d.invoke("echo", json!({}));
    d.deploy_cfork(&fixture("echo"), "echo-fork");
    invoke_start(&d, "echo-fork", "1", &[]);
    d.deploy_snapshotted(&fixture("rng"), "rng");
    invoke_start(&d, "rng", "1", &[]);
    let (start, _) = invoke_start(&d, "rng", "restore", &[("X-Spore-Restore-Mode", "lazy")]);
    assert_eq!(start, "restore");
    assert_eq!(invoke_start(&d, "rng", "restore", &[]).0, "restore");
    kill_and_expect_nothing_left(d);
}

fn read_dag(name: &str) -> String {
    std::fs::read_to_string(repo_root().join(format!("functions/dag/{name}.toml"))).unwrap()
}

#[test]
fn kill_9_of_the_daemon_during_a_dag_run_leaves_no_pipeline_running() {
    let test = "kill_9_of_the_daemon_during_a_dag_run_leaves_no_pipeline_running";
    if !can_sandbox(test) {
        return;
    }
    let d = Daemon::start();
    d.deploy(&repo_root().join("functions/dag/chain-step"));
    d.deploy(&fixture("sleepy"));
    // A cfork node, then a container node that sleeps for as long as the input says.
    let spec = r#"
name = "step-nap"
[[nodes]]
id = "step"
function = "chain-step"
[[nodes]]
id = "nap"
function = "sleepy"
after = ["step"]
"#;
    let r = d.http.post(d.url("/dags")).body(spec).send().unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    // Another DAG's pipeline stays idle (wired, its nodes waiting on their rings).
    d.deploy(&repo_root().join("functions/dag/payload-source"));
    d.deploy(&repo_root().join("functions/dag/payload-sink"));
    let r = d
        .http
        .post(d.url("/dags"))
        .body(read_dag("payload"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    let r = d
        .http
        .post(d.url("/dags/payload/invocations?transport=shm"))
        .body(json!({"size": 1024}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    // A run left in flight.
    let endpoint = d.endpoint.clone();
    let in_flight = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::new();
        let _ = http
            .post(format!(
                "{endpoint}/dags/step-nap/invocations?transport=shm"
            ))
            .body(json!({"n": 0, "s": 15.0}).to_string())
            .send();
    });
    std::thread::sleep(Duration::from_millis(1500));
    kill_and_expect_nothing_left(d);
    in_flight.join().unwrap();
}
