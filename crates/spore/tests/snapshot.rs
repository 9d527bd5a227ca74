//! Template snapshots at the process level: a Python runtime checkpoints itself, the image is
//! restored by `spore __restore` in fresh processes, and the restored runtimes carry on; and
//! the same through the daemon (`snapshot = true` functions, `X-Spore-Cold: restore`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use spore_snapshot::capture::{capture, CaptureOptions};
use spore_snapshot::image::{Codec, Image};

const BIN: &str = env!("CARGO_BIN_EXE_spore");

/// Whether the kernel can restore processes: `PR_SET_MM_MAP` needs
/// CONFIG_CHECKPOINT_RESTORE, which `PR_SET_MM_MAP_SIZE` probes.
fn kernel_restores() -> bool {
    let mut size: libc::c_uint = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes the structure's size into `size`.
    unsafe { libc::prctl(35, 15, &mut size as *mut libc::c_uint, 0, 0) == 0 && size > 0 }
}

fn can_snapshot(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "not running as root (restores set mm fields and read other processes)"
    } else if !kernel_restores() {
        "the kernel has no PR_SET_MM_MAP (CONFIG_CHECKPOINT_RESTORE)"
    } else {
        return true;
    };
    if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test}: {why}, and SPORE_REQUIRE_ROOT=1");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

/// A process with one end of a socketpair on fd 3.
struct Peer {
    child: Child,
    lines: BufReader<UnixStream>,
    sock: UnixStream,
}

impl Peer {
    fn spawn(mut cmd: Command) -> Peer {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let theirs: OwnedFd = theirs.into();
        let raw = theirs.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; the closure runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 || libc::close_range(4, u32::MAX, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.stdin(Stdio::null()).spawn().unwrap();
        drop(theirs);
        Peer {
            child,
            lines: BufReader::new(ours.try_clone().unwrap()),
            sock: ours,
        }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.lines.read_line(&mut s).unwrap();
        assert!(!s.is_empty(), "peer closed its socket");
        s
    }

    fn json(&mut self) -> Value {
        serde_json::from_str(&self.line()).unwrap()
    }

    fn send(&mut self, line: &str) {
        self.sock.write_all(line.as_bytes()).unwrap();
    }

    fn finish(mut self, code: i32) {
        self.send(&format!("exit {code}\n"));
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "peer exit status");
    }
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(spore_runtime::CHECKPOINT_LIB_FILE),
            spore_runtime::CHECKPOINT_LIB,
        )
        .unwrap();
        Fixture { dir }
    }

    /// The fault server's report of the last restore in `mode` (written when it exits).
    fn dir_report(&self, mode: &str) -> Value {
        let path = self.dir.path().join(format!("faults-{mode}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let read = std::fs::read(&path).map(|b| serde_json::from_slice::<Value>(&b));
            if let Ok(Ok(v)) = read {
                let _ = std::fs::remove_file(&path);
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no fault report for {mode}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn lib(&self) -> PathBuf {
        self.dir.path().join(spore_runtime::CHECKPOINT_LIB_FILE)
    }

    /// Starts the test runtime, captures it into `image`, and returns it (carrying on) with
    /// its first answer.
    fn checkpoint(&self, image: &Path, codec: Codec) -> (Peer, Value) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshot/ckpt_runtime.py");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg("-S").arg(script).arg(self.lib());
        let mut peer = Peer::spawn(cmd);
        let hello = peer.line();
        let (pid, addr) = hello.trim().split_once(' ').unwrap();
        let opts = CaptureOptions {
            function: "ckpt".into(),
            codec,
            ..CaptureOptions::default()
        };
        let report = capture(
            pid.parse().unwrap(),
            u64::from_str_radix(addr, 16).unwrap(),
            image,
            &opts,
        )
        .unwrap();
        assert!(
            report.meta.stored_pages() > 100,
            "{:?}",
            report.meta.stored_pages()
        );
        peer.send("\0");
        let first = peer.json();
        assert_eq!(first["rc"], 0, "{first}");
        (peer, first)
    }

    fn restore(&self, image: &Path) -> (Peer, Value) {
        self.restore_as(image, "full")
    }

    fn restore_as(&self, image: &Path, mode: &str) -> (Peer, Value) {
        let mut cmd = Command::new(BIN);
        cmd.env(
            spore_snapshot::restore::FAULT_REPORT_ENV,
            self.dir.path().join(format!("faults-{mode}")),
        );
        cmd.args(spore_snapshot::restore::restorer_args(
            image,
            mode,
            &[0, 1, 2, 3],
        ));
        let mut peer = Peer::spawn(cmd);
        let first = peer.json();
        (peer, first)
    }
}

#[test]
fn a_restored_runtime_resumes_with_its_state_and_its_own_randomness() {
    if !can_snapshot("a_restored_runtime_resumes_with_its_state_and_its_own_randomness") {
        return;
    }
    let fx = Fixture::new();
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }] {
        let image = fx.dir.path().join(format!("img-{codec}"));
        let (original, before) = fx.checkpoint(&image, codec);
        let (mut a, ra) = fx.restore(&image);
        let (mut b, rb) = fx.restore(&image);
        for r in [&ra, &rb] {
            assert_eq!(r["rc"], 1, "{codec}: {r}");
            assert_eq!(r["sum"], before["sum"]);
            assert_eq!(r["digest"], before["digest_before"]);
            assert_ne!(r["pid"], before["pid"]);
        }
        assert_ne!(
            ra["random"], rb["random"],
            "restores share their random state"
        );
        assert_ne!(ra["uuid"], rb["uuid"]);
        // Both keep working: arithmetic, and a fresh 64 MiB allocation (heap growth).
        a.send("square 12 67108864\n");
        b.send("square 13 1000\n");
        assert_eq!(a.json()["square"], 144);
        assert_eq!(b.json()["square"], 169);
        a.finish(7);
        b.finish(0);
        original.finish(0);
    }
}

