"""Spore's in-sandbox Python runtime.

Imports the handler named by $_HANDLER ("module.function"), tells the daemon it is ready, then
serves invocations over the control socket on fd $SPORE_CONTROL_FD, one at a time.

Frame: u32 LE header length, u32 LE body length, JSON header, body bytes.
"""
# Only cheap imports here: every cold start pays for them (socket and traceback alone cost
# ~20 ms on a small VM). traceback is imported when an error is reported.
import io
import json
import os
import struct
import sys
import time

_PREFIX = struct.Struct("<II")
_MAX_LOG = 64 * 1024
# Most characters of output in one `logs` frame (12 bytes each at worst once JSON-escaped).
_LOG_FRAME = 64 * 1024

# The invocation being served (its request id goes on every `logging` record, as Lambda's).
_state = {"request_id": ""}


def _read_exact(fd, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            if got == 0:
                return None
            raise EOFError("control socket closed mid-frame")
        got += k
    return buf


def _recv(fd):
    prefix = _read_exact(fd, _PREFIX.size)
    if prefix is None:
        return None, None
    return _recv_rest(fd, prefix)


def _send(fd, header, body=b""):
    h = json.dumps(header).encode()
    view = memoryview(_PREFIX.pack(len(h), len(body)) + h + body)
    while view:
        view = view[os.write(fd, view):]


def _error(exc, error_type=None, message=None, trace=True):
    """An exception as Lambda's error JSON: `stackTrace` holds the user's frames, one
    `File ..., line N, in f` entry each (awslambdaric's shape)."""
    import traceback

    # Lambda shows only the user's frames: drop the runtime's own from the top.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    error = {
        "errorMessage": message if message is not None else str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": traceback.format_list(traceback.extract_tb(tb)) if trace else [],
    }
    if _state["request_id"]:
        error["requestId"] = _state["request_id"]
    return error


def _error_entry(error):
    """Lambda's log entry for a handler's error: `[ERROR] Type: message`, then the
    traceback, as one multi-line entry."""
    lines = ["[ERROR] %s: %s" % (error["errorType"], error["errorMessage"])]
    if error.get("stackTrace"):
        lines.append("Traceback (most recent call last):")
        for frame in error["stackTrace"]:
            lines.extend(frame.splitlines())
    return "\n".join(lines) + "\n"


class _Stream(io.TextIOBase):
    """What a handler prints: each write goes to the daemon as it happens (a `logs` frame),
    so that what was printed before a timeout or a crash is kept, as Lambda streams it.
    Writes from a process the handler forked are dropped (they must not touch the control
    socket); writes from threads are serialised."""

    def __init__(self, fd, main_pid):
        import _thread

        self.fd = fd
        self.main_pid = main_pid
        self.lock = _thread.allocate_lock()
        self.pending = []
        self.size = 0

    def writable(self):
        return True

    def write(self, s):
        """Line-buffered: a frame per completed line (or `flush()`), not per piece."""
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if s and os.getpid() == self.main_pid:
            with self.lock:
                self.pending.append(s)
                self.size += len(s)
                # A long line without its end is sent in pieces, never held whole.
                if "\n" in s or self.size >= _LOG_FRAME:
                    self._send_pending()
        return len(s)

    def flush(self):
        if self.pending and os.getpid() == self.main_pid:
            with self.lock:
                self._send_pending()

    def _send_pending(self):
        text = "".join(self.pending)
        self.pending, self.size = [], 0
        # Frames of at most _LOG_FRAME characters: a frame's header (JSON, escapes included)
        # must stay under the protocol's 1 MiB, however much one print writes.
        for i in range(0, len(text), _LOG_FRAME):
            _send(self.fd, {"type": "logs", "logs": text[i:i + _LOG_FRAME]})


