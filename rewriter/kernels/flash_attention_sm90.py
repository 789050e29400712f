"""Hopper (sm_90) kernels for fused attention, written in Gluon with warp specialization.

What: the forward of :mod:`rewriter.kernels.flash_attention` (same inputs, same ``(out, lse)``
outputs, lse in natural-log units) for the common variants: plain, causal (either alignment),
sliding windows, ALiBi, with bf16 / fp16 inputs and head dims 64 and 128; and, for the same
variants, the two backward kernels: dQ (which also writes delta and the log2 lse) and dK/dV.
Each replaces its Triton twin where the caller's rule picks it; the Triton kernels keep
soft-capping, key padding and dropout.

Why: the Triton kernel runs one 8-warp program per SM whose two warpgroups move in lock step
(they share each K/V buffer through ``bar.sync``), so the tensor cores wait during the softmax and
the special-function unit waits during the products (benchmarks/NOTES_attention.md: the gap to
SDPA's causal forward is that serialization). Triton 3.6 does not warp-specialize that loop on
Hopper. Gluon lets the kernel say it itself: per program,

- one load warp issues TMA copies of the two 64-row halves of the query block and of every key
  and value block into a ring of shared-memory stages, each stage guarded by mbarriers (``ready``
  set by the copy's byte count, ``empty`` by the two consumers);
- two consumer warpgroups, each owning 64 query rows, run the online softmax: ``q k^T`` and
  ``p v`` as asynchronous warpgroup MMAs (``p`` stays in registers as the A operand), the
  softmax between them. The two warpgroups are independent instruction streams, so one's softmax
  runs while the other's MMAs occupy the tensor cores.

Registers are moved from the load warp to the consumers (``setmaxnreg``): the loader needs few.

Inputs are addressed through rank-4 TMA descriptors over ``(B, H, S, D)`` with the caller's
strides, so the transposed ``(B, S, H, D)`` layout of most models needs no copy; rows past the end
of a sequence read as zeros and keys past ``Skv`` are masked in the last block.
"""

import warnings
from typing import Optional

import torch

from . import _launch
from ._device import capability as _capability

try:  # Gluon ships with Triton >= 3.5; without it this module reports itself unavailable.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "supported", "attention_forward_sm90", "supported_backward",
           "attention_backward_dkdv_sm90", "attention_backward_dq_sm90", "disable",
           "disable_backward", "disable_dq"]

# Set when a launch failed: the caller then uses its Triton forward for the rest of the process.
DISABLED = None

_LOG2E = 1.4426950408889634
_HALF = 64  # query rows per consumer warpgroup (the wgmma M of one warpgroup)
_BLOCK_N = 128
_HEAD_DIMS = (64, 128)


