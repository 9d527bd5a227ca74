//! Network egress for sandboxes: a bridge Spore owns, one veth pair per sandbox, and an
//! nftables table (`inet spore_<tag>`) that masquerades the sandboxes' traffic to the host's
//! uplink while dropping everything addressed to the host itself, to link-local and metadata
//! addresses (169.254.0.0/16), to other sandboxes (the bridge ports are isolated, and routed
//! traffic between Spore bridges is dropped) and every connection opened towards a sandbox.
//!
//! The bridge is made with iproute2's `ip` and the rules with `nft` (Debian's `iproute2` and
//! `nftables`), once per daemon, under a host-wide lock so that daemons starting together pick
//! different subnets. Each sandbox's veth pair, address and route are made over rtnetlink
//! ([`crate::netlink`]), never on a fork's critical path: cfork templates keep egress-ready
//! network namespaces made ahead of time.
//!
//! Who may do what: only the daemon (root) runs these commands; a sandbox gets its address
//! and default route and nothing else (it has no capability in the host's network namespace).

use crate::netlink::Rtnl;
use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where sandboxes' default subnets are taken from when none is configured: the first /21 of
/// this range that no host route overlaps (so that several daemons can share a host).
pub const DEFAULT_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 214, 0, 0), 16);
/// Prefix length of a subnet chosen from [`DEFAULT_RANGE`].
pub const DEFAULT_PREFIX: u8 = 21;
/// Name of the interface inside an egress sandbox.
pub const SANDBOX_IF: &str = "eth0";

/// Errors from setting up egress.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// A configured value is wrong.
    #[error("Invalid egress setting: {0}")]
    Invalid(String),
    /// A command failed.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed (or why it could not start).
        output: String,
    },
    /// A netlink request setting up a sandbox's network failed.
    #[error("Setting up {what}")]
    Setup {
        /// What was being set up.
        what: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Every address of the subnet is in use.
    #[error("No free address left in the egress subnet {0}")]
    Exhausted(String),
    /// Reading host state failed.
    #[error("Reading {what}")]
    Io {
        /// What was read.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// An IPv4 subnet, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 8-30.
    pub prefix: u8,
}

impl Subnet {
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// Whether the two overlap.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let m = Self::mask(self.prefix.min(other.prefix));
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    /// Number of host addresses (network, gateway and broadcast excluded).
    pub fn sandbox_slots(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))).saturating_sub(3)
    }

    /// The `i`-th address (0 is the network address).
    pub fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + i)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = EgressError;
    fn from_str(s: &str) -> Result<Subnet, EgressError> {
        let bad = |why: &str| EgressError::Invalid(format!("subnet {s:?}: {why}"));
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| bad("expected an IPv4 CIDR such as 10.214.0.0/16"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("not a prefix length"))?;
        if !(8..=28).contains(&prefix) {
            return Err(bad("the prefix length must be between 8 and 28"));
        }
        if u32::from(addr) & !Self::mask(prefix) != 0 {
            return Err(bad("host bits are set"));
        }
        if !addr.is_private() {
            return Err(bad("not a private range (10/8, 172.16/12 or 192.168/16)"));
        }
        Ok(Subnet { addr, prefix })
    }
}

/// What a sandbox's network set-up needs: made by [`Egress::lease`], carried in the
/// [`crate::SandboxSpec`] and applied by [`attach`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    /// The host end of the veth pair.
    pub host_if: String,
    /// The bridge it joins.
    pub bridge: String,
    /// The sandbox's address.
    pub addr: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix: u8,
    /// The bridge's address, the sandbox's default route.
    pub gateway: Ipv4Addr,
}

/// A daemon's egress: its bridge, its nftables table, and the addresses it hands out.
#[derive(Debug)]
pub struct Egress {
    tag: String,
    subnet: Subnet,
    bridge: String,
    table: String,
    nameservers: Vec<String>,
    next: Mutex<u32>,
    /// Index -> when it was leased; an index is free again once its interface is gone.
    leased: Mutex<HashMap<u32, Instant>>,
    forwarding: Mutex<bool>,
}

/// The full path of a system tool: sandbox inits run with an empty environment (no PATH).
fn tool(name: &str) -> std::path::PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| name.into())
}

