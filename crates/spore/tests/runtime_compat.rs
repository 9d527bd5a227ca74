//! The Python and Node.js runtimes behave as Lambda's own (awslambdaric, Lambda's Node.js
//! runtime): logging, the standard environment, the context's client context, error JSON and
//! its log entry, marshalling, `sys.exit`, and output kept when a function times out. Python
//! is checked in container and cfork sandboxes (logging after the fork, the log stream per
//! instance, the client context after the fork).

mod common;

use base64::Engine as _;
use common::{boto3, can_sandbox, error_type, fixture, Daemon};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One invocation with `LogType=Tail` (and `headers`): (function error?, start, request id,
/// body text, the log tail).
fn invoke_tail(
    d: &Daemon,
    name: &str,
    payload: Value,
    headers: &[(&str, &str)],
) -> (bool, String, String, String, String) {
    let mut all = vec![("X-Amz-Log-Type", "Tail")];
    all.extend_from_slice(headers);
    let r = d.invoke_raw(name, payload.to_string().as_bytes(), &all);
    assert_eq!(r.status(), 200, "invoke {name}");
    let h = r.headers();
    let failed = h.get("x-amz-function-error").is_some();
    let start = h["x-spore-start"].to_str().unwrap().to_owned();
    let id = h["x-amzn-requestid"].to_str().unwrap().to_owned();
    let tail = h
        .get("x-amz-log-result")
        .map(|v| String::from_utf8(B64.decode(v.to_str().unwrap()).unwrap()).unwrap())
        .unwrap_or_default();
    (failed, start, id, r.text().unwrap(), tail)
}

/// Whether `line` is `[LEVEL]\t<ISO time>Z\t<id>\t<message>` (awslambdaric's format).
fn is_lambda_log_line(line: &str, level: &str, id: &str, message: &str) -> bool {
    let parts: Vec<&str> = line.split('\t').collect();
    parts.len() == 4
        && parts[0] == format!("[{level}]")
        && parts[1].len() == 24
        && parts[1].ends_with('Z')
        && parts[1].as_bytes()[10] == b'T'
        && parts[2] == id
        && parts[3] == message
}

fn has_line(tail: &str, level: &str, id: &str, message: &str) -> bool {
    tail.lines()
        .any(|l| is_lambda_log_line(l, level, id, message))
}

/// `YYYY/MM/DD/[$LATEST]<32 hex>`.
fn is_stream_name(s: &str) -> bool {
    let Some((date, rest)) = s.split_at_checked(11) else {
        return false;
    };
    let hex = rest.strip_prefix("[$LATEST]").unwrap_or("");
    date.len() == 11
        && date.as_bytes()[4] == b'/'
        && date.ends_with('/')
        && hex.len() == 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn python_checks(d: &Daemon, name: &str, cfork: bool) {
    // Logging: Lambda's handler on the root logger, in the first and in later warm calls.
    let (failed, _, id, _, tail) = invoke_tail(d, name, json!({"action": "log", "n": 1}), &[]);
    assert!(!failed, "{tail}");
    assert!(
        has_line(&tail, "INFO", &id, "via the logger 1"),
        "{name}: {tail}"
    );
    assert!(has_line(&tail, "INFO", &id, "via the module 1"), "{tail}");
    assert!(has_line(&tail, "WARNING", &id, "a warning 1"), "{tail}");
    assert!(tail.contains("printed 1\n"), "{tail}");
    if !cfork {
        // Init output comes before the first START line.
        let init = tail.find("init: printed at import").expect(&tail);
        assert!(init < tail.find("START RequestId").unwrap(), "{tail}");
        assert!(
            has_line(&tail, "INFO", "", "init: logged at import"),
            "{tail}"
        );
    }
    for n in 2..4 {
        let (failed, start, id, _, tail) =
            invoke_tail(d, name, json!({"action": "log", "n": n}), &[]);
        assert!(!failed);
        assert_eq!(start, "warm");
        for (level, msg) in [
            ("INFO", format!("via the logger {n}")),
            ("INFO", format!("via the module {n}")),
            ("WARNING", format!("a warning {n}")),
        ] {
            assert!(
                has_line(&tail, level, &id, &msg),
                "{name}: warm call {n} lost its logging: {tail}"
            );
        }
        assert!(!tail.contains("init: printed"), "{tail}");
    }
    // `spore logs` has them too, and the init output (a cfork template's included).
    let logs = String::from_utf8(d.cli(&["logs", name, "-n", "1000"]).stdout).unwrap();
    assert!(logs.contains("via the module 3"), "{logs}");
    assert!(logs.contains("init: printed at import"), "{logs}");
    assert!(logs.contains("init: logged at import"), "{logs}");

    // The standard environment.
    let (_, _, _, body, _) = invoke_tail(d, name, json!({"action": "env"}), &[]);
    let v: Value = serde_json::from_str(&body).unwrap();
    let env = &v["env"];
    // The daemon's region (`spore serve --region`; `local` by default), as its ARNs name it.
    assert_eq!(env["AWS_REGION"], "local");
    assert_eq!(env["AWS_DEFAULT_REGION"], "local");
    assert_eq!(
        env["AWS_LAMBDA_LOG_GROUP_NAME"],
        format!("/aws/lambda/{name}")
    );
    assert_eq!(v["log_group_name"], format!("/aws/lambda/{name}"));
    let stream = env["AWS_LAMBDA_LOG_STREAM_NAME"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(is_stream_name(&stream), "{stream}");
    assert_eq!(v["log_stream_name"], stream.as_str());
    assert_eq!(
        env["AWS_EXECUTION_ENV"],
        format!("AWS_Lambda_python{}", v["python"].as_str().unwrap())
    );
    assert_eq!(env["AWS_LAMBDA_INITIALIZATION_TYPE"], "on-demand");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_VERSION"], "$LATEST");
    assert_eq!(env["TZ"], ":UTC");
    assert_eq!(env["LAMBDA_RUNTIME_DIR"], "/opt/spore/runtime");
    assert!(
        env["LD_LIBRARY_PATH"]
            .as_str()
            .unwrap()
            .starts_with("/opt/lib:"),
        "{env}"
    );
    assert_eq!(
        v["arn"],
        format!("arn:aws:lambda:local:000000000000:function:{name}")
    );
    assert_eq!(v["identity"], json!([null, null]));
    // Another instance has another stream.
    let (_, start, _, body, _) =
        invoke_tail(d, name, json!({"action": "env"}), &[("X-Spore-Cold", "1")]);
    assert_ne!(start, "warm");
    let other: Value = serde_json::from_str(&body).unwrap();
    let other_stream = other["log_stream_name"].as_str().unwrap();
    assert!(is_stream_name(other_stream), "{other_stream}");
    assert_ne!(other_stream, stream, "{name}: two instances share a stream");
    assert_eq!(other["env"]["AWS_LAMBDA_LOG_STREAM_NAME"], other_stream);

    // The client context, on a fresh (forked) instance and a warm one.
    let cc = json!({"client": {"installation_id": "inst-1", "app_title": "probe"},
                    "custom": {"k": "v"}, "env": {"locale": "fr_FR"}});
    let cc64 = B64.encode(cc.to_string());
    for how in ["1", "0"] {
        let (_, _, _, body, _) = invoke_tail(
            d,
            name,
            json!({"action": "ctx"}),
            &[("X-Amz-Client-Context", &cc64), ("X-Spore-Cold", how)],
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["client_context"],
            json!({"custom": {"k": "v"}, "env": {"locale": "fr_FR"},
                   "installation_id": "inst-1", "app_title": "probe"}),
            "{name} cold={how}"
        );
    }
    let (_, _, _, body, _) = invoke_tail(d, name, json!({"action": "ctx"}), &[]);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["client_context"],
        Value::Null
    );

    // Errors: Lambda's JSON and its log entry with the whole traceback.
    let (failed, _, id, body, tail) = invoke_tail(d, name, json!({"action": "error", "n": 7}), &[]);
    assert!(failed);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["errorType"], "ValueError");
    assert_eq!(e["errorMessage"], "bad input 7");
    assert_eq!(e["requestId"], id.as_str());
    let trace = e["stackTrace"].as_array().unwrap();
    assert!(
        trace[0]
            .as_str()
            .unwrap()
            .starts_with("  File \"/var/task/main.py\", line "),
        "{e}"
    );
    assert!(!body.contains("bootstrap.py"), "{body}");
    assert!(
        tail.contains(
            "[ERROR] ValueError: bad input 7\nTraceback (most recent call last):\n  File \"/var/task/main.py\""
        ),
        "{tail}"
    );
    assert!(tail.contains("raise ValueError"), "{tail}");
    assert_eq!(tail.matches("[ERROR]").count(), 1, "{tail}");

    // One huge print: the instance survives and the end of the output is in the tail.
    let (failed, _, _, body, tail) = invoke_tail(d, name, json!({"action": "bigprint"}), &[]);
    assert!(!failed, "{body}");
    assert!(
        tail.contains("after the big print"),
        "{}",
        tail.chars().rev().take(200).collect::<String>()
    );
    let pid: Value = serde_json::from_str(&body).unwrap();
    let (_, start, _, again, _) = invoke_tail(d, name, json!({"action": "bigprint"}), &[]);
    assert_eq!(start, "warm", "the instance was kept");
    assert_eq!(
        serde_json::from_str::<Value>(&again).unwrap()["pid"],
        pid["pid"]
    );

    // Marshalling: Decimal is a number; a set is Lambda's marshal error.
    let (failed, _, _, body, _) = invoke_tail(d, name, json!({"action": "decimal"}), &[]);
    assert!(!failed, "{body}");
    assert!(body.contains("\"price\": 19.99"), "{body}");
    assert!(body.contains("12345678901234567890.5"), "{body}");
    let (failed, _, _, body, tail) = invoke_tail(d, name, json!({"action": "set"}), &[]);
    assert!(failed);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["errorType"], "Runtime.MarshalError");
    assert_eq!(
        e["errorMessage"],
        "Unable to marshal response: Object of type set is not JSON serializable"
    );
    assert!(tail.contains("[ERROR] Runtime.MarshalError: Unable to marshal response"));

    // sys.exit(3): Runtime.ExitError, and the instance is not kept.
    let (failed, _, id, body, tail) = invoke_tail(d, name, json!({"action": "exit"}), &[]);
    assert!(failed);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["errorType"], "Runtime.ExitError");
    let msg = e["errorMessage"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!(
            "RequestId: {id} Error: Runtime exited with error: exit status 3"
        )),
        "{msg}"
    );
    assert!(tail.contains("about to exit"), "{tail}");
    // The exited instance is gone; the next call is served by another one.
    let (_, _, _, body, _) = invoke_tail(d, name, json!({"action": "env"}), &[]);
    let after: Value = serde_json::from_str(&body).unwrap();
    assert!(after["env"]["AWS_REGION"] == "local");

    // Output before a timeout is kept in the tail and the log.
    let (failed, _, id, body, tail) = invoke_tail(d, name, json!({"action": "sleep"}), &[]);
    assert!(failed);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["errorType"],
        "Sandbox.Timedout"
    );
    assert!(tail.contains("before the timeout\n"), "{tail}");
    assert!(
        has_line(&tail, "INFO", &id, "logged before the timeout"),
        "{tail}"
    );
    let logs = String::from_utf8(d.cli(&["logs", name, "--request-id", &id]).stdout).unwrap();
    assert!(logs.contains("before the timeout"), "{logs}");
}

