//! Frames between the daemon and a runtime instance.
//!
//! A frame is `header_len: u32 LE | body_len: u32 LE | header (JSON) | body (bytes)`. The header
//! is a tagged JSON object ([`ToRuntime`] or [`FromRuntime`]); the body carries the event or the
//! result as raw JSON bytes, so that payloads are never parsed twice.
//!
//! This module is sans-I/O: callers read the 8-byte prefix, ask [`FramePrefix::parse`] how much
//! follows, read that, and decode. Every length is checked before any allocation.

use serde::{Deserialize, Serialize};
use spore_core::FunctionError;

/// Size of the length prefix.
pub const PREFIX_LEN: usize = 8;
/// Largest header accepted.
pub const MAX_HEADER: u32 = 1024 * 1024;
/// Largest body accepted (above the 6 MB payload limit, below anything absurd).
pub const MAX_BODY: u32 = 64 * 1024 * 1024;

/// Errors in frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A length field exceeds its limit.
    #[error("Frame {what} length {len} exceeds the limit of {limit} bytes")]
    TooLong {
        /// `header` or `body`.
        what: &'static str,
        /// The length found.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The header is not the JSON message expected.
    #[error("Malformed frame header")]
    Header(#[source] serde_json::Error),
}

/// The decoded length prefix of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePrefix {
    /// Header length in bytes.
    pub header_len: u32,
    /// Body length in bytes.
    pub body_len: u32,
}

impl FramePrefix {
    /// Decodes and checks a prefix.
    pub fn parse(bytes: [u8; PREFIX_LEN]) -> Result<Self, ProtocolError> {
        let header_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let body_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if header_len > MAX_HEADER {
            return Err(ProtocolError::TooLong {
                what: "header",
                len: header_len,
                limit: MAX_HEADER,
            });
        }
        if body_len > MAX_BODY {
            return Err(ProtocolError::TooLong {
                what: "body",
                len: body_len,
                limit: MAX_BODY,
            });
        }
        Ok(FramePrefix {
            header_len,
            body_len,
        })
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Messages from the daemon to a runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRuntime {
    /// Run the handler once; the frame body is the event (JSON).
    Invoke {
        /// Request id (the context's `aws_request_id`).
        request_id: String,
        /// Deadline, milliseconds since the Unix epoch.
        deadline_ms: u64,
        /// Set when the invocation is one node of a DAG: where the event comes from and where
        /// the result goes. Its descriptors follow the frame, attached to one extra byte.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dag: Option<DagWiring>,
        /// The caller's client context (`X-Amz-Client-Context`, decoded: an object with
        /// `client`, `custom`, `env`), for the context's `client_context`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_context: Option<serde_json::Value>,
    },
    /// (To a cfork template) fork a child into a sandbox of its own. The frame carries file
    /// descriptors (`SCM_RIGHTS`): the child's control socket first, then `cgroups` files
    /// through which a thread moves itself into the child's cgroup, then as many for the
    /// template's own cgroup. The template forks from inside the child's cgroup, so that the
    /// child's kernel memory (page tables, task) is charged to the child, and moves back.
    Fork {
        /// Number of cgroup descriptors per set.
        cgroups: u32,
        /// Instance id (the child's hostname, and the key of its exit report).
        id: String,
        /// Uid and gid the child runs as, inside the template's user namespace.
        uid: u32,
        /// Size cap of the child's `/tmp`, MiB.
        tmp_mb: u32,
        /// The template's descriptor of a pooled network namespace the daemon gave egress
        /// (announced with [`FromRuntime::Netns`]); None: one of the template's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<i32>,
        /// (Egress) how many other starts are waiting for an equipped namespace: the template
        /// makes that many more, as soon as it is not forking, instead of its usual few.
        #[serde(default, skip_serializing_if = "is_zero")]
        netns_waiting: u32,
        /// Modules the template imports before this fork (automatic warm-up: what the
        /// function's calls imported since the template started).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        preload: Vec<String>,
    },
    /// (To a runtime restored from a snapshot, before anything else) the environment of the
    /// sandbox it now runs in. A restored process has the environment of the one that was
    /// checkpointed; the daemon's part of it (a template's seccomp programs, its pool sizes)
    /// may have changed since.
    Environment {
        /// Every variable, replacing the restored ones.
        vars: std::collections::BTreeMap<String, String>,
    },
}

/// Messages from a runtime to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromRuntime {
    /// The handler is imported; the runtime waits for invocations.
    Ready {
        /// Time the runtime spent importing the handler, ms.
        import_ms: f64,
        /// (cfork children) `CLOCK_MONOTONIC` nanoseconds at the end of each start-up step,
        /// in order: `fork` (the template calls fork), `forked` (the child runs), `cgroup`,
        /// `unshare`, `mounts`, `net`, `privileges` (uid and seccomp), `ready`.
        #[serde(default)]
        phases: Vec<(String, u64)>,
        /// What the runtime printed while it imported the handler (Lambda shows it before
        /// the first invocation's START line).
        #[serde(default)]
        logs: String,
    },
    /// The runtime waits inside `spore_checkpoint` (native/checkpoint.rs) for the daemon to
    /// copy it into a snapshot; the daemon answers with one raw status byte (0 = taken), not
    /// a frame, and the runtime then goes on to `ready`.
    Checkpoint {
        /// Address of the context record in the runtime.
        context: u64,
    },
    /// Importing the handler failed; the runtime exits after sending this.
    InitError {
        /// What failed.
        error: FunctionError,
    },
    /// (From a cfork template) a forked child exited.
    Exit {
        /// The child's instance id.
        id: String,
        /// Exit status, or 128 + signal.
        code: i32,
    },
    /// (From a cfork template of an egress function) a new pooled network namespace, open
    /// in the template as descriptor `fd`, waiting for the daemon to give it egress.
    Netns {
        /// The template's descriptor of it.
        fd: i32,
    },
    /// (From a cfork template) a fork request failed before a child existed.
    ForkError {
        /// The instance id of the request.
        id: String,
        /// Why.
        error: String,
    },
    /// What a handler printed: during a plain invocation, as it prints (so that output before
    /// a timeout or a crash is kept); from a pipeline node, one invocation's output.
    Logs {
        /// The text.
        logs: String,
    },
    /// One invocation finished; on success the body holds the result (JSON).
    Result {
        /// The handler's error, if it raised.
        error: Option<FunctionError>,
        /// Handler run time, ms.
        duration_ms: f64,
        /// What the handler printed to stdout/stderr (and did not send as `logs` frames).
        logs: String,
        /// The runtime wrote the error's log entry itself (Lambda's `[ERROR] ...` with the
        /// traceback), so the daemon adds none.
        #[serde(default)]
        error_logged: bool,
        /// `CLOCK_MONOTONIC` nanoseconds just before the handler was called (0: unknown).
        #[serde(default)]
        handler_start_ns: u64,
        /// `CLOCK_MONOTONIC` nanoseconds just after the handler returned (0: unknown).
        #[serde(default)]
        handler_end_ns: u64,
        /// (DAG nodes) what was sent where, and when.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dag: Option<DagReport>,
        /// Modules this call imported that the instance had not imported before (for the
        /// automatic warm-up of later instances); empty when none, or when the call also
        /// started threads.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        imported: Vec<String>,
        /// Modules of the automatic warm-up that failed to import at this instance's start
        /// (sent once, with its first result): the daemon stops listing them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unimportable: Vec<String>,
    },
}

/// How a value is encoded on a DAG edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// JSON text; the next node gets the decoded value.
    Json,
    /// Raw bytes (the handler returned `bytes`, `bytearray` or `memoryview`); the next node
    /// gets a read-only `memoryview`.
    Bytes,
}

