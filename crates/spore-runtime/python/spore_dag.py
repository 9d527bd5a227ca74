"""DAG edges for Spore's Python runtime: shared-memory rings and sealed memfd payloads.

The bootstrap calls `run` for an invocation that is one node of a DAG: the event is read from
the node's input edges (rings shared with the instances of the previous nodes, or values the
daemon relays in the frame body), the handler runs, and its result goes out on the output
rings. Small results travel through the ring (one copy in, one out); results over the
`inline_max` threshold travel as a sealed memfd whose descriptor is passed over the edge's Unix
socket, so that the bytes are never copied between instances.

Handlers may `import spore_dag` and return `spore_dag.buffer(n)`, a writable memoryview over
a fresh memfd: it is sealed and handed over without any copy at all. A `bytes`, `bytearray`
or `memoryview` result reaches the next node as a read-only `memoryview`; anything else goes as
JSON and arrives decoded.

The ring itself is native code (`libspore_ipc.so`, the same ring as the daemon's) because
Python cannot order memory accesses the way the ring's wake-up protocol needs.
"""
import ctypes
import fcntl
import json
import mmap
import os
import struct
import time

_LEN = struct.Struct("<Q")
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Ring message tags: the value inline (JSON or bytes), or in a memfd that follows on the
# edge's socket (then the message holds its length).
_INLINE = {b"J"[0]: "json", b"B"[0]: "bytes"}
_IN_MEMFD = {b"j"[0]: "json", b"b"[0]: "bytes"}
_TAG = {("json", False): b"J", ("bytes", False): b"B", ("json", True): b"j", ("bytes", True): b"b"}

_lib = None
# Buffers made during the current invocation (closed at its end unless handed over).
_live = set()


class DagError(Exception):
    """An edge failed: a peer timed out, sent something malformed, or a call failed."""


def _native():
    global _lib
    if _lib is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libspore_ipc.so")
        lib = ctypes.CDLL(path)
        vp, c_int, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.spore_ring_open.argtypes = [c_int, c_int, c_int, c_int]
        lib.spore_ring_open.restype = vp
        lib.spore_ring_max_message.argtypes = [vp]
        lib.spore_ring_max_message.restype = sz
        lib.spore_ring_send.argtypes = [vp, ctypes.c_char_p, sz, ctypes.c_uint64, ctypes.c_uint64]
        lib.spore_ring_send.restype = ctypes.c_ssize_t
        lib.spore_ring_recv.argtypes = [vp, vp, sz, ctypes.c_uint64, ctypes.c_uint64]
        lib.spore_ring_recv.restype = ctypes.c_ssize_t
        lib.spore_ring_close.argtypes = [vp]
        lib.spore_ring_close.restype = None
        lib.spore_ring_error.argtypes = [vp, sz]
        lib.spore_ring_error.restype = sz
        lib.spore_fds_recv.argtypes = [c_int, ctypes.POINTER(c_int), sz]
        lib.spore_fds_recv.restype = ctypes.c_ssize_t
        lib.spore_fd_send.argtypes = [c_int, c_int]
        lib.spore_fd_send.restype = ctypes.c_ssize_t
        _lib = lib
    return _lib


def _last_error():
    buf = ctypes.create_string_buffer(512)
    n = _native().spore_ring_error(buf, 512)
    return buf.raw[:min(n, 512)].decode(errors="replace")


def recv_fds(sock, n):
    """The `n` descriptors the daemon attached to the byte after a frame."""
    arr = (ctypes.c_int * max(n, 1))()
    got = _native().spore_fds_recv(sock, arr, n)
    if got < 0:
        raise DagError(_last_error())
    fds = list(arr[:got])
    if got != n:
        for fd in fds:
            os.close(fd)
        raise DagError("expected %d descriptors with the frame, got %d" % (n, got))
    return fds