#[test]
fn python_runtime_is_lambdas_in_container_and_cfork() {
    if !can_sandbox("python_runtime_is_lambdas_in_container_and_cfork") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("pycompat"));
    python_checks(&d, "pycompat", false);
    d.deploy_cfork(&fixture("pycompat"), "pycompat-cf");
    python_checks(&d, "pycompat-cf", true);
    d.stop();
}

#[test]
fn malformed_client_context_is_refused() {
    if !can_sandbox("malformed_client_context_is_refused") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("pycompat"));
    let too_big = "A".repeat(4000);
    for bad in [
        "not base64 at all!",
        &B64.encode("not json"),
        &B64.encode("[1, 2]"),
        too_big.as_str(),
    ] {
        let r = d.invoke_raw(
            "pycompat",
            b"{\"action\": \"ctx\"}",
            &[("X-Amz-Client-Context", bad)],
        );
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_type(&r), "InvalidRequestContentException");
    }
    d.stop();
}

#[test]
fn boto3_client_context_reaches_the_handler() {
    if !can_sandbox("boto3_client_context_reaches_the_handler") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("pycompat"));
    let script = r#"
import base64, json, sys, boto3
c = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="us-east-1")
cc = base64.b64encode(json.dumps({"custom": {"from": "boto3"}, "env": {}, "client": {}}).encode()).decode()
r = c.invoke(FunctionName="pycompat", Payload=b'{"action": "ctx"}', ClientContext=cc, LogType="Tail")
print(json.dumps({"body": json.loads(r["Payload"].read()), "tail": base64.b64decode(r["LogResult"]).decode()}))
"#;
    let Some(out) = boto3("boto3_client_context_reaches_the_handler", &d, script, &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["body"]["client_context"]["custom"],
        json!({"from": "boto3"})
    );
    assert!(v["tail"].as_str().unwrap().contains("START RequestId"));
    d.stop();
}

