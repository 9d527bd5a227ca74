//! The Lambda operations around a function, driven by boto3: reserved concurrency (0
//! throttles), asynchronous invocations retried into an on-failure destination and delivered
//! to an on-success one, tags, resource policies, account settings, the empty answers for
//! what a Spore function has none of, and the operations Spore refuses by name.

mod common;

use std::time::{Duration, Instant};

use common::{boto3, can_sandbox, Daemon};

const SCRIPT: &str = r##"
import io, json, sys, zipfile
import boto3, botocore

lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))

def zipped(text):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", text)
    return buf.getvalue()

def create(name, text, **kw):
    return lam.create_function(FunctionName=name, Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                               Handler="main.handler", Code={"ZipFile": zipped(text)}, Timeout=5, **kw)

def expect(code, call, *args, **kw):
    try:
        call(*args, **kw)
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == code, e.response
        return e.response
    raise SystemExit(f"expected {code} from {call.__name__}")

OK = "def handler(event, context):\n    return {'ok': True, 'event': event}\n"
FAIL = "def handler(event, context):\n    print('ATTEMPT')\n    raise ValueError('always fails')\n"
SINK = "import json\ndef handler(event, context):\n    print('DEST ' + json.dumps(event))\n    return 1\n"

arn = create("ex-ok", OK, Tags={"team": "core", "spore:sandbox": "container"})["FunctionArn"]
create("ex-fail", FAIL)
create("ex-sink", SINK)

# Reserved concurrency: 0 throttles every invocation, as Lambda's.
assert lam.put_function_concurrency(FunctionName="ex-ok", ReservedConcurrentExecutions=0)["ReservedConcurrentExecutions"] == 0
assert lam.get_function_concurrency(FunctionName="ex-ok")["ReservedConcurrentExecutions"] == 0
assert lam.get_function(FunctionName="ex-ok")["Concurrency"] == {"ReservedConcurrentExecutions": 0}
r = expect("TooManyRequestsException", lam.invoke, FunctionName="ex-ok", Payload=b"{}")
assert r["ResponseMetadata"]["HTTPStatusCode"] == 429, r
lam.put_function_concurrency(FunctionName="ex-ok", ReservedConcurrentExecutions=3)
assert lam.get_function_concurrency(FunctionName="ex-ok")["ReservedConcurrentExecutions"] == 3
assert lam.invoke(FunctionName="ex-ok", Payload=b"{}")["StatusCode"] == 200
settings = lam.get_account_settings()
limit = settings["AccountLimit"]
assert limit["ConcurrentExecutions"] >= 3 and limit["UnreservedConcurrentExecutions"] == limit["ConcurrentExecutions"] - 3, settings
assert settings["AccountUsage"]["FunctionCount"] == 3 and settings["AccountUsage"]["TotalCodeSize"] > 0, settings
assert limit["CodeSizeUnzipped"] == 250 * 1024 * 1024, settings
expect("InvalidParameterValueException", lam.put_function_concurrency, FunctionName="ex-ok",
       ReservedConcurrentExecutions=limit["ConcurrentExecutions"] + 1)
lam.delete_function_concurrency(FunctionName="ex-ok")
assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName="ex-ok")
assert "Concurrency" not in lam.get_function(FunctionName="ex-ok")
expect("InvalidParameterValueException", create, "ex-badtag", OK, Tags={"spore:nosuch": "1"})
assert lam.get_account_settings()["AccountLimit"]["UnreservedConcurrentExecutions"] == limit["ConcurrentExecutions"]

# Event invoke configs.
sink = lam.get_function(FunctionName="ex-sink")["Configuration"]["FunctionArn"]
expect("ResourceNotFoundException", lam.get_function_event_invoke_config, FunctionName="ex-fail")
c = lam.put_function_event_invoke_config(FunctionName="ex-fail", MaximumRetryAttempts=2, MaximumEventAgeInSeconds=600,
                                         DestinationConfig={"OnFailure": {"Destination": sink}})
