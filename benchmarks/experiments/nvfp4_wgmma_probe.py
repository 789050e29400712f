"""Compile-only probe (no GPU): can a warpgroup MMA take the NVFP4 weight, decoded in registers,
as its A operand, with x^T in shared memory as B (the next lead for M = 9..16 in NOTES_nvfp4.md)?

Compiles a deliberately simple Gluon kernel for sm_90 on the CPU and prints its register count,
spills and the SASS instruction mix of the whole kernel: per K step, row-major packed bytes are
loaded in the A operand's distribution (pairs of K elements per byte), decoded to bf16 (E2M1 bits
placed in bf16 and the 2^126 left to the scale), scaled by the E4M3 block scale, joined and
reshaped into the A operand layout, and multiplied with x^T (16 columns) from shared memory by
``HGMMA.64x16x16``. Not a working kernel: its numerics were never run, and it loads bytes one at a
time (the library's tile order would give 16-byte loads).

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
    rows = pid * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, p_layout))
    pairs = gl.arange(0, BK // 2, layout=gl.SliceLayout(0, p_layout))
    xr = gl.arange(0, M16, layout=gl.SliceLayout(1, x_layout))
    xc = gl.arange(0, BK, layout=gl.SliceLayout(0, x_layout))
    acc = gl.zeros([64, M16], gl.float32, acc_layout)
    x_s = gl.allocate_shared_memory(gl.bfloat16, [M16, BK], x_smem_layout)
    for k0 in range(0, K, BK):
        w = gl.load(W + gl.expand_dims(rows, 1) * stride_w + gl.expand_dims(k0 // 2 + pairs, 0)).to(gl.int16)
        sc = gl.load(S + gl.expand_dims(rows, 1) * stride_s + gl.expand_dims(k0 // 16 + pairs // 8, 0))
        scale = sc.to(gl.float8e4nv, bitcast=True).to(gl.bfloat16)
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
                         attrs={k: [["tt.divisibility", 16]] for k in ("W", "S", "X", "Y", "K", "stride_w", "stride_s", "stride_x", "stride_y")})
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


if __name__ == "__main__":
    import sys
    for bk in [int(a) for a in sys.argv[1:]] or [64, 128]:
        report(bk)
