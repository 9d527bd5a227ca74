//! One neighbour link: a connection (TCP, or a Unix socket on one host) carrying many calls
//! at once in both directions.
//!
//! - **Greeting.** The dialer sends [`Hello`] (its versions, role and unit), the acceptor
//!   answers [`HelloAck`] with the highest common version, or a GoAway frame naming why it
//!   refuses (no common version, a unit id already taken, ...). Both sides give up after
//!   [`LinkConfig::hello_timeout`].
//! - **Calls.** Each call is a stream: the dialer numbers its streams odd, the acceptor even.
//!   A request and its response are messages ([`Message`]: JSON header, raw body) cut into
//!   frames; the writer interleaves the frames of all messages in flight, so a 64 MiB payload
//!   does not stall a small call behind it, and writes large bodies straight from the
//!   caller's buffer (no copy in user space on the way out). While the writer task is idle,
//!   a small message (one frame) is written by its caller, straight to the socket: on these
//!   VMs waking the task costs 50-80 us, more than the rest of the send.
//! - **Back-pressure.** The outgoing queue is bounded (callers wait for room), and at most
//!   [`LinkConfig::max_concurrent`] incoming calls run at once: past that the reader stops
//!   reading, and TCP flow control pushes back on the peer.
//! - **Timeouts and liveness.** Every call has a deadline; a caller that gives up (deadline, or
//!   its future dropped) sends a Cancel frame and the far side aborts the handler. Each side
//!   sends a Ping with its load every [`LinkConfig::heartbeat`]; a link that hears nothing for
//!   [`LinkConfig::dead_after`] closes itself.
//! - **Failure.** A malformed frame, a protocol violation, an i/o error or a GoAway closes the
//!   link: every call waiting on it fails with [`LinkError::Closed`] and the reason, every
//!   handler it started is aborted. The process carries on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf,
};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;

use crate::frame::{self, flags, Assembler, Frame, FrameCodec, FrameError, Kind, Message};
use crate::proto::{
    limits, negotiate, Answer, Call, Hello, HelloAck, RemoteError, RemoteErrorKind, Role, UnitInfo,
    VERSIONS,
};

/// Link settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// How often each side pings.
    pub heartbeat: Duration,
    /// Silence after which the link closes itself.
    pub dead_after: Duration,
    /// How long the greeting may take.
    pub hello_timeout: Duration,
    /// Most incoming calls running at once.
    pub max_concurrent: usize,
    /// Messages and frames queued for the writer.
    pub queue: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_secs(3),
            hello_timeout: Duration::from_secs(5),
            max_concurrent: 256,
            queue: 64,
        }
    }
}

/// Why a link or a call on it failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting or talking failed.
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The greeting failed.
    #[error("link greeting: {0}")]
    Handshake(String),
    /// The link is closed (the reason says why: the peer went away, a malformed frame, ...).
    #[error("link closed: {0}")]
    Closed(String),
    /// The call's deadline passed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The far side failed the call.
    #[error("{0}")]
    Remote(RemoteError),
    /// An answer that does not parse.
    #[error("malformed answer: {0}")]
    BadAnswer(String),
}

/// The far side's handling of incoming calls (the shim's functions, or the control plane's
/// view of a unit).
pub trait Service: Send + Sync + 'static {
    /// Serves one call.
    fn call(
        &self,
        msg: Message,
    ) -> Pin<Box<dyn Future<Output = Result<Message, RemoteError>> + Send + 'static>>;

    /// What this side sends with each ping (its load, JSON).
    fn load(&self) -> Bytes {
        Bytes::new()
    }

    /// A ping from the peer, with its load.
    fn heartbeat(&self, _load: Bytes) {}
}

/// A service that refuses every call (a side that only makes calls).
pub struct NoCalls;

impl Service for NoCalls {
    fn call(
        &self,
        _msg: Message,
    ) -> Pin<Box<dyn Future<Output = Result<Message, RemoteError>> + Send + 'static>> {
        Box::pin(async {
            Err(RemoteError::new(
                RemoteErrorKind::BadCall,
                "this side of the link takes no calls",
            ))
        })
    }
}

enum Out {
    Msg {
        kind: Kind,
        stream: u32,
        error: bool,
        msg: Message,
    },
    Frame(Frame),
    Close(String),
    /// Nothing to send: the writer has a direct write's rest to finish.
    Wake,
}

type Waiter = oneshot::Sender<Result<(bool, Message), LinkError>>;

/// Process-unique link ids.
static LINK_IDS: AtomicU64 = AtomicU64::new(1);

struct Shared {
    id: u64,
    peer: UnitInfo,
    version: u16,
    out: mpsc::Sender<Out>,
    pending: Mutex<HashMap<u32, Waiter>>,
    handlers: Mutex<HashMap<u32, AbortHandle>>,
    next_stream: AtomicU32,
    closed: watch::Sender<Option<String>>,
    tasks: Mutex<Vec<AbortHandle>>,
    epoch: Instant,
    last_heard_ms: AtomicU64,
    calls_out: AtomicU64,
    calls_in: AtomicU64,
    /// The writer, while its task waits for work.
    parked: Mutex<Parked>,
}

