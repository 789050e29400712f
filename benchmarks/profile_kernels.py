"""One call of a kernel inside an NVTX range named "profile", for Nsight Compute (GPU only).

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight --section WarpStateStats \
        python benchmarks/profile_kernels.py nvfp4|attention

``nvfp4``: the NVFP4 MMA kernel at M = 1, K = 4096, N = 14336 with the configuration the sweeps
found fastest (split-K 2, 2 warps, 32 rows per program, two tiles ahead, L2 hint), and its split-K
reduction (``nvfp4_xlate``: x read when used, split-K 4; ``nvfp4_kw4``: four warps splitting K
per 16 rows, summed in the program; ``nvfp4_tiled``: the same on the weight in tile order;
``nvfp4_tiled16``: M = 16 on the tile order, two row groups). ``attention``: the causal forward at B = 4, H = 16, S = 4096, D = 128, bf16, after
autotuning (warm-up calls outside the range).
"""
import sys

import torch

from rewriter.kernels import flash_attention as fa
from rewriter.kernels import nvfp4 as nv


def main(which: str) -> None:
    torch.manual_seed(0)
    if which in ("nvfp4", "nvfp4_xlate", "nvfp4_kw4", "nvfp4_tiled", "nvfp4_tiled16"):
        w = nv.pack_nvfp4(torch.randn(14336, 4096, device="cuda") * 0.02)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, 14336, device="cuda", dtype=torch.bfloat16)
        cfg = nv.NVFP4GemmConfig(8, 32, 128, 2, 2, 1, "mma", 2, 1)
        if which == "nvfp4_xlate":  # x read when used, split-K 4
            cfg = nv.NVFP4GemmConfig(8, 32, 128, 4, 2, 1, "mma", 2, 1, x_late=1)
        if which in ("nvfp4_kw4", "nvfp4_tiled"):  # four warps per 16 rows, K split in the program
            cfg = nv.NVFP4GemmConfig(8, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4)
        if which.startswith("nvfp4_tiled"):  # the weight in tile order (what NVFP4Linear stores)
            w = nv.to_tiled(w)
        if which == "nvfp4_tiled16":  # M = 16: two row groups, four warps splitting K
            x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(16, 14336, device="cuda", dtype=torch.bfloat16)
            cfg = nv.NVFP4GemmConfig(16, 32, 128, 1, 4, 1, "mma", 2, 1, x_late=1, kwarps=4)

        def call():
            nv._launch(x, w, None, out, cfg)
    elif which == "attention":
        q, k, v = (torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def call():
            fa.flash_attention(q, k, v, causal=True)
    else:
        sys.exit(f"unknown kernel {which!r}: nvfp4 or attention")
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    call()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nvfp4")
