"""Forward-loop experiments for the causal attention forward (D = 128, bf16, contiguous inputs).

Standalone copies of the forward loop, timed against SDPA and the library kernel in one run
(``benchmarks/NOTES_attention.md``, "Third round", has the analysis):

- ``base``: the library's loop (load K, Q K^T, softmax, load V, P V), unmasked blocks then the
  diagonal block(s) with the causal mask;
- ``pipe``: the unmasked loop rotated so that the next block's Q K^T is issued before this block's
  softmax and stays in flight during it (software pipelining of the two products), P V of the
  previous block first;
- ``tma`` / ``tma_pipe``: the same two with K and V read through device-side tensor descriptors.

What the rotation needs in Triton 3.6 (checked with ``ptxas -v`` on the PTX, ``--sass``):
Triton keeps a ``tl.dot`` asynchronous only if its result reaches nothing but the loop's yield
(used in the next iteration after a synchronous product). ptxas then serializes *every* wgmma of
the kernel (C7514/C7515) if a non-wgmma instruction reads or writes an accumulator register while
it is in flight. Two things did that: LLVM folded ``qk * scale`` back into the exponent's FMA, so
the old scores stayed live past the next product's issue and the loop-carried copy read the
in-flight registers (fixed by an opaque ``mul.f32`` in inline asm); and the rescale ``acc *
alpha`` wrote the P V accumulator between the issue and the wait (fixed by a fresh accumulator
per block, added with an opaque ``fma.rn.f32``, also for the diagonal blocks). Then the SASS
shows the softmax's MUFU.EX2 interleaved with the in-flight HGMMAs, as intended.

Measured with this file (H200, B=4, H=16, S=4096, causal forward, CUDA-graph replay, one run:
``benchmarks/results/fa_fwd_experiments_h200.txt``): SDPA 497 TF/s, the library kernel 421; base
400 (128x64, 8 warps, 3 stages) / 405 (128x128, 3 stages); pipe 386 / 381 (128x128 with 3 stages
needs 288 KB of shared memory: P goes through shared memory in the rotated loop); tma 420 / 435;
tma_pipe 381 / 390. The rotation loses 1-6% (P's round trip through shared memory and the extra
registers cost more than the overlap gains). An earlier draft of the same experiment, same
structure, gave the same ordering (base 416 / 424, pipe 371, tma 423 / 448). Descriptor loads
help this simple loop but not the library kernel (attention_nvidia-h200_ab.md: 1-6% slower).

Run: ``PYTHONPATH=. python benchmarks/fa_fwd_experiments.py [--variants base,pipe] [--sass]``
(``--sass`` compiles for sm_90 here and prints registers and shared memory; no GPU needed).
"""
import argparse
import math
import re
import subprocess

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_MUL_PTX = tl.constexpr("mul.f32 $0, $1, $2;")
_FMA_PTX = tl.constexpr("fma.rn.f32 $0, $1, $2, $3;")


