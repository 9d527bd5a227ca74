"""Produces a payload of event["size"] bytes for the next node (the payload-sweep DAG).

mode "buffer" (default) fills a shared-memory buffer that is handed over without any copy;
mode "bytes" returns a bytes object (copied once into shared memory by the runtime). The
bytes are a fixed pattern so that the receiver's hash can be checked.
"""
import spore_dag

BLOCK = bytes(range(256)) * 16


def pattern(size):
    reps = size // len(BLOCK) + 1
    return memoryview(BLOCK * reps)[:size]


def handler(event, context):
    size = int(event["size"])
    data = pattern(size)
    if event.get("mode", "buffer") == "bytes":
        return bytes(data)
    buf = spore_dag.buffer(size)
    buf[:] = data
    return buf