/// One encoded value inside a frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Offset in the body.
    pub offset: usize,
    /// Length.
    pub len: usize,
    /// Encoding.
    pub kind: PayloadKind,
}

/// The descriptors of one shared-memory edge, as indices into the descriptors that come
/// with the frame: the ring's memfd, its two eventfds (data ready, space ready), and a Unix
/// socket over which large payloads travel as sealed memfds.
pub type EdgeFds = [usize; 4];

/// Where a DAG node's event comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum EventShape {
    /// The frame body is the event (JSON), as for a plain invocation: the DAG's input.
    Input,
    /// A value in the frame body (relayed by the daemon).
    Body {
        /// Where.
        segment: Segment,
    },
    /// The one message arriving on a shared-memory edge.
    Ring {
        /// Its descriptors.
        fds: EdgeFds,
    },
    /// A list of values (fan-in, or the outputs of an `each` node).
    List {
        /// The items, in order.
        items: Vec<EventShape>,
    },
}

/// A DAG node's wiring for one invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DagWiring {
    /// The node id (for messages).
    pub node: String,
    /// Number of descriptors that follow the frame.
    pub fds: usize,
    /// The event.
    pub event: EventShape,
    /// Shared-memory edges to send the result on.
    pub outputs: Vec<EdgeFds>,
    /// Also return the result in the reply body (the sink, or edges relayed by the daemon).
    pub reply: bool,
    /// Return the result, a list, as one segment per element (the next node runs `each`).
    pub split: bool,
    /// Payloads larger than this travel as sealed memfds rather than through the ring.
    pub inline_max: usize,
    /// Microseconds to poll a ring before sleeping on its doorbell.
    pub spin_us: u64,
    /// Serve this wiring for many invocations (a pre-wired pipeline) instead of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineWiring>,
}

