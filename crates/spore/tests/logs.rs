//! Function logs: each line with its time and request id, filtered by request id, followed
//! live (`spore logs -f`), and kept across a daemon restart.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_sandbox, fixture, Daemon, BIN};

fn request_id(r: &reqwest::blocking::Response) -> String {
    r.headers()
        .get("x-amzn-requestid")
        .expect("the request id header")
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn logs_carry_request_ids_follow_live_and_survive_a_restart() {
    if !can_sandbox("logs_carry_request_ids_follow_live_and_survive_a_restart") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_at(&data, &[]);
    d.deploy(&fixture("echo"));
    let r = d.invoke_raw("echo", b"{}", &[]);
    assert_eq!(r.status(), 200);
    let first = request_id(&r);
    let r = d.invoke_raw("echo", b"{}", &[]);
    let second = request_id(&r);

    // Only the lines of one invocation, each with its time and request id.
    let out = d.cli(&["logs", "echo", "--request-id", &first]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("START RequestId: {first}")),
        "{text}"
    );
    assert!(!text.contains(&second), "{text}");
    for line in text.lines() {
        assert!(line.starts_with("20") && line.contains(&first), "{line}");
    }
    // Since a moment ago: nothing yet.
    assert!(d.cli(&["logs", "echo", "--since", "0s"]).stdout.is_empty());

    // Follow: a new invocation's lines arrive while `spore logs -f` runs.
    let mut follower = Command::new(BIN)
        .args(["logs", "echo", "-f", "-n", "0"])
        .env("SPORE_ENDPOINT", &d.endpoint)
        .env("SPORE_DATA_DIR", &d.data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The stream is set up when the follower's request arrives: invoke until a line comes.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = None;
    while seen.is_none() && Instant::now() < deadline {
        let id = request_id(&d.invoke_raw("echo", b"{}", &[]));
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            if line.contains(&format!("START RequestId: {id}")) {
                seen = Some(line);
                break;
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(seen.is_some(), "spore logs -f printed no new invocation");

    // A restart keeps them.
    d.stop();
    let mut d = Daemon::start_at(&data, &[]);
    let out = d.cli(&["logs", "echo", "-n", "1000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("END RequestId: {first}")), "{text}");
    let logs = std::fs::metadata(data.join("logs/echo.jsonl")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(logs.permissions().mode() & 0o777, 0o600);
    // Deleting the function deletes its log.
    assert_eq!(
        d.http
            .delete(d.url("/2015-03-31/functions/echo"))
            .send()
            .unwrap()
            .status(),
        204
    );
    assert!(!data.join("logs/echo.jsonl").exists());
    d.stop();
}