@triton.jit
def _load_kv(desc, ptr, idx, n_ptr, offs_d, D: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        return desc.load([idx, 0])
    else:
        return tl.load(ptr + (idx + n_ptr)[:, None] * D + offs_d[None, :])


@triton.jit
def _scores(s, l_i, m_i):
    """Online-softmax update from scores already in log2 units."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _add_pv(acc, alpha, p, v, FRESH: tl.constexpr):
    """acc * alpha + p @ v; with FRESH, the product goes to its own accumulator and the sum is an
    opaque FMA (Triton would fold a plain add back into the product's accumulator)."""
    if FRESH:
        pv = tl.dot(p.to(v.dtype), v)
        return tl.inline_asm_elementwise(_FMA_PTX, "=f,f,f,f", [acc, alpha[:, None], pv],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _fwd(Q, K, V, O, S, qk_scale, PIPE: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, D: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * D
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    n_ptr = tl.arange(0, BLOCK_N)
    q = tl.load(Q + base + rows[:, None] * D + offs_d[None, :])
    kdesc = K + base
    vdesc = V + base
    if TMA:
        kdesc = tl.make_tensor_descriptor(K + base, shape=[S, D], strides=[D, 1],
                                          block_shape=[BLOCK_N, D])
        vdesc = tl.make_tensor_descriptor(V + base, shape=[S, D], strides=[D, 1],
                                          block_shape=[BLOCK_N, D])
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    nblk = start_m // BLOCK_N
    if PIPE and nblk >= 2:
        k = _load_kv(kdesc, K + base, 0, n_ptr, offs_d, D, TMA)
        p, alpha, l_i, m_i = _scores(tl.dot(q, tl.trans(k)) * qk_scale, l_i, m_i)
        k = _load_kv(kdesc, K + base, BLOCK_N, n_ptr, offs_d, D, TMA)
        qk = tl.dot(q, tl.trans(k))
        for i in range(1, nblk - 1):
            v = _load_kv(vdesc, V + base, (i - 1) * BLOCK_N, n_ptr, offs_d, D, TMA)
            acc = _add_pv(acc, alpha, p, v, True)
            s = tl.inline_asm_elementwise(_MUL_PTX, "=f,f,f", [qk, qk_scale], dtype=tl.float32,
                                          is_pure=True, pack=1)
            k = _load_kv(kdesc, K + base, (i + 1) * BLOCK_N, n_ptr, offs_d, D, TMA)
            qk = tl.dot(q, tl.trans(k))
            p, alpha, l_i, m_i = _scores(s, l_i, m_i)
        v = _load_kv(vdesc, V + base, (nblk - 2) * BLOCK_N, n_ptr, offs_d, D, TMA)
        acc = _add_pv(acc, alpha, p, v, True)
        p, alpha, l_i, m_i = _scores(qk * qk_scale, l_i, m_i)
        v = _load_kv(vdesc, V + base, (nblk - 1) * BLOCK_N, n_ptr, offs_d, D, TMA)
        acc = _add_pv(acc, alpha, p, v, True)
    else:
        for start_n in range(0, nblk * BLOCK_N, BLOCK_N):
            k = _load_kv(kdesc, K + base, start_n, n_ptr, offs_d, D, TMA)
            v = _load_kv(vdesc, V + base, start_n, n_ptr, offs_d, D, TMA)
            p, alpha, l_i, m_i = _scores(tl.dot(q, tl.trans(k)) * qk_scale, l_i, m_i)
            acc = _add_pv(acc, alpha, p, v, False)
    for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
        cols = start_n + n_ptr
        k = _load_kv(kdesc, K + base, start_n, n_ptr, offs_d, D, TMA)
        v = _load_kv(vdesc, V + base, start_n, n_ptr, offs_d, D, TMA)
        s = tl.where(cols[None, :] <= rows[:, None], tl.dot(q, tl.trans(k)) * qk_scale,
                     float("-inf"))
        p, alpha, l_i, m_i = _scores(s, l_i, m_i)
        acc = _add_pv(acc, alpha, p, v, PIPE)
    out = acc / l_i[:, None]
    tl.store(O + base + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty))


VARIANTS = {"base": (0, False), "pipe": (1, False), "tma": (0, True), "tma_pipe": (1, True)}
CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3)]


def run(name, q, k, v, bm, bn, warps, stages):
    pipe, tma = VARIANTS[name]
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    if tma:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device=q.device))
    _fwd[(S // bm, B * H)](q, k, v, o, S, LOG2E / math.sqrt(D), PIPE=pipe, TMA=tma, BLOCK_M=bm,
                           BLOCK_N=bn, D=D, num_warps=warps, num_stages=stages)
    return o


def sass_report(name, bm, bn, warps, stages):
    """Registers, spills and shared memory of one variant compiled for sm_90, and whether ptxas
    serializes its wgmmas."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    pipe, tma = VARIANTS[name]
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "S": "i32", "qk_scale": "fp32",
           "PIPE": "constexpr", "TMA": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "D": "constexpr"}
    consts = {"PIPE": pipe, "TMA": tma, "BLOCK_M": bm, "BLOCK_N": bn, "D": 128}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    kern = triton.compile(ASTSource(_fwd, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})
    binp = triton.__path__[0] + "/backends/nvidia/bin/"
    with open("/tmp/fa_exp.ptx", "w") as f:
        f.write(kern.asm["ptx"])
    log = subprocess.run([binp + "ptxas", "-v", "--gpu-name", "sm_90a", "/tmp/fa_exp.ptx", "-o",
                          "/tmp/fa_exp.cubin"], capture_output=True, text=True).stderr
    print(name, (bm, bn, warps, stages), re.findall(r"Used \d+ registers", log),
          re.findall(r"\d+ bytes spill stores", log), "smem", kern.metadata.shared,
          "SERIALIZED" if "C751" in log else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--S", type=int, default=4096)
    args = ap.parse_args()
    names = args.variants.split(",")
    if args.sass:
        for name in names:
            for c in CONFIGS:
                try:
                    sass_report(name, *c)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                    print(name, c, "failed:", str(e).splitlines()[0][:200])
        return
    from triton.testing import do_bench_cudagraph
    import torch.nn.functional as F
    from rewriter.kernels.flash_attention import flash_attention
    torch.manual_seed(0)
    S, D, H = args.S, 128, 16
    B = 16384 // S
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * D * S * (S + 1) / 2
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for _ in range(2):
        t = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rep=200)
        print(f"sdpa {t * 1e3:.1f} us {flops / t / 1e9:.0f} TF/s")
        t = do_bench_cudagraph(lambda: flash_attention(q, k, v, causal=True), rep=200)
        print(f"library kernel {t * 1e3:.1f} us {flops / t / 1e9:.0f} TF/s")
        for name in names:
            for c in CONFIGS:
                try:
                    err = (run(name, q, k, v, *c).float() - ref.float()).abs().max().item()
                    t = do_bench_cudagraph(lambda: run(name, q, k, v, *c), rep=200)
                    print(f"{name} {c} {t * 1e3:.1f} us {flops / t / 1e9:.0f} TF/s err {err:.2e}")
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print(name, c, "failed:", str(e).splitlines()[0][:200])


if __name__ == "__main__":
    main()
