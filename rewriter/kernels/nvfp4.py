"""NVFP4 weight-only quantized linear layers for GPUs without FP4 tensor cores (Hopper, Ampere).

NVFP4 stores a weight as 4-bit E2M1 values, one E4M3 scale per 16 consecutive elements along the
reduction dimension K, and one fp32 scale per tensor: 4.5 bits per element against 16 for bf16.
Hopper and Ampere have no FP4 matrix units, so the format only pays where the GEMM is limited by
reading the weight (decode, small batches): the kernel here reads the packed weight, dequantizes it
in registers and multiplies it with bf16/fp16 activations on the ordinary bf16/fp16 tensor cores.

Layout of :class:`NVFP4Weight` for a weight of shape ``(N, K)``:

* ``packed``: uint8 ``(N, K // 2)``. Byte ``j`` of row ``n`` holds elements ``2j`` (low nibble,
  bits 0-3) and ``2j + 1`` (high nibble, bits 4-7). A nibble is an E2M1 code: bit 3 is the sign,
  bits 0-2 index the magnitudes ``(0, 0.5, 1, 1.5, 2, 3, 4, 6)``.
* ``scales``: float8_e4m3fn ``(N, K // 16)``, the scale of elements ``16b .. 16b + 15`` of a row.
* ``global_scale``: fp32 scalar tensor.

The weight element is ``e2m1 * float(scale) * global_scale``.

Three kernels: for M <= 16 on compute capability 9.0 a warp-level MMA kernel in inline PTX
(:func:`_nvfp4_mma_kernel`), for M <= 4 elsewhere an FMA kernel (:func:`_nvfp4_gemv_kernel`), and
a tensor-core tile kernel for everything else (:func:`_nvfp4_gemm_kernel`); the first call per
shape times the candidates of :func:`_candidates`.

On Hopper, :class:`NVFP4Linear` keeps the same bytes in tile order (:func:`to_tiled`: each
16-row x 128-element tile contiguous), which the MMA kernel reads faster; checkpoints stay in row
order.

Measured (bf16 activations, back-to-back calls on rotating weight copies from a CUDA graph, tile
order; tables in ``benchmarks/results/nvfp4_nvidia-*.md``): on an H200, M = 1..4 on a
4096 x 14336 or 14336 x 4096 weight takes 13.4-15.0 us where bf16 ``F.linear`` takes 32-33 us
(2.2-2.5x, ~2.4 TB/s of packed weight), M = 16 17.6-18 us (1.8x); on an H100 2.7-3.0x at
M = 1..4 and 2.4x at M = 16. At M = 1 the MMA kernel is limited about as much by issuing its
decode as by waiting on loads, at M = 16 by registers (few warps per SM) (Nsight Compute
profiles in benchmarks/NOTES_nvfp4.md).
From M = 64 on it is slower than bf16 (0.4-0.9x), so the format pays in decode and small batches,
and always in memory (0.28x the bytes of bf16).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from . import _launch as _launcher
from ._device import capability as _capability


__all__ = [
    "NVFP4Weight",
    "NVFP4GemmConfig",
    "NVFP4Linear",
    "pack_nvfp4",
    "unpack_nvfp4",
    "to_tiled",
    "to_rows",
    "can_tile",
    "nvfp4_linear_reference",
    "nvfp4_gemm",
    "nvfp4_linear",
    "supports",
]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Smallest positive E4M3 value (a subnormal): the floor for the scale of a block that is not all zero.
E4M3_MIN = 2.0**-9
# Smallest normal fp32 number: the floor for the global scale, so that an all-zero or subnormal
# weight never divides by zero.
GLOBAL_SCALE_MIN = 2.0**-126
BLOCK_SIZE = 16

# Magnitudes of the eight E2M1 codes, followed by their negatives (codes 8..15).
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round-to-nearest-even onto the E2M1 grid, as thresholds on the magnitude. A magnitude at a
# midpoint goes to the code whose mantissa bit (bit 0) is 0: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
# 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. ``code = sum(v > t or v >= t, per threshold)``.
_RNE_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


@dataclass(frozen=True)
class NVFP4Weight:
    """A weight of shape ``shape == (N, K)`` in NVFP4 (see the module docstring for the layout)."""

    packed: Tensor
    scales: Tensor
    global_scale: Tensor
    shape: tuple[int, int]
    # True: ``packed`` and ``scales`` hold the same bytes in tile order (:func:`to_tiled`).
    tiled: bool = False

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        return (
            self.packed.numel() * self.packed.element_size()
            + self.scales.numel() * self.scales.element_size()
            + self.global_scale.numel() * self.global_scale.element_size()
        )


def pack_nvfp4(weight: Tensor) -> NVFP4Weight:
    """Quantize a 2-D floating-point weight ``(N, K)`` to NVFP4 (two-level scaling).

    All arithmetic is in fp32 (the weight is converted first):

    * ``amax = max |W|``; ``global_scale = max(amax / (448 * 6), 2**-126)``. With this choice the
      block holding ``amax`` gets the largest E4M3 scale, 448, and its largest element maps to the
      largest E2M1 value, 6. The floor keeps the scale a normal fp32 number for an all-zero weight
      (whose global scale is then ``2**-126``) or one whose ``amax`` is below about ``3e-35``; such
      a weight keeps less relative precision. ``amax`` of a finite fp32 weight is at most ``3.4e38``,
      so the global scale cannot overflow: ``1e30`` and ``1e-30`` weights quantize as well as
      ``1.0`` weights.
    * For each block ``b`` of 16 elements along K, ``block_amax = max |W[n, 16b:16b+16]|`` and
      ``scale = e4m3_rne(clamp(block_amax / 6 / global_scale, 2**-9, 448))`` if ``block_amax > 0``,
      else ``0``. ``e4m3_rne`` rounds to the nearest E4M3 value, ties to even. The lower clamp keeps
      a block much smaller than ``amax`` (under about ``amax * 4e-6``) at the smallest E4M3 scale
      instead of zeroing its scale; its values then round to the E2M1 grid as usual, most to 0.
    * ``v = W / (float(scale) * global_scale)`` (``0`` where the scale is 0), then each element is
      rounded to the nearest of ``+-(0, 0.5, 1, 1.5, 2, 3, 4, 6)``, ties to even (the code whose
      mantissa bit is 0: 2.5 -> 2, 5 -> 4, 0.25 -> 0, 0.75 -> 1), saturating at 6. A value that
      rounds to 0 is stored as +0.

    Raises ``ValueError`` for a tensor that is not 2-D, empty, has ``K % 16 != 0``, or holds NaN or
    inf (or values outside the fp32 range), and ``TypeError`` for a non-floating-point dtype.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"pack_nvfp4 expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"pack_nvfp4 expects a 2-D weight (N, K), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"pack_nvfp4 expects a floating-point weight, got dtype {weight.dtype}")
    n, k = weight.shape
    if k % BLOCK_SIZE != 0:
        raise ValueError(f"NVFP4 needs K divisible by {BLOCK_SIZE}; got K={k} (weight shape {tuple(weight.shape)})")
    if n == 0 or k == 0:
        raise ValueError(f"pack_nvfp4 got an empty weight of shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("pack_nvfp4: the weight contains NaN or inf (or values outside the float32 range)")

    amax = w.abs().amax()
    global_scale = torch.clamp(amax / (E4M3_MAX * E2M1_MAX), min=GLOBAL_SCALE_MIN)

    blocks = w.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE)
    block_amax = blocks.abs().amax(dim=-1)
    raw = (block_amax / E2M1_MAX / global_scale).clamp(min=E4M3_MIN, max=E4M3_MAX)
    raw = torch.where(block_amax > 0, raw, torch.zeros_like(raw))
    scales = raw.to(torch.float8_e4m3fn)

    # float(scale) >= 2**-9 and global_scale >= 2**-126, so a nonzero effective scale stays nonzero.
    eff = scales.to(torch.float32) * global_scale
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    v = blocks / safe.unsqueeze(-1)
    mag = v.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for t, inclusive in _RNE_THRESHOLDS:
        code += (mag >= t if inclusive else mag > t).to(torch.uint8)
    code = torch.where((eff > 0).unsqueeze(-1), code, torch.zeros_like(code))
    negative = (v < 0) & (code > 0)
    nibbles = (code | (negative.to(torch.uint8) << 3)).reshape(n, k // 2, 2)
    packed = nibbles[..., 0] | (nibbles[..., 1] << 4)
    return NVFP4Weight(packed.contiguous(), scales.contiguous(), global_scale.reshape(()), (n, k))


# Tile order, bits of a 32-bit word: element e of the word's eight (code bits m, e0, e1, sign) at
# bits _TILE_BITS[e]. A bf16 pair pattern has an element's m, e0, e1 at bits 6, 7, 8 and its sign at
# 15 (the other element 16 higher): elements 0/1 sit there already, 2/3 three bits lower, 4/5 six
# bits lower (one shift and one mask each); 6/7 fill the remaining bits (three shifts and masks).
_TILE_BITS = ((6, 7, 8, 15), (22, 23, 24, 31), (3, 4, 5, 12), (19, 20, 21, 28),
              (0, 1, 2, 9), (16, 17, 18, 25), (13, 10, 11, 14), (29, 26, 27, 30))


def can_tile(shape: tuple[int, int]) -> bool:
    """Whether a weight of ``shape`` (N, K) has a tile order (:func:`to_tiled`)."""
    return shape[0] % 16 == 0 and shape[1] % 128 == 0


def to_tiled(w: NVFP4Weight) -> NVFP4Weight:
    """``w`` with its bytes in tile order (needs N % 16 == 0 and K % 128 == 0; tensor shapes and
    values unchanged, only the order of the bytes and of the nibbles in each 32-bit word).

    A tile is 16 rows x 128 elements. ``packed`` holds the tiles one after another, row block by
    row block and K tile by K tile, each as its 16 rows of 64 bytes (one contiguous kilobyte);
    ``scales`` likewise, 16 rows of 8 scales (128 bytes) per tile. The MMA kernel's warps read a
    tile's eight-row halves as 512 consecutive bytes instead of 64 bytes from each of eight rows
    (measured on the H200: 15.3 us against 17.3 at M = 1, K = 4096, N = 14336). Within a 32-bit
    word the bits of the eight codes are placed for the decode (``_TILE_BITS``): its pairs are
    consecutive elements, so x enters the MMA without being permuted, and three of the four pairs
    need one shift and one mask."""
    if w.tiled:
        return w
    n, k = w.shape
    if not can_tile(w.shape):
        raise ValueError(f"the tile order needs N % 16 == 0 and K % 128 == 0, got N={n}, K={k}")
    kt = k // 128
    packed = w.packed.reshape(n // 16, 16, kt, 64).permute(0, 2, 1, 3).reshape(n, k // 2)
    scales = w.scales.view(torch.uint8).reshape(n // 16, 16, kt, 8).permute(0, 2, 1, 3).reshape(n, k // 16)
    # Within each 32-bit word, the bits of the eight codes go where the decode wants them
    # (_TILE_BITS): a bf16 pair of elements (0, 1), (2, 3) or (4, 5) comes out of one shift and one
    # mask, (6, 7) out of three.
    packed = _permute_words(packed.reshape(-1, 4), _TO_TILE_TABLES).reshape(n, k // 2)
    return NVFP4Weight(packed.contiguous(), scales.contiguous().view(torch.float8_e4m3fn), w.global_scale,
                       w.shape, True)


def _byte_tables(dest: list[int]) -> Tensor:
    """(4, 256) int32: entry [j, v] is byte value v of a word's byte j with its bits moved to
    ``dest[bit]`` (a permutation of the 32 bit positions)."""
    rows = []
    for j in range(4):
        row = []
        for v in range(256):
            word = 0
            for bit in range(8):
                if v >> bit & 1:
                    word |= 1 << dest[8 * j + bit]
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32)


# Bit 4 e + q of a row-order word (code bit q of element e) sits at _TILE_BITS[e][q] in tile order.
_TO_TILE_DEST = [_TILE_BITS[i // 4][i % 4] for i in range(32)]
_TO_ROW_DEST = sorted(range(32), key=_TO_TILE_DEST.__getitem__)  # the inverse permutation
_TO_TILE_TABLES = _byte_tables(_TO_TILE_DEST)
_TO_ROW_TABLES = _byte_tables(_TO_ROW_DEST)


def _permute_words(b: Tensor, tables: Tensor) -> Tensor:
    """The bits of every little-endian 32-bit word of the uint8 rows of ``b`` (words, 4) moved by
    ``tables`` (:func:`_byte_tables`): one table lookup per byte and three ORs per word, four
    million words at a time; uint8 (words, 4) back (the int32 words' own bytes: CPUs and GPUs that
    run this are little-endian)."""
    tables = tables.to(b.device)
    out = torch.empty_like(b)
    for i in range(0, b.shape[0], 1 << 22):
        c = b[i:i + (1 << 22)].to(torch.int32)
        word = tables[0][c[:, 0]] | tables[1][c[:, 1]] | tables[2][c[:, 2]] | tables[3][c[:, 3]]
        out[i:i + (1 << 22)] = word.view(torch.uint8).reshape(-1, 4)
    return out


def to_rows(w: NVFP4Weight) -> NVFP4Weight:
    """``w`` in row order (the layout described in the module docstring); inverse of :func:`to_tiled`."""
    if not w.tiled:
        return w
    n, k = w.shape
    kt = k // 128
    packed = _permute_words(w.packed.reshape(-1, 4), _TO_ROW_TABLES)
    packed = packed.reshape(n // 16, kt, 16, 64).permute(0, 2, 1, 3).reshape(n, k // 2)
    scales = w.scales.view(torch.uint8).reshape(n // 16, kt, 16, 8).permute(0, 2, 1, 3).reshape(n, k // 16)
    return NVFP4Weight(packed.contiguous(), scales.contiguous().view(torch.float8_e4m3fn), w.global_scale,
                       w.shape, False)


def _e2m1_table(device: torch.device) -> Tensor:
    mags = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def unpack_nvfp4(w: NVFP4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dequantize to ``(N, K)``: ``e2m1 * float(scale) * global_scale``, evaluated in fp32 and then
    converted to ``dtype``. ``e2m1 * scale`` has at most 6 significant bits, so the only rounding in
    fp32 is the product with ``global_scale``."""
    w = to_rows(w)
    n, k = w.shape
    lo = w.packed & 0xF
    hi = w.packed >> 4
    codes = torch.stack((lo, hi), dim=-1).reshape(n, k).long()
    values = _e2m1_table(w.packed.device)[codes]
    values = values.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE) * w.scales.to(torch.float32).unsqueeze(-1)
    return (values * w.global_scale.to(torch.float32)).reshape(n, k).to(dtype)


def nvfp4_linear_reference(x: Tensor, w: NVFP4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, unpack_nvfp4(w), bias)`` computed in fp32 and returned in ``x.dtype``."""
    y = F.linear(x.to(torch.float32), unpack_nvfp4(w), None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
#
# Dequantization in registers, exact, on 32-bit words. The packed row is read as uint32 words; word
# ``j`` holds elements ``8j .. 8j + 7``, element ``8j + i`` in bits ``4i .. 4i + 3``. For ``p`` in
# 0..3 the nibbles ``p`` (bits 4p..) and ``p + 4`` (bits 4p + 16..) sit 16 bits apart, so shifts
# and masks on the whole word build two 16-bit float bit patterns at once (low half: element p,
# high half: element p + 4). An E2M1 nibble ``s e e m`` becomes
#   * for bf16 activations, the bf16 pattern with sign ``s``, exponent field ``000000ee`` and top
#     mantissa bit ``m``: ``value * 2**-126`` (code 1, 0.5, is the subnormal 2**-127);
#   * for fp16 activations, the fp16 pattern with exponent field ``000ee``: ``value * 2**-14``
#     (code 1 is the subnormal 2**-15).
# Each pattern is multiplied (bf16/fp16 mul, 2 elements per instruction) by its block scale
# prepared per block as ``scale * 2**118`` (bf16) or ``scale`` (fp16). The products,
# ``e2m1 * scale * 2**-8`` or ``e2m1 * scale * 2**-14``, are multiples of 2**-18 / 2**-24 with at most
# 6 significant bits (``e2m1`` has 2, an E4M3 scale 4), inside either format's range, so they are
# exact; ``global_scale * 2**8`` or ``* 2**14`` is applied once to the fp32 accumulator.
# Why words: a first version decoded byte by byte (uint8 ops, ``tl.interleave``, a reshape to apply
# the scales); its sm_90 main loop (BLOCK 16x64x256) spends 10.7 SASS instructions per weight
# element, mostly byte permutes and moves, against 5.8 for this one (counted from the compiled
# cubin). At ~0.56 bytes per element and ~4 TB/s an H200 SM must retire ~20 elements per clock to
# keep up with memory, so the instruction count matters. Measured on H200 at K=4096, N=14336, M=1,
# the byte decode with byte-aligned scale loads (see the strides in the kernel) took 43.9 us at
# best, this decode with aligned loads 26.4 us (bf16 F.linear: 41 us); both changes came together.
# The scales are E4M3 bytes, read as uint8 and converted with integer ops plus one multiply per
# block (``0 eeee mmm`` -> fp16 pattern ``0 0 eeee mmm 0000000`` = ``scale * 2**-8``), so no fp8
# type is needed: this runs on Ampere and in the interpreter too.

_MODES = {"dot": 0, "dot_swap": 1}
# GEMV modes and their decode (1: inline PTX, sm_89+; 0: portable).
_GEMV_DECODES = {"gemv": 1, "gemv_portable": 0}


@triton.jit
def _e2m1_pair_bits(wd, SIGN_SHIFT: tl.constexpr, MAG_SHIFT: tl.constexpr, MAG_MASK: tl.constexpr):
    """Float bit patterns of nibbles p and p + 4 of each uint32 word: the sign bits moved to bits 15
    and 31 by a left shift of SIGN_SHIFT, the 3-bit codes moved to MAG_MASK by MAG_SHIFT (negative:
    right shift)."""
    sign = (wd << SIGN_SHIFT) & 0x80008000
    if MAG_SHIFT >= 0:
        mag = (wd << MAG_SHIFT) & MAG_MASK
    else:
        mag = (wd >> (-MAG_SHIFT)) & MAG_MASK
    return sign | mag


@triton.jit
def _split_halves(b, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """The two 16-bit float patterns in each uint32 of ``b`` (low half first), as ``DT``; under the
    interpreter a bf16 pattern is returned as the fp32 it extends to (exact, subnormals included)."""
    if INTERPRET and DT == tl.bfloat16:
        return (b << 16).to(tl.float32, bitcast=True), (b & 0xFFFF0000).to(tl.float32, bitcast=True)
    return b.to(tl.uint16).to(DT, bitcast=True), (b >> 16).to(tl.uint16).to(DT, bitcast=True)


@triton.jit
def _dequant_tile(wd, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BF16: tl.constexpr, INTERPRET: tl.constexpr,
                  TILED: tl.constexpr = 0):
    """uint32 words ``wd`` [BLOCK_N, BLOCK_K // 8] and E4M3 scale bytes ``s`` (uint8
    [BLOCK_N, BLOCK_K // 16]) -> [BLOCK_N, BLOCK_K] of ``e2m1 * scale * 2**-8`` (bf16) or
    ``e2m1 * scale * 2**-14`` (fp16). TILED: the words' bits in tile order (:func:`to_tiled`)."""
    s16 = ((s.to(tl.uint16) & 0x7F) << 7).to(tl.float16, bitcast=True)  # scale * 2**-8
    if BF16:
        DT: tl.constexpr = tl.bfloat16
        scale = (s16.to(tl.float32) * 8.507059173023462e37).to(DT)  # * 2**126 -> scale * 2**118
        if TILED:  # _TILE_BITS: pairs (0, 1), (2, 3), (4, 5), (6, 7)
            b0 = wd & 0x81C081C0
            b1 = (wd << 3) & 0x81C081C0
            b2 = (wd << 6) & 0x81C081C0
            b3 = ((wd << 1) & 0x80008000) | ((wd >> 3) & 0x01800180) | ((wd >> 7) & 0x00400040)
        else:
            b0 = _e2m1_pair_bits(wd, 12, 6, 0x01C001C0)
            b1 = _e2m1_pair_bits(wd, 8, 2, 0x01C001C0)
            b2 = _e2m1_pair_bits(wd, 4, -2, 0x01C001C0)
            b3 = _e2m1_pair_bits(wd, 0, -6, 0x01C001C0)
    else:
        DT: tl.constexpr = tl.float16
        scale = s16 * 256.0
        if TILED:
            b0 = (wd & 0x80008000) | ((wd << 3) & 0x0E000E00)
            b1 = ((wd << 3) & 0x80008000) | ((wd << 6) & 0x0E000E00)
            b2 = ((wd << 6) & 0x80008000) | ((wd << 9) & 0x0E000E00)
            b3 = ((wd << 1) & 0x80008000) | (wd & 0x0C000C00) | ((wd >> 4) & 0x02000200)
        else:
            b0 = _e2m1_pair_bits(wd, 12, 9, 0x0E000E00)
            b1 = _e2m1_pair_bits(wd, 8, 5, 0x0E000E00)
            b2 = _e2m1_pair_bits(wd, 4, 1, 0x0E000E00)
            b3 = _e2m1_pair_bits(wd, 0, -3, 0x0E000E00)
    # One scale per two words.
    sw = tl.reshape(tl.broadcast_to(tl.expand_dims(scale, 2), (BLOCK_N, BLOCK_K // 16, 2)), (BLOCK_N, BLOCK_K // 8))
    if INTERPRET:
        # The interpreter stores bf16 as raw uint16: its arithmetic would multiply the integers and
        # its bf16 -> fp32 conversion flushes subnormals. Multiply in fp32 instead (the same exact
        # products), reading each bf16 half as the fp32 it extends to.
        sw = sw.to(tl.float32)
    e0, e4 = _split_halves(b0, DT, INTERPRET)
    e1, e5 = _split_halves(b1, DT, INTERPRET)
    e2, e6 = _split_halves(b2, DT, INTERPRET)
    e3, e7 = _split_halves(b3, DT, INTERPRET)
    e0 = (e0 * sw).to(DT)
    e1 = (e1 * sw).to(DT)
    e2 = (e2 * sw).to(DT)
    e3 = (e3 * sw).to(DT)
    e4 = (e4 * sw).to(DT)
    e5 = (e5 * sw).to(DT)
    e6 = (e6 * sw).to(DT)
    e7 = (e7 * sw).to(DT)
    if TILED:
        # b0..b3 held elements (0, 1), (2, 3), (4, 5), (6, 7).
        e1, e2, e3, e4, e5, e6 = e4, e1, e5, e2, e6, e3
    # Back into K order: element 8j + i at [:, 8j + i]. join stacks along a new last axis, so
    # join(join(a, b), join(c, d)) is indexed [.., i, j] -> element 2j + i; the permutes make the
    # row-major reshape read them in order.
    lo = tl.permute(tl.join(tl.join(e0, e1), tl.join(e2, e3)), (0, 1, 3, 2))
    hi = tl.permute(tl.join(tl.join(e4, e5), tl.join(e6, e7)), (0, 1, 3, 2))
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 4, 2, 3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _nvfp4_k_step(acc, x_rows, w_rows, s_rows, m_mask, n_mask, k0, K, EVEN_K: tl.constexpr, MODE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, TILED: tl.constexpr = 0):
    """Accumulate one BLOCK_K slice starting at k0: load x, the packed words and their scales,
    dequantize and multiply. TILED: tile order (K % 128 == 0), where word ``kw`` of a
    row is at ``(kw // 16) * 256 + kw % 16`` from its row's start and scale ``kg`` at
    ``(kg // 8) * 128 + kg % 8``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    offs_kg = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    if TILED:
        w_offs = ((offs_kw // 16) * 256 + offs_kw % 16)[None, :]
        s_offs = ((offs_kg // 8) * 128 + offs_kg % 8)[None, :]
        if EVEN_K:
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            wd = tl.load(w_rows + w_offs, mask=n_mask[:, None], other=0)
            s = tl.load(s_rows + s_offs, mask=n_mask[:, None], other=0)
        else:
            xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            wd = tl.load(w_rows + w_offs, mask=n_mask[:, None] & (offs_kw < K // 8)[None, :], other=0)
            s = tl.load(s_rows + s_offs, mask=n_mask[:, None] & (offs_kg < K // 16)[None, :], other=0)
    elif EVEN_K:
        xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        wd = tl.load(w_rows + offs_kw[None, :], mask=n_mask[:, None], other=0)
        s = tl.load(s_rows + offs_kg[None, :], mask=n_mask[:, None], other=0)
    else:
        xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        wd = tl.load(w_rows + offs_kw[None, :], mask=n_mask[:, None] & (offs_kw < K // 8)[None, :], other=0)
        s = tl.load(s_rows + offs_kg[None, :], mask=n_mask[:, None] & (offs_kg < K // 16)[None, :], other=0)
    w = _dequant_tile(wd.to(tl.uint32, bitcast=True), s, BLOCK_N, BLOCK_K, xt.dtype == tl.bfloat16, INTERPRET, TILED)
    if INTERPRET:
        # The interpreter's dot multiplies bf16 storage integers too; fp32 operands give the same
        # exact products and an fp32 accumulation, as on the GPU.
        xt = xt.to(tl.float32)
        w = w.to(tl.float32)
    if MODE == 1:
        res = tl.dot(w, tl.trans(xt), acc)
    else:
        res = tl.dot(xt, tl.trans(w), acc)
    return res


# M is not specialized: Triton would otherwise compile a separate variant for M == 1 (decode) and
# double the compilations made while tuning, for a mask that costs nothing at run time.
@triton.jit(do_not_specialize=["M"])
def _nvfp4_gemm_kernel(
    x_ptr,
    words_ptr,
    scales_ptr,
    gscale_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    USE_WS: tl.constexpr,
    EVEN_K: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    TILED: tl.constexpr = 0,
    KT=0,
):
    """``out[m, n] = global_scale * sum_k x[m, k] * W[n, k] (+ bias[n])`` with W in NVFP4.

    ``words_ptr`` is the packed weight viewed as int32 (N, K // 8), ``scales_ptr`` the scales viewed
    as uint8 (N, K // 16). Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), splits)``. M blocks vary
    fastest, so the programs that read one weight tile run together and all but the first find it
    in L2: the weight is read from memory about once whatever M is. Program ``(., ., s)`` covers
    the K tiles ``s * tiles_per_split .. (s + 1) * tiles_per_split - 1``; with ``USE_WS`` it writes its unscaled fp32
    partial sums to ``ws[s]`` (splits, M, N) and :func:`_nvfp4_splitk_reduce_kernel` finishes.
    ``MODE`` 1 computes ``W_tile @ x_tile^T``, which puts N on the MMA's M side (on Hopper a
    warpgroup MMA with the dequantized weight as its register operand).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # Row strides come in as arguments (K // 8 words, K // 16 scales) so that Triton's
    # specialization sees their divisibility by 16 and proves the rows 16-byte aligned, which
    # allows wide loads that the software pipeline turns into cp.async. Computed here from K they
    # only prove byte alignment: on H200 the scale loads then became single-byte loads outside the
    # pipeline and every configuration took ~45 us at K=4096, N=14336, M=1 (bf16: 41 us).
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    if TILED:
        # Tile order (to_tiled): row n starts at its 16-row block's first tile, then row n % 16.
        w_rows = words_ptr + ((offs_n // 16).to(tl.int64) * (KT * 256) + (offs_n % 16) * 16)[:, None]
        s_rows = scales_ptr + ((offs_n // 16).to(tl.int64) * (KT * 128) + (offs_n % 16) * 8)[:, None]
    else:
        w_rows = words_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        s_rows = scales_ptr + offs_n[:, None].to(tl.int64) * stride_sn

    if MODE == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Every split covers exactly tiles_per_split K tiles (the host makes the splits divide the
    # tiles evenly); only the last tile of the last split can run past K, and only when
    # K % BLOCK_K != 0 (EVEN_K is False). k0 is formed as tile * BLOCK_K so that the compiler
    # knows its alignment (see the strides above).
    first_tile = pid_k * tiles_per_split
    if INTERPRET:
        # The interpreter hands scalars over as one-element arrays, which numpy 2 refuses as a
        # range() bound; a while loop reads them through bool() instead. Compiled code needs the
        # for loop: only scf.for loops are software-pipelined (num_stages).
        t = first_tile * 0
        while t < tiles_per_split:
            acc = _nvfp4_k_step(acc, x_rows, w_rows, s_rows, m_mask, n_mask, (first_tile + t) * BLOCK_K, K, EVEN_K,
                                MODE, BLOCK_N, BLOCK_K, INTERPRET, TILED)
            t += 1
    else:
        for t in range(0, tiles_per_split):
            acc = _nvfp4_k_step(acc, x_rows, w_rows, s_rows, m_mask, n_mask, (first_tile + t) * BLOCK_K, K, EVEN_K,
                                MODE, BLOCK_N, BLOCK_K, INTERPRET, TILED)

    if MODE == 1:
        res = tl.trans(acc)
    else:
        res = acc
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if USE_WS:
        ws_ptrs = ws_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptrs, res, mask=mn_mask)
    else:
        # Undo the 2**-8 (bf16) or 2**-14 (fp16) of the dequantized values after the global scale.
        if x_ptr.dtype.element_ty == tl.bfloat16:
            y = res * tl.load(gscale_ptr) * 256.0
        else:
            y = res * tl.load(gscale_ptr) * 16384.0
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _nvfp4_splitk_reduce_kernel(
    ws_ptr, gscale_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr, undo,
):
    """``out[m, n] = global_scale * undo * sum_s ws[s, m, n] (+ bias[n])``, summed in a fixed order
    (``undo`` removes the power of two that the kernel's dequantized values carry)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        acc += tl.load(ws_ptr + split * M * N + offs, mask=mask, other=0.0)
    y = acc * (tl.load(gscale_ptr) * undo)
    n = offs % N
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    m = offs // N
    tl.store(out_ptr + m.to(tl.int64) * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# GEMV kernel for a few rows (decode)
# --------------------------------------------------------------------------------------------------
#
# For M up to 4 the tensor-core kernel above spends most of its time rearranging the dequantized
# values into MMA operands (joins, permutes, a reshape, a shared-memory round trip). This kernel
# keeps the weight in the order it was loaded and uses plain fp32 FMAs instead: a dot product may
# visit K in any order as long as x is visited in the same order, so the tile of packed words
# [BLOCK_N, BLOCK_W] is decoded into eight planes, plane i holding element i of every word, and
# each plane is multiplied with the matching strided slice of x (x[m, 8j + i]). Each (n, j) keeps
# its own fp32 partial sum over the K tiles; the row sums are formed once at the end.
#
# Decode (DECODE=1, sm_89+): one inline-PTX block per uint32 word turns its 8 nibbles into 8 fp32
# values ``e2m1 * scale * 2**-14``: the E4M3 scale byte becomes an fp16 pair with one
# ``cvt.rn.f16x2.e4m3x2``, each nibble pair (p, p + 4) becomes an fp16 pair holding
# ``e2m1 * 2**-14`` with two shifts and two logic ops (see _e2m1_pair_bits), one ``mul.rn.f16x2``
# applies the scale (exact: at most 6 significant bits, smallest value 2**-24, the smallest fp16
# subnormal, which fp16 arithmetic keeps) and two ``cvt.f32.f16`` widen. DECODE=0 builds the same
# values with Triton integer ops on fp32 bit patterns (no fp8 conversion instruction needed: Ampere,
# the interpreter).

# Inline-PTX decode of one uint32 word's nibble pairs (p, p + 4), shared by the GEMV and MMA
# kernels: for pair p the sign bits move to bits 15 and 31 by a left shift and the 3-bit codes
# under the format's exponent/mantissa boundary by a second shift (negative: right), as in
# _e2m1_pair_bits; one packed multiply by the scale pair follows (registers ``a``, ``b`` are
# scratch). fp16 patterns read as ``e2m1 * 2**-14``, bf16 ones as ``e2m1 * 2**-126``.
_PAIR_SHIFTS = {"f16": ((12, 9), (8, 5), (4, 1), (0, -3)), "bf16": ((12, 6), (8, 2), (4, -2), (0, -6))}
_PAIR_MASKS = {"f16": "0x0E000E00", "bf16": "0x01C001C0"}


def _pair_ptx(word: str, scale: str, dst: str, p: int, fmt: str) -> str:
    sign_shift, mag_shift = _PAIR_SHIFTS[fmt][p]
    sign = (f"shl.b32 a, {word}, {sign_shift}; and.b32 a, a, 0x80008000;" if sign_shift
            else f"and.b32 a, {word}, 0x80008000;")
    mag = f"shl.b32 b, {word}, {mag_shift};" if mag_shift > 0 else f"shr.b32 b, {word}, {-mag_shift};"
    return (f"{sign} {mag} and.b32 b, b, {_PAIR_MASKS[fmt]}; or.b32 a, a, b; "
            f"mul.rn.{fmt}x2 {dst}, a, {scale};\n")


_GEMV_DECODE_PTX = tl.constexpr(
    "{\n.reg .b32 sc, a, b, q;\n.reg .b16 sl, sh, lo, hi;\n"
    "prmt.b32 sc, $9, 0, 0;\nmov.b32 {sl, sh}, sc;\ncvt.rn.f16x2.e4m3x2 sc, sl;\n"
    + "".join(_pair_ptx("$8", "sc", "q", p, "f16")
              + f"mov.b32 {{lo, hi}}, q;\ncvt.f32.f16 ${p}, lo;\ncvt.f32.f16 ${p + 4}, hi;\n" for p in range(4))
    + "}\n")


@triton.jit
def _e2m1_plane(wd, scale, I: tl.constexpr):
    """fp32 ``e2m1 * scale * 2**-14`` of nibble I of each uint32 word (portable decode). The 3-bit
    code goes to bits 22-24 of an fp32 pattern, which reads as ``e2m1 * 2**-126`` (code 1 is the
    subnormal 2**-127); ``scale`` is ``scale * 2**112``."""
    mag = (((wd >> (4 * I)) & 0x7) << 22).to(tl.float32, bitcast=True)
    sign = ((wd >> (4 * I + 3)) & 0x1) << 31
    return ((mag * scale).to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _decode_words(wd, sb, DECODE: tl.constexpr):
    """Eight fp32 planes ``e2m1 * scale * 2**-14`` from uint32 words ``wd`` and their scale bytes
    ``sb`` (uint32 holding the E4M3 byte)."""
    if DECODE == 1:
        return tl.inline_asm_elementwise(
            _GEMV_DECODE_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [wd, sb],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1,
        )
    else:
        # E4M3 ``0eeeemmm`` at bits 20-26 of an fp32 pattern reads as ``scale * 2**-120``
        # (subnormal scales included); two exact multiplies by 2**116 give ``scale * 2**112``, and
        # a plane's ``e2m1 * 2**-126`` times that is ``e2m1 * scale * 2**-14``.
        scale = ((sb & 0x7F) << 20).to(tl.float32, bitcast=True) * 8.307674973655724e34 * 8.307674973655724e34
        return (
            _e2m1_plane(wd, scale, 0), _e2m1_plane(wd, scale, 1), _e2m1_plane(wd, scale, 2),
            _e2m1_plane(wd, scale, 3), _e2m1_plane(wd, scale, 4), _e2m1_plane(wd, scale, 5),
            _e2m1_plane(wd, scale, 6), _e2m1_plane(wd, scale, 7),
        )


# Loads issued through inline PTX (DECODE=1). A tl.load gets its own register layout from Triton's
# coalescing pass; the scale bytes (one per two words) and the strided x values would then each get a
# different layout from the words' 16-byte loads, and every K tile would pay shared-memory layout
# conversions with barriers (seen in the sm_90 SASS of a first version: 8 STS/BAR/LDS rounds per
# tile, about one shared-memory load per weight element). An inline-asm load has no layout of its
# own: it takes the layout of its user, the words', so each thread reads exactly the scales and x
# values of its own words.
_LD_U8_PTX = tl.constexpr("ld.global.nc.u8 $0, [$1];")
_LD_V4_PTX = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")


@triton.jit
def _x_pair(v, kmask, BF16: tl.constexpr, EVEN_K: tl.constexpr):
    """The two 16-bit floats of each uint32 ``v`` (low half first) as fp32; zero past K."""
    if BF16:
        lo, hi = (v << 16).to(tl.float32, bitcast=True), (v & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        lo = v.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    if not EVEN_K:
        lo = tl.where(kmask, lo, 0.0)
        hi = tl.where(kmask, hi, 0.0)
    return lo, hi


@triton.jit
def _x_planes_asm(addr, kmask, BF16: tl.constexpr, EVEN_K: tl.constexpr):
    """x[8j .. 8j + 7] as eight fp32 tensors, from one 16-byte load at each ``addr`` (int64); words
    past K (re-read from the last one) give zeros."""
    a, b, c, d = tl.inline_asm_elementwise(_LD_V4_PTX, "=r,=r,=r,=r,l", [addr], dtype=(tl.uint32,) * 4,
                                           is_pure=True, pack=1)
    x0, x1 = _x_pair(a, kmask, BF16, EVEN_K)
    x2, x3 = _x_pair(b, kmask, BF16, EVEN_K)
    x4, x5 = _x_pair(c, kmask, BF16, EVEN_K)
    x6, x7 = _x_pair(d, kmask, BF16, EVEN_K)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _x_plane(x_row, kx, kmask, I: tl.constexpr, EVEN_K: tl.constexpr):
    """x[8j + I] for the tile's words j, as fp32, with tl.load (portable path)."""
    if EVEN_K:
        return tl.load(x_row + kx + I).to(tl.float32)
    return tl.load(x_row + kx + I, mask=kmask, other=0.0).to(tl.float32)


@triton.jit
def _x_planes_load(x_row, kx, kmask, EVEN_K: tl.constexpr):
    """The same eight planes as _x_planes_asm with tl.load (portable path)."""
    return (_x_plane(x_row, kx, kmask, 0, EVEN_K), _x_plane(x_row, kx, kmask, 1, EVEN_K),
            _x_plane(x_row, kx, kmask, 2, EVEN_K), _x_plane(x_row, kx, kmask, 3, EVEN_K),
            _x_plane(x_row, kx, kmask, 4, EVEN_K), _x_plane(x_row, kx, kmask, 5, EVEN_K),
            _x_plane(x_row, kx, kmask, 6, EVEN_K), _x_plane(x_row, kx, kmask, 7, EVEN_K))


@triton.jit
def _gemv_row(acc, x_row, x_addr, kx, kmask, e0, e1, e2, e3, e4, e5, e6, e7, EVEN_K: tl.constexpr,
              DECODE: tl.constexpr, BF16: tl.constexpr):
    """acc[n, j] += sum_i plane_i[n, j] * x[8j + i] for one row of x (the tile's element 8j is at
    ``x_row + kx``, or at byte address ``x_addr`` for DECODE=1)."""
    if DECODE == 1:
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_planes_asm(x_addr, kmask, BF16, EVEN_K)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_planes_load(x_row, kx, kmask, EVEN_K)
    acc += e0 * x0[None, :]
    acc += e1 * x1[None, :]
    acc += e2 * x2[None, :]
    acc += e3 * x3[None, :]
    acc += e4 * x4[None, :]
    acc += e5 * x5[None, :]
    acc += e6 * x6[None, :]
    acc += e7 * x7[None, :]
    return acc


@triton.jit
def _store_rows(acc, cols, m, mask, gscale, bias_ptr, out_ptr, stride_om, N, HAS_BIAS: tl.constexpr):
    """``out[m, cols] = acc * gscale (+ bias[cols])`` where ``mask`` (the GEMV and MMA kernels'
    final store)."""
    y = acc * gscale
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_store(acc, m: tl.constexpr, M, offs_n, n_mask, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, N,
                HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr):
    """Row sums of ``acc`` into row ``m`` of the output (or of split ``pid_k``'s partials)."""
    row = (M * 0 + m).to(tl.int64)
    mask = n_mask & (row < M)
    res = tl.sum(acc, axis=1)
    if USE_WS:
        tl.store(ws_ptr + (pid_k * M + row) * N + offs_n, res, mask=mask)
    else:
        _store_rows(res, offs_n, row, mask, gscale, bias_ptr, out_ptr, stride_om, N, HAS_BIAS)


@triton.jit
def _gemv_tile_loads(w_rows, s_rows, s_addr, tile, offs_w, KW, EVEN_K: tl.constexpr, DECODE: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """The packed words [BLOCK_N, BLOCK_W] of K tile ``tile`` and their scale bytes (as uint32).
    Past K (only when not EVEN_K) the last word is re-read; its x values are zeroed by the caller."""
    wofs = tile * BLOCK_W + offs_w
    if not EVEN_K:
        wofs = tl.minimum(wofs, KW - 1)
    wd = tl.load(w_rows + wofs[None, :])
    if DECODE == 1:
        sb = tl.inline_asm_elementwise(_LD_U8_PTX, "=r,l", [s_addr + (wofs // 2)[None, :]], dtype=tl.uint32,
                                       is_pure=True, pack=1)
    else:
        sb = tl.load(s_rows + (wofs // 2)[None, :]).to(tl.uint32)
    return wd.to(tl.uint32, bitcast=True), sb


@triton.jit
def _gemv_step(acc0, acc1, acc2, acc3, wd, sb, t, first, tiles_per_split, offs_w, KW, w_rows, s_rows, s_addr,
               x0_row, x1_row, x2_row, x3_row, x0_addr, x1_addr, x2_addr, x3_addr,
               EVEN_K: tl.constexpr, DECODE: tl.constexpr, BF16: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """One K tile of :func:`_nvfp4_gemv_kernel`: prefetch the next tile (the last iteration reloads
    its own), decode this one and accumulate every row of x."""
    tile = first + t
    wofs = tile * BLOCK_W + offs_w
    kmask = wofs < KW
    if EVEN_K:
        kx = wofs * 8
    else:
        kx = tl.minimum(wofs, KW - 1) * 8
    wd_next, sb_next = _gemv_tile_loads(w_rows, s_rows, s_addr, first + tl.minimum(t + 1, tiles_per_split - 1),
                                        offs_w, KW, EVEN_K, DECODE, BLOCK_W)
    e0, e1, e2, e3, e4, e5, e6, e7 = _decode_words(wd, sb, DECODE)
    kb = kx.to(tl.int64) * 2
    acc0 = _gemv_row(acc0, x0_row, x0_addr + kb, kx, kmask, e0, e1, e2, e3, e4, e5, e6, e7, EVEN_K, DECODE, BF16)
    if BLOCK_M > 1:
        acc1 = _gemv_row(acc1, x1_row, x1_addr + kb, kx, kmask, e0, e1, e2, e3, e4, e5, e6, e7, EVEN_K, DECODE, BF16)
    if BLOCK_M > 2:
        acc2 = _gemv_row(acc2, x2_row, x2_addr + kb, kx, kmask, e0, e1, e2, e3, e4, e5, e6, e7, EVEN_K, DECODE, BF16)
        acc3 = _gemv_row(acc3, x3_row, x3_addr + kb, kx, kmask, e0, e1, e2, e3, e4, e5, e6, e7, EVEN_K, DECODE, BF16)
    return acc0, acc1, acc2, acc3, wd_next, sb_next


@triton.jit(do_not_specialize=["M"])
def _nvfp4_gemv_kernel(
    x_ptr, words_ptr, scales_ptr, gscale_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om, tiles_per_split,
    HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr, EVEN_K: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """``out[m, n] = global_scale * sum_k x[m, k] * W[n, k] (+ bias[n])`` for ``M <= BLOCK_M <= 4``
    rows, FMA-based (see the comment above). Grid ``(cdiv(N, BLOCK_N), splits)``; a K tile is
    BLOCK_W words (8 * BLOCK_W elements); the next tile's words and scales are loaded before the
    current one is decoded. Split-K as in :func:`_nvfp4_gemm_kernel` (fp32 partials to ``ws``).
    DECODE=1 needs 16-byte aligned x rows (the launcher ensures it)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    # Rows past N read row N - 1 (never stored), so the main loop needs no row mask.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    w_rows = words_ptr + rows[:, None] * stride_wn
    s_rows = scales_ptr + rows[:, None] * stride_sn
    s_addr = scales_ptr.to(tl.int64, bitcast=True) + rows[:, None] * stride_sn
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    KW = K // 8
    first = pid_k * tiles_per_split

    acc0 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    x0_row = x_ptr
    x1_row = x_ptr + tl.minimum(1, M - 1) * stride_xm
    x2_row = x_ptr + tl.minimum(2, M - 1) * stride_xm
    x3_row = x_ptr + tl.minimum(3, M - 1) * stride_xm
    x0_addr = x0_row.to(tl.int64, bitcast=True)
    x1_addr = x1_row.to(tl.int64, bitcast=True)
    x2_addr = x2_row.to(tl.int64, bitcast=True)
    x3_addr = x3_row.to(tl.int64, bitcast=True)

    wd, sb = _gemv_tile_loads(w_rows, s_rows, s_addr, first, offs_w, KW, EVEN_K, DECODE, BLOCK_W)
    # A for loop when compiled (Triton propagates the words' layout through its carried values; a while
    # loop kept the scales in another layout and converted them every iteration); the interpreter
    # needs the while loop (see _nvfp4_gemm_kernel).
    if DECODE == 1:
        for t in range(0, tiles_per_split):
            acc0, acc1, acc2, acc3, wd, sb = _gemv_step(
                acc0, acc1, acc2, acc3, wd, sb, t, first, tiles_per_split, offs_w, KW, w_rows, s_rows, s_addr,
                x0_row, x1_row, x2_row, x3_row, x0_addr, x1_addr, x2_addr, x3_addr,
                EVEN_K, DECODE, BF16, BLOCK_M, BLOCK_W)
    else:
        t = first * 0
        while t < tiles_per_split:
            acc0, acc1, acc2, acc3, wd, sb = _gemv_step(
                acc0, acc1, acc2, acc3, wd, sb, t, first, tiles_per_split, offs_w, KW, w_rows, s_rows, s_addr,
                x0_row, x1_row, x2_row, x3_row, x0_addr, x1_addr, x2_addr, x3_addr,
                EVEN_K, DECODE, BF16, BLOCK_M, BLOCK_W)
            t += 1

    # Undo the 2**-14 of the decoded values with the global scale.
    gscale = tl.load(gscale_ptr) * 16384.0
    _gemv_store(acc0, 0, M, offs_n, n_mask, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, N, HAS_BIAS, USE_WS)
    if BLOCK_M > 1:
        _gemv_store(acc1, 1, M, offs_n, n_mask, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, N, HAS_BIAS,
                    USE_WS)
    if BLOCK_M > 2:
        _gemv_store(acc2, 2, M, offs_n, n_mask, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, N, HAS_BIAS,
                    USE_WS)
        _gemv_store(acc3, 3, M, offs_n, n_mask, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, N, HAS_BIAS,
                    USE_WS)


# --------------------------------------------------------------------------------------------------
# Warp-MMA kernel for up to 16 rows (decode and small batches), sm_89+
# --------------------------------------------------------------------------------------------------
#
# Same idea as the GEMV kernel (K visited in whatever order the packed words come in, x visited in
# the same order), with the products on the tensor cores: each warp runs ``mma.sync m16n8k16`` with
# the dequantized weight as the A operand (16 weight rows) and x as the B operand (8 rows of x; a
# second set of MMAs for rows 8-15). Triton offers no way to place data in the lanes that an MMA
# fragment needs, so the whole inner step is inline PTX on per-thread scalars (tensors with one
# element per thread); each thread derives its fragment position from its own %tid.x, so nothing
# depends on how Triton lays tensors out.
#
# Lane (g, c) = (lane / 4, lane % 4) of warp w owns weight rows r0 = 16 w + g and r1 = r0 + 8 of its
# row group. Per K tile of 128 elements (16 words per row) it loads words 4c .. 4c + 3 of both rows
# (one 16-byte load each), their two scale bytes (one 16-bit load each) and, for x row g (and
# g + 8), the 64 bytes of x under those words. Word 4c + t feeds "chunk" t: two MMAs whose k slots
# (2c, 2c + 1, 2c + 8, 2c + 9) hold elements (2s, 2s + 4, 2s + 1, 2s + 5) of that word for MMA s;
# the four lanes of a quad fill the rest of the 16 k slots with their own words, and x is permuted
# the same way (prmt), so every product pairs the right weight with the right x element. The
# accumulators end as rows (r0, r1) x columns (2c, 2c + 1) of the output block.
#
# Decode: as the GEMV kernel for fp16 (``e2m1 * 2**-14`` patterns, ``mul.rn.f16x2`` by the scale);
# for bf16 the nibble goes to a bf16 pattern (sign, exponent field ``000000ee``, mantissa bit ``m``:
# ``e2m1 * 2**-126``, code 1 the subnormal 2**-127) multiplied by ``scale * 2**100`` (the E4M3
# bytes through ``cvt.rn.f16x2.e4m3x2``, fp32 and ``cvt.rn.bf16x2.f32``): ``e2m1 * scale * 2**-26``, at most 6 significant
# bits and at least 2**-36, so exact; the accumulators are scaled back once at the end.

_MMA_SETUP_PTX = tl.constexpr("""
{
.reg .u32 t;
mov.u32 t, %tid.x;
and.b32 $0, t, 3;
bfe.u32 $1, t, 2, 3;
shr.u32 $2, t, 5;
}
""")

_MMA_LD_W_PTX = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")
# The same with a 256-byte L2 fetch (the row's next three tiles come with it).
_MMA_LD_W_L2_PTX = tl.constexpr("ld.global.nc.L1::no_allocate.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];")
_MMA_LD_S_PTX = tl.constexpr("ld.global.nc.u16 $0, [$1];")
# x rows past M read row M - 1 instead (the addresses are clamped): a column of the MMA depends
# only on its own x row, and the output columns past M are never stored.
def _x_loads_ptx(piece: int) -> str:
    """The lane's four 16-byte pieces of x under one K tile, ``piece`` bytes apart."""
    return "\n" + "".join(
        f"ld.global.nc.v4.b32 {{${4 * i}, ${4 * i + 1}, ${4 * i + 2}, ${4 * i + 3}}}, [$16"
        + (f"+{piece * i}" if i else "") + "];\n" for i in range(4))


# x as it comes: the pieces are consecutive (the 64 bytes of x row g under the lane's words).
_X_PIECE, _X_TILE = tl.constexpr(16), tl.constexpr(256)
_MMA_LD_X_PTX = tl.constexpr(_x_loads_ptx(_X_PIECE.value))
# x in fragment order (see _nvfp4_x_frag_kernel): the pieces are 512 bytes apart, and each load of
# the warp reads 512 consecutive bytes; 4 KB per K tile.
_XF_PIECE, _XF_TILE = tl.constexpr(512), tl.constexpr(4096)
_MMA_LD_XF_PTX = tl.constexpr(_x_loads_ptx(_XF_PIECE.value))
# Waits for the kernel before (programmatic dependent launch; a no-op without it) and returns 0, to
# be added to the addresses that must not be read before the wait (a data dependence, so neither
# the compiler nor ptxas moves those loads above it).
_GDC_WAIT_PTX = tl.constexpr("griddepcontrol.wait; mov.b64 $0, 0;")
_GDC_LAUNCH_PTX = tl.constexpr("griddepcontrol.launch_dependents; mov.b32 $0, 0;")

# Two E4M3 bytes -> two packed scale pairs (low byte: words 0-1 of the lane, high byte: words 2-3).
_MMA_SCALE_F16_PTX = tl.constexpr("""
{
.reg .b32 t;
.reg .b16 h, u;
prmt.b32 t, $2, 0, 0x0000;
mov.b32 {h, u}, t;
cvt.rn.f16x2.e4m3x2 $0, h;
prmt.b32 t, $2, 0, 0x1111;
mov.b32 {h, u}, t;
cvt.rn.f16x2.e4m3x2 $1, h;
}
""")
# bf16: both bytes to f16 at once (exact: E4M3 values, subnormals included, are f16 normals), then
# each to fp32, times 2**100, and to a replicated bf16 pair (exact: at most 4 significant bits).
_MMA_SCALE_BF16_PTX = tl.constexpr("""
{
.reg .b32 t;
.reg .b16 h, u;
.reg .f16 a, b;
.reg .f32 fa, fb;
mov.b32 {h, u}, $2;
cvt.rn.f16x2.e4m3x2 t, h;
mov.b32 {a, b}, t;
cvt.f32.f16 fa, a;
cvt.f32.f16 fb, b;
mul.rn.f32 fa, fa, 0f71800000;
mul.rn.f32 fb, fb, 0f71800000;
cvt.rn.bf16x2.f32 $0, fa, fa;
cvt.rn.bf16x2.f32 $1, fb, fb;
}
""")

# One word ($4) and its scale pair ($5) -> four pairs (elements p, p + 4) for p = 0..3.
_MMA_DECODE_F16_PTX = tl.constexpr(
    "{\n.reg .b32 a, b;\n" + "".join(_pair_ptx("$4", "$5", f"${p}", p, "f16") for p in range(4)) + "}\n")
_MMA_DECODE_BF16_PTX = tl.constexpr(
    "{\n.reg .b32 a, b;\n" + "".join(_pair_ptx("$4", "$5", f"${p}", p, "bf16") for p in range(4)) + "}\n")

# The same for a word in tile order (_TILE_BITS): pairs of elements (0, 1), (2, 3), (4, 5), (6, 7).
_MMA_DECODE_TILE_BF16_PTX = tl.constexpr("""
{
.reg .b32 a, b;
and.b32 a, $4, 0x81C081C0; mul.rn.bf16x2 $0, a, $5;
shl.b32 a, $4, 3; and.b32 a, a, 0x81C081C0; mul.rn.bf16x2 $1, a, $5;
shl.b32 a, $4, 6; and.b32 a, a, 0x81C081C0; mul.rn.bf16x2 $2, a, $5;
shl.b32 a, $4, 1; and.b32 a, a, 0x80008000; shr.b32 b, $4, 3; and.b32 b, b, 0x01800180; or.b32 a, a, b;
shr.b32 b, $4, 7; and.b32 b, b, 0x00400040; or.b32 a, a, b; mul.rn.bf16x2 $3, a, $5;
}
""")
_MMA_DECODE_TILE_F16_PTX = tl.constexpr("""
{
.reg .b32 a, b, t3, t6;
shl.b32 t3, $4, 3; shl.b32 t6, $4, 6;
and.b32 a, $4, 0x80008000; and.b32 b, t3, 0x0E000E00; or.b32 a, a, b; mul.rn.f16x2 $0, a, $5;
and.b32 a, t3, 0x80008000; and.b32 b, t6, 0x0E000E00; or.b32 a, a, b; mul.rn.f16x2 $1, a, $5;
shl.b32 b, $4, 9; and.b32 b, b, 0x0E000E00; and.b32 a, t6, 0x80008000; or.b32 a, a, b; mul.rn.f16x2 $2, a, $5;
shl.b32 a, $4, 1; and.b32 a, a, 0x80008000; and.b32 b, $4, 0x0C000C00; or.b32 a, a, b;
shr.b32 b, $4, 4; and.b32 b, b, 0x02000200; or.b32 a, a, b; mul.rn.f16x2 $3, a, $5;
}
""")

# One chunk: row r0 pairs $4-$7, row r1 pairs $8-$11, the x word's 16 bytes $12-$15, accumulators
# $16-$19 -> accumulators.
_MMA_CHUNK_BODY = """
{
.reg .b32 b0, b1;
prmt.b32 b0, $12, $14, 0x5410;
prmt.b32 b1, $12, $14, 0x7632;
mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {$0, $1, $2, $3}, {$4, $8, $5, $9}, {b0, b1}, {$16, $17, $18, $19};
prmt.b32 b0, $13, $15, 0x5410;
prmt.b32 b1, $13, $15, 0x7632;
mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {$0, $1, $2, $3}, {$6, $10, $7, $11}, {b0, b1}, {$0, $1, $2, $3};
}
"""
_MMA_CHUNK_F16_PTX = tl.constexpr(_MMA_CHUNK_BODY.replace("TY", "f16"))
_MMA_CHUNK_BF16_PTX = tl.constexpr(_MMA_CHUNK_BODY.replace("TY", "bf16"))
# The same for the tile order (nibble j of a word holds element (0, 2, 4, 6, 1, 3, 5, 7)[j], so a
# decoded pair is two consecutive elements): the x words are the B fragments as loaded.
_MMA_CHUNK_NAT_BODY = """
mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {$0, $1, $2, $3}, {$4, $8, $5, $9}, {$12, $13}, {$16, $17, $18, $19};
mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {$0, $1, $2, $3}, {$6, $10, $7, $11}, {$14, $15}, {$0, $1, $2, $3};
"""
_MMA_CHUNK_NAT_F16_PTX = tl.constexpr(_MMA_CHUNK_NAT_BODY.replace("TY", "f16"))
_MMA_CHUNK_NAT_BF16_PTX = tl.constexpr(_MMA_CHUNK_NAT_BODY.replace("TY", "bf16"))


@triton.jit
def _mma_ld_words(addr, HINT: tl.constexpr):
    if HINT:
        return tl.inline_asm_elementwise(_MMA_LD_W_L2_PTX, "=r,=r,=r,=r,l", [addr], dtype=(tl.uint32,) * 4,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_MMA_LD_W_PTX, "=r,=r,=r,=r,l", [addr], dtype=(tl.uint32,) * 4,
                                     is_pure=True, pack=1)


@triton.jit
def _mma_ld_scales(addr):
    return tl.inline_asm_elementwise(_MMA_LD_S_PTX, "=h,l", [addr], dtype=tl.uint16, is_pure=True,
                                     pack=1).to(tl.uint32)


@triton.jit
def _mma_ld_x(addr, XF: tl.constexpr = 0):
    asm: tl.constexpr = _MMA_LD_XF_PTX if XF else _MMA_LD_X_PTX
    return tl.inline_asm_elementwise(asm, "=&r," * 16 + "l", [addr], dtype=(tl.uint32,) * 16,
                                     is_pure=True, pack=1)


@triton.jit
def _mma_scales(sb, BF16: tl.constexpr):
    if BF16:
        return tl.inline_asm_elementwise(_MMA_SCALE_BF16_PTX, "=&r,=&r,r", [sb], dtype=(tl.uint32, tl.uint32),
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_MMA_SCALE_F16_PTX, "=&r,=&r,r", [sb], dtype=(tl.uint32, tl.uint32),
                                     is_pure=True, pack=1)


@triton.jit
def _mma_decode(word, scale, BF16: tl.constexpr, TILED: tl.constexpr = 0):
    """One word and its scale pair -> four bf16x2 / f16x2 pairs (TILED: the tile order's bits)."""
    if TILED:
        asm: tl.constexpr = _MMA_DECODE_TILE_BF16_PTX if BF16 else _MMA_DECODE_TILE_F16_PTX
    else:
        asm: tl.constexpr = _MMA_DECODE_BF16_PTX if BF16 else _MMA_DECODE_F16_PTX
    return tl.inline_asm_elementwise(asm, "=&r,=&r,=&r,=&r,r,r", [word, scale], dtype=(tl.uint32,) * 4,
                                     is_pure=True, pack=1)


@triton.jit
def _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, v0, v1, v2, v3, c0, c1, c2, c3, BF16: tl.constexpr,
               NAT: tl.constexpr = 0):
    """Two MMAs of one word per row (NAT: x words as loaded, for the tile order)."""
    if NAT:
        asm: tl.constexpr = _MMA_CHUNK_NAT_BF16_PTX if BF16 else _MMA_CHUNK_NAT_F16_PTX
    else:
        asm: tl.constexpr = _MMA_CHUNK_BF16_PTX if BF16 else _MMA_CHUNK_F16_PTX
    return tl.inline_asm_elementwise(
        asm, "=&r,=&r,=&r,=&r," + "r," * 15 + "r", [p0, p1, p2, p3, q0, q1, q2, q3, v0, v1, v2, v3, c0, c1, c2, c3],
        dtype=(tl.float32,) * 4, is_pure=True, pack=1)


@triton.jit
def _mma_scale_quads(s0, s1, BF16: tl.constexpr):
    """The scale pairs of rows r0 and r1 for the lane's four words each."""
    s0a, s0b = _mma_scales(s0, BF16)
    s1a, s1b = _mma_scales(s1, BF16)
    return (s0a, s0a, s0b, s0b), (s1a, s1a, s1b, s1b)


@triton.jit
def _mma_group(acc, acc2, w0, w1, s0, s1, xv, xv2, BF16: tl.constexpr, TWO_N: tl.constexpr, NAT: tl.constexpr = 0):
    """One row group's K tile: decode the 4 + 4 words of rows r0 and r1 and run the chunks."""
    a0, a1, a2, a3 = acc
    e0, e1, e2, e3 = acc2
    sc0, sc1 = _mma_scale_quads(s0, s1, BF16)
    for t in tl.static_range(4):
        p0, p1, p2, p3 = _mma_decode(w0[t], sc0[t], BF16, NAT)
        q0, q1, q2, q3 = _mma_decode(w1[t], sc1[t], BF16, NAT)
        a0, a1, a2, a3 = _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, xv[4 * t], xv[4 * t + 1], xv[4 * t + 2],
                                    xv[4 * t + 3], a0, a1, a2, a3, BF16, NAT)
        if TWO_N:
            e0, e1, e2, e3 = _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, xv2[4 * t], xv2[4 * t + 1],
                                        xv2[4 * t + 2], xv2[4 * t + 3], e0, e1, e2, e3, BF16, NAT)
    return (a0, a1, a2, a3), (e0, e1, e2, e3)


@triton.jit
def _mma_groups(acc_a, acc_a2, acc_b, acc_b2, w0, w1, w2, w3, s0, s1, s2, s3, xv, xv2, BF16: tl.constexpr,
                TWO_N: tl.constexpr, GROUPS: tl.constexpr, NAT: tl.constexpr = 0):
    """One K tile of every row group (:func:`_mma_group` for rows r0 / r1, and r2 / r3 if GROUPS == 2)."""
    acc_a, acc_a2 = _mma_group(acc_a, acc_a2, w0, w1, s0, s1, xv, xv2, BF16, TWO_N, NAT)
    if GROUPS == 2:
        acc_b, acc_b2 = _mma_group(acc_b, acc_b2, w2, w3, s2, s3, xv, xv2, BF16, TWO_N, NAT)
    return acc_a, acc_a2, acc_b, acc_b2


@triton.jit
def _x_tile_offset(tile, XF: tl.constexpr):
    """Byte offset of K tile ``tile`` in x as it comes, or in fragment order (XF)."""
    return tile.to(tl.int64) * (_XF_TILE if XF else _X_TILE)


@triton.jit
def _mma_ld_x_tile(xa, xa2, tile, TWO_N: tl.constexpr, XF: tl.constexpr = 0):
    """x under K tile ``tile`` for x row g (and g + 8 if TWO_N; otherwise the first set twice).
    XF: x in fragment order (4 KB per tile)."""
    ox = _x_tile_offset(tile, XF)
    xv = _mma_ld_x(xa + ox, XF)
    if TWO_N:
        xv2 = _mma_ld_x(xa2 + ox, XF)
    else:
        xv2 = xv
    return xv, xv2


@triton.jit
def _mma_tile_by_chunk(acc_a, acc_a2, acc_b, acc_b2, w0, w1, w2, w3, s0, s1, s2, s3, xaddr, xaddr2,
                       BF16: tl.constexpr, TWO_N: tl.constexpr, GROUPS: tl.constexpr, NAT: tl.constexpr = 0,
                       XF: tl.constexpr = 0):
    """One K tile of every row group, chunk by chunk, each chunk's 16 bytes of x (per row set)
    loaded just before its MMAs (x_late 2; XF: x in fragment order, chunks 512 bytes apart)."""
    a0, a1, a2, a3 = acc_a
    e0, e1, e2, e3 = acc_a2
    b0, b1, b2, b3 = acc_b
    f0, f1, f2, f3 = acc_b2
    sc0, sc1 = _mma_scale_quads(s0, s1, BF16)
    if GROUPS == 2:
        sc2, sc3 = _mma_scale_quads(s2, s3, BF16)
    XC: tl.constexpr = _XF_PIECE if XF else _X_PIECE
    for t in tl.static_range(4):
        x0, x1, x2, x3 = _mma_ld_words(xaddr + XC * t, 0)
        if TWO_N:
            y0, y1, y2, y3 = _mma_ld_words(xaddr2 + XC * t, 0)
        p0, p1, p2, p3 = _mma_decode(w0[t], sc0[t], BF16, NAT)
        q0, q1, q2, q3 = _mma_decode(w1[t], sc1[t], BF16, NAT)
        a0, a1, a2, a3 = _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, x0, x1, x2, x3, a0, a1, a2, a3, BF16, NAT)
        if TWO_N:
            e0, e1, e2, e3 = _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, y0, y1, y2, y3, e0, e1, e2, e3, BF16, NAT)
        if GROUPS == 2:
            p0, p1, p2, p3 = _mma_decode(w2[t], sc2[t], BF16, NAT)
            q0, q1, q2, q3 = _mma_decode(w3[t], sc3[t], BF16, NAT)
            b0, b1, b2, b3 = _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, x0, x1, x2, x3, b0, b1, b2, b3, BF16, NAT)
            if TWO_N:
                f0, f1, f2, f3 = _mma_chunk(p0, p1, p2, p3, q0, q1, q2, q3, y0, y1, y2, y3, f0, f1, f2, f3,
                                            BF16, NAT)
    return (a0, a1, a2, a3), (e0, e1, e2, e3), (b0, b1, b2, b3), (f0, f1, f2, f3)


@triton.jit
def _mma_store(acc, rows_a, rows_b, col, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k,
               HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr):
    """Accumulators (rows_a: c0, c1 at columns col, col + 1; rows_b: c2, c3) to the output."""
    c0, c1, c2, c3 = acc
    for i in tl.static_range(4):
        v = (c0, c1, c2, c3)[i]
        row = (rows_a, rows_a, rows_b, rows_b)[i]
        m = col + (i % 2)
        mask = (row < N) & (m < M)
        if USE_WS:
            tl.store(ws_ptr + (pid_k * M + m).to(tl.int64) * N + row, v, mask=mask)
        else:
            _store_rows(v, row, m, mask, gscale, bias_ptr, out_ptr, stride_om, N, HAS_BIAS)


@triton.jit
def _mma_sum_kwarps(acc, KWARPS: tl.constexpr, RW: tl.constexpr):
    """Four per-thread accumulators of NUM_WARPS * 32 threads -> summed over the KWARPS warp sets."""
    a0, a1, a2, a3 = acc
    return (tl.sum(tl.reshape(a0, (KWARPS, RW * 32)), axis=0), tl.sum(tl.reshape(a1, (KWARPS, RW * 32)), axis=0),
            tl.sum(tl.reshape(a2, (KWARPS, RW * 32)), axis=0), tl.sum(tl.reshape(a3, (KWARPS, RW * 32)), axis=0))


_FENCE_PTX = tl.constexpr("fence.acq_rel.gpu; mov.b32 $0, $1;")


@triton.jit
def _mma_finish(acc, rows_a, rows_b, col, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k,
                HAS_BIAS: tl.constexpr, SPLITS: tl.constexpr):
    """In the last program of a row block: each entry's sum over the SPLITS splits in split order
    (the order of the reduction kernel, so the two give the same bits), this program's own
    partials from its registers and the others' from L2 (``.cg``: other SMs wrote them), every
    load issued before the first add; then the output."""
    for i in tl.static_range(4):
        row = (rows_a, rows_a, rows_b, rows_b)[i]
        m = col + (i % 2)
        mask = (row < N) & (m < M)
        parts = ()
        for sp in tl.static_range(SPLITS):
            parts = parts + (tl.load(ws_ptr + (sp * M + m).to(tl.int64) * N + row, mask=mask & (pid_k != sp),
                                     other=0.0, cache_modifier=".cg"),)
        total = tl.zeros(row.shape, dtype=tl.float32)
        for sp in tl.static_range(SPLITS):
            total += tl.where(pid_k == sp, acc[i], parts[sp])
        _store_rows(total, row, m, mask, gscale, bias_ptr, out_ptr, stride_om, N, HAS_BIAS)


@triton.jit
def _mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2, tile,
                    GROUPS: tl.constexpr, TWO_N: tl.constexpr, HINT: tl.constexpr, X_LATE: tl.constexpr = 0,
                    TILED: tl.constexpr = 0, XF: tl.constexpr = 0):
    """Loads of one K tile (tile index ``tile``): words, scale pairs and x for each row group.
    TILED: the weight in tile order (:func:`to_tiled`: a 16-row block's K tile is 1 KB of words
    and 128 bytes of scales)."""
    if TILED:
        ow = tile.to(tl.int64) * 1024
        os = tile.to(tl.int64) * 128
    else:
        ow = tile.to(tl.int64) * 64
        os = tile.to(tl.int64) * 8
    w0 = _mma_ld_words(wa0 + ow, HINT)
    w1 = _mma_ld_words(wa1 + ow, HINT)
    s0 = _mma_ld_scales(sa0 + os)
    s1 = _mma_ld_scales(sa1 + os)
    if GROUPS == 2:
        w2 = _mma_ld_words(wa2 + ow, HINT)
        w3 = _mma_ld_words(wa3 + ow, HINT)
        s2 = _mma_ld_scales(sa2 + os)
        s3 = _mma_ld_scales(sa3 + os)
    else:
        w2 = w0
        w3 = w1
        s2 = s0
        s3 = s1
    if X_LATE:
        # x is read when its tile is consumed (see X_LATE in the kernel): placeholders here.
        xv = ow
        xv2 = ow
    else:
        xv, xv2 = _mma_ld_x_tile(xa, xa2, tile, TWO_N, XF)
    return w0, w1, w2, w3, s0, s1, s2, s3, xv, xv2


@triton.jit
def _gdc_wait_then(xa, xa2):
    """Wait for the kernel before (programmatic dependent launch), then the x addresses, made to
    depend on the wait."""
    gdc = tl.inline_asm_elementwise(_GDC_WAIT_PTX, "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    return xa + gdc, xa2 + gdc


@triton.jit(do_not_specialize=["M"])
def _nvfp4_mma_kernel(
    x_ptr, words_ptr, scales_ptr, gscale_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om, tiles_per_split,
    HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr, TWO_N: tl.constexpr, GROUPS: tl.constexpr,
    NUM_WARPS: tl.constexpr, AHEAD: tl.constexpr = 1, HINT: tl.constexpr = 0,
    counter_ptr=None, IN_KERNEL_REDUCE: tl.constexpr = 0, X_LATE: tl.constexpr = 0,
    KWARPS: tl.constexpr = 1, TILED: tl.constexpr = 0, KT=0, X_FRAG: tl.constexpr = 0,
):
    """``out = x @ W.T`` for M <= 8 (TWO_N: M <= 16) with warp MMAs; see the comment above.
    Grid ``(cdiv(N, 16 * GROUPS * NUM_WARPS // KWARPS), splits)``; needs K % 128 == 0, 16-byte
    aligned x rows and compute capability 8.9+. A program's warps each own 16 * GROUPS weight rows;
    with KWARPS > 1, KWARPS warps share those rows, each taking 1 / KWARPS of the program's K tiles,
    and their partial sums are added in the program (through shared memory) before the store: a
    split of K without a second kernel or a workspace. TILED: the weight is in tile order
    (:func:`to_tiled`), ``KT`` = K / 128. X_FRAG (TWO_N only): ``x_ptr`` is x in fragment order
    (:func:`_nvfp4_x_frag_kernel`); 2: that kernel runs just before this one, which is launched
    with programmatic dependent launch, so its weight loads start before x is ready (it waits
    only before its first x load)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    tid = tl.arange(0, NUM_WARPS * 32)
    c, g, w = tl.inline_asm_elementwise(_MMA_SETUP_PTX, "=r,=r,=r,r", [tid], dtype=(tl.int32,) * 3,
                                        is_pure=True, pack=1)
    RW: tl.constexpr = NUM_WARPS // KWARPS  # warps with rows of their own
    base = pid_n * (16 * GROUPS * RW) + (w % RW) * (16 * GROUPS) + g
    r0 = base
    r1 = base + 8
    r2 = base + 16
    r3 = base + 24
    wb = words_ptr.to(tl.int64, bitcast=True) + c.to(tl.int64) * 16
    sbase = scales_ptr.to(tl.int64, bitcast=True) + c.to(tl.int64) * 2
    if TILED:
        # 16-row blocks (N % 16 == 0; block indices past the end clamped, their rows not stored).
        last_blk = N // 16 - 1
        blk = pid_n * (GROUPS * RW) + (w % RW) * GROUPS
        blk0 = tl.minimum(blk, last_blk).to(tl.int64)
        blk1 = tl.minimum(blk + 1, last_blk).to(tl.int64)
        wbase = words_ptr.to(tl.int64, bitcast=True) + (g * 64 + c * 16).to(tl.int64)
        sbase = scales_ptr.to(tl.int64, bitcast=True) + (g * 8 + c * 2).to(tl.int64)
        wa0 = wbase + blk0 * KT * 1024
        wa1 = wa0 + 512
        wa2 = wbase + blk1 * KT * 1024
        wa3 = wa2 + 512
        sa0 = sbase + blk0 * KT * 128
        sa1 = sa0 + 64
        sa2 = sbase + blk1 * KT * 128
        sa3 = sa2 + 64
    else:
        wa0 = wb + tl.minimum(r0, N - 1).to(tl.int64) * (stride_wn * 4)
        wa1 = wb + tl.minimum(r1, N - 1).to(tl.int64) * (stride_wn * 4)
        wa2 = wb + tl.minimum(r2, N - 1).to(tl.int64) * (stride_wn * 4)
        wa3 = wb + tl.minimum(r3, N - 1).to(tl.int64) * (stride_wn * 4)
        sa0 = sbase + tl.minimum(r0, N - 1).to(tl.int64) * stride_sn
        sa1 = sbase + tl.minimum(r1, N - 1).to(tl.int64) * stride_sn
        sa2 = sbase + tl.minimum(r2, N - 1).to(tl.int64) * stride_sn
        sa3 = sbase + tl.minimum(r3, N - 1).to(tl.int64) * stride_sn
    if X_FRAG:
        # Lane 4 g + c reads its 16-byte pieces at 16 * lane (+ 512 per piece, + 4096 per tile).
        xa = x_ptr.to(tl.int64, bitcast=True) + (g * 64 + c * 16).to(tl.int64)
        xa2 = xa + 2048
    else:
        xb = x_ptr.to(tl.int64, bitcast=True) + c.to(tl.int64) * 64
        xa = xb + tl.minimum(g, M - 1).to(tl.int64) * (stride_xm * 2)
        xa2 = xb + tl.minimum(g + 8, M - 1).to(tl.int64) * (stride_xm * 2)
    XF: tl.constexpr = X_FRAG > 0
    if X_FRAG == 2 and not X_LATE:
        # x is read with the first tiles' words: wait before any load.
        xa, xa2 = _gdc_wait_then(xa, xa2)

    zero = tl.zeros((NUM_WARPS * 32,), dtype=tl.float32)
    acc_a = (zero, zero, zero, zero)
    acc_a2 = (zero, zero, zero, zero)
    acc_b = (zero, zero, zero, zero)
    acc_b2 = (zero, zero, zero, zero)

    # This warp's K tiles: tiles_per_split // KWARPS of them (the launcher makes it exact).
    tiles = tiles_per_split // KWARPS
    first = pid_k * tiles_per_split + (w // RW) * tiles
    last = tiles - 1
    if AHEAD >= 3:
        # A ring of AHEAD tiles in flight: iteration t requests tile t + AHEAD before it decodes
        # tile t. The ring is loop-carried, so the compiler cannot sink the loads to their uses
        # (in straight-line code ptxas moves them down to save registers). Past the end the last
        # tile is re-read.
        ring = ()
        for j in tl.static_range(AHEAD):
            ring = ring + (_mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2,
                                           first + tl.minimum(j, last), GROUPS, TWO_N, HINT, 1, TILED),)
        if X_FRAG == 2:
            xa, xa2 = _gdc_wait_then(xa, xa2)
        for t in range(0, tiles):
            new = _mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2,
                                  first + tl.minimum(t + AHEAD, last), GROUPS, TWO_N, HINT, 1, TILED)
            w0, w1, w2, w3, s0, s1, s2, s3, xv, xv2 = ring[0]
            xv, xv2 = _mma_ld_x_tile(xa, xa2, first + t, TWO_N, XF)
            acc_a, acc_a2, acc_b, acc_b2 = _mma_groups(acc_a, acc_a2, acc_b, acc_b2, w0, w1, w2, w3, s0, s1, s2, s3,
                                                       xv, xv2, BF16, TWO_N, GROUPS, TILED)
            ring = ring[1:] + (new,)
    else:
        # Loads run AHEAD tiles ahead of the MMAs (1 or 2); past the end the last tile is re-read.
        cur = _mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2, first, GROUPS, TWO_N, HINT,
                              X_LATE, TILED, XF)
        nxt = _mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2,
                              first + tl.minimum(1, last), GROUPS, TWO_N, HINT, X_LATE, TILED, XF)
        if X_FRAG == 2 and X_LATE:
            # The first two tiles' words are requested; now wait for x.
            xa, xa2 = _gdc_wait_then(xa, xa2)
        for t in range(0, tiles):
            if AHEAD == 2:
                new = _mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2,
                                      first + tl.minimum(t + 2, last), GROUPS, TWO_N, HINT, X_LATE, TILED, XF)
            w0, w1, w2, w3, s0, s1, s2, s3, xv, xv2 = cur
            if X_LATE == 2:
                # x read chunk by chunk (16 bytes per row set) as the MMAs need it: 4 + 4 registers
                # for x instead of 16 + 16.
                ox = _x_tile_offset(first + t, XF)
                acc_a, acc_a2, acc_b, acc_b2 = _mma_tile_by_chunk(
                    acc_a, acc_a2, acc_b, acc_b2, w0, w1, w2, w3, s0, s1, s2, s3, xa + ox, xa2 + ox,
                    BF16, TWO_N, GROUPS, TILED, XF)
            else:
                if X_LATE:
                    # x (16 registers per row set) read from L1/L2 just before use instead of two
                    # tiles ahead: fewer registers, more warps per SM to keep the weight loads in
                    # flight.
                    xv, xv2 = _mma_ld_x_tile(xa, xa2, first + t, TWO_N, XF)
                acc_a, acc_a2, acc_b, acc_b2 = _mma_groups(acc_a, acc_a2, acc_b, acc_b2, w0, w1, w2, w3, s0, s1, s2,
                                                           s3, xv, xv2, BF16, TWO_N, GROUPS, TILED)
            if AHEAD == 2:
                cur = nxt
                nxt = new
            else:
                cur = nxt
                nxt = _mma_tile_loads(wa0, wa1, wa2, wa3, sa0, sa1, sa2, sa3, xa, xa2,
                                      first + tl.minimum(t + 2, last), GROUPS, TWO_N, HINT, X_LATE, TILED, XF)

    # bf16 values carried 2**-26, fp16 values 2**-14.
    if BF16:
        gscale = tl.load(gscale_ptr) * 67108864.0
    else:
        gscale = tl.load(gscale_ptr) * 16384.0
    if KWARPS > 1:
        # Sum the KWARPS warps that share rows (thread i of warp kq * RW + rw holds the same
        # entries as thread i of warp rw), then recompute the positions for the summed layout.
        acc_a = _mma_sum_kwarps(acc_a, KWARPS, RW)
        if TWO_N:
            acc_a2 = _mma_sum_kwarps(acc_a2, KWARPS, RW)
        if GROUPS == 2:
            acc_b = _mma_sum_kwarps(acc_b, KWARPS, RW)
            if TWO_N:
                acc_b2 = _mma_sum_kwarps(acc_b2, KWARPS, RW)
        tid = tl.arange(0, RW * 32)
        lane = tid % 32
        c = lane % 4
        base = pid_n * (16 * GROUPS * RW) + (tid // 32) * (16 * GROUPS) + lane // 4
        r0 = base
        r1 = base + 8
        r2 = base + 16
        r3 = base + 24
    col = 2 * c
    _mma_store(acc_a, r0, r1, col, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, HAS_BIAS, USE_WS)
    if TWO_N:
        _mma_store(acc_a2, r0, r1, col + 8, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, HAS_BIAS,
                   USE_WS)
    if GROUPS == 2:
        _mma_store(acc_b, r2, r3, col, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, HAS_BIAS,
                   USE_WS)
        if TWO_N:
            _mma_store(acc_b2, r2, r3, col + 8, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k,
                       HAS_BIAS, USE_WS)
    if USE_WS and IN_KERNEL_REDUCE:
        # Split-K without a second kernel: each thread makes its partials visible device-wide, the
        # program counts itself in with one atomic on its row block's counter, and the last one to
        # arrive sums the partials and resets the counter to zero for the next call.
        # (IN_KERNEL_REDUCE is the number of splits, the grid's second dimension.)
        tl.inline_asm_elementwise(_FENCE_PTX, "=r,r", [tid], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()
        splits = tl.num_programs(1)
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            S: tl.constexpr = IN_KERNEL_REDUCE
            _mma_finish(acc_a, r0, r1, col, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k, HAS_BIAS, S)
            if TWO_N:
                _mma_finish(acc_a2, r0, r1, col + 8, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k,
                            HAS_BIAS, S)
            if GROUPS == 2:
                _mma_finish(acc_b, r2, r3, col, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om, pid_k,
                            HAS_BIAS, S)
                if TWO_N:
                    _mma_finish(acc_b2, r2, r3, col + 8, M, N, gscale, bias_ptr, out_ptr, ws_ptr, stride_om,
                                pid_k, HAS_BIAS, S)
            tl.debug_barrier()
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# x in fragment order, for the MMA kernel at M = 9..16 (X_FRAG). The kernel's x loads as x comes
# (lane (g, c) reads the 64 bytes of row g under its words, 16 bytes at a time) touch 16 cache lines
# per warp load: 8 rows, and 4 pieces 64 bytes apart in each. Here x is laid out once per call in
# the order the lanes read it: per K tile of 128, row set s (rows 8 s .. 8 s + 7), piece i and lane
# 4 g + c, the 16 bytes x[8 s + g, 128 tile + 32 c + 8 i : + 8] (4 KB per tile; rows past M repeat
# row M - 1), so each warp load reads 512 consecutive bytes (4 lines).
@triton.jit
def _nvfp4_x_frag_kernel(x_ptr, xf_ptr, M, stride_xm, PDL: tl.constexpr):
    """One K tile per program: x (M <= 16 rows, 16-byte aligned) -> its 1024 words in fragment
    order. PDL: let the next kernel (launched with programmatic dependent launch) start now."""
    if PDL:
        tl.inline_asm_elementwise(_GDC_LAUNCH_PTX, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    tile = tl.program_id(0)
    o = tl.arange(0, 1024)  # word j of piece i of lane (g, c) of row set s: o = (((s 4 + i) 32 + 4 g + c) 4 + j)
    j = o % 4
    lane = (o // 4) % 32
    i = (o // 128) % 4
    s = o // 512
    row = tl.minimum(8 * s + lane // 4, M - 1)
    col = tile * 64 + 16 * (lane % 4) + 4 * i + j  # in 32-bit words
    xw = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    v = tl.load(xw + row.to(tl.int64) * (stride_xm // 2) + col)
    xfw = xf_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    tl.store(xfw + tile.to(tl.int64) * 1024 + o, v)


def x_fragments(x: Tensor) -> Tensor:
    """x (M <= 16 rows, K % 128 == 0, 16-byte aligned rows, unit stride along K) in the MMA kernel's
    fragment order (see _nvfp4_x_frag_kernel), as a flat tensor of x's dtype. A reference for
    tests; the launcher calls the kernel."""
    m, k = x.shape
    if m > 16 or k % 128 or x.stride(1) != 1:
        raise ValueError(f"x_fragments takes M <= 16, K % 128 == 0 and unit stride along K, got {tuple(x.shape)}")
    rows = torch.arange(16, device=x.device).clamp(max=m - 1)
    # [s, g, tile, c, i, e] -> [tile, s, i, g, c, e]
    v = x[rows].reshape(2, 8, k // 128, 4, 4, 8).permute(2, 0, 4, 1, 3, 5)
    return v.reshape(-1)


@dataclass(frozen=True)
class NVFP4GemmConfig:
    """Launch parameters of :func:`_nvfp4_gemm_kernel`."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "dot"
    ahead: int = 1  # mma: tiles loaded ahead of the MMAs (1, 2, or a loop-carried ring of 3+ tiles)
    hint: int = 0  # mma: 1 = 256-byte L2 fetches for the packed words
    reduce: str = "kernel"  # mma split-K: "kernel" (a second kernel) or "atomic" (the last program)
    x_late: int = 0  # mma: 1 = x read when its tile is used, not with the weight words (fewer registers); 2 = per chunk
    kwarps: int = 1  # mma: warps sharing the same rows, each on 1 / kwarps of the K tiles, summed in the program
    maxnreg: int = 0  # mma: register cap per thread (0: the compiler's choice; lower caps spill, more warps fit)
    x_frag: int = 0  # mma, M 9..16: 1 = x laid out in fragment order by a small kernel first; 2 = that, overlapped (PDL)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# One small fixed configuration under the interpreter: it covers every code path except split-K
# and MODE 1 (tests reach those by passing ``config=``) and keeps CPU runs fast.
_INTERPRETER_CONFIG = NVFP4GemmConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)


def _m_bucket(m: int) -> int:
    if m <= 8:
        return 1 << (m - 1).bit_length()  # 1, 2, 4 (the GEMV kernel's row blocks), 8 (one MMA column block)
    return 16 if m <= 16 else min(1 << (m - 1).bit_length(), 512)


def _candidates(bucket: int, k: int, mma: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[NVFP4GemmConfig]:
    """Configurations timed on first use of a (M bucket, N, K) on a GPU; the first is the default
    when timing is impossible (during CUDA graph capture) or not worth it (small weights).

    M <= 16 on compute capability 9.0+ (K % 128 == 0): the warp-MMA kernel (``dtype``, the
    activations', sets a register cap on some fp16 ones), then the two best
    tensor-core tiles as a fallback; without it: the GEMV kernel for M <= 4, the tensor-core tiles
    otherwise. The tensor-core tiles were chosen from a sweep of 52 small-M and 10 large-M
    configurations on H200 (benchmarks/nvfp4.py --sweep; numbers in benchmarks/NOTES_nvfp4.md),
    then confirmed by the tuning log of the final benchmark run: no single one wins every shape.
    Measured before the MMA kernel existed, with do_bench's L2 flush: a 16-row tile covers
    M <= 16 with the weight read once. Measured best (GPU time): K=4096, N=14336: 32-wide N tiles
    with split-K 2 (27.5 us; split 8 with 128-wide tiles 28.0); K=14336, N=4096, only 32-128 N
    tiles: split-K 8 with 128-wide tiles (26.5 us; split 1: 40.5); 4096 x 4096: split 2 with 32-wide
    tiles (14.2 us; 64-wide, unsplit: 19.9). For M = 32..64 a 64x64x128 tile won on every shape;
    at M = 256 the swapped tiles (N on the warpgroup MMA's M side) won: 128x64x128 on two shapes,
    256x128x64 on K=4096, N=14336.
    """
    C = NVFP4GemmConfig
    cands = []
    if mma and bucket <= 16 and k % 128 == 0:
        # The MMA kernel's winners in the H200 sweeps (benchmarks/NOTES_nvfp4.md): x read when its
        # tile is used (64 registers instead of 106 at one row group: more warps per SM; sweep 7),
        # the 256-byte L2 hint; on weights in tile order (sweep 9, K = 4096, N = 14336) four warps
        # splitting K per 16 rows, summed in the program (M = 1: 15.3 us; two row groups: M = 16
        # 19.6 us), or one warp per 16 or 32 rows with split-K 4 (15.6 / 19.9 us); K = 14336 wants
        # split-K 8 (sweep 10, tile order: two warps of one row group 16.6 us at M = 1, of two row
        # groups 19.5 us at M = 16). Reading x per chunk (x_late 2) measured no faster (sweep 10),
        # register caps slower (sweep 11, H100: M = 16 24-37 us against 20.2 uncapped); on the
        # H100, M = 16 was fastest with two row groups on each of 2 x 4 warps (20.2 us).
        bm = 8 if bucket <= 8 else 16
        cands += [C(bm, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4),
                  C(bm, 32, 128, 1, 4, 1, "mma", 2, 1, x_late=1, kwarps=4),
                  C(bm, 64, 128, 1, 8, 1, "mma", 2, 1, x_late=1, kwarps=4),
                  C(bm, 16, 128, 4, 1, 1, "mma", 1, 1, x_late=1), C(bm, 32, 128, 4, 1, 1, "mma", 1, 1, x_late=1),
                  C(bm, 32, 128, 8, 2, 1, "mma", 1, 1, x_late=1), C(bm, 64, 128, 8, 2, 1, "mma", 2, 1, x_late=1),
                  C(bm, 64, 128, 4, 4, 1, "mma", 1, 1, x_late=1), C(bm, 128, 128, 8, 4, 1, "mma", 2, 1, x_late=1),
                  C(bm, 128, 128, 8, 4, 1, "mma", 2, 1)]
        if bm == 16:
            # M = 9..16: x laid out in fragment order by a small kernel, overlapped with the MMA
            # kernel (x_frag 2). On the H100 (NOTES_nvfp4.md, tenth round) it takes the one-row-group
            # kernel from 23.2 to 16.7 us on 4096 x 14336 (the best without: 18.0), and the split
            # kernels from 19.4 to 19.1 on 14336 x 4096; on 4096 x 4096 it is slower (the tuner's pick).
            cands += [C(bm, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4, x_frag=2),
                      C(bm, 128, 128, 8, 4, 1, "mma", 2, 1, x_late=1, x_frag=2),
                      C(bm, 64, 128, 8, 2, 1, "mma", 2, 1, x_late=1, x_frag=2)]
        if bm == 16 and dtype == torch.float16:
            # fp16's decode takes 130 registers in the kernels with two row groups (bf16: 128), one
            # program of four warps fewer per SM; capped at 128 they fit without spilling and run
            # 2.06x -> 2.39x F.linear at M = 16 on 4096 x 14336 (H100, best candidate; through the
            # tuner 21.8 -> 18.9 us, 2.07x -> 2.34x; NOTES_nvfp4.md, ninth round).
            # (A cap on a kernel that needs fewer registers makes ptxas use more, and the one reading x
            # ahead needs 167: only these.)
            cands = [dataclasses.replace(c, maxnreg=128) if _mma_groups_of(c) == 2 and c.x_late else c
                     for c in cands]
        cands += [C(16, 32, 256, 2, 4, 3), C(16, 128, 256, 8, 4, 3)]
        return _runnable(cands, k)
    if bucket <= 4:
        # Without the MMA kernel (compute capability < 9.0 or K % 128 != 0).
        cands += [
            C(bucket, 64, 256, 4, 4, 1, mode="gemv"),
            C(bucket, 32, 256, 2, 2, 1, mode="gemv"),
            C(16, 32, 256, 2, 4, 3),
        ]
        return _runnable(cands, k)
    if bucket <= 16:
        cands += [
            C(16, 32, 256, 2, 4, 3),
            C(16, 64, 256, 1, 4, 4),
            C(16, 32, 256, 1, 4, 3),
            C(16, 32, 256, 1, 4, 3, mode="dot_swap"),
            C(16, 64, 128, 4, 4, 3),
            C(16, 128, 256, 8, 4, 3),
        ]
        return _runnable(cands, k)
    if bucket <= 64:
        return [C(64, 64, 128, 1, 4, 3), C(64, 128, 128, 1, 4, 3, mode="dot_swap")]
    return [
        C(128, 64, 128, 1, 4, 3, mode="dot_swap"),
        C(64, 64, 128, 1, 4, 3),
        C(128, 64, 128, 1, 4, 3),
        C(256, 128, 64, 1, 8, 3, mode="dot_swap"),
    ]


def _mma_groups_of(cfg: NVFP4GemmConfig) -> int:
    """Row groups (16 rows each) per warp of an MMA configuration."""
    return cfg.block_n // (16 * (cfg.num_warps // cfg.kwarps))


def _runnable(cands: list[NVFP4GemmConfig], k: int) -> list[NVFP4GemmConfig]:
    """The candidates whose split-K fits K (a split needs a K tile of its own), never empty: an
    unsplit 16-row tensor-core tile closes every list (it runs any M <= 16, any K)."""
    fallback = NVFP4GemmConfig(16, 32, 256, 1, 4, 3)
    kept = [c for c in cands if (c.split_k == 1 or k >= c.split_k * c.block_k)
            and (c.kwarps == 1 or (k // c.block_k) % c.kwarps == 0)]
    return kept + ([fallback] if fallback not in kept else [])


_TUNED: dict[tuple, NVFP4GemmConfig] = {}

# Split-K counters of the MMA kernel's in-kernel reduction, one zeroed int32 per row block, per
# (device, stream): kernels queued on one stream run one after another, and every kernel leaves its
# counters at zero. (Two kernels running at once on different streams get different counters.)
_COUNTERS: dict[tuple, Tensor] = {}


# Launches go through the short path of ``_launch.py`` (shared with the attention kernels): in a
# decode step without CUDA graphs the host time is the layer's time (on the H100 host: ~50-90 us
# per launch through ``fn[grid]`` against ~4 us of GPU time for a 2048 x 2048 weight,
# benchmarks/results/nvfp4_host_*.md).
_launch_kernel = _launcher.launch


def _split_counters(device: torch.device, blocks: int) -> Tensor:
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < blocks:
        buf = torch.zeros(max(blocks, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _rows_aligned(x: Tensor) -> bool:
    return x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0


def _with_aligned_rows(x: Tensor) -> Tensor:
    """``x``, or a contiguous copy of it, so that its rows start on 16-byte boundaries (the inline-PTX
    kernels load x 16 bytes at a time)."""
    return x if _rows_aligned(x) else x.clone(memory_format=torch.contiguous_format)


def _launch(x: Tensor, w: NVFP4Weight, bias: Optional[Tensor], out: Tensor, cfg: NVFP4GemmConfig) -> None:
    m, k = x.shape
    n = w.shape[0]
    k_tiles = triton.cdiv(k, cfg.block_k)
    # The largest split not above the requested one that divides the K tiles evenly.
    kw = cfg.kwarps if cfg.mode == "mma" else 1
    if k_tiles % kw:
        raise ValueError(f"kwarps={kw} must divide the {k_tiles} K tiles of K={k}")
    split = max(d for d in range(1, min(cfg.split_k, k_tiles // kw) + 1) if (k_tiles // kw) % d == 0)
    tiles_per_split = k_tiles // split
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    bias_arg = bias if bias is not None else out
    # The power of two carried by each kernel's dequantized values, removed with the global scale.
    undo = 16384.0 if (cfg.mode in _GEMV_DECODES or x.dtype == torch.float16) else 256.0
    if cfg.mode == "mma":
        if _interpreting() or not x.is_cuda or _capability(x.device) < (9, 0):
            raise ValueError("the MMA kernel is inline PTX for compute capability 9.0+ (no interpreter)")
        if m > cfg.block_m or cfg.block_m not in (8, 16) or k % 128 or cfg.block_k != 128:
            raise ValueError(f"the MMA kernel takes M <= block_m (8 or 16) rows, K % 128 == 0 and "
                             f"block_k 128; got M={m}, K={k} with {cfg}")
        if kw < 1 or cfg.num_warps % kw:
            raise ValueError(f"the MMA kernel needs kwarps dividing num_warps, got {cfg}")
        rw = cfg.num_warps // kw
        groups = _mma_groups_of(cfg)
        if groups not in (1, 2) or cfg.block_n != 16 * groups * rw:
            raise ValueError(f"the MMA kernel needs block_n = 16 * (num_warps / kwarps) * (1 or 2), got {cfg}")
        x = _with_aligned_rows(x)
        if x.dtype == torch.bfloat16:
            undo = 67108864.0  # 2**26
        grid_n = triton.cdiv(n, cfg.block_n)
        in_kernel = split > 1 and cfg.reduce == "atomic"
        xk = x
        if cfg.x_frag:
            if cfg.block_m != 16 or cfg.x_frag not in (1, 2) or x.stride(1) != 1:
                raise ValueError(f"x_frag needs block_m 16 and x with unit stride along K, got {cfg}")
            xk = torch.empty(k * 16, dtype=x.dtype, device=x.device)
            _launch_kernel(_nvfp4_x_frag_kernel, (k // 128,), x, xk, m, x.stride(0), PDL=cfg.x_frag == 2,
                           num_warps=4)
        _launch_kernel(_nvfp4_mma_kernel, (grid_n, split),
            xk, w.packed.view(torch.int32), w.scales.view(torch.uint8), w.global_scale, bias_arg, out, ws,
            m, n, k, x.stride(0), k // 8, k // 16, out.stride(0), tiles_per_split,
            HAS_BIAS=bias is not None, USE_WS=split > 1, TWO_N=cfg.block_m > 8, GROUPS=groups,
            NUM_WARPS=cfg.num_warps, AHEAD=cfg.ahead, HINT=cfg.hint,
            counter_ptr=_split_counters(x.device, grid_n) if in_kernel else ws,
            IN_KERNEL_REDUCE=split if in_kernel else 0,
            X_LATE=cfg.x_late, KWARPS=kw, TILED=w.tiled, KT=k // 128, X_FRAG=cfg.x_frag,
            num_warps=cfg.num_warps, num_stages=1, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
            **({"launch_pdl": True} if cfg.x_frag == 2 else {}),
        )
        if in_kernel:
            return
    elif cfg.mode in _GEMV_DECODES:
        w = to_rows(w)  # (not tuned for the tile order: a tiled weight is re-ordered per call)
        if m > cfg.block_m or cfg.block_m > 4:
            raise ValueError(f"the GEMV kernel takes at most block_m <= 4 rows, got M={m} with {cfg}")
        decode = 0 if _interpreting() else _GEMV_DECODES[cfg.mode]
        if decode == 1 and _capability(x.device) < (8, 9):
            decode = 0  # cvt.rn.f16x2.e4m3x2 needs sm_89
        if decode == 1:
            x = _with_aligned_rows(x)
            if not _rows_aligned(x):
                decode = 0
        _launch_kernel(_nvfp4_gemv_kernel, (triton.cdiv(n, cfg.block_n), split),
            x, w.packed.view(torch.int32), w.scales.view(torch.uint8), w.global_scale, bias_arg, out, ws,
            m, n, k, x.stride(0), k // 8, k // 16, out.stride(0), tiles_per_split,
            HAS_BIAS=bias is not None, USE_WS=split > 1, EVEN_K=k % cfg.block_k == 0,
            DECODE=decode,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_k // 8,
            num_warps=cfg.num_warps, num_stages=1,
        )
    else:
        _launch_gemm(x, w, bias_arg, out, ws, cfg, split, tiles_per_split, bias is not None)
    if split > 1:
        block = 1024
        _launch_kernel(_nvfp4_splitk_reduce_kernel, (triton.cdiv(m * n, block),),
            ws, w.global_scale, bias_arg, out, m, n, out.stride(0),
            SPLITS=split, HAS_BIAS=bias is not None, BLOCK=block, undo=undo, num_warps=4,
        )


def _launch_gemm(x, w, bias_arg, out, ws, cfg, split, tiles_per_split, has_bias):
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _launch_kernel(
        _nvfp4_gemm_kernel,
        grid,
        x,
        w.packed.view(torch.int32),
        w.scales.view(torch.uint8),
        w.global_scale,
        bias_arg,
        out,
        ws,
        m,
        n,
        k,
        x.stride(0),
        k // 8,
        k // 16,
        out.stride(0),
        tiles_per_split,
        HAS_BIAS=has_bias,
        USE_WS=split > 1,
        EVEN_K=k % cfg.block_k == 0,
        MODE=_MODES[cfg.mode],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        INTERPRET=_interpreting(),
        TILED=w.tiled,
        KT=k // 128,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def copies_for(nbytes: int, device: Optional[torch.device] = None) -> int:
    """Weight copies (2-64) that together are at least 3x the L2 size of ``device``, for
    :func:`back_to_back_ms`."""
    dev = torch.cuda.current_device() if device is None or device.index is None else device.index
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    return max(2, min(64, -(-3 * l2 // max(1, nbytes))))


def back_to_back_ms(fns, reps: int = 10, idle_s: float = 0.0) -> float:
    """GPU time per call in ms as a decode step sees it: ``fns`` (one closure per weight copy, the
    copies together several times L2) run back to back from one CUDA graph, timed with events;
    median of ``reps`` replays. Every call reads its weight from memory and nothing else disturbs
    the cache. ``idle_s`` > 0 leaves the GPU idle that long before each replay (the clock an
    idle GPU starts from, rather than the one a busy one settles at).

    Two other methods rank NVFP4 configurations wrongly on the H200: do_bench's memset flush
    leaves dirty lines that the timed call pays to write back (about 10 us per call, cuBLAS's and
    ours alike, which favoured tensor-core tiles that are 10-30% slower back to back), and a read
    flush before each call still picked a tile kernel at M = 16 (24.0 us back to back against 21.9
    for the MMA kernel)."""
    for fn in fns:
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if idle_s > 0:
            time.sleep(idle_s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    times.sort()
    return times[len(times) // 2]


def weight_copies(w: NVFP4Weight, count: int) -> list[NVFP4Weight]:
    """``w`` and ``count - 1`` copies of it (packed values and scales cloned)."""
    return [w] + [NVFP4Weight(w.packed.clone(), w.scales.clone(), w.global_scale.clone(), w.shape, w.tiled)
                  for _ in range(count - 1)]


def _time_config(x: Tensor, weights: list[NVFP4Weight], bias: Optional[Tensor], out: Tensor,
                 cfg: NVFP4GemmConfig) -> float:
    """GPU time of one launch in ms, back to back over ``weights`` (:func:`back_to_back_ms`)."""
    return back_to_back_ms([lambda wc=wc: _launch(x, wc, bias, out, cfg) for wc in weights])


# (device, M bucket, N, K, dtype) -> [(config, ms)] of every tuning done, for reports.
TUNING_LOG: dict[tuple, list[tuple[NVFP4GemmConfig, float]]] = {}

# Rounds of timing per candidate (each candidate keeps its fastest round). One round misranked:
# the first tuning of a process ran while the GPU was still raising its clocks (H100, M = 1:
# every candidate 1-1.3 us slower than in the next tuning, and the pick took 15.8 us where the
# best takes 14.6; benchmarks/results/nvfp4_mrange_nvidia-h100-80gb-hbm3.json).
TUNING_ROUNDS = 2


def _pick_fastest(cands: list, time_fn, rounds: int = TUNING_ROUNDS) -> tuple:
    """(fastest candidate, [(candidate, its best time)]): every candidate timed ``rounds`` times,
    the rounds one after another over the whole list, so that a slow start of the GPU or a
    disturbance in one round does not rank a candidate by its worst measurement."""
    best = [float("inf")] * len(cands)
    for _ in range(max(1, rounds)):
        for i, cand in enumerate(cands):
            best[i] = min(best[i], time_fn(cand))
    timings = list(zip(cands, best))
    return min(timings, key=lambda t: t[1])[0], timings


def _untimed_config(cands: list[NVFP4GemmConfig], n: int, k: int) -> NVFP4GemmConfig:
    """The configuration used without timing: the first candidate, except for the MMA kernel on a
    weight of 2**20 elements or more (met during CUDA graph capture without an earlier call),
    where the first one is far from the best on some shapes. Measured on the H100 (NOTES_nvfp4.md,
    eleventh round):

    - M = 9..16 (benchmarks/results/nvfp4_default16_h100.txt): with N >= 8192 the first with x in
      fragment order (4096 x 14336 M = 16: 23.5 -> 16.6 us, the tuner's pick); else with
      K >= 2048 the split kernel of two row groups per warp on four warps, split 8, x as it comes
      (14336 x 4096: 29.1 us for the first; the tuner picked this kernel's x_frag 2 twin, 18.4 us,
      which the tenth round measured ~0.3 us faster than it; 4096 x 1024: 8.5 against 6.0);
      otherwise the first (512 x 512: 2.9 against 3.8 us with x in fragment order).
    - M = 1..8 (every candidate timed in the ninth to eleventh rounds' experiments,
      nvfp4_{prefetch,atomic,ring}_h100.json): with K >= 2 N the split kernel of one row group on
      two warps, split 8 (14336 x 4096 M = 1: 20.7-21.3 us for the first, 16.0-16.6 for this one,
      the best; 8192 x 2048: 11.3 against 8.6); otherwise the first, the best at 4096 x 14336,
      4096 x 4096 and 2048 x 8192."""
    first = cands[0]
    if first.mode != "mma" or n * k < 2**20:
        return first
    mma = [c for c in cands if c.mode == "mma"]
    if first.block_m == 8:
        want = [c for c in mma if k >= 2 * n and c.block_n == 32 and c.num_warps == 2 and c.split_k == 8
                and c.kwarps == 1 and c.x_late == 1]
    elif n >= 8192:
        want = [c for c in mma if c.block_n == first.block_n and c.kwarps == first.kwarps
                and c.split_k == first.split_k and c.x_frag == 2]
    elif k >= 2048:
        want = [c for c in mma if c.block_n == 128 and c.num_warps == 4 and c.split_k == 8 and c.x_late == 1
                and not c.x_frag]
    else:
        want = []
    return want[0] if want else first


def _select_config(x: Tensor, w: NVFP4Weight, bias: Optional[Tensor], out: Tensor) -> NVFP4GemmConfig:
    if _interpreting() and not x.is_cuda:
        return _INTERPRETER_CONFIG
    m, k = x.shape
    n = w.shape[0]
    bucket = _m_bucket(m)
    key = (x.device.index, bucket, n, k, x.dtype)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    cands = _candidates(bucket, k, mma=x.is_cuda and _capability(x.device) >= (9, 0), dtype=x.dtype)
    # Timing needs a synchronizing benchmark, impossible during graph capture; and a weight under
    # 2**20 elements (under 0.6 MB packed) takes a few microseconds whatever the configuration.
    if torch.cuda.is_current_stream_capturing() or n * k < 2**20:
        return _untimed_config(cands, n, k)
    # Temporary copies of the weight, shared by every candidate's timing; if they do not fit in
    # memory, the resident weight alone is timed.
    try:
        weights = weight_copies(w, copies_for(w.nbytes(), x.device))
    except torch.OutOfMemoryError:
        weights = [w]
    cfg, timings = _pick_fastest(cands, lambda cand: _time_config(x, weights, bias, out, cand))
    del weights
    TUNING_LOG[key] = timings
    _TUNED[key] = cfg
    return cfg


def nvfp4_gemm(
    x: Tensor, w: NVFP4Weight, bias: Optional[Tensor] = None, config: Optional[NVFP4GemmConfig] = None
) -> Tensor:
    """``x (M, K) @ unpack_nvfp4(w).T (+ bias)`` with the Triton kernel; returns (M, N) in ``x.dtype``.

    ``config`` forces the launch parameters; otherwise the first call for a (M bucket, N, K, dtype)
    on a GPU times the candidates of :func:`_candidates` and keeps the fastest (make that first call
    before capturing a CUDA graph: during capture the first candidate is used untimed).
    """
    if x.dim() != 2:
        raise ValueError(f"nvfp4_gemm expects x of shape (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if k != w.shape[1]:
        raise ValueError(f"x has K={k} but the weight has K={w.shape[1]}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config if config is not None else _select_config(x, w, bias, out)
    _launch(x, w, bias, out, cfg)
    return out


# --------------------------------------------------------------------------------------------------
# Custom op and public entry points
# --------------------------------------------------------------------------------------------------

_INFERENCE_ONLY = (
    "NVFP4 linears are inference-only; run them under torch.no_grad() or torch.inference_mode(), "
    "or detach the input (the packed weight has no gradient)."
)


def _nvfp4_linear_impl(
    x: Tensor, packed: Tensor, scale_bits: Tensor, global_scale: Tensor, bias: Optional[Tensor], tiled: bool = False
) -> Tensor:
    """The op ``rewriter::nvfp4_linear``. ``scale_bits`` are the E4M3 block scales viewed as uint8
    (generic tensor tooling, such as ``torch.library.opcheck``, has no fp8 kernels on the CPU);
    ``tiled``: the bytes are in tile order (:func:`to_tiled`)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    w = NVFP4Weight(packed, scale_bits.view(torch.float8_e4m3fn), global_scale, (n, k), tiled)
    y = nvfp4_gemm(x.reshape(-1, k), w, bias)
    return y.reshape(*x.shape[:-1], n)


def _nvfp4_linear_fake(x, packed, scale_bits, global_scale, bias, tiled=False):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _nvfp4_linear_backward(ctx, grad):
    raise RuntimeError(_INFERENCE_ONLY)


# Defined through torch.library.Library rather than torch.library.custom_op: the dispatcher then
# calls the implementation itself, without custom_op's Python wrapper and its check that the
# output aliases no input, which cost host time on every call (a decode step without CUDA graphs
# is host-bound; benchmarks/results/nvfp4_host_*.md). Fake (meta) and autograd formulas as usual.
_LIB = torch.library.Library("rewriter", "FRAGMENT")
_LIB.define("nvfp4_linear(Tensor x, Tensor packed, Tensor scale_bits, Tensor global_scale, Tensor? bias, "
            "bool tiled=False) -> Tensor")
_LIB.impl("nvfp4_linear", _nvfp4_linear_impl, "CompositeExplicitAutograd")
torch.library.register_fake("rewriter::nvfp4_linear", _nvfp4_linear_fake, lib=_LIB)
torch.library.register_autograd("rewriter::nvfp4_linear", _nvfp4_linear_backward, lib=_LIB)


_plain_eager = _launcher.plain_eager


_KERNEL_DEVICES: set = set()  # CUDA device indices supports() has accepted


def supports(x: Tensor, w: NVFP4Weight) -> tuple[bool, str]:
    """Whether the Triton kernel can run ``nvfp4_linear(x, w)``; the string says why not."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return False, f"activations must be bfloat16 or float16, got {x.dtype}"
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        return False, f"x's last dimension must be K={w.shape[1]}, got shape {tuple(x.shape)}"
    if x.device != w.packed.device:
        return False, f"x is on {x.device} but the weight is on {w.packed.device}"
    if x.is_cuda:
        major, _ = _capability(x.device)
        if major < 8:
            return False, "the kernel needs bf16/fp16 tensor cores (compute capability 8.0 or newer)"
        if not torch.compiler.is_compiling():
            _KERNEL_DEVICES.add(x.device.index)
        return True, ""
    if _interpreting():
        return True, ""
    return False, f"the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1), x is on {x.device}"


def nvfp4_linear(
    x: Tensor, w: NVFP4Weight, bias: Optional[Tensor] = None, *, use_triton: Optional[bool] = None
) -> Tensor:
    """``F.linear(x, unpack_nvfp4(w), bias)`` for ``x`` of shape ``(..., K)``, inference only.

    ``use_triton=None`` runs the Triton op ``rewriter::nvfp4_linear`` on CUDA tensors it supports
    and the PyTorch reference otherwise; ``True`` demands the Triton op (also under
    ``TRITON_INTERPRET=1`` on the CPU) and raises ``ValueError`` if it cannot run.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError(_INFERENCE_ONLY)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but the weight has K={w.shape[1]}")
    args = (x, w.packed, w.scales.view(torch.uint8), w.global_scale, bias, w.tiled)
    if (torch.compiler.is_compiling() and use_triton is not False and x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16) and x.device == w.packed.device
            and x.device.index in _KERNEL_DEVICES):
        # Traced (Dynamo) on a device supports() has already accepted: the op goes into the graph
        # as is, without tracing the capability lookup (a cached function) again.
        return torch.ops.rewriter.nvfp4_linear(*args)
    if use_triton is None:
        use_triton = x.is_cuda and supports(x, w)[0]
    if use_triton:
        ok, why = supports(x, w)
        if not ok:
            raise ValueError(f"nvfp4_linear cannot use the Triton kernel: {why}")
        if _plain_eager(x):
            return _nvfp4_linear_impl(*args)
        return torch.ops.rewriter.nvfp4_linear(*args)
    return nvfp4_linear_reference(x, w, bias)


def _prefers_tiles(device: torch.device, shape: tuple[int, int]) -> bool:
    """The automatic choice of :class:`NVFP4Linear`: the tile order where the MMA kernel reads it."""
    return device.type == "cuda" and _capability(device) >= (9, 0) and can_tile(shape)


class NVFP4Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored in NVFP4 (inference only).

    The buffers ``packed``, ``scales`` and ``global_scale`` (and ``bias``, kept in its original
    dtype) are all that is stored, so ``state_dict()`` holds the packed form. Build one with
    :meth:`from_linear`, or construct an empty one of the same shape and ``load_state_dict``.

    ``tiled``: the buffers hold their bytes in tile order (:func:`to_tiled`), which the MMA kernel
    reads faster; by default (``None``) it is chosen on a CUDA device of compute capability 9.0+
    when the shape allows (:func:`can_tile`).
    ``state_dict()`` is always in row order and loading converts back, so checkpoints do not
    depend on it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        tiled: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if in_features % BLOCK_SIZE != 0:
            raise ValueError(f"NVFP4 needs in_features divisible by {BLOCK_SIZE}; got K={in_features}")
        shape = (out_features, in_features)
        if tiled is None:
            tiled = _prefers_tiles(torch.device(device) if device is not None else torch.device("cpu"), shape)
        elif tiled and not can_tile(shape):
            raise ValueError(f"the tile order needs N % 16 == 0 and K % 128 == 0, got N={out_features}, "
                             f"K={in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales", torch.zeros(out_features, in_features // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=device)
        )
        self.register_buffer("global_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)
        self.tiled = bool(tiled)

    @classmethod
    def from_linear(cls, linear: nn.Linear, tiled: Optional[bool] = None) -> "NVFP4Linear":
        """Quantize ``linear.weight`` with :func:`pack_nvfp4`; the bias is kept as is (detached).
        ``tiled=None`` stores the tile order when the weight is on a GPU of compute capability 9.0+
        (where the MMA kernel reads it) and the shape allows it (:func:`can_tile`)."""
        bias = linear.bias
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            device="meta",
            dtype=None if bias is None else bias.dtype,
        )
        w = pack_nvfp4(linear.weight)
        if tiled is None:
            tiled = _prefers_tiles(linear.weight.device, w.shape)
        if tiled:
            w = to_tiled(w)
        module.packed = w.packed
        module.scales = w.scales
        module.global_scale = w.global_scale
        module.tiled = w.tiled
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def nvfp4_weight(self) -> NVFP4Weight:
        return NVFP4Weight(self.packed, self.scales, self.global_scale, (self.out_features, self.in_features),
                           self.tiled)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:  # checkpoints hold row order
            rows = to_rows(self.nvfp4_weight())
            destination[prefix + "packed"] = rows.packed
            destination[prefix + "scales"] = rows.scales

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.tiled:  # the checkpoint was in row order
            w = to_tiled(NVFP4Weight(self.packed, self.scales, self.global_scale,
                                     (self.out_features, self.in_features), False))
            self.packed, self.scales = w.packed, w.scales

    def nbytes(self) -> int:
        """Bytes of the stored weight: packed values, block scales and the global scale."""
        return self.nvfp4_weight().nbytes()

    def forward(self, x: Tensor) -> Tensor:
        return nvfp4_linear(x, self.nvfp4_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            "weight=NVFP4 (E2M1 values, E4M3 scale per 16, fp32 global scale)" + (", tile order" if self.tiled else "")
        )