/// The connection's writing half, as the writer task leaves it while idle (its buffer
/// flushed): a caller may write one small message straight to it. What the socket did not
/// take at once is left in `rest` for the task, which writes it before anything else.
#[derive(Default)]
struct Parked {
    w: Option<Writer>,
    rest: Option<Bytes>,
}

/// The writing half of a link's connection.
type Writer = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// Messages up to this size (one frame) may be written by their caller.
const DIRECT_MAX: usize = 16 * 1024;

impl Shared {
    /// Sends a message: written by the caller when the writer is idle and the message is
    /// small, else queued for the writer task (waiting for room in the queue).
    async fn send_msg(
        &self,
        kind: Kind,
        stream: u32,
        error: bool,
        msg: Message,
    ) -> Result<(), mpsc::error::SendError<Out>> {
        if self.write_direct(kind, stream, error, &msg) {
            return Ok(());
        }
        self.out
            .send(Out::Msg {
                kind,
                stream,
                error,
                msg,
            })
            .await
    }

    /// Writes a one-frame message to the parked writer without waiting; false if it cannot
    /// (the writer is busy, the message too large, or the socket took none of it).
    fn write_direct(&self, kind: Kind, stream: u32, error: bool, msg: &Message) -> bool {
        let parts = msg.wire_parts();
        let total: usize = parts.iter().map(Bytes::len).sum();
        if total > DIRECT_MAX {
            return false;
        }
        let mut p = self.parked.lock().expect("parked lock");
        if p.rest.is_some() {
            return false;
        }
        let Some(w) = p.w.as_mut() else {
            return false;
        };
        let fl = flags::START | flags::END | if error { flags::ERROR } else { 0 };
        let mut buf = BytesMut::with_capacity(frame::HEADER_LEN + total);
        buf.extend_from_slice(&frame::header(kind, fl, stream, total as u32));
        for part in &parts {
            buf.extend_from_slice(part);
        }
        // A non-blocking write: a socket that is full (or failing) answers at once, and the
        // writer task takes over (and meets the error, if any).
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut off = 0;
        while off < buf.len() {
            match Pin::new(w.get_mut()).poll_write(&mut cx, &buf[off..]) {
                std::task::Poll::Ready(Ok(n)) if n > 0 => off += n,
                _ => break,
            }
        }
        if off == 0 {
            return false;
        }
        if off < buf.len() {
            p.rest = Some(buf.freeze().slice(off..));
            drop(p);
            // Wake the task for the rest; a full queue wakes it anyway.
            let _ = self.out.try_send(Out::Wake);
        } else if !matches!(
            Pin::new(w.get_mut()).poll_flush(&mut cx),
            std::task::Poll::Ready(Ok(()))
        ) {
            // A TLS stream takes the bytes into its own buffer and may not have sent them
            // all: the task flushes the rest (it flushes before it parks again).
            drop(p);
            let _ = self.out.try_send(Out::Wake);
        }
        true
    }

    fn close(&self, reason: &str) {
        let first = self.closed.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.to_owned());
            true
        });
        if !first {
            return;
        }
        tracing::debug!(unit = self.peer.id, reason, "link closed");
        for (_, w) in self.pending.lock().expect("pending lock").drain() {
            let _ = w.send(Err(LinkError::Closed(reason.to_owned())));
        }
        for (_, h) in self.handlers.lock().expect("handlers lock").drain() {
            h.abort();
        }
        // The writer sends a GoAway and stops; if it is stuck on a full socket, stop it.
        if self.out.try_send(Out::Close(reason.to_owned())).is_err() {
            for t in self.tasks.lock().expect("tasks lock").iter() {
                t.abort();
            }
        } else {
            // The reader and heartbeat stop here; the writer after its GoAway.
            let tasks = self.tasks.lock().expect("tasks lock");
            for t in tasks.iter().skip(1) {
                t.abort();
            }
        }
    }

    fn reason(&self) -> String {
        self.closed
            .borrow()
            .clone()
            .unwrap_or_else(|| "the link stopped".into())
    }

    fn heard(&self) {
        self.last_heard_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// A live link. Cheap to clone; closes when [`Link::close`] is called or the connection
/// fails (not when the last clone is dropped: call `close`).
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.shared.peer.id)
            .field("version", &self.shared.version)
            .field("closed", &self.close_reason())
            .finish()
    }
}

/// Removes a call's waiter and cancels it on the far side if the caller gives up first.
struct CallGuard<'a> {
    shared: &'a Shared,
    stream: u32,
    done: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.done
            && self
                .shared
                .pending
                .lock()
                .expect("pending lock")
                .remove(&self.stream)
                .is_some()
        {
            let _ = self.shared.out.try_send(Out::Frame(Frame {
                kind: Kind::Cancel,
                flags: 0,
                stream: self.stream,
                payload: Bytes::new(),
            }));
        }
    }
}

impl Link {
    /// A number no other link of this process has (links compare by it).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The unit on the other side.
    pub fn peer(&self) -> &UnitInfo {
        &self.shared.peer
    }

    /// The link version in use.
    pub fn version(&self) -> u16 {
        self.shared.version
    }

