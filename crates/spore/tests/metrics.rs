//! `/metrics` is valid Prometheus text with a `# HELP` for every family (checked by
//! `promtool check metrics`, from Debian's `prometheus` package), and reports what the daemon
//! holds (instances by state, templates) beside what it served.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{can_sandbox, fixture, Daemon};
use serde_json::json;

#[test]
fn metrics_pass_promtool_and_report_gauges() {
    if !can_sandbox("metrics_pass_promtool_and_report_gauges") {
        return;
    }
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let mut d = Daemon::start();
    d.deploy(&fixture("echo"));
    d.deploy_cfork(&fixture("echo"), "echo-fork");
    for f in ["echo", "echo-fork"] {
        let (err, _, _) = d.invoke(f, json!({}));
        assert!(!err);
    }
    let text = d
        .http
        .get(d.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for family in [
        "spore_invocations_total",
        "spore_invocation_duration_seconds",
        "spore_init_duration_seconds",
        "spore_instances",
        "spore_templates",
        "spore_idle_memory_bytes",
        "spore_inflight",
        "spore_units",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}:\n{text}"
        );
    }
    assert!(
        text.contains(r#"spore_instances{function="echo",state="idle"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"spore_templates{function="echo-fork"} 1"#),
        "{text}"
    );
    let Some(promtool) = promtool else {
        assert_ne!(
            std::env::var("SPORE_REQUIRE_ROOT").as_deref(),
            Ok("1"),
            "promtool is not installed; run scripts/setup.sh"
        );
        eprintln!("SKIP the promtool part of metrics_pass_promtool_and_report_gauges: promtool not installed (Debian package prometheus; scripts/setup.sh installs it)");
        d.stop();
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}
