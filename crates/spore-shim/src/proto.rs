//! What travels over the link: the greeting, a unit's description and load, and the calls the
//! control plane makes on a unit's shim with their answers. Headers are JSON (small, easy to
//! evolve: unknown fields are ignored); bodies (events, results, code packages) are raw bytes.

use serde::{Deserialize, Serialize};
use spore_core::dag::DagSpec;
use spore_core::{FunctionError, FunctionManifest, StartKind};

/// Link protocol versions this build speaks (inclusive).
pub const VERSIONS: (u16, u16) = (1, 1);

/// The id of the unit the control plane runs itself.
pub const CONTROL_UNIT: u32 = 0;

/// Bounds on what a unit may declare in its greeting: anything outside them is refused with
/// the reason (a greeting is read before the unit is trusted with any work).
pub mod limits {
    /// Highest unit id (`spore shim --id` takes 1..=MAX_UNIT_ID).
    pub const MAX_UNIT_ID: u32 = 65_535;
    /// Largest greeting payload (JSON), bytes.
    pub const MAX_GREETING: usize = 16 * 1024;
    /// Longest `arch` and accelerator name.
    pub const MAX_NAME: usize = 32;
    /// Most accelerators.
    pub const MAX_ACCELERATORS: usize = 16;
    /// Longest host name (DNS's limit).
    pub const MAX_HOSTNAME: usize = 253;
    /// Longest version string.
    pub const MAX_VERSION: usize = 64;
    /// Most cores a unit may declare.
    pub const MAX_CORES: u32 = 4096;
    /// Most memory a unit may declare, MiB (64 TiB).
    pub const MAX_MEMORY_MB: u64 = 64 << 20;
    /// Most neighbour units a heartbeat may list.
    pub const MAX_NEIGHBOURS: usize = 1024;
}

/// What a processing unit declares about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitInfo {
    /// Unit id, unique in the cluster (0: the control plane's own).
    pub id: u32,
    /// Instruction set (`x86_64`, `aarch64`, ...).
    pub arch: String,
    /// CPU cores available to sandboxes.
    pub cores: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Accelerators (`gpu`, `fpga`, ...).
    #[serde(default)]
    pub accelerators: Vec<String>,
    /// Host name, for people reading `spore units`.
    #[serde(default)]
    pub hostname: String,
    /// The Spore version the unit runs.
    #[serde(default)]
    pub version: String,
    /// Where the unit's shim takes neighbour links from other shims (HOST:PORT), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl UnitInfo {
    /// Describes this host as unit `id`: its architecture, cores and memory, and a `gpu` if
    /// an NVIDIA device node is present. `arch` and `accelerators` override what is detected
    /// (to declare a unit's role when simulating a DPU or an accelerator host).
    pub fn detect(id: u32, arch: Option<String>, accelerators: Option<Vec<String>>) -> UnitInfo {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mb = meminfo_mb("MemTotal");
        let detected = if std::path::Path::new("/dev/nvidia0").exists() {
            vec!["gpu".to_owned()]
        } else {
            Vec::new()
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        UnitInfo {
            id,
            arch: arch.unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
            cores,
            memory_mb,
            accelerators: accelerators.unwrap_or(detected),
            hostname,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            link: None,
        }
    }

    /// Checks what the unit declares against [`limits`]; the error says which field is out of
    /// bounds.
    pub fn validate(&self) -> Result<(), String> {
        use limits::*;
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= MAX_NAME
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        let printable = |s: &str, max: usize| s.len() <= max && !s.chars().any(char::is_control);
        if self.id > MAX_UNIT_ID {
            return Err(format!(
                "unit id {} is out of range (0..={MAX_UNIT_ID})",
                self.id
            ));
        }
        if !name_ok(&self.arch) {
            return Err(format!(
                "arch must be 1-{MAX_NAME} letters, digits, '_', '-' or '.' (got {} bytes)",
                self.arch.len()
            ));
        }
        if self.cores == 0 || self.cores > MAX_CORES {
            return Err(format!(
                "cores {} is out of range (1..={MAX_CORES})",
                self.cores
            ));
        }
        if self.memory_mb > MAX_MEMORY_MB {
            return Err(format!(
                "memory {} MiB is out of range (at most {MAX_MEMORY_MB})",
                self.memory_mb
            ));
        }
        if self.accelerators.len() > MAX_ACCELERATORS {
            return Err(format!(
                "{} accelerators (at most {MAX_ACCELERATORS})",
                self.accelerators.len()
            ));
        }
        if let Some(bad) = self.accelerators.iter().find(|a| !name_ok(a)) {
            return Err(format!(
                "an accelerator name must be 1-{MAX_NAME} letters, digits, '_', '-' or '.' (got {} bytes)",
                bad.len()
            ));
        }
        if !printable(&self.hostname, MAX_HOSTNAME) {
            return Err(format!(
                "the host name must be at most {MAX_HOSTNAME} printable characters (got {} bytes)",
                self.hostname.len()
            ));
        }
        if !printable(&self.version, MAX_VERSION) {
            return Err(format!(
                "the version must be at most {MAX_VERSION} printable characters (got {} bytes)",
                self.version.len()
            ));
        }
        if let Some(l) = &self.link {
            if l.len() > 64 || l.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!(
                    "the neighbour link address must be IP:PORT (got {} bytes)",
                    l.len()
                ));
            }
        }
        Ok(())
    }

    /// Why this unit cannot run a function that needs `arch` and `accelerator`, if it cannot.
    pub fn lacks(&self, arch: Option<&str>, accelerator: Option<&str>) -> Option<String> {
        if let Some(a) = arch {
            if a != self.arch {
                return Some(format!("unit {} is {}, not {a}", self.id, self.arch));
            }
        }
        if let Some(acc) = accelerator {
            if !self.accelerators.iter().any(|x| x == acc) {
                return Some(format!("unit {} has no {acc}", self.id));
            }
        }
        None
    }
}

