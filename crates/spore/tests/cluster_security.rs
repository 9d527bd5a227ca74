//! The link port under attack: peers without a certificate, forged greetings, a certificate
//! claiming another unit, a second link for a live unit, oversized greetings, a token of
//! another CA; units down past the grace period; etcd over TLS with client certificates and
//! user authentication. Shims run on loopback (no namespaces needed).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{can_sandbox, packages_dir, Daemon, Shim, BIN};
use serde_json::{json, Value};
use spore_cluster::pki::{self, ClusterCa, UnitCredentials};

impl Shim {
    /// Unit `id` on loopback, dialing `control`, joining with `token` if given.
    fn start(id: u32, control: &str, data: &Path, token: Option<&str>) -> Shim {
        std::fs::create_dir_all(data).unwrap();
        let log = data.with_extension("shim-log");
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["shim", "--id", &id.to_string(), "--control", control])
            .args(["--grace-s", "5", "--data-dir"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .env("RUST_LOG", "info")
            .env_remove("SPORE_JOIN_TOKEN");
        if let Some(t) = token {
            cmd.arg("--join").arg(t);
        }
        if let Some(p) = packages_dir() {
            cmd.arg("--packages-dir").arg(p);
        }
        Shim {
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }
}

/// A control plane taking links on loopback; returns it and its link address.
fn control_plane(data: &Path, extra: &[&str]) -> (Daemon, String) {
    let mut args = vec!["--link-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let d = Daemon::start_at(data, &args);
    let link = std::fs::read_to_string(d.data.join("run/link-endpoint"))
        .unwrap()
        .trim()
        .to_owned();
    (d, link)
}

fn token(d: &Daemon, extra: &[&str]) -> String {
    common::cluster(&[&["token"], extra].concat(), &d.data)
}

fn units(d: &Daemon) -> Vec<Value> {
    d.get_json("/spore/v1/units")["Units"]
        .as_array()
        .cloned()
        .unwrap()
}

fn unit_state(d: &Daemon, id: u64) -> Option<String> {
    units(d)
        .into_iter()
        .find(|u| u["id"] == id)
        .map(|u| u["state"].as_str().unwrap().to_owned())
}

/// A scratch dir for `test`, or None (with a SKIP line) where sandboxes cannot run.
fn scratch(test: &str) -> Option<tempfile::TempDir> {
    can_sandbox(test).then(|| {
        tempfile::Builder::new()
            .prefix("spore-sec-")
            .tempdir()
            .unwrap()
    })
}

/// A file's permission bits.
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Credentials for `unit` signed by `d`'s CA (as a join would give), stored under `dir`.
fn credentials(d: &Daemon, unit: u32, dir: &Path) -> UnitCredentials {
    let ca = ClusterCa::load(&d.data).unwrap();
    let (key, csr) = pki::unit_key(unit).unwrap();
    let cert = ca.sign_unit(unit, &csr).unwrap();
    UnitCredentials::store(dir, &key, &cert, ca.cert_pem()).unwrap()
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the control plane at `addr`, with `me` as client certificate (or
/// none), trusting the CA of `d`.
fn tls_client(d: &Daemon, addr: &str, me: Option<&UnitCredentials>) -> std::io::Result<Tls> {
    let ca = ClusterCa::load(&d.data).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match me {
        Some(c) => b
            .with_client_auth_cert(c.identity.chain.clone(), c.identity.key.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"spore-link/1".to_vec()];
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "control.spore".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xA7, kind, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn hello(unit: Value) -> Vec<u8> {
    frame(
        1,
        &serde_json::to_vec(&json!({
            "min_version": 1, "max_version": 1, "role": "shim", "unit": unit,
        }))
        .unwrap(),
    )
}

fn unit_json(id: u64) -> Value {
    json!({"id": id, "arch": "x86_64", "cores": 2, "memory_mb": 1024})
}

/// Sends a greeting and reads the first frame back: (kind, payload), or the error.
fn greet(s: &mut impl ReadWrite, greeting: &[u8]) -> std::io::Result<(u8, String)> {
    s.write_all(greeting)?;
    s.flush()?;
    let mut h = [0u8; 12];
    s.read_exact(&mut h)?;
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((h[1], String::from_utf8_lossy(&p).into_owned()))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[test]
fn peers_without_a_certificate_get_nothing_and_greetings_are_checked() {
    let Some(tmp) = scratch("peers_without_a_certificate_get_nothing_and_greetings_are_checked")
    else {
        return;
    };
    let (d, link) = control_plane(&tmp.path().join("d0"), &[]);
    // The CA was made on first start, private.
    assert_eq!(mode(&d.data.join("cluster")), 0o700);
    assert_eq!(mode(&d.data.join("cluster/ca-key.pem")), 0o600);

    // A shim with neither a token nor a certificate does not start.
    let out = Command::new(BIN)
        .args(["shim", "--id", "1", "--control", &link, "--data-dir"])
        .arg(tmp.path().join("d1"))
        .env_remove("SPORE_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no unit certificate") && err.contains("--join"),
        "{err}"
    );

    // A TLS client without a certificate: the handshake fails, nothing comes back.
    let r = tls_client(&d, &link, None).and_then(|mut s| greet(&mut s, &hello(unit_json(1))));
    assert!(r.is_err(), "a peer without a certificate got {r:?}");

    // A forged greeting over plain TCP (a raw client claiming 512 cores): not TLS, refused.
    let mut raw = TcpStream::connect(&link).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let forged = hello(json!({"id": 1, "arch": "x86_64", "cores": 512, "memory_mb": 1 << 20}));
    raw.write_all(&forged).unwrap();
    let mut back = Vec::new();
    let _ = raw.read_to_end(&mut back);
    assert!(
        !back.windows(4).any(|w| w == b"unit") && back.first() != Some(&0xA7),
        "a raw client got link frames back: {back:?}"
    );

    // A valid certificate for unit 1 claiming unit 2: refused, with the reason.
    let creds1 = credentials(&d, 1, &tmp.path().join("c1"));
    let mut s = tls_client(&d, &link, Some(&creds1)).unwrap();
    let (kind, why) = greet(&mut s, &hello(unit_json(2))).unwrap();
    assert_eq!(kind, 8, "expected a GoAway: {why}");
    assert!(
        why.contains("the greeting claims unit 2, but the certificate is unit 1's"),
        "{why}"
    );

    // Oversized or impossible greetings: refused before admission.
    for (unit, want) in [
        (
            json!({"id": 1, "arch": "x86_64", "cores": 2, "memory_mb": 1024, "hostname": "h".repeat(900_000)}),
            "a greeting of 900",
        ),
        (
            unit_json(4_000_000_000),
            "unit id 4000000000 is out of range",
        ),
        (
            json!({"id": 1, "arch": "x86_64", "cores": 2, "memory_mb": 1u64 << 50}),
            "greeting refused: memory",
        ),
        (
            json!({"id": 1, "arch": "x86_64", "cores": 2, "memory_mb": 1, "accelerators": vec!["gpu"; 100]}),
            "100 accelerators",
        ),
    ] {
        let mut s = tls_client(&d, &link, Some(&creds1)).unwrap();
        let (kind, why) = greet(&mut s, &hello(unit)).unwrap();
        assert_eq!(kind, 8, "expected a GoAway: {why}");
        assert!(why.contains(want), "{want}: {why}");
    }
    // None of them got in; the daemon says why.
    assert_eq!(units(&d).len(), 1, "{:?}", units(&d));
    let log = d.log_text();
    assert!(
        log.contains("a connection to the link port refused"),
        "{log}"
    );
    assert!(log.contains("a unit's greeting refused"), "{log}");
    // The listing stays small.
    let body = d
        .http
        .get(d.url("/spore/v1/units"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.len() < 4096, "{} bytes", body.len());
}

#[test]
fn a_live_unit_cannot_be_taken_over_and_down_units_are_forgotten() {
    let Some(tmp) = scratch("a_live_unit_cannot_be_taken_over_and_down_units_are_forgotten") else {
        return;
    };
    let (d, link) = control_plane(&tmp.path().join("d0"), &["--unit-grace", "3s"]);
    let t = token(&d, &[]);
    let mut first = Shim::start(1, &link, &tmp.path().join("d1"), Some(&t));
    wait_for("unit 1 up", 30, || {
        unit_state(&d, 1).as_deref() == Some("up")
    });
    let peer = |d: &Daemon| {
        units(d)
            .into_iter()
            .find(|u| u["id"] == 1)
            .map(|u| u["peer"].as_str().unwrap().to_owned())
    };
    let first_peer = peer(&d);
    // Its certificate and key are stored, the key private.
    assert_eq!(mode(&tmp.path().join("d1/cluster/unit-key.pem")), 0o600);

    // A second shim with a copy of unit 1's credentials (a stolen certificate, or the same
    // shim started twice) is refused while the first is up, and says why.
    let stolen = tmp.path().join("d1b");
    std::fs::create_dir_all(stolen.join("cluster")).unwrap();
    for f in ["ca.pem", "unit.pem", "unit-key.pem"] {
        std::fs::copy(
            tmp.path().join("d1/cluster").join(f),
            stolen.join("cluster").join(f),
        )
        .unwrap();
    }
    let second = Shim::start(1, &link, &stolen, None);
    wait_for("the second shim's refusal", 30, || {
        second
            .log_text()
            .contains("a second link for it is refused")
    });
    assert!(
        d.log_text().contains("a second link for it is refused"),
        "{}",
        d.log_text()
    );
    // The first link was not replaced and still carries calls.
    assert_eq!(peer(&d), first_peer);
    let r = d
        .http
        .post(d.url("/spore/v1/units/1/echo?bytes=1024&n=5"))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    assert_eq!(unit_state(&d, 1).as_deref(), Some("up"));
    assert!(
        !first.log_text().contains("link to the control plane lost"),
        "{}",
        first.log_text()
    );
    drop(second);

    // A join for a unit that is up is refused too.
    let out = Shim::start(1, &link, &tmp.path().join("d1c"), Some(&t));
    wait_for("the join's refusal", 30, || {
        out.log_text()
            .contains("join refused: unit 1 is already up")
    });
    drop(out);

    // Unit 1 dies: down, then forgotten after the grace period (3 s).
    first.kill();
    wait_for("unit 1 down", 10, || {
        unit_state(&d, 1).as_deref() == Some("down")
    });
    wait_for("unit 1 forgotten", 10, || unit_state(&d, 1).is_none());
    assert!(d.log_text().contains("forgotten"), "{}", d.log_text());
}

#[test]
fn a_token_of_another_ca_makes_the_shim_refuse_the_control_plane() {
    let Some(tmp) = scratch("a_token_of_another_ca_makes_the_shim_refuse_the_control_plane") else {
        return;
    };
    let (a, link_a) = control_plane(&tmp.path().join("a"), &[]);
    // Another cluster's CA and token (its control plane need not run).
    let other = tmp.path().join("b");
    common::cluster(&["init"], &other);
    let t = common::cluster(&["token", "--once"], &other);
    let shim = Shim::start(1, &link_a, &tmp.path().join("d1"), Some(&t));
    wait_for("the shim's refusal", 30, || {
        shim.log_text()
            .contains("the control plane's CA is not the one the join token names")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(unit_state(&a, 1), None);
    assert!(UnitCredentials::load(&tmp.path().join("d1"))
        .unwrap()
        .is_none());
    // The token was never shown to the wrong control plane: its single use is still there.
    let listed = common::cluster(&["token", "--list"], &other);
    assert!(listed.contains(t.split('.').nth(1).unwrap()), "{listed}");

    // Tokens can be listed and revoked; a revoked token joins nothing.
    let t2 = token(&a, &["--ttl", "1h", "--unit", "2"]);
    let id = t2.split('.').nth(1).unwrap().to_owned();
    common::cluster(&["token", "--revoke", &id], &a.data);
    let shim2 = Shim::start(2, &link_a, &tmp.path().join("d2"), Some(&t2));
    wait_for("the revoked token's refusal", 30, || {
        shim2
            .log_text()
            .contains("join refused: unknown, revoked or used-up token")
    });
}

/// Certificates for an etcd with client-certificate auth on loopback, made with rcgen.
struct EtcdCerts {
    dir: PathBuf,
}

impl EtcdCerts {
    fn make(dir: &Path) -> EtcdCerts {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "test etcd CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(p, &ca_key);
        let leaf = |name: &str, sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            // etcd refuses, on its JSON gateway with auth on, client certificates that
            // carry a common name (it could not pass it on): the client's has none.
            p.distinguished_name = DistinguishedName::new();
            if name == "server" {
                p.distinguished_name.push(DnType::CommonName, name);
            }
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
        };
        leaf("server", vec!["127.0.0.1".into(), "localhost".into()]);
        leaf("root", vec!["client".into()]);
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        EtcdCerts {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).to_string_lossy().into_owned()
    }

    /// An HTTPS client with the `root` certificate.
    fn client(&self) -> reqwest::blocking::Client {
        let mut pem = std::fs::read(self.dir.join("root.pem")).unwrap();
        pem.extend(std::fs::read(self.dir.join("root-key.pem")).unwrap());
        reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(
                &std::fs::read(self.dir.join("ca.pem")).unwrap(),
            )
            .unwrap()])
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_control_plane_registers_in_an_etcd_with_tls_client_certificates_and_auth() {
    let test = "the_control_plane_registers_in_an_etcd_with_tls_client_certificates_and_auth";
    let Some(tmp) = scratch(test) else {
        return;
    };
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("SKIP {test}: no etcd binary (Debian package etcd-server)");
        return;
    }
    let certs = EtcdCerts::make(&tmp.path().join("certs"));
    let url = format!("https://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let log = std::fs::File::create(tmp.path().join("etcd.log")).unwrap();
    let etcd = Command::new("etcd")
        .arg("--data-dir")
        .arg(tmp.path().join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("default={peer}")])
        .args([
            "--client-cert-auth",
            "--trusted-ca-file",
            &certs.path("ca.pem"),
        ])
        .args(["--cert-file", &certs.path("server.pem")])
        .args(["--key-file", &certs.path("server-key.pem")])
        // Tokens expire after 1 s unused: the client must authenticate again.
        .args(["--auth-token-ttl", "1"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _etcd = Kill(etcd);
    let http = certs.client();
    let call = |path: &str, body: Value, token: Option<&str>| {
        let mut r = http.post(format!("{url}{path}")).json(&body);
        if let Some(t) = token {
            r = r.header("Authorization", t);
        }
        r.send()
    };
    wait_for("etcd", 20, || {
        call("/v3/kv/range", json!({"key": "eA=="}), None).is_ok()
    });
    // Without a client certificate, etcd refuses the TLS handshake.
    let bare = reqwest::blocking::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(
            &std::fs::read(certs.dir.join("ca.pem")).unwrap(),
        )
        .unwrap()])
        .build()
        .unwrap();
    assert!(bare
        .post(format!("{url}/v3/kv/range"))
        .json(&json!({"key": "eA=="}))
        .send()
        .is_err());
    // Users and auth on.
    for (path, body) in [
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "s3cret"}),
        ),
        ("/v3/auth/role/add", json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        let r = call(path, body, None).unwrap();
        let status = r.status();
        let text = r.text().unwrap();
        assert!(
            status.is_success() || text.contains("already exists"),
            "{path}: {text}"
        );
    }

    // A control plane with a wrong password registers nothing; with the right one it does.
    let pw = tmp.path().join("etcd-password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let (ca, cert, key) = (
        certs.path("ca.pem"),
        certs.path("root.pem"),
        certs.path("root-key.pem"),
    );
    let args = [
        "--etcd",
        url.as_str(),
        "--etcd-ca",
        ca.as_str(),
        "--etcd-cert",
        cert.as_str(),
        "--etcd-key",
        key.as_str(),
        "--etcd-user",
        "root",
    ];
    let mut with_pw = args.to_vec();
    with_pw.extend(["--etcd-password-file", pw.to_str().unwrap()]);
    let (d, link) = control_plane(&tmp.path().join("d0"), &with_pw);
    let r = call(
        "/v3/auth/authenticate",
        json!({"name": "root", "password": "s3cret"}),
        None,
    )
    .unwrap();
    let (status, text) = (r.status(), r.text().unwrap());
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let token = v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("authenticate: {status} {text}"))
        .to_owned();
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    wait_for("the control plane's key in etcd", 20, || {
        call(
            "/v3/kv/range",
            json!({"key": b64("/spore/control")}),
            Some(&token),
        )
        .ok()
        .and_then(|r| r.json::<Value>().ok())
        .is_some_and(|v| v["kvs"][0]["value"].is_string())
    });
    wait_for("the control plane to say it is registered", 20, || {
        units(&d)[0]["etcd"] == "registered"
    });
    // Its token expires between keepalives (every 2 s): it authenticates again each time.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(units(&d)[0]["etcd"], "registered", "{}", d.log_text());
    assert!(!link.is_empty());
    // The password never shows on the command line.
    assert!(!with_pw.contains(&"s3cret"));
    drop(d);

    std::fs::write(&pw, "wrong\n").unwrap();
    let (d, _) = control_plane(&tmp.path().join("d1"), &with_pw);
    wait_for("the auth failure", 20, || {
        units(&d)[0]["etcd"]
            .as_str()
            .is_some_and(|s| s.contains("authentication failed"))
    });
}
