//! Frames of the neighbour link, and the reassembly of messages from them.
//!
//! Every frame is a 12-byte header and up to [`MAX_FRAME_PAYLOAD`] bytes:
//!
//! ```text
//! 0      1      2      3      4            8            12
//! +------+------+------+------+------------+------------+---------------
//! | 0xA7 | kind | flags|  0   | stream u32 | length u32 | payload ...
//! +------+------+------+------+------------+------------+---------------
//! ```
//!
//! (integers little-endian). A message (a request or a response) travels as one or more
//! frames of one stream: the first has [`flags::START`] and begins with the message's total
//! length (u64), the last has [`flags::END`]. Messages are cut into [`CHUNK`]-sized frames so
//! that a large payload on one stream does not hold up small calls on others. The decoder and
//! [`Assembler`] refuse anything malformed with a [`FrameError`] naming it; the link then closes
//! the connection.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// First byte of every frame.
pub const MAGIC: u8 = 0xA7;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;
/// Largest frame payload accepted.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;
/// Size of the frames a message is cut into.
pub const CHUNK: usize = 256 * 1024;
/// Largest message (header plus body) accepted: a DAG payload or a code package.
pub const MAX_MESSAGE: u64 = 512 << 20;
/// Most messages a peer may have half-sent at once.
pub const MAX_OPEN_STREAMS: usize = 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The dialer's greeting (JSON [`crate::proto::Hello`]).
    Hello = 1,
    /// The acceptor's answer (JSON [`crate::proto::HelloAck`]).
    HelloAck = 2,
    /// Part of a request message.
    Request = 3,
    /// Part of a response message.
    Response = 4,
    /// The caller gave up on a stream.
    Cancel = 5,
    /// A heartbeat, carrying the sender's load (JSON).
    Ping = 6,
    /// The answer to a ping.
    Pong = 7,
    /// The sender closes the link; the payload is the reason (UTF-8).
    GoAway = 8,
    /// A shim asks to join the cluster (JSON [`crate::proto::JoinRequest`]); only on a join
    /// connection, never on a link.
    Join = 9,
    /// The control plane's answer to a join (JSON [`crate::proto::JoinAnswer`]).
    Joined = 10,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::Cancel,
            6 => Kind::Ping,
            7 => Kind::Pong,
            8 => Kind::GoAway,
            9 => Kind::Join,
            10 => Kind::Joined,
            _ => return None,
        })
    }

    /// Whether frames of this kind belong to a message (and so carry START/END).
    pub fn is_message(self) -> bool {
        matches!(self, Kind::Request | Kind::Response)
    }
}

/// Frame flags.
pub mod flags {
    /// The first frame of a message.
    pub const START: u8 = 1;
    /// The last frame of a message.
    pub const END: u8 = 2;
    /// A response that is an error ([`crate::proto::RemoteError`]).
    pub const ERROR: u8 = 4;
    /// Every flag defined.
    pub const ALL: u8 = START | END | ERROR;
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// [`flags`].
    pub flags: u8,
    /// The stream (0: the link itself).
    pub stream: u32,
    /// The payload.
    pub payload: Bytes,
}

/// A malformed frame or message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The first byte is not [`MAGIC`]: the peer does not speak the link, or the stream is
    /// out of step.
    #[error("bad frame magic 0x{0:02x} (expected 0x{MAGIC:02x}): not a Spore neighbour link")]
    BadMagic(u8),
    /// An unknown kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Unknown flags, a non-zero reserved byte, or flags on a kind that takes none.
    #[error("bad header on a {kind:?} frame: {why}")]
    BadHeader {
        /// The frame's kind.
        kind: Kind,
        /// What is wrong.
        why: String,
    },
    /// A payload over [`MAX_FRAME_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the {MAX_FRAME_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// A message that does not add up.
    #[error("stream {stream}: {why}")]
    Message {
        /// The stream.
        stream: u32,
        /// What is wrong.
        why: String,
    },
    /// The connection failed.
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes and decodes frames (`tokio_util::codec`).
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

