//! Who may call the daemon, tried as those who may not: unsigned and wrongly signed
//! requests (plain HTTP, boto3 with a wrong secret or an unknown key, a stale date, a body
//! changed after signing), an invoke-only key doing more than invoking, an unprivileged local
//! user without the key, and `--auth none` off loopback.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{can_sandbox, error_type, fixture, repo_root, Daemon, BIN};
use serde_json::json;
use spore_auth::Credentials;

/// A raw (unsigning) HTTP client.
fn raw() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// A client signing with `creds`.
fn signed(creds: Credentials) -> spore_client::Http {
    spore_client::Http::new(Duration::from_secs(60), Some(creds)).unwrap()
}

fn admin(d: &Daemon) -> Credentials {
    spore_auth::credentials::read_profile(&d.data.join("credentials"), "default")
        .unwrap()
        .expect("the daemon wrote an admin key")
}

#[test]
fn unsigned_and_wrongly_signed_requests_are_refused() {
    if !can_sandbox("unsigned_and_wrongly_signed_requests_are_refused") {
        return;
    }
    let mut d = Daemon::start();
    let list = d.url("/2015-03-31/functions");
    // Plain HTTP (curl, a browser): refused, except the health check.
    let r = raw().get(&list).send().unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_type(&r), "UnrecognizedClientException");
    assert!(r.text().unwrap().contains("Missing Authentication Token"));
    assert_eq!(raw().get(d.url("/healthz")).send().unwrap().status(), 200);
    let r = raw().get(d.url("/metrics")).send().unwrap();
    assert_eq!(r.status(), 403, "metrics need a key");
    let r = raw()
        .post(d.url("/2015-03-31/functions/x/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // The admin key works.
    let good = admin(&d);
    assert_eq!(
        signed(good.clone()).get(&list).send().unwrap().status(),
        200
    );
    // A wrong secret for a real key id, and a key the daemon does not have.
    let wrong = Credentials {
        secret_access_key: "not-the-secret".into(),
        ..good.clone()
    };
    let r = signed(wrong).get(&list).send().unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_type(&r), "InvalidSignatureException");
    let r = signed(Credentials::generate()).get(&list).send().unwrap();
    assert_eq!(error_type(&r), "UnrecognizedClientException");
    // A signature from 20 minutes ago (a replayed request).
    let host = d.endpoint.trim_start_matches("http://").to_owned();
    let headers = vec![("host".to_string(), host)];
    let parts = spore_auth::RequestParts {
        method: "GET",
        path: "/2015-03-31/functions",
        query: "",
        headers: &headers,
        body: b"",
    };
    let old = SystemTime::now() - Duration::from_secs(20 * 60);
    let mut req = raw().get(&list);
    for (k, v) in spore_auth::sigv4::sign(&parts, &good, "us-east-1", "lambda", old) {
        req = req.header(k, v);
    }
    let r = req.send().unwrap();
    assert_eq!(error_type(&r), "InvalidSignatureException");
    assert!(r.text().unwrap().contains("Signature expired"));
    // A body changed after signing.
    let payload = br#"{"a": 1}"#;
    let url = d.url("/2015-03-31/functions/x/invocations");
    let parts = spore_auth::RequestParts {
        method: "POST",
        path: "/2015-03-31/functions/x/invocations",
        query: "",
        headers: &headers,
        body: payload,
    };
    let mut req = raw().post(&url).body(r#"{"a": 2}"#);
    for (k, v) in spore_auth::sigv4::sign(&parts, &good, "us-east-1", "lambda", SystemTime::now()) {
        req = req.header(k, v);
    }
    assert_eq!(
        error_type(&req.send().unwrap()),
        "InvalidSignatureException"
    );
    d.stop();
}

const BOTO3_REFUSED: &str = r#"
import sys, boto3, botocore
endpoint, key_id = sys.argv[1], sys.argv[2]
cfg = botocore.config.Config(retries={"max_attempts": 1})
for (kid, secret, want) in [(key_id, "wrong-secret", "InvalidSignatureException"),
                            ("SPKUNKNOWNKEY0000000", "x", "UnrecognizedClientException")]:
    lam = boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id=kid, aws_secret_access_key=secret, config=cfg)
    try:
        lam.list_functions()
        raise SystemExit("expected " + want)
    except botocore.exceptions.ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == want, (got, want, e.response)
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response
print("boto3 refused OK")
"#;

