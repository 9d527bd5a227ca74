"""Receives a payload (a memoryview) and reports its length and SHA-256."""
import hashlib


def handler(event, context):
    data = event if isinstance(event, memoryview) else memoryview(bytes(str(event), "utf-8"))
    return {"len": data.nbytes, "sha256": hashlib.sha256(data).hexdigest()}
