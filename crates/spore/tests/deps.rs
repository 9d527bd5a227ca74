//! A function's own dependencies (`requirements.txt`, `package.json` with its lock file),
//! built at deploy in a build sandbox from the offline index `scripts/setup.sh` prepares,
//! into a shared, read-only, content-addressed layer.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{can_sandbox, repo_root, Daemon};
use serde_json::json;

/// The offline build index, or None (with a SKIP line; a failure under
/// `SPORE_REQUIRE_ROOT=1`, which the set-up satisfies).
fn build_index(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("SPORE_BUILD_INDEX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/build-index"));
    let ready = std::fs::read_dir(&dir).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("six-")))
    });
    if ready {
        return Some(dir);
    }
    assert_ne!(
        std::env::var("SPORE_REQUIRE_ROOT").as_deref(),
        Ok("1"),
        "no offline build index in {}; run scripts/setup.sh",
        dir.display()
    );
    eprintln!("SKIP {test}: no offline build index (run scripts/setup.sh)");
    None
}

/// A daemon whose builds use only the offline index, and the directory holding its data.
fn daemon(test: &str) -> Option<(Daemon, tempfile::TempDir)> {
    if !can_sandbox(test) {
        return None;
    }
    let index = build_index(test)?;
    let tmp = tempfile::Builder::new()
        .prefix("spore-deps-")
        .tempdir()
        .unwrap();
    let d = Daemon::start_at(
        &tmp.path().join("data"),
        &["--build-index-dir", index.to_str().unwrap()],
    );
    Some((d, tmp))
}

const PY_HANDLER: &str = r#"
import markupsafe, six
def handler(event, context):
    return {"six": six.__version__, "markupsafe": markupsafe.__version__,
            "speedups": markupsafe._speedups.__file__, "tag": TAG}
"#;

fn python_function(dir: &Path, name: &str, requirements: &str, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("spore.toml"),
        format!("name = \"{name}\"\nhandler = \"main.handler\"\n"),
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), format!("TAG = {tag:?}\n{PY_HANDLER}")).unwrap();
    std::fs::write(dir.join("requirements.txt"), requirements).unwrap();
}