/// The 12-byte header of a frame.
pub fn header(kind: Kind, flags: u8, stream: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = MAGIC;
    h[1] = kind as u8;
    h[2] = flags;
    h[4..8].copy_from_slice(&stream.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.is_empty() {
            return Ok(None);
        }
        if src[0] != MAGIC {
            return Err(FrameError::BadMagic(src[0]));
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let h = parse_header(src[..HEADER_LEN].try_into().expect("12 bytes"))?;
        let total = HEADER_LEN + h.len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(h.len as usize).freeze();
        Ok(Some(Frame {
            kind: h.kind,
            flags: h.flags,
            stream: h.stream,
            payload,
        }))
    }
}

/// A frame header, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// [`flags`].
    pub flags: u8,
    /// Its stream.
    pub stream: u32,
    /// Payload bytes that follow.
    pub len: u32,
}

/// Checks a frame header: magic, kind, flags, the reserved byte, the stream for the kind, and
/// the payload length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    if h[0] != MAGIC {
        return Err(FrameError::BadMagic(h[0]));
    }
    let kind = Kind::from_u8(h[1]).ok_or(FrameError::UnknownKind(h[1]))?;
    let fl = h[2];
    let bad = |why: String| FrameError::BadHeader { kind, why };
    if h[3] != 0 {
        return Err(bad(format!("reserved byte is {}", h[3])));
    }
    if fl & !flags::ALL != 0 {
        return Err(bad(format!("unknown flags 0x{fl:02x}")));
    }
    if !kind.is_message() && fl != 0 {
        return Err(bad(format!("flags 0x{fl:02x} on a frame that takes none")));
    }
    if fl & flags::ERROR != 0 && kind != Kind::Response {
        return Err(bad("the error flag on a request".into()));
    }
    let stream = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if len as usize > MAX_FRAME_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let link_level = matches!(
        kind,
        Kind::Hello
            | Kind::HelloAck
            | Kind::Ping
            | Kind::Pong
            | Kind::GoAway
            | Kind::Join
            | Kind::Joined
    );
    if link_level != (stream == 0) {
        return Err(bad(format!("stream {stream} is not valid for this kind")));
    }
    Ok(Header {
        kind,
        flags: fl,
        stream,
        len,
    })
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if f.payload.len() > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(f.payload.len() as u32));
        }
        dst.reserve(HEADER_LEN + f.payload.len());
        dst.put_slice(&header(f.kind, f.flags, f.stream, f.payload.len() as u32));
        dst.put_slice(&f.payload);
        Ok(())
    }
}

/// A whole message: a JSON header and a binary body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// JSON: the call or the answer.
    pub header: Bytes,
    /// The payload (event, result, code package), never copied on the way out.
    pub body: Bytes,
}

impl Message {
    /// The message's pieces on the wire: the 12-byte prefix (total length u64, header length
    /// u32), the header, the body.
    pub fn wire_parts(&self) -> [Bytes; 3] {
        let total = 4 + self.header.len() as u64 + self.body.len() as u64;
        let mut prefix = BytesMut::with_capacity(12);
        prefix.put_u64_le(total);
        prefix.put_u32_le(self.header.len() as u32);
        [prefix.freeze(), self.header.clone(), self.body.clone()]
    }
}

struct Partial {
    kind: Kind,
    error: bool,
    remaining: u64,
    buf: BytesMut,
}

/// Rebuilds messages from their frames, per stream.
#[derive(Default)]
pub struct Assembler {
    open: HashMap<u32, Partial>,
}

/// A message put back together.
#[derive(Debug)]
pub struct Assembled {
    /// Request or response.
    pub kind: Kind,
    /// Its stream.
    pub stream: u32,
    /// A response with the error flag.
    pub error: bool,
    /// The message.
    pub message: Message,
}

