"""Probe of the next lead for M = 9..16 in NOTES_nvfp4.md (seventh and eighth rounds): can a
warpgroup MMA take the NVFP4 weight, decoded in registers, as its A operand, with x^T in shared
memory as B? Outcome (eighth round, H100): correct, but its best variant per shape and M took
1.14-1.41x the library kernel's time; not integrated.

Per 64-row block and K step of BK, one warpgroup:

- the packed weight is stored thread-major: thread (warp w, lane 4 lr + q) reads BK/16
  consecutive 32-bit words (16-byte loads), word c holding four bf16 pairs (h, g) = the K pair
  c*8 + g*4 + q of row w*16 + h*8 + lr, its code bits placed as in the library's tile order
  (``_TILE_BITS``); the E4M3 scales likewise, one 16-bit pair (rows h = 0, 1) per word;
- the library's tile-order decode (inline asm: shifts, masks and one bf16x2 multiply per pair,
  two scales per word) gives eight bf16 per word; reshapes and a permute carry them into the A
  operand's layout with no data movement (these are exactly the K positions a thread holds, so
  x needs no permutation);
- ``HGMMA.64x16x16`` multiplies them with x^T (16 columns) from shared memory.

Kernels: ``probe`` (x through registers and a plain store, split-K partials summed by torch,
optionally two warpgroups sharing x), ``probe2`` (a loop-carried ring of AHEAD steps),
``probe3`` (x by TMA into a ring of shared-memory slots, split-K summed in the kernel),
``probe4`` (the program's whole slice of x loaded by TMA once). ``pack`` writes a weight in this
order; ``--check`` verifies on the CPU that the decode's shifts and masks, emulated in PyTorch
(``emulate``, a hand copy of DECODE), give back the dequantized weight exactly at the positions
the kernel's reshapes assign.

    python benchmarks/experiments/nvfp4_wgmma_probe.py [BK ...]      # compile for sm_90, report
    python benchmarks/experiments/nvfp4_wgmma_probe.py --check       # CPU packing check
    PYTHONPATH=. python benchmarks/experiments/nvfp4_wgmma_probe.py --gpu          # probe
    PYTHONPATH=. python benchmarks/experiments/nvfp4_wgmma_probe.py --check-gpu    # probe2/3 errors
    PYTHONPATH=. python benchmarks/experiments/nvfp4_wgmma_probe.py --gpu3 [quick] # probe3
    PYTHONPATH=. python benchmarks/experiments/nvfp4_wgmma_probe.py --gpu4         # probe4
    PYTHONPATH=. python benchmarks/experiments/nvfp4_wgmma_probe.py --profile      # for ncu
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait, fence_async_shared
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon._runtime import GluonASTSource
from triton.backends.compiler import GPUTarget

from rewriter.kernels.nvfp4 import _MMA_DECODE_TILE_BF16_PTX, _MMA_SCALE_BF16_PTX

_SCALES = _MMA_SCALE_BF16_PTX.value  # two E4M3 scale bytes -> two bf16x2 pairs (s, s)

# The library's tile-order decode (word $4, one scale pair $5 -> pairs $0-$3), with its scale
# operand renamed for the probe's pack=8 operand numbering (arguments word, s0, s1 at $4, $12,
# $20) and two scales per word: pairs 0 and 1 (row h = 0) take s0, pairs 2 and 3 (h = 1) s1.
DECODE = re.sub(r"mul\.rn\.bf16x2 \$([0-3]), a, \$5;",
                lambda m: f"mul.rn.bf16x2 ${m.group(1)}, a, {'$12' if m.group(1) in '01' else '$20'};",
                _MMA_DECODE_TILE_BF16_PTX.value)
assert DECODE.count("$12") == 2 and DECODE.count("$20") == 2 and "$5" not in DECODE


@gluon.jit
def _rep8(t, BK: gl.constexpr, WG: gl.constexpr):
    t = gl.join(t, t)
    t = gl.join(t, t)
    t = gl.join(t, t)
    return t.reshape([32 * WG, 4, BK // 16, 8])


@gluon.jit
def _operand(wd, sbytes, BK: gl.constexpr, WG: gl.constexpr, ASM: gl.constexpr,
             SCALES: gl.constexpr, a_layout: gl.constexpr):
    """The A operand [64 WG, BK] of one step from its words and scale pairs."""
    s0, s1 = gl.inline_asm_elementwise(SCALES, "=&r,=&r,r", [sbytes.to(gl.int32)],
                                       dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
    d = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r," + "r," * 23 + "r",
                                  [_rep8(wd, BK, WG), _rep8(s0, BK, WG), _rep8(s1, BK, WG)],
                                  dtype=gl.bfloat16, is_pure=True, pack=8)
    d = d.reshape([4 * WG, 8, 4, BK // 16, 2, 2, 2]).permute((0, 4, 1, 3, 5, 2, 6))
    return gl.convert_layout(d.reshape([64 * WG, BK]), a_layout)


@gluon.jit
def _word_offsets(BK: gl.constexpr, WG: gl.constexpr):
    """Per-thread offsets of the words and scales of one K step of a block of 64 WG rows.
    Words: thread (r' = w*8 + lr, q) reads BK/16 consecutive words, word c holding pairs (h, g) =
    K pair c*8 + g*4 + q of row w*16 + h*8 + lr. Scales: per (r', c) one int16 holding the E4M3
    scale bytes of rows h = 0, 1; the four lanes of a quad read the same bytes."""
    w_layout: gl.constexpr = gl.BlockedLayout([1, 1, BK // 16], [8, 4, 1], [4 * WG, 1, 1], [2, 1, 0])
    wr = gl.arange(0, 32 * WG, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
    wq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout)))
    wc = gl.arange(0, BK // 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    r3 = gl.expand_dims(gl.expand_dims(wr, 1), 2)
    q3 = gl.expand_dims(gl.expand_dims(wq, 0), 2)
    c3 = gl.expand_dims(gl.expand_dims(wc, 0), 1)
    return (r3 * 4 + q3) * (BK // 16) + c3, r3 * (BK // 16) + q3 * 0 + c3


@gluon.jit
def probe(W, S, X, Y, GS, M, N, K, stride_x, BK: gl.constexpr, M16: gl.constexpr,
          SPLIT: gl.constexpr, PREFETCH: gl.constexpr, WG: gl.constexpr, ASM: gl.constexpr,
          SCALES: gl.constexpr):
    """WG warpgroups per 64 WG rows of W (sharing x's tile) and 1/SPLIT of K. SPLIT == 1: Y is the bf16 (M, N) output;
    else the fp32 (SPLIT, M, N) partial sums. PREFETCH: the next step's words and scales are
    loaded before this step's decode."""
    pid = gl.program_id(0)
    pk = gl.program_id(1)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1], instr_shape=[16, M16, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, WG], [1, 0])
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M16, BK], gl.bfloat16)
    woff, soff = _word_offsets(BK, WG)
    xr = gl.arange(0, M16, layout=gl.SliceLayout(1, x_layout))
    xc = gl.arange(0, BK, layout=gl.SliceLayout(0, x_layout))
    acc = gl.zeros([64 * WG, M16], gl.float32, acc_layout)
    x_s = gl.allocate_shared_memory(gl.bfloat16, [M16, BK], x_smem_layout)
    steps = K // BK // SPLIT
    first = pid * (K // BK) + pk * steps  # this program's first step in the packed order
    wd = gl.load(W + first * (64 * WG * BK // 8) + woff)
    sb = gl.load(S + first * (32 * WG * BK // 16) + soff)
    for i in range(steps):
        if PREFETCH:
            nxt = first + gl.minimum(i + 1, steps - 1)
            wd_next = gl.load(W + nxt * (64 * WG * BK // 8) + woff)
            sb_next = gl.load(S + nxt * (32 * WG * BK // 16) + soff)
        else:
            cur = first + i
            wd = gl.load(W + cur * (64 * WG * BK // 8) + woff)
            sb = gl.load(S + cur * (32 * WG * BK // 16) + soff)
        a = _operand(wd, sb, BK, WG, ASM, SCALES, a_layout)
        k0 = (pk * steps + i) * BK
        xt = gl.load(X + gl.expand_dims(xr, 1) * stride_x + gl.expand_dims(k0 + xc, 0),
                     mask=gl.expand_dims(xr < M, 1), other=0.0)
        gl.thread_barrier()
        x_s.store(xt)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(a, x_s.permute((1, 0)), acc, is_async=True)
        acc, _ = warpgroup_mma_wait(0, deps=[acc, x_s])
        if PREFETCH:
            wd = wd_next
            sb = sb_next
    yr = pid * 64 * WG + gl.arange(0, 64 * WG, layout=gl.SliceLayout(1, acc_layout))
    yc = gl.arange(0, M16, layout=gl.SliceLayout(0, acc_layout))
    # The decode leaves every product 2^-26 small (bit placement 2^-126, scales 2^100).
    out = acc * (gl.load(GS) * 67108864.0)
    offs = gl.expand_dims(yc, 0) * N + gl.expand_dims(yr, 1)
    mask = gl.expand_dims(yc < M, 0)
    if SPLIT == 1:
        gl.store(Y + offs, out.to(gl.bfloat16), mask=mask)
    else:
        gl.store(Y + pk * M * N + offs, out, mask=mask)



@gluon.jit
def _step_loads(W, S, X, step, k0, woff, soff, xoffs, xmask, BK: gl.constexpr):
    """One step's words, scale pairs and x tile (registers)."""
    wd, sb = _word_loads(W, S, step, woff, soff, BK)
    xt = gl.load(X + xoffs + k0, mask=xmask, other=0.0)
    return wd, sb, xt


@gluon.jit
def probe2(W, S, X, Y, WS, CNT, GS, M, N, K, stride_x, BK: gl.constexpr, M16: gl.constexpr,
           SPLIT: gl.constexpr, AHEAD: gl.constexpr, WAIT: gl.constexpr, ASM: gl.constexpr,
           SCALES: gl.constexpr):
    """The probe with its loads pipelined: a loop-carried ring of AHEAD steps (words, scales and
    x's tile in registers), x's tile stored into one of two shared-memory buffers per step, the
    warpgroup MMA left in flight (WAIT = 1 outstanding) while the next step decodes, and split-K
    summed in the kernel: each of the SPLIT programs of a row block writes fp32 partials to WS,
    counts itself in on CNT, and the last one sums them and stores the output."""
    pid = gl.program_id(0)
    pk = gl.program_id(1)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M16, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M16, BK], gl.bfloat16)
    woff, soff = _word_offsets(BK, 1)
    xr = gl.arange(0, M16, layout=gl.SliceLayout(1, x_layout))
    xc = gl.arange(0, BK, layout=gl.SliceLayout(0, x_layout))
    xoffs = gl.expand_dims(xr, 1) * stride_x + gl.expand_dims(xc, 0)
    xmask = gl.expand_dims(xr < M, 1) & gl.expand_dims(xc < BK, 0)
    acc = gl.zeros([64, M16], gl.float32, acc_layout)
    x_s = gl.allocate_shared_memory(gl.bfloat16, [2, M16, BK], x_smem_layout)
    steps = K // BK // SPLIT
    last = steps - 1
    first = pid * (K // BK) + pk * steps
    kfirst = pk * steps * BK
    ring = ()
    for j in gl.static_range(AHEAD):
        jj = gl.minimum(last, j)
        ring = ring + (_step_loads(W, S, X, first + jj, kfirst + jj * BK, woff, soff, xoffs, xmask, BK),)
    for i in range(steps):
        nj = gl.minimum(i + AHEAD, last)
        new = _step_loads(W, S, X, first + nj, kfirst + nj * BK, woff, soff, xoffs, xmask, BK)
        wd, sb, xt = ring[0]
        a = _operand(wd, sb, BK, 1, ASM, SCALES, a_layout)
        buf = x_s.index(i % 2)
        buf.store(xt)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(a, buf.permute((1, 0)), acc, is_async=True)
        acc, _ = warpgroup_mma_wait(WAIT, deps=[acc, x_s])
        ring = ring[1:] + (new,)
    acc, _ = warpgroup_mma_wait(0, deps=[acc, x_s])
    _split_epilogue(acc, acc_layout, Y, WS, CNT, GS, M, N, pid, pk, M16, SPLIT)


def compile_probe2(BK, SPLIT=1, AHEAD=2, WAIT=1):
    sig = {"W": "*i32", "S": "*i16", "X": "*bf16", "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
           "GS": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_x": "i32",
           "BK": "constexpr", "M16": "constexpr", "SPLIT": "constexpr", "AHEAD": "constexpr",
           "WAIT": "constexpr", "ASM": "constexpr", "SCALES": "constexpr"}
    src = GluonASTSource(probe2, sig, constexprs={"BK": BK, "M16": 16, "SPLIT": SPLIT,
                                                  "AHEAD": AHEAD, "WAIT": WAIT, "ASM": DECODE,
                                                  "SCALES": _SCALES},
                         attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9, 10)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})



@gluon.jit
def _word_loads(W, S, step, woff, soff, BK: gl.constexpr):
    return gl.load(W + step * (64 * BK // 8) + woff), gl.load(S + step * (32 * BK // 16) + soff)


@gluon.jit
def _split_epilogue(acc, acc_layout: gl.constexpr, Y, WS, CNT, GS, M, N, pid, pk, M16: gl.constexpr,
                    SPLIT: gl.constexpr):
    """Store (SPLIT == 1), or write fp32 partials, count in, and let the last program sum."""
    yr = pid * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    yc = gl.arange(0, M16, layout=gl.SliceLayout(0, acc_layout))
    out = acc * (gl.load(GS) * 67108864.0)
    offs = gl.expand_dims(yc, 0) * N + gl.expand_dims(yr, 1)
    mask = gl.expand_dims(yc < M, 0) & gl.expand_dims(yr < N, 1)
    if SPLIT == 1:
        gl.store(Y + offs, out.to(gl.bfloat16), mask=mask)
    else:
        gl.store(WS + pk * M * N + offs, out, mask=mask)
        # One fence per thread (a tensor with one element per thread), then one count per program.
        one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r",
                                  [gl.arange(0, 128, layout=one)], dtype=gl.int32, is_pure=False,
                                  pack=1)
        gl.thread_barrier()
        arrived = gl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = gl.zeros([64, M16], gl.float32, acc_layout)
            for sp in gl.static_range(SPLIT):  # unrolled: every partial's load in flight at once
                total += gl.load(WS + sp * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(Y + offs, total.to(gl.bfloat16), mask=mask)
            gl.thread_barrier()
            gl.atomic_xchg(CNT + pid, 0, sem="relaxed", scope="gpu")


@gluon.jit
def probe3(W, S, x_desc, Y, WS, CNT, GS, M, N, K, BK: gl.constexpr, M16: gl.constexpr,
           SPLIT: gl.constexpr, AHEAD: gl.constexpr, NS: gl.constexpr, ASM: gl.constexpr,
           SCALES: gl.constexpr, WAIT: gl.constexpr = 1):
    """WAIT: 0 = each MMA waited for at once; 1 = one left in flight; 2 = one left in flight with
    its register operand kept live (a dependency of the next wait).

    probe2 with x's tiles brought by TMA into a ring of NS shared-memory slots (NS - 2 steps
    ahead; a slot is refilled once the MMA two steps back, which read it, has completed), so x
    takes no registers and no instructions in the K loop; the words and scales keep their
    register ring of AHEAD steps."""
    pid = gl.program_id(0)
    pk = gl.program_id(1)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M16, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    woff, soff = _word_offsets(BK, 1)
    XA: gl.constexpr = NS - 2
    x_s = gl.allocate_shared_memory(gl.bfloat16, [NS, M16, BK], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NS):
        mbarrier.init(bars.index(j), count=1)
    fence_async_shared()
    gl.thread_barrier()  # every warp sees the barriers initialized before any waits on them
    acc = gl.zeros([64, M16], gl.float32, acc_layout)
    steps = K // BK // SPLIT
    last = steps - 1
    first = pid * (K // BK) + pk * steps
    kfirst = pk * steps * BK
    for j in gl.static_range(XA):
        if j < steps:
            mbarrier.expect(bars.index(j), x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [0, kfirst + j * BK], bars.index(j), x_s.index(j))
    ring = ()
    for j in gl.static_range(AHEAD):
        ring = ring + (_word_loads(W, S, first + gl.minimum(last, j), woff, soff, BK),)
    a_prev = gl.zeros([64, BK], gl.bfloat16, a_layout)
    for i in range(steps):
        if i + XA < steps:
            nx = (i + XA) % NS
            mbarrier.expect(bars.index(nx), x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [0, kfirst + (i + XA) * BK], bars.index(nx),
                                            x_s.index(nx))
        new = _word_loads(W, S, first + gl.minimum(i + AHEAD, last), woff, soff, BK)
        wd, sb = ring[0]
        a = _operand(wd, sb, BK, 1, ASM, SCALES, a_layout)
        slot = i % NS
        mbarrier.wait(bars.index(slot), (i // NS) & 1)
        acc = warpgroup_mma(a, x_s.index(slot).permute((1, 0)), acc, is_async=True)
        if WAIT == 0:
            acc, _ = warpgroup_mma_wait(0, deps=[acc, x_s])
        elif WAIT == 1:
            acc, _ = warpgroup_mma_wait(1, deps=[acc, x_s])
        else:
            acc, _, _ = warpgroup_mma_wait(1, deps=[acc, x_s, a_prev])
            a_prev = a
        ring = ring[1:] + (new,)
    if WAIT == 2:
        acc, _, _ = warpgroup_mma_wait(0, deps=[acc, x_s, a_prev])
    else:
        acc, _ = warpgroup_mma_wait(0, deps=[acc, x_s])
    for j in gl.static_range(NS):
        mbarrier.invalidate(bars.index(j))
    _split_epilogue(acc, acc_layout, Y, WS, CNT, GS, M, N, pid, pk, M16, SPLIT)


def compile_probe3(BK, SPLIT=1, AHEAD=2, NS=4, WAIT=1):
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401 (signature only)
    layout = gl.NVMMASharedLayout.get_default_for([16, BK], gl.bfloat16)
    sig = {"W": "*i32", "S": "*i16", "x_desc": f"tensordesc<bf16[16, {BK}],{layout!r}>",
           "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
           "GS": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "BK": "constexpr", "M16": "constexpr", "SPLIT": "constexpr", "AHEAD": "constexpr",
           "NS": "constexpr", "ASM": "constexpr", "SCALES": "constexpr", "WAIT": "constexpr"}
    src = GluonASTSource(probe3, sig, constexprs={"BK": BK, "M16": 16, "SPLIT": SPLIT,
                                                  "AHEAD": AHEAD, "NS": NS, "ASM": DECODE,
                                                  "SCALES": _SCALES, "WAIT": WAIT},
                         attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 5, 6, 8, 9)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})



@gluon.jit
def probe4(W, S, x_desc, Y, WS, CNT, GS, M, N, K, BK: gl.constexpr, M16: gl.constexpr,
           SPLIT: gl.constexpr, AHEAD: gl.constexpr, KSTEPS: gl.constexpr, ASM: gl.constexpr,
           SCALES: gl.constexpr):
    """probe3 without per-step barriers: the program's whole slice of x (KSTEPS = K / BK / SPLIT
    tiles) comes in by TMA at the start, on one mbarrier, and stays in shared memory; the K loop
    is then words (register ring of AHEAD steps), decode, MMA and its wait, nothing else."""
    pid = gl.program_id(0)
    pk = gl.program_id(1)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M16, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    woff, soff = _word_offsets(BK, 1)
    x_s = gl.allocate_shared_memory(gl.bfloat16, [KSTEPS, M16, BK], x_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    fence_async_shared()
    gl.thread_barrier()
    first = pid * (K // BK) + pk * KSTEPS
    kfirst = pk * KSTEPS * BK
    mbarrier.expect(bar, KSTEPS * x_desc.block_type.nbytes)
    for j in gl.static_range(KSTEPS):
        tma.async_copy_global_to_shared(x_desc, [0, kfirst + j * BK], bar, x_s.index(j))
    acc = gl.zeros([64, M16], gl.float32, acc_layout)
    ring = ()
    for j in gl.static_range(AHEAD):
        ring = ring + (_word_loads(W, S, first + min(KSTEPS - 1, j), woff, soff, BK),)
    mbarrier.wait(bar, 0)
    for i in range(KSTEPS):
        new = _word_loads(W, S, first + gl.minimum(i + AHEAD, KSTEPS - 1), woff, soff, BK)
        wd, sb = ring[0]
        a = _operand(wd, sb, BK, 1, ASM, SCALES, a_layout)
        acc = warpgroup_mma(a, x_s.index(i).permute((1, 0)), acc, is_async=True)
        acc, _ = warpgroup_mma_wait(0, deps=[acc, x_s])
        ring = ring[1:] + (new,)
    mbarrier.invalidate(bar)
    _split_epilogue(acc, acc_layout, Y, WS, CNT, GS, M, N, pid, pk, M16, SPLIT)


def compile_probe4(BK, K, SPLIT=4, AHEAD=2):
    layout = gl.NVMMASharedLayout.get_default_for([16, BK], gl.bfloat16)
    sig = {"W": "*i32", "S": "*i16", "x_desc": f"tensordesc<bf16[16, {BK}],{layout!r}>",
           "Y": "*bf16", "WS": "*fp32", "CNT": "*i32",
           "GS": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "BK": "constexpr", "M16": "constexpr", "SPLIT": "constexpr", "AHEAD": "constexpr",
           "KSTEPS": "constexpr", "ASM": "constexpr", "SCALES": "constexpr"}
    src = GluonASTSource(probe4, sig, constexprs={"BK": BK, "M16": 16, "SPLIT": SPLIT,
                                                  "AHEAD": AHEAD, "KSTEPS": K // BK // SPLIT,
                                                  "ASM": DECODE, "SCALES": _SCALES},
                         attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 5, 6, 8, 9)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_probe(BK, SPLIT=1, PREFETCH=0, WG=1):
    sig = {"W": "*i32", "S": "*i16", "X": "*bf16", "Y": "*bf16" if SPLIT == 1 else "*fp32",
           "GS": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_x": "i32",
           "BK": "constexpr", "M16": "constexpr", "SPLIT": "constexpr", "PREFETCH": "constexpr",
           "WG": "constexpr", "ASM": "constexpr", "SCALES": "constexpr"}
    src = GluonASTSource(probe, sig, constexprs={"BK": BK, "M16": 16, "SPLIT": SPLIT,
                                                 "PREFETCH": PREFETCH, "WG": WG, "ASM": DECODE,
                                                 "SCALES": _SCALES},
                         attrs={(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 6, 7, 8)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4 * WG})


def report(BK, SPLIT=1, PREFETCH=0, WG=1, kernel=None, label=None):
    k = kernel or compile_probe(BK, SPLIT, PREFETCH, WG)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    instr = [line.split()[1] for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/\s+\S", line)]
    ops = collections.Counter(op.split(".")[0].rstrip(";") for op in instr)
    print((label or f"BK = {BK}, SPLIT = {SPLIT}, PREFETCH = {PREFETCH}, WG = {WG}") + ": " + " ".join(w for w in usage.split() if w.startswith(("REG", "LOCAL", "STACK"))),
          "| instructions", len(instr))
    print("  MMA:", sorted({op for op in instr if "GMMA." in op}))
    print("  SASS mix:", ", ".join(f"{n} {c}" for n, c in ops.most_common(14)))
    mem = collections.Counter(line.split()[0] for line in k.asm["ptx"].splitlines()
                              if re.match(r"\s*(ld|st)\.(global|shared)", line))
    print("  PTX memory:", dict(mem))
    # The K loop: the instructions between a backward branch and its target.
    lines = [line for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/\s+\S", line)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    for line, at in zip(lines, addr):
        target = re.search(r"BRA 0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < at:
            body = [op for op, a in zip(instr, addr) if int(target.group(1), 16) <= a <= at]
            per_thread = 64 * BK // 128  # weights a thread decodes per step
            print(f"  K loop: {len(body)} instructions per step, {len(body) / per_thread:.2f} per "
                  f"weight; " + ", ".join(f"{n} {c}" for n, c in collections.Counter(
                      op.split(".")[0] for op in body).most_common(8)))
    return sass


def pack(w, BK, WG=1):
    """(words, scales) of an NVFP4Weight in row order, in the order the probe kernel reads:
    int32 words [N/64WG, K/BK, 32WG r', 4 q, BK/16 c] (bytes (h, g) of word c: the K pair
    c*8 + g*4 + q of row w*16 + h*8 + lr, r' = w*8 + lr, bits placed by _TILE_BITS) and int16
    scale pairs [N/64WG, K/BK, 32WG r', BK/16 c] (low byte row h = 0, high byte h = 1)."""
    import torch
    from rewriter.kernels import nvfp4 as nv
    n, k = w.shape
    b = w.packed.reshape(n // (64 * WG), 4 * WG, 2, 8, k // BK, BK // 16, 2, 4)  # b, w, h, lr, s, c, g, q
    b = b.permute(0, 4, 1, 3, 7, 5, 2, 6).contiguous()  # b, s, w, lr, q, c, h, g
    words = nv._permute_words(b.reshape(-1, 4), nv._TO_TILE_TABLES).view(torch.int32)
    sc = w.scales.view(torch.uint8).reshape(n // (64 * WG), 4 * WG, 2, 8, k // BK, BK // 16)  # b, w, h, lr, s, c
    sc = sc.permute(0, 4, 1, 3, 5, 2).contiguous()  # b, s, w, lr, c, h
    return words.reshape(-1), sc.view(torch.int16).reshape(-1)


def emulate(words, scales, n, k, BK, WG=1):
    """The (N, K) matrix of A operands the probe kernel multiplies, from ``pack``'s output, with
    its decode (the shifts and masks of DECODE) done here in int64 and the bf16 patterns read as
    floats; scaled by 2^126 (the bit placement's offset) and by the E4M3 scales."""
    import torch
    wd = words.to(torch.int64) & 0xFFFFFFFF
    m = 0x81C081C0
    pairs = [wd & m, (wd << 3) & m, (wd << 6) & m,
             ((wd << 1) & 0x80008000) | ((wd >> 3) & 0x01800180) | ((wd >> 7) & 0x00400040)]
    halves = [(a >> sh) & 0xFFFF for a in pairs for sh in (0, 16)]  # elements 0..7 of each word
    vals = torch.stack([(h << 16).to(torch.int32).view(torch.float32) for h in halves], -1)
    vals = vals * 2.0 ** 126
    sb = scales.view(torch.uint8).reshape(-1, 2)  # per word: rows h = 0, 1
    sv = sb.view(torch.float8_e4m3fn).to(torch.float32)
    vals = vals.reshape(n // (64 * WG), k // BK, 4 * WG, 8, 4, BK // 16, 2, 2, 2)  # b, s, w, lr, q, c, h, g, e
    sv = sv.reshape(n // (64 * WG), k // BK, 4 * WG, 8, BK // 16, 2)  # b, s, w, lr, c, h
    vals = vals * sv[:, :, :, :, None, :, :, None, None]
    return vals.permute(0, 2, 6, 3, 1, 5, 7, 4, 8).reshape(n, k)  # b, w, h, lr | s, c, g, q, e


def check(n=256, k=512, BK=128, WG=1):
    """On the CPU: pack a random weight for the probe's order and check that the emulated decode
    gives back the dequantized weight exactly (the global scale applied the same way)."""
    import torch
    from rewriter.kernels import nvfp4 as nv
    torch.manual_seed(0)
    w = nv.pack_nvfp4(torch.randn(n, k) * torch.logspace(-3, 3, k)[None, :])
    words, scales = pack(w, BK, WG)
    got = emulate(words, scales, n, k, BK, WG) * w.global_scale.to(torch.float32)
    want = nv.unpack_nvfp4(w)
    ok = torch.equal(got, want)
    print(f"packing check N={n} K={k} BK={BK} WG={WG}: {'exact' if ok else 'MISMATCH'}"
          f" (max abs diff {(got - want).abs().max().item():.3g})")
    return ok


def linear(x, words, scales, global_scale, n, BK=128, SPLIT=1, PREFETCH=0, WG=1):
    """``x @ W^T`` (x: (M <= 16, K) bf16) with the probe kernel, W packed by ``pack``; with
    SPLIT > 1 the partial sums are added by a second kernel (torch's sum)."""
    import torch
    m, k = x.shape
    assert m <= 16 and n % (64 * WG) == 0 and k % (BK * SPLIT) == 0 and x.stride(1) == 1
    if SPLIT == 1:
        y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    else:
        y = torch.empty(SPLIT, m, n, device=x.device, dtype=torch.float32)
    probe[(n // (64 * WG), SPLIT)](words, scales, x, y, global_scale, m, n, k, x.stride(0),
                                   BK=BK, M16=16, SPLIT=SPLIT, PREFETCH=PREFETCH, WG=WG,
                                   ASM=DECODE, SCALES=_SCALES, num_warps=4 * WG)
    return y if SPLIT == 1 else y.sum(0).to(torch.bfloat16)


VARIANTS = [(bk, split, pre, wg) for wg in (1, 2) for bk in (64, 128) for split in (1, 2, 4, 8)
            for pre in (0, 1)]


def _graph_us(fn, copies):
    """GPU time per call of ``fn(i)``, i = 0..copies-1 (one call per weight copy, so the weights
    come from device memory), in us: the library's back-to-back timing (one CUDA graph of all the
    calls, median of 10 replays)."""
    import functools
    from rewriter.kernels import nvfp4 as nv
    return nv.back_to_back_ms([functools.partial(fn, i) for i in range(copies)]) * 1e3


def _device_line():
    """Prints the device and its L2 size; returns the L2 size in bytes."""
    import torch
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(torch.cuda.get_device_name(), "L2", l2 >> 20, "MB")
    return l2


def _shape(k, n, pack_keys, l2, scale_bytes=False):
    """What every timing run sets up for one weight shape: a bf16 linear and its NVFP4 weight,
    the probe's packings for ``pack_keys`` ((BK, WG) pairs) and copies of them, the float64
    reference weight, the library module, and enough copies of each weight to pass 3x the L2
    (counting the scale bytes with ``scale_bytes``)."""
    import types
    import torch
    from rewriter.kernels import nvfp4 as nv
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    w = nv.pack_nvfp4(lin.weight.float())
    cpu_w = nv.NVFP4Weight(w.packed.cpu(), w.scales.cpu(), w.global_scale.cpu(), w.shape)
    packs = {key: tuple(t.cuda() for t in pack(cpu_w, *key)) for key in pack_keys}
    words, scales = next(iter(packs.values()))
    nb = words.numel() * 4 + (scales.numel() * 2 if scale_bytes else 0)
    c4 = max(2, -(-3 * l2 // nb))
    cbf = max(2, -(-3 * l2 // (n * k * 2)))
    return types.SimpleNamespace(
        w=w, packs=packs, ref_w=nv.unpack_nvfp4(w).double(), lib=nv.NVFP4Linear.from_linear(lin),
        c4=c4, cbf=cbf,
        copies={key: [(a.clone(), b.clone()) for _ in range(c4)] for key, (a, b) in packs.items()},
        bc=[lin.weight.detach().clone() for _ in range(cbf)],
        lc=[nv.NVFP4Linear.from_linear(lin) for _ in range(c4)])


def _library(s, x, ref, k, n, m, timed=True):
    """``(error, bf16 us, library us)`` at x (times None unless ``timed``, which also prints the
    shape's line)."""
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        lib_err = ((s.lib(x).double() - ref).norm() / ref.norm()).item()
        if not timed:
            return lib_err, None, None
        t_bf = _graph_us(lambda i: F.linear(x, s.bc[i]), s.cbf)
        t_lib = _graph_us(lambda i: s.lc[i](x), s.c4)
    print(f"K={k} N={n} M={m}: us bf16 {t_bf:.1f}, library NVFP4 {t_lib:.1f} "
          f"({t_bf / t_lib:.2f}x, rel. error {lib_err:.2e})", flush=True)
    return lib_err, t_bf, t_lib


def run_gpu(shapes=((4096, 14336), (14336, 4096), (4096, 4096)), ms=(1, 4, 8, 16),
            variants=VARIANTS):
    """On a GPU: the probe against the float64 reference, then GPU time back to back (one CUDA
    graph with one call per weight copy, copies >= 3x L2, median of 10 replays) against bf16
    F.linear and the library's NVFP4Linear, all in this process."""
    import torch

    l2 = _device_line()
    for k, n in shapes:
        s = _shape(k, n, list(dict.fromkeys((bk, wg) for bk, _, _, wg in variants)), l2,
                   scale_bytes=True)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ s.ref_w.T
            lib_err, t_bf, t_lib = _library(s, x, ref, k, n, m)
            for bk, split, pre, wg in variants:
                if k % (bk * split):
                    continue
                key = (bk, wg)
                with torch.no_grad():
                    y = linear(x, *s.packs[key], s.w.global_scale, n, bk, split, pre, wg)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    t = _graph_us(lambda i: linear(x, *s.copies[key][i], s.w.global_scale, n, bk,
                                                   split, pre, wg), s.c4)
                print(f"    probe WG={wg} BK={bk} split={split} prefetch={pre}: {t:.1f} us "
                      f"({t_bf / t:.2f}x bf16, {t_lib / t:.2f}x library), rel. error {err:.2e}",
                      flush=True)



_CNT = {}


def _buffers(x, n, BK, SPLIT):
    """For the in-kernel split-K probes: checks x and the shape, then ``(m, k, y, ws, cnt)``: the
    bf16 output, the fp32 split partials (``y`` when unsplit) and the row blocks' counters (one
    zeroed set per N, which the kernels leave at zero)."""
    import torch
    m, k = x.shape
    assert m <= 16 and n % 64 == 0 and k % (BK * SPLIT) == 0 and x.stride(1) == 1
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws = torch.empty(SPLIT, m, n, device=x.device, dtype=torch.float32) if SPLIT > 1 else y
    cnt = _CNT.get(n)
    if cnt is None:
        cnt = _CNT[n] = torch.zeros(n // 64, device=x.device, dtype=torch.int32)
    return m, k, y, ws, cnt


def _x_desc(x, BK):
    """TMA descriptor of x in 16 x BK tiles."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    layout = gl.NVMMASharedLayout.get_default_for([16, BK], gl.bfloat16)
    return TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [16, BK], layout)


def linear3(x, words, scales, global_scale, n, BK=128, SPLIT=1, AHEAD=2, NS=4, WAIT=1):
    """``x @ W^T`` with probe3 (W packed by ``pack(w, BK)``); split-K summed in the kernel."""
    m, k, y, ws, cnt = _buffers(x, n, BK, SPLIT)
    desc = _x_desc(x, BK)
    probe3[(n // 64, SPLIT)](words, scales, desc, y, ws, cnt, global_scale, m, n, k, BK=BK, M16=16,
                             SPLIT=SPLIT, AHEAD=AHEAD, NS=NS, ASM=DECODE, SCALES=_SCALES,
                             WAIT=WAIT, num_warps=4)
    return y


def linear2(x, words, scales, global_scale, n, BK=128, SPLIT=1, AHEAD=2, WAIT=1):
    """``x @ W^T`` with probe2 (x's tiles through registers); split-K summed in the kernel."""
    m, k, y, ws, cnt = _buffers(x, n, BK, SPLIT)
    probe2[(n // 64, SPLIT)](words, scales, x, y, ws, cnt, global_scale, m, n, k, x.stride(0),
                             BK=BK, M16=16, SPLIT=SPLIT, AHEAD=AHEAD, WAIT=WAIT, ASM=DECODE,
                             SCALES=_SCALES, num_warps=4)
    return y


def check_gpu2():
    """probe2 and probe3 against float64 at a small and a real shape (error only)."""
    import torch
    from rewriter.kernels import nvfp4 as nv
    for k, n in ((512, 128), (4096, 4096)):
        torch.manual_seed(0)
        wt = torch.randn(n, k, device="cuda")
        w = nv.pack_nvfp4(wt)
        cpu_w = nv.NVFP4Weight(w.packed.cpu(), w.scales.cpu(), w.global_scale.cpu(), w.shape)
        ref_w = nv.unpack_nvfp4(w).double()
        for bk in (64, 128):
            words, scales = (t.cuda() for t in pack(cpu_w, bk))
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ ref_w.T
                res = {"v1": linear(x, words, scales, w.global_scale, n, bk)}
                for split in (1, 2):
                    for wait in (0, 1):
                        res[f"probe2 split={split} wait={wait}"] = linear2(
                            x, words, scales, w.global_scale, n, bk, split, 2, wait)
                        res[f"probe3 split={split} wait={wait}"] = linear3(
                            x, words, scales, w.global_scale, n, bk, split, 2, 4, wait)
                for name, y in res.items():
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    bad = (y.double() - ref).abs() > 0.05 * ref.abs().max()
                    where = bad.nonzero()[:4].tolist() if bad.any() else ""
                    print(f"K={k} N={n} BK={bk} M={m} {name}: rel. error {err:.2e} {where}",
                          flush=True)


def linear4(x, words, scales, global_scale, n, BK=128, SPLIT=4, AHEAD=2):
    """``x @ W^T`` with probe4 (x's whole slice in shared memory)."""
    m, k, y, ws, cnt = _buffers(x, n, BK, SPLIT)
    desc = _x_desc(x, BK)
    probe4[(n // 64, SPLIT)](words, scales, desc, y, ws, cnt, global_scale, m, n, k, BK=BK, M16=16,
                             SPLIT=SPLIT, AHEAD=AHEAD, KSTEPS=k // BK // SPLIT, ASM=DECODE,
                             SCALES=_SCALES, num_warps=4)
    return y


def run_gpu4(shapes=((4096, 14336), (14336, 4096), (4096, 4096)), ms=(16, 1)):
    """probe4 on a GPU at M = 16 (and 8, 1): error against float64 and the library, GPU time back
    to back against bf16 F.linear and NVFP4Linear."""
    import torch

    l2 = _device_line()
    for k, n in shapes:
        s = _shape(k, n, [(64, 1), (128, 1)], l2)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ s.ref_w.T
            lib_err, t_bf, t_lib = _library(s, x, ref, k, n, m)
            for bk in (64, 128):
                for split in (2, 4, 8, 16):
                    if k % (bk * split) or (k // split) * 32 > 160 * 1024:
                        continue
                    for ahead in (2, 3):
                        with torch.no_grad():
                            y = linear4(x, *s.packs[bk, 1], s.w.global_scale, n, bk, split, ahead)
                            y2 = linear4(x, *s.packs[bk, 1], s.w.global_scale, n, bk, split, ahead)
                            err = ((y.double() - ref).norm() / ref.norm()).item()
                            same = torch.equal(y, y2)
                            t = _graph_us(lambda i: linear4(x, *s.copies[bk, 1][i],
                                                            s.w.global_scale, n, bk, split,
                                                            ahead), s.c4)
                        print(f"    probe4 BK={bk} split={split} ahead={ahead}: {t:.1f} us "
                              f"({t_bf / t:.2f}x bf16, {t_lib / t:.2f}x library), rel. error "
                              f"{err:.2e}" + ("" if same else " (SECOND CALL DIFFERS)"),
                              flush=True)


def profile_calls(k=4096, n=14336, m=16):
    """One call each (after a warm-up) of probe3 (BK 128, split 4, ahead 2, wait 0), probe4 (BK 128,
    split 4, ahead 2) and the library's NVFP4Linear, for Nsight Compute (``-k regex:probe|nvfp4``)."""
    import torch
    from rewriter.kernels import nvfp4 as nv
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    w = nv.pack_nvfp4(lin.weight.float())
    cpu_w = nv.NVFP4Weight(w.packed.cpu(), w.scales.cpu(), w.global_scale.cpu(), w.shape)
    words, scales = (t.cuda() for t in pack(cpu_w, 128))
    lib = nv.NVFP4Linear.from_linear(lin)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    calls = [lambda: linear3(x, words, scales, w.global_scale, n, 128, 4, 2, 4, 0),
             lambda: linear4(x, words, scales, w.global_scale, n, 128, 4, 2),
             lambda: lib(x)]
    with torch.no_grad():
        for c in calls:
            c()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for c in calls:
            c()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


VARIANTS3 = [(bk, split, ahead, ns, wait) for bk in (64, 128) for split in (1, 2, 4, 8)
             for ahead in (1, 2, 3) for ns in (4, 6) for wait in (0, 1, 2)]


def run_gpu3(shapes=((4096, 14336), (14336, 4096), (4096, 4096)), ms=(1, 8, 16),
             check_ms=(5, 13), variants=VARIANTS3):
    """probe3 on a GPU: error against float64 at every M (check_ms: error only), then GPU time
    back to back against bf16 F.linear and NVFP4Linear as in run_gpu."""
    import torch

    l2 = _device_line()
    worst = 0.0
    for k, n in shapes:
        s = _shape(k, n, [(bk, 1) for bk in sorted({v[0] for v in variants})], l2)
        for m in sorted(set(ms) | set(check_ms)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ s.ref_w.T
            timed = m in ms
            lib_err, t_bf, t_lib = _library(s, x, ref, k, n, m, timed)
            errs = []
            for bk, split, ahead, ns, wait in variants:
                if k % (bk * split):
                    continue
                with torch.no_grad():
                    y = linear3(x, *s.packs[bk, 1], s.w.global_scale, n, bk, split, ahead, ns,
                                wait)
                    y2 = linear3(x, *s.packs[bk, 1], s.w.global_scale, n, bk, split, ahead, ns,
                                 wait)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    errs.append(err)
                    same = torch.equal(y, y2)
                    if timed:
                        t = _graph_us(lambda i: linear3(x, *s.copies[bk, 1][i], s.w.global_scale,
                                                        n, bk, split, ahead, ns, wait), s.c4)
                if timed or err > 2 * lib_err or not same:
                    print(f"    probe3 BK={bk} split={split} ahead={ahead} NS={ns} wait={wait}: "
                          + (f"{t:.1f} us ({t_bf / t:.2f}x bf16, {t_lib / t:.2f}x library), "
                             if timed else "") + f"rel. error {err:.2e}"
                          + ("" if same else " (SECOND CALL DIFFERS)"), flush=True)
            worst = max([worst] + [e / lib_err for e in errs])
            if not timed:
                print(f"K={k} N={n} M={m}: library rel. error {lib_err:.2e}, probe3 max "
                      f"{max(errs):.2e} over {len(errs)} variants", flush=True)
    print(f"worst probe3 error / library error: {worst:.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gpu"]:
        run_gpu()
        sys.exit(0)
    if sys.argv[1:2] == ["--profile"]:
        profile_calls()
        sys.exit(0)
    if sys.argv[1:2] == ["--gpu4"]:
        run_gpu4()
        sys.exit(0)
    if sys.argv[1:2] == ["--check-gpu"]:
        check_gpu2()
        sys.exit(0)
    if sys.argv[1:2] == ["--gpu3"]:
        # --gpu3 [quick]: quick = a few variants at M = 16 of the large shapes only
        if sys.argv[2:3] == ["quick"]:
            run_gpu3(shapes=((4096, 14336), (14336, 4096), (4096, 4096)), ms=(16,),
                     check_ms=(1, 13), variants=[v for v in VARIANTS3 if v[2] in (2, 3)
                                                 and v[3] == 4 and v[1] in (2, 4, 8) and v[4] == 0])
        else:
            run_gpu3()
        sys.exit(0)
    if sys.argv[1:2] == ["--check"]:
        sys.exit(0 if all(check(BK=bk, WG=wg) for bk in (64, 128) for wg in (1, 2)) else 1)
    for bk in [int(a) for a in sys.argv[1:]] or [64, 128]:
        for split, pre, wg in ((1, 0, 1), (4, 1, 1), (4, 1, 2)):
            report(bk, split, pre, wg)
