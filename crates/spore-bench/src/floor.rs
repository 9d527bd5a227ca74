//! Floors: what no design can beat on this machine, measured in the same run as the series
//! they bound, so that every figure can be read as a ratio to what the hardware and kernel
//! allow rather than to Spore's own earlier numbers.
//!
//! - [`fork_reply`]: `os.fork()` of a warm Python (json imported) whose child encodes a small
//!   reply and writes it to a pipe: the least a cfork start can cost.
//! - [`idle_wakeups`]: one byte on a socketpair waking a thread blocked on it after a quiet
//!   millisecond: the least a hop to a sleeping consumer can cost.
//! - [`json_codec`]: the runtime's encode and decode of a value (its DAG hop codec), in the
//!   sandbox's interpreter.
//! - [`composite`]: a floor made of two measured parts (e.g. a fork plus a warm call), summed
//!   sample by sample.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{BenchError, Series};

/// Runs a Python program that prints a JSON list of milliseconds; returns the list.
fn python_samples(python: &str, program: &str, args: &[String]) -> Result<Vec<f64>, BenchError> {
    let out = Command::new(python)
        .arg("-c")
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| BenchError::Check(format!("running {python} for a floor: {e}")))?;
    if !out.status.success() {
        return Err(BenchError::Check(format!(
            "the floor program in {python} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        BenchError::Check(format!(
            "the floor program printed no list of samples ({e}): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    })
}

/// The fork floor's program: a warm interpreter (json imported, as every runtime has it)
/// forks; the child encodes a small reply, writes it to a pipe and exits; the parent's clock
/// stops when the reply is read (the child's exit is reaped outside the timed part).
const FORK_REPLY: &str = r#"
import json, os, sys, time
n = int(sys.argv[1])
reply = {"statusCode": 200, "body": "hello from a fork"}
out = []
for i in range(n + 3):
    r, w = os.pipe()
    t0 = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(reply).encode())
        os._exit(0)
    os.close(w)
    os.read(r, 65536)
    t1 = time.perf_counter_ns()
    os.close(r)
    os.waitpid(pid, 0)
    if i >= 3:
        out.append((t1 - t0) / 1e6)
print(json.dumps(out))
"#;

/// `n` forks of a warm `python` that reply over a pipe, ms each.
pub fn fork_reply(python: &str, n: usize) -> Result<Vec<f64>, BenchError> {
    python_samples(python, FORK_REPLY, &[n.to_string()])
}

/// The codec floor's program: encode a value as the runtime does on a DAG hop
/// (`json.dumps(v).encode()`) and decode it (`json.loads`), timed together.
const JSON_CODEC: &str = r#"
import json, sys, time
n, size = int(sys.argv[1]), int(sys.argv[2])
value = {"n": 0, "pad": "x" * size}
out = []
for i in range(n + 20):
    t0 = time.perf_counter_ns()
    json.loads(json.dumps(value).encode())
    t1 = time.perf_counter_ns()
    if i >= 20:
        out.append((t1 - t0) / 1e6)
print(json.dumps(out))
"#;

/// `n` encodes and decodes of a `{"n": 0, "pad": "x" * pad}` value in `python`, ms each.
pub fn json_codec(python: &str, n: usize, pad: usize) -> Result<Vec<f64>, BenchError> {
    python_samples(python, JSON_CODEC, &[n.to_string(), pad.to_string()])
}

/// `n` wake-ups of an idle thread, ms each: after 1 ms of quiet, one byte is written to a
/// socketpair; the clock stops when the thread blocked reading it runs.
pub fn idle_wakeups(n: usize) -> Result<Vec<f64>, BenchError> {
    let io = |e: std::io::Error| BenchError::Check(format!("wake-up floor: {e}"));
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Instant>();
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while rx.read_exact(&mut b).is_ok() {
            if done_tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(1));
        let t0 = Instant::now();
        tx.write_all(&[1]).map_err(io)?;
        let woke = done_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| BenchError::Check("the reader thread did not wake".into()))?;
        out.push(woke.duration_since(t0).as_secs_f64() * 1000.0);
    }
    drop(tx);
    let _ = reader.join();
    Ok(out)
}

/// A floor made of measured parts, summed sample by sample (the shortest part sets the
/// length): e.g. a fork's floor plus a warm call's, for a start that needs both.
pub fn composite(name: &str, parts: &[&[f64]]) -> Series {
    let len = parts.iter().map(|p| p.len()).min().unwrap_or(0);
    Series {
        name: name.to_owned(),
        samples_ms: (0..len).map(|i| parts.iter().map(|p| p[i]).sum()).collect(),
    }
}

/// How many CPUs this process may run on (the divisor of a burst's floor).
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_sums_parts_sample_by_sample() {
        let s = composite("f", &[&[1.0, 2.0, 3.0], &[10.0, 20.0]]);
        assert_eq!(s.samples_ms, vec![11.0, 22.0]);
        assert_eq!(s.name, "f");
    }

    #[test]
    fn wakeups_are_measured() {
        let w = idle_wakeups(3).unwrap();
        assert_eq!(w.len(), 3);
        assert!(w.iter().all(|ms| *ms > 0.0 && *ms < 5000.0), "{w:?}");
    }

    #[test]
    fn python_floors_run_where_python_is() {
        let python = "/usr/bin/python3";
        if !std::path::Path::new(python).exists() {
            eprintln!("skipping: {python} is not installed");
            return;
        }
        let f = fork_reply(python, 3).unwrap();
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|ms| *ms > 0.0), "{f:?}");
        let c = json_codec(python, 5, 1000).unwrap();
        assert_eq!(c.len(), 5);
        let e = python_samples(python, "import sys; sys.exit(3)", &[]).unwrap_err();
        assert!(e.to_string().contains("exited with"), "{e}");
    }
}