impl Assembler {
    /// Takes one message frame; returns the message once its last frame is in.
    pub fn push(&mut self, f: Frame) -> Result<Option<Assembled>, FrameError> {
        let stream = f.stream;
        let err = |why: String| FrameError::Message { stream, why };
        let mut data = f.payload;
        if f.flags & flags::START != 0 {
            if self.open.contains_key(&stream) {
                return Err(err("a new message started before the last one ended".into()));
            }
            if self.open.len() >= MAX_OPEN_STREAMS {
                return Err(err(format!(
                    "more than {MAX_OPEN_STREAMS} messages half-sent at once"
                )));
            }
            if data.len() < 8 {
                return Err(err("the first frame has no message length".into()));
            }
            let total = data.get_u64_le();
            if total > MAX_MESSAGE {
                return Err(err(format!(
                    "a message of {total} bytes exceeds the {MAX_MESSAGE}-byte limit"
                )));
            }
            if total < 4 {
                return Err(err(format!(
                    "a message of {total} bytes has no header length"
                )));
            }
            let whole = f.flags & flags::END != 0;
            let buf = if whole {
                BytesMut::new()
            } else {
                BytesMut::with_capacity(total as usize)
            };
            if whole {
                // One frame: the payload is the message, no copy.
                if data.len() as u64 != total {
                    return Err(err(format!(
                        "the message says {total} bytes, its only frame has {}",
                        data.len()
                    )));
                }
                return Self::finish(f.kind, stream, f.flags & flags::ERROR != 0, data).map(Some);
            }
            self.open.insert(
                stream,
                Partial {
                    kind: f.kind,
                    error: f.flags & flags::ERROR != 0,
                    remaining: total,
                    buf,
                },
            );
        }
        let len = data.len();
        self.reserve(f.kind, stream, len)?.put_slice(&data);
        self.advance(stream, len, f.flags & flags::END != 0)
    }

    /// For a continuation frame (no START) of `len` bytes: checks it against its open message
    /// and returns the buffer its payload goes into (with room for it), so that a reader can
    /// read the payload straight into place; then call [`Assembler::advance`].
    pub fn reserve(
        &mut self,
        kind: Kind,
        stream: u32,
        len: usize,
    ) -> Result<&mut BytesMut, FrameError> {
        let err = |why: String| FrameError::Message { stream, why };
        let Some(p) = self.open.get_mut(&stream) else {
            return Err(err("a continuation frame for no open message".into()));
        };
        if p.kind != kind {
            return Err(err(format!(
                "a {kind:?} frame inside a {:?} message",
                p.kind
            )));
        }
        if len as u64 > p.remaining {
            return Err(err(format!(
                "{} more bytes than the message's length",
                len as u64 - p.remaining
            )));
        }
        p.buf.reserve(len);
        Ok(&mut p.buf)
    }

    /// Records that `len` payload bytes of a continuation frame went into the buffer that
    /// [`Assembler::reserve`] gave; returns the message once its last frame is in.
    pub fn advance(
        &mut self,
        stream: u32,
        len: usize,
        end: bool,
    ) -> Result<Option<Assembled>, FrameError> {
        let err = |why: String| FrameError::Message { stream, why };
        let Some(p) = self.open.get_mut(&stream) else {
            return Err(err("a continuation frame for no open message".into()));
        };
        p.remaining -= len as u64;
        match (end, p.remaining) {
            (false, _) => Ok(None),
            (true, 0) => {
                let p = self.open.remove(&stream).expect("open message");
                Self::finish(p.kind, stream, p.error, p.buf.freeze()).map(Some)
            }
            (true, left) => Err(err(format!("the message ended {left} bytes short"))),
        }
    }

    /// Drops a half-received message (its sender cancelled it).
    pub fn drop_stream(&mut self, stream: u32) {
        self.open.remove(&stream);
    }

