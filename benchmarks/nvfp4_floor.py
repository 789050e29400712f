"""How fast can the NVFP4 weight be read at all? (GPU)

The NVFP4 kernel reads 33 MB (K = 4096, N = 14336: 29.4 MB of packed values, 3.7 MB of scales) per
call; bf16 ``F.linear`` reads 117 MB. This times, back to back on rotating copies exactly as the
kernel table does (``rewriter.kernels.nvfp4.back_to_back_ms``):

- ``stream``: a Triton kernel that only reads the same bytes (contiguous blocks, xor-reduced, one
  int32 stored per program) for several block shapes: the floor for any kernel reading this weight
  in one launch;
- ``cublas_33MB``: bf16 ``F.linear`` at M = 1 on a weight of the same byte count (N = 14336,
  K = 1152), i.e. what cuBLAS's GEMV reaches on 33 MB;
- ``cublas_117MB``: the baseline of the target (K = 4096, N = 14336, M = 1);
- ``copy_33MB``: ``Tensor.copy_`` of 33 MB (read + write).

    python benchmarks/nvfp4_floor.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rewriter.kernels import nvfp4 as nv  # noqa: E402


@triton.jit
def _stream(ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    for i in tl.static_range(ITERS):
        idx = base + i * BLOCK + offs
        acc ^= tl.load(ptr + idx, mask=idx < n_words, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def main():
    n, k = 14336, 4096
    dev = "cuda"
    nbytes = n * k // 2 + n * k // 16
    words = nbytes // 4
    bufs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device=dev)
            for _ in range(nv.copies_for(nbytes))]
    print(torch.cuda.get_device_name(), f"{nbytes / 1e6:.1f} MB per call, {len(bufs)} copies")
    rows = []
    for block, iters, warps in [(1024, 1, 4), (2048, 1, 4), (4096, 1, 4), (4096, 1, 8), (8192, 1, 8),
                                (2048, 4, 4), (4096, 4, 8), (2048, 16, 4), (4096, 8, 8), (8192, 4, 8)]:
        grid = triton.cdiv(words, block * iters)
        outs = [torch.empty(grid, dtype=torch.int32, device=dev) for _ in bufs]
        us = nv.back_to_back_ms([lambda b=b, o=o: _stream[(grid,)](b, o, words, BLOCK=block, ITERS=iters,
                                                                      num_warps=warps)
                                 for b, o in zip(bufs, outs)], reps=20) * 1e3
        rows.append((f"stream block={block} iters={iters} warps={warps} grid={grid}", us))
    dst = torch.empty_like(bufs[0])
    us = nv.back_to_back_ms([lambda b=b: dst.copy_(b) for b in bufs], reps=20) * 1e3
    rows.append(("copy_33MB (read + write)", us))
    del bufs
    for kk, label in ((1152, "cublas_33MB"), (4096, "cublas_117MB")):
        wb = n * kk * 2
        ws = [torch.randn(n, kk, device=dev).to(torch.bfloat16) for _ in range(nv.copies_for(wb))]
        x = torch.randn(1, kk, device=dev, dtype=torch.bfloat16)
        us = nv.back_to_back_ms([lambda w=w: F.linear(x, w) for w in ws], reps=20) * 1e3
        rows.append((f"{label} F.linear M=1 K={kk} N={n} ({wb / 1e6:.0f} MB)", us))
        del ws
    for name, us in rows:
        mb = 33.0 if "33" in name or "stream" in name else 117.4
        print(f"{name:60s} {us:7.2f} us  {mb / us:5.2f} TB/s")


if __name__ == "__main__":
    main()
