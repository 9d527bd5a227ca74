//! Network egress: a function with `network = "egress"` reaches a stand-in for the internet (a
//! network namespace this test makes, with an HTTP server in it) and nothing of the host's,
//! no link-local or metadata address and no other sandbox; a `none` function reaches nothing.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_sandbox, Daemon};
use serde_json::{json, Value};

const PROBE: &str = r#"
import json, os, socket, threading, urllib.request

_listener = None

def _own_addr():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.123", 9))
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()

def _gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
    return None

def _serve(sock):
    while True:
        c, _ = sock.accept()
        c.close()

def handler(event, context):
    global _listener
    out = {"addr": _own_addr(), "gateway": _gateway()}
    if event.get("listen") and _listener is None:
        _listener = socket.socket()
        _listener.bind(("0.0.0.0", 0))
        _listener.listen(8)
        threading.Thread(target=_serve, args=(_listener,), daemon=True).start()
    if _listener is not None:
        out["port"] = _listener.getsockname()[1]
    try:
        out["resolv"] = open("/etc/resolv.conf").read()
    except OSError as e:
        out["resolv"] = type(e).__name__
    if event.get("url"):
        try:
            out["http"] = urllib.request.urlopen(event["url"], timeout=3).read().decode()
        except Exception as e:
            out["http"] = type(e).__name__ + ": " + str(e)
    conn = {}
    for host, port in event.get("targets", []):
        if host is None:
            continue
        s = socket.socket()
        s.settimeout(1.5)
        try:
            s.connect((host, int(port)))
            conn["%s:%s" % (host, port)] = "CONNECTED"
        except OSError as e:
            conn["%s:%s" % (host, port)] = type(e).__name__
        finally:
            s.close()
    out["connect"] = conn
    return out
"#;

/// A network namespace standing in for the internet: a veth pair to the host (`.1` on the
/// host, `.2` inside, a /30 of 10.215.0.0/16) and an HTTP server inside on port 8080.
struct Internet {
    name: String,
    host_if: String,
    ns_ip: String,
    server: Option<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Internet {
    fn new() -> Internet {
        // Unique per test process and per test in it (they run in parallel).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("spore-inet-{pid}-{k}");
        let host_if = format!("sih{}x{k}", pid % 1_000_000);
        let octet = (pid + k) % 63 * 4;
        let third = (pid / 63 + k) % 250;
        let (host_ip, ns_ip) = (
            format!("10.215.{third}.{}", octet + 1),
            format!("10.215.{third}.{}", octet + 2),
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &host_if])
            .stderr(Stdio::null())
            .status();
        let mut inet = Internet {
            name: name.clone(),
            host_if: host_if.clone(),
            ns_ip: ns_ip.clone(),
            server: None,
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let www = tempfile::tempdir().unwrap().keep();
        std::fs::write(www.join("index.html"), "hello from the internet").unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "python3",
                "-m",
                "http.server",
                "8080",
            ])
            .arg("--bind")
            .arg(&ns_ip)
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        inet.server = Some(server);
        // Up within 10 s (checked from the host, which has the route).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(
            &format!("{ns_ip}:8080").parse().unwrap(),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the test's HTTP server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        inet
    }

    fn url(&self) -> String {
        format!("http://{}:8080/index.html", self.ns_ip)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn tools(test: &str) -> bool {
    if !can_sandbox(test) {
        return false;
    }
    for tool in ["nft", "ip", "nsenter"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
                panic!("{test}: `{tool}` is not installed (scripts/setup.sh installs it)");
            }
            eprintln!("SKIP {test}: `{tool}` is not installed (scripts/setup.sh installs it)");
            return false;
        }
    }
    true
}

/// A function folder named `name` with the probe handler and these extra manifest lines.
fn probe_dir(name: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.py"), PROBE).unwrap();
    std::fs::write(
        dir.path().join("spore.toml"),
        format!("name = \"{name}\"\nhandler = \"main.handler\"\ntimeout_s = 30\nmemory_mb = 128\n{extra}\n"),
    )
    .unwrap();
    dir
}

fn call(d: &Daemon, name: &str, how: Option<&str>, event: &Value) -> (String, Value) {
    let headers: Vec<(&str, &str)> = how.map(|h| ("X-Spore-Cold", h)).into_iter().collect();
    let r = d.invoke_raw(name, event.to_string().as_bytes(), &headers);
    let (status, failed) = (
        r.status(),
        r.headers().get("x-amz-function-error").is_some(),
    );
    if status != 200 || failed {
        panic!(
            "invoke {name}: {status}: {}\n{}",
            r.text().unwrap_or_default(),
            d.log_text()
        );
    }
    let start = r
        .headers()
        .get("x-spore-start")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = r.json().unwrap();
    (start, body)
}

/// The host's addresses (IPv4, every interface).
fn host_addrs() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "inet")?;
            w.next()?.split('/').next().map(str::to_owned)
        })
        .collect()
}

/// Creates a function from `dir` under `name` with these tags.
fn create_tagged(
    d: &Daemon,
    dir: &Path,
    name: &str,
    tags: &[(&str, &str)],
) -> reqwest::blocking::Response {
    use base64::Engine;
    let zip = spore_registry::code::zip_dir(dir).unwrap();
    let tags: serde_json::Map<String, Value> = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    d.http
        .post(d.url("/2015-03-31/functions"))
        .json(&json!({
            "FunctionName": name, "Runtime": "python3.11", "Handler": "main.handler",
            "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip) },
            "Tags": tags,
        }))
        .send()
        .unwrap()
}

fn data_tag(data: &Path) -> String {
    spore_pool_tag(data)
}

