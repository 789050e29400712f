"""FlashAttention-2-style fused attention in Triton, forward and backward, as a custom op.

What: ``softmax(score(q k^T)) v`` for inputs laid out like ``scaled_dot_product_attention``
(q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Skv, D)``) without ever writing the ``Sq x Skv`` score
matrix to memory. Every program keeps one block of query rows on chip and streams the key/value
blocks through an online softmax; the backward recomputes the probabilities from the saved
log-sum-exp. Grouped-query and multi-query attention (``Hq % Hkv == 0``, query head ``h`` reads
kv head ``h // (Hq // Hkv)``) index the shared kv head directly instead of repeating K and V.

Why: the variants real models use (causal with either alignment, sliding windows, ALiBi, Gemma-2
soft-capping, key padding, dropout) are computed from indices inside the kernel, so none of them
needs a materialized ``S x S`` mask or bias, and blocks that a causal or window mask removes
entirely are never visited. That is what makes a masked variant as cheap as plain attention.

Score of query row ``i`` (0-based, of ``Sq``) and key ``j`` (of ``Skv``), in this order::

    s = (q_i . k_j) * scale                      # scale defaults to 1/sqrt(D)
    s = softcap * tanh(s / softcap)              # if softcap (Gemma-2: scale, cap, then mask)
    s = s + alibi_slopes[h] * (j - i)            # if alibi_slopes (shape (Hq,), fp32)
    s = s + key_padding_mask[b, j]               # if key_padding_mask (additive; bool: True = keep)
    s = -inf unless  i + off - left <= j <= i + off + right
                     (right = min(right, 0) when causal; off = 0 for causal_align="top_left",
                      off = Skv - Sq for "bottom_right"; a side of ``window`` that is None is
                      unbounded)
    out_i = sum_j softmax(s)_ij * z_ij / (1 - dropout_p) * v_j

The ALiBi bias uses the relative distance ``j - i`` in both alignments; any per-row constant
cancels in the softmax, so this equals the ``slope * j`` form some models use (only the returned
log-sum-exp differs, by ``slope * i``). ``z_ij`` is the dropout keep-mask (below). Rows whose every
key is masked produce zeros, log-sum-exp ``-inf`` and zero gradients, never NaN.

Dropout: ``z_ij = tl.rand(seed, ((b * Hq + h) * Sq + i) * Skv + j) >= dropout_p`` (Philox 4x32-10
on a 64-bit counter), so the mask depends only on the seed and the element, not on block sizes; the
backward regenerates it. :func:`flash_attention` draws the seed from the default generator of q's
device, so ``torch.manual_seed`` makes a run reproducible. :func:`dropout_keep_mask` returns the
mask for a seed (for tests and debugging).

Precision: bf16 and fp16 inputs feed the tensor cores directly (fp32 accumulation, probabilities
rounded to the input dtype for the ``p @ v`` product, as every FlashAttention does). fp32 inputs
use Triton's default fp32 dot, which on the GPU is tf32 (operands rounded to a 10-bit mantissa);
the softmax statistics are fp32 throughout. Under ``TRITON_INTERPRET=1`` the dots are exact fp32.

Speed, measured on one H200 (bf16, D=128, S=4096, 16k tokens; see
benchmarks/results/attention_nvidia-h200_quick.md): causal forward 0.82-0.85x of SDPA's
``is_causal`` kernel and forward+backward 0.82x; with ALiBi, a 512-key sliding window or
soft-capping, 1.1-2.1x FlexAttention in GPU time and 2.5-6.7x SDPA given the materialized bias.
Forward launches one kernel and backward two (three for a band, whose backward stores dS once
and reads it back for dQ: see "Stored-dS backward" below); a call whose GPU time is well under a
millisecond is bound by host launch overhead on a slow host (CUDA graphs remove it). On Hopper
(sm_90) the forward and the two backward kernels (dQ, dK/dV) of the common variants (plain,
causal, windows, ALiBi; bf16/fp16; head dims 64 and 128) can run warp-specialized Gluon kernels
instead (:mod:`rewriter.kernels.flash_attention_sm90`); :func:`_sm90_choice`,
:func:`_sm90_dq_choice` and :func:`_sm90_backward_choice` say where they do.

Example::

    from rewriter.kernels.flash_attention import flash_attention
    q = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 4, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = flash_attention(q, k, v, causal=True, window=(1023, 0), softcap=50.0)
    out.sum().backward()

The op is ``torch.ops.rewriter.flash_attention`` (returns ``(out, lse)``) with a fake
implementation and an autograd formula whose backward is the op
``torch.ops.rewriter.flash_attention_backward``, so it traces under ``torch.compile`` without a
graph break and exports with ``torch.export``.
"""

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from . import flash_attention_sm90 as _sm90

__all__ = [
    "flash_attention",
    "attention_forward",
    "attention_backward",
    "attention_reference",
    "dropout_keep_mask",
    "supports",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Three work-arounds for Triton 3.6's CPU interpreter, compiled out on the GPU:
# - it holds scalars as 1-element arrays, which NumPy >= 2.4 refuses to turn into the ints that
#   ``range()`` needs, so loops with run-time bounds become ``while`` loops (which only need a
#   truth value); on the GPU they stay ``for`` loops, since Triton software-pipelines only those;
# - its ``tl.dot`` multiplies the raw uint16 bit patterns of bf16 operands, so bf16 operands are
#   widened to fp32 first (exact: a bf16 product fits fp32, as in the tensor cores);
# - it truncates fp32 -> bf16 casts (and its round-to-nearest option drops the carry into the
#   exponent), so bf16 casts round to nearest-even by hand, as the GPU's cvt.rn.bf16.f32 does.
_IN_INTERPRETER = tl.constexpr(_INTERPRET)
_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)
_LN2_C = tl.constexpr(0.6931471805599453)
_MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------------
# Score helpers shared by the forward and both backward kernels.
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x, FAST_TANH: tl.constexpr):
    if FAST_TANH:
        # One special-function (MUFU) instruction, max relative error about 2^-11, below
        # bf16/fp16 rounding. The exp2 form below needs two (ex2 and rcp) on top of the
        # softmax's own exp2, on the unit whose throughput already paces the softmax. (Used for
        # 16-bit inputs only; not timed against the exp2 form.)
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # tanh(x) = 1 - 2 / (e^(2x) + 1): exact limits at +-inf, no NaN, fp32-accurate.
        return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even also under the interpreter."""
    if _IN_INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _dot(a, b):
    if _IN_INTERPRETER and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc):
    if _IN_INTERPRETER and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _log2_scores(qk, rows, cols, qk_scale, cap_log2, cap_inv_scale, slope_log2, pad_log2,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr,
                 FAST_TANH: tl.constexpr, TRANS: tl.constexpr):
    """Scores times log2(e), so the softmax runs on exp2; also tanh for the softcap gradient.

    ``qk`` is q . k, shaped (len(rows), len(cols)), or (len(cols), len(rows)) when ``TRANS``
    (the dK/dV kernel works on the transposed tile). ``qk_scale`` is scale*log2(e); with a
    softcap, ``cap_inv_scale`` is scale/cap and ``cap_log2`` is cap*log2(e); ``pad_log2`` is the
    key-padding row times log2(e), indexed like ``cols``.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_inv_scale, FAST_TANH)
        s = t * cap_log2
    else:
        t = qk
        s = qk * qk_scale
    if TRANS:
        if HAS_ALIBI:
            s += slope_log2 * (cols[:, None] - rows[None, :]).to(tl.float32)
        if HAS_PAD:
            s += pad_log2[:, None]
    else:
        if HAS_ALIBI:
            s += slope_log2 * (cols[None, :] - rows[:, None]).to(tl.float32)
        if HAS_PAD:
            s += pad_log2[None, :]
    return s, t


@triton.jit
def _band_keep(rows, cols, Skv, lo_off, hi_off, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, CHECK_COLS: tl.constexpr, TRANS: tl.constexpr):
    """True where key j is visible to query i: lo_off <= j - i <= hi_off (and j < Skv)."""
    if TRANS:
        r = rows[None, :]
        c = cols[:, None]
        keep = tl.full((cols.shape[0], rows.shape[0]), 1, tl.int1)
    else:
        r = rows[:, None]
        c = cols[None, :]
        keep = tl.full((rows.shape[0], cols.shape[0]), 1, tl.int1)
    if HAS_RIGHT:
        keep &= c <= r + hi_off
    if HAS_LEFT:
        keep &= c >= r + lo_off
    if CHECK_COLS:
        keep &= c < Skv
    return keep