    /// Why the link closed, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.closed.borrow().clone()
    }

    /// Calls made and served on this link.
    pub fn call_counts(&self) -> (u64, u64) {
        (
            self.shared.calls_out.load(Ordering::Relaxed),
            self.shared.calls_in.load(Ordering::Relaxed),
        )
    }

    /// Waits until the link closes; returns the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.shared.closed.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return self.shared.reason();
            }
        }
    }

    /// Closes the link, telling the peer why.
    pub fn close(&self, reason: &str) {
        self.shared.close(reason);
    }

    /// Sends a message as a call and waits for the answer (`Remote` if the far side failed
    /// it).
    pub async fn call_raw(&self, msg: Message, timeout: Duration) -> Result<Message, LinkError> {
        if let Some(r) = self.close_reason() {
            return Err(LinkError::Closed(r));
        }
        let sh = &self.shared;
        let stream = sh.next_stream.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        sh.pending.lock().expect("pending lock").insert(stream, tx);
        let mut guard = CallGuard {
            shared: sh,
            stream,
            done: false,
        };
        sh.calls_out.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + timeout;
        let send = sh.send_msg(Kind::Request, stream, false, msg);
        match tokio::time::timeout_at(deadline, send).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(LinkError::Closed(sh.reason())),
            Err(_) => return Err(LinkError::Timeout(timeout)),
        }
        let r = tokio::time::timeout_at(deadline, rx).await;
        guard.done = r.is_ok();
        match r {
            Ok(Ok(Ok((false, m)))) => Ok(m),
            Ok(Ok(Ok((true, m)))) => Err(match serde_json::from_slice::<RemoteError>(&m.header) {
                Ok(e) => LinkError::Remote(e),
                Err(e) => LinkError::BadAnswer(format!("an error answer that does not parse: {e}")),
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(LinkError::Closed(sh.reason())),
            Err(_) => Err(LinkError::Timeout(timeout)),
        }
    }

    /// Makes a typed call.
    pub async fn call(
        &self,
        call: &Call,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(Answer, Bytes), LinkError> {
        let header = serde_json::to_vec(call).expect("calls serialize");
        let m = self
            .call_raw(
                Message {
                    header: header.into(),
                    body,
                },
                timeout,
            )
            .await?;
        let answer =
            serde_json::from_slice(&m.header).map_err(|e| LinkError::BadAnswer(format!("{e}")))?;
        Ok((answer, m.body))
    }
}

pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    stream: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&frame::header(kind, 0, stream, payload.len() as u32))
        .await?;
    w.write_all(payload).await?;
    w.flush().await
}

pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut FramedRead<R, FrameCodec>,
    timeout: Duration,
) -> Result<Frame, LinkError> {
    match tokio::time::timeout(timeout, r.next()).await {
        Err(_) => Err(LinkError::Handshake(format!(
            "no greeting within {timeout:?}"
        ))),
        Ok(None) => Err(LinkError::Handshake(
            "the peer closed the connection during the greeting".into(),
        )),
        Ok(Some(Err(e))) => Err(LinkError::Handshake(e.to_string())),
        Ok(Some(Ok(f))) => Ok(f),
    }
}

/// Dials: greets the acceptor over `io` and starts the link.
pub async fn connect<T>(
    io: T,
    me: UnitInfo,
    role: Role,
    service: Arc<dyn Service>,
    cfg: LinkConfig,
) -> Result<Link, LinkError>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(io);
    let mut reader = FramedRead::with_capacity(r, FrameCodec, 2 * frame::CHUNK);
    let hello = Hello {
        min_version: VERSIONS.0,
        max_version: VERSIONS.1,
        role,
        unit: me,
    };
    let payload = serde_json::to_vec(&hello).expect("hello serializes");
    write_frame(&mut w, Kind::Hello, 0, &payload).await?;
    let f = read_frame(&mut reader, cfg.hello_timeout).await?;
    match f.kind {
        Kind::HelloAck => {}
        Kind::GoAway => {
            return Err(LinkError::Handshake(format!(
                "refused: {}",
                String::from_utf8_lossy(&f.payload)
            )))
        }
        other => {
            return Err(LinkError::Handshake(format!(
                "expected a greeting, got a {other:?} frame"
            )))
        }
    }
    let ack: HelloAck = serde_json::from_slice(&f.payload)
        .map_err(|e| LinkError::Handshake(format!("malformed greeting: {e}")))?;
    ack.unit
        .validate()
        .map_err(|e| LinkError::Handshake(format!("the peer's greeting: {e}")))?;
    if ack.version < VERSIONS.0 || ack.version > VERSIONS.1 {
        return Err(LinkError::Handshake(format!(
            "the peer chose link version {}, this build speaks {}..={}",
            ack.version, VERSIONS.0, VERSIONS.1
        )));
    }
    Ok(start(reader, w, ack.unit, ack.version, 1, service, cfg))
}