/// One `/proc/meminfo` field (`MemTotal`, `MemAvailable`, ...) in MiB (0 if unreadable).
pub fn meminfo_mb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// A unit's load, sent with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitLoad {
    /// Invocations running.
    pub inflight: u32,
    /// Live instances (idle and busy).
    pub instances: u32,
    /// Live cfork templates.
    pub templates: u32,
    /// `MemAvailable`, MiB.
    pub mem_available_mb: u64,
    /// Units this shim holds a neighbour link to (DAG edges go there directly).
    #[serde(default)]
    pub neighbours: Vec<u32>,
}

/// Which side of the link a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The control plane (`spore serve`).
    Control,
    /// A unit's shim (`spore shim`).
    Shim,
}

/// The dialer's greeting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest link version the dialer speaks.
    pub min_version: u16,
    /// Highest.
    pub max_version: u16,
    /// The dialer's role.
    pub role: Role,
    /// The dialer's unit.
    pub unit: UnitInfo,
}

/// The acceptor's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloAck {
    /// The version both speak.
    pub version: u16,
    /// The acceptor's role.
    pub role: Role,
    /// The acceptor's unit.
    pub unit: UnitInfo,
}

/// A shim's request to join the cluster, sent once over a join connection (TLS, the control
/// plane's certificate checked against the CA fingerprint in the token).
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The unit the shim will be.
    pub unit: u32,
    /// The join token (`spore cluster token`).
    pub token: String,
    /// A certificate signing request (PEM) for the shim's own key: the key never leaves it.
    pub csr: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("unit", &self.unit)
            .finish_non_exhaustive()
    }
}

/// The control plane's answer to a join: the unit's certificate and the cluster CA's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinAnswer {
    /// The unit's certificate (PEM), signed by the cluster CA, naming the unit.
    pub cert: String,
    /// The cluster CA's certificate (PEM).
    pub ca: String,
}

/// The highest version both ranges hold.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let hi = ours.1.min(theirs.1);
    let lo = ours.0.max(theirs.0);
    (lo <= hi).then_some(hi)
}