#[test]
fn node_runtime_is_lambdas() {
    if !can_sandbox("node_runtime_is_lambdas") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("nodecompat"));
    let n = "nodecompat";
    let ok = |payload: Value| {
        let (failed, _, _, body, tail) = invoke_tail(&d, n, payload, &[]);
        assert!(!failed, "{body} {tail}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(ok(json!({"action": "succeed"})), json!({"via": "succeed"}));
    assert_eq!(ok(json!({"action": "done"})), json!({"via": "done"}));
    assert_eq!(
        ok(json!({"action": "later"})),
        json!({"via": "succeed later"})
    );
    assert_eq!(ok(json!({})), json!({"via": "callback"}));

    // Errors: `trace` with the user's frames only, and Lambda's log line.
    for (action, etype, msg) in [
        ("fail", "Error", "failed via context.fail"),
        ("done-error", "RangeError", "failed via context.done"),
        ("throw", "TypeError", "thrown from inner"),
    ] {
        let (failed, _, id, body, tail) = invoke_tail(&d, n, json!({"action": action}), &[]);
        assert!(failed, "{action}");
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["errorType"], etype);
        assert_eq!(e["errorMessage"], msg);
        assert!(e.get("stackTrace").is_none(), "{e}");
        let trace: Vec<&str> = e["trace"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        assert_eq!(trace[0], format!("{etype}: {msg}"));
        assert!(
            trace.iter().any(|l| l.contains("/var/task/index.js")),
            "{e}"
        );
        assert!(
            !trace.iter().any(|l| l.contains("bootstrap.js")),
            "runtime frames leak: {e}"
        );
        let line = tail
            .lines()
            .find(|l| l.contains("\tERROR\tInvoke Error \t"))
            .unwrap_or_else(|| panic!("{tail}"));
        assert!(line.contains(&format!("\t{id}\tERROR\t")), "{line}");
        assert!(
            line.contains(&format!("\"errorType\":\"{etype}\"")),
            "{line}"
        );
        assert_eq!(tail.matches("Invoke Error").count(), 1, "{tail}");
    }
    // A result JSON cannot hold: Lambda's marshal error.
    for action in ["circular", "bigint"] {
        let (failed, _, _, body, _) = invoke_tail(&d, n, json!({"action": action}), &[]);
        assert!(failed);
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["errorType"], "Runtime.MarshalError", "{action}: {e}");
        assert!(!body.contains("TypeError"), "{body}");
    }
    // console.* lines as Lambda's Node.js runtime writes them.
    let (_, _, id, _, tail) = invoke_tail(&d, n, json!({"action": "console", "n": 5}), &[]);
    for (level, text) in [
        ("INFO", "a log line { n: 5 }"),
        ("INFO", "an info line"),
        ("WARN", "a warn line"),
        ("ERROR", "an error line"),
    ] {
        assert!(
            tail.lines().any(|l| {
                let p: Vec<&str> = l.split('\t').collect();
                p.len() == 4 && p[0].ends_with('Z') && p[1] == id && p[2] == level && p[3] == text
            }),
            "{level} {text}: {tail}"
        );
    }
    // The environment.
    let v = ok(json!({"action": "env"}));
    assert!(v["execEnv"]
        .as_str()
        .unwrap()
        .starts_with("AWS_Lambda_nodejs"));
    assert!(is_stream_name(v["stream"].as_str().unwrap()), "{v}");
    assert_eq!(v["stream"], v["ctxStream"]);
    assert_eq!(v["group"], "/aws/lambda/nodecompat");
    assert_eq!(v["region"], "local");
    let cc64 = B64.encode(json!({"custom": {"k": 1}}).to_string());
    let (_, _, _, body, _) = invoke_tail(
        &d,
        n,
        json!({"action": "env"}),
        &[("X-Amz-Client-Context", &cc64)],
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["clientContext"], json!({"custom": {"k": 1}}));
    // Output before a timeout is kept.
    let (failed, _, _, _, tail) = invoke_tail(&d, n, json!({"action": "sleep"}), &[]);
    assert!(failed);
    assert!(tail.contains("\tINFO\tbefore the timeout"), "{tail}");
    d.stop();
}