#[test]
fn lazy_and_reap_restores_serve_pages_on_demand_and_replay_the_working_set() {
    if !can_snapshot("lazy_and_reap_restores_serve_pages_on_demand_and_replay_the_working_set") {
        return;
    }
    let fx = Fixture::new();
    for codec in [Codec::None, Codec::Lz4] {
        let image = fx.dir.path().join(format!("lazy-{codec}"));
        let (original, before) = fx.checkpoint(&image, codec);
        let ws = spore_snapshot::lazy::working_set_path(&image);
        let mut faults = Vec::new();
        for mode in ["lazy", "reap", "reap", "lazy"] {
            let (mut p, r) = fx.restore_as(&image, mode);
            assert_eq!(r["rc"], 1, "{mode}/{codec}: {r}");
            assert_eq!(r["sum"], before["sum"], "{mode}: {r}");
            assert_eq!(r["digest"], before["digest_before"], "{mode}: {r}");
            // Heap growth, then a forked child touching pages (served through the fork event).
            p.send("square 21 33554432\n");
            assert_eq!(p.json()["square"], 441);
            p.send("forksum\n");
            assert_eq!(
                p.json()["forksum"],
                before["sum"],
                "{mode}: a forked child sees the image"
            );
            p.finish(0);
            let report = fx.dir_report(mode);
            faults.push((mode, report["copied"].as_u64().unwrap()));
            assert!(report["forks"].as_u64().unwrap() >= 1, "{mode}: {report}");
            if mode == "reap" {
                // Written once the runtime has been quiet, at the latest when it exits.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !ws.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert!(ws.exists(), "the first reap restore records a working set");
            }
        }
        // lazy, reap (recording, as lazy), reap (replaying), lazy: the replay takes a fraction
        // of the faults.
        eprintln!("{codec}: pages served on faults per restore: {faults:?}");
        let (lazy, replay) = (faults[0].1, faults[2].1);
        assert!(lazy > 100, "{faults:?}");
        assert!(
            replay * 5 < lazy,
            "the working set replay still faulted: {faults:?}"
        );
        let img = Image::open(&image).unwrap();
        let pages = spore_snapshot::lazy::read_working_set(&ws, &img).unwrap();
        assert!(!pages.is_empty() && pages.len() as u64 <= img.meta.stored_pages());
        original.finish(0);
    }
}