/// Accepts: reads the dialer's greeting, lets `admit` refuse it (with a reason sent back)
/// or give the service for it, answers, and starts the link.
pub async fn accept<T>(
    io: T,
    me: UnitInfo,
    role: Role,
    cfg: LinkConfig,
    admit: impl FnOnce(&Hello) -> Result<Arc<dyn Service>, String>,
) -> Result<Link, LinkError>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(io);
    let mut reader = FramedRead::with_capacity(r, FrameCodec, 2 * frame::CHUNK);
    let f = read_frame(&mut reader, cfg.hello_timeout).await?;
    let checked = (|| {
        if f.kind != Kind::Hello {
            return Err(format!("expected a greeting, got a {:?} frame", f.kind));
        }
        if f.payload.len() > limits::MAX_GREETING {
            return Err(format!(
                "a greeting of {} bytes (at most {})",
                f.payload.len(),
                limits::MAX_GREETING
            ));
        }
        let hello: Hello =
            serde_json::from_slice(&f.payload).map_err(|e| format!("malformed greeting: {e}"))?;
        hello
            .unit
            .validate()
            .map_err(|e| format!("greeting refused: {e}"))?;
        let version =
            negotiate(VERSIONS, (hello.min_version, hello.max_version)).ok_or_else(|| {
                format!(
                    "no common link version: the peer speaks {}..={}, this side {}..={}",
                    hello.min_version, hello.max_version, VERSIONS.0, VERSIONS.1
                )
            })?;
        let service = admit(&hello)?;
        Ok((hello, version, service))
    })();
    let (hello, version, service) = match checked {
        Ok(c) => c,
        Err(why) => {
            let _ = write_frame(&mut w, Kind::GoAway, 0, why.as_bytes()).await;
            return Err(LinkError::Handshake(why));
        }
    };
    let ack = HelloAck {
        version,
        role,
        unit: me,
    };
    let payload = serde_json::to_vec(&ack).expect("ack serializes");
    write_frame(&mut w, Kind::HelloAck, 0, &payload).await?;
    Ok(start(reader, w, hello.unit, version, 2, service, cfg))
}

fn start<T>(
    reader: FramedRead<ReadHalf<T>, FrameCodec>,
    w: WriteHalf<T>,
    peer: UnitInfo,
    version: u16,
    first_stream: u32,
    service: Arc<dyn Service>,
    cfg: LinkConfig,
) -> Link
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (out, rx) = mpsc::channel(cfg.queue);
    let shared = Arc::new(Shared {
        id: LINK_IDS.fetch_add(1, Ordering::Relaxed),
        peer,
        version,
        out,
        pending: Mutex::new(HashMap::new()),
        handlers: Mutex::new(HashMap::new()),
        next_stream: AtomicU32::new(first_stream),
        closed: watch::channel(None).0,
        tasks: Mutex::new(Vec::new()),
        epoch: Instant::now(),
        last_heard_ms: AtomicU64::new(0),
        calls_out: AtomicU64::new(0),
        calls_in: AtomicU64::new(0),
        parked: Mutex::new(Parked::default()),
    });
    // The tasks are spawned under the lock `close` takes to stop them, so that a close from
    // one of them finds every handle. The writer comes first: `close` lets it finish its
    // GoAway and stops the others.
    let mut tasks = shared.tasks.lock().expect("tasks lock");
    let w: Box<dyn AsyncWrite + Send + Unpin> = Box::new(w);
    tasks.push(tokio::spawn(write_loop(shared.clone(), w, rx)).abort_handle());
    tasks.push(
        tokio::spawn(read_loop(
            shared.clone(),
            reader,
            service.clone(),
            cfg.max_concurrent,
            first_stream,
        ))
        .abort_handle(),
    );
    tasks.push(tokio::spawn(heartbeat_loop(shared.clone(), service, cfg)).abort_handle());
    drop(tasks);
    Link { shared }
}

struct Sending {
    kind: Kind,
    stream: u32,
    error: bool,
    parts: [Bytes; 3],
    total: usize,
    sent: usize,
}

impl Sending {
    /// Writes the next frame of the message; true when it was the last.
    async fn write_chunk<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<bool> {
        let len = (self.total - self.sent).min(frame::CHUNK);
        let mut fl = if self.error { flags::ERROR } else { 0 };
        if self.sent == 0 {
            fl |= flags::START;
        }
        if self.sent + len == self.total {
            fl |= flags::END;
        }
        w.write_all(&frame::header(self.kind, fl, self.stream, len as u32))
            .await?;
        let (mut at, end) = (self.sent, self.sent + len);
        let mut base = 0;
        for p in &self.parts {
            let (lo, hi) = (base, base + p.len());
            if at < hi && lo < end {
                let s = &p[at - lo..end.min(hi) - lo];
                w.write_all(s).await?;
                at += s.len();
            }
            base = hi;
        }
        self.sent = end;
        Ok(self.sent == self.total)
    }
}

