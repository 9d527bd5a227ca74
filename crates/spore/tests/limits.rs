//! Limits that fail early and in Lambda's shape: an environment over 4 KB, a package with two
//! entries of one name, an oversize request, a result larger than a reply may be; a refused
//! create leaves nothing behind.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use base64::Engine as _;
use common::{can_sandbox, error_type, fixture, Daemon};
use serde_json::{json, Value};

fn create(d: &Daemon, name: &str, zip: &[u8], env: Value) -> reqwest::blocking::Response {
    d.http
        .post(d.url("/2015-03-31/functions"))
        .json(&json!({
            "FunctionName": name, "Runtime": "python3", "Handler": "main.handler",
            "Environment": {"Variables": env},
            "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(zip)},
        }))
        .send()
        .unwrap()
}

/// A zip holding `main.py` twice (Python's zipfile writes it, with a warning).
fn zip_with_duplicates() -> Vec<u8> {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import io, sys, zipfile\nb = io.BytesIO()\nz = zipfile.ZipFile(b, 'w')\nz.writestr('main.py', 'def handler(e, c): return 1\\n')\nz.writestr('main.py', 'def handler(e, c): return 2\\n')\nz.close()\nsys.stdout.buffer.write(b.getvalue())",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn refused_creates_say_why_and_leave_nothing_behind() {
    if !can_sandbox("refused_creates_say_why_and_leave_nothing_behind") {
        return;
    }
    let mut d = Daemon::start();
    let good = spore_registry::code::zip_dir(&fixture("echo")).unwrap();
    // An environment over Lambda's 4 KB.
    let r = create(&d, "bigenv", &good, json!({"BIG": "x".repeat(5 << 20)}));
    assert_eq!(r.status(), 400);
    assert_eq!(error_type(&r), "InvalidParameterValueException");
    assert!(r.text().unwrap().contains("4096"));
    // The same limit on an update of the configuration.
    assert_eq!(create(&d, "small", &good, json!({})).status(), 201);
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/small/configuration"))
        .json(&json!({"Environment": {"Variables": {"BIG": "x".repeat(5000)}}}))
        .send()
        .unwrap();
    assert_eq!(error_type(&r), "InvalidParameterValueException");
    // Two entries of one name.
    let r = create(&d, "dups", &zip_with_duplicates(), json!({}));
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("same path"));
    // A package that is not a zip, and one escaping its directory.
    let r = create(&d, "garbage", b"not a zip", json!({}));
    assert_eq!(error_type(&r), "InvalidParameterValueException");
    for name in ["bigenv", "dups", "garbage"] {
        assert!(
            !d.data.join("functions").join(name).exists(),
            "a refused create of {name} left its directory"
        );
    }
    // The daemon logs the refused packages.
    let log = d.log_text();
    assert!(
        log.contains("code package refused") && log.contains("dups"),
        "{log}"
    );
    d.stop();
}

#[test]
fn oversize_requests_and_results_get_lambdas_errors() {
    if !can_sandbox("oversize_requests_and_results_get_lambdas_errors") {
        return;
    }
    let mut d = Daemon::start();
    // A request over the API's limit is refused from its Content-Length, before its body is
    // read, in JSON (a raw client: it sends the head and reads the answer).
    let addr = d.endpoint.trim_start_matches("http://").to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /2015-03-31/functions/none/invocations HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        spore_gateway::MAX_BODY + 1
    )
    .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-amzn-errortype: requestentitytoolargeexception"),
        "{answer}"
    );
    assert!(answer.contains("\"message\""), "{answer}");
    assert!(
        d.log_text()
            .contains("request refused: its body is over the limit"),
        "the daemon logs the refusal"
    );
    // Results over 6 MB and over what any reply frame may carry.
    d.deploy(&fixture("bigresult"));
    for mb in [7, 100] {
        let r = d.invoke_raw("bigresult", json!({"mb": mb}).to_string().as_bytes(), &[]);
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        assert_eq!(
            v["errorType"], "Function.ResponseSizeTooLarge",
            "{mb} MiB: {v}"
        );
    }
    // The function keeps serving.
    let (err, _, v) = d.invoke("bigresult", json!({"mb": 0}));
    assert!(!err && v == json!(""), "{v}");
    d.stop();
}

fn folder(root: &std::path::Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("spore.toml"),
        format!("name = \"{name}\"\nhandler = \"main.handler\"\n"),
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), "def handler(e, c):\n    return e\n").unwrap();
    dir
}

/// `spore deploy` of a folder over the limits fails before sending anything, names the limit,
/// and never dies silently (the daemon never hears of it).
#[test]
fn oversized_folders_are_refused_by_the_cli_before_upload() {
    if !can_sandbox("oversized_folders_are_refused_by_the_cli_before_upload") {
        return;
    }
    let d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    // 60 MB that do not compress: over what a request can carry.
    let big = folder(tmp.path(), "big60");
    let mut data = vec![0u8; 60 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(big.join("blob.bin"), &data).unwrap();
    let out = d.cli(&["deploy", big.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is too large to deploy: it zips to 60.0 MiB"),
        "{err}"
    );
    assert!(err.contains("a deploy can carry"), "{err}");
    // 300 MB unpacked (a sparse file: the size is what counts).
    let huge = folder(tmp.path(), "huge300");
    std::fs::File::create(huge.join("big.bin"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let out = d.cli(&["deploy", huge.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "its files take 300.0 MiB, more than the 250.0 MiB a function's code may take unpacked"
        ),
        "{err}"
    );
    let log = d.log_text();
    assert!(
        !log.contains("big60") && !log.contains("huge300"),
        "nothing was sent: {log}"
    );
}

/// A symlink out of the function folder is refused by name; one inside is followed.
#[test]
fn symlinks_out_of_a_function_folder_are_refused_by_name() {
    if !can_sandbox("symlinks_out_of_a_function_folder_are_refused_by_name") {
        return;
    }
    let d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let f = folder(tmp.path(), "linky");
    std::fs::write(
        f.join("real.py"),
        "def handler(e, c):\n    return {'via': 'link'}\n",
    )
    .unwrap();
    std::fs::remove_file(f.join("main.py")).unwrap();
    std::os::unix::fs::symlink("real.py", f.join("main.py")).unwrap();
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (is_err, _, body) = d.invoke("linky", json!({}));
    assert!(!is_err && body == json!({"via": "link"}), "{body}");
    std::fs::write(tmp.path().join("outside.txt"), "secret").unwrap();
    std::os::unix::fs::symlink("../outside.txt", f.join("data.txt")).unwrap();
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("symlink data.txt points outside the function folder"),
        "{err}"
    );
}

/// A manifest naming a warm-up event file the package lacks is refused at deploy with the
/// path, and the daemon logs the refusal of a package.
#[test]
fn a_missing_warmup_event_file_is_refused_at_deploy() {
    if !can_sandbox("a_missing_warmup_event_file_is_refused_at_deploy") {
        return;
    }
    let d = Daemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let f = folder(tmp.path(), "warmless");
    std::fs::write(
        f.join("spore.toml"),
        "name = \"warmless\"\nhandler = \"main.handler\"\nsnapshot = true\nwarmup_event = \"events/warm.json\"\n",
    )
    .unwrap();
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("warmup_event \"events/warm.json\": the code package has no such file"),
        "{err}"
    );
    let r = d
        .http
        .get(d.url("/2015-03-31/functions/warmless"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "a refused create leaves nothing behind");
    std::fs::create_dir_all(f.join("events")).unwrap();
    std::fs::write(f.join("events/warm.json"), "{}").unwrap();
    let out = d.cli(&["deploy", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