#[test]
fn damaged_or_stale_images_are_refused_with_the_reason() {
    if !can_snapshot("damaged_or_stale_images_are_refused_with_the_reason") {
        return;
    }
    let fx = Fixture::new();
    let image = fx.dir.path().join("img");
    let (original, _) = fx.checkpoint(&image, Codec::Lz4);
    original.finish(0);
    let good = std::fs::read(&image).unwrap();
    let run = |bytes: &[u8], want: &str| {
        let bad = fx.dir.path().join("bad");
        std::fs::write(&bad, bytes).unwrap();
        let out = Command::new(BIN)
            .args(spore_snapshot::restore::restorer_args(
                &bad,
                "full",
                &[0, 1, 2, 3],
            ))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{want}: {err}");
        assert!(err.contains(want), "{want:?} not in {err:?}");
    };
    let mut b = good.clone();
    b[4096 + 100] ^= 0xff;
    run(&b, "partition 0 checksum");
    run(&good[..good.len() / 2], "truncated");
    let mut b = good.clone();
    b[8] = 7;
    run(&b, "version 7");
    // fd 3 was open at checkpoint and is not handed over.
    let out = Command::new(BIN)
        .args(spore_snapshot::restore::restorer_args(
            &image,
            "full",
            &[0, 1, 2],
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("descriptor 3"));
    // A file the image maps changed: rewrite the checkpoint library (same content, new mtime).
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(fx.lib(), spore_runtime::CHECKPOINT_LIB).unwrap();
    let img = Image::open(&image).unwrap();
    assert!(img.meta.regions.iter().any(|r| matches!(&r.kind,
        spore_snapshot::image::RegionKind::File { path, .. } if path == &fx.lib())));
    let out = Command::new(BIN)
        .args(spore_snapshot::restore::restorer_args(
            &image,
            "full",
            &[0, 1, 2, 3],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("changed since the snapshot"), "{err}");
}

fn invoke_start(d: &common::Daemon, name: &str, how: &str, payload: &Value) -> (String, Value) {
    d.invoke_start(name, how, payload, &[])
}

/// Restores the deployed `probe` function and checks that the instance sees what any
/// sandbox sees: no host files, only its own processes, no host network, no privileged calls.
/// Returns the listener it must not reach (keep it open until done).
fn assert_restored_probe_is_contained(d: &common::Daemon) -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ev = serde_json::json!({ "port": port });
    invoke_start(d, "probe", "1", &ev);
    let (start, v) = invoke_start(d, "probe", "restore", &ev);
    assert_eq!(start, "restore");
    for path in ["/root", "/var/lib/spore", "/etc/shadow"] {
        assert_ne!(v[path], "READABLE", "{path}: {v}");
    }
    assert_eq!(v["pids"], serde_json::json!([1]), "{v}");
    assert_eq!(v["tcp"], "ConnectionRefusedError", "{v}");
    for call in ["mount", "ptrace", "unshare"] {
        assert_eq!(v[call], serde_json::json!([-1, 1]), "{call}: {v}");
    }
    listener
}

/// Flips one byte in the first partition of `function`'s image.
fn corrupt_image(d: &common::Daemon, function: &str) {
    let path = PathBuf::from(
        snapshots(d)
            .into_iter()
            .find(|s| s["function"] == function)
            .unwrap()["path"]
            .as_str()
            .unwrap(),
    );
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 64] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
}

/// Waits until `function` has a spare sandbox built for its next restore.
fn wait_for_spare(d: &common::Daemon, function: &str) {
    wait_for_spare_in(d, function, "full");
}