#[test]
fn boto3_with_a_wrong_key_gets_lambdas_errors() {
    let test_python = repo_root().join("target/test-python");
    if !test_python.join("boto3").is_dir() {
        assert_ne!(
            std::env::var("SPORE_REQUIRE_ROOT").as_deref(),
            Ok("1"),
            "boto3 is not installed; run scripts/setup.sh"
        );
        eprintln!("SKIP boto3_with_a_wrong_key_gets_lambdas_errors: boto3 not installed (run scripts/setup.sh)");
        return;
    }
    if !can_sandbox("boto3_with_a_wrong_key_gets_lambdas_errors") {
        return;
    }
    let mut d = Daemon::start();
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(BOTO3_REFUSED)
        .arg(&d.endpoint)
        .arg(&admin(&d).access_key_id)
        .env("PYTHONPATH", &test_python)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("boto3 refused OK"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}

#[test]
fn invoke_only_keys_invoke_what_they_name_and_nothing_else() {
    if !can_sandbox("invoke_only_keys_invoke_what_they_name_and_nothing_else") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("echo"));
    let out = d.cli(&[
        "keys",
        "create",
        "ci",
        "--invoke-only",
        "--functions",
        "ech?",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let creds = spore_auth::credentials::parse_profile(&text, "ci").expect(&text);
    let ci = signed(creds);
    // It invokes what its glob names.
    let r = ci
        .post(d.url("/2015-03-31/functions/echo/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Nothing else: another function, configuration, deploys, keys, DAGs.
    let denied = |r: reqwest::blocking::Response| {
        assert_eq!(r.status(), 403);
        assert_eq!(error_type(&r), "AccessDeniedException");
        r.text().unwrap()
    };
    let msg = denied(
        ci.post(d.url("/2015-03-31/functions/other/invocations"))
            .body("{}")
            .send()
            .unwrap(),
    );
    assert!(msg.contains("\\\"ci\\\"") || msg.contains("ci"), "{msg}");
    // It may not steer how instances start (each call a fresh sandbox or a template rebuild).
    for (h, v) in [("X-Spore-Cold", "init"), ("X-Spore-Restore-Mode", "lazy")] {
        let msg = denied(
            ci.post(d.url("/2015-03-31/functions/echo/invocations"))
                .header(h, v)
                .body("{}")
                .send()
                .unwrap(),
        );
        assert!(msg.contains(&h.to_ascii_lowercase()), "{msg}");
    }
    denied(
        ci.get(d.url("/2015-03-31/functions/echo/configuration"))
            .send()
            .unwrap(),
    );
    denied(ci.get(d.url("/2015-03-31/functions")).send().unwrap());
    denied(
        ci.post(d.url("/2015-03-31/functions"))
            .json(&json!({"FunctionName": "x"}))
            .send()
            .unwrap(),
    );
    denied(ci.get(d.url("/spore/v1/keys")).send().unwrap());
    denied(
        ci.post(d.url("/dags/any/invocations"))
            .body("{}")
            .send()
            .unwrap(),
    );
    // The admin lists it (without its secret) and removes it; then it is unknown.
    let out = d.cli(&["keys", "ls"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("ci") && listing.contains("invoke ech?"),
        "{listing}"
    );
    assert!(!listing.contains(&ci.credentials().unwrap().secret_access_key));
    assert!(d.cli(&["keys", "rm", "ci"]).status.success());
    let r = ci
        .post(d.url("/2015-03-31/functions/echo/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(error_type(&r), "UnrecognizedClientException");
    d.stop();
}

#[test]
fn a_local_user_without_the_key_is_refused_and_cannot_read_it() {
    if !can_sandbox("a_local_user_without_the_key_is_refused_and_cannot_read_it") {
        return;
    }
    let mut d = Daemon::start();
    // The data dir and the files holding secrets are the daemon's alone.
    for (p, want) in [
        (d.data.clone(), 0o700),
        (d.data.join("credentials"), 0o600),
        (d.data.join("keys.json"), 0o600),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", p.display());
    }
    // `nobody` runs the CLI (a copy it can execute) against the daemon: it has no key.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = tmp.path().join("spore");
    std::fs::copy(BIN, &bin).unwrap();
    let run_as_nobody = |cmd: &mut Command| {
        let mut tries = 0;
        loop {
            match cmd.uid(65534).gid(65534).output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r.unwrap(),
            }
        }
    };
    let out = run_as_nobody(
        Command::new(&bin)
            .args(["ls", "--endpoint", &d.endpoint])
            .env("SPORE_DATA_DIR", &d.data)
            .env("HOME", "/nonexistent")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nobody listed the functions: {stderr}"
    );
    assert!(stderr.contains("UnrecognizedClientException"), "{stderr}");
    let out = run_as_nobody(Command::new("/bin/cat").arg(d.data.join("credentials")));
    assert!(!out.status.success(), "nobody read the credentials file");
    d.stop();
}

#[test]
fn auth_none_is_for_loopback_only_and_metrics_can_have_their_own_address() {
    if !can_sandbox("auth_none_is_for_loopback_only_and_metrics_can_have_their_own_address") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--auth",
            "none",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--auth none is refused"), "{stderr}");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics = format!("127.0.0.1:{port}");
    let mut d = Daemon::start_at(
        &tmp.path().join("open"),
        &["--auth", "none", "--metrics-listen", &metrics],
    );
    // No checks: an unsigned client deploys and lists (the daemon warned about it).
    let r = raw().get(d.url("/2015-03-31/functions")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(d.log_text().contains("--auth none"));
    let r = raw()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = raw()
        .get(format!("http://{metrics}/2015-03-31/functions"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "the metrics address serves metrics only");
    d.stop();
}

#[test]
fn strangers_are_refused_from_their_headers_before_any_body_is_read() {
    use std::io::{Read, Write};
    if !can_sandbox("strangers_are_refused_from_their_headers_before_any_body_is_read") {
        return;
    }
    let mut d = Daemon::start();
    let addr = d.endpoint.trim_start_matches("http://").to_owned();
    let good = admin(&d);
    for auth in [
        None,
        Some("AWS4-HMAC-SHA256 Credential=SPKUNKNOWN0000000000/20261206/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00".to_owned()),
        Some("Basic dXNlcjpwYXNz".to_owned()),
    ] {
        // A 10 MB body announced, none sent: the answer must come from the headers alone.
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let extra = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        write!(
            s,
            "POST /2015-03-31/functions/x/invocations HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 10000000\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 403"), "{extra:?}: {head:?}");
    }
    // Two Authorization headers, and a signature for another service, are refused.
    let list = d.url("/2015-03-31/functions");
    let host = addr.clone();
    let headers = vec![("host".to_string(), host)];
    let parts = spore_auth::RequestParts {
        method: "GET",
        path: "/2015-03-31/functions",
        query: "",
        headers: &headers,
        body: b"",
    };
    let mut req = raw().get(&list);
    for (k, v) in spore_auth::sigv4::sign(&parts, &good, "us-east-1", "s3", SystemTime::now()) {
        req = req.header(k, v);
    }
    assert_eq!(
        error_type(&req.send().unwrap()),
        "InvalidSignatureException"
    );
    let signed = spore_auth::sigv4::sign(&parts, &good, "us-east-1", "lambda", SystemTime::now());
    let mut req = raw().get(&list);
    for (k, v) in &signed {
        req = req.header(k.as_str(), v.as_str());
    }
    let r = req.header("authorization", "garbage").send().unwrap();
    assert_eq!(error_type(&r), "InvalidSignatureException");
    assert!(
        d.log_text().contains("request refused"),
        "refusals are logged"
    );
    d.stop();
}