@triton.jit
def _dropout_keep(seed, bh, rows, cols, Sq, Skv, dropout_p, TRANS: tl.constexpr):
    """The dropout keep-mask for (rows, cols) of head ``bh = b * Hq + h``."""
    row_base = (bh.to(tl.int64) * Sq + rows.to(tl.int64)) * Skv
    if TRANS:
        offs = row_base[None, :] + cols[:, None]
    else:
        offs = row_base[:, None] + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _load_tile(ptrs, idx, limit, offs_d, CHECK: tl.constexpr, HEAD_DIM: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load a (len(idx), BLOCK_D) tile; rows idx >= limit and columns >= HEAD_DIM read 0."""
    if CHECK:
        if EVEN_D:
            return tl.load(ptrs, mask=idx[:, None] < limit, other=0.0)
        else:
            return tl.load(ptrs, mask=(idx[:, None] < limit) & (offs_d[None, :] < HEAD_DIM),
                           other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _kv_range(start_m, Sq, Skv, lo_off, hi_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_N: tl.constexpr):
    """Key range of the query block at ``start_m``, as [lo, full_lo) masked, [full_lo, full_hi)
    needing no mask at all, [full_hi, hi) masked. Blocks outside [lo, hi) are skipped.

    Every bound is clamped to >= 0 before a division: Triton's integer division truncates toward
    zero, which would round a negative bound up to the next block instead of down.
    """
    last_row = tl.minimum(start_m + BLOCK_M, Sq) - 1
    lo = 0
    hi = Skv
    full_lo = 0
    if EVEN_N:
        full_hi = Skv
    else:
        full_hi = Skv // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(start_m + lo_off, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(last_row + lo_off, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(last_row + hi_off + 1, 0), Skv)
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + hi_off + 1, 0) // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _q_range(start_n, Sq, Skv, lo_off, hi_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_M: tl.constexpr):
    """Query range of the key block at ``start_n``; the transpose of :func:`_kv_range`."""
    last_col = tl.minimum(start_n + BLOCK_N, Skv) - 1
    lo = 0
    hi = Sq
    full_lo = 0
    if EVEN_M:
        full_hi = Sq
    else:
        full_hi = Sq // BLOCK_M * BLOCK_M
    if HAS_RIGHT:
        lo = tl.maximum(start_n - hi_off, 0) // BLOCK_M * BLOCK_M
        full_lo = (tl.maximum(last_col - hi_off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(last_col - lo_off + 1, 0), Sq)
        full_hi = tl.minimum(full_hi, tl.maximum(start_n - lo_off + 1, 0) // BLOCK_M * BLOCK_M)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_program(BLOCK_M: tl.constexpr, Hq, GROUP, LAST_FIRST: tl.constexpr):
    """``(start_m, h, b, bh, hk, rows)`` of a program over (query blocks, query heads, batch):
    its first query row, query head, batch index, flat head index b * Hq + h, kv head and rows.
    ``LAST_FIRST`` runs the query blocks last-to-first: under a causal mask the last block has
    the most keys, and launching the longest programs first shortens the tail of the grid."""
    if LAST_FIRST:
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    return start_m, h, b, b * Hq + h, h // GROUP, start_m + tl.arange(0, BLOCK_M)


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_step(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, PAD, seed, bh,
                   rows, offs_d, start_n, band_lo, band_hi, Sq, Skv,
                   qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off, dropout_p,
                   MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr):
    """One key block of the online softmax."""
    CHECK_COLS: tl.constexpr = MASKED and not EVEN_N
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :], cols, Skv, offs_d,
                   CHECK_COLS, HEAD_DIM, EVEN_D)
    qk = _dot(q, tl.trans(k))
    if MASKED or HAS_SOFTCAP or HAS_ALIBI or HAS_PAD:
        pad_log2 = 0.0
        if HAS_PAD:
            pad_log2 = tl.load(PAD + cols, mask=cols < Skv, other=0.0).to(tl.float32) * _LOG2E_C
        s, _ = _log2_scores(qk, rows, cols, qk_scale, cap_log2, cap_inv_scale, slope_log2,
                            pad_log2, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, FAST_TANH, False)
        if MASKED:
            if HAS_LEFT and HAS_RIGHT:
                # The band's one loop (see the kernel): only blocks outside [band_lo, band_hi)
                # cross an edge; the others skip the mask (a branch uniform over the program).
                if (start_n < band_lo) | (start_n + BLOCK_N > band_hi):
                    keep = _band_keep(rows, cols, Skv, lo_off, hi_off, HAS_LEFT, HAS_RIGHT,
                                      CHECK_COLS, False)
                    s = tl.where(keep, s, float("-inf"))
            else:
                keep = _band_keep(rows, cols, Skv, lo_off, hi_off, HAS_LEFT, HAS_RIGHT, CHECK_COLS,
                                  False)
                s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far has m_new = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) = 0 rather than NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
    else:
        # Plain scores: the row max of qk scales to the row max of the scores (scale > 0), and
        # the scaling folds into the exponent's argument as one FMA per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, rows, cols, Sq, Skv, dropout_p, False), p, 0.0)
    v = _load_tile(V + cols[:, None] * stride_vn + offs_d[None, :], cols, Skv, offs_d,
                   CHECK_COLS, HEAD_DIM, EVEN_D)
    acc = _dot_acc(_cast(p, v.dtype), v, acc)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, PAD, seed, bh,
                    rows, offs_d, start, stop, band_lo, band_hi, Sq, Skv,
                    qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off, dropout_p,
                    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr):
    if _IN_INTERPRETER:
        start_n = start
        while start_n < stop:
            acc, l_i, m_i = _attn_fwd_step(
                acc, l_i, m_i, q, K, V, stride_kn, stride_vn, PAD, seed, bh, rows, offs_d,
                start_n, band_lo, band_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2,
                lo_off, hi_off, dropout_p, MASKED, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT,
                HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
            start_n += BLOCK_N
    else:
        for start_n in range(start, stop, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_step(
                acc, l_i, m_i, q, K, V, stride_kn, stride_vn, PAD, seed, bh, rows, offs_d,
                tl.multiple_of(start_n, BLOCK_N), band_lo, band_hi, Sq, Skv, qk_scale, cap_log2,
                cap_inv_scale, slope_log2, lo_off, hi_off, dropout_p, MASKED, HEAD_DIM, BLOCK_N,
                EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT,
                FAST_TANH)
    return acc, l_i, m_i


# Block shapes, (BLOCK_M, BLOCK_N, num_warps, num_stages), per head-dim class (padded head dim
# <= 128, or 256); the autotuner picks among them per (sequence-length bucket, head dim, variant).
# BLOCK_M is the query block and BLOCK_N the key block in every kernel. Measured on H200, bf16,
# D=128, B=4, H=16, S=4096 (benchmarks/NOTES_attention.md has every candidate):
# - forward: 128x64, 8 warps, 3 stages is fastest causal (0.612 ms; 128x128: 0.618; 64x64: 0.643);
#   128x128, 8 warps, 3 stages fastest without a causal mask (plain 1.070 ms vs 1.122 for
#   128x64) and with ALiBi (0.661 vs 0.682); 64x64, 4 warps, 3 stages uses 112 KB of shared
#   memory, so two programs share an SM and hide each other's prologue and epilogue: fastest
#   when programs are short, window 512 (0.220 ms vs 0.252 for 128x64) and S=1024. Dropped:
#   64x64 with 4 stages (144 KB, one program per SM, 28% slower causal at S=1024), 128x64 with 4
#   stages (never fastest), 128x64 with 2 stages capped at 128 registers for two programs per
#   SM (spills; 3% slower causal).
# - dK/dV: 64x128, 8 warps, fastest causal (backward 1.835 ms vs 1.91-2.17 for the others) even
#   though it spills 48 registers; 32x64, 4 warps, fastest for the window (0.631 vs 0.653 ms) and
#   at S=1024; 16x64 and 32x128 never won.
# - dQ: 128x64, 8 warps, fastest causal; 128x32, 8 warps, for the window (0.661 vs 0.670 ms);
#   64x32, 4 warps, 4 stages for short sequences.
# The 256 column is sized to fit shared memory and registers and is correctness-tested on the
# GPU, not timed.
_FWD_CONFIGS = {
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (64, 32, 4, 3)],
}
_DKDV_CONFIGS = {
    128: [(64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 4)],
    256: [(32, 64, 8, 2), (16, 32, 4, 2)],
}
_DQ_CONFIGS = {
    128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# Under the interpreter one small fixed shape per kernel keeps the CPU tests fast; BLOCK_M !=
# BLOCK_N so the tests exercise the range arithmetic that the GPU shapes rely on.
_INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
# (queries, keys) of the dS tiles the dK/dV kernel stores for the stored-dS backward (see
# _ds_layout): the dK/dV shape the window 512 picks (32x64), so storing dS pins no worse shape.
_DS_BLOCK = _INTERPRET_CONFIGS["dkdv"][:2] if _INTERPRET else (32, 64)


# Autotuning is keyed on the sequence lengths rounded up to a power of two (capped at 16k, so a
# new length rarely triggers a new tuning run), the padded head dim and the variant flags; Triton
# adds the dtypes of the tensor arguments itself.
_TUNE_KEY = ["SQ_KEY", "SKV_KEY", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
             "HAS_PAD", "HAS_DROPOUT"]


def _configs(kernel, table):
    shapes = [_INTERPRET_CONFIGS[kernel]] if _INTERPRET else sum(table.values(), [])
    return [triton.Config({"BLOCK_M": s[0], "BLOCK_N": s[1]}, num_warps=s[2], num_stages=s[3])
            for s in dict.fromkeys(shapes)]


def _pruner(table):
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        wanted = table[128 if kwargs["BLOCK_D"] <= 128 else 256]
        if kwargs.get("STORE_DS"):  # the stored dS tiles have the shape of _DS_BLOCK
            wanted = [w for w in wanted if (w[0], w[1]) == _DS_BLOCK]
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in wanted]
    return prune


def _tuned(kernel, table, extra_key=()):
    """Autotuning over ``table``'s block shapes (see above) and the EVEN_M / EVEN_N heuristics,
    the decorators every kernel of this module carries."""
    def wrap(fn):
        fn = triton.heuristics({
            "EVEN_M": lambda a: a["Sq"] % a["BLOCK_M"] == 0,
            "EVEN_N": lambda a: a["Skv"] % a["BLOCK_N"] == 0,
        })(fn)
        return triton.autotune(configs=_configs(kernel, table), key=_TUNE_KEY + list(extra_key),
                               prune_configs_by={"early_config_prune": _pruner(table)})(fn)
    return wrap


@_tuned("fwd", _FWD_CONFIGS)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, ALIBI, PAD, SEED,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_padb,
    Hq, GROUP, Sq, Skv, SQ_KEY, SKV_KEY,
    qk_scale, cap_log2, cap_inv_scale, lo_off, hi_off, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FAST_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_m, h, b, bh, hk, rows = _query_program(BLOCK_M, Hq, GROUP, True)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    Qb = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    Kb = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    Vb = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = _load_tile(Qb + rows[:, None] * stride_qm + offs_d[None, :], rows, Sq, offs_d,
                   not EVEN_M, HEAD_DIM, EVEN_D)

    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI + h).to(tl.float32) * _LOG2E_C
    PADb = PAD
    if HAS_PAD:
        PADb = PAD + b.to(tl.int64) * stride_padb
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    lo, full_lo, full_hi, hi = _kv_range(start_m, Sq, Skv, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                         HAS_LEFT, HAS_RIGHT, EVEN_N)
    # A band (both sides bounded, e.g. a sliding window) has few key blocks and a large share of
    # them cut by an edge; one masked loop beats three loops, each of which refills the load
    # pipeline (window 512, S=4096, D=128 on H200: forward 2% and backward 9% faster). Inside that
    # loop the blocks in [full_lo, full_hi) skip the mask by a branch uniform over the program:
    # window 512 forward 6-7% faster on H100 (0.207-0.210 against 0.222 ms, same run,
    # results/attention_nvidia-h100-80gb-hbm3_band_*.md). The same branch in the two backward
    # kernels made forward+backward 1% slower there, so they mask every block of the band.
    if HAS_LEFT and HAS_RIGHT:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d, lo, hi,
            full_lo, full_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off,
            hi_off, dropout_p, True, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
    else:
        if HAS_LEFT:
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d, lo,
                full_lo, full_lo, full_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2,
                lo_off, hi_off, dropout_p, True, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT,
                HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d, full_lo,
            full_hi, full_lo, full_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2,
            lo_off, hi_off, dropout_p, False, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
        if HAS_RIGHT or not EVEN_N:
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d,
                full_hi, hi, full_lo, full_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale,
                slope_log2, lo_off, hi_off, dropout_p, True, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)

    visible = l_i > 0.0
    inv_l = tl.where(visible, 1.0 / tl.where(visible, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(visible, (m_i + tl.math.log2(tl.where(visible, l_i, 1.0))) * _LN2_C,
                   float("-inf"))
    Ob = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = Ob + rows[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty),
             mask=(rows[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + bh.to(tl.int64) * Sq + rows, lse, mask=rows < Sq)


# --------------------------------------------------------------------------------------------
# Backward, two launches. First dQ, a program per query block; it also computes
# delta_i = rowsum(dO_i * O_i) and the log2-domain log-sum-exp of its rows and stores them for the
# second, so no separate preprocessing launch is needed. Then dK/dV, a program per key block that
# walks every query head of its group, so GQA gradients are summed in registers and never need
# repeated K/V or a reduction pass.
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dkdv_step(dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DSk, ds_lo, stride_qm, stride_dom,
                         seed, bh, cols, offs_d, start_m, Sq, Skv,
                         qk_scale, cap_log2, cap_inv_scale, slope_log2, pad_log2,
                         lo_off, hi_off, dropout_p,
                         MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                         HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr,
                         STORE_DS: tl.constexpr):
    # Works on transposed tiles (keys x queries) so per-query vectors broadcast along axis 0 and
    # dK, dV accumulate as plain (keys x D) products. With STORE_DS the tile's dS^T also goes to
    # memory (see _ds_layout) for the dQ kernel that reads it instead of recomputing it.
    CHECK_ROWS: tl.constexpr = MASKED and not EVEN_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Qh + rows[:, None] * stride_qm + offs_d[None, :], rows, Sq, offs_d,
                   CHECK_ROWS, HEAD_DIM, EVEN_D)
    if CHECK_ROWS:
        lse2 = tl.load(LSE2h + rows, mask=rows < Sq, other=float("inf"))
    else:
        lse2 = tl.load(LSE2h + rows)
    qkT = _dot(k, tl.trans(q))
    sT, tT = _log2_scores(qkT, rows, cols, qk_scale, cap_log2, cap_inv_scale, slope_log2,
                          pad_log2, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, FAST_TANH, True)
    pT = tl.math.exp2(sT - lse2[None, :])
    if MASKED and (HAS_LEFT or HAS_RIGHT):
        keep = _band_keep(rows, cols, Skv, lo_off, hi_off, HAS_LEFT, HAS_RIGHT, False, True)
        pT = tl.where(keep, pT, 0.0)
    do = _load_tile(DOh + rows[:, None] * stride_dom + offs_d[None, :], rows, Sq, offs_d,
                    CHECK_ROWS, HEAD_DIM, EVEN_D)
    dpT = _dot(v, tl.trans(do))
    if HAS_DROPOUT:
        zT = _dropout_keep(seed, bh, rows, cols, Sq, Skv, dropout_p, True)
        drop_scale = 1.0 / (1.0 - dropout_p)
        dv = _dot_acc(_cast(tl.where(zT, pT * drop_scale, 0.0), do.dtype), do, dv)
        dpT = tl.where(zT, dpT * drop_scale, 0.0)
    else:
        dv = _dot_acc(_cast(pT, do.dtype), do, dv)
    if CHECK_ROWS:
        delta = tl.load(DELTAh + rows, mask=rows < Sq, other=0.0)
    else:
        delta = tl.load(DELTAh + rows)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dsT = _cast(dsT, q.dtype)
    if STORE_DS:
        keys = tl.arange(0, dsT.shape[0])
        ds_ptrs = DSk + (rows[None, :] - ds_lo) * dsT.shape[0] + keys[:, None]
        if CHECK_ROWS:
            tl.store(ds_ptrs, dsT, mask=rows[None, :] < Sq)
        else:
            tl.store(ds_ptrs, dsT)
    dk = _dot_acc(dsT, q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DSk, ds_lo, stride_qm, stride_dom,
                         seed, bh, cols, offs_d, start, stop, Sq, Skv,
                         qk_scale, cap_log2, cap_inv_scale, slope_log2, pad_log2,
                         lo_off, hi_off, dropout_p,
                         MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                         HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr,
                         STORE_DS: tl.constexpr):
    if _IN_INTERPRETER:
        start_m = start
        while start_m < stop:
            dk, dv = _attn_bwd_dkdv_step(
                dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DSk, ds_lo, stride_qm, stride_dom, seed,
                bh, cols, offs_d, start_m, Sq, Skv, qk_scale, cap_log2, cap_inv_scale,
                slope_log2, pad_log2, lo_off, hi_off, dropout_p, MASKED, HEAD_DIM, BLOCK_M,
                EVEN_M, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD,
                HAS_DROPOUT, FAST_TANH, STORE_DS)
            start_m += BLOCK_M
    else:
        for start_m in range(start, stop, BLOCK_M):
            dk, dv = _attn_bwd_dkdv_step(
                dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DSk, ds_lo, stride_qm, stride_dom, seed,
                bh, cols, offs_d, tl.multiple_of(start_m, BLOCK_M), Sq, Skv, qk_scale, cap_log2,
                cap_inv_scale, slope_log2, pad_log2, lo_off, hi_off, dropout_p, MASKED, HEAD_DIM,
                BLOCK_M, EVEN_M, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD,
                HAS_DROPOUT, FAST_TANH, STORE_DS)
    return dk, dv


@_tuned("dkdv", _DKDV_CONFIGS, extra_key=("STORE_DS",))
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA, ALIBI, PAD, SEED, DS, ds_span,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_padb,
    Hq, GROUP, Sq, Skv, SQ_KEY, SKV_KEY,
    scale, qk_scale, cap_log2, cap_inv_scale, lo_off, hi_off, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FAST_TANH: tl.constexpr, STORE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                   + cols[:, None] * stride_kn + offs_d[None, :], cols, Skv, offs_d,
                   not EVEN_N, HEAD_DIM, EVEN_D)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                   + cols[:, None] * stride_vn + offs_d[None, :], cols, Skv, offs_d,
                   not EVEN_N, HEAD_DIM, EVEN_D)
    pad_log2 = 0.0
    if HAS_PAD:
        pad_log2 = tl.load(PAD + b.to(tl.int64) * stride_padb + cols, mask=cols < Skv,
                           other=0.0).to(tl.float32) * _LOG2E_C
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo, full_lo, full_hi, hi = _q_range(start_n, Sq, Skv, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                        HAS_LEFT, HAS_RIGHT, EVEN_M)
    # A plain while loop: it holds no loads of its own to pipeline, and it also runs under the
    # interpreter (see _IN_INTERPRETER).
    g = 0
    while g < GROUP:
        h = hk * GROUP + g
        bh = b * Hq + h
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSE2h = LSE2 + bh.to(tl.int64) * Sq
        DELTAh = DELTA + bh.to(tl.int64) * Sq
        slope_log2 = 0.0
        if HAS_ALIBI:
            slope_log2 = tl.load(ALIBI + h).to(tl.float32) * _LOG2E_C
        if HAS_LEFT and HAS_RIGHT:
            DSk = DS
            if STORE_DS:
                DSk = DS + ((bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0))
                            * ds_span * BLOCK_N)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DSk, lo, stride_qm, stride_dom, seed, bh,
                cols, offs_d, lo, hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2,
                pad_log2, lo_off, hi_off, dropout_p, True, HEAD_DIM, BLOCK_M, EVEN_M, EVEN_D,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH,
                STORE_DS)
        else:
            if HAS_RIGHT:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DS, lo, stride_qm, stride_dom, seed,
                    bh, cols, offs_d, lo, full_lo, Sq, Skv, qk_scale, cap_log2, cap_inv_scale,
                    slope_log2, pad_log2, lo_off, hi_off, dropout_p, True, HEAD_DIM, BLOCK_M,
                    EVEN_M, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD,
                    HAS_DROPOUT, FAST_TANH, False)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DS, lo, stride_qm, stride_dom, seed, bh,
                cols, offs_d, full_lo, full_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale,
                slope_log2, pad_log2, lo_off, hi_off, dropout_p, False, HEAD_DIM, BLOCK_M, EVEN_M,
                EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT,
                FAST_TANH, False)
            if HAS_LEFT or not EVEN_M:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, DS, lo, stride_qm, stride_dom, seed,
                    bh, cols, offs_d, full_hi, hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale,
                    slope_log2, pad_log2, lo_off, hi_off, dropout_p, True, HEAD_DIM, BLOCK_M,
                    EVEN_M, EVEN_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD,
                    HAS_DROPOUT, FAST_TANH, False)
        g += 1
    mask = (cols[:, None] < Skv) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + cols[:, None] * stride_dkn + offs_d[None, :],
             _cast(dk * scale, DK.dtype.element_ty), mask=mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + cols[:, None] * stride_dvn + offs_d[None, :],
             _cast(dv, DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_step(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, PAD, seed, bh,
                       rows, offs_d, start_n, Sq, Skv,
                       qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off, dropout_p,
                       MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr):
    CHECK_COLS: tl.constexpr = MASKED and not EVEN_N
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + cols[:, None] * stride_kn + offs_d[None, :], cols, Skv, offs_d,
                   CHECK_COLS, HEAD_DIM, EVEN_D)
    v = _load_tile(V + cols[:, None] * stride_vn + offs_d[None, :], cols, Skv, offs_d,
                   CHECK_COLS, HEAD_DIM, EVEN_D)
    qk = _dot(q, tl.trans(k))
    pad_log2 = 0.0
    if HAS_PAD:
        pad_log2 = tl.load(PAD + cols, mask=cols < Skv, other=0.0).to(tl.float32) * _LOG2E_C
    s, t = _log2_scores(qk, rows, cols, qk_scale, cap_log2, cap_inv_scale, slope_log2,
                        pad_log2, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, FAST_TANH, False)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        keep = _band_keep(rows, cols, Skv, lo_off, hi_off, HAS_LEFT, HAS_RIGHT, CHECK_COLS,
                          False)
        p = tl.where(keep, p, 0.0)
    dp = _dot(do, tl.trans(v))
    if HAS_DROPOUT:
        z = _dropout_keep(seed, bh, rows, cols, Sq, Skv, dropout_p, False)
        dp = tl.where(z, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = _dot_acc(_cast(ds, k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, PAD, seed, bh,
                       rows, offs_d, start, stop, Sq, Skv,
                       qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off, dropout_p,
                       MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, FAST_TANH: tl.constexpr):
    if _IN_INTERPRETER:
        start_n = start
        while start_n < stop:
            dq = _attn_bwd_dq_step(
                dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, PAD, seed, bh, rows, offs_d,
                start_n, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off,
                dropout_p, MASKED, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
            start_n += BLOCK_N
    else:
        for start_n in range(start, stop, BLOCK_N):
            dq = _attn_bwd_dq_step(
                dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, PAD, seed, bh, rows, offs_d,
                tl.multiple_of(start_n, BLOCK_N), Sq, Skv, qk_scale, cap_log2, cap_inv_scale,
                slope_log2, lo_off, hi_off, dropout_p, MASKED, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
    return dq


@triton.jit
def _delta_and_lse2(o, do, LSE, DLSE, LSE2, DELTA, row_offs, rows, Sq, HAS_DLSE: tl.constexpr):
    """Stores and returns delta = rowsum(dO * O) - dlse and lse2 = lse * log2(e) of ``rows``, the
    per-row terms of the backward (the dQ kernel's prologue)."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    # d lse_i / d s_ij = p_ij, so a gradient on the log-sum-exp folds into delta:
    # ds = p * (dp - delta) + p * dlse = p * (dp - (delta - dlse)).
    if HAS_DLSE:
        delta -= tl.load(DLSE + row_offs, mask=rows < Sq, other=0.0)
    # Rows with no visible key (lse = -inf) and rows past Sq get +inf, which makes every
    # recomputed p = exp2(s - lse2) exactly 0 there.
    lse = tl.load(LSE + row_offs, mask=rows < Sq, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_C)
    tl.store(DELTA + row_offs, delta, mask=rows < Sq)
    tl.store(LSE2 + row_offs, lse2, mask=rows < Sq)
    return delta, lse2


@_tuned("dq", _DQ_CONFIGS)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DLSE, LSE2, DELTA, ALIBI, PAD, SEED,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_padb,
    Hq, GROUP, Sq, Skv, SQ_KEY, SKV_KEY,
    scale, qk_scale, cap_log2, cap_inv_scale, lo_off, hi_off, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FAST_TANH: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_m, h, b, bh, hk, rows = _query_program(BLOCK_M, Hq, GROUP, True)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                   + rows[:, None] * stride_qm + offs_d[None, :], rows, Sq, offs_d,
                   not EVEN_M, HEAD_DIM, EVEN_D)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + rows[:, None] * stride_dom + offs_d[None, :], rows, Sq, offs_d,
                    not EVEN_M, HEAD_DIM, EVEN_D)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                   + rows[:, None] * stride_om + offs_d[None, :], rows, Sq, offs_d,
                   not EVEN_M, HEAD_DIM, EVEN_D)
    delta, lse2 = _delta_and_lse2(o, do, LSE, DLSE, LSE2, DELTA, bh.to(tl.int64) * Sq + rows,
                                  rows, Sq, HAS_DLSE)
    Kb = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    Vb = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI + h).to(tl.float32) * _LOG2E_C
    PADb = PAD
    if HAS_PAD:
        PADb = PAD + b.to(tl.int64) * stride_padb
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, full_lo, full_hi, hi = _kv_range(start_m, Sq, Skv, lo_off, hi_off, BLOCK_M, BLOCK_N,
                                         HAS_LEFT, HAS_RIGHT, EVEN_N)
    if HAS_LEFT and HAS_RIGHT:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d,
            lo, hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off,
            dropout_p, True, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
    else:
        if HAS_LEFT:
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d,
                lo, full_lo, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off,
                hi_off, dropout_p, True, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d,
            full_lo, full_hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off,
            hi_off, dropout_p, False, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
        if HAS_RIGHT or not EVEN_N:
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, Kb, Vb, stride_kn, stride_vn, PADb, seed, bh, rows, offs_d,
                full_hi, hi, Sq, Skv, qk_scale, cap_log2, cap_inv_scale, slope_log2, lo_off, hi_off,
                dropout_p, True, HEAD_DIM, BLOCK_N, EVEN_N, EVEN_D, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_ALIBI, HAS_PAD, HAS_DROPOUT, FAST_TANH)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows[:, None] * stride_dqm + offs_d[None, :],
             _cast(dq * scale, DQ.dtype.element_ty),
             mask=(rows[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Stored-dS backward, for bands (windows bounded on both sides). The dQ kernel above recomputes
# q k^T, p, dO v^T and dS, which the dK/dV kernel has also computed: 3 of the backward's 7 products
# per block pair. Within a band of width w a key block's dS^T has about w + BLOCK_N rows, so it
# can be kept: the dK/dV kernel stores every dS^T tile it makes (in the input dtype, the values it
# feeds its own dS^T q product), and dQ becomes one product per tile, dq = dS k, read back from
# memory. Order: a light kernel for delta and the log2 log-sum-exp (the dQ kernel's prologue),
# dK/dV with STORE_DS, then _attn_bwd_dq_ds_kernel.
#
# _ds_layout: per (b, h, key block kb) a dense (span, BLOCK_N) row-major slab, row r - lo(kb) for
# query r, where [lo(kb), hi(kb)) is the query range _q_range gives the dK/dV kernel for kb with
# _DS_BLOCK's shape; span (host side, _ds_span) is the longest range rounded up to whole query
# steps. Rows outside [lo, hi) of a slab are never read: their dS is zero by the band.
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_prep_kernel(O, DO, LSE, DLSE, LSE2, DELTA,
                          stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                          Hq, Sq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta and lse2 (_delta_and_lse2) for the stored-dS backward, whose dK/dV kernel runs
    first."""
    start_m, h, b, bh, _, rows = _query_program(BLOCK_M, Hq, 1, False)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                   + rows[:, None] * stride_om + offs_d[None, :], rows, Sq, offs_d,
                   True, HEAD_DIM, EVEN_D)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                    + rows[:, None] * stride_dom + offs_d[None, :], rows, Sq, offs_d,
                    True, HEAD_DIM, EVEN_D)
    _delta_and_lse2(o, do, LSE, DLSE, LSE2, DELTA, bh.to(tl.int64) * Sq + rows, rows, Sq,
                    HAS_DLSE)


@triton.jit
def _attn_bwd_dq_ds_step(dq, DSh, Kb, stride_kn, rows, keys, offs_d, start_n, Sq, Skv,
                         lo_off, hi_off, ds_span, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                         DS_BM: tl.constexpr, DS_BN: tl.constexpr):
    q_lo, _, _, q_hi = _q_range(start_n, Sq, Skv, lo_off, hi_off, DS_BM, DS_BN, HAS_LEFT,
                                HAS_RIGHT, True)
    cols = start_n + keys
    slab = DSh + (start_n // DS_BN).to(tl.int64) * ds_span * DS_BN
    valid = (rows >= q_lo) & (rows < q_hi)
    ds = tl.load(slab + (rows - q_lo)[:, None] * DS_BN + keys[None, :],
                 mask=valid[:, None] & (cols[None, :] < Skv), other=0.0)
    k = _load_tile(Kb + cols[:, None] * stride_kn + offs_d[None, :], cols, Skv, offs_d, True,
                   HEAD_DIM, EVEN_D)
    return _dot_acc(ds, k, dq)


@triton.autotune(
    configs=[triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=st)
             for m, w, st in ([(16, 4, 1)] if _INTERPRET else
                              [(128, 8, 3), (128, 4, 3), (64, 4, 4)])],
    key=["SQ_KEY", "SKV_KEY", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT"])
@triton.jit
def _attn_bwd_dq_ds_kernel(
    DS, K, DQ,
    stride_kb, stride_kh, stride_kn, stride_dqb, stride_dqh, stride_dqm,
    Hq, GROUP, Sq, Skv, SQ_KEY, SKV_KEY, scale, lo_off, hi_off, ds_span,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DS_BM: tl.constexpr, DS_BN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dq = scale * sum over the band's key blocks of dS k, dS read from _ds_layout."""
    start_m, h, b, bh, hk, rows = _query_program(BLOCK_M, Hq, GROUP, False)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    keys = tl.arange(0, DS_BN)
    offs_d = tl.arange(0, BLOCK_D)
    DSh = DS + bh.to(tl.int64) * tl.cdiv(Skv, DS_BN) * ds_span * DS_BN
    Kb = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    lo, _, _, hi = _kv_range(start_m, Sq, Skv, lo_off, hi_off, BLOCK_M, DS_BN, HAS_LEFT,
                             HAS_RIGHT, True)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if _IN_INTERPRETER:
        start_n = lo
        while start_n < hi:
            dq = _attn_bwd_dq_ds_step(dq, DSh, Kb, stride_kn, rows, keys, offs_d, start_n, Sq,
                                      Skv, lo_off, hi_off, ds_span, HEAD_DIM, EVEN_D, HAS_LEFT,
                                      HAS_RIGHT, DS_BM, DS_BN)
            start_n += DS_BN
    else:
        for start_n in range(lo, hi, DS_BN):
            dq = _attn_bwd_dq_ds_step(dq, DSh, Kb, stride_kn, rows, keys, offs_d,
                                      tl.multiple_of(start_n, DS_BN), Sq, Skv, lo_off, hi_off,
                                      ds_span, HEAD_DIM, EVEN_D, HAS_LEFT, HAS_RIGHT, DS_BM,
                                      DS_BN)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows[:, None] * stride_dqm + offs_d[None, :],
             _cast(dq * scale, DQ.dtype.element_ty),
             mask=(rows[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_mask_kernel(SEED, OUT, Sq, Skv, dropout_p, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(2)
    keep = _dropout_keep(tl.load(SEED), bh, rows, cols, Sq, Skv, dropout_p, False)
    offs = (bh.to(tl.int64) * Sq + rows.to(tl.int64))[:, None] * Skv + cols[None, :]
    tl.store(OUT + offs, keep.to(tl.int8), mask=(rows[:, None] < Sq) & (cols[None, :] < Skv))


# --------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels address the head dim with unit stride (16-byte vector loads); any other
    # stride on the other three dims is used as given.
    return t if t.stride(-1) == 1 else t.contiguous()


_row_strides = _launch.row_strides  # (the head dim is unit-stride: _unit_last)


def _band(sq: int, skv: int, causal: bool, causal_align: str, window_left: Optional[int],
          window_right: Optional[int]):
    """(has_left, has_right, lo_off, hi_off): key j is visible to query i iff
    lo_off <= j - i <= hi_off, each side only when present."""
    off = 0 if causal_align == "top_left" else skv - sq
    right = window_right
    if causal:
        right = 0 if right is None else min(right, 0)
    limit = sq + skv  # a side at least this wide never masks anything
    has_left = window_left is not None and window_left < limit
    has_right = right is not None and right < limit
    lo_off = off - max(window_left, -limit) if has_left else 0
    hi_off = off + max(right, -limit) if has_right else 0
    return has_left, has_right, lo_off, hi_off


def _common_args(q, k, scale, causal, causal_align, window_left, window_right, alibi_slopes,
                 softcap, key_padding_mask, dropout_p):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    has_left, has_right, lo_off, hi_off = _band(Sq, Skv, causal, causal_align, window_left,
                                                window_right)
    has_softcap = softcap is not None and softcap > 0.0
    cap = softcap if has_softcap else 1.0
    pad = None if key_padding_mask is None else _unit_last(key_padding_mask)
    alibi = None if alibi_slopes is None else alibi_slopes.contiguous()
    meta = dict(
        HEAD_DIM=D, BLOCK_D=max(16, _next_pow2(D)),
        HAS_LEFT=has_left, HAS_RIGHT=has_right, HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=alibi is not None, HAS_PAD=pad is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        FAST_TANH=has_softcap and not _INTERPRET and q.dtype != torch.float32,
    )
    scalars = dict(
        Hq=Hq, GROUP=Hq // Hkv, Sq=Sq, Skv=Skv,
        SQ_KEY=min(_next_pow2(Sq), 16384), SKV_KEY=min(_next_pow2(Skv), 16384),
        qk_scale=scale * _LOG2E, cap_log2=cap * _LOG2E, cap_inv_scale=scale / cap,
        lo_off=lo_off, hi_off=hi_off, dropout_p=float(dropout_p),
    )
    return pad, alibi, meta, scalars


# Which forward kernel runs: "auto" (the rule below), "triton" or "gluon" (the Hopper kernel of
# flash_attention_sm90 wherever it supports the call). Settable for A/B runs; the environment
# variable REWRITER_ATTENTION_FORWARD sets the initial value.
FORWARD_KERNEL = os.environ.get("REWRITER_ATTENTION_FORWARD", "auto")


def _sm90_choice(mode: str, head_dim: int, has_left: bool, sq: int, skv: int) -> bool:
    """Whether a call the Gluon Hopper kernel supports should run it, by ``mode`` ("auto",
    "triton" or "gluon").

    "auto" takes it where it measured faster than this module's Triton forward (H100, bf16,
    B*S = 16k, H = 16; benchmarks/results/attention_sm90_*.md): head dim 128 without a left window
    edge and with at least 1024 queries and 2048 keys (causal S = 4096 1.09x, S = 16384 1.12x,
    plain S = 4096 1.07x; S = 1024 1.00x). It loses on sliding windows (0.91x: short programs, one
    per SM, pay the pipeline fill that the Triton kernel hides with two) and at head dim 64 below
    16k keys (0.82-0.98x), so those keep the Triton kernel.
    """
    if mode == "gluon":
        return True
    if mode != "auto":
        return False
    return head_dim == 128 and not has_left and sq >= 1024 and skv >= 2048


def _use_sm90(q, k, v, meta, alibi, softcap, pad, dropout_p) -> bool:
    if FORWARD_KERNEL == "triton" or _INTERPRET or not q.is_cuda or _sm90.DISABLED is not None:
        return False
    try:
        if not _sm90.supported(q, k, v, alibi_slopes=alibi, softcap=softcap,
                               key_padding_mask=pad, dropout_p=dropout_p):
            return False
    except Exception as exc:  # never let the check itself break the call
        _sm90.disable(exc)
        return False
    return _sm90_choice(FORWARD_KERNEL, q.shape[-1], meta["HAS_LEFT"], q.shape[2], k.shape[2])


# Which dK/dV kernel the backward runs: "auto" (the rule below), "triton" or "gluon" (the Hopper
# kernel of flash_attention_sm90 wherever it supports the call); env REWRITER_ATTENTION_BACKWARD.
BACKWARD_KERNEL = os.environ.get("REWRITER_ATTENTION_BACKWARD", "auto")


def _sm90_backward_choice(mode: str, head_dim: int, has_alibi: bool, has_left: bool,
                          has_right: bool, bf16: bool, sq: int, skv: int) -> bool:
    """Whether a backward the Gluon dK/dV kernel supports should run it, by ``mode``.

    "auto" takes it only where it measured faster than the Triton dK/dV kernel (H100, bf16,
    B*S = 16k, H = 16, D = 128, S = 4096, forward+backward, same process;
    benchmarks/results/attention_sm90_bwd_nvidia-h100-80gb-hbm3.md): causal ALiBi 1.04x, and
    1.04x again next to the Gluon dQ kernel (attention_sm90_dq_nvidia-h100-80gb-hbm3.md). Plain
    causal ties (1.00x) and the 512 window loses (0.94-0.96x), so those keep the Triton kernel,
    and so does what was not timed (non-causal ALiBi, fp16, Sq != Skv; the GPU tests cover
    those shapes for correctness, including key blocks that no query sees).
    """
    if mode == "gluon":
        return True
    if mode != "auto":
        return False
    return (head_dim == 128 and has_alibi and has_right and not has_left and bf16
            and sq == skv and sq >= 2048)


# Which dQ kernel the backward runs, as BACKWARD_KERNEL; env REWRITER_ATTENTION_DQ.
DQ_KERNEL = os.environ.get("REWRITER_ATTENTION_DQ", "auto")


def _sm90_dq_choice(mode: str, head_dim: int, has_alibi: bool, has_left: bool, has_right: bool,
                    bf16: bool, sq: int, skv: int) -> bool:
    """Whether a backward the Gluon dQ kernel supports should run it, by ``mode``.

    "auto" takes it where it measured faster than the Triton dQ kernel (H100, bf16, B*S = 16k,
    H = 16, D = 128, S = 4096, forward+backward, same process;
    benchmarks/results/attention_sm90_dq_nvidia-h100-80gb-hbm3.md): causal with the Triton dK/dV
    kernel 1.03x, causal ALiBi 1.03x (1.03x again with the Gluon dK/dV kernel on both sides).
    The 512 window loses (0.98x: short programs, as in the forward), so it keeps the Triton
    kernel, and so does what was not timed (no causal mask, fp16, head dim 64, Sq != Skv).
    """
    if mode == "gluon":
        return True
    if mode != "auto":
        return False
    return (head_dim == 128 and has_right and not has_left and bf16
            and sq == skv and sq >= 2048)


def _sm90_backward_plan(q, k, v, do, meta, alibi, softcap, pad, dropout_p):
    """``(dq, dkdv)``: whether the Gluon dQ and the Gluon dK/dV kernel run this backward. The
    support check runs once, and only when a kernel's mode and past launches leave it a
    candidate."""
    wanted = {kind: mode for kind, mode, failed in (
        ("dq", DQ_KERNEL, _sm90.DQ_DISABLED), ("dkdv", BACKWARD_KERNEL, _sm90.BACKWARD_DISABLED))
        if mode != "triton" and failed is None}
    if not wanted or _INTERPRET or not q.is_cuda:
        return False, False
    try:
        if not _sm90.supported_backward(q, k, v, do, alibi_slopes=alibi, softcap=softcap,
                                        key_padding_mask=pad, dropout_p=dropout_p):
            return False, False
    except Exception as exc:  # never let the check itself break the call
        for kind in wanted:
            (_sm90.disable_dq if kind == "dq" else _sm90.disable_backward)(exc)
        return False, False
    shape = (q.shape[-1], alibi is not None, meta["HAS_LEFT"], meta["HAS_RIGHT"],
             q.dtype == torch.bfloat16, q.shape[2], k.shape[2])
    return ("dq" in wanted and _sm90_dq_choice(wanted["dq"], *shape),
            "dkdv" in wanted and _sm90_backward_choice(wanted["dkdv"], *shape))


# Whether a band's backward stores dS for its dQ (the stored-dS backward above): "auto" (the rule
# in _ds_plan), "on" (every band, whatever the memory) or "off"; env REWRITER_ATTENTION_DS.
DS_BACKWARD = os.environ.get("REWRITER_ATTENTION_DS", "auto")
# "auto" keeps the stored dS to at most this many times the bytes of q (a 512-key window at head
# dim 128 needs about 4.8x; the buffer lives only during the backward).
DS_MAX_Q_RATIO = 8


@functools.lru_cache(maxsize=256)
def _ds_span(sq: int, skv: int, lo_off: int, hi_off: int, block_m: int, block_n: int) -> int:
    """Rows per key block of _ds_layout: the longest query range the dK/dV kernel walks for a
    band (both sides bounded), in whole query steps; mirrors _q_range. Cached: it costs ~80 us
    of host time to compute, on every backward of a shape that repeats."""
    start_n = torch.arange(0, skv, block_n, dtype=torch.int64)
    last_col = torch.clamp(start_n + block_n, max=skv) - 1
    lo = torch.clamp(start_n - hi_off, min=0) // block_m * block_m
    hi = torch.clamp(torch.clamp(last_col - lo_off + 1, min=0), max=sq)
    steps = torch.clamp(hi - lo, min=0).add(block_m - 1) // block_m
    return int(steps.max().item()) * block_m if len(steps) else 0


def _ds_plan(mode: str, q: torch.Tensor, skv: int, meta: dict, lo_off: int, hi_off: int) -> int:
    """The stored-dS backward's slab rows (_ds_span) if this backward takes it, else 0: only a
    band (a window bounded on both sides) at padded head dim <= 128, and under "auto" only when
    the buffer stays within DS_MAX_Q_RATIO x the bytes of q.

    Measured on an H100 (bf16, H = 16, D = 128, causal windows, forward+backward, CUDA-graph
    time, both modes in one process; benchmarks/results/attention_ds_h100.txt): 16k tokens at
    S = 4096, window 128 1.00x, 512 1.04-1.08x, 2048 1.08x; S = 16384, window 512 1.08x. The
    kernels: dK/dV 328 -> 382 us for the stores (window 512), dQ 274 -> 144 us plus 50 us for
    delta; bf16 dQ equal bit for bit to the recomputing kernel's there (same dS, same order)."""
    if mode not in ("auto", "on") or not (meta["HAS_LEFT"] and meta["HAS_RIGHT"]):
        return 0
    if meta["BLOCK_D"] > 128:
        return 0
    B, Hq, Sq, _ = q.shape
    bm, bn = _DS_BLOCK
    span = _ds_span(Sq, skv, lo_off, hi_off, bm, bn)
    if span == 0:
        return 0
    ds_elems = B * Hq * triton.cdiv(skv, bn) * span * bn
    if mode == "auto" and ds_elems > DS_MAX_Q_RATIO * q.numel():
        return 0
    return span


def _alloc_ds(numel: int, q: torch.Tensor) -> Optional[torch.Tensor]:
    """The stored-dS buffer, or None when the device cannot hold it now (the backward then
    recomputes dS in its dQ kernel, as without the stored-dS path)."""
    try:
        return torch.empty(numel, device=q.device, dtype=q.dtype)
    except torch.OutOfMemoryError:
        return None


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal: bool, causal_align: str, window_left: Optional[int],
                      window_right: Optional[int], alibi_slopes: Optional[torch.Tensor],
                      softcap: Optional[float], key_padding_mask: Optional[torch.Tensor],
                      dropout_p: float, seed: Optional[torch.Tensor]):
    """Launch the forward kernel; returns ``(out, lse)``, lse fp32 of shape (B, Hq, Sq).

    Arguments are those of the op ``rewriter::flash_attention``: ``scale`` explicit,
    ``window_left``/``window_right`` None for unbounded, ``key_padding_mask`` an additive float
    (B, Skv) tensor, ``seed`` a one-element int64 tensor on q's device when dropout_p > 0.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, Sq, D = q.shape
    pad, alibi, meta, scalars = _common_args(q, k, scale, causal, causal_align, window_left,
                                             window_right, alibi_slopes, softcap,
                                             key_padding_mask, dropout_p)
    if _use_sm90(q, k, v, meta, alibi, softcap, pad, dropout_p):
        try:
            return _sm90.attention_forward_sm90(q, k, v, scale, meta["HAS_LEFT"],
                                                meta["HAS_RIGHT"], scalars["lo_off"],
                                                scalars["hi_off"], alibi_slopes=alibi)
        except Exception as exc:  # e.g. a Triton build whose Gluon cannot compile the kernel
            _sm90.disable(exc)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)

    def grid(m):
        return (triton.cdiv(Sq, m["BLOCK_M"]), Hq, B)

    _launch.launch(
        _attn_fwd_kernel, grid,
        q, k, v, out, lse, alibi, pad, seed, *_row_strides(q, k, v, out),
        0 if pad is None else pad.stride(0),
        scalars["Hq"], scalars["GROUP"], Sq, scalars["Skv"], scalars["SQ_KEY"],
        scalars["SKV_KEY"], scalars["qk_scale"], scalars["cap_log2"], scalars["cap_inv_scale"],
        scalars["lo_off"], scalars["hi_off"], scalars["dropout_p"],
        **meta,
    )
    return out, lse


def attention_backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                       q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, scale: float, causal: bool, causal_align: str,
                       window_left: Optional[int], window_right: Optional[int],
                       alibi_slopes: Optional[torch.Tensor], softcap: Optional[float],
                       key_padding_mask: Optional[torch.Tensor], dropout_p: float,
                       seed: Optional[torch.Tensor]):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward`; ``grad_lse`` may be None."""
    q, k, v, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    do = _unit_last(grad_out)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    pad, alibi, meta, s = _common_args(q, k, scale, causal, causal_align, window_left,
                                       window_right, alibi_slopes, softcap, key_padding_mask,
                                       dropout_p)
    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    dlse = None if grad_lse is None else grad_lse.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    pad_stride = 0 if pad is None else pad.stride(0)
    tail = (s["Hq"], s["GROUP"], Sq, Skv, s["SQ_KEY"], s["SKV_KEY"], scale, s["qk_scale"],
            s["cap_log2"], s["cap_inv_scale"], s["lo_off"], s["hi_off"], s["dropout_p"])
    gluon_dq, gluon_dkdv = _sm90_backward_plan(q, k, v, do, meta, alibi, softcap, pad,
                                               dropout_p)
    dkdv_args = (*_row_strides(q, k, v, do, dk, dv), pad_stride, *tail)
    ds_span = 0 if gluon_dq or gluon_dkdv else _ds_plan(DS_BACKWARD, q, Skv, meta, s["lo_off"],
                                                        s["hi_off"])
    ds_bm, ds_bn = _DS_BLOCK
    ds = _alloc_ds(B * Hq * triton.cdiv(Skv, ds_bn) * ds_span * ds_bn, q) if ds_span else None
    if ds is not None:
        _launch.launch(
            _attn_bwd_prep_kernel, (triton.cdiv(Sq, 64), Hq, B),
            out, do, lse.contiguous(), dlse, lse2, delta, *_row_strides(out, do), Hq, Sq,
            HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], HAS_DLSE=dlse is not None, BLOCK_M=64,
            num_warps=4)
        _launch.launch(
            _attn_bwd_dkdv_kernel, lambda m: (triton.cdiv(Skv, m["BLOCK_N"]), Hkv, B),
            q, k, v, do, dk, dv, lse2, delta, alibi, pad, seed, ds, ds_span, *dkdv_args,
            STORE_DS=True, **meta)
        _launch.launch(
            _attn_bwd_dq_ds_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), Hq, B),
            ds, k, dq, *_row_strides(k, dq), Hq, s["GROUP"], Sq, Skv, s["SQ_KEY"], s["SKV_KEY"],
            scale, s["lo_off"], s["hi_off"], ds_span, HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"],
            HAS_LEFT=True, HAS_RIGHT=True, DS_BM=ds_bm, DS_BN=ds_bn)
        return dq, dk, dv
    # Otherwise dQ first: it writes delta and lse2, which the dK/dV kernel reads.
    if gluon_dq:
        try:
            _sm90.attention_backward_dq_sm90(q, k, v, out, do, lse, dlse, dq, lse2, delta,
                                             scale, meta["HAS_LEFT"], meta["HAS_RIGHT"],
                                             s["lo_off"], s["hi_off"], alibi_slopes=alibi)
        except Exception as exc:  # as for the dK/dV kernel below
            _sm90.disable_dq(exc)
            gluon_dq = False
    if not gluon_dq:
        _launch.launch(
            _attn_bwd_dq_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), Hq, B),
            q, k, v, out, do, dq, lse.contiguous(), dlse, lse2, delta, alibi, pad, seed,
            *_row_strides(q, k, v, out, do, dq), pad_stride, *tail, HAS_DLSE=dlse is not None,
            **meta,
        )
    if gluon_dkdv:
        try:
            _sm90.attention_backward_dkdv_sm90(q, k, v, do, lse2, delta, dk, dv, scale,
                                               meta["HAS_LEFT"], meta["HAS_RIGHT"], s["lo_off"],
                                               s["hi_off"], alibi_slopes=alibi)
            return dq, dk, dv
        except Exception as exc:  # e.g. a Triton build whose Gluon cannot compile the kernel
            _sm90.disable_backward(exc)
    _launch.launch(
        _attn_bwd_dkdv_kernel, lambda m: (triton.cdiv(Skv, m["BLOCK_N"]), Hkv, B),
        q, k, v, do, dk, dv, lse2, delta, alibi, pad, seed, None, 0, *dkdv_args,
        STORE_DS=False, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Custom ops.
# --------------------------------------------------------------------------------------------


# Defined with torch.library.Library and an autograd.Function as the Autograd kernel rather than
# torch.library.custom_op + register_autograd: the two behave the same under torch.compile and
# torch.export (tested), but custom_op's autograd wrapper re-binds all 13 arguments against the
# schema on every call (272 against 178 us of Python per forward+backward on the development
# machine, launches stubbed out). Even so, a call through the dispatcher into these Python
# implementations costs host time: on the H100 host, causal, S = 1024, D = 128, the forward op
# 142 us against 61 us for its implementation called directly, the backward op 307 against 147
# (results/attention_host_split_h100.txt). So an eager call on plain tensors skips the ops
# (flash_attention below); tracing and tensor subclasses still go through them.
_LIB = torch.library.Library("rewriter", "FRAGMENT")
_VARIANT_SCHEMA = ("float scale, bool causal, str causal_align, int? window_left, int? window_right, "
                   "Tensor? alibi_slopes, float? softcap, Tensor? key_padding_mask, float dropout_p, "
                   "Tensor? seed")
_LIB.define(f"flash_attention(Tensor q, Tensor k, Tensor v, {_VARIANT_SCHEMA}) -> (Tensor, Tensor)")
_LIB.define(f"flash_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
            f"Tensor out, Tensor lse, {_VARIANT_SCHEMA}) -> (Tensor, Tensor, Tensor)")
_LIB.impl("flash_attention", attention_forward, "CompositeExplicitAutograd")
_LIB.impl("flash_attention_backward", attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("rewriter::flash_attention", lib=_LIB)
def _flash_attention_fake(q, k, v, scale, causal, causal_align, window_left, window_right,
                          alibi_slopes, softcap, key_padding_mask, dropout_p, seed):
    B, Hq, Sq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.register_fake("rewriter::flash_attention_backward", lib=_LIB)
def _flash_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAttentionFunction(torch.autograd.Function):
    """Autograd of ``rewriter::flash_attention`` (no double backward).

    ``direct`` False: the Autograd kernel of the op; the forward and the backward go through the
    ops (what tracing records). ``direct`` True: an eager call on plain tensors
    (:func:`flash_attention`), which runs the implementations without the dispatcher: each op
    call through it costs 80-160 us of host time (H100 host, results/attention_host_*.txt)."""

    @staticmethod
    def forward(ctx, direct, q, k, v, scale, causal, causal_align, window_left, window_right,
                alibi_slopes, softcap, key_padding_mask, dropout_p, seed):
        args = (q, k, v, scale, causal, causal_align, window_left, window_right, alibi_slopes,
                softcap, key_padding_mask, dropout_p, seed)
        if direct:
            out, lse = attention_forward(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                out, lse = torch.ops.rewriter.flash_attention(*args)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, key_padding_mask, seed)
        ctx.variant = (scale, causal, causal_align, window_left, window_right, softcap, dropout_p)
        ctx.direct = direct
        # Gradients of unused outputs stay None (most callers use ``out`` alone): the backward
        # then skips the lse term instead of reading a tensor of zeros made for it.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, alibi_slopes, key_padding_mask, seed = ctx.saved_tensors
        scale, causal, causal_align, window_left, window_right, softcap, dropout_p = ctx.variant
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        args = (grad_out, grad_lse, q, k, v, out, lse, scale, causal, causal_align, window_left,
                window_right, alibi_slopes, softcap, key_padding_mask, dropout_p, seed)
        # Under create_graph the op runs (its autograd refuses a double backward clearly).
        if ctx.direct and not torch.is_grad_enabled():
            dq, dk, dv = attention_backward(*args)
        else:
            dq, dk, dv = torch.ops.rewriter.flash_attention_backward(*args)
        return (None, dq, dk, dv) + (None,) * 10


class _FlashAttentionBackwardFunction(torch.autograd.Function):
    """The backward op under autograd (a backward taken with ``create_graph=True``): it runs, and
    differentiating through it again raises a clear error instead of silently returning zeros."""

    @staticmethod
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.rewriter.flash_attention_backward(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("rewriter::flash_attention has no double backward: its backward "
                           "(rewriter::flash_attention_backward) is not differentiable")


def _flash_attention_backward_autograd(*args):
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _FlashAttentionBackwardFunction.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.rewriter.flash_attention_backward(*args)


_LIB.impl("flash_attention_backward", _flash_attention_backward_autograd, "Autograd")


def _flash_attention_autograd(q, k, v, *variant):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttentionFunction.apply(False, q, k, v, *variant)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.rewriter.flash_attention(q, k, v, *variant)


_LIB.impl("flash_attention", _flash_attention_autograd, "Autograd")


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def supports(q, k, v, *, scale=None, causal=False, causal_align="top_left", window=None,
             alibi_slopes=None, softcap=None, key_padding_mask=None,
             dropout_p=0.0) -> tuple[bool, str]:
    """Whether :func:`flash_attention` can run these inputs, and if not, why.

    Needs: 4-D q (B, Hq, Sq, D) and k, v (B, Hkv, Skv, D) of one dtype among bf16, fp16, fp32,
    on a CUDA device (or CPU under ``TRITON_INTERPRET=1``); Hq % Hkv == 0; 1 <= D <= 256;
    Sq, Skv, B, H >= 1 and B, Hq <= 65535 (grid limits); the value head dim equal to D; a
    positive scale.
    """
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False, "q, k and v must be tensors"
    if any(t.dim() != 4 for t in tensors):
        return False, "q, k and v must be 4-D (batch, heads, seq, head_dim)"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} is not one of bf16, fp16, fp32"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False, "q, k and v must share one dtype"
    if k.device != q.device or v.device != q.device:
        return False, "q, k and v must be on one device"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _INTERPRET):
        return False, f"device {q.device.type} needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        return False, "k and v must have one shape (a value head dim unlike D is not supported)"
    Bk, Hkv, Skv, Dk = k.shape
    if Bk != B or Dk != D:
        return False, "k and v must match q in batch and head dim"
    if min(B, Hq, Hkv, Sq, Skv) < 1:
        return False, "empty batch, heads or sequence"
    if Hq % Hkv != 0:
        return False, f"query heads {Hq} are not a multiple of kv heads {Hkv}"
    if not 1 <= D <= _MAX_HEAD_DIM:
        return False, f"head dim {D} outside 1..{_MAX_HEAD_DIM}"
    if B > 65535 or Hq > 65535:
        return False, "batch or heads above the grid limit 65535"
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        return False, "scale must be a positive finite number"
    if causal_align not in ("top_left", "bottom_right"):
        return False, f"causal_align {causal_align!r} is not 'top_left' or 'bottom_right'"
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(w is None or isinstance(w, int) for w in window)):
            return False, "window must be a pair (left, right) of ints or None"
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or tuple(alibi_slopes.shape) != (Hq,):
            return False, f"alibi_slopes must be a tensor of shape ({Hq},)"
        if alibi_slopes.device != q.device or not alibi_slopes.is_floating_point():
            return False, "alibi_slopes must be a float tensor on q's device"
    if softcap is not None and not softcap > 0:
        return False, "softcap must be positive"
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or tuple(m.shape) not in ((B, Skv), (B, 1, 1, Skv)):
            return False, f"key_padding_mask must have shape ({B}, {Skv}) or ({B}, 1, 1, {Skv})"
        if m.device != q.device or not (m.dtype == torch.bool or m.is_floating_point()):
            return False, "key_padding_mask must be bool or float on q's device"
    if not 0.0 <= dropout_p < 1.0:
        return False, "dropout_p must be in [0, 1)"
    return True, "supported"