def _install_logging(logging):
    """Lambda's handler on the root logger: `[LEVEL]\t<time>Z\t<request id>\t<message>`,
    written to the current sys.stdout (the invocation's stream, or init's capture). With a
    handler on the root, `logging.info()` no longer installs one of its own bound to the
    stream of the invocation that called it first."""

    class _RequestId(logging.Filter):
        def filter(self, record):
            record.aws_request_id = _state["request_id"]
            return True

    class _Handler(logging.Handler):
        def emit(self, record):
            try:
                sys.stdout.write(self.format(record) + "\n")
            except Exception:  # noqa: BLE001 - logging's own policy
                self.handleError(record)

    fmt = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    handler = _Handler()
    handler.setFormatter(fmt)
    handler.addFilter(_RequestId())
    root = logging.getLogger()
    root.addHandler(handler)
    level = os.environ.get("AWS_LAMBDA_LOG_LEVEL", "").upper()
    if level:
        try:
            root.setLevel(level)
        except ValueError:
            os.write(2, ("spore: AWS_LAMBDA_LOG_LEVEL=%s is not a logging level; ignored\n" % level).encode())


class _LoggingLoader:
    """Wraps the loader of `logging` so that Lambda's handler is installed as it is imported
    (importing it up front would cost every cold start ~10 ms)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _install_logging(module)


class _LoggingHook:
    """A meta-path finder that only changes how `logging` is loaded."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "logging":
            return None
        sys.meta_path.remove(_LoggingHook)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoggingLoader(spec.loader)
                return spec
        return None


def _hook_logging():
    if "logging" in sys.modules:
        _install_logging(sys.modules["logging"])
    else:
        sys.meta_path.insert(0, _LoggingHook)


def _new_log_stream():
    """A log stream name of Lambda's shape, `YYYY/MM/DD/[version]<32 hex>`, for an instance
    that was forked from a template (each instance has its own)."""
    version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
    os.environ["AWS_LAMBDA_LOG_STREAM_NAME"] = "%s[%s]%s" % (
        time.strftime("%Y/%m/%d/", time.gmtime()), version, os.urandom(16).hex())
    LambdaContext._static = None


class CognitoIdentity:
    """`context.identity` (set only by the AWS Mobile SDK; None here, as in Lambda)."""

    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self):
        self.cognito_identity_id = None
        self.cognito_identity_pool_id = None


class Client:
    """`context.client_context.client`."""

    __slots__ = ("installation_id", "app_title", "app_version_name", "app_version_code",
                 "app_package_name")

    def __init__(self, fields):
        for k in self.__slots__:
            setattr(self, k, fields.get(k))


class ClientContext:
    """`context.client_context`: what the caller sent in `X-Amz-Client-Context`."""

    __slots__ = ("client", "custom", "env")

    def __init__(self, fields):
        client = fields.get("client")
        self.client = Client(client) if isinstance(client, dict) else None
        self.custom = fields.get("custom")
        self.env = fields.get("env")


class LambdaContext:
    """The `context` argument of a handler, with Lambda's attribute names."""

    _static = None

    def __init__(self, request_id, deadline_ms, client_context=None):
        # The function's attributes do not change: read the environment once.
        if LambdaContext._static is None:
            env = os.environ
            name = env.get("AWS_LAMBDA_FUNCTION_NAME", "")
            LambdaContext._static = {
                "function_name": name,
                "function_version": env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
                "memory_limit_in_mb": int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0")),
                "invoked_function_arn": "arn:aws:lambda:%s:000000000000:function:%s" % (
                    env.get("AWS_REGION", "us-east-1"), name),
                "log_group_name": env.get("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/" + name),
                "log_stream_name": env.get("AWS_LAMBDA_LOG_STREAM_NAME", ""),
            }
        self.__dict__.update(LambdaContext._static)
        self.aws_request_id = request_id
        self.identity = CognitoIdentity()
        self.client_context = ClientContext(client_context) if isinstance(client_context, dict) else None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        return max(0, int(self._deadline_ms - time.time() * 1000))


