"""NVFP4 packing, the Triton kernel (through the interpreter on the CPU) and NVFP4Linear."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rewriter.kernels import _launch
from rewriter.kernels import nvfp4 as nv
from rewriter.kernels.nvfp4 import (
    NVFP4GemmConfig,
    NVFP4Linear,
    NVFP4Weight,
    nvfp4_gemm,
    nvfp4_linear,
    nvfp4_linear_reference,
    pack_nvfp4,
    supports,
    unpack_nvfp4,
    weight_copies,
)
from rewriter.validate import sqnr_db
from utils import count_calls, recording_mode

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# The kernel tests run the real kernel on a GPU when there is one, else the Triton interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def representable_weight(n, k, global_scale, gen, scale_bits=(0x01, 0x7E)):
    """A weight that NVFP4 stores exactly: E2M1 grid values times exact E4M3 block scales (bit
    patterns drawn from ``scale_bits``) times a power-of-two global scale, each block holding a +-6
    so that packing recomputes the same scales, and one block with scale 448 so that it recomputes
    the same global scale."""
    codes = torch.randint(0, 8, (n, k), generator=gen)
    signs = torch.where(torch.rand(n, k, generator=gen) < 0.5, -1.0, 1.0)
    values = GRID[codes] * signs
    values.view(n, k // 16, 16)[:, :, 3] = 6.0 * torch.where(torch.rand(n, k // 16, generator=gen) < 0.5, -1.0, 1.0)
    # Random E4M3 scales (positive, normal or subnormal, not NaN), one of them the maximum 448.
    bits = torch.randint(scale_bits[0], scale_bits[1] + 1, (n, k // 16), generator=gen, dtype=torch.int32)
    scales = bits.to(torch.uint8).view(torch.float8_e4m3fn).float()
    scales[0, 0] = 448.0
    w = values.view(n, k // 16, 16) * scales.unsqueeze(-1) * global_scale
    return w.view(n, k), scales


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_scale", [1.0, 2.0**-20, 2.0**40])
def test_pack_unpack_exact_on_representable_values(global_scale):
    gen = torch.Generator().manual_seed(0)
    w, scales = representable_weight(24, 64, global_scale, gen)
    q = pack_nvfp4(w)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (24, 32)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (24, 4)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.dim() == 0
    assert q.shape == (24, 64)
    assert float(q.global_scale) == global_scale
    assert torch.equal(q.scales.float(), scales)
    assert torch.equal(unpack_nvfp4(q), w)
    assert torch.equal(unpack_nvfp4(q, torch.float64), w.double())


def exact_row(values):
    """Row 0 holds ``values`` (max |value| 6) and row 1 a lone 10.5, the tensor amax: the global
    scale is then 10.5 / 2688 = 2**-8, row 0's block scale 6 / 6 / 2**-8 = 256 and its effective
    scale exactly 1, so row 0 is quantized as the values themselves."""
    w = torch.zeros(2, 16)
    w[0, : len(values)] = torch.tensor(values)
    w[1, 0] = 10.5
    return w


def test_nibble_order_even_element_in_low_nibble():
    w = exact_row([6.0, -0.5, 1.0])  # codes 7, 8|1, 2
    q = pack_nvfp4(w)
    assert float(q.global_scale) == 2.0**-8 and float(q.scales[0, 0].float()) == 256.0
    assert q.packed[0, 0].item() == 0x97  # element 0 in the low nibble, element 1 in the high one
    assert q.packed[0, 1].item() == 0x02
    assert torch.equal(unpack_nvfp4(q), w)


def test_round_to_nearest_even_at_grid_midpoints():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # ties to the even code (mantissa bit 0)
    w = exact_row([6.0] + mids + [-m for m in mids])
    out = unpack_nvfp4(pack_nvfp4(w))[0]
    assert torch.equal(out[1:8], expect)
    assert torch.equal(out[8:15], -expect)
    # Just off the midpoints the nearest value wins.
    out = unpack_nvfp4(pack_nvfp4(exact_row([6.0] + [m + 0.01 for m in mids])))[0]
    assert torch.equal(out[1:8], torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]))
    out = unpack_nvfp4(pack_nvfp4(exact_row([6.0] + [m - 0.01 for m in mids])))[0]
    assert torch.equal(out[1:8], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]))


def test_rounding_matches_nearest_grid_point_off_ties():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = pack_nvfp4(w)
    eff = q.scales.float() * q.global_scale
    v = (w.view(64, 16, 16) / eff.unsqueeze(-1)).view(64, 256)
    grid = torch.cat([GRID, -GRID[1:]])
    nearest = grid[(v.unsqueeze(-1) - grid).abs().argmin(-1)]
    got = (unpack_nvfp4(q).view(64, 16, 16) / eff.unsqueeze(-1)).view(64, 256)
    assert torch.allclose(got, nearest.clamp(-6, 6), atol=1e-6)


def test_scale_formula():
    torch.manual_seed(1)
    w = torch.randn(8, 64) * 3
    q = pack_nvfp4(w)
    amax = w.abs().max()
    assert torch.allclose(q.global_scale, amax / 2688)
    raw = w.view(8, 4, 16).abs().amax(-1) / 6 / q.global_scale
    assert torch.equal(q.scales.float(), raw.clamp(2.0**-9, 448).to(torch.float8_e4m3fn).float())
    assert float(q.scales.float().max()) == 448.0


def test_all_zero_weight_and_zero_blocks():
    q = pack_nvfp4(torch.zeros(4, 32))
    assert torch.equal(unpack_nvfp4(q), torch.zeros(4, 32))
    assert float(q.global_scale) > 0 and math.isfinite(float(q.global_scale))
    w = torch.randn(4, 32)
    w[1] = 0
    w[2, 16:] = 0
    q = pack_nvfp4(w)
    out = unpack_nvfp4(q)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(32)) and torch.equal(out[2, 16:], torch.zeros(16))
    assert q.scales[1].float().eq(0).all()
    assert torch.equal(q.packed[1], torch.zeros(16, dtype=torch.uint8))


def test_single_nonzero_per_block():
    torch.manual_seed(2)
    w = torch.zeros(6, 64)
    idx = torch.randint(0, 16, (6, 4))
    signs = torch.where(torch.rand(6, 4) < 0.5, -1.0, 1.0)
    vals = signs * (0.5 + 1.5 * torch.rand(6, 4)) * 10.0 ** torch.randint(-1, 3, (6, 4)).float()
    w.view(6, 4, 16).scatter_(2, idx.unsqueeze(-1), vals.unsqueeze(-1))
    out = unpack_nvfp4(pack_nvfp4(w))
    # Each lone value is its block's amax; its block scale is a normal E4M3 number here (within
    # 1/16 relative of block_amax / 6 / global), the value maps to +-6 and comes back within 1/16.
    assert torch.equal(out != 0, w != 0)
    assert torch.equal(out.sign(), w.sign())
    rel = ((out - w).abs() / w.abs())[w != 0]
    assert rel.max() <= 1 / 16 + 1e-6


@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 1e-38])
def test_huge_and_tiny_magnitudes(magnitude):
    torch.manual_seed(3)
    w = torch.randn(32, 128) * magnitude
    q = pack_nvfp4(w)
    out = unpack_nvfp4(q)
    assert torch.isfinite(out).all() and torch.isfinite(q.scales.float()).all()
    assert math.isfinite(float(q.global_scale)) and float(q.global_scale) > 0
    # Weights down to about 3e-35 keep full precision; 1e-38 sits on the clamped global scale.
    assert sqnr_db(w, out) > (15 if magnitude >= 1e-30 else 10)


def test_huge_and_tiny_in_one_tensor():
    w = torch.randn(8, 64)
    w[0, 0] = 1e30
    w[1] *= 1e-30
    q = pack_nvfp4(w)
    out = unpack_nvfp4(q)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(1e30, rel=1 / 16)
    assert torch.equal(out[1], torch.zeros(64))  # far below amax * 2**-9 / 448: flushed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_float_dtypes_accepted(dtype):
    torch.manual_seed(4)
    w = torch.randn(16, 32).to(dtype)
    assert sqnr_db(w.float(), unpack_nvfp4(pack_nvfp4(w))) > 15


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_rejected(bad):
    w = torch.randn(4, 32)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        pack_nvfp4(w)


def test_float64_beyond_float32_range_rejected():
    w = torch.randn(4, 32, dtype=torch.float64)
    w[0, 0] = 1e300
    with pytest.raises(ValueError, match="NaN or inf"):
        pack_nvfp4(w)


@pytest.mark.parametrize("k", [8, 24, 33, 100])
def test_k_not_divisible_by_16_rejected(k):
    with pytest.raises(ValueError, match=f"K={k}"):
        pack_nvfp4(torch.randn(4, k))


@pytest.mark.parametrize("shape", [(16,), (2, 4, 16), ()])
def test_non_2d_rejected(shape):
    with pytest.raises(ValueError, match="2-D"):
        pack_nvfp4(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64, torch.bool])
def test_integer_dtype_rejected(dtype):
    with pytest.raises(TypeError):
        pack_nvfp4(torch.ones(4, 32, dtype=dtype))


def test_empty_weight_rejected():
    with pytest.raises(ValueError, match="empty"):
        pack_nvfp4(torch.zeros(0, 32))


def test_sqnr_on_gaussian_weight():
    torch.manual_seed(5)
    w = torch.randn(512, 1024)
    s = sqnr_db(w, unpack_nvfp4(pack_nvfp4(w)))
    assert 17 < s < 23  # about 20 dB for Gaussian data


def test_sqnr_db():
    a = torch.tensor([3.0, 4.0])
    assert sqnr_db(a, a) == math.inf
    assert sqnr_db(a, a + torch.tensor([0.3, 0.4])) == pytest.approx(20.0)
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf


def test_reference_matches_dequantized_linear():
    torch.manual_seed(6)
    w = pack_nvfp4(torch.randn(20, 48))
    x = torch.randn(3, 5, 48)
    b = torch.randn(20)
    expect = F.linear(x.double(), unpack_nvfp4(w, torch.float64), b.double())
    y = nvfp4_linear_reference(x, w, b)
    assert y.shape == (3, 5, 20) and y.dtype == torch.float32
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-5)
    assert nvfp4_linear_reference(x.bfloat16(), w).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Triton kernel (through the interpreter on the CPU, compiled on a GPU)
# --------------------------------------------------------------------------------------------------


def _check_kernel(m, k, n, dtype, with_bias, config=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = pack_nvfp4(torch.randn(n, k, generator=gen).to(DEVICE))
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if with_bias else None
    y = nvfp4_gemm(x, w, bias, config=config)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = nvfp4_linear_reference(x.float(), w, None if bias is None else bias.float())
    assert torch.isfinite(y).all()
    # One rounding of the fp32 result to the output dtype (bf16: the interpreter truncates, so up to
    # 2**-7 relative; fp16: 2**-11), plus fp32 summation-order differences.
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    scale = (x.float().abs() @ unpack_nvfp4(w).abs().T) + (0 if bias is None else bias.float().abs())
    assert ((y.float() - ref).abs() <= tol * ref.abs() + 1e-5 * scale).all()
    return y, ref


def _config_id(c: NVFP4GemmConfig) -> str:
    return f"{c.mode}-m{c.block_m}-n{c.block_n}-k{c.block_k}-s{c.split_k}"


_KERNEL_CASES = list(itertools.product([1, 3, 17], [16, 48, 256], [1, 5, 64, 130]))


@pytest.mark.parametrize("m,k,n", _KERNEL_CASES)
def test_kernel_matches_reference(m, k, n):
    i = _KERNEL_CASES.index((m, k, n))
    dtype = (torch.bfloat16, torch.float16)[i % 2]
    _check_kernel(m, k, n, dtype, with_bias=(i // 2) % 2 == 0, seed=i)


@pytest.mark.parametrize(
    "config",
    [
        NVFP4GemmConfig(16, 32, 64, split_k=2, num_warps=1, num_stages=1, mode="dot"),
        NVFP4GemmConfig(16, 64, 32, split_k=3, num_warps=1, num_stages=1, mode="dot_swap"),
        NVFP4GemmConfig(32, 16, 64, split_k=4, num_warps=1, num_stages=1, mode="dot_swap"),
        NVFP4GemmConfig(32, 16, 128, split_k=1, num_warps=1, num_stages=1, mode="dot"),
    ],
    ids=_config_id,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_configs_and_split_k(config, dtype):
    _check_kernel(5, 208, 40, dtype, with_bias=True, config=config, seed=7)
    _check_kernel(2, 256, 33, dtype, with_bias=False, config=config, seed=8)


@pytest.mark.parametrize(
    "config",
    [
        NVFP4GemmConfig(1, 16, 32, split_k=1, num_warps=1, num_stages=1, mode="gemv"),
        NVFP4GemmConfig(2, 32, 64, split_k=2, num_warps=1, num_stages=1, mode="gemv"),
        NVFP4GemmConfig(4, 8, 16, split_k=3, num_warps=1, num_stages=1, mode="gemv_portable"),
        NVFP4GemmConfig(4, 64, 128, split_k=1, num_warps=2, num_stages=1, mode="gemv"),
    ],
    ids=_config_id,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_kernel_configs(config, dtype):
    # Every M up to block_m; K not a multiple of the tile (the last word re-read with x zeroed), N
    # not a multiple of block_n (rows past N read row N - 1 and are not stored).
    for m in range(1, config.block_m + 1):
        _check_kernel(m, 208, 40, dtype, with_bias=m % 2 == 1, config=config, seed=20 + m)
    _check_kernel(config.block_m, 256, 33, dtype, with_bias=False, config=config, seed=30)


def test_gemv_kernel_refuses_more_rows_than_its_block():
    x = torch.randn(3, 32).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match="at most"):
        nvfp4_gemm(x, pack_nvfp4(torch.randn(8, 32).to(DEVICE)), config=NVFP4GemmConfig(2, 16, 32, mode="gemv"))


def test_gemv_fp16_is_exact_on_exact_data():
    # As below, for the GEMV kernel: each product is exact in fp32 and every partial sum stays far
    # below 2**24 ulps, so the result must equal the reference bit for bit.
    gen = torch.Generator().manual_seed(19)
    wt, _ = representable_weight(24, 64, 2.0**-12, gen, scale_bits=(0x38, 0x57))
    w = pack_nvfp4(wt.to(DEVICE))
    x = torch.randint(-3, 4, (3, 64), generator=gen).to(torch.float16).to(DEVICE)
    y = nvfp4_gemm(x, w, config=NVFP4GemmConfig(4, 16, 32, mode="gemv"))
    assert torch.equal(y, nvfp4_linear_reference(x, w))


def test_kernel_fp16_is_exact_on_exact_data():
    # Representable weights with block scales in [1, 15] (and one 448) and small-integer
    # activations: every product is a multiple of 1/16 and every partial sum stays below 2**19, so
    # all sums are exact in fp32 in any order and the kernel must equal the reference bit for bit.
    gen = torch.Generator().manual_seed(9)
    wt, _ = representable_weight(40, 64, 2.0**-12, gen, scale_bits=(0x38, 0x57))
    w = pack_nvfp4(wt.to(DEVICE))
    x = torch.randint(-3, 4, (3, 64), generator=gen).to(torch.float16).to(DEVICE)
    ref = nvfp4_linear_reference(x, w)
    assert torch.equal(nvfp4_gemm(x, w), ref)
    cfg = NVFP4GemmConfig(16, 16, 32, split_k=2, num_warps=1, num_stages=1)
    assert torch.equal(nvfp4_gemm(x, w, config=cfg), ref)


def test_kernel_empty_batch_and_strided_input():
    w = pack_nvfp4(torch.randn(8, 32, device=DEVICE))
    assert nvfp4_gemm(torch.empty(0, 32, dtype=torch.bfloat16, device=DEVICE), w).shape == (0, 8)
    x = torch.randn(32, 6, device=DEVICE).to(torch.bfloat16).T  # stride (1, 6): copied to contiguous
    assert torch.allclose(nvfp4_gemm(x, w).float(), nvfp4_linear_reference(x.float(), w), rtol=2**-7, atol=1e-4)


def test_linear_op_dispatch_and_shapes():
    torch.manual_seed(10)
    w = pack_nvfp4(torch.randn(24, 64, device=DEVICE))
    x = torch.randn(2, 3, 64, device=DEVICE).to(torch.bfloat16)
    y = nvfp4_linear(x, w, use_triton=True)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    ref = nvfp4_linear_reference(x.float(), w)
    assert torch.allclose(y.float(), ref, rtol=2**-7, atol=1e-4)
    # The default runs the kernel on CUDA tensors and the reference on CPU ones.
    default = nvfp4_linear(x, w)
    assert torch.equal(default, y if x.is_cuda else nvfp4_linear_reference(x, w))
    # fp32 activations are not supported by the kernel: the default falls back, use_triton=True refuses.
    assert torch.allclose(nvfp4_linear(x.float(), w), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        nvfp4_linear(x.float(), w, use_triton=True)
    with pytest.raises(ValueError, match="K=64"):
        nvfp4_linear(torch.randn(3, 32, device=DEVICE), w)


def test_supports_reasons():
    w = pack_nvfp4(torch.randn(8, 32))
    ok, why = supports(torch.randn(2, 32).half(), w)
    # CPU tensors run the kernel only through the interpreter (on by tests/conftest.py without CUDA).
    assert ok == nv._interpreting() and (ok or "CUDA" in why)
    ok, why = supports(torch.randn(2, 32), w)
    assert not ok and "float32" in why
    ok, why = supports(torch.randn(2, 16).half(), w)
    assert not ok and "K=32" in why
    if torch.cuda.is_available():
        assert supports(torch.randn(2, 32, device="cuda").half(), pack_nvfp4(torch.randn(8, 32, device="cuda")))[0]
        ok, why = supports(torch.randn(2, 32, device="cuda").half(), w)
        assert not ok and "is on" in why


def test_fake_impl_under_torch_compile_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = pack_nvfp4(torch.randn(24, 64))
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, 7, 64, dtype=torch.bfloat16)
        y = torch.ops.rewriter.nvfp4_linear(x, w.packed, w.scales.view(torch.uint8), w.global_scale, None)
        assert y.shape == (5, 7, 24) and y.dtype == torch.bfloat16


def test_opcheck():
    torch.manual_seed(11)
    w = pack_nvfp4(torch.randn(16, 32, device=DEVICE))
    x = torch.randn(3, 32, device=DEVICE).to(torch.bfloat16)
    torch.library.opcheck(
        torch.ops.rewriter.nvfp4_linear.default,
        (x, w.packed, w.scales.view(torch.uint8), w.global_scale, torch.randn(16, device=DEVICE).to(torch.bfloat16)),
        test_utils=("test_schema", "test_faketensor"),
    )
    # The tile order travels as the op's last argument.
    w2 = nv.to_tiled(pack_nvfp4(torch.randn(16, 128, device=DEVICE)))
    x2 = torch.randn(3, 128, device=DEVICE).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.rewriter.nvfp4_linear.default,
                          (x2, w2.packed, w2.scales.view(torch.uint8), w2.global_scale, None, True),
                          test_utils=("test_schema", "test_faketensor"))
    y = torch.ops.rewriter.nvfp4_linear(x2, w2.packed, w2.scales.view(torch.uint8), w2.global_scale, None, True)
    assert torch.equal(y, nvfp4_gemm(x2, nv.to_rows(w2)))


def test_grad_raises():
    w = pack_nvfp4(torch.randn(16, 32, device=DEVICE))
    x = torch.randn(2, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="NVFP4 linears are inference-only"):
        nvfp4_linear(x, w)
    with pytest.raises(RuntimeError, match="NVFP4 linears are inference-only"):
        NVFP4Linear.from_linear(torch.nn.Linear(32, 16, device=DEVICE))(x)
    # The op itself: forward is allowed, backward raises the same message.
    y = torch.ops.rewriter.nvfp4_linear(x, w.packed, w.scales.view(torch.uint8), w.global_scale, None)
    with pytest.raises(RuntimeError, match="NVFP4 linears are inference-only"):
        y.float().sum().backward()
    # No error without grad mode or without requires_grad.
    with torch.no_grad():
        nvfp4_linear(x, w)
    nvfp4_linear(x.detach(), w)


# --------------------------------------------------------------------------------------------------
# NVFP4Linear
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_module_from_linear(bias):
    torch.manual_seed(12)
    lin = torch.nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    q = NVFP4Linear.from_linear(lin)
    assert q.in_features == 64 and q.out_features == 48
    assert {n for n, _ in q.named_parameters()} == set()
    expected = {"packed", "scales", "global_scale"} | ({"bias"} if bias else set())
    assert set(q.state_dict()) == expected
    assert q.packed.dtype == torch.uint8 and q.scales.dtype == torch.float8_e4m3fn
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.no_grad():
        ref = lin(x).float()
        y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 48)
    assert sqnr_db(ref, y) > 15
    assert "in_features=64" in repr(q) and "NVFP4" in repr(q)


def test_module_memory_shrinks():
    lin = torch.nn.Linear(1024, 512, bias=False).to(torch.bfloat16)
    q = NVFP4Linear.from_linear(lin)
    bf16_bytes = lin.weight.numel() * 2
    assert q.nbytes() == 512 * 512 + 512 * 64 + 4
    assert q.nbytes() / bf16_bytes == pytest.approx(0.28125, abs=1e-4)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert stored == q.nbytes()


@pytest.mark.parametrize("use_triton", [False, True])
def test_state_dict_round_trip(use_triton):
    torch.manual_seed(13)
    lin = torch.nn.Linear(96, 40).to(torch.bfloat16).to(DEVICE)
    q = NVFP4Linear.from_linear(lin)
    fresh = NVFP4Linear(96, 40, bias=True, dtype=torch.bfloat16, device=DEVICE)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 96).to(torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        a = nvfp4_linear(x, q.nvfp4_weight(), q.bias, use_triton=use_triton)
        b = nvfp4_linear(x, fresh.nvfp4_weight(), fresh.bias, use_triton=use_triton)
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(q(x), fresh(x))
    assert torch.equal(fresh.packed, q.packed) and torch.equal(fresh.scales.view(torch.uint8), q.scales.view(torch.uint8))


def test_module_rejects_bad_in_features():
    with pytest.raises(ValueError, match="K=40"):
        NVFP4Linear(40, 8)


def test_weight_container():
    w = pack_nvfp4(torch.randn(8, 32))
    assert isinstance(w, NVFP4Weight)
    assert w.nbytes() == 8 * 16 + 8 * 2 + 4
    with pytest.raises(AttributeError):
        w.shape = (1, 1)


# --------------------------------------------------------------------------------------------------
# GPU, real sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("k,n", [(4096, 14336), (14336, 4096), (2048, 512)])
def test_gpu_kernel_real_sizes(m, k, n):
    # The tuned path (first call per shape times the candidates), bf16 with bias and fp16 without.
    torch.manual_seed(m + k + n)
    w = pack_nvfp4((torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16))
    for dtype, with_bias in ((torch.bfloat16, True), (torch.float16, False)):
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
        y = nvfp4_linear(x, w, bias)
        ref = nvfp4_linear_reference(x.float(), w, None if bias is None else bias.float())
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < (4e-3 if dtype == torch.bfloat16 else 1e-3), err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dot", "dot_swap"])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("block_m", [16, 64])
def test_gpu_configs(mode, split, block_m):
    torch.manual_seed(14)
    k, n = 4096 + 48, 1000  # K not a multiple of BLOCK_K, N not a multiple of BLOCK_N
    w = pack_nvfp4(torch.randn(n, k, device="cuda"))
    cfg = NVFP4GemmConfig(block_m, 64, 256, split, 4, 3, mode)
    for m in (1, 7, 70):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, device="cuda").to(dtype)
            y = nvfp4_gemm(x, w, config=cfg)
            ref = nvfp4_linear_reference(x.float(), w)
            assert float((y.float() - ref).norm() / ref.norm()) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["gemv", "gemv_portable"])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("block", [(1, 64, 128, 4), (4, 128, 128, 4), (2, 32, 256, 2)])
def test_gpu_gemv_configs(mode, split, block):
    torch.manual_seed(17)
    bm, bn, bk, warps = block
    for k, n in ((4096 + 48, 1000), (4096, 14336)):
        w = pack_nvfp4(torch.randn(n, k, device="cuda"))
        cfg = NVFP4GemmConfig(bm, bn, bk, split, warps, 1, mode)
        for m in range(1, bm + 1):
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.randn(m, k, device="cuda").to(dtype)
                bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
                y = nvfp4_gemm(x, w, bias, config=cfg)
                ref = nvfp4_linear_reference(x.float(), w, None if bias is None else bias.float())
                assert float((y.float() - ref).norm() / ref.norm()) < (4e-3 if dtype == torch.bfloat16 else 1e-3)
    # A row of x that is not 16-byte aligned (the inline-PTX loads need alignment; the launcher copies).
    x = torch.randn(1, k + 1, device="cuda", dtype=torch.bfloat16)[:, 1:]
    y = nvfp4_gemm(x, w, config=cfg)
    ref = nvfp4_linear_reference(x.float(), w)
    assert float((y.float() - ref).norm() / ref.norm()) < 4e-3


@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("k", [16, 64, 128, 4096, 14336])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 64, 300])
def test_candidates_never_empty_and_fit(m, k, mma):
    from rewriter.kernels.nvfp4 import _candidates, _m_bucket

    cands = _candidates(_m_bucket(m), k, mma=mma)
    assert cands
    for c in cands:
        assert c.block_m >= min(m, 16) or c.block_m >= _m_bucket(m)
        assert c.split_k == 1 or k >= c.split_k * c.block_k
        assert c.mode != "mma" or (mma and k % 128 == 0)


def test_fp16_two_row_group_candidates_are_capped_at_128_registers():
    # fp16's decode needs 130 registers there (bf16 128): capped, four programs of four warps fit
    # an SM. Only those: a cap above a kernel's need makes ptxas use more registers.
    for dtype, capped in ((torch.bfloat16, False), (torch.float16, True)):
        for bucket in (8, 16):
            for c in nv._candidates(bucket, 4096, mma=True, dtype=dtype):
                two = c.mode == "mma" and nv._mma_groups_of(c) == 2 and c.x_late == 1
                assert c.maxnreg == (128 if capped and bucket == 16 and two else 0), (dtype, bucket, c)
    assert any(c.maxnreg for c in nv._candidates(16, 4096, mma=True, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_untimed_config_at_m16_follows_the_shape(dtype):
    # Without timing (graph capture before any call), M = 9..16 on a large weight: the one-row-group
    # kernel with x in fragment order for wide N, the split kernel for long K, else the first
    # candidate; small weights and the kernels without MMA keep the first.
    C = NVFP4GemmConfig
    for (n, k), want in {(14336, 4096): "xfrag", (8192, 2048): "xfrag", (2048, 8192): "split",
                         (4096, 14336): "split", (1024, 4096): "split", (4096, 1024): "first",
                         (512, 512): "first", (2048, 256): "first"}.items():
        cands = nv._candidates(16, k, mma=True, dtype=dtype)
        got = nv._untimed_config(cands, n, k)
        assert got in cands
        if want == "first":
            assert got == cands[0], (n, k)
        elif want == "xfrag":
            assert got == dataclasses.replace(cands[0], x_frag=2), (n, k)
        else:
            assert (got.block_n, got.num_warps, got.split_k, got.x_frag) == (128, 4, 8, 0), (n, k)
            assert got.maxnreg == (128 if dtype == torch.float16 else 0)
    # M = 1..8: the split kernel on two warps where K >= 2 N, else the first.
    for bucket in (1, 8):
        for (n, k), split in {(4096, 14336): True, (2048, 8192): True, (1024, 4096): True,
                              (4096, 4096): False, (14336, 4096): False, (8192, 2048): False,
                              (512, 1024): False}.items():
            cands = nv._candidates(bucket, k, mma=True, dtype=dtype)
            got = nv._untimed_config(cands, n, k)
            assert got in cands
            if split:
                assert (got.block_n, got.num_warps, got.split_k, got.kwarps) == (32, 2, 8, 1), (bucket, n, k)
            else:
                assert got == cands[0], (bucket, n, k)
    for bucket in (8, 16):
        cands = nv._candidates(bucket, 4096, mma=False)
        assert nv._untimed_config(cands, 4096, 14336) == cands[0]
    # It picks only from the list: with the first candidate alone, the first.
    only_first = [C(16, 16, 128, 1, 4, 1, "mma", 1, 1, x_late=1, kwarps=4)]
    assert nv._untimed_config(only_first, 14336, 4096) == only_first[0]


def test_tuner_keeps_each_candidates_best_round():
    # A GPU still raising its clocks: the first round is slow for everyone, worst for the first
    # candidates timed; one round would pick "b", two rounds pick the truly fastest "a".
    true = {"a": 14.6, "b": 15.5, "c": 15.9}
    calls = []

    def time_fn(cand):
        calls.append(cand)
        first_round = len(calls) <= 3
        return true[cand] + (0.0 if not first_round else 1.2 if cand == "a" else 0.2)
    best, timings = nv._pick_fastest(["a", "b", "c"], time_fn, rounds=1)
    assert best == "b"
    calls.clear()
    best, timings = nv._pick_fastest(["a", "b", "c"], time_fn, rounds=2)
    assert best == "a" and calls == ["a", "b", "c"] * 2
    assert dict(timings) == true


def test_weight_copies_for_the_tuner():
    # The tuner times every candidate over these: the original first, then independent copies.
    w = pack_nvfp4(torch.randn(32, 64))
    copies = weight_copies(w, 3)
    assert len(copies) == 3 and copies[0] is w
    for c in copies[1:]:
        assert c.packed.data_ptr() != w.packed.data_ptr() and c.scales.data_ptr() != w.scales.data_ptr()
        assert torch.equal(c.packed, w.packed) and torch.equal(c.scales.view(torch.uint8), w.scales.view(torch.uint8))
        assert torch.equal(unpack_nvfp4(c), unpack_nvfp4(w)) and c.shape == w.shape


def test_tile_order_layout_and_round_trip():
    # Every byte of a 16-row x 128-element tile lands in its tile's contiguous block, rows in order.
    torch.manual_seed(31)
    n, k = 32, 384
    w = pack_nvfp4(torch.randn(n, k))
    t = nv.to_tiled(w)
    assert t.tiled and t.packed.shape == w.packed.shape and t.scales.shape == w.scales.shape
    kt = k // 128
    pk, sc = t.packed.reshape(-1), t.scales.view(torch.uint8).reshape(-1)
    rows_s = w.scales.view(torch.uint8)
    def word(bytes4):
        return int.from_bytes(bytes(bytes4.tolist()), "little")

    # Bits (m, e0, e1, sign) of each of a word's eight codes in tile order: pairs (0, 1), (2, 3),
    # (4, 5) sit 0, 3 and 6 bits below the bf16 positions (6, 7, 8, 15) / (22, 23, 24, 31).
    positions = ((6, 7, 8, 15), (22, 23, 24, 31), (3, 4, 5, 12), (19, 20, 21, 28),
                 (0, 1, 2, 9), (16, 17, 18, 25), (13, 10, 11, 14), (29, 26, 27, 30))
    for row, tile in itertools.product(range(n), range(kt)):
        start = ((row // 16) * kt + tile) * 16 + row % 16
        got, want = pk[start * 64:(start + 1) * 64], w.packed[row, tile * 64:(tile + 1) * 64]
        for j in range(16):
            g, r = word(got[4 * j:4 * j + 4]), word(want[4 * j:4 * j + 4])
            for e, bits in enumerate(positions):
                code = (r >> (4 * e)) & 0xF  # element e of the row-order word
                assert [(g >> b) & 1 for b in bits] == [(code >> i) & 1 for i in range(4)], (row, tile, j, e)
        assert torch.equal(sc[start * 8:(start + 1) * 8], rows_s[row, tile * 8:(tile + 1) * 8])
    back = nv.to_rows(t)
    assert not back.tiled and torch.equal(back.packed, w.packed)
    assert torch.equal(back.scales.view(torch.uint8), rows_s)
    assert nv.to_tiled(t) is t and nv.to_rows(w) is w
    assert torch.equal(unpack_nvfp4(t), unpack_nvfp4(w))  # the reference reads either order
    copies = weight_copies(t, 2)
    assert copies[1].tiled and torch.equal(copies[1].packed, t.packed)
    for shape in ((24, 128), (16, 64)):
        assert not nv.can_tile(shape)
        with pytest.raises(ValueError, match="N % 16 == 0 and K % 128 == 0"):
            nv.to_tiled(pack_nvfp4(torch.randn(*shape)))


@pytest.mark.parametrize("config", [
    NVFP4GemmConfig(16, 32, 128, 1, 1, 1), NVFP4GemmConfig(16, 32, 256, 2, 1, 1, mode="dot_swap"),
    NVFP4GemmConfig(16, 16, 64, 3, 1, 1), NVFP4GemmConfig(2, 32, 64, 2, 1, 1, mode="gemv")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_read_the_tile_order(config, dtype):
    # The same products from the tile order as from the row order (K = 384: a 256-wide K tile
    # runs past K in the tile order too; both decodes of the tile order's bit layout).
    torch.manual_seed(32)
    x = torch.randn(2, 384).to(dtype).to(DEVICE)
    w = pack_nvfp4(torch.randn(48, 384).to(DEVICE))
    bias = torch.randn(48).to(dtype).to(DEVICE)
    y_rows = nvfp4_gemm(x, w, bias, config=config)
    y_tiles = nvfp4_gemm(x, nv.to_tiled(w), bias, config=config)
    assert torch.equal(y_rows, y_tiles)
    ref = nvfp4_linear_reference(x.float(), w, bias.float())
    assert float((y_tiles.float() - ref).norm() / ref.norm()) < 1e-2


def test_tile_word_permutation_matches_bitwise_definition():
    # The byte-table permutation of to_tiled / to_rows against the bit-by-bit definition of
    # _TILE_BITS (code bit q of element e, row-order bit 4 e + q, goes to _TILE_BITS[e][q]).
    gen = torch.Generator().manual_seed(31)
    b = torch.randint(0, 256, (5000, 4), generator=gen, dtype=torch.uint8)
    b[0] = 0xFF  # every bit set, the sign bit of the word included
    c = b.to(torch.int64)
    word = c[:, 0] | (c[:, 1] << 8) | (c[:, 2] << 16) | (c[:, 3] << 24)
    expected = torch.zeros_like(word)
    for e, bits in enumerate(nv._TILE_BITS):
        for q, dest in enumerate(bits):
            expected |= ((word >> (4 * e + q)) & 1) << dest
    got = nv._permute_words(b, nv._TO_TILE_TABLES).to(torch.int64)
    assert torch.equal(got[:, 0] | (got[:, 1] << 8) | (got[:, 2] << 16) | (got[:, 3] << 24), expected)
    assert torch.equal(nv._permute_words(nv._permute_words(b, nv._TO_TILE_TABLES), nv._TO_ROW_TABLES), b)


def test_module_in_tile_order_keeps_row_order_checkpoints():
    torch.manual_seed(33)
    lin = torch.nn.Linear(256, 32)
    rows = NVFP4Linear.from_linear(lin, tiled=False)
    tiles = NVFP4Linear.from_linear(lin, tiled=True)
    assert tiles.tiled and not rows.tiled and "tile order" in repr(tiles)
    assert not torch.equal(tiles.packed, rows.packed)  # the bytes really are re-ordered
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(tiles(x), rows(x))
    sd = tiles.state_dict()
    for key, value in rows.state_dict().items():
        assert torch.equal(sd[key].view(torch.uint8) if sd[key].dtype == torch.float8_e4m3fn else sd[key],
                           value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value), key
    fresh = NVFP4Linear.from_linear(torch.nn.Linear(256, 32), tiled=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.packed, tiles.packed) and torch.equal(fresh.scales.view(torch.uint8),
                                                                    tiles.scales.view(torch.uint8))
    with torch.no_grad():
        assert torch.equal(fresh(x), rows(x))
        # Compiled and exported, the tile-order module gives the same output.
        assert torch.equal(torch.compile(tiles)(x), rows(x))
        assert torch.equal(torch.export.export(tiles, (x,)).module()(x), rows(x))
    assert not NVFP4Linear.from_linear(lin).tiled  # automatic choice: only on a GPU of compute capability 9.0+
    assert NVFP4Linear(256, 32, tiled=True).tiled and not NVFP4Linear(256, 32).tiled
    with pytest.raises(ValueError, match="tile order"):
        NVFP4Linear(256, 24, tiled=True)


def test_kwarps_candidates_need_k_tiles_they_divide():
    # A program whose warps split K needs every warp to get the same number of K tiles.
    c4 = NVFP4GemmConfig(8, 16, 128, 1, 4, 1, "mma", x_late=1, kwarps=4)
    kept = nv._runnable([c4], 128 * 6)
    assert c4 not in kept and kept  # 6 tiles: not 4 equal shares; the fallback remains
    assert c4 in nv._runnable([c4], 128 * 8)
    x = torch.randn(1, 128 * 6).to(DEVICE)
    with pytest.raises(ValueError, match="kwarps"):
        nvfp4_gemm(x, pack_nvfp4(torch.randn(16, 128 * 6).to(DEVICE)), config=c4)


def test_mma_kernel_needs_a_gpu():
    x = torch.randn(1, 128).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match="9.0"):
        nvfp4_gemm(x, pack_nvfp4(torch.randn(16, 128).to(DEVICE)), config=NVFP4GemmConfig(8, 64, 128, mode="mma"))


@pytest.mark.gpu
@pytest.mark.parametrize("block", [(8, 64, 128, 1, 4, 1, 0, "kernel"), (16, 128, 128, 4, 4, 2, 1, "kernel"),
                                   (8, 32, 128, 2, 1, 2, 0, "atomic"), (16, 64, 128, 8, 2, 1, 1, "atomic"),
                                   (8, 128, 128, 4, 4, 2, 1, "atomic"),
                                   # x read when used (the candidates' choice)
                                   (8, 32, 128, 2, 2, 2, 1, "kernel", 1), (16, 64, 128, 4, 2, 1, 1, "atomic", 1),
                                   (16, 32, 128, 2, 1, 1, 1, "kernel", 1), (8, 128, 128, 8, 4, 2, 1, "kernel", 1),
                                   # warps sharing rows, K split inside the program (kwarps)
                                   (8, 16, 128, 1, 4, 1, 1, "kernel", 1, 4), (16, 32, 128, 1, 4, 1, 1, "kernel", 1, 4),
                                   (8, 64, 128, 2, 8, 2, 1, "kernel", 1, 2), (16, 32, 128, 2, 2, 1, 0, "atomic", 0, 2),
                                   (8, 32, 128, 1, 16, 1, 1, "kernel", 1, 8),
                                   # rings of 3-6 tiles in flight (more than a warp's share at K = 1024)
                                   (8, 16, 128, 1, 4, 4, 1, "kernel", 1, 4), (16, 64, 128, 2, 2, 3, 1, "kernel", 1),
                                   (8, 32, 128, 4, 2, 6, 1, "atomic", 1), (16, 32, 128, 1, 4, 6, 0, "kernel", 1, 2),
                                   # the weight in tile order (N = 1008: the last program's blocks clamped)
                                   (8, 16, 128, 1, 4, 1, 1, "kernel", 1, 4, 1), (16, 64, 128, 1, 4, 1, 1, "kernel", 1, 2, 1),
                                   (8, 64, 128, 4, 4, 4, 1, "atomic", 1, 1, 1), (16, 32, 128, 2, 1, 2, 0, "kernel", 0, 1, 1),
                                   # x read per chunk
                                   (16, 32, 128, 1, 4, 1, 1, "kernel", 2, 4, 1), (8, 16, 128, 4, 1, 2, 1, "kernel", 2),
                                   (16, 64, 128, 2, 2, 1, 1, "atomic", 2, 1, 1)])
def test_gpu_mma_configs(block):
    bm, bn, bk, split, warps, ahead, hint, reduce = block[:8]
    x_late = block[8] if len(block) > 8 else 0
    kwarps = block[9] if len(block) > 9 else 1
    tiled = block[10] if len(block) > 10 else 0
    cfg = NVFP4GemmConfig(bm, bn, bk, split, warps, 1, "mma", ahead, hint, reduce, x_late, kwarps)
    torch.manual_seed(18)
    for k, n in ((4096, 1008 if tiled else 1000), (1024, 14336)):
        w = pack_nvfp4(torch.randn(n, k, device="cuda"))
        if tiled:
            w = nv.to_tiled(w)
        for m in sorted({1, 2, 3, 8, bm}):
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.randn(m, k, device="cuda").to(dtype)
                bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
                y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                from rewriter.kernels.nvfp4 import _launch
                _launch(x, w, bias, y, cfg)
                ref = nvfp4_linear_reference(x.float(), w, None if bias is None else bias.float())
                assert torch.isfinite(y).all()
                err = float((y.float() - ref).norm() / ref.norm())
                assert err < (4e-3 if dtype == torch.bfloat16 else 1e-3), (m, k, n, dtype, err)
                # Again (the in-kernel reduction's counters must have been left at zero).
                y2 = torch.full_like(y, float("nan"))
                _launch(x, w, bias, y2, cfg)
                assert torch.equal(y2, y)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [(16, 32, 128, 4, 1, 1, 1, 1), (8, 32, 128, 8, 2, 1, 1, 1),
                                   (16, 128, 128, 8, 4, 2, 1, 1), (16, 32, 128, 2, 2, 1, 0, 2),
                                   (8, 64, 128, 4, 4, 2, 1, 1)])
def test_gpu_in_kernel_split_sum_equals_the_reduction_kernel(block):
    # The last program of a row block sums the splits in split order, its own from registers: the
    # same bits as the second kernel, in tile and row order, with and without a bias.
    bm, bn, bk, split, warps, ahead, x_late, kwarps = block
    kern = NVFP4GemmConfig(bm, bn, bk, split, warps, 1, "mma", ahead, 1, "kernel", x_late, kwarps)
    atom = NVFP4GemmConfig(bm, bn, bk, split, warps, 1, "mma", ahead, 1, "atomic", x_late, kwarps)
    torch.manual_seed(32)
    for k, n in ((4096, 1008), (14336, 512)):
        for tiled in (False, True):
            w = pack_nvfp4(torch.randn(n, k, device="cuda"))
            w = nv.to_tiled(w) if tiled else w
            for m in sorted({1, 3, bm}):
                for dtype in (torch.bfloat16, torch.float16):
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
                    y = nvfp4_gemm(x, w, bias, config=kern)
                    for _ in range(2):  # (the counters are left at zero for the next call)
                        assert torch.equal(nvfp4_gemm(x, w, bias, config=atom), y), (k, n, tiled, m, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("x_late,tiled", [(0, False), (1, False), (1, True), (2, True), (0, True)])
def test_gpu_mma_exact_on_exact_data(x_late, tiled):
    # Representable weights (subnormal scales included) and small-integer activations: exact sums
    # (in tile order too, where x enters the MMA unpermuted).
    gen = torch.Generator().manual_seed(21)
    wt, _ = representable_weight(48, 256, 2.0**-12, gen, scale_bits=(0x38, 0x57))
    w = pack_nvfp4(wt.cuda())
    if tiled:
        w = nv.to_tiled(w)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randint(-3, 4, (5, 256), generator=gen).to(dtype).cuda()
        y = nvfp4_gemm(x, w, config=NVFP4GemmConfig(8, 64, 128, 1, 4, 1, "mma", x_late=x_late))
        assert torch.equal(y, nvfp4_linear_reference(x, w)), dtype


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mma", "mma_x_late", "gemv"])
def test_gpu_small_blocks_with_subnormal_scales(mode):
    # Rows 1e-5 times smaller than the largest get E4M3 subnormal block scales (and E2M1 code 1
    # values, the subnormal patterns of the decode): every row must still match the reference.
    torch.manual_seed(22)
    wt = torch.randn(64, 512, device="cuda")
    wt[::3] *= 1e-5
    w = pack_nvfp4(wt)
    assert (w.scales.view(torch.uint8)[::3] < 8).any()  # subnormal E4M3 scales are present
    cfg = {"mma": NVFP4GemmConfig(8, 64, 128, 1, 4, 1, "mma"),
           "mma_x_late": NVFP4GemmConfig(8, 64, 128, 1, 4, 1, "mma", x_late=1),
           "gemv": NVFP4GemmConfig(4, 32, 128, 1, 2, 1, "gemv")}[mode]
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 512, device="cuda").to(dtype)
        y = nvfp4_gemm(x, w, config=cfg).float()
        ref = nvfp4_linear_reference(x.float(), w)
        row_err = (y - ref).norm(dim=0) / ref.norm(dim=0)
        assert float(row_err.max()) < (4e-3 if dtype == torch.bfloat16 else 2e-3), (dtype, float(row_err.max()))


@pytest.mark.gpu
def test_gpu_pack_matches_cpu_pack():
    torch.manual_seed(15)
    w = torch.randn(256, 512) * 0.05
    a, b = pack_nvfp4(w), pack_nvfp4(w.cuda())
    assert torch.equal(a.packed, b.packed.cpu())
    assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8).cpu())
    assert torch.equal(a.global_scale, b.global_scale.cpu())


@pytest.mark.parametrize("m", [16, 9, 1])
def test_x_fragment_order_is_what_each_lane_reads(m):
    # The kernel that lays x out for the MMA kernel (x_frag) against the definition: per K tile, row
    # set s, piece i and lane 4 g + c, the 8 elements x[8 s + g, 128 tile + 32 c + 8 i :] (rows past M
    # repeat row M - 1); also x_fragments, the reference.
    k = 384
    torch.manual_seed(40)
    base = torch.randn(m, k + 8).to(torch.bfloat16)
    x = base[:, :k]  # rows 16-byte aligned, longer than K
    want = torch.empty(k // 128, 2, 4, 8, 4, 8, dtype=x.dtype)
    for t, s, i, g, c in itertools.product(range(k // 128), range(2), range(4), range(8), range(4)):
        col = 128 * t + 32 * c + 8 * i
        want[t, s, i, g, c] = x[min(8 * s + g, m - 1), col:col + 8]
    assert torch.equal(nv.x_fragments(x), want.reshape(-1))
    if DEVICE == "cpu" and not nv._interpreting():
        pytest.skip("the Triton kernel needs a GPU or TRITON_INTERPRET=1")
    xd = x.to(DEVICE)
    got = torch.full((k * 16,), float("nan"), dtype=x.dtype, device=DEVICE)
    nv._nvfp4_x_frag_kernel[(k // 128,)](xd, got, m, xd.stride(0), PDL=False)
    assert torch.equal(got.cpu(), want.reshape(-1))
    with pytest.raises(ValueError, match="M <= 16"):
        nv.x_fragments(torch.zeros(17, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("block", [(32, 1, 4, 1, 4), (16, 1, 4, 1, 4), (32, 4, 1, 1, 1), (64, 8, 2, 2, 1),
                                   (32, 2, 1, 1, 1, 2), (32, 1, 4, 1, 4, 0)])
def test_gpu_x_in_fragment_order_gives_the_same_bits(block):
    # x laid out in fragment order first (x_frag 1), and that overlapped with the MMA kernel by
    # programmatic dependent launch (2): the same bits as x read as it is, in a CUDA graph too,
    # replayed with new x (the overlapped kernel must wait for the new x).
    bn, split, warps, ahead, kwarps = block[:5]
    x_late = block[5] if len(block) > 5 else 1
    C = NVFP4GemmConfig
    plain = C(16, bn, 128, split, warps, 1, "mma", ahead, 1, x_late=x_late, kwarps=kwarps)
    torch.manual_seed(41)
    for k, n in ((4096, 1008), (1024, 14336)):
        w = nv.to_tiled(pack_nvfp4(torch.randn(n, k, device="cuda")))
        for m in (9, 16):
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.randn(m, k, device="cuda").to(dtype)
                bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
                want = nvfp4_gemm(x, w, bias, config=plain)
                for xf in (1, 2):
                    cfg = dataclasses.replace(plain, x_frag=xf)
                    assert torch.equal(nvfp4_gemm(x, w, bias, config=cfg), want), (k, n, m, dtype, xf)
                    static = x.clone()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = nvfp4_gemm(static, w, bias, config=cfg)
                    for _ in range(3):
                        new = torch.randn(m, k, device="cuda").to(dtype)
                        static.copy_(new)
                        graph.replay()
                        assert torch.equal(out, nvfp4_gemm(new, w, bias, config=plain)), (k, n, m, dtype, xf)


@pytest.mark.gpu
def test_gpu_module_and_cuda_graph():
    torch.manual_seed(16)
    lin = torch.nn.Linear(2048, 2048, device="cuda", dtype=torch.bfloat16)
    q = NVFP4Linear.from_linear(lin)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = q(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = q(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert sqnr_db(lin(x).float(), eager.float()) > 15


# ------------------------------------------------------------------------------------------------
# Host path: the eager call skips the dispatcher; launches take Triton's short path once compiled.
# ------------------------------------------------------------------------------------------------


def test_eager_call_runs_the_implementation_and_tracing_sees_the_op(monkeypatch):
    calls = count_calls(monkeypatch, nv, "_nvfp4_linear_impl")
    torch.manual_seed(12)
    w = pack_nvfp4(torch.randn(16, 32, device=DEVICE))
    x = torch.randn(3, 32, device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        direct = nvfp4_linear(x, w, use_triton=True)
    assert calls == [1]  # eager: the implementation itself, no dispatcher

    with torch.no_grad(), recording_mode() as mode:
        traced = nvfp4_linear(x, w, use_triton=True)
    # Under a dispatch mode (as under tracing) the call goes through the op.
    assert "rewriter.nvfp4_linear.default" in mode.ops and calls == [1]
    assert torch.equal(traced, direct)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_short_launch_path_same_result(monkeypatch, m):
    torch.manual_seed(17)
    lin = torch.nn.Linear(2048, 4096, device="cuda", dtype=torch.bfloat16)
    q = NVFP4Linear.from_linear(lin)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(_launch, "ENABLED", False)
        ref = q(x)
        monkeypatch.setattr(_launch, "ENABLED", True)
        before = _launch.LAUNCHES
        first = q(x)
        second = q(x)
        again = q(x)  # by the short path
        torch.cuda.synchronize()
    assert _launch.LAUNCHES > before and _launch.ENABLED
    assert torch.equal(first, ref) and torch.equal(second, ref) and torch.equal(again, ref)
    assert sqnr_db(lin(x).float(), ref.float()) > 15