def flash_attention(q, k, v, *, scale=None, causal=False, causal_align="top_left", window=None,
                    alibi_slopes=None, softcap=None, key_padding_mask=None,
                    dropout_p=0.0) -> torch.Tensor:
    """Fused attention; see the module docstring for the exact score formula.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Skv, D) with Hq % Hkv == 0. ``scale`` defaults to
    1/sqrt(D). ``causal_align`` places the causal diagonal (and the window's centre) at
    ``j = i`` ("top_left") or ``j = i + Skv - Sq`` ("bottom_right"). ``window=(left, right)``
    keeps keys within ``left`` before and ``right`` after the diagonal, None for unbounded.
    ``alibi_slopes``: (Hq,) float. ``softcap``: positive float. ``key_padding_mask``: (B, Skv)
    or (B, 1, 1, Skv), bool (True = keep) or float (added to the score). ``dropout_p``: applied
    to the attention probabilities; the seed comes from the default generator of q's device.
    Returns (B, Hq, Sq, D) in q's dtype. Differentiable in q, k and v.
    """
    ok, why = supports(q, k, v, scale=scale, causal=causal, causal_align=causal_align,
                       window=window, alibi_slopes=alibi_slopes, softcap=softcap,
                       key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    if not ok:
        raise ValueError(f"flash_attention: {why}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    left, right = window if window is not None else (None, None)
    pad = key_padding_mask
    if pad is not None:
        pad = pad.reshape(pad.shape[0], pad.shape[-1])
        if pad.dtype == torch.bool:
            pad = torch.zeros(pad.shape, device=pad.device, dtype=torch.float32).masked_fill(
                ~pad, float("-inf"))
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
    args = (q, k, v, float(scale), bool(causal), causal_align, left, right, alibi_slopes,
            None if softcap is None else float(softcap), pad, float(dropout_p), seed)
    if not _launch.plain_eager(q, k, v, alibi_slopes, pad):
        out, _ = torch.ops.rewriter.flash_attention(*args)  # traced, or a tensor subclass
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, _ = _FlashAttentionFunction.apply(True, *args)
    else:
        out, _ = attention_forward(*args)
    return out


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, sq: int, skv: int,
                      dropout_p: float) -> torch.Tensor:
    """The bool keep-mask (batch, heads, sq, skv) that the kernels draw for ``seed`` (a
    one-element int64 tensor on the kernels' device), for tests and debugging."""
    out = torch.empty((batch, heads, sq, skv), device=seed.device, dtype=torch.int8)
    block = 32
    _dropout_mask_kernel[(triton.cdiv(sq, block), triton.cdiv(skv, block), batch * heads)](
        seed, out, sq, skv, float(dropout_p), BLOCK=block)
    return out.bool()


def attention_reference(q, k, v, *, scale=None, causal=False, causal_align="top_left",
                        window=None, alibi_slopes=None, softcap=None, key_padding_mask=None,
                        dropout_p=0.0, dropout_mask=None):
    """Plain PyTorch attention with the same arguments; returns ``(out, lse)``.

    Materializes the (B, Hq, Sq, Skv) scores and computes in float64, then returns ``out`` in
    q's dtype and ``lse`` in fp32 (both float64 for float64 inputs). Runs on any device,
    differentiable. With ``dropout_p > 0`` it uses ``dropout_mask`` (bool, True = keep, e.g.
    from :func:`dropout_keep_mask`) or draws one with ``torch.rand``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    f64 = torch.float64
    qd = q.to(f64)
    kd = k.to(f64).repeat_interleave(Hq // Hkv, dim=1)
    vd = v.to(f64).repeat_interleave(Hq // Hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Skv, device=q.device)[None, :]
    if alibi_slopes is not None:
        s = s + alibi_slopes.to(f64)[None, :, None, None] * (j - i).to(f64)
    if key_padding_mask is not None:
        m = key_padding_mask.reshape(B, Skv)
        if m.dtype == torch.bool:
            s = s.masked_fill(~m[:, None, None, :], float("-inf"))
        else:
            s = s + m.to(f64)[:, None, None, :]
    left, right = window if window is not None else (None, None)
    off = 0 if causal_align == "top_left" else Skv - Sq
    if causal:
        right = 0 if right is None else min(right, 0)
    visible = torch.ones(Sq, Skv, dtype=torch.bool, device=q.device)
    if right is not None:
        visible &= j <= i + off + right
    if left is not None:
        visible &= j >= i + off - left
    s = s.masked_fill(~visible, float("-inf"))
    row_max = s.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (torch.log(denom) + row_max).squeeze(-1)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(f64) / (1.0 - dropout_p)
    out = p @ vd
    lse_dtype = f64 if q.dtype == f64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)