class _Capture(io.TextIOBase):
    """Collects what the handler prints, bounded to the last _MAX_LOG characters."""

    def __init__(self):
        self.parts = []
        self.size = 0

    def writable(self):
        return True

    def write(self, s):
        self.parts.append(s)
        self.size += len(s)
        if self.size > 4 * _MAX_LOG:
            joined = "".join(self.parts)[-_MAX_LOG:]
            self.parts, self.size = [joined], len(joined)
        return len(s)

    def text(self):
        return "".join(self.parts)[-_MAX_LOG:]


def _import_handler(spec):
    module_path, _, func_name = spec.rpartition(".")
    module_name = module_path.replace("/", ".")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise _InitError(
            _error(exc, "Runtime.ImportModuleError",
                   "Unable to import module '%s': %s" % (module_name, exc))
        )
    except SyntaxError as exc:
        raise _InitError(
            _error(exc, "Runtime.UserCodeSyntaxError",
                   "Syntax error in module '%s': %s" % (module_name, exc))
        )
    except BaseException as exc:  # noqa: BLE001 - any failure of user code at import
        raise _InitError(_error(exc))
    handler = getattr(module, func_name, None)
    if not callable(handler):
        raise _InitError({
            "errorMessage": "Handler '%s' missing on module '%s'" % (func_name, module_name),
            "errorType": "Runtime.HandlerNotFound",
            "stackTrace": [],
        })
    return handler


class _InitError(Exception):
    def __init__(self, error):
        super().__init__(error["errorMessage"])
        self.error = error


_marks = {"handler_start_ns": 0, "handler_end_ns": 0}


def _call(handler, header, event, encode):
    """Runs the handler on `event` (timing it) and encodes its result with `encode`;
    returns (payload, error)."""
    _state["request_id"] = header["request_id"]
    context = LambdaContext(header["request_id"], header["deadline_ms"], header.get("client_context"))
    _marks["handler_start_ns"] = time.monotonic_ns()
    result = handler(event, context)
    _marks["handler_end_ns"] = time.monotonic_ns()
    try:
        return encode(result), None
    except (TypeError, ValueError) as exc:
        return b"", _error(exc, "Runtime.MarshalError",
                           "Unable to marshal response: %s" % exc, trace=False)


# Decimal results are numbers (awslambdaric's serializer writes their exact text): the
# encoder writes a marked string for each, replaced by the number's text afterwards.
_DECIMAL_MARK = "\x00spore-decimal-%s:" % os.urandom(4).hex()
_decimal_re = None


def _json_default(obj):
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(obj, decimal.Decimal):
        if obj.is_nan():
            return float("nan")
        return _DECIMAL_MARK + str(obj)
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


def _to_json(result):
    text = json.dumps(result, default=_json_default, ensure_ascii=False)
    if "\\u0000spore-decimal-" in text:
        global _decimal_re
        if _decimal_re is None:
            import re

            _decimal_re = re.compile('"%s([^"]*)"' % re.escape(json.dumps(_DECIMAL_MARK)[1:-1]))
        text = _decimal_re.sub(lambda m: m.group(1), text)
    return text.encode()


def _invoke(handler, header, body):
    event = json.loads(body) if body else {}
    return _call(handler, header, event, _to_json)


def _invoke_dag(handler, header, body, fds, report):
    """One node of a DAG: the event comes from, and the result goes to, its edges."""
    import spore_dag

    run = spore_dag.Run(header["dag"], body, fds, header["deadline_ms"])

    def finish(result):
        payload, segments = run.finish(result)
        report["dag"] = run.report(segments)
        return payload

    try:
        return _call(handler, header, run.event(), finish)
    finally:
        run.close()