/// Runs `program args`, feeding `stdin`; fails with what it printed.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), EgressError> {
    let line = format!("{program} {}", args.join(" "));
    let fail = |output: String| EgressError::Command {
        command: line.clone(),
        output,
    };
    let mut child = Command::new(tool(program))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// Where daemons serialise choosing and making their bridges (root-only: `/run` is).
const HOST_LOCK: &str = "/run/spore/egress.lock";

/// An exclusive lock, host-wide, held while a daemon removes leftovers, picks its subnet and
/// makes its bridge, so that daemons starting at the same time see each other's routes.
fn host_lock() -> Result<nix::fcntl::Flock<std::fs::File>, EgressError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |source| EgressError::Io {
        what: HOST_LOCK.into(),
        source,
    };
    let dir = Path::new(HOST_LOCK).parent().expect("has a parent");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(HOST_LOCK)
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io(errno.into()))
}

/// The IPv4 routes of the host's main table, as subnets.
pub fn host_routes() -> Result<Vec<Subnet>, EgressError> {
    let text = std::fs::read_to_string("/proc/net/route").map_err(|source| EgressError::Io {
        what: "/proc/net/route".into(),
        source,
    })?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
        else {
            continue;
        };
        // The file prints the address's bytes (network order) read as a native integer.
        let dst = Ipv4Addr::from(dst.to_ne_bytes());
        let prefix = mask.count_ones() as u8;
        if prefix == 0 {
            continue; // the default route overlaps everything by design
        }
        out.push(Subnet { addr: dst, prefix });
    }
    Ok(out)
}

/// The nameservers of the host's resolv.conf that a sandbox can reach (not loopback).
fn host_nameservers() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (mut ok, mut skipped) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(ns) = words.next() else { continue };
        match ns.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_loopback() => skipped.push(ns.to_owned()),
            Ok(std::net::IpAddr::V4(v4)) if v4.is_link_local() => skipped.push(ns.to_owned()),
            Ok(std::net::IpAddr::V4(_)) => ok.push(ns.to_owned()),
            // Sandboxes get no IPv6 route.
            _ => skipped.push(ns.to_owned()),
        }
    }
    (ok, skipped)
}