async fn write_loop(
    shared: Arc<Shared>,
    w: Box<dyn AsyncWrite + Send + Unpin>,
    mut rx: mpsc::Receiver<Out>,
) {
    // Frames of up to 64 KiB are gathered in the buffer; larger writes bypass it.
    let mut w: Writer = BufWriter::with_capacity(64 * 1024, w);
    let mut urgent: VecDeque<Frame> = VecDeque::new();
    let mut sending: VecDeque<Sending> = VecDeque::new();
    let mut closing: Option<String> = None;
    let result: std::io::Result<()> = async {
        loop {
            if urgent.is_empty() && sending.is_empty() {
                w.flush().await?;
                // Idle: callers may write small messages themselves until there is work.
                shared.parked.lock().expect("parked lock").w = Some(w);
                let o = rx.recv().await;
                let (back, rest) = {
                    let mut p = shared.parked.lock().expect("parked lock");
                    (p.w.take(), p.rest.take())
                };
                w = back.expect("only this task takes the parked writer");
                if let Some(rest) = rest {
                    w.write_all(&rest).await?;
                }
                match o {
                    Some(o) => take(o, &mut urgent, &mut sending, &mut closing),
                    None => return Ok(()),
                }
            }
            while let Ok(o) = rx.try_recv() {
                take(o, &mut urgent, &mut sending, &mut closing);
            }
            if let Some(reason) = closing.take() {
                w.write_all(&frame::header(Kind::GoAway, 0, 0, reason.len() as u32))
                    .await?;
                w.write_all(reason.as_bytes()).await?;
                w.flush().await?;
                w.shutdown().await?;
                return Ok(());
            }
            while let Some(f) = urgent.pop_front() {
                w.write_all(&frame::header(
                    f.kind,
                    f.flags,
                    f.stream,
                    f.payload.len() as u32,
                ))
                .await?;
                w.write_all(&f.payload).await?;
            }
            // One frame of the oldest message, then the next message gets its turn.
            if let Some(mut m) = sending.pop_front() {
                if !m.write_chunk(&mut w).await? {
                    sending.push_back(m);
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        shared.close(&format!("writing to unit {}: {e}", shared.peer.id));
    }
}

fn take(
    o: Out,
    urgent: &mut VecDeque<Frame>,
    sending: &mut VecDeque<Sending>,
    closing: &mut Option<String>,
) {
    match o {
        Out::Frame(f) => urgent.push_back(f),
        Out::Close(r) => *closing = Some(r),
        Out::Wake => {}
        Out::Msg {
            kind,
            stream,
            error,
            msg,
        } => {
            let parts = msg.wire_parts();
            let total = parts.iter().map(Bytes::len).sum();
            sending.push_back(Sending {
                kind,
                stream,
                error,
                parts,
                total,
                sent: 0,
            });
        }
    }
}

/// Reads frames off the connection. The payload of a message's continuation frame is read
/// straight into that message's buffer, so the bulk of a large message is copied once, by
/// the kernel (the first frame and small frames go through a read buffer).
struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Makes the buffer hold at least `n` bytes; false on a clean end of stream before any.
    async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            self.buf.reserve((n - self.buf.len()).max(64 * 1024));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection closed inside a frame",
                ));
            }
        }
        Ok(true)
    }

    async fn header(&mut self) -> Result<Option<frame::Header>, FrameError> {
        if !self.fill(1).await? {
            return Ok(None);
        }
        if self.buf[0] != frame::MAGIC {
            return Err(FrameError::BadMagic(self.buf[0]));
        }
        self.fill(frame::HEADER_LEN).await?;
        let h = frame::parse_header(self.buf[..frame::HEADER_LEN].try_into().expect("12 bytes"))?;
        self.buf.advance(frame::HEADER_LEN);
        Ok(Some(h))
    }

    async fn payload(&mut self, n: usize) -> std::io::Result<Bytes> {
        self.fill(n).await?;
        Ok(self.buf.split_to(n).freeze())
    }

    async fn payload_into(&mut self, dst: &mut BytesMut, n: usize) -> std::io::Result<()> {
        let buffered = n.min(self.buf.len());
        dst.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        let mut left = n - buffered;
        while left > 0 {
            let k = (&mut self.io).take(left as u64).read_buf(dst).await?;
            if k == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection closed inside a frame",
                ));
            }
            left -= k;
        }
        Ok(())
    }
}

