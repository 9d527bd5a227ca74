"""FunctionBench json_dumps_loads: serialise and parse a generated JSON document.

The original downloads a JSON file from a URL; sandboxes have no network, so the document is
generated deterministically instead (same shape: a list of nested records)."""
import json
import time


def _document(records):
    return [
        {"id": i, "name": "user-%d" % i, "tags": ["t%d" % (i % 7), "t%d" % (i % 11)],
         "profile": {"age": 20 + i % 50, "score": i * 0.5, "active": i % 3 == 0}}
        for i in range(records)
    ]


def handler(event, context):
    records = int(event.get("records", 2000))
    doc = _document(records)
    start = time.perf_counter()
    text = json.dumps(doc)
    back = json.loads(text)
    latency = time.perf_counter() - start
    return {"records": len(back), "bytes": len(text), "latency_s": latency}
