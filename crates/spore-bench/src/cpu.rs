//! Where the CPU goes during a measured run: the CPU time and context switches of the whole
//! machine, of the daemon, of the processes under it (the functions' runtimes, templates and
//! sandbox helpers) and of the load generator, read from procfs (and `getrusage` for the
//! generator) before and after, and divided by the requests served.
//!
//! A live process's time is the run time of its threads in nanoseconds
//! (`/proc/PID/task/TID/schedstat`): `/proc/PID/stat` rounds each process down to whole clock
//! ticks (10 ms), which would drop a short-lived child's CPU altogether. What exited children
//! used comes from the parent that waited for them (`cutime`, `cstime`: the kernel adds a
//! child's time to its parent's), so processes that start or end inside the run count too.
//! A process killed without being waited for under the daemon (a container's runtime, killed
//! with its sandbox's init) is not counted: its time falls into the rest.

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

/// The counters read at once from `/proc/stat` and `getrusage`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// The machine: CPU time spent busy (not idle, not waiting for I/O), seconds.
    pub machine_s: f64,
    /// The machine's context switches.
    pub switches: u64,
    /// The load generator: this process's waited-for children (`wrk`) or its own threads.
    pub generator_s: f64,
}

/// One reading. The machine's and the generator's counters are read both before and after
/// the walk over the processes, so that a window starts after one reading's walk and ends
/// before the next one's.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// Before the walk.
    pub pre: Counters,
    /// After the walk.
    pub post: Counters,
    /// The machine's CPUs (as `/proc/stat` counts them).
    pub cpus: usize,
    /// The daemon's CPU time, seconds (all its threads).
    pub daemon_s: Option<f64>,
    /// CPU seconds of the processes under the daemon, and of those that ended and were
    /// waited for (by the daemon or one of them).
    pub under_s: f64,
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

fn counters(generator: GeneratorIn) -> Result<(Counters, usize), BenchError> {
    let ks = procfs::KernelStats::current().map_err(proc_err("/proc/stat"))?;
    let t = &ks.total;
    let busy_ticks = t.user
        + t.nice
        + t.system
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + t.steal.unwrap_or(0);
    let c = Counters {
        machine_s: busy_ticks as f64 / ticks_per_second(),
        switches: ks.ctxt,
        generator_s: rusage_s(match generator {
            GeneratorIn::Children => UsageWho::RUSAGE_CHILDREN,
            GeneratorIn::Self_ => UsageWho::RUSAGE_SELF,
        })?,
    };
    Ok((c, ks.cpu_time.len().max(1)))
}

/// The run time of `pid`'s threads, seconds, from their `schedstat` (nanoseconds on a CPU);
/// `fallback` (the process's rounded `/proc/PID/stat` time) when those cannot be read.
fn threads_s(pid: i32, fallback: f64) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return fallback;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let path = t.path().join("schedstat");
        let Some(run) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        else {
            return fallback;
        };
        ns += run;
    }
    ns as f64 / 1e9
}

