"""x in fragment order for the NVFP4 warp-MMA kernel at M = 9..16 (``NVFP4GemmConfig.x_frag``,
NOTES_nvfp4.md, tenth round). The kernel's x loads as x comes touch 16 cache lines per warp load
(8 rows, four 16-byte pieces 64 bytes apart in each); laid out first by a small kernel in the
order the lanes read it, each warp load reads 512 consecutive bytes (4 lines). ``x_frag`` 1 runs
that kernel, then the MMA kernel; 2 launches the MMA kernel with programmatic dependent launch, so
its first weight loads overlap the small kernel and it waits only before its first x load.

Each MMA candidate of the M bucket with x_frag 0 / 1 / 2 is timed back to back (one CUDA graph
with one call per weight copy, median of 10 replays, best of two rounds) beside bf16 F.linear
and the tuned ``NVFP4Linear`` in the same process (``nvfp4_prefetch.run``); every variant's output
must equal its configuration's without it bit for bit. The small kernel is also timed alone.

    PYTHONPATH=. python benchmarks/experiments/nvfp4_xfrag.py [OUT.json]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvfp4_prefetch import run  # noqa: E402
from nvfp4_wgmma_probe import _graph_us  # noqa: E402

from rewriter.kernels import nvfp4 as nv  # noqa: E402


def frag_kernel_alone(k, m=16, copies=32):
    """GPU time of the layout kernel alone per call, back to back in a CUDA graph (us)."""
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    xf = torch.empty(k * 16, device="cuda", dtype=torch.bfloat16)
    us = _graph_us(lambda i: nv._nvfp4_x_frag_kernel[(k // 128,)](xs[i], xf, m, k, PDL=False, num_warps=4),
                   copies)
    print(f"layout kernel alone, M={m} K={k}: {us:.2f} us per call", flush=True)


if __name__ == "__main__":
    path = next((a for a in sys.argv[1:] if a.endswith(".json")), None)
    bf, f16 = torch.bfloat16, torch.float16
    xf = [{}, {"x_frag": 1}, {"x_frag": 2}]
    for k in (4096, 14336):
        frag_kernel_alone(k)
    entries = [(4096, 14336, (16, 12, 9), bf, xf, None),
               (14336, 4096, (16,), bf, xf, None),
               (4096, 4096, (16,), bf, xf, None),
               (4096, 14336, (16,), f16, [dict(v, maxnreg=128) for v in xf], None)]
    run(entries, path)
