//! Template snapshots at the process level: a Python runtime checkpoints itself, the image is
//! restored by `spore __restore` in fresh processes, and the restored runtimes carry on.

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

fn can_snapshot(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("SPORE_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test}: not root, and SPORE_REQUIRE_ROOT=1");
    }
    eprintln!("SKIP {test}: not running as root (restores set mm fields and read other processes)");
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
        let mut cmd = Command::new(BIN);
        cmd.args(spore_snapshot::restore::restorer_args(
            image,
            "full",
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