/// Reads the counters now; `daemon` is the daemon's pid when this run started it.
pub fn read(daemon: Option<u32>, generator: GeneratorIn) -> Result<Reading, BenchError> {
    let (pre, cpus) = counters(generator)?;
    let mut r = Reading {
        pre,
        post: pre,
        cpus,
        ..Reading::default()
    };
    let Some(daemon) = daemon.and_then(|d| i32::try_from(d).ok()) else {
        return Ok(r);
    };
    // Every process whose chain of parents reaches the daemon: its own time and its waited-for
    // children's; the daemon's own time apart, its waited-for children's under it.
    let hz = ticks_per_second();
    let mut procs = HashMap::new();
    for p in procfs::process::all_processes().map_err(proc_err("the process list"))? {
        let Ok(p) = p else { continue };
        if let Ok(st) = p.stat() {
            let children = (st.cutime + st.cstime).max(0) as f64 / hz;
            procs.insert(
                st.pid,
                (st.ppid, (st.utime + st.stime) as f64 / hz, children),
            );
        }
    }
    let under_daemon = |pid: i32| {
        let mut at = pid;
        for _ in 0..64 {
            match procs.get(&at) {
                Some(&(pp, _, _)) if pp == daemon => return true,
                Some(&(pp, _, _)) if pp > 1 => at = pp,
                _ => return false,
            }
        }
        false
    };
    if let Some(&(_, rounded, children)) = procs.get(&daemon) {
        r.daemon_s = Some(threads_s(daemon, rounded));
        r.under_s = children;
    }
    for (&pid, &(_, rounded, children)) in &procs {
        if under_daemon(pid) {
            r.under_s += threads_s(pid, rounded) + children;
        }
    }
    r.post = counters(generator)?.0;
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

/// `requests` served between `a` and `b`, per request: the machine's and the generator's
/// counters from after `a`'s walk over the processes to before `b`'s. The rest is what no
/// counted process used; a small negative one is the counters' rounding (ticks of 10 ms).
pub fn per_request(a: &Reading, b: &Reading, requests: u64) -> PerRequest {
    let n = requests.max(1) as f64;
    let us = |s: f64| s * 1e6 / n;
    let machine = b.pre.machine_s - a.post.machine_s;
    let daemon = a.daemon_s.zip(b.daemon_s).map(|(x, y)| y - x);
    let under = daemon.map(|_| b.under_s - a.under_s);
    let generator = b.pre.generator_s - a.post.generator_s;
    let rest = machine - daemon.unwrap_or(0.0) - under.unwrap_or(0.0) - generator;
    PerRequest {
        machine_us: us(machine),
        daemon_us: daemon.map(us),
        under_us: under.map(us),
        generator_us: us(generator),
        rest_us: us(rest),
        switches: b.pre.switches.saturating_sub(a.post.switches) as f64 / n,
    }
}

/// The share of the machine's CPU time that was busy between `a` and `b`, `wall_s` apart.
pub fn busy(a: &Reading, b: &Reading, wall_s: f64) -> f64 {
    (b.pre.machine_s - a.post.machine_s) / (wall_s * b.cpus as f64).max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    fn spin(cmd: &str, group: bool) -> std::process::Child {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", cmd]);
        if group {
            c.process_group(0);
        }
        c.spawn().unwrap()
    }

    #[test]
    fn processes_under_the_daemon_count_alive_deep_down_or_ended() {
        // This test process plays the daemon.
        let me = Some(std::process::id());
        let gen = GeneratorIn::Self_;
        // A grandchild that spins under a child that only waits: found through its parents.
        let mut family = spin("sh -c 'while :; do :; done' & wait", true);
        std::thread::sleep(Duration::from_millis(50));
        let a = read(me, gen).unwrap();
        assert!(a.daemon_s.is_some());
        std::thread::sleep(Duration::from_millis(300));
        let b = read(me, gen).unwrap();
        let pgid = nix::unistd::Pid::from_raw(family.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = family.wait();
        // Spinning for 300 ms, it gets a good part of a CPU even on a busy machine.
        let p = per_request(&a, &b, 1);
        assert!(p.under_us.unwrap() > 30_000.0, "the grandchild: {p:?}");

        // Children that end (waited for) before the second reading, one started in between.
        let mut early = spin("while :; do :; done", false);
        let a = read(me, gen).unwrap();
        let mut late = spin("while :; do :; done", false);
        std::thread::sleep(Duration::from_millis(300));
        for c in [&mut early, &mut late] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let b = read(me, gen).unwrap();
        let p = per_request(&a, &b, 1);
        assert!(p.under_us.unwrap() > 60_000.0, "ended children: {p:?}");
        assert!(p.machine_us >= p.under_us.unwrap() * 0.9, "{p:?}");

        // Without the daemon's pid only the machine and the generator are known.
        let c = read(None, GeneratorIn::Children).unwrap();
        let q = per_request(&c, &c, 10);
        assert_eq!((q.daemon_us, q.under_us), (None, None));
        assert_eq!(q.machine_us, 0.0);
    }

    #[test]
    fn per_request_splits_the_machine_and_keeps_a_negative_rest() {
        let counters = |machine_s, switches, generator_s| Counters {
            machine_s,
            switches,
            generator_s,
        };
        let a = Reading {
            pre: counters(9.0, 90, 0.9),
            post: counters(10.0, 100, 1.0),
            cpus: 2,
            daemon_s: Some(5.0),
            under_s: 3.0,
        };
        let b = Reading {
            pre: counters(11.0, 300, 1.2),
            post: counters(12.0, 400, 1.3),
            cpus: 2,
            daemon_s: Some(5.5),
            under_s: 3.3,
        };
        // From after a's walk to before b's: 1 s of machine time over 1000 requests.
        let p = per_request(&a, &b, 1000);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-6;
        assert!(close(p.machine_us, 1000.0), "{p:?}");
        assert!(close(p.daemon_us.unwrap(), 500.0), "{p:?}");
        assert!(close(p.under_us.unwrap(), 300.0), "{p:?}");
        assert!(close(p.generator_us, 200.0), "{p:?}");
        assert!(close(p.rest_us, 0.0), "{p:?}");
        assert!(close(p.switches, 0.2), "{p:?}");
        assert!(close(busy(&a, &b, 1.0), 0.5));
        // Counters rounded to ticks may leave a little less than the parts: shown, not hidden.
        let c = Reading {
            daemon_s: Some(5.6),
            ..b.clone()
        };
        assert!(per_request(&a, &c, 1000).rest_us < 0.0);
        assert_eq!(
            per_request(&a, &b, 1000).cells(false),
            "1000 us | 500 us | 300 us | 200 us | 0 us"
        );
        // Without the daemon: no daemon or under cells.
        let (mut a2, mut b2) = (a.clone(), b.clone());
        a2.daemon_s = None;
        b2.daemon_s = None;
        assert_eq!(
            per_request(&a2, &b2, 1000).cells(true),
            "1.00 ms | - | - | 0.20 ms | 0.80 ms"
        );
    }
}