/// A node of a pre-wired pipeline: the instance keeps its edges open and serves one
/// invocation per message on its inputs until a handler fails or the daemon stops it.
/// Each invocation's request id and deadline, and the node's timing, go through the node's
/// own page (`spore_ipc::page`), a memfd it shares with the daemon only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineWiring {
    /// Index of the page's memfd among the frame's descriptors.
    pub page: usize,
}

/// What a DAG node reports with its result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DagReport {
    /// `CLOCK_MONOTONIC` ns when every input had arrived.
    pub inputs_ns: u64,
    /// `CLOCK_MONOTONIC` ns when the result was on every output edge.
    pub sent_ns: u64,
    /// The values in the reply body (one, or one per element when split).
    pub segments: Vec<Segment>,
}

/// Encodes a message and body into one frame.
pub fn encode<M: Serialize>(message: &M, body: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(message).expect("protocol messages always serialize");
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + body.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    out
}

/// Decodes a header.
pub fn decode_header<'a, M: Deserialize<'a>>(header: &'a [u8]) -> Result<M, ProtocolError> {
    serde_json::from_slice(header).map_err(ProtocolError::Header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(frame: &[u8]) -> (FramePrefix, &[u8], &[u8]) {
        let prefix = FramePrefix::parse(frame[..PREFIX_LEN].try_into().unwrap()).unwrap();
        let h_end = PREFIX_LEN + prefix.header_len as usize;
        (prefix, &frame[PREFIX_LEN..h_end], &frame[h_end..])
    }

    #[test]
    fn oversized_lengths_are_refused() {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&(MAX_HEADER + 1).to_le_bytes());
        assert!(matches!(
            FramePrefix::parse(p),
            Err(ProtocolError::TooLong { what: "header", .. })
        ));
        let mut p = [0u8; 8];
        p[4..].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert!(matches!(
            FramePrefix::parse(p),
            Err(ProtocolError::TooLong { what: "body", .. })
        ));
    }

    #[test]
    fn older_runtimes_without_new_fields_still_parse() {
        let m: FromRuntime = decode_header(br#"{"type":"ready","import_ms":1.5}"#).unwrap();
        assert_eq!(
            m,
            FromRuntime::Ready {
                import_ms: 1.5,
                phases: vec![],
                logs: String::new(),
            }
        );
        let m: FromRuntime =
            decode_header(br#"{"type":"result","error":null,"duration_ms":2.0,"logs":""}"#)
                .unwrap();
        assert!(matches!(
            m,
            FromRuntime::Result {
                handler_start_ns: 0,
                ..
            }
        ));
    }

    #[test]
    fn garbage_header_is_an_error() {
        assert!(decode_header::<FromRuntime>(b"{\"type\":\"nope\"}").is_err());
        assert!(decode_header::<FromRuntime>(b"\xff\xfe").is_err());
    }

    proptest! {
        #[test]
        fn invoke_round_trips(id in "[a-z0-9-]{0,40}", deadline in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let msg = ToRuntime::Invoke { request_id: id, deadline_ms: deadline, dag: None, client_context: None };
            let frame = encode(&msg, &body);
            let (prefix, header, rest) = split(&frame);
            prop_assert_eq!(prefix.body_len as usize, body.len());
            prop_assert_eq!(decode_header::<ToRuntime>(header).unwrap(), msg);
            prop_assert_eq!(rest, &body[..]);
        }

        #[test]
        fn result_round_trips(logs in ".{0,200}", etype in "[A-Za-z.]{1,20}", msg in ".{0,100}", ms in 0.0f64..1e6, t in any::<u64>(), imported in proptest::collection::vec("[a-z_.]{1,30}", 0..4)) {
            let m = FromRuntime::Result {
                error: Some(FunctionError { stack_trace: vec!["x".into()], ..FunctionError::platform(&etype, msg) }),
                duration_ms: ms,
                logs,
                error_logged: false,
                handler_start_ns: t,
                handler_end_ns: t,
                dag: None,
                imported,
                unimportable: vec!["gone".into()],
            };
            let frame = encode(&m, b"");
            let (_, header, _) = split(&frame);
            prop_assert_eq!(decode_header::<FromRuntime>(header).unwrap(), m);
        }

        #[test]
        fn prefix_parse_never_panics(bytes in any::<[u8; 8]>()) {
            if let Ok(p) = FramePrefix::parse(bytes) {
                prop_assert!(p.header_len <= MAX_HEADER && p.body_len <= MAX_BODY);
            }
        }
    }
}