async fn read_loop<R: AsyncRead + Unpin + Send + 'static>(
    shared: Arc<Shared>,
    reader: FramedRead<R, FrameCodec>,
    service: Arc<dyn Service>,
    max_concurrent: usize,
    my_parity: u32,
) {
    let limit = Arc::new(Semaphore::new(max_concurrent));
    let mut asm = Assembler::default();
    let peer = shared.peer.id;
    let parts = reader.into_parts();
    let mut reader = FrameReader {
        io: parts.io,
        buf: parts.read_buf,
    };
    shared.heard();
    let reason = loop {
        let h = match reader.header().await {
            Ok(None) => break format!("unit {peer} closed the connection"),
            Err(FrameError::Io(e)) => break format!("reading from unit {peer}: {e}"),
            Err(e) => break format!("malformed frame from unit {peer}: {e}"),
            Ok(Some(h)) => h,
        };
        let continuation = h.kind.is_message() && h.flags & flags::START == 0;
        let mut payload = Bytes::new();
        let mut assembled = None;
        if continuation {
            let theirs = h.stream % 2 != my_parity % 2;
            if (h.kind == Kind::Request) != theirs {
                break format!(
                    "protocol error from unit {peer}: a {:?} on stream {} (wrong direction)",
                    h.kind, h.stream
                );
            }
            let dst = match asm.reserve(h.kind, h.stream, h.len as usize) {
                Ok(d) => d,
                Err(e) => break format!("malformed message from unit {peer}: {e}"),
            };
            if let Err(e) = reader.payload_into(dst, h.len as usize).await {
                break format!("reading from unit {peer}: {e}");
            }
            match asm.advance(h.stream, h.len as usize, h.flags & flags::END != 0) {
                Ok(a) => assembled = Some(a),
                Err(e) => break format!("malformed message from unit {peer}: {e}"),
            }
        } else {
            match reader.payload(h.len as usize).await {
                Ok(p) => payload = p,
                Err(e) => break format!("reading from unit {peer}: {e}"),
            }
        }
        shared.heard();
        let f = Frame {
            kind: h.kind,
            flags: h.flags,
            stream: h.stream,
            payload,
        };
        match f.kind {
            Kind::Request | Kind::Response => {
                let theirs = f.stream % 2 != my_parity % 2;
                if (f.kind == Kind::Request) != theirs {
                    break format!(
                        "protocol error from unit {peer}: a {:?} on stream {} (wrong direction)",
                        f.kind, f.stream
                    );
                }
                let pushed = match assembled {
                    Some(a) => Ok(a),
                    None => asm.push(f),
                };
                let a = match pushed {
                    Ok(None) => continue,
                    Ok(Some(a)) => a,
                    Err(e) => break format!("malformed message from unit {peer}: {e}"),
                };
                if a.kind == Kind::Response {
                    let w = shared
                        .pending
                        .lock()
                        .expect("pending lock")
                        .remove(&a.stream);
                    if let Some(w) = w {
                        let _ = w.send(Ok((a.error, a.message)));
                    }
                    continue;
                }
                shared.calls_in.fetch_add(1, Ordering::Relaxed);
                // Back-pressure: past the limit, stop reading until a handler finishes.
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break "the link stopped".into();
                };
                let (sh, svc, stream) = (shared.clone(), service.clone(), a.stream);
                // The handle is recorded under the lock the task takes to remove it, so a
                // handler that ends at once cannot leave its entry behind.
                let mut handlers = shared.handlers.lock().expect("handlers lock");
                let task = tokio::spawn(async move {
                    let r = svc.call(a.message).await;
                    drop(permit);
                    sh.handlers.lock().expect("handlers lock").remove(&stream);
                    let (error, msg) = match r {
                        Ok(m) => (false, m),
                        Err(e) => (
                            true,
                            Message {
                                header: serde_json::to_vec(&e).expect("errors serialize").into(),
                                body: Bytes::new(),
                            },
                        ),
                    };
                    let _ = sh.send_msg(Kind::Response, stream, error, msg).await;
                });
                handlers.insert(stream, task.abort_handle());
            }
            Kind::Cancel => {
                asm.drop_stream(f.stream);
                if let Some(h) = shared
                    .handlers
                    .lock()
                    .expect("handlers lock")
                    .remove(&f.stream)
                {
                    h.abort();
                }
            }
            Kind::Ping => {
                service.heartbeat(f.payload);
                let _ = shared.out.try_send(Out::Frame(Frame {
                    kind: Kind::Pong,
                    flags: 0,
                    stream: 0,
                    payload: Bytes::new(),
                }));
            }
            Kind::Pong => {}
            Kind::GoAway => {
                break format!(
                    "unit {peer} closed the link: {}",
                    String::from_utf8_lossy(&f.payload)
                )
            }
            Kind::Hello | Kind::HelloAck | Kind::Join | Kind::Joined => {
                break format!("protocol error from unit {peer}: a second greeting")
            }
        }
    };
    shared.close(&reason);
}