def main():
    fd = int(os.environ.get("SPORE_CONTROL_FD", "3"))
    t0 = time.perf_counter()
    _hook_logging()
    # What init prints goes to the function's log before the first invocation's START line
    # (with `ready`), as Lambda shows it.
    real_out, real_err = sys.stdout, sys.stderr
    init_out = sys.stdout = sys.stderr = _Capture()
    try:
        handler = _import_handler(os.environ["_HANDLER"])
    except _InitError as exc:
        sys.stdout, sys.stderr = real_out, real_err
        if init_out.size:
            os.write(2, init_out.text().encode("utf-8", "replace"))
        _send(fd, {"type": "init_error", "error": exc.error})
        return 1
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    init_logs = init_out.text()
    warmup = os.environ.get("SPORE_WARMUP_EVENT")
    if warmup:
        _warm_up(handler, warmup)
    preload = os.environ.get("SPORE_PRELOAD")
    if preload:
        _preload(preload.split(","))
    import_ms = (time.perf_counter() - t0) * 1000.0
    template = os.environ.get("SPORE_MODE") == "template"
    if template:
        import _spore_cfork

        _spore_cfork.preload()
    # A template is offered before it prepares anything for its children (namespaces,
    # pipes), so that the image holds no descriptor beyond the control socket.
    if os.environ.get("SPORE_CHECKPOINT") == "1" and _checkpoint(fd):
        import_ms = 0.0  # a restored copy imported nothing
        init_logs = ""  # and printed nothing: its init was the snapshotted one's
    if template:
        try:
            return _spore_cfork.template(fd, handler, import_ms, _serve_child, _send, _recv_rest,
                                         init_logs, _preload)
        except BaseException:
            import traceback

            os.write(2, ("spore cfork template failed:\n" + traceback.format_exc()).encode())
            raise
    _send(fd, {"type": "ready", "import_ms": import_ms, "logs": init_logs})
    return _serve(fd, handler)


def _serve_child(fd, handler):
    """Serves a child forked from a cfork template: an instance of its own, with its own
    log stream."""
    _new_log_stream()
    return _serve(fd, handler)


def _warm_up(handler, path):
    """Runs the handler once on the event in `path`, discarding its result and output, so
    that what it loads on its first call is loaded before `ready` (and before a snapshot or
    the first fork). A failure is reported on stderr (the function's log) and start-up goes
    on: the instance works as without the warm-up."""
    t = time.perf_counter()
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = _Capture()
    try:
        with open(path, "rb") as f:
            event = json.loads(f.read() or b"{}")
        handler(event, LambdaContext("warmup", int(time.time() * 1000) + 60000))
        error = None
    except BaseException as exc:  # noqa: BLE001 - reported, never fatal
        error = "%s: %s" % (type(exc).__name__, exc)
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        _marks["handler_start_ns"] = _marks["handler_end_ns"] = 0
        _state["request_id"] = ""
    if error is not None:
        os.write(2, ("spore: warm-up event %s failed (%s); starting without it\n" % (path, error)).encode())
    else:
        os.write(2, ("spore: warm-up event ran in %.1f ms\n" % ((time.perf_counter() - t) * 1000.0)).encode())


def _threads():
    # procfs counts a process's threads in the link count of its task directory (2 + n).
    try:
        return os.stat("/proc/self/task").st_nlink - 2
    except OSError:
        return -1


def _preload(names):
    """Automatic warm-up: imports the modules earlier calls of this function imported, so
    that this instance's first call does not. A module that fails to import is skipped; one
    that starts a thread stops the list (a cfork template then refuses to fork, and the
    daemon turns the warm-up off for the function); so does running past the time budget
    the daemon gives (SPORE_PRELOAD_BUDGET_MS: the rest is imported on demand). What imports
    print is discarded."""
    import importlib

    t = time.perf_counter()
    try:
        budget = float(os.environ.get("SPORE_PRELOAD_BUDGET_MS", "5000")) / 1000.0
    except ValueError:
        budget = 5.0
    threads = _threads()
    done, failed = 0, []
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = _Capture()
    try:
        for i, name in enumerate(names):
            if time.perf_counter() - t > budget:
                failed.append("%d more: past the %.0f ms budget" % (len(names) - i, budget * 1000.0))
                break
            if not name or name in sys.modules:
                continue
            try:
                importlib.import_module(name)
                done += 1
            except BaseException as exc:  # noqa: BLE001 - skipped, never fatal
                failed.append("%s (%s)" % (name, type(exc).__name__))
                _unimportable.append(name)
            if _threads() != threads:
                failed.append("%s started a thread; stopped there" % name)
                break
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    line = "spore: automatic warm-up imported %d modules in %.1f ms" % (
        done, (time.perf_counter() - t) * 1000.0)
    if failed:
        line += "; not imported: " + ", ".join(failed[:10])
    os.write(2, (line + "\n").encode())