/// The 5 hex digits the daemon names its bridge (`spb…`) and table (`spore_…`) after.
fn spore_pool_tag(data: &Path) -> String {
    use sha2::Digest;
    let canon = data.canonicalize().unwrap();
    let sum = sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes());
    sum.iter()
        .take(3)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..5]
        .to_owned()
}

fn table_exists(tag: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", &format!("spore_{tag}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn egress_reaches_the_internet_but_not_the_host_or_other_sandboxes() {
    if !tools("egress_reaches_the_internet_but_not_the_host_or_other_sandboxes") {
        return;
    }
    let inet = Internet::new();
    let mut d = Daemon::start();
    let tag = data_tag(&d.data);
    assert!(table_exists(&tag), "the daemon's nft table is missing");
    assert!(PathBuf::from(format!("/sys/class/net/spb{tag}")).exists());

    let egress = probe_dir("out", "");
    d.deploy(egress.path());
    let none = probe_dir("closed", "network = \"none\"");
    d.deploy(none.path());
    let other = probe_dir("other", "network = \"egress\"");
    d.deploy(other.path());
    let snap = probe_dir("snapout", "snapshot = true");
    d.deploy(snap.path());
    let fork = probe_dir("forkout", "sandbox = \"cfork\"");
    d.deploy(fork.path());

    // Another sandbox, listening on its own address (its instance stays warm).
    let (_, o) = call(&d, "other", None, &json!({"listen": true}));
    let (o_addr, o_port) = (o["addr"].as_str().unwrap().to_owned(), o["port"].clone());
    let (_, self_check) = call(&d, "other", None, &json!({"targets": [[o_addr, o_port]]}));
    assert_eq!(
        self_check["connect"][format!("{o_addr}:{o_port}")],
        "CONNECTED",
        "the other sandbox's listener is not up: {self_check}"
    );

    // Listeners on every host address (0.0.0.0), the API port, metadata, the other sandbox.
    let host = TcpListener::bind("0.0.0.0:0").unwrap();
    let hport = host.local_addr().unwrap().port();
    let api_port: u16 = d.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let mut targets = vec![
        json!(["169.254.169.254", 80]),
        json!([o_addr, o_port]),
        json!(["127.0.0.1", hport]),
    ];
    for a in host_addrs() {
        targets.push(json!([a, hport]));
        targets.push(json!([a, api_port]));
    }
    let event = json!({"url": inet.url(), "targets": targets});

    let check_egress = |what: &str, v: &Value| {
        assert_eq!(
            v["http"], "hello from the internet",
            "{what}: no egress: {v}"
        );
        assert!(
            v["resolv"].as_str().unwrap_or("").contains("nameserver")
                || !std::fs::read_to_string("/etc/resolv.conf")
                    .unwrap_or_default()
                    .contains("nameserver"),
            "{what}: no resolver: {v}"
        );
        for (t, r) in v["connect"].as_object().unwrap() {
            // 127.0.0.1 is the sandbox's own loopback: refused there, not the host's.
            assert_ne!(r, "CONNECTED", "{what} reached {t}: {v}");
        }
    };
    let (_, v) = call(&d, "out", None, &event);
    check_egress("container", &v);
    let gw = v["gateway"].as_str().unwrap().to_owned();
    let (_, v) = call(&d, "out", None, &json!({"targets": [[gw, hport]]}));
    assert_ne!(v["connect"][format!("{gw}:{hport}")], "CONNECTED", "{v}");

    let (start, v) = call(&d, "forkout", None, &event);
    check_egress(&format!("cfork ({start})"), &v);
    let (start, v) = call(&d, "forkout", Some("1"), &event);
    assert_eq!(start, "fork");
    check_egress("cfork, second fork", &v);

    call(&d, "snapout", Some("1"), &json!({}));
    let (start, v) = call(&d, "snapout", Some("restore"), &event);
    assert_eq!(start, "restore");
    check_egress("restored", &v);

    let (_, v) = call(&d, "closed", None, &event);
    assert!(
        v["http"].as_str().unwrap().starts_with("URLError"),
        "a none function fetched: {v}"
    );
    assert_eq!(
        v["addr"],
        Value::Null,
        "a none function has an address: {v}"
    );

    drop(host);
    d.stop();
    assert!(!table_exists(&tag), "the nft table outlived the daemon");
    assert!(
        !PathBuf::from(format!("/sys/class/net/spb{tag}")).exists(),
        "the bridge outlived the daemon"
    );
}

#[test]
fn default_network_none_and_a_bad_subnet_are_handled() {
    if !tools("default_network_none_and_a_bad_subnet_are_handled") {
        return;
    }
    let inet = Internet::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_at(&tmp.path().join("data"), &["--default-network", "none"]);
    let plain = probe_dir("plain", "");
    d.deploy(plain.path());
    let (_, v) = call(&d, "plain", None, &json!({"url": inet.url()}));
    assert!(v["http"].as_str().unwrap().starts_with("URLError"), "{v}");
    // The tag turns egress on for one function.
    let r = create_tagged(&d, plain.path(), "tagged", &[("spore:network", "egress")]);
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    let (_, v) = call(&d, "tagged", None, &json!({"url": inet.url()}));
    assert_eq!(v["http"], "hello from the internet", "{v}");
    let r = create_tagged(&d, plain.path(), "badtag", &[("spore:network", "vpc")]);
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("spore:network"));
    d.stop();

    // A subnet overlapping a host route (the stand-in internet's) is refused by name.
    let out = Command::new(env!("CARGO_BIN_EXE_spore"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data2"))
        .args(["--egress-subnet", "10.215.0.0/16"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("overlaps the host route"), "{err}");
}
