"""cfork template loop: fork a child into a fresh sandbox on each request.

The template is root of its own user namespace (with CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID,
CAP_NET_ADMIN and CAP_SETPCAP there only) and has imported the handler. For each `fork` request
it prepares a pid namespace for the next child, forks, and returns its own pid_for_children to
its own namespace. The child joins its cgroup through descriptors the daemon opened, unshares
mount, network, ipc and uts namespaces, mounts its own /proc, /tmp and /dev/shm, brings up
loopback, empties its capability bounding set, drops to an unprivileged uid (which clears the
other capability sets), adds the seccomp filter that completes the template's (inherited) one,
keeps only its control socket, reseeds random number generators and serves invocations.
"""
import array
import ctypes
import errno
import fcntl
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
PR_CAPBSET_DROP = 24
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP, IFF_RUNNING = 0x1, 0x40
SYS_CLOSE_RANGE = 436
CONTROL_FD = 3
# Most network namespaces a template makes ahead in a burst (each is charged to its cgroup,
# whose limit counts one per instance it may have).
_NETNS_BURST_MAX = 64

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _ChildSetup(ctypes.Structure):
    """Mirror of `ChildSetup` in native/cfork_child.rs."""

    _fields_ = [
        ("cgroup_fds", ctypes.POINTER(ctypes.c_int)),
        ("n_cgroup_fds", ctypes.c_int),
        ("netns_fd", ctypes.c_int),
        ("hostname", ctypes.c_char_p),
        ("tmp_opts", ctypes.c_char_p),
        ("uid", ctypes.c_uint32),
        ("filter", ctypes.c_void_p),
        ("filter_len", ctypes.c_uint16),
        ("inst_fd", ctypes.c_int),
        ("control_fd", ctypes.c_int),
        ("marks", ctypes.POINTER(ctypes.c_uint64)),
    ]


_NATIVE_STEPS = ("cgroup", "unshare", "mounts", "net", "privileges")


def preload():
    """What the template needs that reads files (modules, the native library), done before a
    checkpoint so that a restored template reads nothing; and the imports' objects moved out
    of the collector's sight, so that the template's own collection before `ready` (and a
    child's) only looks at what came after."""
    if os.environ.get("SPORE_CFORK_NATIVE") != "0":
        _native_lib()
    gc.collect()
    gc.freeze()


def _native_lib():
    """The native child set-up next to this file, or None (then Python does it, slower)."""
    if os.environ.get("SPORE_CFORK_NATIVE") == "0":
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libspore_cfork_child.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        os.write(2, ("spore cfork: native child set-up unavailable (%s); using the Python one\n" % exc).encode())
        return None
    lib.spore_cfork_child_setup.argtypes = [ctypes.POINTER(_ChildSetup)]
    lib.spore_cfork_child_setup.restype = ctypes.c_int
    return lib


def _prepare_native(req, fds, netns_fd, programs):
    """Builds the set-up record in the template, before fork, so that the child only calls.
    The child is born in its cgroup (see `_attach`), so it moves nowhere itself."""
    cg = (ctypes.c_int * 1)()
    marks = (ctypes.c_uint64 * len(_NATIVE_STEPS))()
    prog, buf = programs[0]
    hostname = req["id"].encode()[:63]
    tmp_opts = ("size=%dm,mode=1777" % req["tmp_mb"]).encode()
    setup = _ChildSetup(cg, 0, -1 if netns_fd is None else netns_fd, hostname, tmp_opts,
                        int(req["uid"]), ctypes.cast(buf, ctypes.c_void_p), prog.len, fds[0], CONTROL_FD, marks)
    return setup, (cg, marks, hostname, tmp_opts, buf)


def _programs():
    """The child's seccomp programs, given by the daemon as hex `struct sock_filter` arrays."""
    progs = []
    for h in json.loads(os.environ["SPORE_CFORK_SECCOMP"]):
        raw = bytes.fromhex(h)
        buf = ctypes.create_string_buffer(raw, len(raw))
        progs.append((_SockFprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_void_p)), buf))
    return progs