class buffer:  # noqa: N801 - used like a function: spore_dag.buffer(n)
    """A writable buffer of `size` bytes in shared memory. Return it (the object, or its
    `view`) from a handler and the next node gets the bytes without a single copy."""

    def __init__(self, size):
        self.fd = os.memfd_create("spore-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.size = size
        self._map = None
        if size:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        self.view = memoryview(self._map) if size else memoryview(b"")
        _live.add(self)

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        return self.view[key]

    def __setitem__(self, key, value):
        self.view[key] = value

    def seal(self):
        """Unmaps our writable view and seals the memfd; returns the descriptor."""
        self.view.release()
        if self._map is not None:
            self._map.close()  # BufferError if the handler still holds views into it
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
        _live.discard(self)
        return self.fd

    def _drop(self):
        self.view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # still viewed by the handler; unmapped when collected
        os.close(self.fd)


def _sealed_copy(data):
    """A new sealed memfd holding `data` (one copy)."""
    b = buffer(len(data))
    if len(data):
        b.view[:] = data
    return b.seal()


class _Out:
    """An encoded result: kind, and inline bytes or a sealed memfd."""

    def __init__(self, result, inline_max):
        self.memfd = None
        self.data = None
        if isinstance(result, memoryview) and result.obj is not None:
            owner = next((b for b in _live if b._map is not None and result.obj is b._map), None)
            if owner is not None and result.nbytes == owner.size:
                result.release()
                result = owner
        if isinstance(result, buffer):
            self.kind = "bytes"
            self.size = result.size
            try:
                self.memfd = result.seal()
            except BufferError:
                # The handler still holds views into it: hand over a sealed copy instead.
                self.memfd = _sealed_copy(result.view)
                result._drop()
                _live.discard(result)
            return
        if isinstance(result, (bytes, bytearray, memoryview)):
            self.kind = "bytes"
            self.data = result
        else:
            self.kind = "json"
            self.data = json.dumps(result).encode()
        self.size = len(self.data) if not isinstance(self.data, memoryview) else self.data.nbytes
        if self.size > inline_max:
            self.memfd = _sealed_copy(self.data)
            self.data = None

    def close(self):
        if self.memfd is not None:
            os.close(self.memfd)
            self.memfd = None

    def inline_bytes(self):
        """The bytes for a reply body (read back from the memfd if it went there)."""
        if self.data is not None:
            return bytes(self.data)
        if self.size == 0:
            return b""
        with mmap.mmap(self.memfd, self.size, prot=mmap.PROT_READ) as m:
            return m[:]


_recv_buf = None


def _recv_buffer(size):
    """The receive buffer, shared by all edges (one is read at a time), grown to `size`."""
    global _recv_buf
    if _recv_buf is None or len(_recv_buf) < size:
        _recv_buf = ctypes.create_string_buffer(size)
    return _recv_buf


class _Edge:
    """One end of a shared-memory edge: a ring and a socket for memfds."""

    def __init__(self, fds, producer):
        mem, data, space, self.sock = fds
        self.ring = _native().spore_ring_open(mem, data, space, 1 if producer else 0)
        if not self.ring:
            os.close(self.sock)
            raise DagError("opening an edge: " + _last_error())

    def close(self):
        if self.ring:
            _native().spore_ring_close(self.ring)
            self.ring = None
            os.close(self.sock)

    def send(self, out, timeout_ms, spin_us):
        lib = _native()
        if out.memfd is not None:
            if lib.spore_fd_send(self.sock, out.memfd) < 0:
                raise DagError(_last_error())
            msg = _TAG[(out.kind, True)] + _LEN.pack(out.size)
        else:
            msg = _TAG[(out.kind, False)] + bytes(out.data)
        if lib.spore_ring_send(self.ring, msg, len(msg), timeout_ms, spin_us) < 0:
            raise DagError("sending on an edge: " + _last_error())

    def recv(self, timeout_ms, spin_us, maps):
        lib = _native()
        buf = _recv_buffer(lib.spore_ring_max_message(self.ring))
        n = lib.spore_ring_recv(self.ring, buf, len(buf), timeout_ms, spin_us)
        if n < 0:
            raise DagError("receiving on an edge: " + _last_error())
        if n == 0:
            raise DagError("empty message on an edge")
        msg = ctypes.string_at(buf, n)
        tag, raw = msg[0], msg[1:]
        if tag in _INLINE:
            return _decode(_INLINE[tag], raw)
        if tag not in _IN_MEMFD or len(raw) != _LEN.size:
            raise DagError("malformed message on an edge (tag %r)" % chr(tag))
        (size,) = _LEN.unpack(raw)
        fds = recv_fds(self.sock, 1)
        return _decode(_IN_MEMFD[tag], _map_sealed(fds[0], size, maps))


def _map_sealed(fd, size, maps):
    """Maps a received memfd read-only after checking that it is sealed and big enough."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & _SEALS != _SEALS:
            raise DagError("payload memfd is not sealed (seals 0x%x)" % seals)
        if os.fstat(fd).st_size < size:
            raise DagError("payload memfd holds fewer than the announced %d bytes" % size)
        if size == 0:
            return memoryview(b"")
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    maps.append(m)
    return memoryview(m)


def _decode(kind, data):
    if kind == "json":
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)
    return data if isinstance(data, memoryview) else memoryview(data)


def _remaining_ms(deadline_ms):
    return max(1, int(deadline_ms - time.time() * 1000))


class Run:
    """One node invocation: `event()` reads the inputs, `finish(result)` sends the outputs,
    `reset()` frees what the invocation made (payload mappings, buffers). `close()` always
    runs, and frees every ring, socket, memfd and mapping. In a pipeline the edges stay open
    from one invocation to the next."""

    def __init__(self, wiring, body, fds, deadline_ms):
        self.w = wiring
        self.body = body
        self.fds = fds
        self.deadline_ms = deadline_ms
        self.maps = []
        self.inputs = {}
        self.outs = []
        self.inputs_ns = 0
        self.sent_ns = 0
        self.taken = set()
        self.outputs = None

    def _open_outputs(self):
        if self.outputs is None:
            self.outputs = []
            for fds in self.w["outputs"]:
                self.taken.update(fds)
                self.outputs.append(_Edge([self.fds[i] for i in fds], producer=True))

    def _read(self, shape, timeout_ms):
        src = shape["from"]
        if src == "input":
            return json.loads(self.body) if self.body else {}
        if src == "body":
            seg = shape["segment"]
            off, n = seg["offset"], seg["len"]
            if off + n > len(self.body):
                raise DagError("relayed segment outside the frame body")
            return _decode(seg["kind"], memoryview(self.body)[off:off + n])
        if src == "ring":
            key = tuple(shape["fds"])
            edge = self.inputs.get(key)
            if edge is None:
                self.taken.update(key)
                edge = self.inputs[key] = _Edge([self.fds[i] for i in key], producer=False)
            return edge.recv(timeout_ms, self.w["spin_us"], self.maps)
        if src == "list":
            return [self._read(s, timeout_ms) for s in shape["items"]]
        raise DagError("unknown event source %r" % src)

    def event(self, timeout_ms=None):
        # Output edges first: opening them costs nothing later, between handler and send.
        self._open_outputs()
        if timeout_ms is None:
            timeout_ms = _remaining_ms(self.deadline_ms)
        ev = self._read(self.w["event"], timeout_ms)
        self.inputs_ns = time.monotonic_ns()
        return ev

    def finish(self, result):
        """Sends `result` on the output edges; returns (reply body, segments)."""
        w = self.w
        whole = None
        if w["outputs"] or not w["split"]:
            whole = _Out(result, w["inline_max"] if w["outputs"] else 1 << 62)
            self.outs.append(whole)
            self._open_outputs()
            for e in self.outputs:
                e.send(whole, _remaining_ms(self.deadline_ms), w["spin_us"])
        if w["split"]:
            if not isinstance(result, (list, tuple)):
                raise DagError("the next node runs once per element, but node %r returned %s, not a list"
                               % (w["node"], type(result).__name__))
            parts = [_Out(r, 1 << 62) for r in result]
            self.outs.extend(parts)
        else:
            parts = [whole]
        self.sent_ns = time.monotonic_ns()
        if not w["reply"]:
            return b"", []
        body, segments = [], []
        off = 0
        for p in parts:
            b = p.inline_bytes()
            segments.append({"offset": off, "len": len(b), "kind": p.kind})
            body.append(b)
            off += len(b)
        return b"".join(body), segments

    def report(self, segments):
        return {"inputs_ns": self.inputs_ns, "sent_ns": self.sent_ns, "segments": segments}

    def reset(self):
        """Frees what one invocation made: encoded results, payload mappings, buffers."""
        for o in self.outs:
            o.close()
        self.outs = []
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass  # the handler kept a view; the mapping goes with it
        self.maps = []
        for b in list(_live):
            b._drop()
        _live.clear()

    def close(self):
        self.reset()
        for e in list(self.inputs.values()) + (self.outputs or []):
            e.close()
        self.inputs = {}
        self.outputs = []
        for i, fd in enumerate(self.fds):
            if i not in self.taken:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = []


# A pipeline node's page (see `PipelineWiring` in the protocol): the invocation's header,
# written by the daemon, and the node's timing slot, written here.
_PAGE = 4096
_HEAD = struct.Struct("<QQI")
_RID = 20
_RID_MAX = 64
_SLOT = 128
_TIMES = struct.Struct("<QQQQ")
# How long an idle pipeline node waits for its next input; the daemon stops idle
# pipelines long before (keep-alive), so this only bounds a forgotten one.
_IDLE_MS = 1 << 31


class Pipeline:
    """One node of a pre-wired pipeline: its edges stay open and every message on its
    inputs is one invocation. The daemon stops the instance to tear the pipeline down."""

    def __init__(self, wiring, fds):
        index = wiring["pipeline"]["page"]
        self.run = Run(wiring, b"", fds, 0)
        self.run.taken.add(index)
        try:
            self.page = mmap.mmap(fds[index], _PAGE)
        finally:
            os.close(fds[index])
        self.seq = 0
        self.request_id = ""

    @property
    def deadline_ms(self):
        return self.run.deadline_ms

    def next_event(self):
        """Waits for the next invocation's inputs; returns its event."""
        self.run.reset()
        event = self.run.event(_IDLE_MS)
        self.seq, self.run.deadline_ms, n = _HEAD.unpack_from(self.page, 0)
        self.request_id = bytes(self.page[_RID:_RID + min(n, _RID_MAX)]).decode(errors="replace")
        return event

    def finish(self, result, start_ns, end_ns):
        """Sends `result` on the output edges and records the invocation's timing."""
        self.run.finish(result)
        _TIMES.pack_into(self.page, _SLOT + 8, self.run.inputs_ns, start_ns, end_ns, self.run.sent_ns)
        # The sequence number last: the daemon trusts the times once it matches.
        _LEN.pack_into(self.page, _SLOT, self.seq)

    def close(self):
        self.run.close()
        self.page.close()
