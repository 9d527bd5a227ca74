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
    hlen, blen = _PREFIX.unpack(prefix)
    header = json.loads(_read_exact(fd, hlen))
    body = bytes(_read_exact(fd, blen)) if blen else b""
    return header, body


def _send(fd, header, body=b""):
    h = json.dumps(header).encode()
    view = memoryview(_PREFIX.pack(len(h), len(body)) + h + body)
    while view:
        view = view[os.write(fd, view):]


def _error(exc, error_type=None, message=None):
    import traceback

    # Lambda shows only the user's frames: drop the runtime's own from the top.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    tb = traceback.format_exception(type(exc), exc, tb)
    return {
        "errorMessage": message if message is not None else str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": [line.rstrip("\n") for line in tb],
    }


class LambdaContext:
    """The `context` argument of a handler, with Lambda's attribute names."""

    _static = None

    def __init__(self, request_id, deadline_ms):
        # The function's attributes do not change: read the environment once.
        if LambdaContext._static is None:
            name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
            LambdaContext._static = {
                "function_name": name,
                "function_version": os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
                "memory_limit_in_mb": int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0")),
                "invoked_function_arn": "arn:aws:lambda:local:000000000000:function:" + name,
                "log_group_name": "/aws/lambda/" + name,
                "log_stream_name": "spore",
            }
        self.__dict__.update(LambdaContext._static)
        self.aws_request_id = request_id
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
    context = LambdaContext(header["request_id"], header["deadline_ms"])
    _marks["handler_start_ns"] = time.monotonic_ns()
    result = handler(event, context)
    _marks["handler_end_ns"] = time.monotonic_ns()
    try:
        return encode(result), None
    except (TypeError, ValueError) as exc:
        return b"", _error(exc, "Runtime.MarshalError",
                           "Unable to marshal response: %s" % exc)


def _invoke(handler, header, body):
    event = json.loads(body) if body else {}
    return _call(handler, header, event, lambda r: json.dumps(r).encode())


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
    try:
        handler = _import_handler(os.environ["_HANDLER"])
    except _InitError as exc:
        _send(fd, {"type": "init_error", "error": exc.error})
        return 1
    warmup = os.environ.get("SPORE_WARMUP_EVENT")
    if warmup:
        _warm_up(handler, warmup)
    import_ms = (time.perf_counter() - t0) * 1000.0
    template = os.environ.get("SPORE_MODE") == "template"
    if template:
        import _spore_cfork

        _spore_cfork.preload()
    # A template is offered before it prepares anything for its children (namespaces,
    # pipes), so that the image holds no descriptor beyond the control socket.
    if os.environ.get("SPORE_CHECKPOINT") == "1" and _checkpoint(fd):
        import_ms = 0.0  # a restored copy imported nothing
    if template:
        try:
            return _spore_cfork.template(fd, handler, import_ms, _serve, _send, _recv_rest)
        except BaseException:
            import traceback

            os.write(2, ("spore cfork template failed:\n" + traceback.format_exc()).encode())
            raise
    _send(fd, {"type": "ready", "import_ms": import_ms})
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
    if error is not None:
        os.write(2, ("spore: warm-up event %s failed (%s); starting without it\n" % (path, error)).encode())
    else:
        os.write(2, ("spore: warm-up event ran in %.1f ms\n" % ((time.perf_counter() - t) * 1000.0)).encode())


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
    header = json.loads(_read_exact(fd, hlen))
    body = bytes(_read_exact(fd, blen)) if blen else b""
    return header, body


def _serve(fd, handler):
    """Serves invocations on fd until the daemon closes it."""
    main_pid = os.getpid()
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
            out, error, capture = _captured(main_pid, lambda: _invoke(handler, header, body))
        else:
            out, error, capture = _captured(
                main_pid, lambda: _invoke_dag(handler, header, body, fds, report))
        payload = b""
        if error is None:
            payload, error = out
        duration = (time.perf_counter() - start) * 1000.0
        reply = {"type": "result", "error": error, "duration_ms": duration, "logs": capture.text(),
                 "handler_start_ns": _marks["handler_start_ns"], "handler_end_ns": _marks["handler_end_ns"]}
        reply.update(report)
        _send(fd, reply, payload)


def _captured(main_pid, run):
    """Runs `run()` with stdout and stderr captured; returns (its value, what it raised as a
    Lambda error, the capture). A process the handler forked never gets back from here into
    the runtime loop: it must not answer on the control socket."""
    real_out, real_err = sys.stdout, sys.stderr
    capture = _Capture()
    sys.stdout = sys.stderr = capture
    value = error = None
    try:
        value = run()
    except BaseException as exc:  # noqa: BLE001 - report everything the handler raises
        if os.getpid() != main_pid:
            os._exit(1)
        error = _error(exc)
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    if os.getpid() != main_pid:
        os._exit(0)
    return value, error, capture


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
            marshal_error, error, capture = _captured(main_pid, run)
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
