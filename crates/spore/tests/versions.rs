//! Lambda versions and aliases, qualifiers, pagination, preconditions and the configuration
//! echo, driven as deploy tools drive them: boto3 and the AWS CLI against a daemon.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{can_sandbox, repo_root, Daemon};

/// Shared by the scripts: a client, and zips of a handler that reports its code's mark, the
/// version it runs as, its request id (also printed to the log) and the size of its /tmp.
const PRELUDE: &str = r#"
import io, json, sys, time, zipfile
import boto3, botocore
endpoint = sys.argv[1]
lam = boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
                   config=botocore.config.Config(retries={"max_attempts": 1}))

def code(mark):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", f'''
import os
def handler(event, context):
    print("handled " + context.aws_request_id)
    st = os.statvfs("/tmp")
    return {{"code": "{mark}", "version": os.environ["AWS_LAMBDA_FUNCTION_VERSION"],
            "ctx": context.function_version, "tmp_mb": st.f_blocks * st.f_frsize // 1048576}}
''')
    return buf.getvalue()

def call(name, qualifier=None, **kw):
    args = {"FunctionName": name, "Payload": b"{}", **kw}
    if qualifier is not None:
        args["Qualifier"] = qualifier
    r = lam.invoke(**args)
    assert r["StatusCode"] == 200 and "FunctionError" not in r, r
    return r["ExecutedVersion"], json.loads(r["Payload"].read()), r

def refused(fn, error, **kw):
    try:
        fn(**kw)
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == error, (error, e.response)
        return e.response
    raise SystemExit(f"expected {error} from {fn.__name__}({kw})")
"#;

const VERSIONS: &str = r#"
c = lam.create_function(FunctionName="ver", Runtime="python3.11", Role="arn:aws:iam::123:role/mine",
                        Handler="main.handler", Code={"ZipFile": code("one")}, Publish=True,
                        Description="first", Timeout=7, MemorySize=192,
                        Environment={"Variables": {"A": "1"}})
assert c["Version"] == "1", c
assert c["FunctionArn"].endswith(":function:ver:1"), c
# Configuration is echoed as given.
assert (c["Role"], c["Description"], c["Timeout"], c["MemorySize"], c["Handler"]) == \
    ("arn:aws:iam::123:role/mine", "first", 7, 192, "main.handler"), c
assert c["Environment"]["Variables"] == {"A": "1"}, c

# $LATEST changes; version 1 keeps the old code.
u = lam.update_function_code(FunctionName="ver", ZipFile=code("two"))
assert u["Version"] == "$LATEST" and u["CodeSha256"] != c["CodeSha256"], u
v2 = lam.publish_version(FunctionName="ver", Description="second")
assert v2["Version"] == "2" and v2["Description"] == "second", v2
# Publishing unchanged code and configuration again gives the same version.
assert lam.publish_version(FunctionName="ver")["Version"] == "2"
# A CodeSha256 or RevisionId precondition that does not hold is refused.
refused(lam.publish_version, "InvalidParameterValueException", FunctionName="ver", CodeSha256=c["CodeSha256"])
refused(lam.publish_version, "PreconditionFailedException", FunctionName="ver", RevisionId="stale-1")

executed, body, _ = call("ver", "1")
assert (executed, body["code"], body["version"], body["ctx"]) == ("1", "one", "1", "1"), body
executed, body, _ = call("ver:1")
assert (executed, body["code"]) == ("1", "one"), body
executed, body, _ = call("arn:aws:lambda:local:000000000000:function:ver:2")
assert (executed, body["code"], body["version"]) == ("2", "two", "2"), body
executed, body, _ = call("ver")
assert (executed, body["code"], body["version"]) == ("$LATEST", "two", "$LATEST"), body
g = lam.get_function(FunctionName="ver", Qualifier="1")["Configuration"]
assert g["Version"] == "1" and g["CodeSha256"] == c["CodeSha256"] and g["Description"] == "first", g

# A version or alias that does not exist is not found, everywhere.
for q in ["9", "nosuch"]:
    refused(lam.invoke, "ResourceNotFoundException", FunctionName="ver", Qualifier=q, Payload=b"{}")
    refused(lam.get_function, "ResourceNotFoundException", FunctionName="ver", Qualifier=q)
    refused(lam.get_function_configuration, "ResourceNotFoundException", FunctionName="ver", Qualifier=q)
refused(lam.invoke, "ResourceNotFoundException", FunctionName="ver:9", Payload=b"{}")
refused(lam.delete_function, "ResourceNotFoundException", FunctionName="ver", Qualifier="9")

# Versions, paged.
pages, marker = [], None
while True:
    kw = {"Marker": marker} if marker else {}
    r = lam.list_versions_by_function(FunctionName="ver", MaxItems=1, **kw)
    pages.append([v["Version"] for v in r["Versions"]])
    marker = r.get("NextMarker")
    if not marker:
        break
    assert len(pages) < 10, pages
assert pages == [["$LATEST"], ["1"], ["2"]], pages

# Aliases.
a = lam.create_alias(FunctionName="ver", Name="live", FunctionVersion="1", Description="prod")
assert a["AliasArn"].endswith(":function:ver:live") and a["FunctionVersion"] == "1", a
refused(lam.create_alias, "ResourceConflictException", FunctionName="ver", Name="live", FunctionVersion="1")
refused(lam.create_alias, "ResourceNotFoundException", FunctionName="ver", Name="x", FunctionVersion="7")
assert lam.get_alias(FunctionName="ver", Name="live")["Description"] == "prod"
executed, body, _ = call("ver", "live")
assert (executed, body["code"]) == ("1", "one"), body
# A version an alias points to cannot be deleted.
refused(lam.delete_function, "ResourceConflictException", FunctionName="ver", Qualifier="1")
# A stale RevisionId is refused.
refused(lam.update_alias, "PreconditionFailedException", FunctionName="ver", Name="live",
        FunctionVersion="2", RevisionId="not-the-current-one")
a = lam.update_alias(FunctionName="ver", Name="live", FunctionVersion="2", RevisionId=a["RevisionId"],
                     RoutingConfig={"AdditionalVersionWeights": {"1": 0.3}})
assert a["RoutingConfig"]["AdditionalVersionWeights"] == {"1": 0.3}, a
refused(lam.update_alias, "InvalidParameterValueException", FunctionName="ver", Name="live",
        RoutingConfig={"AdditionalVersionWeights": {"1": 1.5}})
assert [x["Name"] for x in lam.list_aliases(FunctionName="ver")["Aliases"]] == ["live"]
assert [x["Name"] for x in lam.list_aliases(FunctionName="ver", FunctionVersion="1")["Aliases"]] == ["live"]

# The canary split: 200 invocations, about 30% on version 1.
n, old, deadline = 200, 0, time.time() + 120
for _ in range(n):
    assert time.time() < deadline, "the split took too long"
    executed, body, _ = call("ver", "live")
    assert body["code"] == {"1": "one", "2": "two"}[executed], (executed, body)
    old += executed == "1"
# Binomial(200, 0.3): mean 60, sd 6.5; 5 sd either side.
assert 28 <= old <= 92, old
print("split", old, "of", n)

lam.delete_alias(FunctionName="ver", Name="live")
refused(lam.get_alias, "ResourceNotFoundException", FunctionName="ver", Name="live")
# A qualified delete removes that version only.
lam.delete_function(FunctionName="ver", Qualifier="1")
assert [v["Version"] for v in lam.list_versions_by_function(FunctionName="ver")["Versions"]] == ["$LATEST", "2"]
assert call("ver", "2")[1]["code"] == "two"
assert call("ver")[1]["code"] == "two"
refused(lam.invoke, "ResourceNotFoundException", FunctionName="ver", Qualifier="1", Payload=b"{}")
# Numbers are not reused.
lam.update_function_configuration(FunctionName="ver", Timeout=8)
assert lam.publish_version(FunctionName="ver")["Version"] == "3"

# A dry run checks the code and changes nothing.
before = lam.get_function_configuration(FunctionName="ver")
d = lam.update_function_code(FunctionName="ver", ZipFile=code("three"), DryRun=True)
after = lam.get_function_configuration(FunctionName="ver")
assert d["CodeSha256"] != before["CodeSha256"], d
assert (after["CodeSha256"], after["RevisionId"]) == (before["CodeSha256"], before["RevisionId"]), after
assert call("ver")[1]["code"] == "two"
refused(lam.update_function_code, "InvalidParameterValueException", FunctionName="ver",
        ZipFile=b"not a zip", DryRun=True)
# A stale RevisionId on an update is refused, the current one accepted.
refused(lam.update_function_configuration, "PreconditionFailedException", FunctionName="ver",
        Timeout=9, RevisionId=u["RevisionId"])
refused(lam.update_function_code, "PreconditionFailedException", FunctionName="ver",
        ZipFile=code("three"), RevisionId=u["RevisionId"])
assert lam.get_function_configuration(FunctionName="ver")["Timeout"] == 8
lam.update_function_configuration(FunctionName="ver", Timeout=9, RevisionId=after["RevisionId"])
# Publish on an update.
p = lam.update_function_code(FunctionName="ver", ZipFile=code("four"), Publish=True)
assert p["Version"] == "4", p
assert call("ver", "4")[1]["code"] == "four"

# An asynchronous invocation's request id is the one the function ran with.
r = lam.invoke(FunctionName="ver", InvocationType="Event", Payload=b"{}", Qualifier="4")
assert r["StatusCode"] == 202, r
print("event-id", r["ResponseMetadata"]["RequestId"])
print("versions OK")
"#;

const CONFIG: &str = r#"
# arm64 is refused by name on an x86_64 host (and the other way round).
other = "x86_64" if sys.argv[2] == "arm64" else "arm64"
e = refused(lam.create_function, "InvalidParameterValueException", FunctionName="arm", Runtime="python3.11",
            Role="arn:aws:iam::1:role/r", Handler="main.handler", Code={"ZipFile": code("a")},
            Architectures=[other])
assert "Architectures" in e["Error"]["Message"], e
refused(lam.create_function, "InvalidParameterValueException", FunctionName="big", Runtime="python3.11",
        Role="arn:aws:iam::1:role/r", Handler="main.handler", Code={"ZipFile": code("a")},
        EphemeralStorage={"Size": 10241})
# EphemeralStorage sets the sandbox's /tmp.
c = lam.create_function(FunctionName="tmpfs", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                        Handler="main.handler", Code={"ZipFile": code("t")},
                        EphemeralStorage={"Size": 1024}, Architectures=[sys.argv[2]])
assert c["EphemeralStorage"] == {"Size": 1024} and c["Architectures"] == [sys.argv[2]], c
assert c["FunctionArn"] == "arn:aws:lambda:eu-west-1:123456789012:function:tmpfs", c
assert call("tmpfs")[1]["tmp_mb"] == 1024
lam.update_function_configuration(FunctionName="tmpfs", EphemeralStorage={"Size": 600})
assert call("tmpfs")[1]["tmp_mb"] == 600
# ListFunctions pages, and lists versions with FunctionVersion=ALL.
for i in range(3):
    lam.create_function(FunctionName=f"page{i}", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                        Handler="main.handler", Code={"ZipFile": code("p")})
lam.publish_version(FunctionName="page1")
names, marker, pages = [], None, 0
while True:
    kw = {"Marker": marker} if marker else {}
    r = lam.list_functions(MaxItems=2, **kw)
    pages += 1
    assert len(r["Functions"]) <= 2, r
    names += [f["FunctionName"] for f in r["Functions"]]
    marker = r.get("NextMarker")
    if not marker:
        break
    assert pages < 10
assert names == ["page0", "page1", "page2", "tmpfs"] and pages == 2, (names, pages)
every = lam.list_functions(FunctionVersion="ALL")["Functions"]
assert [(f["FunctionName"], f["Version"]) for f in every] == \
    [("page0", "$LATEST"), ("page1", "$LATEST"), ("page1", "1"), ("page2", "$LATEST"), ("tmpfs", "$LATEST")], every
refused(lam.list_functions, "InvalidParameterValueException", Marker="no-such-marker")
print("config OK")
"#;

const CFORK: &str = r#"
lam.create_function(FunctionName="fk", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                    Handler="main.handler", Code={"ZipFile": code("old")}, Tags={"spore:sandbox": "cfork"})
assert lam.publish_version(FunctionName="fk")["Version"] == "1"
lam.update_function_code(FunctionName="fk", ZipFile=code("new"))
starts = []
for _ in range(3):
    executed, body, r = call("fk", "1")
    assert (executed, body["code"], body["version"]) == ("1", "old", "1"), body
    starts.append(r["ResponseMetadata"]["HTTPHeaders"]["x-spore-start"])
assert starts[1:] == ["warm", "warm"], starts
assert call("fk")[1]["code"] == "new"
print("starts", starts)
print("cfork OK")
"#;

const PERSIST: &str = r#"
executed, body, _ = call("ver", "4")
assert (executed, body["code"]) == ("4", "four"), body
assert [v["Version"] for v in lam.list_versions_by_function(FunctionName="ver")["Versions"]] == ["$LATEST", "2", "3", "4"]
lam.create_alias(FunctionName="ver", Name="after", FunctionVersion="2")
print("persist OK")
"#;

const PROVISIONED: &str = r#"
lam.create_function(FunctionName="pc", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                    Handler="main.handler", Code={"ZipFile": code("pc")})
lam.publish_version(FunctionName="pc")
lam.create_alias(FunctionName="pc", Name="live", FunctionVersion="1")
# Never $LATEST, and a qualifier that does not exist is not found.
refused(lam.put_provisioned_concurrency_config, "InvalidParameterValueException", FunctionName="pc",
        Qualifier="$LATEST", ProvisionedConcurrentExecutions=1)
refused(lam.put_provisioned_concurrency_config, "ResourceNotFoundException", FunctionName="pc",
        Qualifier="5", ProvisionedConcurrentExecutions=1)
refused(lam.put_provisioned_concurrency_config, "InvalidParameterValueException", FunctionName="pc",
        Qualifier="1", ProvisionedConcurrentExecutions=1000)
refused(lam.get_provisioned_concurrency_config, "ProvisionedConcurrencyConfigNotFoundException",
        FunctionName="pc", Qualifier="1")
t0 = time.time()
p = lam.put_provisioned_concurrency_config(FunctionName="pc", Qualifier="live", ProvisionedConcurrentExecutions=2)
assert p["RequestedProvisionedConcurrentExecutions"] == 2 and p["Status"] in ("IN_PROGRESS", "READY"), p
while True:
    g = lam.get_provisioned_concurrency_config(FunctionName="pc", Qualifier="live")
    if g["Status"] == "READY":
        break
    assert time.time() < t0 + 60, g
    time.sleep(0.05)
print("ready_ms", round((time.time() - t0) * 1000))
assert g["AvailableProvisionedConcurrentExecutions"] == 2, g
# An alias with provisioned concurrency cannot be pointed at $LATEST.
refused(lam.update_alias, "InvalidParameterValueException", FunctionName="pc", Name="live",
        FunctionVersion="$LATEST")
configs = lam.list_provisioned_concurrency_configs(FunctionName="pc")["ProvisionedConcurrencyConfigs"]
assert [c["FunctionArn"].rsplit(":", 1)[1] for c in configs] == ["live"], configs
for _ in range(3):
    executed, body, r = call("pc", "live")
    assert executed == "1" and r["ResponseMetadata"]["HTTPHeaders"]["x-spore-start"] == "warm", r
lam.delete_provisioned_concurrency_config(FunctionName="pc", Qualifier="live")
refused(lam.get_provisioned_concurrency_config, "ProvisionedConcurrencyConfigNotFoundException",
        FunctionName="pc", Qualifier="live")
print("provisioned OK")
"#;

#[test]
fn provisioned_concurrency_keeps_instances_of_a_version_warm() {
    let test = "provisioned_concurrency_keeps_instances_of_a_version_warm";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    if let Some(out) = run(test, &d, PROVISIONED, &[]) {
        assert!(out.contains("provisioned OK"), "{out}");
        eprintln!(
            "{}",
            out.lines().find(|l| l.starts_with("ready_ms")).unwrap()
        );
        let g = d.get_json("/2015-03-31/functions/pc?Qualifier=1");
        assert_eq!(g["Spore"]["Instances"]["Total"], 2, "{g}");
        let latest = d.get_json("/2015-03-31/functions/pc");
        assert_eq!(latest["Spore"]["Instances"]["Total"], 0, "{latest}");
    }
    d.stop();
}

const SNAPSHOT: &str = r#"
lam.create_function(FunctionName="snap", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                    Handler="main.handler", Code={"ZipFile": code("old")}, Tags={"spore:snapshot": "true"},
                    Publish=True)
assert call("snap", "1")[1]["code"] == "old"
lam.update_function_code(FunctionName="snap", ZipFile=code("new"))
assert call("snap")[1]["code"] == "new"
print("snapshot OK")
"#;

#[test]
fn a_published_version_keeps_its_own_snapshot() {
    let test = "a_published_version_keeps_its_own_snapshot";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    if let Some(out) = run(test, &d, SNAPSHOT, &[]) {
        assert!(out.contains("snapshot OK"), "{out}");
        // Version 1 and $LATEST have a snapshot each; $LATEST's change left version 1's alone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let snaps = d.get_json("/spore/v1/snapshots");
            let names: Vec<String> = snaps["Snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["function"].as_str().unwrap().to_owned())
                .collect();
            if names.contains(&"snap:1".to_owned()) && names.contains(&"snap".to_owned()) {
                break;
            }
            assert!(Instant::now() < deadline, "{snaps}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // A restore of version 1 runs version 1's code.
        let r = d.invoke_raw("snap:1", b"{}", &[("X-Spore-Cold", "restore")]);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-spore-start"], "restore");
        assert_eq!(r.headers()["x-amz-executed-version"], "1");
        let body: serde_json::Value = r.json().unwrap();
        assert_eq!(
            (&body["code"], &body["version"]),
            (&"old".into(), &"1".into())
        );
        // Deleting the version deletes its snapshot.
        let r = d
            .http
            .delete(d.url("/2015-03-31/functions/snap?Qualifier=1"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 204);
        let snaps = d.get_json("/spore/v1/snapshots");
        assert!(!snaps.to_string().contains("snap:1"), "{snaps}");
    }
    d.stop();
}

fn run(test: &str, d: &Daemon, script: &str, args: &[&str]) -> Option<String> {
    let out = common::boto3(test, d, &format!("{PRELUDE}\n{script}"), args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{test}: {stdout}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    Some(stdout)
}

fn test_python() -> PathBuf {
    std::env::var_os("SPORE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-python"))
}

/// `aws lambda ARGS` (the AWS CLI, v1) against `d`, signing with its key.
fn aws(d: &Daemon, args: &[&str]) -> Output {
    Command::new("/usr/bin/python3")
        .args([
            "-m",
            "awscli",
            "--endpoint-url",
            &d.endpoint,
            "--output",
            "json",
        ])
        .arg("lambda")
        .args(args)
        .env("PYTHONPATH", test_python())
        .env("AWS_SHARED_CREDENTIALS_FILE", d.data.join("credentials"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_MAX_ATTEMPTS", "1")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap()
}

fn aws_json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let out = aws(d, args);
    assert!(
        out.status.success(),
        "aws lambda {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether the AWS CLI is installed (a failure with `SPORE_REQUIRE_ROOT=1`).
fn have_cli(test: &str) -> bool {
    if test_python().join("awscli").is_dir() {
        return true;
    }
    assert_ne!(
        std::env::var("SPORE_REQUIRE_ROOT").as_deref(),
        Ok("1"),
        "the AWS CLI is not installed in {}; run scripts/setup.sh",
        test_python().display()
    );
    eprintln!("SKIP {test}: the AWS CLI is not installed (run scripts/setup.sh)");
    false
}

#[test]
fn versions_aliases_and_qualifiers_with_boto3() {
    let test = "versions_aliases_and_qualifiers_with_boto3";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    let Some(out) = run(test, &d, VERSIONS, &[]) else {
        d.stop();
        return;
    };
    assert!(out.contains("versions OK"), "{out}");
    eprintln!("{}", out.lines().find(|l| l.starts_with("split")).unwrap());
    // The Event invocation's request id is the one the function logged with.
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("event-id "))
        .unwrap()
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = d.get_json(&format!("/spore/v1/functions/ver/logs?request_id={id}"));
        let lines = logs["lines"].to_string();
        if lines.contains(&format!("handled {id}")) {
            assert!(lines.contains("Version: 4"), "{lines}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Event invocation {id} never logged: {logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Versions and aliases persist across a restart of the daemon.
    d.stop();
    let data = d.data.clone();
    let mut d2 = Daemon::start_at(&data, &[]);
    let out = run(test, &d2, PERSIST, &[]).unwrap();
    assert!(out.contains("persist OK"), "{out}");
    // Deleting the function deletes its versions and aliases (and a new one starts afresh).
    let r = d2
        .http
        .delete(d2.url("/2015-03-31/functions/ver"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let dir = data.join("functions/ver");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        !std::fs::read_dir(data.join("snapshots"))
            .map(|e| e
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("ver")))
            .unwrap_or(false),
        "snapshots of ver are left"
    );
    d2.stop();
}

#[test]
fn configuration_echo_ephemeral_storage_region_and_pagination() {
    let test = "configuration_echo_ephemeral_storage_region_and_pagination";
    if !can_sandbox(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_at(
        &tmp.path().join("data"),
        &["--region", "eu-west-1", "--account-id", "123456789012"],
    );
    let host = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "x86_64"
    };
    if let Some(out) = run(test, &d, CONFIG, &[host]) {
        assert!(out.contains("config OK"), "{out}");
        // `spore ls` follows ListFunctions' pages.
        let out = d.cli(&["ls"]);
        let text = String::from_utf8_lossy(&out.stdout);
        for name in ["page0", "page1", "page2", "tmpfs"] {
            assert!(text.contains(name), "{name}: {text}");
        }
    }
    d.stop();
}

#[test]
fn a_published_version_has_its_own_cfork_template() {
    let test = "a_published_version_has_its_own_cfork_template";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    if let Some(out) = run(test, &d, CFORK, &[]) {
        assert!(out.contains("cfork OK"), "{out}");
        eprintln!("{}", out.lines().find(|l| l.starts_with("starts")).unwrap());
        // Version 1 and $LATEST each have a template of their own.
        let pids = |path: &str| {
            let g = d.get_json(path);
            let p = g["Spore"]["Template"]["Pids"].clone();
            assert!(p.as_array().is_some_and(|a| !a.is_empty()), "{path}: {g}");
            p
        };
        let v1 = pids("/2015-03-31/functions/fk?Qualifier=1");
        let latest = pids("/2015-03-31/functions/fk");
        assert_ne!(v1, latest);
        // A fork of the version's template runs the version's code.
        let r = d.invoke_raw("fk:1", b"{}", &[("X-Spore-Cold", "fork")]);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-spore-start"], "fork");
        let body: serde_json::Value = r.json().unwrap();
        assert_eq!(body["code"], "old", "{body}");
    }
    d.stop();
}

#[test]
fn the_aws_cli_publishes_aliases_invokes_and_deletes_versions() {
    let test = "the_aws_cli_publishes_aliases_invokes_and_deletes_versions";
    if !can_sandbox(test) || !have_cli(test) {
        return;
    }
    let mut d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let zip = |mark: &str| {
        let src = tmp.path().join(mark);
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("main.py"),
            format!(
                "import os\ndef handler(e, c):\n    return {{'code': '{mark}', 'version': os.environ['AWS_LAMBDA_FUNCTION_VERSION']}}\n"
            ),
        )
        .unwrap();
        let path = tmp.path().join(format!("{mark}.zip"));
        std::fs::write(&path, spore_registry::code::zip_dir(&src).unwrap()).unwrap();
        format!("fileb://{}", path.display())
    };
    let c = aws_json(
        &d,
        &[
            "create-function",
            "--function-name",
            "cli",
            "--runtime",
            "python3.11",
            "--role",
            "arn:aws:iam::1:role/r",
            "--handler",
            "main.handler",
            "--zip-file",
            &zip("one"),
        ],
    );
    assert_eq!(c["Version"], "$LATEST");
    let v1 = aws_json(&d, &["publish-version", "--function-name", "cli"]);
    assert_eq!(v1["Version"], "1", "{v1}");
    aws_json(
        &d,
        &[
            "update-function-code",
            "--function-name",
            "cli",
            "--zip-file",
            &zip("two"),
            "--publish",
        ],
    );
    // The CLI pages through the versions one a call (--page-size is the server's MaxItems).
    let all = aws_json(
        &d,
        &[
            "list-versions-by-function",
            "--function-name",
            "cli",
            "--page-size",
            "1",
        ],
    );
    let versions: Vec<&str> = all["Versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["$LATEST", "1", "2"], "{all}");
    aws_json(
        &d,
        &[
            "create-alias",
            "--function-name",
            "cli",
            "--name",
            "stable",
            "--function-version",
            "1",
        ],
    );
    let outfile = tmp.path().join("out.json");
    let r = aws_json(
        &d,
        &[
            "invoke",
            "--function-name",
            "cli:stable",
            outfile.to_str().unwrap(),
        ],
    );
    assert_eq!(r["ExecutedVersion"], "1", "{r}");
    let body: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&outfile).unwrap()).unwrap();
    assert_eq!(body["code"], "one");
    assert_eq!(body["version"], "1");
    // A missing version: not found, and the CLI fails.
    let out = aws(
        &d,
        &[
            "invoke",
            "--function-name",
            "cli",
            "--qualifier",
            "7",
            outfile.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ResourceNotFoundException"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Version 1 has an alias: not deleted; version 2 is, alone.
    let out = aws(
        &d,
        &[
            "delete-function",
            "--function-name",
            "cli",
            "--qualifier",
            "1",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ResourceConflictException"));
    aws_json(
        &d,
        &[
            "delete-function",
            "--function-name",
            "cli",
            "--qualifier",
            "2",
        ],
    );
    let all = aws_json(&d, &["list-versions-by-function", "--function-name", "cli"]);
    assert_eq!(all["Versions"].as_array().unwrap().len(), 2, "{all}");
    let g = aws_json(&d, &["get-function", "--function-name", "cli"]);
    assert_eq!(g["Configuration"]["Version"], "$LATEST");
    d.stop();
}

#[test]
fn an_invoke_only_key_invokes_versions_but_cannot_publish_or_alias() {
    let test = "an_invoke_only_key_invokes_versions_but_cannot_publish_or_alias";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&common::fixture("echo"));
    let r = d
        .http
        .post(d.url("/2015-03-31/functions/echo/versions"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = d
        .http
        .post(d.url("/2015-03-31/functions/echo/aliases"))
        .body(r#"{"Name": "live", "FunctionVersion": "1"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let out = d.cli(&[
        "keys",
        "create",
        "ci",
        "--invoke-only",
        "--functions",
        "echo",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let creds = spore_auth::credentials::parse_profile(&text, "ci").expect(&text);
    let ci = spore_client::Http::new(Duration::from_secs(60), Some(creds)).unwrap();
    // It invokes the function's versions and aliases.
    for path in [
        "/2015-03-31/functions/echo:1/invocations",
        "/2015-03-31/functions/echo:live/invocations",
        "/2015-03-31/functions/echo/invocations?Qualifier=1",
    ] {
        let r = ci.post(d.url(path)).body("{}").send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-amz-executed-version"], "1", "{path}");
    }
    // Nothing else: publishing, aliases, deleting a version, another function's version.
    for (method, path) in [
        ("POST", "/2015-03-31/functions/echo/versions"),
        ("GET", "/2015-03-31/functions/echo/versions"),
        ("POST", "/2015-03-31/functions/echo/aliases"),
        ("PUT", "/2015-03-31/functions/echo/aliases/live"),
        ("DELETE", "/2015-03-31/functions/echo/aliases/live"),
        ("DELETE", "/2015-03-31/functions/echo?Qualifier=1"),
        ("POST", "/2015-03-31/functions/echo2:1/invocations"),
    ] {
        let url = d.url(path);
        let req = match method {
            "POST" => ci.post(url),
            "GET" => ci.get(url),
            "PUT" => ci.put(url),
            _ => ci.delete(url),
        };
        let r = req.body("{}").send().unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        assert_eq!(common::error_type(&r), "AccessDeniedException");
    }
    let r = d
        .http
        .get(d.url("/2015-03-31/functions/echo/aliases/live"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "the alias is still there");
    d.stop();
}

const STRICT: &str = r#"
lam.create_function(FunctionName="strict", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                    Handler="main.handler", Code={"ZipFile": code("s1")}, Publish=True)
lam.update_function_code(FunctionName="strict", ZipFile=code("s2"))
lam.publish_version(FunctionName="strict")
# Version numbers are written one way only: 01, +1, 0003 name nothing.
for bad in ["01", "+1", "0003", "0"]:
    refused(lam.create_alias, "InvalidParameterValueException", FunctionName="strict", Name="a" + bad.strip("+"),
            FunctionVersion=bad)
    refused(lam.get_function, "InvalidParameterValueException", FunctionName="strict", Qualifier=bad)
    refused(lam.delete_function, "InvalidParameterValueException", FunctionName="strict", Qualifier=bad)
    refused(lam.put_provisioned_concurrency_config, "InvalidParameterValueException", FunctionName="strict",
            Qualifier=bad, ProvisionedConcurrentExecutions=1)
    refused(lam.delete_provisioned_concurrency_config, "InvalidParameterValueException", FunctionName="strict",
            Qualifier=bad)
refused(lam.create_alias, "InvalidParameterValueException", FunctionName="strict", Name="w", FunctionVersion="2",
        RoutingConfig={"AdditionalVersionWeights": {"01": 0.5}})
lam.create_alias(FunctionName="strict", Name="live", FunctionVersion="1")
assert [v["Version"] for v in lam.list_versions_by_function(FunctionName="strict")["Versions"]] == ["$LATEST", "1", "2"]

# Provisioned concurrency through an alias of $LATEST is refused, as on $LATEST.
lam.create_alias(FunctionName="strict", Name="head", FunctionVersion="$LATEST")
e = refused(lam.put_provisioned_concurrency_config, "InvalidParameterValueException", FunctionName="strict",
            Qualifier="head", ProvisionedConcurrentExecutions=1)
assert "$LATEST" in e["Error"]["Message"], e

# Policies and event-invoke configs through an existing version or alias apply to the function.
arn = lam.get_function(FunctionName="strict")["Configuration"]["FunctionArn"]
lam.add_permission(FunctionName="strict", Qualifier="live", StatementId="s3", Action="lambda:InvokeFunction",
                   Principal="s3.amazonaws.com")
lam.add_permission(FunctionName="strict", Qualifier="1", StatementId="sns", Action="lambda:InvokeFunction",
                   Principal="sns.amazonaws.com")
for q in [None, "live", "1", "$LATEST"]:
    kw = {"Qualifier": q} if q else {}
    doc = json.loads(lam.get_policy(FunctionName="strict", **kw)["Policy"])
    assert sorted(s["Sid"] for s in doc["Statement"]) == ["s3", "sns"], (q, doc)
for q in ["nosuch", "7"]:
    e = refused(lam.add_permission, "ResourceNotFoundException", FunctionName="strict", Qualifier=q, StatementId="x",
                Action="lambda:InvokeFunction", Principal="s3.amazonaws.com")
    assert "one version" not in e["Error"]["Message"], e
    refused(lam.get_policy, "ResourceNotFoundException", FunctionName="strict", Qualifier=q)
lam.remove_permission(FunctionName="strict", Qualifier="live", StatementId="sns")
lam.put_function_event_invoke_config(FunctionName="strict", Qualifier="live", MaximumRetryAttempts=1)
assert lam.get_function_event_invoke_config(FunctionName="strict")["MaximumRetryAttempts"] == 1
assert lam.get_function_event_invoke_config(FunctionName="strict", Qualifier="1")["MaximumRetryAttempts"] == 1
lam.delete_function_event_invoke_config(FunctionName="strict", Qualifier="1")
refused(lam.get_function_event_invoke_config, "ResourceNotFoundException", FunctionName="strict")

# A policy document is at most 20 KB: the statement that would pass it is refused.
added, big = 0, "arn:aws:s3:::" + "b" * 900
for i in range(40):
    try:
        lam.add_permission(FunctionName="strict", StatementId=f"big{i}", Action="lambda:InvokeFunction",
                           Principal="s3.amazonaws.com", SourceArn=big)
        added += 1
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "InvalidParameterValueException", e.response
        assert "bigger than the limit" in e.response["Error"]["Message"], e.response
        break
assert 10 < added < 40, added
assert len(lam.get_policy(FunctionName="strict")["Policy"]) <= 20480

# Descriptions are at most 256 characters; an error never echoes the whole of a bad value.
long = "d" * 257
refused(lam.publish_version, "InvalidParameterValueException", FunctionName="strict", Description=long)
refused(lam.create_alias, "InvalidParameterValueException", FunctionName="strict", Name="l", FunctionVersion="1",
        Description=long)
refused(lam.update_alias, "InvalidParameterValueException", FunctionName="strict", Name="live", Description=long)
refused(lam.update_function_configuration, "InvalidParameterValueException", FunctionName="strict",
        Description=long)
refused(lam.create_function, "InvalidParameterValueException", FunctionName="strict2", Runtime="python3.11",
        Role="arn:aws:iam::1:role/r", Handler="main.handler", Code={"ZipFile": code("x")}, Description=long)
lam.update_function_configuration(FunctionName="strict", Description="d" * 256)

# ARNs of another region or account name nothing here.
other = arn.replace(":local:", ":eu-west-1:")
for fn, kw in [(lam.tag_resource, {"Resource": other, "Tags": {"a": "b"}}),
               (lam.list_tags, {"Resource": other}),
               (lam.get_function, {"FunctionName": other}),
               (lam.put_function_event_invoke_config,
                {"FunctionName": "strict", "DestinationConfig": {"OnFailure": {"Destination":
                    arn.replace(":000000000000:", ":123456789012:").replace("strict", "sink")}}})]:
    e = refused(fn, "InvalidParameterValueException", **kw)
    assert "this Spore daemon serves" in e["Error"]["Message"], e

# spore: tags are set at create only: neither tagged nor untagged later.
refused(lam.untag_resource, "InvalidParameterValueException", Resource=arn, TagKeys=["spore:sandbox"])
print("strict OK")
"#;

#[test]
fn qualifiers_limits_and_arns_are_checked_as_lambda_does() {
    let test = "qualifiers_limits_and_arns_are_checked_as_lambda_does";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    if let Some(out) = run(test, &d, STRICT, &[]) {
        assert!(out.contains("strict OK"), "{out}");
    }
    d.stop();
}