impl Egress {
    /// Sets up egress for the daemon whose sandboxes are tagged `tag` (a few hex digits,
    /// unique per data dir): removes what a previous daemon with the same tag left, then makes
    /// the bridge (`spb<tag>`, the subnet's first address) and the table `inet spore_<tag>`.
    /// `subnet` given is refused when it overlaps a host route; not given, the first free /21
    /// of [`DEFAULT_RANGE`] is used. IPv4 forwarding is turned on only by
    /// [`Egress::enable_forwarding`]. Returns it with warnings for the operator.
    pub fn setup(tag: &str, subnet: Option<Subnet>) -> Result<(Egress, Vec<String>), EgressError> {
        if tag.is_empty() || tag.len() > 5 || !tag.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(EgressError::Invalid(format!("tag {tag:?}: 1-5 hex digits")));
        }
        let bridge = format!("spb{tag}");
        let table = format!("spore_{tag}");
        let mut warnings = Vec::new();
        // Daemons starting together would otherwise read the same host routes and pick the
        // same free subnet; the second bridge's route then steals the first one's replies.
        let _host_lock = host_lock()?;
        let swept = remove_leftovers(tag, &table) + remove_orphans();
        if swept > 0 {
            warnings.push(format!(
                "removed the network egress set-up a previous daemon left ({swept} interfaces)"
            ));
        }
        let routes = host_routes()?;
        let subnet = match subnet {
            Some(s) => {
                if let Some(r) = routes.iter().find(|r| r.overlaps(&s)) {
                    return Err(EgressError::Invalid(format!(
                        "the egress subnet {s} overlaps the host route {r}; choose another with --egress-subnet"
                    )));
                }
                s
            }
            None => {
                let (base, len) = DEFAULT_RANGE;
                let blocks = 1u32 << (DEFAULT_PREFIX - len);
                (0..blocks)
                    .map(|i| Subnet {
                        addr: Ipv4Addr::from(u32::from(base) + (i << (32 - DEFAULT_PREFIX))),
                        prefix: DEFAULT_PREFIX,
                    })
                    .find(|s| !routes.iter().any(|r| r.overlaps(s)))
                    .ok_or_else(|| {
                        EgressError::Invalid(format!(
                            "every /{DEFAULT_PREFIX} of {base}/{len} overlaps a host route; set --egress-subnet"
                        ))
                    })?
            }
        };
        let (nameservers, skipped) = host_nameservers();
        if !skipped.is_empty() {
            warnings.push(format!(
                "egress sandboxes cannot use the host's nameservers {} (loopback, link-local or IPv6): {}",
                skipped.join(", "),
                if nameservers.is_empty() {
                    "they get no resolver and can reach the internet by address only; put a reachable nameserver in /etc/resolv.conf"
                } else {
                    "they use the others"
                }
            ));
        }
        let egress = Egress {
            tag: tag.to_owned(),
            subnet,
            bridge,
            table,
            nameservers,
            next: Mutex::new(2),
            leased: Mutex::new(HashMap::new()),
            forwarding: Mutex::new(false),
        };
        egress.create()?;
        Ok((egress, warnings))
    }

    fn create(&self) -> Result<(), EgressError> {
        let gw = format!("{}/{}", self.gateway(), self.subnet.prefix);
        let br = &self.bridge;
        // The alias names the daemon, so that a later daemon can remove the set-up of one
        // that died without removing it (`remove_orphans`).
        let batch = format!(
            "link add {br} type bridge\n\
             link set {br} alias {ALIAS_PREFIX}{pid}\n\
             addr add {gw} dev {br}\n\
             link set {br} up\n",
            pid = std::process::id()
        );
        run("ip", &["-batch", "-"], Some(&batch))?;
        let subnet = self.subnet;
        let rules = format!(
            "table inet {table} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority -10; policy accept;\n\
             \t\tiifname \"{br}\" drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority -10; policy accept;\n\
             \t\tiifname \"{br}\" ip daddr 169.254.0.0/16 drop\n\
             \t\tiifname \"{br}\" ip daddr {subnet} drop\n\
             \t\tiifname \"{br}\" oifname \"spb*\" drop\n\
             \t\tiifname \"{br}\" meta nfproto ipv6 drop\n\
             \t\toifname \"{br}\" ct state established,related accept\n\
             \t\toifname \"{br}\" drop\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority 100; policy accept;\n\
             \t\tip saddr {subnet} oifname != \"{br}\" masquerade\n\
             \t}}\n\
             }}\n",
            table = self.table,
        );
        if let Err(e) = run("nft", &["-f", "-"], Some(&rules)) {
            let _ = run("ip", &["link", "del", br], None);
            return Err(e);
        }
        Ok(())
    }

    /// Turns on IPv4 forwarding (`net.ipv4.ip_forward`), a host-wide setting that stays on
    /// after the daemon exits (other software may depend on it by then).
    pub fn enable_forwarding(&self) -> Result<(), EgressError> {
        let mut on = self.forwarding.lock().expect("forwarding");
        if *on {
            return Ok(());
        }
        let path = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(path)
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
        {
            *on = true;
            return Ok(());
        }
        std::fs::write(path, "1").map_err(|source| EgressError::Io {
            what: format!("writing 1 to {path}"),
            source,
        })?;
        *on = true;
        Ok(())
    }

    /// The subnet sandboxes get addresses from.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The nftables table's name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The bridge's address, every sandbox's gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1)
    }

    /// The resolv.conf an egress sandbox gets (the host's reachable nameservers).
    pub fn resolv_conf(&self) -> String {
        let mut s = String::new();
        for ns in &self.nameservers {
            s.push_str(&format!("nameserver {ns}\n"));
        }
        s.push_str("options timeout:2 attempts:2\n");
        s
    }

    fn if_name(&self, index: u32) -> String {
        format!("spv{}{index:x}", self.tag)
    }

    /// Reserves an address and an interface name for one sandbox. An address is free again
    /// once its sandbox's network namespace is gone (its veth pair goes with it), checked
    /// when the allocator comes round to it.
    pub fn lease(&self) -> Result<Lease, EgressError> {
        self.enable_forwarding()?;
        let slots = self.subnet.sandbox_slots();
        let mut next = self.next.lock().expect("egress next");
        let mut leased = self.leased.lock().expect("egress leases");
        for _ in 0..slots {
            let i = *next;
            *next = if i + 1 >= slots + 2 { 2 } else { i + 1 };
            let name = self.if_name(i);
            let in_use = Path::new("/sys/class/net").join(&name).exists()
                || leased
                    .get(&i)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
            if in_use {
                continue;
            }
            leased.insert(i, Instant::now());
            return Ok(Lease {
                host_if: name,
                bridge: self.bridge.clone(),
                addr: self.subnet.nth(i),
                prefix: self.subnet.prefix,
                gateway: self.gateway(),
            });
        }
        Err(EgressError::Exhausted(self.subnet.to_string()))
    }

    /// Removes the table, the bridge and every interface of this daemon's sandboxes.
    pub fn teardown(&self) {
        remove_leftovers(&self.tag, &self.table);
    }
}

