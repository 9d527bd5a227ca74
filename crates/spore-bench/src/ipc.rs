//! `spore bench ipc`: the shared-memory data plane on its own (issue 5's micro-benchmarks).
//! Hop latency of a 1 KiB message over the ring (ping-pong between two threads, half a round
//! trip), next to a Unix socketpair in the same run; and hand-off of payloads from 1 KiB to
//! 64 MiB as sealed memfds (written once by the producer, mapped and read in full by the
//! consumer), next to `memcpy` of the same size.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use spore_ipc::ring::{self, Consumer, Producer};
use spore_ipc::sealed::SealedPayload;

use crate::{BenchError, Series};

fn ipc(e: spore_ipc::IpcError) -> BenchError {
    BenchError::Check(e.to_string())
}

/// One-way hop latency (half of a ping-pong round trip), `n` samples each: ring (blocking),
/// ring (spinning up to `spin` before sleeping) and a Unix socketpair.
pub fn hop_latency(n: usize, size: usize, spin: Duration) -> Result<Vec<Series>, BenchError> {
    let mut out = Vec::new();
    for (name, spin) in [
        ("shm ring (doorbell)", Duration::ZERO),
        ("shm ring (spin, then doorbell)", spin),
    ] {
        let (a, b) = (
            ring::create(64 * 1024).map_err(ipc)?,
            ring::create(64 * 1024).map_err(ipc)?,
        );
        let mut to_echo = Producer::open(a.try_clone().map_err(ipc)?).map_err(ipc)?;
        let mut from_echo = Consumer::open(b.try_clone().map_err(ipc)?).map_err(ipc)?;
        let mut echo_in = Consumer::open(a).map_err(ipc)?;
        let mut echo_out = Producer::open(b).map_err(ipc)?;
        from_echo.set_spin(spin);
        echo_in.set_spin(spin);
        to_echo.set_spin(spin);
        echo_out.set_spin(spin);
        let t = Duration::from_secs(5);
        let echo = std::thread::spawn(move || -> Result<(), spore_ipc::IpcError> {
            for _ in 0..n + 10 {
                let m = echo_in.recv(t)?;
                echo_out.send(&m, t)?;
            }
            Ok(())
        });
        let msg = vec![7u8; size];
        let mut samples = Vec::with_capacity(n);
        for i in 0..n + 10 {
            let t0 = Instant::now();
            to_echo.send(&msg, t).map_err(ipc)?;
            let back = from_echo.recv(t).map_err(ipc)?;
            let us = t0.elapsed().as_secs_f64() * 1000.0 / 2.0;
            if back.len() != size {
                return Err(BenchError::Check("the echo changed the message".into()));
            }
            if i >= 10 {
                samples.push(us);
            }
        }
        echo.join()
            .map_err(|_| BenchError::Check("echo thread panicked".into()))?
            .map_err(ipc)?;
        out.push(Series {
            name: format!("{name}, {size} B"),
            samples_ms: samples,
        });
    }
    let (mut x, mut y) =
        std::os::unix::net::UnixStream::pair().map_err(|e| BenchError::Check(e.to_string()))?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; size];
        for _ in 0..n + 10 {
            y.read_exact(&mut buf)?;
            y.write_all(&buf)?;
        }
        Ok(())
    });
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; size];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 10 {
        let t0 = Instant::now();
        x.write_all(&msg)
            .and_then(|()| x.read_exact(&mut buf))
            .map_err(|e| BenchError::Check(e.to_string()))?;
        if i >= 10 {
            samples.push(t0.elapsed().as_secs_f64() * 1000.0 / 2.0);
        }
    }
    echo.join()
        .map_err(|_| BenchError::Check("echo thread panicked".into()))?
        .map_err(|e| BenchError::Check(e.to_string()))?;
    out.push(Series {
        name: format!("unix socketpair (baseline), {size} B"),
        samples_ms: samples,
    });
    Ok(out)
}

/// One row of the payload sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandOff {
    /// Payload size, bytes.
    pub size: usize,
    /// Sealed-memfd hand-off (write, seal, dup, map, read all), median ms.
    pub memfd_ms: f64,
    /// `memcpy` of the same size, median ms.
    pub memcpy_ms: f64,
}

impl HandOff {
    /// GB/s of the hand-off.
    pub fn memfd_gbps(&self) -> f64 {
        self.size as f64 / self.memfd_ms / 1e6
    }
    /// GB/s of memcpy.
    pub fn memcpy_gbps(&self) -> f64 {
        self.size as f64 / self.memcpy_ms / 1e6
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The payload sweep, `reps` repetitions per size.
pub fn payload_sweep(sizes: &[usize], reps: usize) -> Result<Vec<HandOff>, BenchError> {
    let mut rows = Vec::new();
    for &size in sizes {
        let src: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let expect: u64 = src.iter().map(|&b| u64::from(b)).sum();
        let mut dst = vec![0u8; size];
        let mut memfd = Vec::new();
        let mut copy = Vec::new();
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            let p = SealedPayload::create("bench", &src).map_err(ipc)?;
            let q = SealedPayload::from_fd(p.try_clone_fd().map_err(ipc)?).map_err(ipc)?;
            let sum: u64 = q.as_bytes().iter().map(|&b| u64::from(b)).sum();
            memfd.push(t0.elapsed().as_secs_f64() * 1000.0);
            if sum != expect {
                return Err(BenchError::Check("the payload arrived changed".into()));
            }
            let t0 = Instant::now();
            dst.copy_from_slice(&src);
            let sum: u64 = dst.iter().map(|&b| u64::from(b)).sum();
            copy.push(t0.elapsed().as_secs_f64() * 1000.0);
            if sum != expect {
                return Err(BenchError::Check("memcpy changed the payload".into()));
            }
        }
        rows.push(HandOff {
            size,
            memfd_ms: median(memfd),
            memcpy_ms: median(copy),
        });
    }
    Ok(rows)
}
