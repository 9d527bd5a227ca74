"""FunctionBench float_operation: sin, cos and sqrt over N numbers."""
import math
import time


def handler(event, context):
    n = int(event.get("n", 100000))
    start = time.perf_counter()
    acc = 0.0
    for i in range(n):
        x = float(i)
        acc += math.sin(x) + math.cos(x) + math.sqrt(x)
    return {"n": n, "checksum": round(acc, 6), "latency_s": time.perf_counter() - start}
