"""FunctionBench linpack: solve a dense N x N system with numpy and report MFLOP/s."""
import time

import numpy as np


def handler(event, context):
    n = int(event.get("n", 300))
    rng = np.random.default_rng(int(event.get("seed", 42)))
    a = rng.random((n, n))
    b = rng.random(n)
    start = time.perf_counter()
    x = np.linalg.solve(a, b)
    latency = time.perf_counter() - start
    residual = float(np.linalg.norm(a @ x - b))
    ops = (2.0 * n ** 3) / 3.0 + 2.0 * n ** 2
    return {"n": n, "residual_ok": residual < 1e-6, "mflops": ops / latency / 1e6, "latency_s": latency}
