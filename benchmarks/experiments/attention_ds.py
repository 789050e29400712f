"""Per-kernel GPU times of the window backward with and without the stored-dS path
(rewriter.kernels.flash_attention.DS_BACKWARD), from the PyTorch profiler, plus CUDA-graph
forward+backward time of each mode, alternating, same process.

    PYTHONPATH=. python benchmarks/experiments/attention_ds.py [S:window:B ...]
"""
import statistics
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from rewriter.kernels import flash_attention as fa


def kernel_times(fn, iters=5):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.count:
            out[e.key[:40]] = e.device_time_total / iters
    return out


def main():
    rows = sys.argv[1:] or ["4096:512:4", "4096:128:4", "4096:2048:4", "16384:512:1"]
    H, D = 16, 128
    for spec in rows:
        S, W, B = (int(x) for x in spec.split(":"))
        q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3)]
        do = torch.randn_like(q)
        vis = sum(min(i + 1, W) for i in range(S))
        flop = 3.5 * 4 * B * H * D * vis

        def step(mode):
            def run():
                saved = fa.DS_BACKWARD
                fa.DS_BACKWARD = mode
                try:
                    return torch.autograd.grad(
                        fa.flash_attention(q, k, v, causal=True, window=(W - 1, 0)), (q, k, v), do)
                finally:
                    fa.DS_BACKWARD = saved
            return run

        g = {m: step(m)() for m in ("off", "on")}
        err = max(((a.double() - b.double()).norm() / b.double().norm()).item()
                  for a, b in zip(g["on"], g["off"]))
        for m in ("off", "on"):
            kt = kernel_times(step(m))
            total = sum(kt.values())
            print(f"S={S} W={W} B={B} DS {m}: kernels {total:.0f} us :: " + "; ".join(
                f"{n} {t:.0f}" for n, t in sorted(kt.items(), key=lambda x: -x[1])), flush=True)
        res = {"off": [], "on": []}
        for _ in range(3):
            for m in res:
                res[m].append(triton.testing.do_bench_cudagraph(step(m), rep=30,
                                                                 return_mode="median"))
        ms = {m: statistics.median(t) for m, t in res.items()}
        print(f"S={S} W={W} B={B}: graph ms off {ms['off']:.3f} ({flop / ms['off'] / 1e9:.0f} TF/s)"
              f" on {ms['on']:.3f} ({flop / ms['on'] / 1e9:.0f} TF/s) on/off speedup "
              f"{ms['off'] / ms['on']:.3f}; max rel diff {err:.1e}", flush=True)
        del q, k, v, do, g


if __name__ == "__main__":
    main()
