//! The daemon's end of a DAG edge: a [ring](crate::ring) for messages plus a Unix socket
//! over which payloads too large for the ring travel as [sealed memfds](crate::sealed).
//!
//! The message format is the one `spore_dag.py` speaks: one tag byte, then either the value
//! (`J` JSON, `B` raw bytes) or, when the value went as a memfd on the socket, its length as
//! a little-endian u64 (`j`, `b`). Blocking calls, for a dedicated thread.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::ring::{Consumer, Producer};
use crate::sealed::SealedPayload;
use crate::{errno, sys, IpcError};

/// A value on an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// Raw bytes (`true`) or JSON text.
    pub raw: bool,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The producing end of an edge.
pub struct EdgeSender {
    /// The ring.
    pub ring: Producer,
    /// The socket for memfds.
    pub sock: UnixStream,
    /// Values larger than this go as a sealed memfd.
    pub inline_max: usize,
}

/// The consuming end of an edge.
pub struct EdgeReceiver {
    /// The ring.
    pub ring: Consumer,
    /// The socket for memfds.
    pub sock: UnixStream,
}

impl EdgeSender {
    /// Sends `value`, waiting up to `timeout` for room in the ring.
    pub fn send(&mut self, value: &Value, timeout: Duration) -> Result<(), IpcError> {
        let inline =
            value.bytes.len() <= self.inline_max && value.bytes.len() < self.ring.max_message();
        if inline {
            let mut msg = Vec::with_capacity(1 + value.bytes.len());
            msg.push(if value.raw { b'B' } else { b'J' });
            msg.extend_from_slice(&value.bytes);
            return self.ring.send(&msg, timeout);
        }
        let payload = SealedPayload::create("spore-payload", &value.bytes)?;
        let fds = [payload.fd().as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let one = [IoSlice::new(&[0u8])];
        sendmsg::<()>(self.sock.as_raw_fd(), &one, &cmsg, MsgFlags::empty(), None)
            .map_err(errno("sending a payload descriptor"))?;
        let mut msg = vec![if value.raw { b'b' } else { b'j' }];
        msg.extend_from_slice(&(value.bytes.len() as u64).to_le_bytes());
        self.ring.send(&msg, timeout)
    }
}

impl EdgeReceiver {
    /// Receives one value, waiting up to `timeout` for it.
    pub fn recv(&mut self, timeout: Duration) -> Result<Value, IpcError> {
        let deadline = Instant::now() + timeout;
        let msg = self.ring.recv(timeout)?;
        let Some((&tag, rest)) = msg.split_first() else {
            return Err(IpcError::Corrupt("empty message on an edge".into()));
        };
        let (raw, in_memfd) = match tag {
            b'J' => (false, false),
            b'B' => (true, false),
            b'j' => (false, true),
            b'b' => (true, true),
            other => {
                return Err(IpcError::Corrupt(format!(
                    "unknown message tag {other:#04x} on an edge"
                )))
            }
        };
        if !in_memfd {
            return Ok(Value {
                raw,
                bytes: rest.to_vec(),
            });
        }
        let len: [u8; 8] = rest.try_into().map_err(|_| {
            IpcError::Corrupt(format!(
                "a payload announcement holds {} bytes, not 8",
                rest.len()
            ))
        })?;
        let len = u64::from_le_bytes(len) as usize;
        let payload = SealedPayload::from_fd(self.recv_fd(deadline)?)?;
        let bytes = payload.as_bytes().get(..len).ok_or_else(|| {
            IpcError::Corrupt(format!(
                "payload memfd holds {} bytes, fewer than the announced {len}",
                payload.as_bytes().len()
            ))
        })?;
        Ok(Value {
            raw,
            bytes: bytes.to_vec(),
        })
    }

    /// The one descriptor that comes with a byte on the socket.
    fn recv_fd(&self, deadline: Instant) -> Result<OwnedFd, IpcError> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(sys("setting the socket's timeout"))?;
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EAGAIN => IpcError::Timeout(left),
            e => IpcError::Sys {
                what: "receiving a payload descriptor",
                source: e.into(),
            },
        })?;
        let mut got: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs().map_err(errno("reading control messages"))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
                // nothing else owns them.
                got.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.bytes == 0 {
            return Err(IpcError::Corrupt(
                "the edge's socket closed before the payload came".into(),
            ));
        }
        if got.len() != 1 {
            return Err(IpcError::Corrupt(format!(
                "expected one payload descriptor, got {}",
                got.len()
            )));
        }
        Ok(got.pop().expect("one"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring;

    fn pair(inline_max: usize) -> (EdgeSender, EdgeReceiver) {
        let fds = ring::create(64 * 1024).unwrap();
        let theirs = fds.try_clone().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        (
            EdgeSender {
                ring: Producer::open(fds).unwrap(),
                sock: a,
                inline_max,
            },
            EdgeReceiver {
                ring: Consumer::open(theirs).unwrap(),
                sock: b,
            },
        )
    }

    #[test]
    fn values_cross_inline_and_as_memfds() {
        let (mut tx, mut rx) = pair(16);
        let t = Duration::from_secs(5);
        for v in [
            Value {
                raw: false,
                bytes: b"{\"a\":1}".to_vec(),
            },
            Value {
                raw: true,
                bytes: vec![9; 3],
            },
            Value {
                raw: false,
                bytes: format!("\"{}\"", "y".repeat(200_000)).into_bytes(),
            },
            Value {
                raw: true,
                bytes: (0..1_000_000u32).map(|i| i as u8).collect(),
            },
            Value {
                raw: true,
                bytes: Vec::new(),
            },
        ] {
            tx.send(&v, t).unwrap();
            assert_eq!(rx.recv(t).unwrap(), v);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let (mut tx, mut rx) = pair(16);
        let t = Duration::from_millis(200);
        tx.ring.send(b"", t).unwrap();
        assert!(matches!(rx.recv(t), Err(IpcError::Corrupt(_))));
        tx.ring.send(b"?x", t).unwrap();
        assert!(matches!(rx.recv(t), Err(IpcError::Corrupt(_))));
        tx.ring.send(b"j123", t).unwrap();
        assert!(matches!(rx.recv(t), Err(IpcError::Corrupt(_))));
        // Announced, but no descriptor follows: a timeout, not a hang.
        let mut msg = vec![b'b'];
        msg.extend_from_slice(&10u64.to_le_bytes());
        tx.ring.send(&msg, t).unwrap();
        assert!(matches!(rx.recv(t), Err(IpcError::Timeout(_))));
    }
}
