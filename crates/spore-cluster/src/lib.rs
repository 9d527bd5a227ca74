//! Processing units: the control plane's table of units and their links, placement of
//! functions on units, invocations and code relayed to a unit's shim, etcd membership, and
//! the shim's own side (dialing the control plane, serving its calls, neighbour links).
//!
//! The control plane (`spore serve`) is unit 0 and runs sandboxes itself. Other units run
//! `spore shim --id N --control ADDR`: the shim dials the control plane's link listener
//! (`spore serve --link-listen ADDR`), greets it with its [`UnitInfo`], and keeps that one
//! connection: heartbeats carry its load both ways, and the control plane's calls (invoke,
//! deploy, remove, sync) travel on it. A shim that loses the link dials again with backoff;
//! the control plane marks a unit down the moment its link closes, fails the invocations in
//! flight there with an error naming the unit, and places unpinned functions elsewhere.
//!
//! **Placement.** A function pinned with `unit = N` runs on unit N or fails with the reason
//! (unit never registered, down, or lacking what the function needs). Otherwise the control
//! plane keeps the function where it first placed it while that unit stays up (warm instances
//! and cfork templates live there), and places it on the least loaded unit (invocations in
//! flight per core) that has the function's `arch` and `accelerator` and last reported at
//! least `memory_mb` available, preferring lower ids on ties; if no unit can run it, the
//! error lists what each unit lacks.
//!
//! **Code.** Every relayed invocation names the control plane's code id and carries the
//! manifest; a shim that does not hold exactly that answers `needs_code`, and the control
//! plane sends the package (the function's code directory, zipped) and calls again. Shims
//! thus need no state of their own to follow redeploys, restarts or re-placements.
//!
//! **Security.** Every link is mutual TLS with certificates of the cluster's own CA
//! ([`pki`], [`tls`]): a shim joins once with a token ([`tokens`]) that also pins the CA, and
//! from then on presents its unit certificate; a greeting must claim the unit its certificate
//! names, a unit that is up cannot be linked twice, and greetings are bounded.
//!
//! The wire format of links is `spore-shim`'s. This crate knows the registry (records and
//! code) and nothing of instances or DAGs: what a unit runs locally it asks of a
//! [`UnitHost`] (the unit's control plane), and DAG segments of a [`SegmentHost`] (the DAG
//! engine); both are handed in by the caller that starts serving.
#![forbid(unsafe_code)]

mod calls;
pub mod etcd;
mod links;
pub mod pki;
mod shim;
pub mod tls;
pub mod tokens;
pub mod units;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use spore_core::dag::DagSpec;
use spore_core::{ControlError, FunctionError, FunctionManifest, Invocation, InvokeOptions};
use spore_ipc::edge::Value;
use spore_registry::{FunctionRecord, FunctionSpec};
use spore_shim::proto::NodeTimes;
use spore_shim::{Answer, Link, UnitLoad};

pub use shim::ShimCredentials;
pub use spore_shim::{LinkConfig, UnitInfo};
pub use units::{InflightCount, Placement, UnitStatus, Units};

/// An error and its causes on one line (`a: b: c`), for reasons sent to a peer or logged.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// A boxed future, as the host traits return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a unit runs locally, as its link asks for it: the unit's own control plane.
pub trait UnitHost: Send + Sync + 'static {
    /// This unit's load (sent with heartbeats).
    fn load(&self) -> UnitLoad;
    /// Whether the daemon is shutting down (new links are refused).
    fn draining(&self) -> bool;
    /// Runs one invocation here.
    fn invoke(
        &self,
        name: String,
        payload: Bytes,
        opts: InvokeOptions,
    ) -> BoxFuture<'static, Result<Invocation, ControlError>>;
    /// Installs a function as the control plane sent it (nothing changes if this unit holds
    /// exactly that already). Blocking: call it off the async threads.
    fn install(&self, spec: FunctionSpec, zip: &[u8]) -> Result<FunctionRecord, ControlError>;
    /// Removes a function.
    fn remove(&self, name: &str) -> Result<(), ControlError>;
    /// Starts a cfork function's template ahead of its first invocation.
    fn prewarm(&self, name: &str);
}

/// A shim's segments of DAG pipelines spread over units (the DAG engine's side).
pub trait SegmentHost: Send + Sync + 'static {
    /// `segment_open`: builds this unit's segment (the caller checked that the unit holds
    /// `functions` at the control plane's code ids).
    fn open(
        &self,
        key: String,
        spec: DagSpec,
        units: Vec<u32>,
        functions: Vec<(FunctionManifest, String)>,
        neighbours: Vec<(u32, String)>,
    ) -> BoxFuture<'_, Result<Answer, ControlError>>;
    /// `edge_value`: puts a value on one of a segment's entries.
    fn deliver<'a>(
        &'a self,
        key: &'a str,
        seq: u64,
        edge: usize,
        value: Value,
        deadline_ms: u64,
        request_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ControlError>>;
    /// `segment_close`: stops a segment and waits until its instances are destroyed.
    fn close<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()>;
    /// The link to the control plane, at each (re)connection.
    fn set_link(&self, link: Link);
    /// Drops every segment (the link to the control plane is gone).
    fn clear(&self);
}

/// What a segment of a spread DAG pipeline reports to the control plane's router.
#[derive(Debug)]
pub enum SegmentEvent {
    /// A value left a segment on `edge` during invocation `seq` (deadline, unix ms, and
    /// request id as the segment got them); `times` are that segment's nodes that finished.
    Value {
        /// The invocation.
        seq: u64,
        /// Its deadline, unix ms.
        deadline_ms: u64,
        /// Its request id.
        request_id: String,
        /// The edge the value left on.
        edge: usize,
        /// The value.
        value: Value,
        /// Timing of the segment's nodes that finished.
        times: Vec<NodeTimes>,
    },
    /// Timing of a segment's nodes, after a value left it.
    Times {
        /// The invocation.
        seq: u64,
        /// Timing of the nodes.
        times: Vec<NodeTimes>,
    },
    /// A node failed: the segment serves no more.
    Failed {
        /// The invocation.
        seq: u64,
        /// The node.
        node: usize,
        /// Its error.
        error: FunctionError,
    },
    /// A unit's link closed: its segment is gone.
    UnitDown {
        /// The unit.
        unit: u32,
        /// Why.
        reason: String,
    },
}
