//! Lambda layers through boto3: published, listed, used by functions (in a container, forked
//! from a cfork template, restored from a snapshot), later layers overriding earlier ones,
//! refused when missing or too many, and kept by functions after the version is deleted.

mod common;

use common::{boto3, can_sandbox, Daemon};
use serde_json::json;

const SETUP: &str = r##"
import io, json, sys, zipfile
import boto3, botocore

endpoint = sys.argv[1]
lam = boto3.client("lambda", endpoint_url=endpoint, region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))

def zipped(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, text in files.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = (0o755 if path.startswith("bin/") else 0o644) << 16
            z.writestr(info, text)
    return buf.getvalue()

a = lam.publish_layer_version(
    LayerName="base", Description="layer A", LicenseInfo="MIT", CompatibleRuntimes=["python3.11"],
    Content={"ZipFile": zipped({
        "python/shared.py": "WHO = 'A'\n",
        "python/only_a.py": "X = 'from A'\n",
        "python/lib/python3.11/site-packages/sitepkg.py": "Y = 'site'\n",
        "bin/layer-tool": "#!/bin/sh\necho tool\n",
    })})
assert a["Version"] == 1 and a["LayerVersionArn"].endswith(":layer:base:1"), a
assert a["Description"] == "layer A" and a["LicenseInfo"] == "MIT", a
assert a["CompatibleRuntimes"] == ["python3.11"] and a["Content"]["CodeSize"] > 0, a
b = lam.publish_layer_version(LayerName="over", Content={"ZipFile": zipped({"python/shared.py": "WHO = 'B'\n"})})
assert b["Version"] == 1, b

got = lam.get_layer_version(LayerName="base", VersionNumber=1)
assert got["LayerVersionArn"] == a["LayerVersionArn"] and got["LicenseInfo"] == "MIT", got
assert lam.get_layer_version_by_arn(Arn=a["LayerVersionArn"])["Version"] == 1
names = [l["LayerName"] for l in lam.list_layers()["Layers"]]
assert names == ["base", "over"], names
assert [l["LayerName"] for l in lam.list_layers(CompatibleRuntime="python3.11")["Layers"]] == ["base"]
a2 = lam.publish_layer_version(LayerName="base", Content={"ZipFile": zipped({"python/shared.py": "WHO = 'A2'\n"})})
assert a2["Version"] == 2
assert [v["Version"] for v in lam.list_layer_versions(LayerName="base")["LayerVersions"]] == [2, 1]
lam.delete_layer_version(LayerName="base", VersionNumber=2)
try:
    lam.get_layer_version(LayerName="base", VersionNumber=2)
    raise SystemExit("expected ResourceNotFoundException")
except lam.exceptions.ResourceNotFoundException:
    pass

handler = zipped({"main.py": '''
import os, subprocess
import shared, only_a, sitepkg
def handler(event, context):
    try:
        open("/opt/python/new.txt", "w")
        writable = True
    except OSError:
        writable = False
    return {"who": shared.WHO, "a": only_a.X, "site": sitepkg.Y, "opt_writable": writable,
            "tool": subprocess.run(["layer-tool"], capture_output=True, text=True).stdout.strip(),
            "ld": os.environ.get("LD_LIBRARY_PATH", "")}
'''})
layers = [a["LayerVersionArn"], b["LayerVersionArn"]]
for name, tags in [("lay-container", {}), ("lay-cfork", {"spore:sandbox": "cfork"}),
                   ("lay-snap", {"spore:snapshot": "true"})]:
    conf = lam.create_function(FunctionName=name, Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                               Handler="main.handler", Code={"ZipFile": handler}, Timeout=10,
                               Layers=layers, Tags=tags)
    assert [l["Arn"] for l in conf["Layers"]] == layers, conf
    got = lam.get_function(FunctionName=name)["Configuration"]["Layers"]
    assert [l["Arn"] for l in got] == layers and all(l["CodeSize"] > 0 for l in got), got

# A layer version that does not exist, or too many layers: refused with Lambda's error.
for bad in [[a["LayerVersionArn"][:-1] + "9"], [a["LayerVersionArn"]] * 6]:
    try:
        lam.create_function(FunctionName="lay-bad", Runtime="python3.11", Role="r", Handler="main.handler",
                            Code={"ZipFile": handler}, Layers=bad)
        raise SystemExit(f"expected InvalidParameterValueException for {bad}")
    except lam.exceptions.InvalidParameterValueException:
        pass
try:
    lam.update_function_configuration(FunctionName="lay-container", Layers=[a["LayerVersionArn"][:-1] + "9"])
    raise SystemExit("expected InvalidParameterValueException on update")
except lam.exceptions.InvalidParameterValueException:
    pass

def refused(says, fn, **kw):
    try:
        fn(**kw)
    except lam.exceptions.InvalidParameterValueException as e:
        msg = e.response["Error"]["Message"]
        assert says in msg and len(msg) < 400, (says, msg)
        return
    raise SystemExit(f"expected InvalidParameterValueException ({says}) from {kw}")

# The same layer version twice says so; a layer of another region or account, or a version
# not written canonically, names nothing here.
refused("given twice", lam.update_function_configuration, FunctionName="lay-container",
        Layers=[a["LayerVersionArn"]] * 2)
elsewhere = a["LayerVersionArn"].replace(":local:", ":us-east-1:")
for bad in [elsewhere, a["LayerVersionArn"].replace(":000000000000:", ":123456789012:")]:
    refused("this Spore daemon serves", lam.update_function_configuration, FunctionName="lay-container",
            Layers=[bad])
    refused("this Spore daemon serves", lam.get_layer_version_by_arn, Arn=bad)
refused("not a version number", lam.update_function_configuration, FunctionName="lay-container",
        Layers=[a["LayerVersionArn"][:-1] + "01"])
refused("this Spore daemon serves", lam.publish_layer_version, LayerName=elsewhere.rsplit(":", 1)[0],
        Content={"ZipFile": zipped({"x": "y"})})
# Lambda's limits of what a layer version says of itself.
small = {"ZipFile": zipped({"x": "y"})}
refused("Description", lam.publish_layer_version, LayerName="lim", Description="d" * 257, Content=small)
refused("LicenseInfo", lam.publish_layer_version, LayerName="lim", LicenseInfo="l" * 513, Content=small)
refused("CompatibleRuntimes", lam.publish_layer_version, LayerName="lim", Content=small,
        CompatibleRuntimes=["python3.11"] * 16)
refused("not a Lambda runtime name", lam.publish_layer_version, LayerName="lim", Content=small,
        CompatibleRuntimes=["cobol" * 100])
ok = lam.publish_layer_version(LayerName="lim", Description="d" * 256, LicenseInfo="l" * 512, Content=small,
                               CompatibleRuntimes=["python3.12", "nodejs20.x", "java21", "provided.al2023"])
assert ok["Version"] == 1, ok
lam.delete_layer_version(LayerName="lim", VersionNumber=1)
print("ok")
"##;

const REORDER: &str = r#"
import sys, boto3, botocore
lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
base = "arn:aws:lambda:local:000000000000:layer:"
conf = lam.update_function_configuration(FunctionName="lay-container", Layers=[base + "over:1", base + "base:1"])
assert [l["Arn"] for l in conf["Layers"]] == [base + "over:1", base + "base:1"], conf
lam.update_function_configuration(FunctionName="lay-snap", Layers=[base + "over:1", base + "base:1"])
# Deleting a version a function uses: the function keeps its copy.
lam.delete_layer_version(LayerName="base", VersionNumber=1)
lam.delete_layer_version(LayerName="over", VersionNumber=1)
assert lam.list_layers()["Layers"] == [], lam.list_layers()
print("ok")
"#;

#[test]
fn layers_are_mounted_in_order_for_container_cfork_and_restored_functions() {
    let test = "layers_are_mounted_in_order_for_container_cfork_and_restored_functions";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    let Some(out) = boto3(test, &d, SETUP, &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let expect = |v: &serde_json::Value, who: &str| {
        assert_eq!(v["who"], who, "{v}");
        assert_eq!(v["a"], "from A", "{v}");
        assert_eq!(v["site"], "site", "{v}");
        assert_eq!(v["tool"], "tool", "{v}");
        assert_eq!(v["opt_writable"], false, "{v}");
        // `/opt/lib` once, first (as Lambda's `LD_LIBRARY_PATH` has it).
        let ld = v["ld"].as_str().unwrap();
        assert!(ld.starts_with("/opt/lib:"), "{v}");
        assert_eq!(ld.matches("/opt/lib").count(), 1, "{v}");
    };
    let (_, _, v) = d.invoke("lay-container", json!({}));
    expect(&v, "B");
    let (start, v) = d.invoke_start("lay-cfork", "fork", &json!({}), &[]);
    assert_eq!(start, "fork");
    expect(&v, "B");
    // The first start takes the snapshot; the next is restored from it.
    d.invoke_start("lay-snap", "1", &json!({}), &[]);
    let (start, v) = d.invoke_start("lay-snap", "restore", &json!({}), &[]);
    assert_eq!(start, "restore");
    expect(&v, "B");

    let out = boto3(test, &d, REORDER, &[]).unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Reordered: base's shared.py now wins; the deleted versions' content is still there
    // for a fresh instance.
    let (start, v) = d.invoke_start("lay-container", "init", &json!({}), &[]);
    assert_eq!(start, "cold");
    expect(&v, "A");
    // The snapshot taken with the old layers is not restored: the next start imports again
    // (and snapshots), the one after restores the new snapshot.
    let (start, v) = d.invoke_start("lay-snap", "restore", &json!({}), &[]);
    assert_eq!(start, "cold");
    expect(&v, "A");
    let (start, v) = d.invoke_start("lay-snap", "restore", &json!({}), &[]);
    assert_eq!(start, "restore");
    expect(&v, "A");
    d.stop();
}

const TOO_LARGE: &str = r#"
import io, sys, zipfile, boto3, botocore
lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
def zipped(path, size):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(path, b"\0" * size)
        z.writestr("main.py", "def handler(e, c):\n    return 1\n")
    return buf.getvalue()
mib = 1 << 20
big = lam.publish_layer_version(LayerName="big", Content={"ZipFile": zipped("python/big.bin", 130 * mib)})
try:
    lam.create_function(FunctionName="toolarge", Runtime="python3.11", Role="r", Handler="main.handler",
                        Code={"ZipFile": zipped("big.bin", 130 * mib)}, Layers=[big["LayerVersionArn"]])
    raise SystemExit("expected InvalidParameterValueException")
except lam.exceptions.InvalidParameterValueException as e:
    assert "combined with layers" in str(e), e
# Nothing of the refused function is left; with small code the layer fits.
names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
assert "toolarge" not in names, names
lam.create_function(FunctionName="fits", Runtime="python3.11", Role="r", Handler="main.handler",
                    Code={"ZipFile": zipped("small.bin", 1)}, Layers=[big["LayerVersionArn"]])
print("ok")
"#;

#[test]
fn code_and_layers_over_250_mib_unzipped_are_refused() {
    let test = "code_and_layers_over_250_mib_unzipped_are_refused";
    if !can_sandbox(test) {
        return;
    }
    let mut d = Daemon::start();
    let Some(out) = boto3(test, &d, TOO_LARGE, &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.data.join("functions/toolarge").exists());
    d.stop();
}

const NODE: &str = r#"
import io, json, sys, zipfile, boto3, botocore
lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="local",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
def zipped(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p, t in files.items():
            z.writestr(p, t)
    return buf.getvalue()
layer = lam.publish_layer_version(LayerName="nodelib", CompatibleRuntimes=["nodejs20.x"], Content={"ZipFile": zipped(
    {"nodejs/node_modules/greet/index.js": "module.exports = (n) => 'hello ' + n;\n"})})
lam.create_function(FunctionName="node-layer", Runtime="nodejs20.x", Role="r", Handler="index.handler",
                    Layers=[layer["LayerVersionArn"]], Code={"ZipFile": zipped({"index.js":
                    "const greet = require('greet');\nexports.handler = async (e) => ({ msg: greet(e.name) });\n"})})
r = lam.invoke(FunctionName="node-layer", Payload=json.dumps({"name": "layer"}))
body = json.loads(r["Payload"].read())
assert "FunctionError" not in r and body == {"msg": "hello layer"}, body
print("ok")
"#;

#[test]
fn a_node_function_requires_a_module_from_its_layer() {
    let test = "a_node_function_requires_a_module_from_its_layer";
    if !can_sandbox(test) {
        return;
    }
    if !std::path::Path::new(spore_runtime::NODE_INTERPRETER).exists() {
        eprintln!("SKIP {test}: Node.js is not installed");
        return;
    }
    let mut d = Daemon::start();
    let Some(out) = boto3(test, &d, NODE, &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}