async fn heartbeat_loop(shared: Arc<Shared>, service: Arc<dyn Service>, cfg: LinkConfig) {
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = shared.epoch.elapsed().as_millis() as u64;
        let silent = now.saturating_sub(shared.last_heard_ms.load(Ordering::Relaxed));
        if Duration::from_millis(silent) > cfg.dead_after {
            shared.close(&format!(
                "unit {} sent nothing for {:.1} s (heartbeats every {:?})",
                shared.peer.id,
                silent as f64 / 1000.0,
                cfg.heartbeat
            ));
            return;
        }
        let _ = shared.out.try_send(Out::Frame(Frame {
            kind: Kind::Ping,
            flags: 0,
            stream: 0,
            payload: service.load(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Echoes the body; a header `{"sleep_ms": N}` sleeps first and then sets `finished`.
    struct Echo {
        finished: Arc<AtomicBool>,
    }

    impl Service for Echo {
        fn call(
            &self,
            msg: Message,
        ) -> Pin<Box<dyn Future<Output = Result<Message, RemoteError>> + Send + 'static>> {
            let finished = self.finished.clone();
            Box::pin(async move {
                let v: serde_json::Value = serde_json::from_slice(&msg.header)
                    .map_err(|e| RemoteError::new(RemoteErrorKind::BadCall, e.to_string()))?;
                if let Some(ms) = v.get("sleep_ms").and_then(|m| m.as_u64()) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    finished.store(true, Ordering::SeqCst);
                }
                if v.get("fail").is_some() {
                    return Err(RemoteError::new(RemoteErrorKind::NotFound, "no such thing"));
                }
                Ok(msg)
            })
        }
    }

    fn unit(id: u32) -> UnitInfo {
        UnitInfo::detect(id, None, None)
    }

    fn fast() -> LinkConfig {
        LinkConfig {
            heartbeat: Duration::from_millis(50),
            dead_after: Duration::from_millis(1500),
            ..LinkConfig::default()
        }
    }

    /// A listener whose accepted links echo; returns its address, the flag and the accepted
    /// links.
    async fn echo_server() -> (
        std::net::SocketAddr,
        Arc<AtomicBool>,
        mpsc::UnboundedReceiver<Result<Link, LinkError>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let finished = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let f2 = finished.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let svc: Arc<dyn Service> = Arc::new(Echo {
                    finished: f2.clone(),
                });
                let r = accept(s, unit(0), Role::Control, fast(), |_| Ok(svc)).await;
                let _ = tx.send(r);
            }
        });
        (addr, finished, rx)
    }

    async fn dial(addr: std::net::SocketAddr) -> Link {
        let s = TcpStream::connect(addr).await.unwrap();
        connect(s, unit(7), Role::Shim, Arc::new(NoCalls), fast())
            .await
            .unwrap()
    }

    fn msg(header: &str, body: Vec<u8>) -> Message {
        Message {
            header: Bytes::copy_from_slice(header.as_bytes()),
            body: body.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_messages_written_by_their_callers_survive_a_full_connection() {
        // A 1 KiB pipe: callers' direct writes of 900-byte calls fill it at once, leave
        // their rest to the writer task, and the others queue behind it; every call must
        // still get its own body back.
        let (a, b) = tokio::io::duplex(1024);
        let finished = Arc::new(AtomicBool::new(false));
        let svc: Arc<dyn Service> = Arc::new(Echo { finished });
        let server = tokio::spawn(accept(b, unit(0), Role::Control, fast(), move |_| Ok(svc)));
        let link = connect(a, unit(7), Role::Shim, Arc::new(NoCalls), fast())
            .await
            .unwrap();
        let _server_side = server.await.unwrap().unwrap();
        let mut calls = Vec::new();
        for i in 0..200u32 {
            let l = link.clone();
            calls.push(tokio::spawn(async move {
                let body: Vec<u8> = (0..900u32).map(|j| ((i + j) % 251) as u8).collect();
                let m = l
                    .call_raw(msg("{}", body.clone()), Duration::from_secs(20))
                    .await
                    .unwrap();
                assert_eq!(m.body.as_ref(), &body[..], "call {i}");
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
        assert!(link.close_reason().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_round_trip_concurrently_and_large_payloads_do_not_block_small_ones() {
        let big: Vec<u8> = (0..24 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (addr, _, mut accepted) = echo_server().await;
        let link = dial(addr).await;
        let server_side = accepted.recv().await.unwrap().unwrap();
        assert_eq!(server_side.peer().id, 7);
        assert_eq!(link.peer().id, 0);
        assert_eq!(link.version(), 1);

        let l2 = link.clone();
        let big2 = big.clone();
        let large = tokio::spawn(async move {
            let t = Instant::now();
            let r = l2
                .call_raw(msg("{}", big2), Duration::from_secs(30))
                .await
                .unwrap();
            (r, t.elapsed())
        });
        // Small calls while the large one streams.
        let mut small = Vec::new();
        for i in 0..50u32 {
            let l = link.clone();
            small.push(tokio::spawn(async move {
                let body = i.to_le_bytes().to_vec();
                let r = l
                    .call_raw(msg("{\"n\":1}", body.clone()), Duration::from_secs(10))
                    .await
                    .unwrap();
                assert_eq!(r.body, body);
                assert_eq!(&r.header[..], b"{\"n\":1}");
            }));
        }
        for s in small {
            s.await.unwrap();
        }
        let (r, _) = large.await.unwrap();
        assert_eq!(r.body.len(), big.len());
        assert!(r.body == big, "the large payload came back changed");

        // An error answer comes back as Remote, with its kind.
        match link
            .call_raw(msg("{\"fail\":1}", vec![]), Duration::from_secs(5))
            .await
        {
            Err(LinkError::Remote(e)) => {
                assert_eq!(e.kind, RemoteErrorKind::NotFound);
                assert_eq!(e.message, "no such thing");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(server_side.call_counts().1, 52);
        // Every finished handler took its entry away.
        assert!(server_side.shared.handlers.lock().unwrap().is_empty());
        link.close("test over");
        let why = server_side.closed().await;
        assert!(why.contains("test over"), "{why}");
    }

    #[tokio::test]
    async fn a_timed_out_call_is_cancelled_on_the_far_side() {
        let (addr, finished, _acc) = echo_server().await;
        let link = dial(addr).await;
        let r = link
            .call_raw(
                msg("{\"sleep_ms\":600}", vec![]),
                Duration::from_millis(100),
            )
            .await;
        assert!(matches!(r, Err(LinkError::Timeout(_))), "{r:?}");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(
            !finished.load(Ordering::SeqCst),
            "the handler ran to the end after its caller gave up"
        );
        // The link is still usable.
        let r = link
            .call_raw(msg("{}", b"ok".to_vec()), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(&r.body[..], b"ok");
    }

    #[tokio::test]
    async fn calls_in_flight_fail_with_the_reason_when_the_peer_goes() {
        let (addr, _, mut accepted) = echo_server().await;
        let link = dial(addr).await;
        let server_side = accepted.recv().await.unwrap().unwrap();
        let l2 = link.clone();
        let call = tokio::spawn(async move {
            l2.call_raw(msg("{\"sleep_ms\":5000}", vec![]), Duration::from_secs(20))
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        server_side.close("unit 0 is shutting down");
        match call.await.unwrap() {
            Err(LinkError::Closed(why)) => {
                assert!(
                    why.contains("unit 0 closed the link: unit 0 is shutting down"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        let r = link
            .call_raw(msg("{}", vec![]), Duration::from_secs(1))
            .await;
        assert!(matches!(r, Err(LinkError::Closed(_))), "{r:?}");
    }

    #[tokio::test]
    async fn greetings_without_a_common_version_or_admission_are_refused() {
        let (addr, _, mut accepted) = echo_server().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let hello = serde_json::json!({
            "min_version": 7, "max_version": 9, "role": "shim", "unit": unit(3),
        });
        let payload = serde_json::to_vec(&hello).unwrap();
        write_frame(&mut s, Kind::Hello, 0, &payload).await.unwrap();
        let mut r = FramedRead::new(s, FrameCodec);
        let f = r.next().await.unwrap().unwrap();
        assert_eq!(f.kind, Kind::GoAway);
        let why = String::from_utf8_lossy(&f.payload).into_owned();
        assert!(
            why.contains("no common link version: the peer speaks 7..=9"),
            "{why}"
        );
        let e = accepted.recv().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no common link version"), "{e}");

        // An acceptor that refuses the unit: the dialer gets the reason.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = accept(s, unit(0), Role::Control, fast(), |h| {
                Err(format!("unit {} is already registered", h.unit.id))
            })
            .await;
        });
        let s = TcpStream::connect(a).await.unwrap();
        let e = connect(s, unit(4), Role::Shim, Arc::new(NoCalls), fast())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("refused: unit 4 is already registered"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn greetings_out_of_bounds_are_refused_before_admission() {
        let (addr, _, mut accepted) = echo_server().await;
        let refused = |payload: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            write_frame(&mut s, Kind::Hello, 0, &payload).await.unwrap();
            let mut r = FramedRead::new(s, FrameCodec);
            let f = r.next().await.unwrap().unwrap();
            assert_eq!(f.kind, Kind::GoAway);
            String::from_utf8_lossy(&f.payload).into_owned()
        };
        let hello = |u: UnitInfo| {
            serde_json::to_vec(&Hello {
                min_version: 1,
                max_version: 1,
                role: Role::Shim,
                unit: u,
            })
            .unwrap()
        };
        let mut big = unit(3);
        big.hostname = "h".repeat(900_000);
        let why = refused(hello(big)).await;
        assert!(why.contains("a greeting of 900"), "{why}");
        let mut far = unit(3);
        far.id = 4_000_000_000;
        let why = refused(hello(far)).await;
        assert!(
            why.contains("greeting refused: unit id 4000000000 is out of range"),
            "{why}"
        );
        let mut huge = unit(3);
        huge.memory_mb = 1 << 60;
        let why = refused(hello(huge)).await;
        assert!(why.contains("greeting refused: memory"), "{why}");
        for _ in 0..3 {
            assert!(accepted.recv().await.unwrap().is_err());
        }
    }

    /// Greets `addr` by hand as unit `id`; returns the raw connection and the acceptor's link.
    async fn greet_raw(
        addr: std::net::SocketAddr,
        accepted: &mut mpsc::UnboundedReceiver<Result<Link, LinkError>>,
        id: u32,
    ) -> (TcpStream, Link) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Shim,
            unit: unit(id),
        };
        write_frame(&mut s, Kind::Hello, 0, &serde_json::to_vec(&hello).unwrap())
            .await
            .unwrap();
        (s, accepted.recv().await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn a_malformed_frame_closes_the_link_and_the_acceptor_carries_on() {
        let (addr, _, mut accepted) = echo_server().await;
        // Greet properly, then send garbage.
        let (mut s, server_side) = greet_raw(addr, &mut accepted, 5).await;
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let why = tokio::time::timeout(Duration::from_secs(5), server_side.closed())
            .await
            .unwrap();
        assert!(
            why.contains("malformed frame from unit 5: bad frame magic"),
            "{why}"
        );
        // The connection is closed: the garbage sender reads the GoAway, then EOF.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        // The acceptor still takes new links.
        let link = dial(addr).await;
        let r = link
            .call_raw(msg("{}", b"still here".to_vec()), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(&r.body[..], b"still here");
    }

    #[tokio::test]
    async fn a_silent_peer_is_declared_dead() {
        let (addr, _, mut accepted) = echo_server().await;
        let (s, server_side) = greet_raw(addr, &mut accepted, 6).await;
        let t = Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(5), server_side.closed())
            .await
            .unwrap();
        assert!(why.contains("unit 6 sent nothing for"), "{why}");
        assert!(t.elapsed() >= Duration::from_millis(1500));
        drop(s);
    }
}