def _drop_bounding_set():
    """Empties the capability bounding set, up to the kernel's last capability (the next one
    answers EINVAL); needs CAP_SETPCAP, which the template holds in its namespace."""
    for cap in range(64):
        zero = ctypes.c_ulong(0)
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), zero, zero, zero) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL and cap > 0:
                return
            raise OSError(err, "dropping capability %d from the bounding set: %s" % (cap, os.strerror(err)))


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _threads():
    # procfs counts a process's threads in the link count of its task directory (2 + n).
    return os.stat("/proc/self/task").st_nlink - 2


def _thread_names():
    """What the extra threads are: Python threads by name, the others counted as native
    (started by a C library, which names them after the process)."""
    import threading
    py = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    native = max(0, _threads() - 1 - len(py))
    names = ["Python thread %r" % n for n in py]
    if native:
        names.append("%d native (a C library's pool)" % native)
    return names


def _recv_fds(sock):
    """Reads a frame's 8-byte prefix with the descriptors sent along with it."""
    fds = array.array("i")
    data, anc, _, _ = sock.recvmsg(8, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    while data and len(data) < 8:
        more = sock.recv(8 - len(data))
        if not more:
            return None, list(fds)
        data += more
    return (data or None), list(fds)


def _loopback_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP | IFF_RUNNING))
    finally:
        s.close()