#[test]
fn runtime_versions_are_honest() {
    if !can_sandbox("runtime_versions_are_honest") {
        return;
    }
    let mut d = Daemon::start();
    let minor = std::fs::read_link("/usr/bin/python3")
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("python3.")
        .to_owned();
    let exact = format!("python3.{minor}");
    let create = |name: &str, runtime: &str, dir: &str, handler: &str| {
        let zip = spore_registry::code::zip_dir(&fixture(dir)).unwrap();
        d.http
            .post(d.url("/2015-03-31/functions"))
            .json(
                &json!({"FunctionName": name, "Runtime": runtime, "Handler": handler,
                          "Timeout": 5, "Code": {"ZipFile": B64.encode(zip)}}),
            )
            .send()
            .unwrap()
    };
    // Installed versions run on their own interpreter and are echoed as given.
    for (name, runtime, dir, handler) in [
        ("py-exact", exact.as_str(), "pycompat", "main.handler"),
        ("py-default", "python3", "pycompat", "main.handler"),
        ("node-named", "nodejs20.x", "nodecompat", "index.handler"),
    ] {
        let r = create(name, runtime, dir, handler);
        assert_eq!(r.status(), 201, "{runtime}: {}", r.text().unwrap());
        let v: Value = r.json().unwrap();
        assert_eq!(v["Runtime"], runtime);
        let got = d.get_json(&format!("/2015-03-31/functions/{name}/configuration"));
        assert_eq!(got["Runtime"], runtime);
    }
    let (_, _, _, body, _) = invoke_tail(&d, "py-exact", json!({"action": "env"}), &[]);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["python"], exact.trim_start_matches("python"));
    assert_eq!(v["env"]["AWS_EXECUTION_ENV"], format!("AWS_Lambda_{exact}"));
    let (_, _, _, body, _) = invoke_tail(&d, "node-named", json!({"action": "env"}), &[]);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["execEnv"], "AWS_Lambda_nodejs20.x");
    // What is not installed is refused by name, listing what is.
    for (runtime, dir, handler) in [
        ("python3.8", "pycompat", "main.handler"),
        ("python3.99", "pycompat", "main.handler"),
        ("nodejs16.x", "nodecompat", "index.handler"),
    ] {
        let r = create("missing", runtime, dir, handler);
        assert_eq!(r.status(), 400, "{runtime}");
        assert_eq!(error_type(&r), "InvalidParameterValueException");
        let text = r.text().unwrap();
        assert!(text.contains(runtime) && text.contains(&exact), "{text}");
    }
    // The CLI refuses it too, with the same words.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("pycompat").join("main.py"),
        tmp.path().join("main.py"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("spore.toml"),
        "name = \"cli-missing\"\nruntime = \"python3.8\"\nhandler = \"main.handler\"\n",
    )
    .unwrap();
    let out = d.cli(&["deploy", tmp.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("python3.8 is not installed"), "{err}");
    d.stop();
}

#[test]
fn aws_lambda_log_level_sets_the_root_level() {
    if !can_sandbox("aws_lambda_log_level_sets_the_root_level") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("pylevel"));
    let (failed, _, id, _, tail) = invoke_tail(&d, "pylevel", json!({}), &[]);
    assert!(!failed, "{tail}");
    assert!(has_line(&tail, "DEBUG", &id, "a debug line"), "{tail}");
    assert!(has_line(&tail, "INFO", &id, "an info line"), "{tail}");
    // Without it the root stays at WARNING, as in Lambda: nothing of these.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("pylevel").join("main.py"),
        tmp.path().join("main.py"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("spore.toml"),
        "name = \"pylevel-default\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n",
    )
    .unwrap();
    d.deploy(tmp.path());
    let (_, _, _, _, tail) = invoke_tail(&d, "pylevel-default", json!({}), &[]);
    assert!(
        !tail.contains("a debug line") && !tail.contains("an info line"),
        "{tail}"
    );
    d.stop();
}
