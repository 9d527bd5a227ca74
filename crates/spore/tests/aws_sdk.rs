//! The AWS SDK for Python (boto3) works against the daemon unchanged.

mod common;

use std::process::Command;

use common::{can_sandbox, fixture, repo_root, Daemon};

const SCRIPT: &str = r#"
import base64, io, json, sys, zipfile
import boto3, botocore

endpoint, code_dir = sys.argv[1], sys.argv[2]
# The key comes from the daemon's credentials file (AWS_SHARED_CREDENTIALS_FILE), as the
# AWS tools read it.
lam = boto3.client("lambda", endpoint_url=endpoint, region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.write(code_dir + "/main.py", "main.py")
conf = lam.create_function(FunctionName="sdk-echo", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                           Handler="main.handler", Code={"ZipFile": buf.getvalue()}, Timeout=5,
                           Environment={"Variables": {"GREETING": "from-sdk"}})
assert conf["FunctionName"] == "sdk-echo" and conf["State"] == "Active", conf
names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
assert "sdk-echo" in names, names
got = lam.get_function(FunctionName="sdk-echo")
assert got["Configuration"]["Handler"] == "main.handler", got

r = lam.invoke(FunctionName="sdk-echo", Payload=json.dumps({"k": "v"}), LogType="Tail")
assert r["StatusCode"] == 200 and "FunctionError" not in r, r
body = json.loads(r["Payload"].read())
assert body["event"] == {"k": "v"} and body["greeting"] == "from-sdk", body
assert "START RequestId" in base64.b64decode(r["LogResult"]).decode()

r = lam.invoke(FunctionName="sdk-echo", InvocationType="Event", Payload=b"{}")
assert r["StatusCode"] == 202, r
r = lam.invoke(FunctionName="sdk-echo", InvocationType="DryRun")
assert r["StatusCode"] == 204, r

lam.update_function_configuration(FunctionName="sdk-echo", MemorySize=256)
assert lam.get_function_configuration(FunctionName="sdk-echo")["MemorySize"] == 256

with zipfile.ZipFile(buf := io.BytesIO(), "w") as z:
    z.writestr("main.py", "def handler(e, c):\n    raise KeyError('nope')\n")
lam.update_function_code(FunctionName="sdk-echo", ZipFile=buf.getvalue())
r = lam.invoke(FunctionName="sdk-echo", Payload=b"{}")
assert r["FunctionError"] == "Unhandled", r
err = json.loads(r["Payload"].read())
assert err["errorType"] == "KeyError", err

try:
    lam.invoke(FunctionName="no-such-function", Payload=b"{}")
    raise SystemExit("expected ResourceNotFoundException")
except lam.exceptions.ResourceNotFoundException:
    pass
try:
    lam.create_function(FunctionName="bad", Runtime="python3.11", Role="r", Handler="nodot",
                        Code={"ZipFile": buf.getvalue()})
    raise SystemExit("expected InvalidParameterValueException")
except lam.exceptions.InvalidParameterValueException:
    pass
lam.delete_function(FunctionName="sdk-echo")
print("boto3 OK")
"#;

#[test]
fn boto3_works_unchanged() {
    let test_python = std::env::var_os("SPORE_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-python"));
    if !test_python.join("boto3").is_dir() {
        if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
            panic!(
                "boto3 is not installed in {}; run scripts/setup.sh",
                test_python.display()
            );
        }
        eprintln!(
            "SKIP boto3_works_unchanged: boto3 not installed in {} (run scripts/setup.sh)",
            test_python.display()
        );
        return;
    }
    if !can_sandbox("boto3_works_unchanged") {
        return;
    }
    let mut d = Daemon::start();
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&d.endpoint)
        .arg(fixture("echo"))
        .env("PYTHONPATH", &test_python)
        .env("AWS_SHARED_CREDENTIALS_FILE", d.data.join("credentials"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("boto3 OK"),
        "stdout: {stdout}\nstderr: {stderr}\ndaemon: {}",
        d.log_text()
    );
    d.stop();
}