assert c["MaximumRetryAttempts"] == 2 and c["DestinationConfig"]["OnFailure"]["Destination"] == sink, c
c = lam.update_function_event_invoke_config(FunctionName="ex-fail", MaximumEventAgeInSeconds=900)
assert c["MaximumEventAgeInSeconds"] == 900 and c["MaximumRetryAttempts"] == 2, c
assert lam.get_function_event_invoke_config(FunctionName="ex-fail")["DestinationConfig"]["OnFailure"]["Destination"] == sink
assert len(lam.list_function_event_invoke_configs(FunctionName="ex-fail")["FunctionEventInvokeConfigs"]) == 1
lam.put_function_event_invoke_config(FunctionName="ex-ok", DestinationConfig={"OnSuccess": {"Destination": sink}})
# (Out-of-range numbers are refused by botocore itself; the test below sends them raw.)
for bad in [{"DestinationConfig": {"OnFailure": {"Destination": "arn:aws:sqs:us-east-1:1:q"}}},
            {"DestinationConfig": {"OnFailure": {"Destination": "arn:aws:sns:us-east-1:1:t"}}},
            {"DestinationConfig": {"OnFailure": {"Destination": "arn:aws:events:us-east-1:1:event-bus/b"}}},
            {"DestinationConfig": {"OnSuccess": {"Destination": arn.replace("ex-ok", "nope")}}}]:
    r = expect("InvalidParameterValueException", lam.put_function_event_invoke_config, FunctionName="ex-ok", **bad)
    if "sqs" in json.dumps(bad):
        assert "SQS" in r["Error"]["Message"], r
lam.put_function_event_invoke_config(FunctionName="ex-sink", MaximumRetryAttempts=0)
lam.delete_function_event_invoke_config(FunctionName="ex-sink")
assert lam.list_function_event_invoke_configs(FunctionName="ex-sink")["FunctionEventInvokeConfigs"] == []

assert lam.invoke(FunctionName="ex-fail", InvocationType="Event", Payload=json.dumps({"n": "fail"}))["StatusCode"] == 202
assert lam.invoke(FunctionName="ex-ok", InvocationType="Event", Payload=json.dumps({"n": "ok"}))["StatusCode"] == 202

# Tags.
tags = lam.list_tags(Resource=arn)["Tags"]
assert tags["team"] == "core" and tags["spore:sandbox"] == "container", tags
lam.tag_resource(Resource=arn, Tags={"stage": "dev", "team": "platform"})
assert lam.list_tags(Resource=arn)["Tags"]["team"] == "platform"
lam.untag_resource(Resource=arn, TagKeys=["stage", "team"])
tags = lam.list_tags(Resource=arn)["Tags"]
assert "stage" not in tags and "team" not in tags and tags["spore:sandbox"] == "container", tags
assert lam.get_function(FunctionName="ex-ok")["Tags"] == tags
expect("InvalidParameterValueException", lam.tag_resource, Resource=arn, Tags={"aws:x": "1"})
expect("InvalidParameterValueException", lam.tag_resource, Resource=arn, Tags={"k" * 129: "1"})
expect("InvalidParameterValueException", lam.tag_resource, Resource=arn, Tags={f"k{i}": "v" for i in range(51)})
expect("InvalidParameterValueException", lam.tag_resource, Resource=arn, Tags={"spore:sandbox": "cfork"})
expect("ResourceNotFoundException", lam.list_tags, Resource=arn.replace("ex-ok", "nope"))

# Resource policies.
expect("ResourceNotFoundException", lam.get_policy, FunctionName="ex-ok")
st = json.loads(lam.add_permission(FunctionName="ex-ok", StatementId="s3-invoke", Action="lambda:InvokeFunction",
                                   Principal="s3.amazonaws.com", SourceArn="arn:aws:s3:::bucket",
                                   SourceAccount="123456789012")["Statement"])
assert st["Sid"] == "s3-invoke" and st["Principal"] == {"Service": "s3.amazonaws.com"}, st
assert st["Condition"]["ArnLike"]["AWS:SourceArn"] == "arn:aws:s3:::bucket", st
r = expect("ResourceConflictException", lam.add_permission, FunctionName="ex-ok", StatementId="s3-invoke",
           Action="lambda:InvokeFunction", Principal="s3.amazonaws.com")