    fn finish(
        kind: Kind,
        stream: u32,
        error: bool,
        mut all: Bytes,
    ) -> Result<Assembled, FrameError> {
        let header_len = all.get_u32_le() as usize;
        if header_len > all.len() {
            return Err(FrameError::Message {
                stream,
                why: format!(
                    "header of {header_len} bytes in a message of {} bytes",
                    all.len()
                ),
            });
        }
        let header = all.split_to(header_len);
        Ok(Assembled {
            kind,
            stream,
            error,
            message: Message { header, body: all },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Cuts a message into frames of at most `chunk` payload bytes, as the link's writer
    /// does (which sends the same bytes without building frames).
    fn to_frames(m: &Message, kind: Kind, stream: u32, extra: u8, chunk: usize) -> Vec<Frame> {
        let mut all = BytesMut::new();
        for p in m.wire_parts() {
            all.put_slice(&p);
        }
        let all = all.freeze();
        let mut out = Vec::new();
        let mut off = 0;
        while off < all.len() {
            // The first frame holds at least the 12-byte prefix.
            let size = if off == 0 { chunk.max(12) } else { chunk };
            let end = (off + size).min(all.len());
            let mut fl = extra;
            if off == 0 {
                fl |= flags::START;
            }
            if end == all.len() {
                fl |= flags::END;
            }
            out.push(Frame {
                kind,
                flags: fl,
                stream,
                payload: all.slice(off..end),
            });
            off = end;
        }
        out
    }

    fn decode_all(mut buf: BytesMut) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        while let Some(f) = FrameCodec.decode(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn bad_frames_are_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x47, 0x45, 0x54, 0x20], "bad frame magic 0x47"),
            (header(Kind::Ping, 0, 0, 0).to_vec(), ""),
            (
                {
                    let mut h = header(Kind::Ping, 0, 0, 0);
                    h[1] = 99;
                    h.to_vec()
                },
                "unknown frame kind 99",
            ),
            (
                header(Kind::Request, 0x10, 3, 0).to_vec(),
                "unknown flags 0x10",
            ),
            (
                header(Kind::Ping, flags::END, 0, 0).to_vec(),
                "on a frame that takes none",
            ),
            (
                header(Kind::Request, flags::ERROR, 3, 0).to_vec(),
                "error flag on a request",
            ),
            (
                header(Kind::Request, 0, 0, 0).to_vec(),
                "stream 0 is not valid",
            ),
            (
                header(Kind::Pong, 0, 7, 0).to_vec(),
                "stream 7 is not valid",
            ),
            (
                header(Kind::Request, 0, 1, (MAX_FRAME_PAYLOAD + 1) as u32).to_vec(),
                "exceeds the",
            ),
        ];
        for (bytes, want) in cases {
            let r = decode_all(BytesMut::from(&bytes[..]));
            if want.is_empty() {
                assert_eq!(r.unwrap().len(), 1);
            } else {
                let e = r.unwrap_err().to_string();
                assert!(e.contains(want), "{e:?} should contain {want:?}");
            }
        }
    }

    #[test]
    fn message_errors_are_named() {
        let mut a = Assembler::default();
        let cont = Frame {
            kind: Kind::Request,
            flags: flags::END,
            stream: 5,
            payload: Bytes::from_static(b"xx"),
        };
        assert!(a
            .push(cont)
            .unwrap_err()
            .to_string()
            .contains("no open message"));
        let mut first = BytesMut::new();
        first.put_u64_le(10);
        first.put_u32_le(2);
        let f = Frame {
            kind: Kind::Request,
            flags: flags::START,
            stream: 5,
            payload: first.freeze(),
        };
        assert!(a.push(f.clone()).unwrap().is_none());
        assert!(a
            .push(f)
            .unwrap_err()
            .to_string()
            .contains("before the last one ended"));
        let short = Frame {
            kind: Kind::Request,
            flags: flags::END,
            stream: 5,
            payload: Bytes::from_static(b"ab"),
        };
        assert!(a
            .push(short)
            .unwrap_err()
            .to_string()
            .contains("ended 4 bytes short"));
        let mut huge = BytesMut::new();
        huge.put_u64_le(MAX_MESSAGE + 1);
        let f = Frame {
            kind: Kind::Request,
            flags: flags::START,
            stream: 9,
            payload: huge.freeze(),
        };
        assert!(a.push(f).unwrap_err().to_string().contains("exceeds"));
    }

    proptest! {
        #[test]
        fn messages_round_trip(
            header in proptest::collection::vec(any::<u8>(), 0..300),
            body in proptest::collection::vec(any::<u8>(), 0..5000),
            chunk in 1usize..700,
            split in 1usize..64,
        ) {
            let m = Message { header: header.into(), body: body.into() };
            let frames = to_frames(&m, Kind::Response, 4, flags::ERROR, chunk);
            let mut wire = BytesMut::new();
            for f in frames {
                FrameCodec.encode(f, &mut wire).unwrap();
            }
            // Feed the decoder in pieces, as a socket would.
            let mut buf = BytesMut::new();
            let mut asm = Assembler::default();
            let mut got = None;
            for piece in wire.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(f) = FrameCodec.decode(&mut buf).unwrap() {
                    if let Some(a) = asm.push(f).unwrap() {
                        prop_assert!(got.is_none());
                        got = Some(a);
                    }
                }
            }
            let a = got.expect("a whole message");
            prop_assert!(a.error);
            prop_assert_eq!(a.stream, 4);
            prop_assert_eq!(a.message, m);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut asm = Assembler::default();
            while let Ok(Some(f)) = FrameCodec.decode(&mut buf) {
                if f.kind.is_message() && asm.push(f).is_err() {
                    break;
                }
            }
        }
    }
}