/// What a bridge's alias starts with, followed by its daemon's pid.
const ALIAS_PREFIX: &str = "spore-daemon-";

/// Removes the egress set-up (bridge, veths, table) of every daemon on this host that exited
/// without removing it (killed), whatever its data dir: found by the bridges' aliases, whose
/// pid is no longer a process. Returns how many interfaces went.
fn remove_orphans() -> usize {
    let mut n = 0;
    for (name, alias) in links() {
        let Some(tag) = name.strip_prefix("spb") else {
            continue;
        };
        let Some(pid) = alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            n += remove_leftovers(tag, &format!("spore_{tag}"));
        }
    }
    n
}

/// The network interfaces of this process's network namespace, with their aliases, as `ip
/// -o link show` lists them (`/sys/class/net` shows the namespace sysfs was mounted in, which
/// is not this one for a daemon started in another namespace with `nsenter`).
fn links() -> Vec<(String, Option<String>)> {
    let Ok(out) = Command::new(tool("ip"))
        .args(["-o", "link", "show"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // `7: spb1a2b3: <BROADCAST,...> ... \    alias spore-daemon-42`
            let name = line.split(": ").nth(1)?;
            let name = name.split('@').next()?.to_owned();
            let alias = line
                .split("alias ")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap_or_default().to_owned());
            Some((name, alias))
        })
        .collect()
}

