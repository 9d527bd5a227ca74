//! The Lambda-compatible HTTP API against a real daemon.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{can_sandbox, error_type, fixture, sample, Daemon};
use serde_json::{json, Value};

#[test]
fn deploy_invoke_cold_then_warm_with_lambda_headers() {
    if !can_sandbox("deploy_invoke_cold_then_warm_with_lambda_headers") {
        return;
    }
    let d = Daemon::start();
    d.deploy(&fixture("echo"));

    let r = d.invoke_raw("echo", br#"{"x": 1}"#, &[("X-Amz-Log-Type", "Tail")]);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-spore-start"], "cold");
    let init: f64 = r.headers()["x-spore-init-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(init > 0.0);
    assert!(r.headers().get("x-amz-function-error").is_none());
    let log = base64::engine::general_purpose::STANDARD
        .decode(r.headers()["x-amz-log-result"].as_bytes())
        .unwrap();
    let log = String::from_utf8(log).unwrap();
    assert!(log.starts_with("START RequestId:"), "{log}");
    assert!(log.contains("echo got {'x': 1}"), "{log}");
    assert!(
        log.contains("REPORT RequestId:") && log.contains("Init Duration"),
        "{log}"
    );
    let v: Value = r.json().unwrap();
    assert_eq!(v["event"], json!({"x": 1}));
    assert_eq!(v["greeting"], "hi");
    assert_eq!(v["function_name"], "echo");
    assert_eq!(v["memory"], 128);
    assert_eq!(v["remaining_ok"], true);
    assert_eq!(v["pid"], 1, "the runtime is pid 1 of its own pid namespace");

    let (err, start, v2) = d.invoke("echo", json!({"x": 2}));
    assert!(!err);
    assert_eq!(start, "warm");
    assert_ne!(v2["request_id"], v["request_id"]);

    // X-Spore-Cold forces a fresh instance.
    let r = d.invoke_raw("echo", b"{}", &[("X-Spore-Cold", "1")]);
    assert_eq!(r.headers()["x-spore-start"], "cold");

    // Function listing, configuration and metrics reflect it.
    let list: Value = d.get_json("/2015-03-31/functions");
    assert_eq!(list["Functions"][0]["FunctionName"], "echo");
    let got: Value = d.get_json("/2015-03-31/functions/echo");
    assert_eq!(got["Configuration"]["Handler"], "main.handler");
    assert_eq!(got["Tags"]["spore:sandbox"], "container");
    let metrics = d
        .http
        .get(d.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("spore_invocations_total{function=\"echo\",start=\"cold\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spore_invocations_total{function=\"echo\",start=\"warm\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        d.http
            .get(d.url("/healthz"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
        "ok\n"
    );
    let mut d = d;
    d.stop();
}

#[test]
fn function_errors_come_back_lambda_style() {
    if !can_sandbox("function_errors_come_back_lambda_style") {
        return;
    }
    let d = Daemon::start();
    for f in ["err", "importerr", "crash", "echo"] {
        d.deploy(&fixture(f));
    }
    let (err, _, v) = d.invoke("err", json!({"k": "v"}));
    assert!(err);
    assert_eq!(v["errorType"], "ValueError");
    assert_eq!(v["errorMessage"], "bad input: {'k': 'v'}");
    let trace = v["stackTrace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(trace.contains("/var/task/main.py"), "{trace}");
    assert!(
        !trace.contains("bootstrap.py"),
        "runtime frames must be hidden: {trace}"
    );
    // A handled error keeps the instance warm.
    let (_, start, _) = d.invoke("err", json!({}));
    assert_eq!(start, "warm");

    let (err, _, v) = d.invoke("importerr", json!({}));
    assert!(err);
    assert_eq!(v["errorType"], "Runtime.ImportModuleError");
    assert!(v["errorMessage"]
        .as_str()
        .unwrap()
        .contains("does_not_exist_anywhere"));

    let (err, _, v) = d.invoke("crash", json!({}));
    assert!(err);
    assert_eq!(v["errorType"], "Runtime.ExitError");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("exit status 7"),
        "{v}"
    );

    let (err, _, _) = d.invoke("echo", json!({}));
    assert!(!err, "other functions keep working");
}

#[test]
fn timeout_kills_the_sandbox_and_reports() {
    if !can_sandbox("timeout_kills_the_sandbox_and_reports") {
        return;
    }
    let d = Daemon::start();
    d.deploy(&fixture("slow"));
    let t0 = Instant::now();
    let (err, _, v) = d.invoke("slow", json!({"s": 30}));
    let took = t0.elapsed();
    assert!(err);
    assert_eq!(v["errorType"], "Sandbox.Timedout");
    assert_eq!(v["errorMessage"], "Task timed out after 2.00 seconds");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The timed-out instance is gone: the next call starts cold and succeeds.
    let (err, start, v) = d.invoke("slow", json!({"s": 0}));
    assert!(!err, "{v}");
    assert_eq!(start, "cold");
    assert_eq!(v, json!("woke"));
    let mut d = d;
    d.stop();
}

#[test]
fn bad_requests_get_clear_4xx_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    let post = |body: Value| {
        d.http
            .post(d.url("/2015-03-31/functions"))
            .json(&body)
            .send()
            .unwrap()
    };
    let zip = |dir: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(spore_registry::code::zip_dir(&fixture(dir)).unwrap())
    };

    // Unknown function.
    let r = d.invoke_raw("nope", b"{}", &[]);
    assert_eq!(r.status(), 404);
    assert_eq!(error_type(&r), "ResourceNotFoundException");
    let r = d
        .http
        .get(d.url("/2015-03-31/functions/nope"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);

    // Malformed zip, bad base64, malformed JSON, invalid manifest fields.
    let cases = [
        (
            json!({"FunctionName": "f", "Runtime": "python3", "Handler": "main.handler", "Code": {"ZipFile": "aGVsbG8="}}),
            "unzip",
        ),
        (
            json!({"FunctionName": "f", "Runtime": "python3", "Handler": "main.handler", "Code": {"ZipFile": "!!!"}}),
            "base64",
        ),
        (
            json!({"FunctionName": "f", "Runtime": "python3", "Handler": "nodot", "Code": {"ZipFile": zip("echo")}}),
            "handler",
        ),
        (
            json!({"FunctionName": "bad name", "Runtime": "python3", "Handler": "main.handler", "Code": {"ZipFile": zip("echo")}}),
            "name",
        ),
        (
            json!({"FunctionName": "f", "Runtime": "cobol", "Handler": "main.handler", "Code": {"ZipFile": zip("echo")}}),
            "runtime",
        ),
        (
            json!({"FunctionName": "f", "Runtime": "python3", "Handler": "main.handler", "MemorySize": 1, "Code": {"ZipFile": zip("echo")}}),
            "MemorySize",
        ),
        (
            json!({"FunctionName": "f", "Runtime": "python3", "Handler": "main.handler", "Code": {}}),
            "ZipFile",
        ),
    ];
    for (body, needle) in cases {
        let r = post(body.clone());
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_type(&r), "InvalidParameterValueException");
        let msg = r.json::<Value>().unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    let r = d
        .http
        .post(d.url("/2015-03-31/functions"))
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("Malformed request body"));
    let evil = {
        use std::io::Write;
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        w.start_file("../../escape.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"x").unwrap();
        w.finish().unwrap();
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    };
    let r = post(
        json!({"FunctionName": "f", "Runtime": "python3", "Handler": "main.handler", "Code": {"ZipFile": evil}}),
    );
    assert_eq!(r.status(), 400);
    assert!(!d.data.join("escape.py").exists() && !d.data.join("functions/escape.py").exists());
    assert!(
        d.http
            .get(d.url("/2015-03-31/functions/f"))
            .send()
            .unwrap()
            .status()
            == 404,
        "a refused create leaves nothing"
    );

    // Duplicate create is a conflict.
    d.deploy(&fixture("echo"));
    let r = d.create(&fixture("echo"));
    assert_eq!(r.status(), 409);
    assert_eq!(error_type(&r), "ResourceConflictException");

    // Payloads: not JSON, too large, bad headers.
    let r = d.invoke_raw("echo", b"{nope", &[]);
    assert_eq!(r.status(), 400);
    assert_eq!(error_type(&r), "InvalidRequestContentException");
    let big = format!("\"{}\"", "a".repeat(7 * 1024 * 1024));
    let r = d.invoke_raw("echo", big.as_bytes(), &[]);
    assert_eq!(r.status(), 413);
    assert_eq!(error_type(&r), "RequestTooLargeException");
    let r = d.invoke_raw("echo", b"{}", &[("X-Amz-Invocation-Type", "Sometimes")]);
    assert_eq!(r.status(), 400);
    let r = d.http.get(d.url("/no/such/route")).send().unwrap();
    assert_eq!(r.status(), 404);

    // DryRun validates without running.
    let r = d.invoke_raw("echo", b"{}", &[("X-Amz-Invocation-Type", "DryRun")]);
    assert_eq!(r.status(), 204);

    // Still serving.
    assert_eq!(d.http.get(d.url("/healthz")).send().unwrap().status(), 200);
    if can_sandbox("bad_requests_get_clear_4xx_and_the_daemon_keeps_serving (invoke part)") {
        let (err, _, _) = d.invoke("echo", json!({"after": "errors"}));
        assert!(!err);
    }
}

#[test]
fn update_code_configuration_event_and_delete() {
    if !can_sandbox("update_code_configuration_event_and_delete") {
        return;
    }
    let d = Daemon::start();
    d.deploy(&fixture("echo"));
    let (_, _, v) = d.invoke("echo", json!({}));
    assert_eq!(v["version"], 1);

    // New code: the warm instance is retired, the next call runs version 2.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("main.py"),
        std::fs::read_to_string(fixture("echo").join("main.py"))
            .unwrap()
            .replace("VERSION = 1", "VERSION = 2"),
    )
    .unwrap();
    let zip = base64::engine::general_purpose::STANDARD
        .encode(spore_registry::code::zip_dir(tmp.path()).unwrap());
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/echo/code"))
        .json(&json!({"ZipFile": zip}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, start, v) = d.invoke("echo", json!({}));
    assert_eq!((start.as_str(), v["version"].as_i64()), ("cold", Some(2)));

    // New configuration.
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/echo/configuration"))
        .json(&json!({"MemorySize": 256, "Environment": {"Variables": {"GREETING": "hello"}}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, _, v) = d.invoke("echo", json!({}));
    assert_eq!(
        (v["memory"].as_i64(), v["greeting"].as_str()),
        (Some(256), Some("hello"))
    );

    // Event invocations run in the background and log.
    let r = d.invoke_raw(
        "echo",
        br#"{"async": true}"#,
        &[("X-Amz-Invocation-Type", "Event")],
    );
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs: Value = d.get_json("/spore/v1/functions/echo/logs?lines=200");
        if logs["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("'async': True"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "event invocation never ran: {logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let r = d
        .http
        .delete(d.url("/2015-03-31/functions/echo"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(d.invoke_raw("echo", b"{}", &[]).status(), 404);
    assert!(!d.data.join("functions/echo").exists());
}

#[test]
fn every_sample_function_runs() {
    if !can_sandbox("every_sample_function_runs") {
        return;
    }
    if common::packages_dir().is_none() {
        if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
            panic!("the Python packages (numpy, Pillow, pyaes) are not installed; run scripts/setup.sh");
        }
        eprintln!(
            "SKIP every_sample_function_runs: Python packages not installed (run scripts/setup.sh)"
        );
        return;
    }
    let d = Daemon::start();
    let checks: &[(&str, &str)] = &[
        ("hello", "message"),
        ("float_operation", "checksum"),
        ("linpack", "residual_ok"),
        ("matmul", "trace"),
        ("json_dumps_loads", "records"),
        ("pyaes", "ok"),
        ("image_processing", "png_bytes"),
    ];
    for (name, key) in checks {
        d.deploy(&sample(name));
        let event: Value =
            serde_json::from_slice(&std::fs::read(sample(name).join("event.json")).unwrap())
                .unwrap();
        let (err, _, v) = d.invoke(name, event);
        assert!(!err, "{name}: {v}");
        assert!(!v[key].is_null(), "{name}: {v}");
    }
    let (_, _, v) = d.invoke("linpack", json!({"n": 100}));
    assert_eq!(v["residual_ok"], true);
    let (_, _, v) = d.invoke("pyaes", json!({}));
    assert_eq!(v["ok"], true);
}