assert r["ResponseMetadata"]["HTTPStatusCode"] == 409
lam.add_permission(FunctionName="ex-ok", StatementId="acct", Action="lambda:GetFunction", Principal="123456789012")
p = lam.get_policy(FunctionName="ex-ok")
doc = json.loads(p["Policy"])
assert [s["Sid"] for s in doc["Statement"]] == ["s3-invoke", "acct"] and p["RevisionId"], p
assert doc["Statement"][1]["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}, doc
expect("PreconditionFailedException", lam.remove_permission, FunctionName="ex-ok", StatementId="acct", RevisionId="stale")
lam.remove_permission(FunctionName="ex-ok", StatementId="acct", RevisionId=p["RevisionId"])
expect("ResourceNotFoundException", lam.remove_permission, FunctionName="ex-ok", StatementId="acct")
assert [s["Sid"] for s in json.loads(lam.get_policy(FunctionName="ex-ok")["Policy"])["Statement"]] == ["s3-invoke"]
expect("InvalidParameterValueException", lam.add_permission, FunctionName="ex-ok", StatementId="bad id!",
       Action="lambda:InvokeFunction", Principal="*")

# What a Spore function has none of.
assert lam.get_function_code_signing_config(FunctionName="ex-ok")["CodeSigningConfigArn"] == ""
assert lam.get_runtime_management_config(FunctionName="ex-ok")["UpdateRuntimeOn"] == "Auto"
assert lam.list_event_source_mappings()["EventSourceMappings"] == []
assert lam.list_function_url_configs(FunctionName="ex-ok")["FunctionUrlConfigs"] == []
assert lam.list_provisioned_concurrency_configs(FunctionName="ex-ok")["ProvisionedConcurrencyConfigs"] == []

# Refused by name.
for op, call in [
    ("CreateFunctionUrlConfig", lambda: lam.create_function_url_config(FunctionName="ex-ok", AuthType="NONE")),
    ("InvokeWithResponseStream", lambda: lam.invoke_with_response_stream(FunctionName="ex-ok", Payload=b"{}")),
    ("CreateEventSourceMapping", lambda: lam.create_event_source_mapping(
        FunctionName="ex-ok", EventSourceArn="arn:aws:sqs:us-east-1:1:q")),
]:
    try:
        call()
        raise SystemExit(f"expected {op} to be refused")
    except botocore.exceptions.ClientError as e:
        err = e.response["Error"]
        assert err["Code"] == "UnsupportedOperationException" and op in err["Message"], e.response
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400, e.response
print("ok")
"##;

fn log_lines(d: &Daemon, name: &str) -> Vec<String> {
    d.get_json(&format!("/spore/v1/functions/{name}/logs?lines=500"))["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

/// The destination records the sink logged, waiting (at most `within`) for `n` of them.
fn destination_records(d: &Daemon, n: usize, within: Duration) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let records: Vec<serde_json::Value> = log_lines(d, "ex-sink")
            .iter()
            .filter_map(|l| l.split_once("DEST ").map(|(_, r)| r))
            .map(|r| serde_json::from_str(r).unwrap())
            .collect();
        if records.len() >= n || start.elapsed() > within {
            return records;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn concurrency_destinations_tags_policies_and_refusals_through_boto3() {
    let test = "concurrency_destinations_tags_policies_and_refusals_through_boto3";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    let t0 = Instant::now();
    let Some(out) = boto3(test, &d, SCRIPT, &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let records = destination_records(&d, 2, Duration::from_secs(40));
    assert_eq!(records.len(), 2, "{records:?}\n{}", d.log_text());
    let by = |cond: &str| {
        records
            .iter()
            .find(|r| r["requestContext"]["condition"] == cond)
            .unwrap_or_else(|| panic!("no {cond} record in {records:?}"))
            .clone()
    };
    let failed = by("RetriesExhausted");
    assert_eq!(failed["version"], "1.0");
    assert_eq!(
        failed["requestContext"]["approximateInvokeCount"], 3,
        "{failed}"
    );
    assert!(failed["requestContext"]["functionArn"]
        .as_str()
        .unwrap()
        .ends_with(":function:ex-fail:$LATEST"));
    assert!(!failed["requestContext"]["requestId"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(failed["requestPayload"], serde_json::json!({"n": "fail"}));
    assert_eq!(failed["responseContext"]["functionError"], "Unhandled");
    assert_eq!(failed["responsePayload"]["errorType"], "ValueError");
    assert!(failed["timestamp"].as_str().unwrap().contains('T'));
    // Three attempts of the failing function, with back-off between them (1 s, then 2 s).
    let attempts = log_lines(&d, "ex-fail")
        .iter()
        .filter(|l| l.contains("ATTEMPT"))
        .count();
    assert_eq!(attempts, 3);
    assert!(t0.elapsed() >= Duration::from_secs(3));

    let ok = by("Success");
    assert_eq!(ok["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(ok["requestPayload"], serde_json::json!({"n": "ok"}));
    assert_eq!(ok["responsePayload"]["ok"], true);
    assert!(ok["responseContext"].get("functionError").is_none());

    // Ranges botocore checks before sending, sent raw.
    for bad in [
        serde_json::json!({"MaximumRetryAttempts": 3}),
        serde_json::json!({"MaximumEventAgeInSeconds": 59}),
        serde_json::json!({"MaximumEventAgeInSeconds": 21601}),
    ] {
        let r = d
            .http
            .put(d.url("/2019-09-25/functions/ex-ok/event-invoke-config"))
            .json(&bad)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(common::error_type(&r), "InvalidParameterValueException");
    }

    // Who may do this: the new operations need a signed request like every other.
    let anon = reqwest::blocking::Client::new();
    for (method, path) in [
        (
            "GET",
            "/2017-03-31/tags/arn:aws:lambda:local:000000000000:function:ex-ok",
        ),
        ("PUT", "/2017-10-31/functions/ex-ok/concurrency"),
        ("POST", "/2018-10-31/layers/x/versions"),
        ("GET", "/2016-08-19/account-settings/"),
        ("POST", "/2015-03-31/functions/ex-ok/policy"),
    ] {
        let r = anon
            .request(method.parse().unwrap(), d.url(path))
            .body("{}")
            .send()
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
    }
    // An invoke-only key may invoke ex-ok, and none of the new operations on it.
    let out = d.cli(&[
        "keys",
        "create",
        "inv",
        "--invoke-only",
        "--functions",
        "ex-*",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let creds = spore_auth::credentials::parse_profile(&text, "inv").expect(&text);
    let inv = spore_client::Http::new(Duration::from_secs(60), Some(creds)).unwrap();
    let r = inv
        .post(d.url("/2015-03-31/functions/ex-ok/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    for (method, path, body) in [
        (
            "POST",
            "/2017-03-31/tags/arn:aws:lambda:local:000000000000:function:ex-ok",
            r#"{"Tags": {"a": "b"}}"#,
        ),
        (
            "PUT",
            "/2017-10-31/functions/ex-ok/concurrency",
            r#"{"ReservedConcurrentExecutions": 0}"#,
        ),
        (
            "POST",
            "/2015-03-31/functions/ex-ok/policy",
            r#"{"StatementId": "x", "Action": "lambda:InvokeFunction", "Principal": "*"}"#,
        ),
        (
            "PUT",
            "/2019-09-25/functions/ex-ok/event-invoke-config",
            r#"{"MaximumRetryAttempts": 0}"#,
        ),
        ("DELETE", "/2018-10-31/layers/x/versions/1", ""),
        ("GET", "/2016-08-19/account-settings/", ""),
    ] {
        let url = d.url(path);
        let req = match method {
            "POST" => inv.post(url),
            "PUT" => inv.put(url),
            "DELETE" => inv.delete(url),
            _ => inv.get(url),
        };
        let r = req.body(body).send().unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        assert_eq!(common::error_type(&r), "AccessDeniedException");
    }
    assert!(
        d.get_json("/2017-03-31/tags/arn:aws:lambda:local:000000000000:function:ex-ok")["Tags"]
            .get("a")
            .is_none()
    );
    d.stop();
}

const LOOP: &str = r##"
import io, sys, zipfile
import boto3, botocore

lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("main.py", "def handler(event, context):\n    print('HOP')\n    return 1\n")
arns = {}
for name in ["loop-a", "loop-b"]:
    arns[name] = lam.create_function(FunctionName=name, Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                                     Handler="main.handler", Code={"ZipFile": buf.getvalue()})["FunctionArn"]
for name, other in [("loop-a", "loop-b"), ("loop-b", "loop-a")]:
    lam.put_function_event_invoke_config(FunctionName=name,
                                         DestinationConfig={"OnSuccess": {"Destination": arns[other]}})
assert lam.invoke(FunctionName="loop-a", InvocationType="Event", Payload=b"{}")["StatusCode"] == 202
print("ok")
"##;

/// Two functions that name each other as destinations stop after a bounded chain (as
/// Lambda's recursive-loop detection stops them), and the log says why.
#[test]
fn a_loop_of_destinations_stops() {
    let test = "a_loop_of_destinations_stops";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    let Some(out) = boto3(test, &d, LOOP, &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let hops = |d: &Daemon| {
        ["loop-a", "loop-b"]
            .iter()
            .map(|f| log_lines(d, f).iter().filter(|l| l.contains("HOP")).count())
            .sum::<usize>()
    };
    // Wait until the count has not moved for 3 s (at most 60 s).
    let start = Instant::now();
    let (mut last, mut still) = (usize::MAX, Instant::now());
    while start.elapsed() < Duration::from_secs(60) {
        let n = hops(&d);
        if n != last {
            (last, still) = (n, Instant::now());
        } else if still.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last, 16, "{}", d.log_text());
    let stopped = ["loop-a", "loop-b"]
        .iter()
        .flat_map(|f| log_lines(&d, f))
        .any(|l| l.contains("chain of destinations reached 16"));
    assert!(stopped, "no log line says why the chain stopped");
    d.stop();
}