# Listed modules that failed to import at start-up: reported with the next result, so that
# the daemon stops listing them.
_unimportable = []

# Off (`auto_warmup = false`): calls report nothing.
_AUTO_WARMUP = os.environ.get("SPORE_AUTO_WARMUP", "1") != "0"


def _warm_name(n):
    return len(n) <= 200 and all(p.isidentifier() and p.isascii() for p in n.split("."))


def _new_imports(known):
    """The modules imported since `known` was taken that a later instance can import by name
    (loaded by an import, not placed in sys.modules by hand); adds every new name to `known`."""
    new = [n for n in list(sys.modules) if n not in known]
    known.update(new)
    out = []
    for n in new:
        spec = getattr(sys.modules.get(n), "__spec__", None)
        if spec is not None and getattr(spec, "name", None) == n and n != "__main__":
            out.append(n)
    return out


def _checkpoint(fd):
    """Offers this warm runtime to the daemon for a snapshot (before `ready`, so that nothing
    is in flight). Returns True in a process restored from that snapshot, False here."""
    import ctypes
    import gc
    import random

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libspore_checkpoint.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        os.write(2, ("spore: no snapshot (%s)\n" % exc).encode())
        return False
    lib.spore_checkpoint.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    lib.spore_checkpoint_context.restype = ctypes.c_void_p
    # Garbage left by the imports would otherwise be stored, restored and collected in
    # every copy.
    gc.collect()
    h = json.dumps({"type": "checkpoint", "context": lib.spore_checkpoint_context()}).encode()
    frame = _PREFIX.pack(len(h), 0) + h
    rc = lib.spore_checkpoint(fd, frame, len(frame))
    if rc == 1:
        # The environment is the one this copy's sandbox was started with (a cfork template
        # reads its children's seccomp filter from it): the daemon sent it first.
        header, _ = _recv(fd)
        if header is None or header.get("type") != "environment":
            raise SystemExit("spore: a restored runtime expected its environment, got %r" % (header,))
        os.environ.clear()
        os.environ.update(header["vars"])
        LambdaContext._static = None  # the warm-up read the snapshotted instance's
        # Every copy of the snapshot starts from the same generator states.
        random.seed()
        nprand = sys.modules.get("numpy.random")
        if nprand is not None:
            nprand.seed()
        return True
    if rc < 0:
        os.write(2, ("spore: snapshot not taken (error %d)\n" % -rc).encode())
    return False


def _recv_rest(fd, prefix):
    """Reads the rest of a frame whose 8-byte prefix was read already."""
    hlen, blen = _PREFIX.unpack(prefix)
    if blen > 16384:
        header = json.loads(_read_exact(fd, hlen))
        return header, bytes(_read_exact(fd, blen))
    # A small frame's header and body in one read (a system call less per invocation); never
    # past the frame, where descriptors passed with the next message may wait.
    rest = _read_exact(fd, hlen + blen)
    return json.loads(rest[:hlen]), bytes(rest[hlen:])