if HAVE_GLUON:

    @gluon.jit
    def _kv_blocks(start_m, Sq, Skv, lo_off, hi_off, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """Key blocks of the query block at ``start_m``: [lo, flo) masked, [flo, fhi) unmasked,
        [fhi, hi) masked, as block indices (the same ranges as the Triton kernel's _kv_range)."""
        last_row = gl.minimum(start_m + BLOCK_M, Sq) - 1
        lo = 0
        hi = Skv
        full_lo = 0
        full_hi = Skv // BLOCK_N * BLOCK_N
        if HAS_LEFT:
            lo = gl.maximum(start_m + lo_off, 0) // BLOCK_N * BLOCK_N
            full_lo = (gl.maximum(last_row + lo_off, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        if HAS_RIGHT:
            hi = gl.minimum(gl.maximum(last_row + hi_off + 1, 0), Skv)
            full_hi = gl.minimum(full_hi, gl.maximum(start_m + hi_off + 1, 0) // BLOCK_N * BLOCK_N)
        # A block that sees no key at all can get lo > hi; as block indices (hi rounded up, the
        # others down) the masked loops would then run where the loader issues nothing, and wait
        # on a stage that never fills. An empty range everywhere instead.
        hi = gl.maximum(hi, lo)
        full_lo = gl.minimum(full_lo, hi)
        full_hi = gl.maximum(full_hi, full_lo)
        return (lo // BLOCK_N, full_lo // BLOCK_N, full_hi // BLOCK_N,
                (hi + BLOCK_N - 1) // BLOCK_N)

    @gluon.jit
    def _visible(r2, c2, Skv, lo_off, hi_off, CHECK_SKV: gl.constexpr, HAS_LEFT: gl.constexpr,
                 HAS_RIGHT: gl.constexpr):
        """Which keys ``c2`` the queries ``r2`` see (broadcastable index tensors): the rule of the
        Triton kernel's _band_keep, lo_off <= c2 - r2 <= hi_off, and with ``CHECK_SKV`` also
        c2 < Skv (a kernel whose keys past Skv never reach its output can leave that out)."""
        if CHECK_SKV:
            keep = c2 < Skv
        else:
            keep = c2 >= 0
        if HAS_RIGHT:
            keep = keep & (c2 <= r2 + hi_off)
        if HAS_LEFT:
            keep = keep & (c2 >= r2 + lo_off)
        return keep

    @gluon.jit
    def _load_partition(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_bars,
                        k_bars, v_bars, empty_bars, b, h, hk, start_m, lo, hi,
                        HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        WITH_DO: gl.constexpr):
        # The two 64-row halves of the query block (and, for the dQ kernel, of dO) once, then
        # the key and value blocks through the ring.
        for c in gl.static_range(2):
            if WITH_DO:
                mbarrier.expect(q_bars.index(c),
                                q_desc.block_type.nbytes + do_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(do_desc, [b, h, start_m + c * HALF, 0],
                                                q_bars.index(c), do_smem.index(c))
            else:
                mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, start_m + c * HALF, 0],
                                            q_bars.index(c), q_smem.index(c))
        for j in range(lo, hi):
            i = j - lo
            s = i % STAGES
            # A fresh barrier counts as having completed the phase before phase 0, so the first
            # pass over the ring does not wait.
            mbarrier.wait(empty_bars.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, hk, j * BLOCK_N, 0], k_bars.index(s),
                                            k_smem.index(s))
            mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, hk, j * BLOCK_N, 0], v_bars.index(s),
                                            v_smem.index(s))

    @gluon.jit
    def _query_program(q_desc, k_desc, v_desc, GROUP, Sq, Skv, lo_off, hi_off,
                       HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, STAGES: gl.constexpr):
        """What a program over one 128-query block (the forward, the dQ kernel) starts with: its
        coordinates, its key-block ranges, and the shared memory the loader fills (the two query
        halves once, a ring of key and value blocks) with the barriers guarding it."""
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        dtype: gl.constexpr = q_desc.dtype
        # Query blocks last-to-first: under a causal mask the last ones have the most keys.
        start_m = (gl.num_programs(0) - 1 - gl.program_id(0)) * (2 * HALF)
        h = gl.program_id(1)
        b = gl.program_id(2)
        lo, flo, fhi, hi = _kv_blocks(start_m, Sq, Skv, lo_off, hi_off, 2 * HALF, BLOCK_N,
                                      HAS_LEFT, HAS_RIGHT)
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                           k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                           v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(2):
            mbarrier.init(q_bars.index(c), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(s), count=1)
            mbarrier.init(v_bars.index(s), count=1)
            mbarrier.init(empty_bars.index(s), count=2)
        return (start_m, h, b, h // GROUP, lo, flo, fhi, hi, q_smem, k_smem, v_smem, q_bars,
                k_bars, v_bars, empty_bars)

    @gluon.jit
    def _softmax_step(q_s, k_smem, v_smem, k_bars, v_bars, empty_bars, i, j, acc, l_i, m_i,
                      rows, Skv, qk_scale, lo_off, hi_off, slope_log2, start_m,
                      MASKED: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                      HAS_ALIBI: gl.constexpr,
                      HALF: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                      p_layout: gl.constexpr):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(k_bars.index(s), phase)
        k_s = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        qk = warpgroup_mma(q_s, k_s.permute((1, 0)),
                           gl.zeros([HALF, BLOCK_N], gl.float32, s_layout),
                           use_acc=False, is_async=True)
        qk, _, _ = warpgroup_mma_wait(0, deps=[qk, q_s, k_s])
        if MASKED or HAS_ALIBI:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            c2 = gl.expand_dims(cols, 0)
            if HAS_ALIBI:
                # The ALiBi bias slope * (j - i) without its row term: slope * (j - start_m) per
                # column, one FMA per score. The softmax of a row is unchanged by a constant
                # added to the row; the log-sum-exp takes the row term back at the end.
                colb = slope_log2 * (cols - start_m).to(gl.float32)
                sc = qk * qk_scale + gl.expand_dims(colb, 0)
            else:
                sc = qk * qk_scale
            if MASKED:
                keep = _visible(gl.expand_dims(rows, 1), c2, Skv, lo_off, hi_off, True, HAS_LEFT,
                                HAS_RIGHT)
                sc = gl.where(keep, sc, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1))
            # A row that has seen no visible key keeps m = -inf; subtract 0 there, not -inf.
            m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(sc - gl.expand_dims(m_sub, 1))
        else:
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = gl.exp2(qk * qk_scale - gl.expand_dims(m_sub, 1))
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p, 1)
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        acc = acc * gl.expand_dims(alpha_o, 1)
        p16 = gl.convert_layout(p.to(q_s.dtype), p_layout)
        mbarrier.wait(v_bars.index(s), phase)
        v_s = v_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p16, v_s, acc, is_async=True)
        acc, _ = warpgroup_mma_wait(0, deps=[acc, v_s])
        mbarrier.arrive(empty_bars.index(s))
        return acc, l_i, m_new

    @gluon.jit
    def _consumer_partition(c, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars,
                            O, LSE, ALIBI, stride_ob, stride_oh, stride_om, b, h, Hq, Sq, Skv,
                            start_m, lo, flo, fhi, hi, qk_scale, lo_off, hi_off,
                            HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                            HAS_ALIBI: gl.constexpr, HALF: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                            STAGES: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        rows = start_m + c * HALF + gl.arange(0, HALF, layout=row_layout)
        m_i = gl.full([HALF], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([HALF], gl.float32, row_layout)
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)
        slope_log2 = 0.0
        if HAS_ALIBI:
            slope_log2 = gl.load(ALIBI + h).to(gl.float32) * 1.4426950408889634
        q_s = q_smem.index(c).reshape([HALF, HEAD_DIM])
        mbarrier.wait(q_bars.index(c), 0)

        # Three ranges of key blocks: masked [lo, flo), unmasked [flo, fhi), masked [fhi, hi).
        for seg in gl.static_range(3):
            start = lo if seg == 0 else (flo if seg == 1 else fhi)
            stop = flo if seg == 0 else (fhi if seg == 1 else hi)
            for j in range(start, stop):
                acc, l_i, m_i = _softmax_step(
                    q_s, k_smem, v_smem, k_bars, v_bars, empty_bars, j - lo, j, acc, l_i, m_i,
                    rows, Skv, qk_scale, lo_off, hi_off, slope_log2, start_m, seg != 1, HAS_LEFT,
                    HAS_RIGHT, HAS_ALIBI, HALF, BLOCK_N, HEAD_DIM, STAGES, s_layout, o_layout,
                    p_layout)

        visible = l_i > 0.0
        inv_l = gl.where(visible, 1.0 / gl.where(visible, l_i, 1.0), 0.0)
        lse2 = m_i + gl.log2(gl.where(visible, l_i, 1.0))
        if HAS_ALIBI:
            lse2 = lse2 - slope_log2 * (rows - start_m).to(gl.float32)  # the row term (above)
        lse = gl.where(visible, lse2 * 0.6931471805599453, float("-inf"))
        gl.store(LSE + (b * Hq + h).to(gl.int64) * Sq + rows, lse, mask=rows < Sq)
        inv_o = gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout))
        out = (acc * gl.expand_dims(inv_o, 1)).to(q_s.dtype)
        rows_o = gl.convert_layout(rows, gl.SliceLayout(1, o_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        Ob = O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        ptrs = Ob + gl.expand_dims(rows_o.to(gl.int64) * stride_om, 1) + gl.expand_dims(offs_d, 0)
        mask = (gl.expand_dims(rows_o, 1) < Sq) & (gl.expand_dims(offs_d, 0) < HEAD_DIM)
        gl.store(ptrs, out, mask=mask)

    @gluon.jit
    def _attn_fwd_sm90_kernel(q_desc, k_desc, v_desc, O, LSE, ALIBI, stride_ob, stride_oh,
                              stride_om, Hq, GROUP, Sq, Skv, qk_scale, lo_off, hi_off,
                              HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                              HAS_ALIBI: gl.constexpr,
                              STAGES: gl.constexpr, LOAD_REGS: gl.constexpr,
                              MMA_REGS: gl.constexpr):
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        (start_m, h, b, hk, lo, flo, fhi, hi, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
         empty_bars) = _query_program(q_desc, k_desc, v_desc, GROUP, Sq, Skv, lo_off, hi_off,
                                      HAS_LEFT, HAS_RIGHT, STAGES)

        gl.warp_specialize([
            (_consumer_partition, (0, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars,
                                   O, LSE, ALIBI, stride_ob, stride_oh, stride_om, b, h, Hq, Sq,
                                   Skv, start_m, lo, flo, fhi, hi, qk_scale, lo_off, hi_off,
                                   HAS_LEFT, HAS_RIGHT, HAS_ALIBI, HALF, BLOCK_N, HEAD_DIM, STAGES)),
            (_consumer_partition, (1, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars,
                                   O, LSE, ALIBI, stride_ob, stride_oh, stride_om, b, h, Hq, Sq,
                                   Skv, start_m, lo, flo, fhi, hi, qk_scale, lo_off, hi_off,
                                   HAS_LEFT, HAS_RIGHT, HAS_ALIBI, HALF, BLOCK_N, HEAD_DIM, STAGES)),
            (_load_partition, (q_desc, q_desc, k_desc, v_desc, q_smem, q_smem, k_smem, v_smem,
                               q_bars, k_bars, v_bars, empty_bars, b, h, hk, start_m, lo, hi,
                               HALF, BLOCK_N, STAGES, False)),
        ], [4, 1], [MMA_REGS, LOAD_REGS])


if HAVE_GLUON:

    # ----------------------------------------------------------------------------------------
    # Backward: dK and dV. One program per 128-key block; the dQ (and delta, lse2) of the Triton
    # backward run first and this kernel replaces the Triton dK/dV kernel.
    # ----------------------------------------------------------------------------------------

    @gluon.jit
    def _q_blocks(start_n, Sq, Skv, lo_off, hi_off, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """Query blocks of the key block at ``start_n``: [lo, flo) masked, [flo, fhi) unmasked,
        [fhi, hi) masked, as block indices (the ranges of the Triton kernel's _q_range)."""
        last_col = gl.minimum(start_n + BLOCK_N, Skv) - 1
        lo = 0
        hi = Sq
        full_lo = 0
        full_hi = Sq // BLOCK_M * BLOCK_M
        if HAS_RIGHT:
            lo = gl.maximum(start_n - hi_off, 0) // BLOCK_M * BLOCK_M
            full_lo = (gl.maximum(last_col - hi_off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        if HAS_LEFT:
            hi = gl.minimum(gl.maximum(last_col - lo_off + 1, 0), Sq)
            full_hi = gl.minimum(full_hi, gl.maximum(start_n - lo_off + 1, 0) // BLOCK_M * BLOCK_M)
        hi = gl.maximum(hi, lo)  # no visible query: an empty range (see _kv_blocks)
        full_lo = gl.minimum(full_lo, hi)
        full_hi = gl.maximum(full_hi, full_lo)
        return (lo // BLOCK_M, full_lo // BLOCK_M, full_hi // BLOCK_M,
                (hi + BLOCK_M - 1) // BLOCK_M)

    @gluon.jit
    def _bwd_load_partition(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem,
                            kv_bar, q_bars, do_bars, empty_bars, b, hk, GROUP, start_n, lo, hi,
                            HALF: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
        for c in gl.static_range(2):
            tma.async_copy_global_to_shared(k_desc, [b, hk, start_n + c * HALF, 0], kv_bar,
                                            k_smem.index(c))
            tma.async_copy_global_to_shared(v_desc, [b, hk, start_n + c * HALF, 0], kv_bar,
                                            v_smem.index(c))
        n = hi - lo
        for g in range(GROUP):
            h = hk * GROUP + g
            for j in range(lo, hi):
                i = g * n + j - lo
                s = i % STAGES
                mbarrier.wait(empty_bars.index(s), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(q_bars.index(s), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, h, j * BLOCK_M, 0], q_bars.index(s),
                                                q_smem.index(s))
                mbarrier.expect(do_bars.index(s), do_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(do_desc, [b, h, j * BLOCK_M, 0],
                                                do_bars.index(s), do_smem.index(s))

    @gluon.jit
    def _score_products(a_s, b_ring, b_bars, a2_s, b2_ring, b2_bars, s, phase,
                        ROWS: gl.constexpr, COLS: gl.constexpr, HEAD_DIM: gl.constexpr,
                        s_layout: gl.constexpr):
        """``a_s b^T`` and ``a2_s b2^T``, b and b2 the rings' stage ``s`` once its copies land,
        issued together so the second runs under whatever follows the wait for the first (the
        exponentials, in both backward kernels). Returns both results (the second still in
        flight) and the two stage views."""
        mbarrier.wait(b_bars.index(s), phase)
        b_s = b_ring.index(s).reshape([COLS, HEAD_DIM])
        x = warpgroup_mma(a_s, b_s.permute((1, 0)), gl.zeros([ROWS, COLS], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        mbarrier.wait(b2_bars.index(s), phase)
        b2_s = b2_ring.index(s).reshape([COLS, HEAD_DIM])
        y = warpgroup_mma(a2_s, b2_s.permute((1, 0)),
                          gl.zeros([ROWS, COLS], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        x = warpgroup_mma_wait(1, deps=[x])
        return x, y, b_s, b2_s

    @gluon.jit
    def _bwd_step(k_s, v_s, q_smem, do_smem, q_bars, do_bars, empty_bars, i, j, dk, dv, cols,
                  colb, LSE2h, DELTAh, Sq, qk_scale, slope_log2, start_n, lo_off, hi_off,
                  MASKED: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                  HAS_ALIBI: gl.constexpr, BLOCK_M: gl.constexpr, HALF: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                  a_layout: gl.constexpr):
        # Transposed tiles (keys x queries): per-query vectors broadcast along axis 0 and dK, dV
        # accumulate as plain (keys x D) products, as in the Triton dK/dV kernel. Both
        # score-side products (K Q^T and V dO^T) are issued first, so V dO^T runs under the
        # exponentials (4-8% faster than computing p before issuing it; NOTES_attention.md,
        # eighth round). This step's dV and dK products are waited for here: left in flight
        # into the next step, they made ptxas serialize every wgmma of the kernel (the next
        # step's zeroed accumulators are written while they run).
        s = i % STAGES
        phase = (i // STAGES) & 1
        rows = j * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        lse2 = gl.load(LSE2h + rows, mask=rows < Sq, other=float("inf"))
        sT, dpT, q_s, do_s = _score_products(k_s, q_smem, q_bars, v_s, do_smem, do_bars, s, phase,
                                             HALF, BLOCK_M, HEAD_DIM, s_layout)
        if HAS_ALIBI:
            # slope * (j - i) split into a column and a row term, each relative to start_n.
            rowv = lse2 + slope_log2 * (rows - start_n).to(gl.float32)
            pT = gl.exp2(sT * qk_scale + gl.expand_dims(colb, 1) - gl.expand_dims(rowv, 0))
        else:
            pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse2, 0))
        if MASKED:
            if HAS_LEFT or HAS_RIGHT:
                # Keys past Skv need no mask here: their dK and dV rows are never stored.
                keep = _visible(gl.expand_dims(rows, 0), gl.expand_dims(cols, 1), 0, lo_off,
                                hi_off, False, HAS_LEFT, HAS_RIGHT)
                pT = gl.where(keep, pT, 0.0)
        delta = gl.load(DELTAh + rows, mask=rows < Sq, other=0.0)
        dpT, _, _ = warpgroup_mma_wait(0, deps=[dpT, k_s, v_s])
        pT16 = gl.convert_layout(pT.to(q_s.dtype), a_layout)
        dsT = pT * (dpT - gl.expand_dims(delta, 0))
        dsT16 = gl.convert_layout(dsT.to(q_s.dtype), a_layout)
        dv = warpgroup_mma(pT16, do_s, dv, is_async=True)
        dk = warpgroup_mma(dsT16, q_s, dk, is_async=True)
        dv, dk, _, _ = warpgroup_mma_wait(0, deps=[dv, dk, q_s, do_s])
        mbarrier.arrive(empty_bars.index(s))
        return dk, dv

    @gluon.jit
    def _bwd_consumer_partition(c, k_smem, v_smem, q_smem, do_smem, kv_bar, q_bars, do_bars,
                                empty_bars, DK, DV, LSE2, DELTA, ALIBI, stride_dkb, stride_dkh,
                                stride_dkn, stride_dvb, stride_dvh, stride_dvn, b, hk, Hq, GROUP,
                                Sq, Skv, start_n, lo, flo, fhi, hi, scale, qk_scale, lo_off,
                                hi_off, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                                HAS_ALIBI: gl.constexpr, BLOCK_M: gl.constexpr,
                                HALF: gl.constexpr, HEAD_DIM: gl.constexpr,
                                STAGES: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                     k_width=2)
        cols = start_n + c * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
        dk = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(kv_bar, 0)
        k_s = k_smem.index(c).reshape([HALF, HEAD_DIM])
        v_s = v_smem.index(c).reshape([HALF, HEAD_DIM])
        n = hi - lo
        for g in range(GROUP):
            h = hk * GROUP + g
            bh = (b * Hq + h).to(gl.int64)
            LSE2h = LSE2 + bh * Sq
            DELTAh = DELTA + bh * Sq
            slope_log2 = 0.0
            colb = cols.to(gl.float32)
            if HAS_ALIBI:
                slope_log2 = gl.load(ALIBI + h).to(gl.float32) * 1.4426950408889634
                colb = slope_log2 * (cols - start_n).to(gl.float32)
            # Three ranges of query blocks: masked, unmasked, masked (as in the forward).
            for seg in gl.static_range(3):
                start = lo if seg == 0 else (flo if seg == 1 else fhi)
                stop = flo if seg == 0 else (fhi if seg == 1 else hi)
                for j in range(start, stop):
                    dk, dv = _bwd_step(
                        k_s, v_s, q_smem, do_smem, q_bars, do_bars, empty_bars, g * n + j - lo,
                        j, dk, dv, cols, colb, LSE2h, DELTAh, Sq, qk_scale, slope_log2, start_n,
                        lo_off, hi_off, seg != 1, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, BLOCK_M, HALF,
                        HEAD_DIM, STAGES, s_layout, a_layout)
        keys = start_n + c * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        mask = (gl.expand_dims(keys, 1) < Skv) & (gl.expand_dims(offs_d, 0) < HEAD_DIM)
        k64 = gl.expand_dims(keys.to(gl.int64), 1)
        DKb = DK + b.to(gl.int64) * stride_dkb + hk.to(gl.int64) * stride_dkh
        gl.store(DKb + k64 * stride_dkn + gl.expand_dims(offs_d, 0),
                 (dk * scale).to(DK.dtype.element_ty), mask=mask)
        DVb = DV + b.to(gl.int64) * stride_dvb + hk.to(gl.int64) * stride_dvh
        gl.store(DVb + k64 * stride_dvn + gl.expand_dims(offs_d, 0),
                 dv.to(DV.dtype.element_ty), mask=mask)

    @gluon.jit
    def _attn_bwd_dkdv_sm90_kernel(q_desc, do_desc, k_desc, v_desc, DK, DV, LSE2, DELTA, ALIBI,
                                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                                   stride_dvn, Hq, GROUP, Sq, Skv, scale, qk_scale, lo_off,
                                   hi_off, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                                   HAS_ALIBI: gl.constexpr, STAGES: gl.constexpr,
                                   MMA_REGS: gl.constexpr):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        HALF: gl.constexpr = k_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        BLOCK_N: gl.constexpr = 2 * HALF
        dtype: gl.constexpr = q_desc.dtype

        # Key blocks first-to-last: under a causal mask the first ones see the most queries.
        start_n = gl.program_id(0) * BLOCK_N
        hk = gl.program_id(1)
        b = gl.program_id(2)
        lo, flo, fhi, hi = _q_blocks(start_n, Sq, Skv, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                     HAS_LEFT, HAS_RIGHT)

        k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_DIM], v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM],
                                           q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM],
                                            do_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(q_bars.index(s), count=1)
            mbarrier.init(do_bars.index(s), count=1)
            mbarrier.init(empty_bars.index(s), count=2)

        # The loader is the default partition (it keeps 24 registers); the two consumers are
        # workers with 240 each. As the default partition a consumer would be held to the
        # launch's 168 registers and spill (dK and dV alone take 128).
        gl.warp_specialize([
            (_bwd_load_partition, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem,
                                   v_smem, kv_bar, q_bars, do_bars, empty_bars, b, hk, GROUP,
                                   start_n, lo, hi, HALF, BLOCK_M, STAGES)),
            (_bwd_consumer_partition, (0, k_smem, v_smem, q_smem, do_smem, kv_bar, q_bars,
                                       do_bars, empty_bars, DK, DV, LSE2, DELTA, ALIBI,
                                       stride_dkb, stride_dkh, stride_dkn, stride_dvb,
                                       stride_dvh, stride_dvn, b, hk, Hq, GROUP, Sq, Skv,
                                       start_n, lo, flo, fhi, hi, scale, qk_scale, lo_off,
                                       hi_off, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, BLOCK_M, HALF,
                                       HEAD_DIM, STAGES)),
            (_bwd_consumer_partition, (1, k_smem, v_smem, q_smem, do_smem, kv_bar, q_bars,
                                       do_bars, empty_bars, DK, DV, LSE2, DELTA, ALIBI,
                                       stride_dkb, stride_dkh, stride_dkn, stride_dvb,
                                       stride_dvh, stride_dvn, b, hk, Hq, GROUP, Sq, Skv,
                                       start_n, lo, flo, fhi, hi, scale, qk_scale, lo_off,
                                       hi_off, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, BLOCK_M, HALF,
                                       HEAD_DIM, STAGES)),
        ], [4, 4], [MMA_REGS, MMA_REGS])


if HAVE_GLUON:

    # ----------------------------------------------------------------------------------------
    # Backward: dQ (with delta and lse2 for the dK/dV kernel). One program per 128-query block,
    # shaped as the forward: the loader brings the query and dO halves once and streams key and
    # value blocks; each consumer owns 64 query rows.
    # ----------------------------------------------------------------------------------------

    @gluon.jit
    def _dq_step(q_s, do_s, k_smem, v_smem, k_bars, v_bars, empty_bars, i, j, dq, rowv, delta,
                 rows, Skv, qk_scale, slope_log2, start_m, lo_off, hi_off, MASKED: gl.constexpr,
                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_ALIBI: gl.constexpr,
                 HALF: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                 STAGES: gl.constexpr, s_layout: gl.constexpr, a_layout: gl.constexpr):
        # p = exp2(s - lse2) from the recomputed scores, ds = p * (dp - delta), dq += ds k.
        # Both score-side products (q k^T, dO v^T) are issued before the exponentials, so the
        # second runs under them (as in the dK/dV kernel). The row terms (lse2, and ALiBi's
        # row part) are per consumer, not per step: ``rowv``.
        s = i % STAGES
        phase = (i // STAGES) & 1
        qk, dp, k_s, v_s = _score_products(q_s, k_smem, k_bars, do_s, v_smem, v_bars, s, phase,
                                           HALF, BLOCK_N, HEAD_DIM, s_layout)
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if HAS_ALIBI:
            colb = slope_log2 * (cols - start_m).to(gl.float32)
            p = gl.exp2(qk * qk_scale + gl.expand_dims(colb, 0) - gl.expand_dims(rowv, 1))
        else:
            p = gl.exp2(qk * qk_scale - gl.expand_dims(rowv, 1))
        if MASKED:
            keep = _visible(gl.expand_dims(rows, 1), gl.expand_dims(cols, 0), Skv, lo_off,
                            hi_off, True, HAS_LEFT, HAS_RIGHT)
            p = gl.where(keep, p, 0.0)
        dp, _, _ = warpgroup_mma_wait(0, deps=[dp, q_s, do_s])
        ds = p * (dp - gl.expand_dims(delta, 1))
        ds16 = gl.convert_layout(ds.to(q_s.dtype), a_layout)
        dq = warpgroup_mma(ds16, k_s, dq, is_async=True)
        dq, _, _ = warpgroup_mma_wait(0, deps=[dq, k_s, v_s])
        mbarrier.arrive(empty_bars.index(s))
        return dq

    @gluon.jit
    def _dq_consumer_partition(c, q_smem, do_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
                               empty_bars, O, DO, LSE, DLSE, LSE2, DELTA, DQ, ALIBI, stride_ob,
                               stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                               stride_dqb, stride_dqh, stride_dqm, b, h, Hq, Sq, Skv, start_m,
                               lo, flo, fhi, hi, scale, qk_scale, lo_off, hi_off,
                               HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                               HAS_ALIBI: gl.constexpr, HAS_DLSE: gl.constexpr,
                               HALF: gl.constexpr, BLOCK_N: gl.constexpr,
                               HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                     k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

        # delta = rowsum(dO * O), less the lse gradient (d lse_i / d s_ij = p_ij folds into it),
        # and lse2 = lse * log2(e) with +inf where no key is visible (every p is then 0); both
        # stored for the dK/dV kernel, as the Triton dQ kernel does.
        rows_io = start_m + c * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, io_layout))
        offs_io = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
        m_io = (gl.expand_dims(rows_io, 1) < Sq) & (gl.expand_dims(offs_io, 0) < HEAD_DIM)
        r64 = gl.expand_dims(rows_io.to(gl.int64), 1)
        o = gl.load(O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                    + r64 * stride_om + gl.expand_dims(offs_io, 0), mask=m_io, other=0.0)
        do = gl.load(DO + b.to(gl.int64) * stride_dob + h.to(gl.int64) * stride_doh
                     + r64 * stride_dom + gl.expand_dims(offs_io, 0), mask=m_io, other=0.0)
        delta = gl.convert_layout(gl.sum(o.to(gl.float32) * do.to(gl.float32), 1), row_layout)
        rows = start_m + c * HALF + gl.arange(0, HALF, layout=row_layout)
        row_offs = (b * Hq + h).to(gl.int64) * Sq + rows
        if HAS_DLSE:
            delta = delta - gl.load(DLSE + row_offs, mask=rows < Sq, other=0.0)
        lse = gl.load(LSE + row_offs, mask=rows < Sq, other=float("-inf"))
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        gl.store(DELTA + row_offs, delta, mask=rows < Sq)
        gl.store(LSE2 + row_offs, lse2, mask=rows < Sq)
        slope_log2 = 0.0
        rowv = lse2
        if HAS_ALIBI:
            # slope * (j - i) as a column term relative to start_m (in the step) and this row
            # term, which joins lse2 once for the whole loop.
            slope_log2 = gl.load(ALIBI + h).to(gl.float32) * 1.4426950408889634
            rowv = lse2 + slope_log2 * (rows - start_m).to(gl.float32)

        dq = gl.zeros([HALF, HEAD_DIM], gl.float32, acc_layout)
        q_s = q_smem.index(c).reshape([HALF, HEAD_DIM])
        do_s = do_smem.index(c).reshape([HALF, HEAD_DIM])
        mbarrier.wait(q_bars.index(c), 0)
        for seg in gl.static_range(3):
            start = lo if seg == 0 else (flo if seg == 1 else fhi)
            stop = flo if seg == 0 else (fhi if seg == 1 else hi)
            for j in range(start, stop):
                dq = _dq_step(q_s, do_s, k_smem, v_smem, k_bars, v_bars, empty_bars, j - lo, j,
                              dq, rowv, delta, rows, Skv, qk_scale, slope_log2, start_m, lo_off,
                              hi_off, seg != 1, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, HALF, BLOCK_N,
                              HEAD_DIM, STAGES, s_layout, a_layout)

        rows_o = gl.convert_layout(rows, gl.SliceLayout(1, acc_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        mask = (gl.expand_dims(rows_o, 1) < Sq) & (gl.expand_dims(offs_d, 0) < HEAD_DIM)
        DQb = DQ + b.to(gl.int64) * stride_dqb + h.to(gl.int64) * stride_dqh
        gl.store(DQb + gl.expand_dims(rows_o.to(gl.int64) * stride_dqm, 1)
                 + gl.expand_dims(offs_d, 0), (dq * scale).to(DQ.dtype.element_ty), mask=mask)

    @gluon.jit
    def _attn_bwd_dq_sm90_kernel(q_desc, do_desc, k_desc, v_desc, O, DO, LSE, DLSE, LSE2, DELTA,
                                 DQ, ALIBI, stride_ob, stride_oh, stride_om, stride_dob,
                                 stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, Hq,
                                 GROUP, Sq, Skv, scale, qk_scale, lo_off, hi_off,
                                 HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                                 HAS_ALIBI: gl.constexpr, HAS_DLSE: gl.constexpr,
                                 STAGES: gl.constexpr, MMA_REGS: gl.constexpr):
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        (start_m, h, b, hk, lo, flo, fhi, hi, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
         empty_bars) = _query_program(q_desc, k_desc, v_desc, GROUP, Sq, Skv, lo_off, hi_off,
                                      HAS_LEFT, HAS_RIGHT, STAGES)
        # dO's halves arrive with the query's, on the same barriers.
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [2, 1, 1, HALF, HEAD_DIM],
                                            do_desc.layout)

        # Loader as the default partition, consumers as workers (see the dK/dV kernel).
        gl.warp_specialize([
            (_load_partition, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem,
                               q_bars, k_bars, v_bars, empty_bars, b, h, hk, start_m, lo, hi,
                               HALF, BLOCK_N, STAGES, True)),
            (_dq_consumer_partition, (0, q_smem, do_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
                                      empty_bars, O, DO, LSE, DLSE, LSE2, DELTA, DQ, ALIBI,
                                      stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                                      stride_dom, stride_dqb, stride_dqh, stride_dqm, b, h, Hq,
                                      Sq, Skv, start_m, lo, flo, fhi, hi, scale, qk_scale,
                                      lo_off, hi_off, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, HAS_DLSE,
                                      HALF, BLOCK_N, HEAD_DIM, STAGES)),
            (_dq_consumer_partition, (1, q_smem, do_smem, k_smem, v_smem, q_bars, k_bars, v_bars,
                                      empty_bars, O, DO, LSE, DLSE, LSE2, DELTA, DQ, ALIBI,
                                      stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                                      stride_dom, stride_dqb, stride_dqh, stride_dqm, b, h, Hq,
                                      Sq, Skv, start_m, lo, flo, fhi, hi, scale, qk_scale,
                                      lo_off, hi_off, HAS_LEFT, HAS_RIGHT, HAS_ALIBI, HAS_DLSE,
                                      HALF, BLOCK_N, HEAD_DIM, STAGES)),
        ], [4, 4], [MMA_REGS, MMA_REGS])


def _warn_once(current, exc: BaseException, what: str, fallback: str) -> BaseException:
    if current is None:
        warnings.warn(f"rewriter: the Gluon Hopper attention {what} failed "
                      f"({type(exc).__name__}: {exc}); using the Triton {fallback} from now on",
                      RuntimeWarning, stacklevel=4)
    return exc


def disable(exc: BaseException) -> None:
    """Stop using this kernel in this process after ``exc`` (the caller falls back to the Triton
    forward); warns once, naming the error."""
    global DISABLED
    DISABLED = _warn_once(DISABLED, exc, "forward", "forward")


BACKWARD_DISABLED = None
DQ_DISABLED = None


def disable_backward(exc: BaseException) -> None:
    """As :func:`disable`, for the dK/dV kernel (the Triton one answers from then on)."""
    global BACKWARD_DISABLED
    BACKWARD_DISABLED = _warn_once(BACKWARD_DISABLED, exc, "backward", "dK/dV kernel")


def disable_dq(exc: BaseException) -> None:
    """As :func:`disable`, for the dQ kernel."""
    global DQ_DISABLED
    DQ_DISABLED = _warn_once(DQ_DISABLED, exc, "dQ kernel", "dQ kernel")


def _stages(head_dim: int) -> int:
    # Shared memory per stage: K and V blocks of 128 x D (64 KB at D = 128); Q takes 32 KB.
    return 2 if head_dim > 64 else 4


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alibi_slopes=None,
              softcap=None, key_padding_mask=None, dropout_p=0.0) -> bool:
    """Whether :func:`attention_forward_sm90` runs these inputs (else use the Triton kernel)."""
    if not HAVE_GLUON or not q.is_cuda or _capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in _HEAD_DIMS:
        return False
    if softcap is not None and softcap > 0.0:
        return False
    if alibi_slopes is not None and (not alibi_slopes.is_cuda or alibi_slopes.dim() != 1
                                     or alibi_slopes.numel() != q.shape[1]):
        return False
    if key_padding_mask is not None or dropout_p > 0.0:
        return False
    for t in (q, k, v):
        if not _tma_ok(t):
            return False
    return True


def _tma_ok(t: torch.Tensor) -> bool:
    # TMA descriptors: 16-byte aligned base and strides, unit stride last; no broadcast (zero)
    # strides, which a descriptor may not accept.
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(st > 0 and (st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])


_LAYOUTS = {}


def _descriptor(t: torch.Tensor, rows: int):
    key = (t.dtype, rows, t.shape[-1])
    layout = _LAYOUTS.get(key)
    if layout is None:
        gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, t.shape[-1]], gdt)
        _LAYOUTS[key] = layout
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]], layout)


def attention_forward_sm90(q, k, v, scale: float, has_left: bool, has_right: bool, lo_off: int,
                           hi_off: int, out: Optional[torch.Tensor] = None,
                           lse: Optional[torch.Tensor] = None,
                           alibi_slopes: Optional[torch.Tensor] = None):
    """Launch the Gluon forward; ``(out, lse)`` as the Triton forward returns them. The band
    arguments are those of ``flash_attention._band``; ``alibi_slopes`` one per query head (the
    bias of key j for query i is ``slope * (j - i)``, as in the Triton kernel)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    alibi = lse if alibi_slopes is None else alibi_slopes.contiguous()  # any pointer if unused
    grid = (-(-Sq // (2 * _HALF)), Hq, B)
    _launch.launch(
        _attn_fwd_sm90_kernel, grid,
        _descriptor(q, _HALF), _descriptor(k, _BLOCK_N), _descriptor(v, _BLOCK_N), out, lse,
        alibi, *_launch.row_strides(out), Hq, Hq // Hkv, Sq, Skv,
        scale * _LOG2E, lo_off, hi_off, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        HAS_ALIBI=alibi_slopes is not None, STAGES=_stages(D),
        LOAD_REGS=24, MMA_REGS=240, num_warps=4)
    return out, lse


_BWD_BLOCK_M = 64  # queries per step of the dK/dV kernel
_BWD_HALF = 64     # keys per consumer warpgroup (a program owns 128 keys)
# Ring stages of query and dO blocks in the dK/dV kernel, per head dim (32 KB a stage at 128).
# At 128, 2, 3 and 4 stages time alike (ALiBi, S = 4096, H100: 940 / 939 / 961 us;
# benchmarks/results/attention_bwd_stages_h100.txt), so the smallest is kept.
_DKDV_STAGES = {64: 4, 128: 2}


def supported_backward(q, k, v, do, *, alibi_slopes=None, softcap=None, key_padding_mask=None,
                       dropout_p=0.0) -> bool:
    """Whether :func:`attention_backward_dkdv_sm90` runs these inputs."""
    if not supported(q, k, v, alibi_slopes=alibi_slopes, softcap=softcap,
                     key_padding_mask=key_padding_mask, dropout_p=dropout_p):
        return False
    return do.dtype == q.dtype and do.shape == q.shape and _tma_ok(do)


def attention_backward_dkdv_sm90(q, k, v, do, lse2, delta, dk, dv, scale: float, has_left: bool,
                                 has_right: bool, lo_off: int, hi_off: int,
                                 alibi_slopes: Optional[torch.Tensor] = None):
    """dK and dV into ``dk``, ``dv`` (any strides), from ``lse2`` (log-sum-exp times log2(e),
    +inf for rows that see no key) and ``delta`` (rowsum(dO * O) less the lse gradient), both
    (B, Hq, Sq) fp32 as the Triton dQ kernel writes them."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    alibi = lse2 if alibi_slopes is None else alibi_slopes.contiguous()
    grid = (-(-Skv // (2 * _BWD_HALF)), Hkv, B)
    _launch.launch(
        _attn_bwd_dkdv_sm90_kernel, grid,
        _descriptor(q, _BWD_BLOCK_M), _descriptor(do, _BWD_BLOCK_M), _descriptor(k, _BWD_HALF),
        _descriptor(v, _BWD_HALF), dk, dv, lse2, delta, alibi,
        *_launch.row_strides(dk, dv), Hq, Hq // Hkv, Sq, Skv, scale, scale * _LOG2E, lo_off, hi_off,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_ALIBI=alibi_slopes is not None,
        STAGES=_DKDV_STAGES[D], MMA_REGS=240, num_warps=4)
    return dk, dv


_DQ_BLOCK_N = 64  # keys per step of the dQ kernel (query rows per consumer: _HALF)


def attention_backward_dq_sm90(q, k, v, out, do, lse, grad_lse, dq, lse2, delta, scale: float,
                               has_left: bool, has_right: bool, lo_off: int, hi_off: int,
                               alibi_slopes: Optional[torch.Tensor] = None):
    """dQ into ``dq`` (any strides), and ``delta`` and ``lse2`` (both (B, Hq, Sq) fp32, written
    here as the Triton dQ kernel writes them, for the dK/dV kernel that runs next), from the
    forward's ``out`` and ``lse`` (natural log; ``grad_lse`` its gradient or None)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    alibi = lse if alibi_slopes is None else alibi_slopes.contiguous()
    dlse = lse if grad_lse is None else grad_lse
    grid = (-(-Sq // (2 * _HALF)), Hq, B)
    # Shared memory: query and dO halves (32 KB each at D = 128) and per stage a 64-key block of
    # K and of V (32 KB): four stages fit at D = 128.
    _launch.launch(
        _attn_bwd_dq_sm90_kernel, grid,
        _descriptor(q, _HALF), _descriptor(do, _HALF), _descriptor(k, _DQ_BLOCK_N),
        _descriptor(v, _DQ_BLOCK_N), out, do, lse.contiguous(), dlse.contiguous(), lse2, delta,
        dq, alibi, *_launch.row_strides(out, do, dq), Hq, Hq // Hkv, Sq, Skv, scale,
        scale * _LOG2E, lo_off, hi_off, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        HAS_ALIBI=alibi_slopes is not None, HAS_DLSE=grad_lse is not None, STAGES=4,
        MMA_REGS=240, num_warps=4)
    return dq
