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
- ``rows``: the packed values alone (29.4 MB) read in the MMA kernel's pattern (16 rows x 64 bytes
  per warp and K tile), in the packed layout and with each such tile stored contiguously;
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


@triton.jit
def _rows_stream(ptr, out_ptr, KW, KT, ROWS: tl.constexpr, TILES: tl.constexpr, TILED: tl.constexpr):
    """The MMA kernel's reads without its arithmetic: ROWS weight rows x TILES K tiles of 16 words
    (128 elements) per program. TILED = 0: rows of KW words (the packed layout, a tile is 64 bytes
    of each of 16 rows); TILED = 1: each 16-row x 16-word tile stored as one contiguous 1 KB."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, 16)
    acc = tl.zeros((ROWS, 16), dtype=tl.int32)
    for t in tl.static_range(TILES):
        kt = pid_k * TILES + t
        if TILED:
            offs = ((rows[:, None] // 16).to(tl.int64) * KT + kt) * 256 + (rows[:, None] % 16) * 16 + c[None, :]
        else:
            offs = rows[:, None].to(tl.int64) * KW + kt * 16 + c[None, :]
        acc ^= tl.load(ptr + offs)
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


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
        rows.append((f"stream block={block} iters={iters} warps={warps} grid={grid}", us, nbytes))
    # The packed values only (29.4 MB), read in the MMA kernel's pattern, then tiled.
    kw, kt = k // 8, k // 128
    vbytes = n * k // 2
    for tiled in (0, 1):
        for rows_, tiles, warps in [(16, 8, 1), (64, 8, 4), (64, 4, 4), (128, 8, 8), (64, 32, 4), (16, 32, 1)]:
            grid = (n // rows_, kt // tiles)
            outs = [torch.empty(grid[0] * grid[1], dtype=torch.int32, device=dev) for _ in bufs]
            us = nv.back_to_back_ms([lambda b=b, o=o: _rows_stream[grid](b, o, kw, kt, ROWS=rows_, TILES=tiles,
                                                                         TILED=tiled, num_warps=warps)
                                     for b, o in zip(bufs, outs)], reps=20) * 1e3
            rows.append((f"rows tiled={tiled} rows={rows_} tiles={tiles} warps={warps} grid={grid}",
                         us, vbytes))
    dst = torch.empty_like(bufs[0])
    us = nv.back_to_back_ms([lambda b=b: dst.copy_(b) for b in bufs], reps=20) * 1e3
    rows.append(("copy_33MB (read + write)", us, nbytes))
    del bufs
    for kk, label in ((1152, "cublas_33MB"), (4096, "cublas_117MB")):
        wb = n * kk * 2
        ws = [torch.randn(n, kk, device=dev).to(torch.bfloat16) for _ in range(nv.copies_for(wb))]
        x = torch.randn(1, kk, device=dev, dtype=torch.bfloat16)
        us = nv.back_to_back_ms([lambda w=w: F.linear(x, w) for w in ws], reps=20) * 1e3
        rows.append((f"{label} F.linear M=1 K={kk} N={n} ({wb / 1e6:.0f} MB)", us, wb))
        del ws
    for name, us, nb in rows:
        print(f"{name:70s} {us:7.2f} us  {nb / 1e6 / us:5.2f} TB/s")


if __name__ == "__main__":
    main()