/// The layers under the data dir (staging directories left out).
fn layers(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.data.join("deps"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn deploy(d: &Daemon, dir: &Path) -> (bool, String, String, Duration) {
    let t = Instant::now();
    let out = d.cli(&["deploy", dir.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

const REQS: &str = "six==1.17.0\nMarkupSafe==3.0.2\n";

/// A local package `pkg` in the function folder `f` (a `requirements.txt` line
/// `/var/task/<pkg>` names it) whose in-tree PEP 517 build backend is `backend` (Python).
fn local_package(f: &Path, pkg: &str, backend: &str) {
    std::fs::create_dir_all(f.join(pkg)).unwrap();
    std::fs::write(
        f.join(pkg).join("pyproject.toml"),
        format!("[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\".\"]\n\n[project]\nname = \"{pkg}\"\nversion = \"1\"\n"),
    )
    .unwrap();
    std::fs::write(f.join(pkg).join("backend.py"), backend).unwrap();
}

#[test]
fn python_requirements_build_once_and_are_shared() {
    let Some((d, tmp)) = daemon("python_requirements_build_once_and_are_shared") else {
        return;
    };
    let a = tmp.path().join("a");
    python_function(&a, "deps-a", REQS, "a1");
    let (ok, _, err, first) = deploy(&d, &a);
    assert!(ok, "{err}");
    // The CLI streamed pip's own lines.
    assert!(err.contains("building the dependencies of deps-a"), "{err}");
    assert!(err.contains("Successfully installed"), "{err}");
    let (is_err, _, body) = d.invoke("deps-a", json!({}));
    assert!(!is_err, "{body}");
    assert_eq!(body["six"], "1.17.0", "{body}");
    assert_eq!(body["markupsafe"], "3.0.2", "{body}");
    // The compiled wheel's extension, from the read-only layer.
    let speedups = body["speedups"].as_str().unwrap();
    assert!(
        speedups.starts_with("/opt/spore/deps/markupsafe/_speedups") && speedups.ends_with(".so"),
        "{body}"
    );
    let one = layers(&d);
    assert_eq!(one.len(), 1, "{one:?}");

    // Another function with the same requirements: no build, the same directory.
    let b = tmp.path().join("b");
    python_function(&b, "deps-b", REQS, "b1");
    let (ok, _, err, second) = deploy(&d, &b);
    assert!(ok, "{err}");
    assert!(!err.contains("building the dependencies"), "{err}");
    assert_eq!(layers(&d), one, "one layer on disk for both");
    let (is_err, _, body) = d.invoke("deps-b", json!({}));
    assert!(!is_err && body["tag"] == "b1", "{body}");
    let rec_a = d.get_json("/2015-03-31/functions/deps-a/configuration");
    assert_eq!(rec_a["State"], "Active", "{rec_a}");

    // A redeploy with new code and the same requirements reuses the layer.
    python_function(&a, "deps-a", REQS, "a2");
    let (ok, _, err, third) = deploy(&d, &a);
    assert!(ok && !err.contains("building the dependencies"), "{err}");
    assert_eq!(layers(&d), one);
    let (is_err, _, body) = d.invoke("deps-a", json!({}));
    assert!(!is_err && body["tag"] == "a2", "{body}");
    // The layer is read-only in the sandbox and belongs to root on the host.
    let layer = d.data.join("deps").join(&one[0]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(layer.join("six.py")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o644));
    // A layer goes when no function uses it any more.
    assert!(d.cli(&["rm", "deps-a"]).status.success());
    assert_eq!(layers(&d), one, "deps-b still uses it");
    assert!(d.cli(&["rm", "deps-b"]).status.success());
    assert!(layers(&d).is_empty(), "{:?}", layers(&d));
    eprintln!(
        "deploy with a dependency build: {:.0} ms; same requirements, another function: {:.0} ms; redeploy: {:.0} ms",
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3,
        third.as_secs_f64() * 1e3
    );
}

#[test]
fn a_broken_requirement_fails_with_pips_message_and_the_old_revision_serves() {
    let Some((d, tmp)) = daemon("a_broken_requirement_fails_with_pips_message") else {
        return;
    };
    let f = tmp.path().join("f");
    python_function(&f, "deps-broken", "six==1.17.0\n", "good");
    std::fs::write(
        f.join("main.py"),
        "TAG = 'good'\nimport six\ndef handler(e, c):\n    return {'tag': TAG, 'six': six.__version__}\n",
    )
    .unwrap();
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(ok, "{err}");
    std::fs::write(
        f.join("main.py"),
        "TAG = 'bad'\ndef handler(e, c):\n    return {'tag': TAG}\n",
    )
    .unwrap();
    std::fs::write(
        f.join("requirements.txt"),
        "six==1.17.0\nno-such-package-spore==9.9\n",
    )
    .unwrap();
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(!ok, "a broken requirement must fail the deploy");
    assert!(
        err.contains("No matching distribution found for no-such-package-spore==9.9"),
        "{err}"
    );
    assert!(err.contains("previous revision keeps serving"), "{err}");
    let (is_err, _, body) = d.invoke("deps-broken", json!({}));
    assert!(!is_err, "{body}");
    assert_eq!(body, json!({"tag": "good", "six": "1.17.0"}));
    let conf = d.get_json("/2015-03-31/functions/deps-broken/configuration");
    assert_eq!(conf["State"], "Active", "{conf}");
    assert_eq!(conf["LastUpdateStatus"], "Failed", "{conf}");
    assert!(d.log_text().contains("dependency build failed"));
    // --no-build deploys the code as it is (its import of the missing package is its own
    // business): the update goes through.
    let out = d.cli(&["deploy", "--no-build", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (is_err, _, body) = d.invoke("deps-broken", json!({}));
    assert!(!is_err && body["tag"] == "bad", "{body}");
}

const BOTO3: &str = r#"
import io, json, sys, time, zipfile
import boto3, botocore

endpoint, code_dir = sys.argv[1], sys.argv[2]
lam = boto3.client("lambda", endpoint_url=endpoint, region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
def package(requirements, tag):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("main.py", "TAG = %r\n" % tag + open(code_dir + "/main.py").read())
        z.writestr("requirements.txt", requirements)
    return buf.getvalue()
conf = lam.create_function(FunctionName="sdk-deps", Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                           Handler="main.handler", Publish=True,
                           Code={"ZipFile": package("six==1.17.0\nMarkupSafe==3.0.2\n", "one")})
assert conf["State"] == "Pending" and conf["StateReasonCode"] == "Creating", conf
# Publish waits for the build: nothing is published while Pending.
assert conf["Version"] == "$LATEST", conf
try:
    lam.invoke(FunctionName="sdk-deps", Payload=b"{}")
    raise SystemExit("expected ResourceConflictException while Pending")
except lam.exceptions.ResourceConflictException as e:
    assert "following state: Pending" in str(e), e
try:
    lam.publish_version(FunctionName="sdk-deps")
    raise SystemExit("expected ResourceConflictException from PublishVersion while Pending")
except lam.exceptions.ResourceConflictException as e:
    assert "An update is in progress for resource" in str(e), e
assert [v["Version"] for v in lam.list_versions_by_function(FunctionName="sdk-deps")["Versions"]] == ["$LATEST"]

def versions_become(want):
    deadline = time.time() + 30
    while True:
        got = [v["Version"] for v in lam.list_versions_by_function(FunctionName="sdk-deps")["Versions"]]
        if got == want:
            return
        assert time.time() < deadline, (got, want)
        time.sleep(0.1)
lam.get_waiter("function_active_v2").wait(FunctionName="sdk-deps",
                                          WaiterConfig={"Delay": 1, "MaxAttempts": 120})
conf = lam.get_function(FunctionName="sdk-deps")["Configuration"]
assert conf["State"] == "Active" and conf["LastUpdateStatus"] == "Successful", conf
# The version Publish asked for is published once the build succeeded.
versions_become(["$LATEST", "1"])
assert lam.get_function(FunctionName="sdk-deps", Qualifier="1")["Configuration"]["CodeSha256"] == conf["CodeSha256"]
r = lam.invoke(FunctionName="sdk-deps", Payload=b"{}")
body = json.loads(r["Payload"].read())
assert "FunctionError" not in r and body["tag"] == "one" and body["markupsafe"] == "3.0.2", body

conf = lam.update_function_code(FunctionName="sdk-deps", ZipFile=package("no-such-package-spore\n", "two"))
assert conf["LastUpdateStatus"] == "InProgress" and conf["State"] == "Active", conf
try:
    lam.get_waiter("function_updated_v2").wait(FunctionName="sdk-deps",
                                               WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    raise SystemExit("expected the update waiter to fail")
except botocore.exceptions.WaiterError:
    pass
conf = lam.get_function_configuration(FunctionName="sdk-deps")
assert conf["LastUpdateStatus"] == "Failed", conf
assert "No matching distribution found for no-such-package-spore" in conf["LastUpdateStatusReason"], conf
r = lam.invoke(FunctionName="sdk-deps", Payload=b"{}")
assert json.loads(r["Payload"].read())["tag"] == "one", "the old revision serves"

conf = lam.update_function_code(FunctionName="sdk-deps", ZipFile=package("six==1.17.0\n", "three"),
                                Publish=True)
# The old code is not published: the new code is, once its build succeeds.
assert conf["Version"] == "$LATEST" and conf["LastUpdateStatus"] == "InProgress", conf
try:
    lam.publish_version(FunctionName="sdk-deps")
    raise SystemExit("expected ResourceConflictException from PublishVersion while InProgress")
except lam.exceptions.ResourceConflictException as e:
    assert "An update is in progress for resource" in str(e), e
lam.get_waiter("function_updated_v2").wait(FunctionName="sdk-deps",
                                           WaiterConfig={"Delay": 1, "MaxAttempts": 120})
versions_become(["$LATEST", "1", "2"])
latest = lam.get_function_configuration(FunctionName="sdk-deps")
v2 = lam.get_function_configuration(FunctionName="sdk-deps", Qualifier="2")
assert v2["CodeSha256"] == latest["CodeSha256"], (v2, latest)
r = lam.invoke(FunctionName="sdk-deps", Payload=b"{}")
body = json.loads(r["Payload"].read())
assert "FunctionError" in r and "markupsafe" in json.dumps(body), body
print("ok")
"#;

#[test]
fn boto3_sees_pending_then_active_and_its_waiters_work() {
    let Some((d, tmp)) = daemon("boto3_sees_pending_then_active") else {
        return;
    };
    let code = tmp.path().join("code");
    python_function(&code, "unused", REQS, "x");
    std::fs::write(code.join("main.py"), PY_HANDLER).unwrap();
    let Some(out) = common::boto3(
        "boto3_sees_pending_then_active",
        &d,
        BOTO3,
        &[code.to_str().unwrap()],
    ) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_package_json_dependencies_are_installed_with_npm_ci() {
    let Some((d, tmp)) = daemon("node_package_json_dependencies") else {
        return;
    };
    if !Path::new("/usr/bin/npm").exists() {
        eprintln!("SKIP node_package_json_dependencies: npm is not installed");
        return;
    }
    let index = build_index("node_package_json_dependencies").unwrap();
    let f = tmp.path().join("node");
    std::fs::create_dir_all(&f).unwrap();
    std::fs::write(
        f.join("spore.toml"),
        "name = \"node-deps\"\nruntime = \"node20\"\nhandler = \"index.handler\"\n",
    )
    .unwrap();
    std::fs::write(
        f.join("index.js"),
        "const semver = require('semver'); const ms = require('ms');\n\
         exports.handler = async () => ({ ok: semver.satisfies('1.2.3', '^1.0.0'), ms: ms('2h'), where: require.resolve('ms') });\n",
    )
    .unwrap();
    std::fs::write(
        f.join("package.json"),
        r#"{"name":"node-deps","version":"1.0.0","dependencies":{"semver":"7.6.3","ms":"2.1.3"}}"#,
    )
    .unwrap();
    // Without the lock file the deploy is refused with the reason.
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(!ok && err.contains("package-lock.json"), "{err}");
    // The lock file, made offline from the index's cache (on a copy: npm writes to it).
    let cache = tmp.path().join("npm-cache");
    let cp = std::process::Command::new("cp")
        .arg("-R")
        .arg(index.join("npm"))
        .arg(&cache)
        .status()
        .unwrap();
    assert!(cp.success());
    let lock = std::process::Command::new("npm")
        .args([
            "install",
            "--package-lock-only",
            "--offline",
            "--no-audit",
            "--no-fund",
            "--cache",
        ])
        .arg(&cache)
        .current_dir(&f)
        .output()
        .unwrap();
    assert!(
        lock.status.success(),
        "{}",
        String::from_utf8_lossy(&lock.stderr)
    );
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(ok, "{err}");
    let (is_err, _, body) = d.invoke("node-deps", json!({}));
    assert!(!is_err, "{body}");
    assert_eq!(
        body,
        json!({"ok": true, "ms": 7_200_000, "where": "/opt/spore/deps/node_modules/ms/index.js"})
    );
}

/// A local requirement whose in-tree build backend reports where it runs, then fails (so
/// that pip shows its output).
const PROBE_BACKEND: &str = r#"
import os
def _probe(*_a, **_k):
    ns = {n: os.readlink("/proc/self/ns/" + n) for n in ("net", "pid", "mnt", "user")}
    seccomp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]
    raise SystemExit("PROBE uid=%d net=%s pid=%s mnt=%s seccomp=%s" % (
        os.getuid(), ns["net"], ns["pid"], ns["mnt"], seccomp))
get_requires_for_build_wheel = _probe
build_wheel = _probe
"#;

#[test]
fn the_build_runs_as_an_unprivileged_uid_in_its_own_namespaces() {
    let Some((d, tmp)) = daemon("the_build_runs_unprivileged") else {
        return;
    };
    let f = tmp.path().join("probe");
    python_function(&f, "deps-probe", "/var/task/probe\n", "p");
    local_package(&f, "probe", PROBE_BACKEND);
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(!ok, "the probe fails the build on purpose");
    let line = err
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, p)| p.to_owned()))
        .unwrap_or_else(|| panic!("no probe output: {err}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            .to_owned()
    };
    let uid: u32 = field("uid").parse().unwrap();
    assert!(
        uid >= 200_000,
        "the build runs as an unprivileged uid: {line}"
    );
    for ns in ["net", "pid", "mnt"] {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(field(ns), host.to_string_lossy(), "{ns} namespace: {line}");
    }
    assert_eq!(
        field("seccomp"),
        "2",
        "a seccomp filter is installed: {line}"
    );
    assert!(layers(&d).is_empty(), "a failed build leaves no layer");
}

/// cfork templates and snapshots start with the layer, and a new layer (other requirements)
/// replaces them: the layer is part of what makes them valid.
#[test]
fn cfork_templates_and_snapshots_carry_the_layer_and_a_new_layer_replaces_them() {
    let Some((d, tmp)) = daemon("cfork_templates_and_snapshots_carry_the_layer") else {
        return;
    };
    let handler = "import six\ntry:\n    import markupsafe\n    MS = markupsafe.__version__\nexcept ImportError:\n    MS = None\ndef handler(e, c):\n    return {'six': six.__version__, 'markupsafe': MS}\n";
    for (name, extra) in [
        ("deps-fork", "sandbox = \"cfork\"\n"),
        ("deps-snap", "snapshot = true\n"),
    ] {
        let f = tmp.path().join(name);
        std::fs::create_dir_all(&f).unwrap();
        std::fs::write(
            f.join("spore.toml"),
            format!("name = \"{name}\"\nhandler = \"main.handler\"\n{extra}"),
        )
        .unwrap();
        std::fs::write(f.join("main.py"), handler).unwrap();
        std::fs::write(f.join("requirements.txt"), "six==1.17.0\n").unwrap();
        let (ok, _, err, _) = deploy(&d, &f);
        assert!(ok, "{err}");
        let how = if name == "deps-fork" {
            "fork"
        } else {
            "restore"
        };
        // The first start makes the template or the snapshot; the next is served by it.
        let _ = d.invoke_start(name, "init", &json!({}), &[]);
        let (start, body) = d.invoke_start(name, how, &json!({}), &[]);
        assert_eq!(start, how, "{name}");
        assert_eq!(body, json!({"six": "1.17.0", "markupsafe": null}), "{name}");
        // Other requirements: a new layer, a new revision, and a template or snapshot of it.
        std::fs::write(
            f.join("requirements.txt"),
            "six==1.17.0\nMarkupSafe==3.0.2\n",
        )
        .unwrap();
        let (ok, _, err, _) = deploy(&d, &f);
        assert!(ok, "{err}");
        let _ = d.invoke_start(name, "init", &json!({}), &[]);
        let (start, body) = d.invoke_start(name, how, &json!({}), &[]);
        assert_eq!(start, how, "{name}");
        assert_eq!(
            body,
            json!({"six": "1.17.0", "markupsafe": "3.0.2"}),
            "{name}"
        );
    }
}

/// A build that runs past its time limit is stopped, and the function says why.
#[test]
fn a_build_past_its_time_limit_is_stopped_with_the_reason() {
    if !can_sandbox("a_build_past_its_time_limit_is_stopped") {
        return;
    }
    let Some(index) = build_index("a_build_past_its_time_limit_is_stopped") else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("spore-deps-")
        .tempdir()
        .unwrap();
    let mut d = Daemon::start_at(
        &tmp.path().join("data"),
        &[
            "--build-index-dir",
            index.to_str().unwrap(),
            "--build-timeout-s",
            "2",
        ],
    );
    let f = tmp.path().join("slow");
    python_function(&f, "deps-slow", "/var/task/slow\n", "s");
    local_package(
        &f,
        "slow",
        "import time\ndef get_requires_for_build_wheel(*a, **k):\n    time.sleep(600)\n",
    );
    let t = Instant::now();
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(!ok);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "stopped at its limit"
    );
    assert!(
        err.contains("The dependency build ran past its limit of 2 s and was stopped"),
        "{err}"
    );
    let conf = d.get_json("/2015-03-31/functions/deps-slow/configuration");
    assert_eq!(conf["State"], "Failed", "{conf}");
    assert!(layers(&d).is_empty());
    // Nothing of the killed build is left: cgroups, mounts, processes.
    d.stop();
}

/// Without an offline index a build gets network egress in a network namespace of its own,
/// as an egress function does, never the host's. The probe needs no network: its
/// requirement is a folder inside the function.
#[test]
fn without_an_index_the_build_has_egress_in_its_own_network_namespace() {
    if !can_sandbox("without_an_index_the_build_has_egress_in_its_own_network_namespace") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("spore-deps-")
        .tempdir()
        .unwrap();
    let d = Daemon::start_at(&tmp.path().join("data"), &[]);
    let f = tmp.path().join("probe");
    python_function(&f, "deps-probe-net", "/var/task/probe\n", "p");
    local_package(&f, "probe", PROBE_BACKEND);
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(!ok, "the probe fails the build on purpose");
    let line = err
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, p)| p.to_owned()))
        .unwrap_or_else(|| panic!("no probe output: {err}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_owned()
    };
    let host = |ns: &str| {
        std::fs::read_link(format!("/proc/self/ns/{ns}"))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_ne!(field("net"), host("net"), "{line}");
    assert_ne!(field("pid"), host("pid"), "{line}");
    assert_ne!(field("mnt"), host("mnt"), "{line}");
    assert!(field("uid").parse::<u32>().unwrap() >= 200_000, "{line}");
}

/// Only a key that may manage functions may start a build or force a delete: an invoke-only
/// key is refused before either header is read.
#[test]
fn an_invoke_only_key_can_neither_build_nor_force_a_delete() {
    let Some((d, tmp)) = daemon("an_invoke_only_key_can_neither_build_nor_force_a_delete") else {
        return;
    };
    let f = tmp.path().join("mine");
    python_function(&f, "deps-mine", "six==1.17.0\n", "m");
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(ok, "{err}");
    let out = d.cli(&[
        "keys",
        "create",
        "ci",
        "--invoke-only",
        "--functions",
        "deps-*",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let creds = spore_auth::credentials::parse_profile(&text, "ci").expect(&text);
    let ci = spore_client::Http::new(Duration::from_secs(60), Some(creds)).unwrap();
    let zip = spore_registry::code::zip_dir(&f).unwrap();
    use base64::Engine as _;
    let r = ci
        .put(d.url("/2015-03-31/functions/deps-mine/code"))
        .header("x-spore-build", "build")
        .json(&json!({"ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip)}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(common::error_type(&r), "AccessDeniedException");
    let r = ci
        .delete(d.url("/2015-03-31/functions/deps-mine"))
        .header("x-spore-force", "true")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // It may still invoke.
    let r = ci
        .post(d.url("/2015-03-31/functions/deps-mine/invocations"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Total bytes of the files under `dir`, mounts inside it included (a build's output tmpfs
/// sits beside its staging directory); entries that vanish meanwhile count nothing.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// A build that writes past `--build-max-mb` into its output directory fails with the limit
/// named, and the host never holds more than the limit meanwhile: the output is a tmpfs of
/// that size, not the host's disk.
#[test]
fn a_build_writing_past_the_output_limit_fails_and_never_holds_more_than_it() {
    let test = "a_build_writing_past_the_output_limit_fails";
    if !can_sandbox(test) {
        return;
    }
    let Some(index) = build_index(test) else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("spore-deps-")
        .tempdir()
        .unwrap();
    let mut d = Daemon::start_at(
        &tmp.path().join("data"),
        &[
            "--build-index-dir",
            index.to_str().unwrap(),
            "--build-max-mb",
            "16",
        ],
    );
    let f = tmp.path().join("fill");
    python_function(&f, "deps-fill", "/var/task/fill\n", "f");
    // 64 MiB, four times the limit, straight into the output directory.
    local_package(
        &f,
        "fill",
        "def get_requires_for_build_wheel(*a, **k):\n    with open('/opt/spore/build/fill', 'wb') as out:\n        for _ in range(64):\n            out.write(b'\\0' * (1 << 20))\n            out.flush()\n    return []\n",
    );
    // Watch the data dir's layers while the build runs (bounded in time).
    let deps_dir = d.data.join("deps");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut most, start) = (0u64, Instant::now());
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(180)
            {
                most = most.max(bytes_under(&deps_dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        })
    };
    let (ok, _, err, took) = deploy(&d, &f);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watcher.join().unwrap();
    assert!(!ok, "{err}");
    assert!(
        err.contains("output reached the limit of 16 MiB (spore serve --build-max-mb)"),
        "{err}"
    );
    assert!(
        most <= 16 << 20,
        "the host held {most} bytes of a build limited to 16 MiB"
    );
    assert_eq!(bytes_under(&d.data.join("deps")), 0);
    assert!(layers(&d).is_empty());
    let conf = d.get_json("/2015-03-31/functions/deps-fill/configuration");
    assert_eq!(conf["State"], "Failed", "{conf}");
    eprintln!(
        "a build writing 64 MiB under a 16 MiB limit: failed in {:.0} ms, the host held at most {} KiB",
        took.as_secs_f64() * 1e3,
        most >> 10
    );
    // No output tmpfs is left mounted (the harness checks the data dir's mounts).
    d.stop();
}

/// A local package whose build backend writes beside its sources, as setuptools does with
/// `*.egg-info`; `value` is what its module holds.
fn local_package_function(dir: &Path, name: &str, value: &str) {
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    std::fs::write(
        dir.join("spore.toml"),
        format!("name = \"{name}\"\nhandler = \"main.handler\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("main.py"),
        "import localmod\ndef handler(event, context):\n    return {'value': localmod.VALUE, 'file': localmod.__file__}\n",
    )
    .unwrap();
    std::fs::write(dir.join("requirements.txt"), "/var/task/pkg\n").unwrap();
    std::fs::write(
        dir.join("pkg/pyproject.toml"),
        "[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\".\"]\n\n[project]\nname = \"localpkg\"\nversion = \"1\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("pkg/localmod.py"), format!("VALUE = {value:?}\n")).unwrap();
    std::fs::write(
        dir.join("pkg/backend.py"),
        r#"import base64, hashlib, os, zipfile

def get_requires_for_build_wheel(config_settings=None):
    # As setuptools does: metadata written beside the sources.
    os.makedirs("localpkg.egg-info", exist_ok=True)
    with open("localpkg.egg-info/PKG-INFO", "w") as f:
        f.write("Name: localpkg\n")
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "localpkg-1-py3-none-any.whl"
    files = {
        "localmod.py": open("localmod.py", "rb").read(),
        "localpkg-1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: localpkg\nVersion: 1\n",
        "localpkg-1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record += f"{n},sha256={digest},{len(data)}\n"
        record += "localpkg-1.dist-info/RECORD,,\n"
        z.writestr("localpkg-1.dist-info/RECORD", record)
    return name
"#,
    )
    .unwrap();
}

/// Byte-identical requirements naming a local package: the layer covers the code package
/// too, so two functions with different `pkg/` get their own layers, and an update of
/// `pkg/` rebuilds. The package writes beside its sources at build (as `setup.py` builds
/// do), which works because the build runs in a writable copy of the code.
#[test]
fn local_packages_get_their_own_layers_and_build_in_a_writable_copy() {
    let Some((d, tmp)) = daemon("local_packages_get_their_own_layers") else {
        return;
    };
    let a = tmp.path().join("a");
    local_package_function(&a, "deps-local-a", "a");
    let (ok, _, err, _) = deploy(&d, &a);
    assert!(ok, "{err}");
    assert!(err.contains("Successfully installed localpkg"), "{err}");
    let b = tmp.path().join("b");
    local_package_function(&b, "deps-local-b", "b");
    let (ok, _, err, _) = deploy(&d, &b);
    assert!(ok, "{err}");
    assert!(
        err.contains("building the dependencies of deps-local-b"),
        "the same requirement text with another local package builds: {err}"
    );
    assert_eq!(layers(&d).len(), 2, "{:?}", layers(&d));
    for (name, value) in [("deps-local-a", "a"), ("deps-local-b", "b")] {
        let (is_err, _, body) = d.invoke(name, json!({}));
        assert!(!is_err, "{body}");
        assert_eq!(body["value"], value, "{body}");
        assert!(
            body["file"]
                .as_str()
                .unwrap()
                .starts_with("/opt/spore/deps/"),
            "{body}"
        );
    }
    // An update of the local package rebuilds, and the function imports the new code.
    let before = layers(&d);
    local_package_function(&a, "deps-local-a", "a2");
    let (ok, _, err, _) = deploy(&d, &a);
    assert!(ok, "{err}");
    assert!(
        err.contains("building the dependencies of deps-local-a"),
        "{err}"
    );
    let (is_err, _, body) = d.invoke("deps-local-a", json!({}));
    assert!(!is_err && body["value"] == "a2", "{body}");
    let after = layers(&d);
    assert_eq!(after.len(), 2, "the old layer of a went: {after:?}");
    assert_ne!(after, before);
}

/// The layer is keyed by the exact interpreter: a function naming the host's default
/// `python3` and one naming that interpreter's version (`python3.N`) share it, and a
/// redeploy that switches between the two builds nothing.
#[test]
fn the_default_python_and_its_named_version_share_a_layer() {
    let Some((d, tmp)) = daemon("the_default_python_and_its_named_version_share_a_layer") else {
        return;
    };
    let Some(minor) = spore_runtime::host_python_minor() else {
        eprintln!("SKIP: the host's python3 is not a python3.N link");
        return;
    };
    let a = tmp.path().join("a");
    python_function(&a, "deps-py-default", REQS, "d");
    let (ok, _, err, _) = deploy(&d, &a);
    assert!(ok, "{err}");
    let one = layers(&d);
    assert_eq!(one.len(), 1);
    let manifest = std::fs::read_to_string(a.join("spore.toml")).unwrap();
    std::fs::write(
        a.join("spore.toml"),
        format!("{manifest}runtime = \"python3.{minor}\"\n"),
    )
    .unwrap();
    let (ok, _, err, _) = deploy(&d, &a);
    assert!(ok, "{err}");
    assert!(!err.contains("building the dependencies"), "{err}");
    assert_eq!(layers(&d), one);
    let conf = d.get_json("/2015-03-31/functions/deps-py-default/configuration");
    assert_eq!(conf["Runtime"], format!("python3.{minor}"), "{conf}");
    assert_eq!(conf["State"], "Active", "{conf}");
    let (is_err, _, body) = d.invoke("deps-py-default", json!({}));
    assert!(!is_err && body["six"] == "1.17.0", "{body}");
}

/// A `file:` dependency of a Node.js function is its own code: the build works in a copy of
/// the function's folder, and the linked folder lands in the layer as files.
#[test]
fn a_node_file_dependency_builds_from_the_functions_folder() {
    let Some((d, tmp)) = daemon("a_node_file_dependency_builds") else {
        return;
    };
    if !Path::new("/usr/bin/npm").exists() {
        eprintln!("SKIP a_node_file_dependency_builds: npm is not installed");
        return;
    }
    let f = tmp.path().join("nodelocal");
    std::fs::create_dir_all(f.join("localdep")).unwrap();
    std::fs::write(
        f.join("spore.toml"),
        "name = \"node-local\"\nruntime = \"node20\"\nhandler = \"index.handler\"\n",
    )
    .unwrap();
    std::fs::write(
        f.join("index.js"),
        "exports.handler = async () => ({ value: require('localdep'), where: require.resolve('localdep') });\n",
    )
    .unwrap();
    std::fs::write(
        f.join("localdep/package.json"),
        r#"{"name":"localdep","version":"1.0.0","main":"index.js"}"#,
    )
    .unwrap();
    std::fs::write(f.join("localdep/index.js"), "module.exports = 'L1';\n").unwrap();
    std::fs::write(
        f.join("package.json"),
        r#"{"name":"node-local","version":"1.0.0","dependencies":{"localdep":"file:./localdep"}}"#,
    )
    .unwrap();
    std::fs::write(
        f.join("package-lock.json"),
        r#"{"name":"node-local","version":"1.0.0","lockfileVersion":3,"requires":true,"packages":{"":{"name":"node-local","version":"1.0.0","dependencies":{"localdep":"file:./localdep"}},"localdep":{"version":"1.0.0"},"node_modules/localdep":{"resolved":"localdep","link":true}}}"#,
    )
    .unwrap();
    let (ok, _, err, _) = deploy(&d, &f);
    assert!(ok, "{err}");
    // The folder has no node_modules of its own: the layer answers.
    let (is_err, _, body) = d.invoke("node-local", json!({}));
    assert!(!is_err, "{body}");
    assert_eq!(body["value"], "L1", "{body}");
    assert!(
        body["where"]
            .as_str()
            .unwrap()
            .starts_with("/opt/spore/deps/node_modules/localdep/"),
        "{body}"
    );
    let layer = d.data.join("deps").join(&layers(&d)[0]);
    let dep = layer.join("node_modules/localdep");
    assert!(
        std::fs::symlink_metadata(&dep).unwrap().is_dir(),
        "a folder in the layer, not a link"
    );
}

/// A daemon stopped while a build runs leaves no output tmpfs mounted (the harness checks the
/// data dir's mounts, cgroups and processes when it stops).
#[test]
fn a_daemon_stopped_during_a_build_leaves_no_mount() {
    let test = "a_daemon_stopped_during_a_build_leaves_no_mount";
    let Some((mut d, tmp)) = daemon(test) else {
        return;
    };
    let f = tmp.path().join("slow");
    python_function(&f, "deps-stopped", "/var/task/slow\n", "s");
    local_package(&f, "slow", "import time\ndef get_requires_for_build_wheel(*a, **k):\n    open('/opt/spore/build/started', 'w').close()\n    time.sleep(600)\n");
    let resp = d.create(&f);
    assert!(resp.status().is_success(), "{}", resp.text().unwrap());
    // Wait (bounded) until the build writes into its tmpfs.
    let deps = d.data.join("deps");
    let start = Instant::now();
    let started = loop {
        let found = std::fs::read_dir(&deps).ok().and_then(|r| {
            r.flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".tmpfs") && p.join("started").exists())
        });
        if found.is_some() || start.elapsed() > Duration::from_secs(60) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        started.is_some(),
        "the build did not start: {}",
        d.log_text()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.contains(".tmpfs"),
        "the output is a mount while the build runs"
    );
    d.stop();
    assert!(
        std::fs::read_dir(&deps)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".tmpfs")),
        "the output tmpfs's mount point is removed"
    );
}