/// A call the control plane makes on a shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// Invoke a function; the body is the event. The shim answers
    /// [`RemoteErrorKind::NeedsCode`] if it does not hold exactly this code and manifest.
    Invoke {
        /// The function's manifest on the control plane.
        manifest: FunctionManifest,
        /// The control plane's code id (sha-256 hex of its package).
        code: String,
        /// Serve from a fresh instance.
        #[serde(default)]
        force_cold: bool,
        /// With `force_cold`: how it starts (None: the function's default).
        #[serde(default)]
        cold_path: Option<StartKind>,
        /// How a restore installs memory (`full`, `lazy`, `reap`; None: the unit's default).
        #[serde(default)]
        restore_mode: Option<String>,
    },
    /// Install or replace a function; the body is its code package (zip).
    Deploy {
        /// Manifest.
        manifest: FunctionManifest,
        /// Description.
        #[serde(default)]
        description: String,
        /// The control plane's code id.
        code: String,
    },
    /// Remove a function from the unit.
    Remove {
        /// Its name.
        function: String,
    },
    /// The functions the control plane knows: the unit drops any other.
    Sync {
        /// Their names.
        functions: Vec<String>,
    },
    /// Send the body back (link measurements).
    Echo,
    /// Build this unit's segment of a DAG spread over units: one instance per node placed
    /// here, shared-memory edges between them, and the daemon's ends of the edges that
    /// cross to other units. `NeedsCode` if the unit lacks one of `functions`.
    SegmentOpen {
        /// The pipeline's key (chosen by the control plane).
        key: String,
        /// The whole DAG.
        spec: DagSpec,
        /// The unit of each node, in `spec.nodes` order.
        units: Vec<u32>,
        /// Manifest and code id of each function of the nodes placed here.
        functions: Vec<(FunctionManifest, String)>,
        /// Where the other shims of the DAG take neighbour links (unit, HOST:PORT): values
        /// for their nodes go there directly instead of through the control plane. (A list:
        /// integer map keys do not survive the tagged enum's JSON.)
        #[serde(default)]
        neighbours: Vec<(u32, String)>,
    },
    /// A value on edge `edge` (numbered as [`crate::proto::spread_edges`] says) of invocation
    /// `seq` of segment `key`; the body is the value. Control plane to the unit of the edge's
    /// consumer, and a unit to the control plane for edges leaving its segment.
    EdgeValue {
        /// The pipeline's key.
        key: String,
        /// The invocation.
        seq: u64,
        /// The edge.
        edge: usize,
        /// Raw bytes rather than JSON.
        raw: bool,
        /// The invocation's deadline, unix ms.
        deadline_ms: u64,
        /// The invocation's request id.
        request_id: String,
        /// (unit to control plane) Timing of the segment's nodes that finished this
        /// invocation so far.
        #[serde(default)]
        times: Vec<NodeTimes>,
    },
    /// (unit to control plane) A node of segment `key` failed during invocation `seq`; the
    /// segment serves no more.
    SegmentFailed {
        /// The pipeline's key.
        key: String,
        /// The invocation.
        seq: u64,
        /// The node (index in the DAG).
        node: usize,
        /// What happened.
        error: FunctionError,
    },
    /// (unit to control plane) Timing of segment `key`'s nodes in invocation `seq`, sent
    /// after a value that left the segment.
    SegmentTimes {
        /// The pipeline's key.
        key: String,
        /// The invocation.
        seq: u64,
        /// The nodes that finished.
        times: Vec<NodeTimes>,
    },
    /// Stop segment `key` and destroy its instances.
    SegmentClose {
        /// The pipeline's key.
        key: String,
    },
}

/// A node's timing in one invocation (`CLOCK_MONOTONIC` ns on its unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTimes {
    /// The node (index in the DAG).
    pub node: usize,
    /// Every input had arrived.
    pub inputs_ns: u64,
    /// The handler started.
    pub start_ns: u64,
    /// The handler returned.
    pub end_ns: u64,
    /// The result was on every output edge.
    pub sent_ns: u64,
}

/// The edges of a DAG spread over units, in the order both sides number them: for each node
/// in order, an edge from the DAG's input if it has no predecessors, else one from each
/// predecessor in `after` order; last, the sink's edge to the DAG's output. `None` stands for
/// the input (as a source) and the output (as a destination).
pub fn spread_edges(preds: &[Vec<usize>], sink: usize) -> Vec<(Option<usize>, Option<usize>)> {
    let mut edges = Vec::new();
    for (c, ps) in preds.iter().enumerate() {
        if ps.is_empty() {
            edges.push((None, Some(c)));
        }
        edges.extend(ps.iter().map(|&p| (Some(p), Some(c))));
    }
    edges.push((Some(sink), None));
    edges
}

/// A shim's answer to a [`Call`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Answer {
    /// The invocation ran (the body is the result when `error` is None).
    Invoked {
        /// Request id on the unit.
        request_id: String,
        /// How the instance started.
        start: StartKind,
        /// Start-up time of a fresh instance, ms.
        init_ms: f64,
        /// Time spent on the unit, ms.
        total_ms: f64,
        /// The function's error.
        error: Option<FunctionError>,
        /// The Lambda-style log block.
        log: String,
        /// Start-up steps, ms.
        #[serde(default)]
        breakdown: Vec<(String, f64)>,
        /// From the request reaching the unit to the handler, ms.
        #[serde(default)]
        to_handler_ms: Option<f64>,
        /// `CLOCK_MONOTONIC` ns at handler start and end.
        #[serde(default)]
        handler_ns: (u64, u64),
    },
    /// The function is installed at this revision on the unit.
    Deployed {
        /// Revision on the unit.
        revision: u64,
    },
    /// The function is gone from the unit.
    Removed,
    /// Functions the unit dropped.
    Synced {
        /// Their names.
        removed: Vec<String>,
    },
    /// The body is the request's body.
    Echoed,
    /// The segment is built.
    SegmentOpened {
        /// How each of its instances started, in node order.
        starts: Vec<StartKind>,
        /// A function's init failed instead: the node and the error (nothing was kept).
        #[serde(default)]
        failed: Option<(usize, FunctionError)>,
    },
    /// The value is on its edge (or the segment is closed, or the failure noted).
    Done,
}