/// Removes the table and the interfaces named after `tag`; returns how many interfaces went.
fn remove_leftovers(tag: &str, table: &str) -> usize {
    let _ = run("nft", &["delete", "table", "inet", table], None);
    let mut n = 0;
    let bridge = format!("spb{tag}");
    let veth = format!("spv{tag}");
    for (name, _) in links() {
        if (name == bridge || name.starts_with(&veth))
            && run("ip", &["link", "del", &name], None).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Gives the network namespace at `netns` (a path such as `/proc/PID/ns/net` or
/// `/proc/PID/fd/N`) egress through `lease`: a veth pair whose host end joins the bridge (an
/// isolated port) and whose other end, `eth0` in the namespace, gets the lease's address and a
/// default route via the bridge. Must run in the host's network namespace, as root. Loopback
/// is left as it is. This is the call a build sandbox (or any other) uses:
///
/// ```no_run
/// # fn f(egress: &spore_sandbox::egress::Egress) -> Result<(), spore_sandbox::egress::EgressError> {
/// let lease = egress.lease()?;
/// spore_sandbox::egress::attach(&lease, "/proc/4242/ns/net")?;
/// # Ok(()) }
/// ```
pub fn attach(lease: &Lease, netns: &str) -> Result<(), EgressError> {
    let Lease {
        host_if,
        bridge,
        addr,
        prefix,
        gateway,
    } = lease;
    let io = |what: String| move |source| EgressError::Setup { what, source };
    let ns = std::fs::File::open(netns).map_err(io(format!("the network namespace {netns}")))?;
    let mut host = Rtnl::open().map_err(io("a netlink socket".into()))?;
    let bridge_index = host
        .index_of(bridge)
        .map_err(io(format!("the bridge {bridge}")))?;
    host.add_veth(host_if, SANDBOX_IF, &ns, bridge_index)
        .map_err(io(format!("a veth pair into {netns}")))?;
    let inside = (|| -> std::io::Result<()> {
        let index = host.index_of(host_if)?;
        host.isolate_port_and_up(index)?;
        let mut sandbox = Rtnl::open_in(&ns)?;
        let index = sandbox.index_of(SANDBOX_IF)?;
        sandbox.add_address(index, *addr, *prefix)?;
        sandbox.up(index)?;
        sandbox.add_default_route(index, *gateway)
    })();
    if let Err(e) = inside {
        let _ = host.delete(host_if);
        return Err(EgressError::Setup {
            what: format!("the sandbox side of {host_if} ({netns})"),
            source: e,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_overlap() {
        let a: Subnet = "10.214.0.0/16".parse().unwrap();
        let b: Subnet = "10.214.8.0/21".parse().unwrap();
        let c: Subnet = "10.215.0.0/16".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert_eq!(b.nth(1), Ipv4Addr::new(10, 214, 8, 1));
        assert_eq!(b.sandbox_slots(), 2045);
        for bad in [
            "10.214.0.1/16",
            "8.8.8.0/24",
            "10.0.0.0/4",
            "10.0.0.0",
            "x/8",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    /// `ip` with `args`; its output.
    fn ip(args: &[&str]) -> String {
        let out = Command::new(tool("ip")).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn attach_over_netlink_gives_an_isolated_port_an_address_and_a_route() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (creates a bridge and a network namespace)");
            return;
        }
        let tag = format!("{:x}", std::process::id() % 0xffff);
        let (br, ns, veth) = (
            format!("sptb{tag}"),
            format!("sptn{tag}"),
            format!("sptv{tag}"),
        );
        let _ = Command::new(tool("ip")).args(["link", "del", &br]).status();
        let _ = Command::new(tool("ip"))
            .args(["netns", "del", &ns])
            .status();
        assert!(Command::new(tool("ip"))
            .args(["link", "add", &br, "type", "bridge"])
            .status()
            .unwrap()
            .success());
        assert!(Command::new(tool("ip"))
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success());
        let lease = Lease {
            host_if: veth.clone(),
            bridge: br.clone(),
            addr: Ipv4Addr::new(10, 213, 7, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 213, 7, 1),
        };
        let path = format!("/var/run/netns/{ns}");
        let attached = attach(&lease, &path);
        let port = ip(&["-d", "link", "show", &veth]);
        let addr = ip(&["-n", &ns, "-4", "addr", "show", SANDBOX_IF]);
        let route = ip(&["-n", &ns, "route"]);
        // A bridge that does not exist is named in the error, and no veth is left behind.
        let missing = attach(
            &Lease {
                bridge: "spt-nobridge".into(),
                host_if: format!("{veth}x"),
                ..lease.clone()
            },
            &path,
        );
        let leftover = ip(&["link", "show", &format!("{veth}x")]);
        let _ = Command::new(tool("ip"))
            .args(["link", "del", &veth])
            .status();
        let _ = Command::new(tool("ip")).args(["link", "del", &br]).status();
        let _ = Command::new(tool("ip"))
            .args(["netns", "del", &ns])
            .status();
        attached.unwrap();
        assert!(port.contains(&format!("master {br}")), "{port}");
        assert!(
            port.contains("isolated on") && port.contains("learning off"),
            "{port}"
        );
        assert!(port.contains(",UP"), "{port}");
        assert!(
            addr.contains("inet 10.213.7.2/24") && addr.contains("UP"),
            "{addr}"
        );
        assert!(route.contains("default via 10.213.7.1 dev eth0"), "{route}");
        let e = missing.unwrap_err().to_string();
        assert!(e.contains("spt-nobridge"), "{e}");
        assert!(leftover.is_empty(), "{leftover}");
    }

    #[test]
    fn daemons_starting_together_pick_different_subnets() {
        if !nix::unistd::Uid::effective().is_root() || !tool("nft").is_absolute() {
            eprintln!("skipped: needs root and nft (creates bridges and nftables tables)");
            return;
        }
        let base = std::process::id() % 0xfff0;
        let tags: Vec<String> = (0..4).map(|i| format!("{:x}", base + i)).collect();
        let barrier = std::sync::Barrier::new(tags.len());
        let made: Vec<Result<Egress, EgressError>> = std::thread::scope(|s| {
            let joins: Vec<_> = tags
                .iter()
                .map(|tag| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        Egress::setup(tag, None).map(|(e, _)| e)
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        let subnets: Vec<String> = made
            .iter()
            .filter_map(|e| e.as_ref().ok().map(|e| e.subnet().to_string()))
            .collect();
        for e in made.iter().flatten() {
            e.teardown();
        }
        assert_eq!(subnets.len(), tags.len(), "{made:?}");
        let distinct: std::collections::HashSet<_> = subnets.iter().collect();
        assert_eq!(distinct.len(), subnets.len(), "{subnets:?}");
    }

    #[test]
    fn host_routes_include_a_connected_one() {
        // Every host with a network has at least one non-default route; the parse must not
        // invent prefixes.
        for r in host_routes().unwrap() {
            assert!(r.prefix > 0 && r.prefix <= 32, "{r}");
        }
    }
}
