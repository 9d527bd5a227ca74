//! Processing units and the neighbour link between them.
//!
//! Spore spans several processing units (the host CPU, a DPU's cores, an accelerator host).
//! Each runs a shim (`spore shim --id N`) that owns the sandboxes of its unit; the control plane
//! (`spore serve`, itself unit 0) places functions on units and reaches each shim over one
//! **neighbour link**: a framed, multiplexed, versioned connection over any byte stream (in the
//! cluster, TLS over TCP with a certificate on both sides).
//!
//! - [`frame`]: the wire format (12-byte frame headers, messages cut into chunks) and its
//!   checked decoder and reassembler.
//! - [`link`]: a live link: the greeting with version negotiation, concurrent calls in both
//!   directions with deadlines and cancellation, back-pressure, heartbeats, and a clean close
//!   with a reason that every waiting call receives.
//! - [`join`]: the one-off exchange by which a shim presents a join token and gets its unit
//!   certificate (the TLS around links and joins is `spore-cluster`'s).
//! - [`proto`]: what travels: a unit's description ([`proto::UnitInfo`]) and load, and the calls
//!   the control plane makes on a shim (invoke, deploy, remove, sync, echo).
#![forbid(unsafe_code)]

pub mod frame;
pub mod join;
pub mod link;
pub mod proto;

pub use frame::Message;
pub use link::{accept, connect, Link, LinkConfig, LinkError, NoCalls, Service};
pub use proto::{Answer, Call, RemoteError, RemoteErrorKind, Role, UnitInfo, UnitLoad};
