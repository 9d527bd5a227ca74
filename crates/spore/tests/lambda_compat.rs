//! What Spore cannot honour of the Lambda API is refused by name, never dropped: qualifiers
//! that name a version or alias the function does not have (a qualified delete must not
//! delete the function), and create or update parameters it would ignore.

mod common;

use common::{can_sandbox, error_type, fixture, Daemon};
use serde_json::json;

#[test]
fn unknown_qualifiers_are_not_found_and_never_delete() {
    if !can_sandbox("unknown_qualifiers_are_not_found_and_never_delete") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("echo"));
    let invoke = |path: &str| d.http.post(d.url(path)).body("{}").send().unwrap();
    for path in [
        "/2015-03-31/functions/echo/invocations?Qualifier=1",
        "/2015-03-31/functions/echo:live/invocations",
        "/2015-03-31/functions/arn:aws:lambda:local:000000000000:function:echo:live/invocations",
    ] {
        let r = invoke(path);
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(error_type(&r), "ResourceNotFoundException");
    }
    // An ARN of another region or account names nothing this daemon has.
    for path in [
        "/2015-03-31/functions/arn:aws:lambda:us-east-1:000000000000:function:echo/invocations",
        "/2015-03-31/functions/arn:aws:lambda:local:123456789012:function:echo/invocations",
        "/2015-03-31/functions/123456789012:function:echo/invocations",
    ] {
        let r = invoke(path);
        assert_eq!(r.status(), 400, "{path}");
        assert_eq!(error_type(&r), "InvalidParameterValueException");
        assert!(
            r.text().unwrap().contains("this Spore daemon serves"),
            "{path}"
        );
    }
    assert_eq!(
        invoke("/2015-03-31/functions/echo/invocations?Qualifier=%24LATEST").status(),
        200
    );
    let r = d
        .http
        .get(d.url("/2015-03-31/functions/echo?Qualifier=1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    // A qualified delete deletes nothing.
    let r = d
        .http
        .delete(d.url("/2015-03-31/functions/echo?Qualifier=1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = d
        .http
        .delete(d.url("/2015-03-31/functions/echo?Qualifier=%24LATEST"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        d.http
            .get(d.url("/2015-03-31/functions/echo"))
            .send()
            .unwrap()
            .status(),
        200,
        "the function survived the qualified deletes"
    );
    d.stop();
}

#[test]
fn parameters_spore_cannot_honour_are_refused_by_name() {
    if !can_sandbox("parameters_spore_cannot_honour_are_refused_by_name") {
        return;
    }
    let mut d = Daemon::start();
    use base64::Engine as _;
    let zip = base64::engine::general_purpose::STANDARD
        .encode(spore_registry::code::zip_dir(&fixture("echo")).unwrap());
    let create = |name: &str, extra: serde_json::Value| {
        let mut body = json!({
            "FunctionName": name, "Runtime": "python3.11", "Handler": "main.handler",
            "Role": "arn:aws:iam::1:role/r", "Code": {"ZipFile": zip},
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        d.http
            .post(d.url("/2015-03-31/functions"))
            .json(&body)
            .send()
            .unwrap()
    };
    for (key, extra) in [
        (
            "Layers",
            json!({"Layers": ["arn:aws:lambda:us-east-1:1:layer:x:1"]}),
        ),
        (
            "Architectures",
            json!({"Architectures": [if cfg!(target_arch = "aarch64") { "x86_64" } else { "arm64" }]}),
        ),
        (
            "EphemeralStorage",
            json!({"EphemeralStorage": {"Size": 20480}}),
        ),
        ("NoSuchParameter", json!({"NoSuchParameter": 1})),
    ] {
        let r = create("refused", extra);
        assert_eq!(r.status(), 400, "{key}");
        assert_eq!(error_type(&r), "InvalidParameterValueException");
        assert!(r.text().unwrap().contains(key), "{key}");
    }
    // What deploy tools send by default is accepted.
    let r = create(
        "defaults",
        json!({"Architectures": [if cfg!(target_arch = "aarch64") { "arm64" } else { "x86_64" }],
               "TracingConfig": {"Mode": "PassThrough"}, "EphemeralStorage": {"Size": 512},
               "Layers": [], "Publish": false}),
    );
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    d.stop();
}

const BOTO3: &str = r#"
import sys, boto3, botocore
lam = boto3.client("lambda", endpoint_url=sys.argv[1], region_name="us-east-1",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
try:
    lam.delete_function(FunctionName="echo", Qualifier="1")
    raise SystemExit("expected ResourceNotFoundException")
except lam.exceptions.ResourceNotFoundException:
    pass
assert lam.get_function(FunctionName="echo")["Configuration"]["FunctionName"] == "echo"
print("boto3 qualifiers OK")
"#;

#[test]
fn boto3_qualified_delete_keeps_the_function() {
    if !can_sandbox("boto3_qualified_delete_keeps_the_function") {
        return;
    }
    let mut d = Daemon::start();
    d.deploy(&fixture("echo"));
    let Some(out) = common::boto3("boto3_qualified_delete_keeps_the_function", &d, BOTO3, &[])
    else {
        d.stop();
        return;
    };
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("qualifiers OK"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}
