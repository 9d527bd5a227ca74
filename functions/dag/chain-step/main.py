"""One stage of the staged-func and pychain DAGs: counts the stages a value went through.

The event is {"n": stages so far, ...} or a list of such events (fan-in: n is their sum); the
output is the (first) event with n + 1, other keys passed through: "pad" (filler that sets the
payload size) and "work_ms" (busy time per stage) shape the benchmarks.
"""
import time


def handler(event, context):
    first = event[0] if isinstance(event, list) else event
    work_ms = float(first.get("work_ms", 0))
    if work_ms:
        end = time.perf_counter() + work_ms / 1000.0
        while time.perf_counter() < end:
            pass
    n = sum(e["n"] for e in event) if isinstance(event, list) else int(event.get("n", 0))
    out = dict(first)
    out["n"] = n + 1
    return out
