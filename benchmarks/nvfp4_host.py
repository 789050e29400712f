"""Host (CPU) cost per call of the NVFP4 linear, layer by layer of its Python path (GPU only).

Without CUDA graphs a decode step is launch-bound: each call costs what its Python path and the
kernel launch cost on the host, not what the kernel takes on the GPU. This times, per call, with
the calls issued back to back and one synchronize at the end (so the figure is the larger of host
and GPU time), for a 2048 x 2048 and a 4096 x 14336 weight at M = 1:

- ``F.linear`` on the bf16 weight (the baseline);
- ``NVFP4Linear`` (the module the pass installs; in eager it calls the op's implementation
  directly), the same with Triton's own launch path instead of the short one,
  ``torch.ops.rewriter.nvfp4_linear`` (the op through the dispatcher, as compiled graphs call it),
  ``nvfp4_gemm`` (below the op) and ``_launch`` with the tuned configuration (below the tuner);
- ``torch.compile`` (Inductor) of ``F.linear`` and of the module;
- the GPU time of one call from a CUDA graph replay of 20 calls, for reference;

then a cProfile of the module's forward (top entries by own time).

    PYTHONPATH=. python benchmarks/nvfp4_host.py [--out DIR]
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

from rewriter.kernels import _launch
from rewriter.kernels import nvfp4 as nv


def per_call_us(fn, calls=300, rounds=5):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


def graph_us(fn, calls=20, reps=20):
    """GPU us per call: ``calls`` calls of ``fn`` replayed from one CUDA graph (the library's own
    back-to-back method), median of ``reps`` replays."""
    return nv.back_to_back_ms([fn] * calls, reps) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    lines = [f"# NVFP4 host cost per call, {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    for k, n in ((2048, 2048), (4096, 14336)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        mod = nv.NVFP4Linear.from_linear(lin).cuda()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = nv.NVFP4Weight(mod.packed, mod.scales, mod.global_scale, (n, k), mod.tiled)
        with torch.no_grad():
            mod(x)  # tunes
            out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            cfg = nv._select_config(x, w, None, out)
            def slow_launch():
                _launch.ENABLED = False
                try:
                    return mod(x)
                finally:
                    _launch.ENABLED = True

            c_lin = torch.compile(lambda t: F.linear(t, lin.weight))
            c_mod = torch.compile(mod)
            steps = {
                "F.linear bf16": lambda: F.linear(x, lin.weight),
                "NVFP4Linear": lambda: mod(x),
                "NVFP4Linear, Triton's launch path": slow_launch,
                "torch.compile F.linear bf16": lambda: c_lin(x),
                "torch.compile NVFP4Linear": lambda: c_mod(x),
                "op": lambda: torch.ops.rewriter.nvfp4_linear(x, mod.packed, mod.scales.view(torch.uint8),
                                                              mod.global_scale, None, mod.tiled),
                "nvfp4_gemm": lambda: nv.nvfp4_gemm(x, w),
                "_launch (tuned cfg)": lambda: nv._launch(x, w, None, out, cfg),
            }
            lines.append(f"## K = {k}, N = {n}, M = 1 (config {cfg})")
            lines.append("")
            lines.append("| path | host-bound us per call | GPU us per call (graph) |")
            lines.append("|---|---:|---:|")
            for name, fn in steps.items():
                h = per_call_us(fn)
                g = graph_us(fn) if name in ("F.linear bf16", "NVFP4Linear") else float("nan")
                if name == "NVFP4Linear":
                    assert _launch.ENABLED, "the short launch path turned itself off"
                lines.append(f"| {name} | {h:.1f} | {g:.1f} |")
                print(lines[-1], flush=True)
            # The pieces of one launch, each timed alone (host time per call).
            from triton import knobs
            from triton.runtime import driver
            from triton.runtime.jit import compute_cache_key

            kern = nv._nvfp4_mma_kernel
            dev = driver.active.get_current_device()
            kc, kkc, _, _, binder = kern.device_caches[dev]
            args = (x, w.packed.view(torch.int32), w.scales.view(torch.uint8), w.global_scale, out, out, out,
                    1, n, k, x.stride(0), k // 8, k // 16, out.stride(0), k // 128)
            kw = dict(HAS_BIAS=False, USE_WS=False, TWO_N=False, GROUPS=cfg.block_n // (16 * (cfg.num_warps // cfg.kwarps)),
                      NUM_WARPS=cfg.num_warps, AHEAD=cfg.ahead, HINT=cfg.hint, counter_ptr=out, IN_KERNEL_REDUCE=False,
                      X_LATE=cfg.x_late, KWARPS=cfg.kwarps, TILED=w.tiled, KT=k // 128, num_warps=cfg.num_warps,
                      num_stages=1, debug=kern.debug or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode)
            bound, spec, opts = binder(*args, **kw)
            kernel = kc.get(compute_cache_key(kkc, spec, opts))
            stream = driver.active.get_current_stream(dev)
            vals = list(bound.values())
            grid = (triton.cdiv(n, cfg.block_n), 1, 1)
            pieces = {
                "torch.empty (1, N)": lambda: torch.empty((1, n), dtype=x.dtype, device=x.device),
                "_select_config (cached)": lambda: nv._select_config(x, w, None, out),
                "binder": lambda: binder(*args, **kw),
                "compute_cache_key": lambda: compute_cache_key(kkc, spec, opts),
                "kernel.run (the launch itself)": lambda: kernel.run(grid[0], 1, 1, stream, kernel.function,
                                                                      kernel.packed_metadata, None, None, None, *vals),
                "NVFP4Weight + 3 views": lambda: (nv.NVFP4Weight(mod.packed, mod.scales, mod.global_scale, (n, k),
                                                                 mod.tiled), w.packed.view(torch.int32),
                                                  w.scales.view(torch.uint8)),
                "_plain_eager": lambda: nv._plain_eager(x),
                "supports": lambda: nv.supports(x, w),
            } if kernel is not None else {}
            lines += ["", "| piece | host us per call |", "|---|---:|"]
            for name, fn in pieces.items():
                lines.append(f"| {name} | {per_call_us(fn, calls=2000):.2f} |")
                print(lines[-1], flush=True)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                mod(x)
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            lines += ["", "cProfile of 200 NVFP4Linear calls (by own time):", "", "```",
                      s.getvalue().strip(), "```", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "nvfp4_host.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
