"""FunctionBench matmul: multiply two random N x N matrices with numpy."""
import time

import numpy as np


def handler(event, context):
    n = int(event.get("n", 256))
    rng = np.random.default_rng(int(event.get("seed", 7)))
    a = rng.random((n, n))
    b = rng.random((n, n))
    start = time.perf_counter()
    c = a @ b
    latency = time.perf_counter() - start
    return {"n": n, "trace": round(float(np.trace(c)), 3), "latency_s": latency}
