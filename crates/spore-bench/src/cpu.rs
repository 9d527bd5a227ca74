//! Where the CPU goes during a measured run: the CPU time and context switches of the whole
//! machine, of the daemon, of the processes under it (the functions' runtimes, templates and
//! sandbox helpers) and of the load generator, read from procfs (and `getrusage` for the
//! generator) before and after, and divided by the requests served.
//!
//! What the processes under the daemon used is their CPU time plus what their exited
//! children used (which the kernel adds to the parent that waits for them), so processes that
//! start or end inside the run count too.

use std::collections::HashMap;

use nix::sys::resource::{getrusage, UsageWho};
use procfs::CurrentSI;

use crate::BenchError;

/// What the tables' "rest" column holds.
pub const REST: &str = "the rest: the kernel's own threads (such as namespace and cgroup \
                        clean-up), other programs, and processes that ended without being \
                        waited for under the daemon (a runtime killed together with its \
                        sandbox's init)";

/// The clock ticks of `/proc` counters per second.
fn ticks_per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

/// One reading.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// The machine: CPU time spent busy (not idle, not waiting for I/O), seconds.
    pub machine_s: f64,
    /// The machine's context switches.
    pub switches: u64,
    /// The daemon's CPU time, seconds (all its threads).
    pub daemon_s: Option<f64>,
    /// CPU seconds of the processes under the daemon, and of those that ended and were
    /// waited for (by the daemon or one of them).
    pub under_s: f64,
    /// The load generator: this process's waited-for children (`wrk`) or its own threads.
    pub generator_s: f64,
}

/// Which side of this process the load generator runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratorIn {
    /// Child processes (`wrk`), counted once they have been waited for.
    Children,
    /// This process's own threads.
    Self_,
}

fn proc_err(what: &str) -> impl Fn(procfs::ProcError) -> BenchError + '_ {
    move |e| BenchError::Check(format!("reading {what} from /proc: {e}"))
}

fn rusage_s(who: UsageWho) -> Result<f64, BenchError> {
    let u = getrusage(who).map_err(|e| BenchError::Check(format!("getrusage: {e}")))?;
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(tv(u.user_time()) + tv(u.system_time()))
}

/// Reads the counters now; `daemon` is the daemon's pid when this run started it.
pub fn read(daemon: Option<u32>, generator: GeneratorIn) -> Result<Reading, BenchError> {
    let ks = procfs::KernelStats::current().map_err(proc_err("/proc/stat"))?;
    let t = &ks.total;
    let busy_ticks = t.user
        + t.nice
        + t.system
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + t.steal.unwrap_or(0);
    let mut r = Reading {
        machine_s: busy_ticks as f64 / ticks_per_second(),
        switches: ks.ctxt,
        generator_s: rusage_s(match generator {
            GeneratorIn::Children => UsageWho::RUSAGE_CHILDREN,
            GeneratorIn::Self_ => UsageWho::RUSAGE_SELF,
        })?,
        ..Reading::default()
    };
    let Some(daemon) = daemon.and_then(|d| i32::try_from(d).ok()) else {
        return Ok(r);
    };
    // Every process whose chain of parents reaches the daemon: its own time and its waited-for
    // children's; the daemon's own time apart, its waited-for children's under it.
    let mut procs = HashMap::new();
    for p in procfs::process::all_processes().map_err(proc_err("the process list"))? {
        let Ok(p) = p else { continue };
        if let Ok(st) = p.stat() {
            let own = (st.utime + st.stime) as f64;
            let children = (st.cutime + st.cstime).max(0) as f64;
            procs.insert(st.pid, (st.ppid, own, children));
        }
    }
    let hz = ticks_per_second();
    if let Some(&(_, own, children)) = procs.get(&daemon) {
        r.daemon_s = Some(own / hz);
        r.under_s = children / hz;
    }
    for (&pid, &(_, own, children)) in &procs {
        let mut at = pid;
        for _ in 0..64 {
            let Some(&(pp, _, _)) = procs.get(&at) else {
                break;
            };
            if pp == daemon {
                r.under_s += (own + children) / hz;
                break;
            }
            if pp <= 1 {
                break;
            }
            at = pp;
        }
    }
    Ok(r)
}

/// What a run used per request, microseconds of CPU (and switches).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PerRequest {
    /// The whole machine.
    pub machine_us: f64,
    /// The daemon, when this run started it.
    pub daemon_us: Option<f64>,
    /// The processes under the daemon (the functions' runtimes and their helpers).
    pub under_us: Option<f64>,
    /// The load generator.
    pub generator_us: f64,
    /// The rest: the kernel's own threads and interrupts, other programs.
    pub rest_us: f64,
    /// Context switches, machine-wide.
    pub switches: f64,
}

impl PerRequest {
    /// The table cells machine, daemon, under the daemon, load generator and rest, joined
    /// by ` | `, in milliseconds (`ms`) or microseconds; `-` for what was not measured.
    pub fn cells(&self, ms: bool) -> String {
        let cell = |v: Option<f64>| match v {
            None => "-".to_owned(),
            Some(us) if ms => format!("{:.2} ms", us / 1000.0),
            Some(us) => format!("{us:.0} us"),
        };
        [
            Some(self.machine_us),
            self.daemon_us,
            self.under_us,
            Some(self.generator_us),
            Some(self.rest_us),
        ]
        .map(cell)
        .join(" | ")
    }
}

/// `requests` served between `a` and `b`, per request.
pub fn per_request(a: &Reading, b: &Reading, requests: u64) -> PerRequest {
    let n = requests.max(1) as f64;
    let us = |s: f64| (s * 1e6 / n).max(0.0);
    let machine = b.machine_s - a.machine_s;
    let daemon = a.daemon_s.zip(b.daemon_s).map(|(x, y)| y - x);
    let under = daemon.map(|_| b.under_s - a.under_s);
    let generator = b.generator_s - a.generator_s;
    let rest = machine - daemon.unwrap_or(0.0) - under.unwrap_or(0.0) - generator;
    PerRequest {
        machine_us: us(machine),
        daemon_us: daemon.map(us),
        under_us: under.map(us),
        generator_us: us(generator),
        rest_us: us(rest),
        switches: b.switches.saturating_sub(a.switches) as f64 / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_children_of_the_daemon_count_under_it_even_once_ended() {
        // This test process plays the daemon: children that spin are processes under it.
        let me = std::process::id();
        let spin = || {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        };
        let mut early = spin();
        let a = read(Some(me), GeneratorIn::Self_).unwrap();
        assert!(a.daemon_s.is_some());
        // One starts in between, and both end (waited for) before the second reading.
        let mut late = spin();
        std::thread::sleep(std::time::Duration::from_millis(400));
        for c in [&mut early, &mut late] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let b = read(Some(me), GeneratorIn::Self_).unwrap();
        let p = per_request(&a, &b, 1);
        // Spinning for 400 ms, each gets a good part of a CPU even on a busy machine.
        assert!(p.under_us.unwrap() > 60_000.0, "{p:?}");
        assert!(p.machine_us >= p.under_us.unwrap() * 0.9, "{p:?}");
        // Without the daemon's pid only the machine and the generator are known.
        let c = read(None, GeneratorIn::Children).unwrap();
        let q = per_request(&c, &c, 10);
        assert_eq!((q.daemon_us, q.under_us), (None, None));
        assert_eq!(q.machine_us, 0.0);
    }
}