/// Waits until `function` has a spare sandbox built for its next restore in memory mode
/// `mode`; returns what the API says of it.
fn wait_for_spare_in(d: &common::Daemon, function: &str, mode: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = d.get_json(&format!("/2015-03-31/functions/{function}"));
        let spare = &f["Spore"]["Spare"];
        if spare["Pids"].as_array().is_some_and(|p| !p.is_empty()) && spare["MemoryMode"] == mode {
            return spare.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spare sandbox: {f}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshots(d: &common::Daemon) -> Vec<Value> {
    d.get_json("/spore/v1/snapshots")["Snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn daemon_restores_snapshotted_functions_isolated_and_falls_back_when_refused() {
    if !common::can_sandbox(
        "daemon_restores_snapshotted_functions_isolated_and_falls_back_when_refused",
    ) {
        return;
    }
    let mut d = common::Daemon::start();
    d.deploy_snapshotted(&common::fixture("rng"), "rng");
    let (start, first) = invoke_start(&d, "rng", "1", &serde_json::json!({}));
    assert_eq!(start, "cold", "the first start imports (and snapshots)");
    let listed = snapshots(&d);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["function"], "rng");
    assert!(listed[0]["error"].is_null(), "{listed:?}");
    let mut seen = vec![first["random"].clone()];
    for i in 0..3 {
        if i > 0 {
            // After a restore, the next one's sandbox is built ahead of time (a spare).
            wait_for_spare(&d, "rng");
        }
        let (start, v) = invoke_start(&d, "rng", "1", &serde_json::json!({ "n": i }));
        assert_eq!(start, "restore");
        // A spare's first invocation goes behind its go-ahead: this call's, not another's.
        assert_eq!(v["event"]["n"], i, "{v}");
        assert_eq!(v["pid"], 1, "pid 1 of its own pid namespace: {v}");
        assert_eq!(v["threads"], 1, "{v}");
        assert_eq!(
            v["fds"], first["fds"],
            "the same descriptors as an init: {v}"
        );
        assert_ne!(v["uid"], 0, "unprivileged: {v}");
        assert!(
            !seen.contains(&v["random"]),
            "restores share random state: {v}"
        );
        seen.push(v["random"].clone());
    }
    // Reap restores get spares of their own (with the working set the first one recorded),
    // and use them: the restored instance is the spare's processes.
    let reap = [
        ("X-Spore-Cold", "restore"),
        ("X-Spore-Restore-Mode", "reap"),
    ];
    for i in 0..4 {
        let spare = (i > 1).then(|| wait_for_spare_in(&d, "rng", "reap"));
        let r = d.invoke_raw("rng", b"{}", &reap);
        assert_eq!(r.headers()["x-spore-start"], "restore");
        let v: Value = r.json().unwrap();
        assert!(!seen.contains(&v["random"]), "{v}");
        seen.push(v["random"].clone());
        if let Some(spare) = spare {
            let f = d.get_json("/2015-03-31/functions/rng");
            let idle = f["Spore"]["Instances"]["IdlePids"]
                .as_array()
                .unwrap()
                .clone();
            let pids = spare["Pids"].as_array().unwrap();
            assert!(
                pids.iter().any(|p| idle.contains(p)),
                "the reap restore ran in its spare {spare} (idle: {idle:?})"
            );
        }
    }
    // X-Spore-Cold: init still imports.
    assert_eq!(
        invoke_start(&d, "rng", "init", &serde_json::json!({})).0,
        "cold"
    );
    // A restored runtime takes signals through Python handlers (installed with SA_ONSTACK:
    // the restorer's own alternate stack must not outlive it) and reaps children.
    d.deploy_snapshotted(&common::fixture("signals"), "signals");
    invoke_start(&d, "signals", "1", &serde_json::json!({}));
    let (start, v) = invoke_start(&d, "signals", "restore", &serde_json::json!({}));
    assert_eq!(start, "restore");
    assert_eq!(v, serde_json::json!({"usr1": 1, "child_exit": 3}));

    // A restored instance is as contained as any other.
    d.deploy_snapshotted(&common::fixture("probe"), "probe");
    d.deploy_snapshotted(&common::fixture("hog"), "hog");
    let listener = assert_restored_probe_is_contained(&d);
    let r = d.invoke_raw("hog", b"{}", &[("X-Spore-Cold", "1")]);
    assert_eq!(r.headers()["x-spore-start"], "cold");
    let r = d.invoke_raw("hog", b"{}", &[("X-Spore-Cold", "restore")]);
    assert_eq!(r.headers()["x-spore-start"], "restore");
    let v: Value = r.json().unwrap();
    assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");
    drop(listener);

    // A damaged image is refused: the start falls back to an init, which takes a new one.
    corrupt_image(&d, "rng");
    let (start, _) = invoke_start(&d, "rng", "restore", &serde_json::json!({}));
    assert_eq!(start, "cold", "a corrupt image never runs");
    assert!(d.log_text().contains("checksum"), "the refusal is logged");
    assert_eq!(
        invoke_start(&d, "rng", "restore", &serde_json::json!({})).0,
        "restore"
    );

    // A redeploy never restores the old code; removing the function removes its images.
    let zip = spore_registry::code::zip_dir(&common::fixture("echo")).unwrap();
    use base64::Engine as _;
    let body = serde_json::json!({
        "ZipFile": base64::engine::general_purpose::STANDARD.encode(zip)
    });
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/rng/code"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (start, _) = invoke_start(&d, "rng", "restore", &serde_json::json!({"k": 1}));
    assert_eq!(start, "cold");
    let (start, v) = invoke_start(&d, "rng", "restore", &serde_json::json!({"k": 1}));
    assert_eq!(start, "restore");
    assert_eq!(v["event"]["k"], 1, "the new code runs: {v}");
    assert_eq!(
        snapshots(&d)
            .iter()
            .filter(|s| s["function"] == "rng")
            .count(),
        1
    );
    let r = d
        .http
        .delete(d.url("/2015-03-31/functions/rng"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(!snapshots(&d).iter().any(|s| s["function"] == "rng"));
    d.stop();
}

fn evict(d: &common::Daemon, name: &str) -> Value {
    let r = d
        .http
        .post(d.url(&format!("/spore/v1/functions/{name}/evict")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "evict {name}");
    r.json().unwrap()
}

#[test]
fn cfork_templates_are_snapshotted_evicted_restored_and_forked_from() {
    let test = "cfork_templates_are_snapshotted_evicted_restored_and_forked_from";
    if !common::can_sandbox(test) || !can_snapshot(test) {
        return;
    }
    let mut d = common::Daemon::start();
    d.deploy_snapshotted_in(&common::fixture("rng"), "rng", Some("cfork"));
    // The template (started at deploy, or by this call) imports, then snapshots itself.
    let (start, first) = invoke_start(&d, "rng", "1", &serde_json::json!({}));
    assert!(start == "fork" || start == "cold", "{start}");
    let listed = snapshots(&d);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0]["error"].is_null(), "{listed:?}");
    assert!(
        d.log_text().contains("cfork template snapshot"),
        "the capture is logged"
    );

    // Evicted, the template comes back from its snapshot, and forks.
    let gone = evict(&d, "rng");
    assert_eq!(gone["Template"], true, "{gone}");
    assert_eq!(gone["Restorable"], true, "{gone}");
    let (start, a) = invoke_start(&d, "rng", "1", &serde_json::json!({}));
    assert_eq!(start, "restore", "the template was restored: {a}");
    let (start, b) = invoke_start(&d, "rng", "1", &serde_json::json!({}));
    assert_eq!(start, "fork", "then it forks: {b}");
    for v in [&a, &b] {
        assert_eq!(v["threads"], 1, "{v}");
        assert_eq!(v["pid"], 1, "pid 1 of its own pid namespace: {v}");
        assert_ne!(v["uid"], 0, "unprivileged: {v}");
        assert_eq!(
            v["fds"], first["fds"],
            "the same descriptors as before: {v}"
        );
    }
    let randoms = [&first["random"], &a["random"], &b["random"]];
    assert!(
        randoms[0] != randoms[1] && randoms[1] != randoms[2] && randoms[0] != randoms[2],
        "forks of a restored template have their own random state: {randoms:?}"
    );
    assert_ne!(a["uuid"], b["uuid"]);
    // An evicted template leaves a spare sandbox behind (no private memory), and its next
    // restore goes into it.
    evict(&d, "rng");
    let spare = wait_for_spare_in(&d, "rng", "full");
    let (start, c) = invoke_start(&d, "rng", "1", &serde_json::json!({}));
    assert_eq!(start, "restore", "{c}");
    assert!(!randoms.contains(&&c["random"]), "{c}");
    let f = d.get_json("/2015-03-31/functions/rng");
    let template = f["Spore"]["Template"]["Pids"].as_array().unwrap().clone();
    assert!(
        spare["Pids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| template.contains(p)),
        "the template was restored in its spare {spare} (template: {template:?})"
    );
    // X-Spore-Cold: restore replaces the live template with a restored one, init with an
    // imported one.
    assert_eq!(
        invoke_start(&d, "rng", "restore", &serde_json::json!({})).0,
        "restore"
    );
    assert_eq!(
        invoke_start(&d, "rng", "init", &serde_json::json!({})).0,
        "cold"
    );

    // A child of a restored template is as contained as any fork.
    d.deploy_snapshotted_in(&common::fixture("probe"), "probe", Some("cfork"));
    d.deploy_snapshotted_in(&common::fixture("hog"), "hog", Some("cfork"));
    let listener = assert_restored_probe_is_contained(&d);
    let _ = d.invoke_raw("hog", b"{}", &[("X-Spore-Cold", "1")]);
    let r = d.invoke_raw("hog", b"{}", &[("X-Spore-Cold", "restore")]);
    assert_eq!(r.headers()["x-spore-start"], "restore");
    let v: Value = r.json().unwrap();
    assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");
    drop(listener);
    // A restored template outlives its children (it takes SIGCHLD through a Python handler),
    // and they handle signals of their own.
    d.deploy_snapshotted_in(&common::fixture("signals"), "signals", Some("cfork"));
    invoke_start(&d, "signals", "1", &serde_json::json!({}));
    let (start, v) = invoke_start(&d, "signals", "restore", &serde_json::json!({}));
    assert_eq!(start, "restore");
    assert_eq!(v, serde_json::json!({"usr1": 1, "child_exit": 3}));
    d.deploy_snapshotted_in(&common::fixture("crash"), "crash", Some("cfork"));
    let _ = d.invoke_raw("crash", b"{}", &[("X-Spore-Cold", "1")]);
    let r = d.invoke_raw("crash", b"{}", &[("X-Spore-Cold", "restore")]);
    assert_eq!(r.headers()["x-spore-start"], "restore");
    std::thread::sleep(Duration::from_millis(300));
    let r = d.invoke_raw("crash", b"{}", &[("X-Spore-Cold", "1")]);
    assert_eq!(
        r.headers()["x-spore-start"],
        "fork",
        "the restored template survived its child's exit: {}",
        d.log_text()
    );

    // A damaged template image is refused: the template imports instead (and takes a new
    // image), and the function keeps working.
    corrupt_image(&d, "rng");
    evict(&d, "rng");
    let (start, _) = invoke_start(&d, "rng", "1", &serde_json::json!({}));
    assert_eq!(start, "cold", "a corrupt image never runs");
    assert!(d.log_text().contains("checksum"), "the refusal is logged");
    evict(&d, "rng");
    assert_eq!(
        invoke_start(&d, "rng", "1", &serde_json::json!({})).0,
        "restore"
    );
    d.stop();
}

fn function_log(d: &common::Daemon, name: &str) -> String {
    d.http
        .get(d.url(&format!("/spore/v1/functions/{name}/logs?lines=200")))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn a_warm_up_event_runs_before_ready_and_its_state_reaches_forks_and_restores() {
    let test = "a_warm_up_event_runs_before_ready_and_its_state_reaches_forks_and_restores";
    if !common::can_sandbox(test) || !can_snapshot(test) {
        return;
    }
    let mut d = common::Daemon::start();
    let warmed = serde_json::json!({"warm": true});
    // A container instance's first invocation is its handler's second call.
    d.deploy(&common::fixture("warm"));
    let (start, v) = invoke_start(&d, "warm", "1", &serde_json::json!({"k": 1}));
    assert_eq!(start, "cold");
    assert_eq!(v["calls"], 2, "{v}");
    assert_eq!(v["first"], warmed, "{v}");
    assert!(
        function_log(&d, "warm").contains("warm-up event ran"),
        "{}",
        function_log(&d, "warm")
    );
    // A cfork template runs it once; every child inherits the state.
    let r = d.create_as(&common::fixture("warm"), Some("warmc"), Some("cfork"));
    assert_eq!(r.status(), 201);
    for _ in 0..2 {
        let (_, v) = invoke_start(&d, "warmc", "1", &serde_json::json!({}));
        assert_eq!(v["calls"], 2, "{v}");
    }
    // A snapshot is taken after it: restores start warmed.
    d.deploy_snapshotted(&common::fixture("warm"), "warms");
    invoke_start(&d, "warms", "1", &serde_json::json!({}));
    let (start, v) = invoke_start(&d, "warms", "restore", &serde_json::json!({}));
    assert_eq!(start, "restore");
    assert_eq!(v["calls"], 2, "{v}");
    assert_eq!(v["first"], warmed, "{v}");
    // A warm-up that fails is reported, and the function works without it.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["main.py", "spore.toml"] {
        std::fs::copy(common::fixture("warm").join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("warmup.json"), b"{not json").unwrap();
    let r = d.create_as(tmp.path(), Some("warmbad"), None);
    assert_eq!(r.status(), 201);
    let (_, v) = invoke_start(&d, "warmbad", "1", &serde_json::json!({}));
    assert_eq!(v["calls"], 1, "{v}");
    let log = function_log(&d, "warmbad");
    assert!(
        log.contains("warm-up event /var/task/warmup.json failed"),
        "{log}"
    );
    d.stop();
}

#[test]
fn over_the_idle_memory_budget_instances_go_and_come_back_restored() {
    if !common::can_sandbox("over_the_idle_memory_budget_instances_go_and_come_back_restored")
        || !can_snapshot("over_the_idle_memory_budget_instances_go_and_come_back_restored")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = common::Daemon::start_at(&tmp.path().join("data"), &["--idle-memory-mb", "1"]);
    d.deploy_snapshotted(&common::fixture("rng"), "rng");
    let r = d.invoke_raw("rng", b"{}", &[]);
    assert_eq!(r.headers()["x-spore-start"], "cold");
    // The reaper (every second) stops the idle instance: it holds more than 1 MiB.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = d.get_json("/2015-03-31/functions/rng");
        if f["Spore"]["Instances"]["Total"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still there: {f}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.log_text().contains("to keep idle instances under 1 MiB"));
    // The next call, with no cold header, starts from the snapshot.
    let r = d.invoke_raw("rng", b"{}", &[]);
    assert_eq!(r.headers()["x-spore-start"], "restore");
    // So does a cfork template.
    d.deploy_snapshotted_in(&common::fixture("rng"), "rngc", Some("cfork"));
    let r = d.invoke_raw("rngc", b"{}", &[]);
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("stopping the cfork template rngc") {
        assert!(
            std::time::Instant::now() < deadline,
            "the template stays: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = d.invoke_raw("rngc", b"{}", &[]);
    assert_eq!(r.headers()["x-spore-start"], "restore");
    d.stop();
}

#[test]
fn a_runtime_holding_files_is_not_snapshotted_and_says_why_once() {
    if !common::can_sandbox("a_runtime_holding_files_is_not_snapshotted_and_says_why_once")
        || !can_snapshot("a_runtime_holding_files_is_not_snapshotted_and_says_why_once")
    {
        return;
    }
    let mut d = common::Daemon::start();
    d.deploy_snapshotted(&common::fixture("holdfile"), "holdfile");
    for _ in 0..3 {
        let r = d.invoke_raw("holdfile", b"{}", &[("X-Spore-Cold", "1")]);
        assert_eq!(r.headers()["x-spore-start"], "cold");
        assert_eq!(r.status(), 200);
    }
    assert!(snapshots(&d).is_empty());
    let log = d.log_text();
    assert_eq!(
        log.matches("snapshot not taken").count(),
        1,
        "tried once per revision: {log}"
    );
    assert!(
        log.contains("is open; a restored runtime gets only descriptors"),
        "{log}"
    );
    d.stop();
}
