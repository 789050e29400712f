"""Host time per call (GPU): the time of ``n`` calls issued back to back, before one synchronize,
divided by ``n``; when the GPU work is shorter than the host's, that is the host's time per call.
After 20 warm-up calls, ``rounds`` such runs; the median, in microseconds."""
import statistics
import time

import torch


def per_call(fn, n=200, rounds=3):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        ts.append((t1 - t) / n * 1e6)
    return statistics.median(ts)