/// Why a call failed on the far side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteErrorKind {
    /// No such function there.
    NotFound,
    /// The unit lacks this code or manifest: deploy, then call again.
    NeedsCode,
    /// A parameter was refused.
    InvalidParameter,
    /// The payload is not JSON.
    InvalidRequestContent,
    /// Too large.
    RequestTooLarge,
    /// Every instance stayed busy.
    TooManyRequests,
    /// The unit cannot serve now (shutting down, sandboxes unsupported).
    Unavailable,
    /// A platform failure there.
    Internal,
    /// The call itself was malformed or unknown.
    BadCall,
}

/// A failed call, as the far side reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// What kind.
    pub kind: RemoteErrorKind,
    /// The message.
    pub message: String,
}

impl RemoteError {
    /// A new error.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_negotiate_to_the_highest_common() {
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 1), (2, 3)), None);
    }

    #[test]
    fn units_say_what_they_lack() {
        let mut u = UnitInfo::detect(3, Some("aarch64".into()), Some(vec!["gpu".into()]));
        assert_eq!(u.lacks(Some("aarch64"), Some("gpu")), None);
        assert_eq!(
            u.lacks(Some("x86_64"), None).as_deref(),
            Some("unit 3 is aarch64, not x86_64")
        );
        u.accelerators.clear();
        assert_eq!(
            u.lacks(None, Some("gpu")).as_deref(),
            Some("unit 3 has no gpu")
        );
        assert!(u.cores >= 1 && u.memory_mb > 0);
    }

    #[test]
    fn spread_edges_are_numbered_input_first_then_after_order_then_output() {
        // A diamond: a -> (b, c) -> d, with d after [c, b].
        let preds = vec![vec![], vec![0], vec![0], vec![2, 1]];
        assert_eq!(
            spread_edges(&preds, 3),
            [
                (None, Some(0)),
                (Some(0), Some(1)),
                (Some(0), Some(2)),
                (Some(2), Some(3)),
                (Some(1), Some(3)),
                (Some(3), None),
            ]
        );
        // Two sources each get the input.
        assert_eq!(
            spread_edges(&[vec![], vec![], vec![0, 1]], 2),
            [
                (None, Some(0)),
                (None, Some(1)),
                (Some(0), Some(2)),
                (Some(1), Some(2)),
                (Some(2), None),
            ]
        );
    }

    #[test]
    fn a_segment_call_survives_its_json() {
        let spec =
            DagSpec::from_toml("name = \"d\"\n[[nodes]]\nid = \"a\"\nfunction = \"f\"\nunit = 1\n")
                .unwrap();
        let call = Call::SegmentOpen {
            key: "k".into(),
            spec,
            units: vec![1],
            functions: Vec::new(),
            neighbours: vec![(2, "10.0.0.2:4000".into())],
        };
        let back: Call = serde_json::from_slice(&serde_json::to_vec(&call).unwrap()).unwrap();
        let Call::SegmentOpen {
            spec, neighbours, ..
        } = back
        else {
            panic!("{back:?}");
        };
        assert_eq!(spec.nodes[0].unit, Some(1));
        assert_eq!(neighbours, [(2, "10.0.0.2:4000".to_owned())]);
    }

    #[test]
    fn greetings_out_of_bounds_are_refused_with_the_field() {
        let good = UnitInfo::detect(3, None, Some(vec!["gpu".into()]));
        assert_eq!(good.validate(), Ok(()));
        let check = |f: &dyn Fn(&mut UnitInfo), want: &str| {
            let mut u = good.clone();
            f(&mut u);
            let e = u.validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        check(
            &|u| u.id = 4_000_000_000,
            "unit id 4000000000 is out of range",
        );
        check(&|u| u.hostname = "h".repeat(900_000), "host name");
        check(&|u| u.hostname = "a\nb".into(), "host name");
        check(&|u| u.memory_mb = u64::MAX, "memory");
        check(&|u| u.cores = 0, "cores 0");
        check(&|u| u.cores = 1_000_000, "cores 1000000");
        check(&|u| u.arch = String::new(), "arch");
        check(&|u| u.arch = "x86 64".into(), "arch");
        check(&|u| u.version = "v".repeat(65), "version");
        check(
            &|u| u.accelerators = vec!["gpu".into(); 17],
            "17 accelerators",
        );
        check(
            &|u| u.accelerators = vec!["g".repeat(33)],
            "accelerator name",
        );
        check(
            &|u| u.link = Some("somewhere".into()),
            "neighbour link address",
        );
        let mut u = good.clone();
        u.link = Some("10.0.0.2:4000".into());
        assert_eq!(u.validate(), Ok(()));
    }

    #[test]
    fn unknown_calls_are_refused_by_serde() {
        let e = serde_json::from_str::<Call>(r#"{"op":"format_disk"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }
}
