//! Running Spore as a service: the systemd unit passes `systemd-analyze verify`, a
//! configuration file sets the daemon's options (flags and environment win over it, unknown
//! keys are refused), and the Grafana dashboard asks only for metric families the daemon
//! exports.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_sandbox, repo_root, BIN};

#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("SKIP the_systemd_unit_verifies: systemd-analyze is not installed");
        return;
    };
    // The unit names /usr/local/bin/spore; verify it against this build's binary.
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/spore.service")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spore.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/spore", BIN)).unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without a running systemd (containers) verify still parses every directive; what it
    // says about the unit itself must be nothing.
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("spore.service"))
        .collect();
    assert!(about_unit.is_empty(), "{text}");
}

#[test]
fn a_configuration_file_sets_options_and_refuses_unknown_keys() {
    if !can_sandbox("a_configuration_file_sets_options_and_refuses_unknown_keys") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = tmp.path().join("spore.toml");
    let data = tmp.path().join("data");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nmax-instances = 3\nlog_format = \"json\"\n",
            data.display()
        ),
    )
    .unwrap();
    let log = tmp.path().join("log");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let up = loop {
        if reqwest::blocking::get(format!("http://127.0.0.1:{port}/healthz"))
            .is_ok_and(|r| r.status().is_success())
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    common::terminate(child, Duration::from_secs(10));
    assert!(up, "the daemon did not listen where the file said: {text}");
    assert!(data.join("credentials").exists(), "the file's data dir");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "log_format = json: {first}"
    );
    // An unknown key is refused by name.
    std::fs::write(&conf, "max_instance = 3\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"max_instance\" is not an option"));
}

#[test]
fn the_grafana_dashboard_uses_exported_families() {
    let dash = std::fs::read_to_string(repo_root().join("deploy/grafana/spore.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let gateway =
        std::fs::read_to_string(repo_root().join("crates/spore-gateway/src/lib.rs")).unwrap();
    let mut checked = 0;
    for panel in v["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(family) = word.strip_prefix("spore_") {
                    let family = format!("spore_{}", family.trim_end_matches("_bucket"));
                    assert!(
                        gateway.contains(&format!("\"{family}\"")),
                        "the dashboard asks for {family}, which the daemon does not describe"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 10);
}

#[test]
fn the_demo_leaves_the_users_daemon_alone() {
    if !can_sandbox("the_demo_leaves_the_users_daemon_alone") {
        return;
    }
    let mut d = common::Daemon::start();
    // The user's own function, named like a sample.
    d.deploy_cfork(&common::fixture("echo"), "hello");
    let before = d.get_json("/2015-03-31/functions/hello");
    // Run from elsewhere: the samples are found beside the binary, and `.spore/` lands there.
    let cwd = tempfile::tempdir().unwrap();
    for run in 0..2 {
        let out = Command::new(BIN)
            .args(["demo", "--warm", "1", "--cold", "1"])
            .env("SPORE_ENDPOINT", &d.endpoint)
            .env("SPORE_DATA_DIR", &d.data)
            .current_dir(cwd.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "demo run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = d.get_json("/2015-03-31/functions/hello");
    assert_eq!(
        before["Configuration"]["CodeSha256"],
        after["Configuration"]["CodeSha256"]
    );
    assert_eq!(
        before["Configuration"]["RevisionId"],
        after["Configuration"]["RevisionId"]
    );
    let list = d.get_json("/2015-03-31/functions");
    assert_eq!(list["Functions"].as_array().unwrap().len(), 1, "{list}");
    let (err, _, v) = d.invoke("hello", serde_json::json!({"k": 1}));
    assert!(!err && v["event"] == serde_json::json!({"k": 1}), "{v}");
    d.stop();
}