class _NetnsPool:
    """Network namespaces made ahead of time (with loopback up), since creating one costs
    more than half a millisecond. Each is used once. The template makes them by entering a
    new namespace itself and returning to its own."""

    def __init__(self, target, egress=False):
        self.target = target
        self.demand = 0
        self.fds = []
        self.paused_until = 0.0
        self.own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        # Egress: each new namespace is announced to the daemon, which gives it a veth pair
        # and an address, then names it in a fork request. Before `ready`, announcements wait.
        self.egress = egress
        self.announce = None
        self.unannounced = []

    def start_announcing(self, announce):
        self.announce = announce
        for fd in self.unannounced:
            announce(fd)
        self.unannounced = []

    def want(self, waiting):
        """The daemon says how many starts wait for a namespace (a burst): make that many."""
        self.demand = min(max(int(waiting or 0), 0), _NETNS_BURST_MAX)

    def goal(self):
        return max(self.target, self.demand)

    def wanted(self):
        return len(self.fds) < self.goal() and time.monotonic() >= self.paused_until

    def urgent(self):
        """Starts are waiting, or fewer than two (half the usual number, for a smaller pool)
        are left: the next forks would wait for a namespace (an unshare costs about 0.5 ms,
        waiting for a quiet moment more). Made as soon as no fork request is pending; the rest
        of the pool fills in quiet moments."""
        short = len(self.fds) < (self.demand or max(1, min(2, self.target // 2)))
        return short and time.monotonic() >= self.paused_until

    def refill_one(self):
        """Adds one namespace. On failure (e.g. the cgroup's memory is exhausted) the pool
        pauses for a second: children then create their own namespaces, more slowly."""
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        except OSError as exc:
            os.write(2, ("spore cfork: cannot pool a network namespace: %s\n" % exc).encode())
            self.paused_until = time.monotonic() + 1.0
            return
        try:
            _loopback_up()
            fd = os.open("/proc/self/ns/net", os.O_RDONLY)
            self.fds.append(fd)
            if self.egress:
                if self.announce is None:
                    self.unannounced.append(fd)
                else:
                    self.announce(fd)
        finally:
            # Failing this, the template would fork every later child into this namespace.
            _check(_libc.setns(self.own, CLONE_NEWNET), "setns back to the template's network namespace")

    def take(self, fd=None):
        """A namespace: the one the daemon named (egress), else any (None when empty)."""
        if fd is not None:
            if fd not in self.fds:
                raise KeyError(fd)
            self.fds.remove(fd)
            return fd
        if self.egress:
            # Never hand out a namespace the daemon did not equip: the child would have no egress.
            raise KeyError(None)
        return self.fds.pop() if self.fds else None


def _native_child(native, setup, keep, template_sock, serve, send, handler, t_fork):
    t_forked = time.monotonic_ns()
    template_sock.detach()  # fd 3 is about to become this child's own channel
    rc = native.spore_cfork_child_setup(ctypes.byref(setup))
    if rc != 0:
        raise OSError(rc % 1000, "native child set-up failed at step %d: %s" % (rc // 1000, os.strerror(rc % 1000)))
    phases = [("fork", t_fork), ("forked", t_forked)]
    phases.extend(zip(_NATIVE_STEPS, keep[1]))
    return _finish_child(phases, serve, send, handler)


def _finish_child(phases, serve, send, handler):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The template's objects stay frozen: collecting them would touch (and copy) every page.
    # `random` reseeds itself at fork; numpy's legacy global generator does not.
    nprand = sys.modules.get("numpy.random")
    if nprand is not None:
        nprand.seed()
    phases.append(("ready", time.monotonic_ns()))
    send(CONTROL_FD, {"type": "ready", "import_ms": 0.0, "phases": phases})
    return serve(CONTROL_FD, handler)


def _child(req, inst_fd, cgroup_fds, netns_fd, programs, template_sock, serve, send, handler, t_fork):
    phases = [("fork", t_fork), ("forked", time.monotonic_ns())]
    template_sock.detach()  # fd 3 is about to become this child's own channel
    for f in cgroup_fds:
        os.write(f, b"0")
        os.close(f)
    phases.append(("cgroup", time.monotonic_ns()))
    if netns_fd is not None:
        _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    else:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    phases.append(("unshare", time.monotonic_ns()))
    tmp_opts = ("size=%dm,mode=1777" % req["tmp_mb"]).encode()
    _check(_libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
    _check(_libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, tmp_opts), "mount /tmp")
    phases.append(("mounts", time.monotonic_ns()))
    socket.sethostname(req["id"])
    if netns_fd is None:
        _loopback_up()
    phases.append(("net", time.monotonic_ns()))
    _drop_bounding_set()
    uid = int(req["uid"])
    os.setgroups([uid])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # leaves uid 0 of the namespace: all capabilities go
    for prog, _buf in programs:
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")
    phases.append(("privileges", time.monotonic_ns()))
    if inst_fd != CONTROL_FD:
        os.dup2(inst_fd, CONTROL_FD)
        os.close(inst_fd)
    _libc.syscall(SYS_CLOSE_RANGE, CONTROL_FD + 1, 0xFFFFFFFF, 0)
    return _finish_child(phases, serve, send, handler)


def template(fd, handler, import_ms, serve, send, recv_rest, init_logs="", preload=None):
    programs = _programs()
    native = _native_lib()
    if not native:
        # The slower fallback is worth a line in the function's log; the native path is not.
        os.write(2, b"spore cfork template: child set-up: python (the native library is unavailable)\n")
    sock = socket.socket(fileno=fd)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = {}
    netns = _NetnsPool(int(os.environ.get("SPORE_CFORK_NETNS_POOL", "16")),
                       egress=os.environ.get("SPORE_CFORK_EGRESS") == "1")
    # One namespace for the first child, which usually follows at once; the loop below makes
    # the rest while idle.
    netns.refill_one()
    # Move everything imported so far out of the collector's sight: a child's collections
    # then never touch (and copy) the template's objects.
    gc.collect()
    gc.freeze()
    send(fd, {"type": "ready", "import_ms": import_ms, "logs": init_logs})
    netns.start_announcing(lambda n: send(fd, {"type": "netns", "fd": n}))
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        # Refill the namespace pool after 2 ms without requests, off the fork path; when it
        # runs low, as soon as no request is waiting.
        if netns.urgent():
            timeout = 0
        elif netns.wanted():
            timeout = 2
        else:
            timeout = 1000 if len(netns.fds) < netns.goal() else None
        events = poller.poll(timeout)
        if not events:
            netns.refill_one()
            continue
        for ready_fd, _ in events:
            if ready_fd == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap(children, fd, send)
                continue
            prefix, fds = _recv_fds(sock)
            if prefix is None:
                os.write(2, b"spore cfork template: the daemon closed the control socket; exiting\n")
                return 0
            req, _ = recv_rest(fd, prefix)
            if req.get("type") != "fork" or not fds:
                for f in fds:
                    os.close(f)
                send(fd, {"type": "fork_error", "id": str(req.get("id")), "error": "expected a fork request with descriptors"})
                continue
            if req.get("preload") and preload is not None:
                # Automatic warm-up: what the function's calls imported since this template
                # started, imported once here so that this child and the next have it.
                preload(req["preload"])
                gc.collect()
                gc.freeze()
            threads = _threads()
            if threads != 1:
                for f in fds:
                    os.close(f)
                send(fd, {"type": "fork_error", "id": req["id"],
                          "error": "the function's template has %d threads after importing its code (%s): "
                                   "forking a multi-threaded process is unsafe. A library started them at import; "
                                   "Spore sets OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS and "
                                   "NUMEXPR_NUM_THREADS to 1 unless the function sets them: do not set them higher, "
                                   "start threads in the handler, or use sandbox = \"container\""
                                   % (threads, ", ".join(_thread_names()) or "unnamed")})
                continue
            sets = int(req.get("cgroups", 0))
            child_cg, own_cg = fds[1:1 + sets], fds[1 + sets:1 + 2 * sets]
            netns.want(req.get("netns_waiting"))
            try:
                netns_fd = netns.take(req.get("netns"))
            except KeyError:
                for f in fds:
                    os.close(f)
                send(fd, {"type": "fork_error", "id": req["id"],
                          "error": "the template holds no network namespace %r for this fork" % (req.get("netns"),)})
                continue
            if native is not None:
                setup, keep = _prepare_native(req, fds, netns_fd, programs)
            t_fork = time.monotonic_ns()
            try:
                # Fork from inside the child's cgroup: the child's page tables and task are
                # then charged to the child, not to the template.
                _attach(child_cg)
                _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
                pid = os.fork()
            except OSError as exc:
                # No child exists: put the template back in order and refuse this request.
                _attach(own_cg)
                _libc.setns(own_pidns, CLONE_NEWPID)
                for f in fds:
                    os.close(f)
                if netns_fd is not None:
                    os.close(netns_fd)
                send(fd, {"type": "fork_error", "id": req["id"], "error": "fork failed: %s" % exc})
                continue
            if pid == 0:
                code = 0
                try:
                    if native is not None:
                        code = _native_child(native, setup, keep, sock, serve, send, handler, t_fork)
                    else:
                        code = _child(req, fds[0], [], netns_fd, programs, sock, serve, send, handler, t_fork)
                except BaseException as exc:  # noqa: BLE001 - report, never return to the loop
                    try:
                        os.write(2, ("spore cfork child setup failed: %r\n" % (exc,)).encode())
                    finally:
                        os._exit(125)
                os._exit(code or 0)
            # Back to the template's own cgroup and pid namespace; failing either, the template
            # would misplace every later child, so it exits (and is recreated).
            _attach(own_cg)
            _check(_libc.setns(own_pidns, CLONE_NEWPID), "setns back to the template's pid namespace")
            for f in fds:
                os.close(f)
            if netns_fd is not None:
                os.close(netns_fd)
            children[pid] = req["id"]


def _attach(fds):
    """Moves this (single-threaded) process into a cgroup: "0" into each `tasks` file."""
    for f in fds:
        os.write(f, b"0")


def _reap(children, fd, send):
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        iid = children.pop(pid, None)
        if iid is not None:
            send(fd, {"type": "exit", "id": iid, "code": code if code >= 0 else 128 - code})