def _serve(fd, handler):
    """Serves invocations on fd until the daemon closes it."""
    main_pid = os.getpid()
    stream = _Stream(fd, main_pid)
    # Automatic warm-up: the modules this instance has, and its threads when it started
    # serving. A call that imports more reports them, unless it also left threads running
    # (which a module may have started at import: a cfork template could not fork then).
    known = set(sys.modules)
    threads = _threads()
    while True:
        header, body = _recv(fd)
        if header is None:
            return 0
        fds = None
        if header.get("dag") is not None:
            import spore_dag

            fds = spore_dag.recv_fds(fd, header["dag"]["fds"])
            if header["dag"].get("pipeline") is not None:
                _serve_pipeline(fd, handler, header, fds, main_pid)
                continue
        report = {}
        _marks["handler_start_ns"] = _marks["handler_end_ns"] = 0
        start = time.perf_counter()
        if fds is None:
            out, error = _captured(main_pid, stream, lambda: _invoke(handler, header, body))
        else:
            out, error = _captured(
                main_pid, stream, lambda: _invoke_dag(handler, header, body, fds, report))
        payload = b""
        if error is None:
            payload, error = out
        if error is not None:
            stream.write(_error_entry(error))
        stream.flush()
        _state["request_id"] = ""
        duration = (time.perf_counter() - start) * 1000.0
        reply = {"type": "result", "error": error, "duration_ms": duration, "logs": "",
                 "error_logged": error is not None,
                 "handler_start_ns": _marks["handler_start_ns"], "handler_end_ns": _marks["handler_end_ns"]}
        reply.update(report)
        if _AUTO_WARMUP and len(sys.modules) != len(known):
            try:
                imported = [n for n in _new_imports(known) if _warm_name(n)]
            except BaseException:  # noqa: BLE001 - a hostile sys.modules entry: report nothing
                imported = []
            if imported and _threads() == threads:
                reply["imported"] = imported[:500]
        if _unimportable:
            reply["unimportable"] = [n for n in _unimportable[:500] if _warm_name(n)]
            del _unimportable[:500]
        with stream.lock:  # not between the frames of a thread that still prints
            _send(fd, reply, payload)


def _exit_status(exc):
    """The status `sys.exit(code)` asks for, as the interpreter would exit with it."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(str(code) + "\n")
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    return 1


def _captured(main_pid, out, run):
    """Runs `run()` with stdout and stderr going to `out`; returns (its value, what it raised
    as a Lambda error). A process the handler forked never gets back from here into the
    runtime loop: it must not answer on the control socket. `sys.exit()` in a handler ends
    the runtime, as in Lambda (the daemon reports `Runtime.ExitError` and discards the
    instance)."""
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    value = error = None
    try:
        value = run()
    except SystemExit as exc:
        if os.getpid() != main_pid:
            os._exit(_exit_status(exc))
        status = _exit_status(exc)
        sys.stdout, sys.stderr = real_out, real_err
        out.flush()
        os._exit(status)
    except BaseException as exc:  # noqa: BLE001 - report everything the handler raises
        if os.getpid() != main_pid:
            os._exit(1)
        error = _error(exc)
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    if os.getpid() != main_pid:
        os._exit(0)
    return value, error


def _serve_pipeline(fd, handler, header, fds, main_pid):
    """Serves one node of a pre-wired DAG pipeline: every message on its input edges is an
    invocation. Returns (after a result frame with the error) when a handler fails; the
    daemon stops the instance to tear the pipeline down."""
    import spore_dag

    def finish(result):
        pipe.finish(result, _marks["handler_start_ns"], _marks["handler_end_ns"])

    def run():
        # The capture is in place before the input comes; the run's values go with this
        # frame, so that the next `next_event` unmaps their payloads while idle.
        event = pipe.next_event()
        invocation = {"request_id": pipe.request_id, "deadline_ms": pipe.deadline_ms}
        return _call(handler, invocation, event, finish)[1]

    error = None
    logs = ""
    pipe = None
    try:
        pipe = spore_dag.Pipeline(header["dag"], fds)
        while error is None:
            capture = _Capture()
            marshal_error, error = _captured(main_pid, capture, run)
            error = error or marshal_error
            logs = capture.text()
            if error is None and logs:
                _send(fd, {"type": "logs", "logs": logs})
    except Exception as exc:  # noqa: BLE001 - the page or an edge failed: report it
        error = _error(exc)
    finally:
        if pipe is not None:
            pipe.close()
    _send(fd, {"type": "result", "error": error, "duration_ms": 0.0, "logs": logs})


if __name__ == "__main__":
    sys.exit(main())
