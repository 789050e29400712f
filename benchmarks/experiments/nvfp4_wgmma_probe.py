"""Compile-only probe (no GPU): can a warpgroup MMA take the NVFP4 weight, decoded in registers,
as its A operand, with x^T in shared memory as B (the next lead for M = 9..16 in NOTES_nvfp4.md)?

Compiles a deliberately simple Gluon kernel for sm_90 on the CPU and prints its register count,
spills and the SASS instruction mix of the whole kernel. Per 64-row block and K step of BK:

- the packed bytes are stored thread-major: thread (warp w, lane 4 lr + q) reads its BK/4 bytes
  with 16-byte loads, byte (c, h, g) holding the K pair c*8 + g*4 + q of row w*16 + h*8 + lr
  (the pairs a thread holds in the A operand of the MMA); the scales likewise (one per row and
  16 K elements, BK/8 bytes per thread);
- reshapes and a permute carry the bytes into the operand's distribution for pairs
  (``DotOperandLayout(0, parent, k_width=1)``) without data movement;
- each nibble becomes bf16 by placing its bits (the 2^126 this leaves is meant for the scale),
  times the E4M3 scale; a join and a reshape give the A operand (``k_width=2``);
- ``HGMMA.64x16x16`` multiplies it with x^T (16 columns) from shared memory.

Not a working kernel: its numerics were never run, the decode is the naive one (byte permutes
and conversions through f16, about three times the current MMA kernel's instructions per weight),
x goes through a plain store instead of a TMA ring, and no tiles are kept in flight.

    python benchmarks/experiments/nvfp4_wgmma_probe.py [BK ...]
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait, fence_async_shared
from triton.experimental.gluon._runtime import GluonASTSource
from triton.backends.compiler import GPUTarget


@gluon.jit
def _e2m1(n):
    # E2M1 code (low 4 bits of an int16) -> bf16 times 2^-126 (the scale carries 2^126)
    return (((n & 7) << 6) | ((n & 8) << 12)).to(gl.bfloat16, bitcast=True)


@gluon.jit
def probe(W, S, X, Y, K, stride_w, stride_s, stride_x, stride_y,
          BK: gl.constexpr, M16: gl.constexpr):
    pid = gl.program_id(0)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M16, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=1)
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M16, BK], gl.bfloat16)
    # The packed bytes of this 64-row block and K step: 128 threads x BK/4 bytes, thread-major;
    # thread (r' = w*8 + lr, q) holds byte (c, h, g) = K pair c*8 + g*4 + q of row w*16 + h*8 + lr.
    u_layout: gl.constexpr = gl.BlockedLayout([1, 1, BK // 4], [8, 4, 1], [4, 1, 1], [2, 1, 0])
    tr = gl.arange(0, 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, u_layout)))
    tq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, u_layout)))
    tb = gl.arange(0, BK // 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, u_layout)))
    toff = (gl.expand_dims(gl.expand_dims(tr, 1), 2) * 4 + gl.expand_dims(gl.expand_dims(tq, 0), 2)) * (BK // 4) \
        + gl.expand_dims(gl.expand_dims(tb, 0), 1)
    s_layout3: gl.constexpr = gl.BlockedLayout([1, 1, BK // 8], [8, 4, 1], [4, 1, 1], [2, 1, 0])
    sr = gl.arange(0, 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, s_layout3)))
    sq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, s_layout3)))
    sb = gl.arange(0, BK // 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, s_layout3)))
    soff = gl.expand_dims(gl.expand_dims(sr, 1), 2) * (BK // 8) \
        + gl.expand_dims(gl.expand_dims(sq, 0), 2) * 0 + gl.expand_dims(gl.expand_dims(sb, 0), 1)
    xr = gl.arange(0, M16, layout=gl.SliceLayout(1, x_layout))
    xc = gl.arange(0, BK, layout=gl.SliceLayout(0, x_layout))
    acc = gl.zeros([64, M16], gl.float32, acc_layout)
    x_s = gl.allocate_shared_memory(gl.bfloat16, [M16, BK], x_smem_layout)
    for k0 in range(0, K, BK):
        u = gl.load(W + (pid * (K // BK) + k0 // BK) * (64 * BK // 2) + toff)
        u = u.reshape([4, 8, 4, BK // 16, 2, 2]).permute((0, 4, 1, 3, 5, 2)).reshape([64, BK // 2])
        w = gl.convert_layout(u, p_layout).to(gl.int16)
        # Scales in the same order: thread row r' holds (c, h) for the step contiguously; the four
        # lanes of a quad read the same bytes, and each scale covers both pair halves g.
        sc = gl.load(S + (pid * (K // BK) + k0 // BK) * (64 * BK // 16) + soff)
        sc = sc.to(gl.float8e4nv, bitcast=True).to(gl.bfloat16)
        sc = gl.join(sc, sc).reshape([4, 8, 4, BK // 16, 2, 2]).permute((0, 4, 1, 3, 5, 2))
        scale = gl.convert_layout(sc.reshape([64, BK // 2]), p_layout)
        lo = _e2m1(w) * scale
        hi = _e2m1(w >> 4) * scale
        a = gl.join(lo, hi).reshape([64, BK])
        a = gl.convert_layout(a, a_layout)
        xt = gl.load(X + gl.expand_dims(xr, 1) * stride_x + gl.expand_dims(k0 + xc, 0))
        gl.thread_barrier()
        x_s.store(xt)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(a, x_s.permute((1, 0)), acc, is_async=True)
        acc, _ = warpgroup_mma_wait(0, deps=[acc, x_s])
    yr = pid * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    yc = gl.arange(0, M16, layout=gl.SliceLayout(0, acc_layout))
    gl.store(Y + gl.expand_dims(yc, 0) * stride_y + gl.expand_dims(yr, 1), acc.to(gl.bfloat16))


def compile_probe(BK):
    sig = {"W": "*u8", "S": "*u8", "X": "*bf16", "Y": "*bf16", "K": "i32", "stride_w": "i32",
           "stride_s": "i32", "stride_x": "i32", "stride_y": "i32", "BK": "constexpr", "M16": "constexpr"}
    src = GluonASTSource(probe, sig, constexprs={"BK": BK, "M16": 16},
                         attrs={(i,): [["tt.divisibility", 16]] for i in range(9)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def report(BK):
    import collections
    import os
    import re
    import subprocess
    import tempfile
    k = compile_probe(BK)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    instr = [line.split()[1] for line in sass.splitlines()
             if re.match(r"\s*/\*[0-9a-f]{4}\*/\s+\S", line)]
    ops = collections.Counter(op.split(".")[0].rstrip(";") for op in instr)
    gmma = sorted({line.split()[1] for line in sass.splitlines() if "GMMA." in line})
    print(f"BK = {BK}: " + " ".join(w for w in usage.split() if w.startswith(("REG", "LOCAL", "STACK"))))
    print("  MMA:", ", ".join(gmma), "| shared-memory ops (LDS/STS):", ops["LDS"] + ops["STS"])
    print("  SASS mix:", ", ".join(f"{n} {c}" for n, c in ops.most_common(12)))
    mem = collections.Counter(line.split()[0] for line in k.asm["ptx"].splitlines()
                              if re.match(r"\s*(ld|st)\.(global|shared)", line))
    print("  PTX memory instructions:", ", ".join(f"{n} {c}" for n, c in sorted(mem.items())))


if __name__ == "__main__":
    import sys
    for bk in [int(a) for a in sys.argv[1:]] or [64, 128]:
        report(bk)
