"""Tests of the fused attention kernel against a float64 reference.

Without CUDA they run the Triton kernels through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), where the kernels use small fixed blocks (32 query rows x 16 keys forward),
so shapes of a few dozen rows already cross several blocks and exercise the masked/unmasked
block split. Error metric everywhere: ||x - ref|| / ||ref|| (Frobenius).

Tolerances:
- fp32 inputs: the interpreter's dot is exact fp32, so errors are rounding of the fp32 softmax,
  about 1e-7..1e-6; 1e-5 gives headroom. On CUDA the dots run in tf32 (10-bit mantissa, unit
  roundoff 4.9e-4), so 3e-3 there.
- bf16/fp16 inputs: within 2x the error of an eager implementation in the same dtype (matmuls in
  the input dtype, softmax in fp32, as Hugging Face's eager attention does), both against the
  float64 reference on the same rounded inputs.
"""

import math

import pytest
import torch

from rewriter.kernels.flash_attention import (
    attention_reference,
    dropout_keep_mask,
    flash_attention,
    supports,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 3e-3 if DEVICE == "cuda" else 1e-5


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(DEVICE, dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _op(q, k, v, scale=None, causal=False, causal_align="top_left", window=None,
        alibi_slopes=None, softcap=None, key_padding_mask=None, dropout_p=0.0, seed=None):
    """The op itself (which also returns the log-sum-exp), with the public keyword arguments."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    left, right = window if window is not None else (None, None)
    pad = key_padding_mask
    if pad is not None and pad.dtype == torch.bool:
        pad = torch.zeros(pad.shape, device=pad.device).masked_fill(~pad, float("-inf"))
    return torch.ops.rewriter.flash_attention(q, k, v, scale, causal, causal_align, left, right,
                                              alibi_slopes, softcap, pad, dropout_p, seed)


def _grads(out, lse, tensors, seed=1, lse_grad=True):
    """Backward of sum(out * g) (+ sum(lse * gl) where lse is finite); returns (grads, g, gl)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    loss = (out * g).double().sum()
    gl = None
    if lse_grad:
        gl = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype)
        loss = loss + (lse * gl).double().sum()
    grads = torch.autograd.grad(loss, tensors)
    return grads, g, gl


def _reference_with_grads(q, k, v, g, gl, **kw):
    qd, kd, vd = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(qd, kd, vd, **kw)
    loss = (out * g.double()).sum()
    if gl is not None:
        loss = loss + (lse * gl.double()).sum()
    grads = torch.autograd.grad(loss, (qd, kd, vd))
    return out, lse, grads


def _slopes(h):
    # The ALiBi slopes of a model with h heads (geometric, 2^(-8/h) ratio).
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEVICE)


def _padding(B, Skv, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Skv, generator=g) > 0.3
    keep[:, 0] = True  # no row of keys entirely padded here (tested separately)
    bias = torch.randn(B, Skv, generator=g) * 0.5
    return torch.where(keep, bias, torch.full_like(bias, float("-inf"))).to(DEVICE)


# (B, Hq, Hkv, Sq, Skv, D, variant). Sizes mix block multiples and odd lengths; the large
# sequence lengths keep D small so the interpreter stays fast.
CASES = [
    (1, 2, 2, 1, 1, 32, {}),
    (1, 2, 2, 1, 17, 32, dict(causal=True, causal_align="bottom_right")),
    (1, 2, 2, 17, 17, 32, dict(causal=True)),
    (2, 2, 2, 17, 113, 64, {}),
    (1, 2, 2, 113, 17, 32, dict(causal=True, causal_align="bottom_right")),
    (1, 1, 1, 1000, 17, 16, {}),
    (1, 1, 1, 17, 1000, 16, dict(causal=True, causal_align="bottom_right")),
    (1, 1, 1, 1000, 1000, 16, dict(causal=True, window=(40, 0))),
    (1, 2, 2, 64, 64, 80, {}),
    (1, 2, 2, 45, 45, 112, dict(causal=True)),
    (1, 1, 1, 20, 24, 256, dict(causal=True)),
    (1, 2, 2, 33, 40, 48, dict(causal=True, causal_align="bottom_right")),
    (1, 4, 1, 50, 50, 32, dict(causal=True)),
    (2, 8, 2, 33, 40, 32, {}),
    (1, 2, 2, 100, 100, 32, dict(causal=True, window=(20, 0))),
    (1, 2, 2, 100, 80, 32, dict(causal=True, alibi_slopes="alibi")),
    (1, 2, 2, 60, 60, 32, dict(causal=True, softcap=5.0)),
    (2, 2, 2, 70, 90, 32, dict(causal=True, key_padding_mask="pad")),
    (1, 2, 2, 96, 96, 32, dict(window=(30, None))),
    (1, 2, 2, 96, 96, 32, dict(window=(None, 10))),
    (1, 2, 2, 70, 50, 32, dict(window=(12, 7), causal_align="bottom_right")),
    (1, 2, 2, 50, 50, 32, dict(causal=True, scale=0.3)),
    (1, 4, 1, 64, 64, 32, dict(causal=True, window=(16, 0))),
    (1, 4, 2, 50, 60, 32, dict(alibi_slopes="alibi")),
    (1, 4, 2, 40, 40, 32, dict(softcap=3.0)),
    (2, 4, 1, 40, 60, 32, dict(key_padding_mask="pad")),
    (2, 4, 2, 30, 47, 32, dict(causal=True, causal_align="bottom_right", window=(9, 0),
                               alibi_slopes="alibi", softcap=4.0, key_padding_mask="pad")),
    # Bands wide enough for whole blocks inside them, which skip the mask (edge blocks keep it).
    (1, 2, 2, 200, 200, 32, dict(causal=True, window=(100, 0))),
    (1, 2, 1, 150, 190, 32, dict(window=(60, 50), causal_align="bottom_right")),
    (2, 2, 2, 180, 170, 32, dict(causal=True, window=(90, 0), alibi_slopes="alibi",
                                 key_padding_mask="pad", softcap=6.0)),
]


def _materialize(kw, B, Hq, Skv):
    kw = dict(kw)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = _slopes(Hq)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = _padding(B, Skv)
    return kw


def _case_id(case):
    B, Hq, Hkv, Sq, Skv, D, kw = case
    return f"{B}x{Hq}/{Hkv}x{Sq}x{Skv}x{D}-" + ("+".join(sorted(kw)) or "plain")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference_fp32(case):
    B, Hq, Hkv, Sq, Skv, D, kw = case
    kw = _materialize(kw, B, Hq, Skv)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D)
    out, lse = _op(q, k, v, **kw)
    ref_out, ref_lse, _ = _reference_with_grads(q, k, v, torch.zeros_like(out), None, **kw)
    assert _rel(out, ref_out) < FP32_TOL
    # Rows with no visible key: lse -inf in both, output exactly zero.
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), dead)
    assert torch.all(out[dead] == 0)
    assert _rel(lse[~dead], ref_lse[~dead]) < FP32_TOL
    lse_grad = not bool(dead.any())
    (dq, dk, dv), g, gl = _grads(out, lse, (q, k, v), lse_grad=lse_grad)
    _, _, (rdq, rdk, rdv) = _reference_with_grads(q, k, v, g, gl, **kw)
    for name, x, ref in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert torch.isfinite(x).all(), name
        assert _rel(x, ref) < FP32_TOL, name


def _eager_lowp(q, k, v, scale=None, causal=False, causal_align="top_left", window=None,
                alibi_slopes=None, softcap=None, key_padding_mask=None):
    """Attention as eager model code computes it in q's dtype (the error yardstick)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    # Everything additive (ALiBi, padding, the band mask) comes from the float64 reference's
    # own construction: run it on zero inputs, where the scores are exactly the additive terms.
    zq = torch.zeros(B, Hq, Sq, 1, dtype=torch.float64, device=q.device)
    zk = torch.zeros(B, Hq, Skv, 1, dtype=torch.float64, device=q.device)
    bias = _additive_terms(zq, zk, causal, causal_align, window, alibi_slopes, key_padding_mask)
    p = torch.softmax(s.float() + bias.float(), dim=-1).to(q.dtype)
    return p @ v


def _additive_terms(zq, zk, causal, causal_align, window, alibi_slopes, key_padding_mask):
    Sq, Skv = zq.shape[2], zk.shape[2]
    i = torch.arange(Sq, device=zq.device)[:, None]
    j = torch.arange(Skv, device=zq.device)[None, :]
    bias = torch.zeros(zq.shape[0], zq.shape[1], Sq, Skv, dtype=torch.float64, device=zq.device)
    if alibi_slopes is not None:
        bias = bias + alibi_slopes.double()[None, :, None, None] * (j - i)
    if key_padding_mask is not None:
        bias = bias + key_padding_mask.double()[:, None, None, :]
    off = 0 if causal_align == "top_left" else Skv - Sq
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:
        bias = bias.masked_fill(j > i + off + right, float("-inf"))
    if left is not None:
        bias = bias.masked_fill(j < i + off - left, float("-inf"))
    return bias


LOWP_CASES = [
    (1, 2, 2, 100, 100, 64, dict(causal=True)),
    (1, 4, 1, 70, 90, 32, dict(causal=True, causal_align="bottom_right", alibi_slopes="alibi")),
    (1, 2, 2, 64, 64, 80, dict(causal=True, softcap=10.0)),
    (2, 4, 2, 60, 60, 32, dict(causal=True, window=(24, 0), key_padding_mask="pad")),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOWP_CASES, ids=[_case_id(c) for c in LOWP_CASES])
def test_low_precision_within_2x_of_eager(case, dtype):
    B, Hq, Hkv, Sq, Skv, D, kw = case
    kw = _materialize(kw, B, Hq, Skv)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=dtype)
    out, lse = _op(q, k, v, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    (dq, dk, dv), g, _ = _grads(out, lse, (q, k, v), lse_grad=False)
    ref_out, _, (rdq, rdk, rdv) = _reference_with_grads(q, k, v, g, None, **kw)

    qe, ke, ve = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = _eager_lowp(qe, ke, ve, **kw)
    edq, edk, edv = torch.autograd.grad((eager * g).sum(), (qe, ke, ve))
    for name, x, e, ref in (("out", out, eager, ref_out), ("dq", dq, edq, rdq),
                            ("dk", dk, edk, rdk), ("dv", dv, edv, rdv)):
        err, eager_err = _rel(x, ref), _rel(e, ref)
        assert err <= 2 * eager_err, f"{name}: {err:.2e} vs eager {eager_err:.2e}"


# ------------------------------------------------------------------------------------------
# Dropout.
# ------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _umulhi(a, b):
    # High 32 bits of a 32x32-bit product, without overflowing int64.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    return ((a_hi * b) + ((a_lo * b) >> 16)) >> 16


def _philox_keep(seed, offsets, p):
    """Philox 4x32-10 as tl.rand computes it (counter = 64-bit offset, key = 64-bit seed),
    written independently of Triton, then the kernel's threshold: keep iff u >= p."""
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = torch.full_like(c0, seed & _M32)
    k1 = torch.full_like(c0, (seed >> 32) & _M32)
    for _ in range(10):
        n0 = _umulhi(torch.full_like(c2, 0xCD9E8D57), c2) ^ c1 ^ k0
        n2 = _umulhi(torch.full_like(c0, 0xD2511F53), c0) ^ c3 ^ k1
        c1 = (0xCD9E8D57 * c2) & _M32
        c3 = (0xD2511F53 * c0) & _M32
        c0, c2 = n0, n2
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    x = torch.where(x < 0, -x - 1, x)
    u = x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return u >= torch.tensor(p, dtype=torch.float32)


def test_dropout_mask_is_philox_of_the_element_index():
    B, H, Sq, Skv, p = 2, 3, 19, 37, 0.25
    seed = 0x1234_5678_9ABC
    mask = dropout_keep_mask(torch.tensor([seed], device=DEVICE), B, H, Sq, Skv, p).cpu()
    b, h, i, j = torch.meshgrid(torch.arange(B), torch.arange(H), torch.arange(Sq),
                                torch.arange(Skv), indexing="ij")
    offsets = ((b * H + h) * Sq + i) * Skv + j
    assert torch.equal(mask, _philox_keep(seed, offsets, p))
    assert abs(mask.float().mean().item() - (1 - p)) < 0.03


def test_dropout_reproducible_and_seed_dependent():
    q, k, v = _inputs(1, 2, 2, 40, 40, 32)
    torch.manual_seed(7)
    a = flash_attention(q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(7)
    b = flash_attention(q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(8)
    c = flash_attention(q, k, v, causal=True, dropout_p=0.2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = flash_attention(q, k, v, causal=True)
    assert not torch.equal(a, plain)


@pytest.mark.parametrize("case", [
    (1, 2, 2, 40, 50, 32, dict(causal=True)),
    (2, 4, 1, 33, 33, 32, dict(causal=True, window=(10, 0), alibi_slopes="alibi", softcap=5.0,
                               key_padding_mask="pad")),
], ids=["causal", "gqa-all-variants"])
def test_dropout_matches_reference_with_same_mask(case):
    B, Hq, Hkv, Sq, Skv, D, kw = case
    kw = _materialize(kw, B, Hq, Skv)
    p = 0.3
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D)
    seed = torch.tensor([987654321], device=DEVICE)
    out, lse = _op(q, k, v, dropout_p=p, seed=seed, **kw)
    mask = dropout_keep_mask(seed, B, Hq, Sq, Skv, p)
    (dq, dk, dv), g, gl = _grads(out, lse, (q, k, v))
    ref_out, ref_lse, (rdq, rdk, rdv) = _reference_with_grads(
        q, k, v, g, gl, dropout_p=p, dropout_mask=mask, **kw)
    for name, x, ref in (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, rdq),
                         ("dk", dk, rdk), ("dv", dv, rdv)):
        assert _rel(x, ref) < FP32_TOL, name


# ------------------------------------------------------------------------------------------
# Fully masked rows, wrapper arguments, support checks.
# ------------------------------------------------------------------------------------------


def test_fully_masked_rows_give_zeros_and_zero_grads():
    B, H, Sq, Skv, D = 2, 2, 24, 40, 32
    q, k, v = _inputs(B, H, H, Sq, Skv, D)
    keep = torch.ones(B, Skv, dtype=torch.bool, device=DEVICE)
    keep[1] = False  # batch 1: every key padded
    # window (-30, None) keeps only keys j >= i + 30: rows i >= 10 of batch 0 see nothing.
    out = flash_attention(q, k, v, key_padding_mask=keep, window=(-30, None))
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0) and torch.all(out[0, :, 10:] == 0)
    assert out[0, :, :10].abs().sum() > 0
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for x in (dq, dk, dv):
        assert torch.isfinite(x).all()
    assert torch.all(dq[1] == 0) and torch.all(dq[0, :, 10:] == 0)
    assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


def test_public_wrapper_bool_mask_and_4d_mask():
    B, H, S, D = 2, 2, 30, 32
    q, k, v = _inputs(B, H, H, S, S, D)
    keep = torch.rand(B, S, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.4
    keep[:, 0] = True
    out2d = flash_attention(q, k, v, causal=True, key_padding_mask=keep)
    out4d = flash_attention(q, k, v, causal=True, key_padding_mask=keep[:, None, None, :])
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True,
                                 key_padding_mask=keep)
    assert torch.equal(out2d, out4d)
    assert _rel(out2d, ref) < FP32_TOL


def test_non_contiguous_inputs():
    # (B, S, H, D) storage viewed as (B, H, S, D), as models produce it.
    B, H, S, D = 2, 4, 37, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(B, S, H, D, generator=g).to(DEVICE).transpose(1, 2)
               for _ in range(3)]
    out = flash_attention(q, k, v, causal=True)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert _rel(out, ref) < FP32_TOL


def test_supports_reasons():
    q, k, v = [t.detach() for t in _inputs(1, 4, 2, 8, 8, 32)]
    assert supports(q, k, v) == (True, "supported")
    assert supports(q, k, v, causal=True, window=(4, 0), softcap=2.0, dropout_p=0.1)[0]
    big = torch.zeros(1, 4, 8, 288, device=DEVICE)
    assert "head dim" in supports(big, big, big)[1]
    assert "multiple" in supports(q, k[:, :1].expand(1, 3, 8, 32), v[:, :1].expand(1, 3, 8, 32))[1]
    assert "dtype" in supports(q.long(), k.long(), v.long())[1]
    assert "share one dtype" in supports(q, k.double(), v)[1]
    assert "causal_align" in supports(q, k, v, causal_align="center")[1]
    assert "alibi" in supports(q, k, v, alibi_slopes=torch.ones(3, device=DEVICE))[1]
    assert "key_padding_mask" in supports(q, k, v,
                                          key_padding_mask=torch.ones(1, 9, device=DEVICE))[1]
    assert "dropout" in supports(q, k, v, dropout_p=1.0)[1]
    assert "softcap" in supports(q, k, v, softcap=0.0)[1]
    assert "window" in supports(q, k, v, window=(1.5, 0))[1]
    assert "scale" in supports(q, k, v, scale=-1.0)[1]
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(big, big, big)


# ------------------------------------------------------------------------------------------
# Graph capture: torch.compile, torch.export, opcheck.
# ------------------------------------------------------------------------------------------


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    q, k, v = _inputs(1, 4, 2, 24, 24, 32)
    slopes = _slopes(4)

    def f(q, k, v):
        out = flash_attention(q, k, v, causal=True, alibi_slopes=slopes, softcap=8.0,
                              dropout_p=0.1)
        return (out * out).sum()

    # aot_eager traces forward and backward through the op's fake and autograd registrations
    # without generating code, so no C++ compiler is needed on CPU.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    torch.manual_seed(11)
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    assert torch.allclose(loss_c, loss_e, rtol=1e-6)
    for a, b in zip(grads_c, grads_e):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_torch_export_keeps_the_op():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slopes", _slopes(4))

        def forward(self, q, k, v):
            return flash_attention(q, k, v, causal=True, alibi_slopes=self.slopes)

    q, k, v = [t.detach() for t in _inputs(1, 4, 1, 20, 20, 32)]
    model = Attn().to(DEVICE)
    ep = torch.export.export(model, (q, k, v))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewriter.flash_attention.default in targets
    assert torch.equal(ep.module()(q, k, v), model(q, k, v))


def test_opcheck():
    q, k, v = _inputs(1, 4, 2, 20, 20, 16)
    slopes = _slopes(4)
    pad = _padding(1, 20)
    args = (q, k, v, 0.25, True, "bottom_right", 6, 0, slopes, 5.0, pad, 0.0, None)
    torch.library.opcheck(torch.ops.rewriter.flash_attention.default, args)
    out, lse = torch.ops.rewriter.flash_attention(*args)
    g = torch.randn_like(out)
    bwd_args = (g, None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach()) + args[3:]
    torch.library.opcheck(torch.ops.rewriter.flash_attention_backward.default, bwd_args)


def test_autograd_kernel_records_only_when_needed():
    q, k, v = _inputs(1, 2, 2, 12, 12, 16)
    with torch.no_grad():
        out, lse = torch.ops.rewriter.flash_attention(q, k, v, 0.25, True, "top_left", None, None, None,
                                                      None, None, 0.0, None)
    assert out.grad_fn is None and not out.requires_grad
    out, lse = torch.ops.rewriter.flash_attention(q.detach(), k.detach(), v.detach(), 0.25, True,
                                                  "top_left", None, None, None, None, None, 0.0, None)
    assert out.grad_fn is None
    # Only k needs a gradient: the backward still runs and returns None for the others.
    kk = k.detach().requires_grad_()
    out, _ = torch.ops.rewriter.flash_attention(q.detach(), kk, v.detach(), 0.25, True, "top_left", None,
                                                None, None, None, None, 0.0, None)
    (gk,) = torch.autograd.grad(out.sum(), (kk,))
    k64 = kk.detach().double().requires_grad_()
    ref, _ = attention_reference(q.detach().double(), k64, v.detach().double(), scale=0.25, causal=True)
    (gk_ref,) = torch.autograd.grad(ref.sum(), (k64,))
    assert torch.allclose(gk.double(), gk_ref, rtol=1e-4, atol=1e-5)


def test_double_backward_is_refused_clearly():
    q, k, v = _inputs(1, 2, 2, 12, 12, 16)
    out = flash_attention(q, k, v, causal=True)
    (gq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(gq.sum(), (q,))


def test_eager_calls_skip_the_dispatcher_and_traced_calls_keep_the_op(monkeypatch):
    """An eager call on plain tensors runs the implementations directly (the op's dispatch costs
    host time); a call under a dispatch mode (as under tracing) goes through the op, with the same
    results. The backward gets no zeros for the unused lse gradient either way."""
    from utils import recording_mode

    # The ops were registered with the original functions; the direct path looks the module's
    # names up at call time, so spies there see the direct calls only.
    direct_calls = []
    real_fwd, real_bwd = fa_mod.attention_forward, fa_mod.attention_backward

    def spy_fwd(*args):
        direct_calls.append("forward")
        return real_fwd(*args)

    def spy_bwd(grad_out, grad_lse, *args):
        direct_calls.append(("backward", grad_lse))
        return real_bwd(grad_out, grad_lse, *args)

    monkeypatch.setattr(fa_mod, "attention_forward", spy_fwd)
    monkeypatch.setattr(fa_mod, "attention_backward", spy_bwd)

    q, k, v = _inputs(1, 4, 2, 20, 20, 16)
    do = torch.randn_like(q)
    direct = flash_attention(q, k, v, causal=True, softcap=6.0)
    g_direct = torch.autograd.grad(direct, (q, k, v), do)
    assert direct_calls == ["forward", ("backward", None)]
    with torch.no_grad():
        assert torch.equal(flash_attention(q, k, v, causal=True, softcap=6.0), direct)
    assert direct_calls[-1] == "forward"
    del direct_calls[:]
    mode = recording_mode()
    with mode:
        traced = flash_attention(q, k, v, causal=True, softcap=6.0)
        g_traced = torch.autograd.grad(traced, (q, k, v), do)
    assert direct_calls == []
    assert "rewriter.flash_attention.default" in mode.ops
    assert "rewriter.flash_attention_backward.default" in mode.ops
    assert not any("zeros" in o or "fill" in o for o in mode.ops), mode.ops
    assert torch.equal(direct, traced)
    for a, b in zip(g_direct, g_traced):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Real sizes on the GPU.
# ------------------------------------------------------------------------------------------

GPU_CASES = [
    (2, 16, 16, 2048, 2048, 64, dict(causal=True)),
    (1, 16, 16, 4096, 4096, 128, dict(causal=True)),
    (1, 16, 16, 4096, 4096, 128, {}),
    (1, 16, 4, 2048, 2048, 128, dict(causal=True, alibi_slopes="alibi")),
    (1, 16, 16, 4096, 4096, 128, dict(causal=True, window=(511, 0))),
    (1, 16, 8, 2048, 2048, 128, dict(causal=True, softcap=50.0)),
    (2, 8, 8, 2000, 2100, 96, dict(causal=True, causal_align="bottom_right",
                                   key_padding_mask="pad")),
    (1, 8, 2, 1024, 1024, 256, dict(causal=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_gpu_real_sizes_bf16(case):
    B, Hq, Hkv, Sq, Skv, D, kw = case
    kw = _materialize(kw, B, Hq, Skv)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.bfloat16)
    out = flash_attention(q, k, v, **kw)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    ref_out, _, (rdq, rdk, rdv) = _reference_with_grads(q, k, v, g, None, **kw)
    qe, ke, ve = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = _eager_lowp(qe, ke, ve, **kw)
    edq, edk, edv = torch.autograd.grad(eager, (qe, ke, ve), g)
    for name, x, e, ref in (("out", out, eager, ref_out), ("dq", dq, edq, rdq),
                            ("dk", dk, edk, rdk), ("dv", dv, edv, rdv)):
        err, eager_err = _rel(x, ref), _rel(e, ref)
        assert err <= 2 * eager_err, f"{name}: {err:.2e} vs eager {eager_err:.2e}"


@pytest.mark.gpu
def test_gpu_fp32_is_tf32_accurate():
    q, k, v = _inputs(1, 8, 8, 1024, 1024, 128)
    out, lse = _op(q, k, v, causal=True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert _rel(out, ref) < 3e-3
    assert _rel(lse, ref_lse) < 3e-3


# ------------------------------------------------------------------------------------------
# The Gluon Hopper forward (flash_attention_sm90): the choice on any machine, the kernel on an
# sm_90 GPU.
# ------------------------------------------------------------------------------------------

from rewriter.kernels import flash_attention as fa_mod  # noqa: E402
from rewriter.kernels import flash_attention_sm90 as sm90  # noqa: E402


def test_sm90_choice_rule():
    choice = fa_mod._sm90_choice
    assert choice("auto", 128, False, 4096, 4096)          # causal / plain, long: Gluon
    assert not choice("auto", 128, True, 4096, 4096)       # a left window edge: Triton
    assert not choice("auto", 64, False, 4096, 4096)       # head dim 64: Triton
    assert not choice("auto", 128, False, 512, 4096)       # few queries: Triton
    assert not choice("auto", 128, False, 4096, 1024)      # few keys: Triton
    assert choice("gluon", 64, True, 16, 16)
    assert not choice("triton", 128, False, 4096, 4096)


def test_sm90_not_used_off_hopper():
    q = torch.randn(1, 2, 64, 128, device=DEVICE, dtype=torch.bfloat16)
    if DEVICE == "cpu" or torch.cuda.get_device_capability() != (9, 0):
        assert not sm90.supported(q, q, q)


_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_sm90 = pytest.mark.skipif(not (_SM90 and sm90.HAVE_GLUON), reason="needs an sm_90 GPU")

SM90_CASES = [
    # B, Hq, Hkv, Sq, Skv, D, causal, align, window, layout, dtype
    (2, 4, 4, 256, 256, 128, True, "top_left", None, "bhsd", torch.bfloat16),
    (2, 4, 4, 256, 256, 128, False, "top_left", None, "bhsd", torch.bfloat16),
    (1, 4, 2, 1000, 1000, 128, True, "top_left", None, "bshd", torch.bfloat16),
    (1, 2, 1, 113, 300, 64, True, "bottom_right", None, "bhsd", torch.float16),
    (1, 2, 2, 300, 113, 128, True, "top_left", None, "bhsd", torch.bfloat16),
    (1, 2, 2, 17, 17, 64, False, "top_left", None, "bshd", torch.bfloat16),
    (1, 2, 2, 1, 777, 128, True, "bottom_right", None, "bhsd", torch.bfloat16),
    (2, 3, 3, 1024, 1024, 128, True, "top_left", (200, 0), "bshd", torch.bfloat16),
    (1, 2, 2, 700, 900, 64, False, "top_left", (100, 50), "bhsd", torch.float16),
    (1, 8, 2, 2048, 2048, 128, True, "top_left", (511, 0), "bhsd", torch.bfloat16),
    (1, 2, 2, 200, 100, 128, True, "bottom_right", None, "bhsd", torch.bfloat16),
    # more query tiles than SMs
    (4, 16, 16, 1024, 1024, 128, True, "top_left", None, "bshd", torch.bfloat16),
    (3, 16, 4, 1000, 1100, 64, True, "bottom_right", None, "bhsd", torch.float16),
    (2, 16, 8, 1500, 1500, 128, True, "top_left", (300, 0), "bhsd", torch.bfloat16),
    # query tiles that see no key at all (Sq > Skv under a two-sided window): an empty range
    (1, 2, 2, 1000, 300, 128, False, "top_left", (100, 50), "bhsd", torch.bfloat16),
]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("case", SM90_CASES, ids=[str(i) for i in range(len(SM90_CASES))])
def test_gpu_sm90_forward_matches_reference(case):
    B, Hq, Hkv, Sq, Skv, D, causal, align, window, layout, dt = case
    g = torch.Generator().manual_seed(0)

    def mk(h, s):
        if layout == "bshd":
            return torch.randn(B, s, h, D, generator=g).to(DEVICE, dt).transpose(1, 2)
        return torch.randn(B, h, s, D, generator=g).to(DEVICE, dt)

    q, k, v = mk(Hq, Sq), mk(Hkv, Skv), mk(Hkv, Skv)
    assert sm90.supported(q, k, v)
    scale = 1 / math.sqrt(D)
    wl, wr = (None, None) if window is None else window
    has_left, has_right, lo, hi = fa_mod._band(Sq, Skv, causal, align, wl, wr)
    out, lse = sm90.attention_forward_sm90(q, k, v, scale, has_left, has_right, lo, hi)
    tri_out, _ = _triton_forward(q, k, v, scale, causal, align, wl, wr)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), scale=scale,
                                           causal=causal, causal_align=align, window=window)
    assert torch.isfinite(out).all()
    assert _rel(out, ref_out) <= 1.5 * _rel(tri_out, ref_out) + 1e-4
    dead = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), dead)
    assert (lse[~dead] - ref_lse[~dead].float()).abs().max().item() < 1e-2
    assert (out[dead.unsqueeze(-1).expand_as(out)] == 0).all()


def _triton_forward(q, k, v, scale, causal, align, wl, wr, alibi=None):
    saved = fa_mod.FORWARD_KERNEL
    fa_mod.FORWARD_KERNEL = "triton"
    try:
        return fa_mod.attention_forward(q, k, v, scale, causal, align, wl, wr, alibi, None, None,
                                        0.0, None)
    finally:
        fa_mod.FORWARD_KERNEL = saved


SM90_ALIBI_CASES = [
    # B, Hq, Hkv, Sq, Skv, D, causal, align, window
    (2, 4, 4, 256, 256, 128, True, "top_left", None),
    (1, 4, 2, 1000, 1100, 128, True, "bottom_right", None),
    (1, 4, 4, 4096, 4096, 128, False, "top_left", None),  # bias up to slope * 4095 both ways
    (1, 2, 2, 300, 300, 64, False, "top_left", (100, 50)),
    (2, 16, 16, 1024, 1024, 128, True, "top_left", (511, 0)),
]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("case", SM90_ALIBI_CASES,
                         ids=[str(i) for i in range(len(SM90_ALIBI_CASES))])
def test_gpu_sm90_alibi_matches_reference(case):
    """The ALiBi bias enters per column (its row term returns in the log-sum-exp): output and
    lse as exact as the Triton forward's, also where the bias reaches thousands."""
    B, Hq, Hkv, Sq, Skv, D, causal, align, window = case
    q, k, v = [t.detach() for t in _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.bfloat16)]
    slopes = _slopes(Hq)
    assert sm90.supported(q, k, v, alibi_slopes=slopes)
    scale = 1 / math.sqrt(D)
    wl, wr = (None, None) if window is None else window
    has_left, has_right, lo, hi = fa_mod._band(Sq, Skv, causal, align, wl, wr)
    out, lse = sm90.attention_forward_sm90(q, k, v, scale, has_left, has_right, lo, hi,
                                           alibi_slopes=slopes)
    tri_out, tri_lse = _triton_forward(q, k, v, scale, causal, align, wl, wr, slopes)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), scale=scale,
                                           causal=causal, causal_align=align, window=window,
                                           alibi_slopes=slopes)
    assert torch.isfinite(out).all()
    assert _rel(out, ref_out) <= 1.5 * _rel(tri_out, ref_out) + 1e-4
    dead = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), dead)
    err = (lse[~dead] - ref_lse[~dead].float()).abs().max().item()
    tri_err = (tri_lse[~dead] - ref_lse[~dead].float()).abs().max().item()
    assert err <= 2 * tri_err + 1e-3


@pytest.mark.gpu
@needs_sm90
def test_gpu_sm90_supported_refuses_what_it_lacks():
    q = torch.randn(1, 2, 256, 128, device=DEVICE, dtype=torch.bfloat16)
    assert sm90.supported(q, q, q)
    assert not sm90.supported(q.float(), q.float(), q.float())
    q80 = torch.randn(1, 2, 256, 80, device=DEVICE, dtype=torch.bfloat16)
    assert not sm90.supported(q80, q80, q80)
    assert sm90.supported(q, q, q, alibi_slopes=torch.ones(2, device=DEVICE))
    assert not sm90.supported(q, q, q, alibi_slopes=torch.ones(3, device=DEVICE))
    assert not sm90.supported(q, q, q, softcap=30.0)
    assert not sm90.supported(q, q, q, dropout_p=0.1)
    assert not sm90.supported(q, q, q, key_padding_mask=torch.zeros(1, 256, device=DEVICE))
    odd = torch.randn(1, 2, 256, 129, device=DEVICE, dtype=torch.bfloat16)[..., :128]
    assert not sm90.supported(odd, q, q)  # a row stride of 129 elements is not 16-byte aligned


@pytest.mark.gpu
@needs_sm90
def test_gpu_sm90_runs_in_training_and_gradients_match(monkeypatch):
    calls = []
    real = sm90.attention_forward_sm90
    monkeypatch.setattr(sm90, "attention_forward_sm90",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dq_calls = []
    real_dq = sm90.attention_backward_dq_sm90
    monkeypatch.setattr(sm90, "attention_backward_dq_sm90",
                        lambda *a, **kw: dq_calls.append(1) or real_dq(*a, **kw))
    q, k, v = _inputs(1, 8, 4, 2048, 2048, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(sm90, "DISABLED", None)
    monkeypatch.setattr(sm90, "DQ_DISABLED", None)
    monkeypatch.setattr(fa_mod, "DQ_KERNEL", "auto")
    out = flash_attention(q, k, v, causal=True)
    assert calls, "the Gluon forward did not run for a causal D=128 S=2048 call"
    assert sm90.DISABLED is None, "the Gluon forward failed and fell back"
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # The library's own choice (auto) takes the Gluon dQ kernel here as well.
    assert dq_calls and sm90.DQ_DISABLED is None, "the Gluon dQ kernel did not run"
    ref_out, _, ref_grads = _reference_with_grads(q, k, v, g, None, causal=True)
    assert _rel(out, ref_out) < 1e-2
    for x, r in zip(grads, ref_grads):
        assert _rel(x, r) < 2e-2


def test_sm90_failure_falls_back_to_triton(monkeypatch):
    """A Gluon launch that raises never reaches the user: the Triton forward answers, a warning
    names the error once, and later calls do not try the Gluon kernel again."""
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("simulated Gluon compile failure")

    monkeypatch.setattr(sm90, "DISABLED", None)
    monkeypatch.setattr(sm90, "attention_forward_sm90", broken)
    # On this machine the real choice is always "no" (no sm_90 GPU); keep its DISABLED check.
    monkeypatch.setattr(fa_mod, "_use_sm90", lambda *a: sm90.DISABLED is None)
    q, k, v = [t.detach() for t in _inputs(1, 2, 2, 40, 40, 32)]
    ref, _ = attention_reference(q.double(), k.double(), v.double(), scale=0.2, causal=True)
    with pytest.warns(RuntimeWarning, match="simulated Gluon compile failure"):
        out, _ = fa_mod.attention_forward(q, k, v, 0.2, True, "top_left", None, None, None, None,
                                          None, 0.0, None)
    assert _rel(out, ref) < FP32_TOL
    assert isinstance(sm90.DISABLED, RuntimeError)
    out2, _ = fa_mod.attention_forward(q, k, v, 0.2, True, "top_left", None, None, None, None,
                                       None, 0.0, None)
    assert len(calls) == 1 and torch.equal(out, out2)


# The Gluon Hopper backward kernels (flash_attention_sm90.attention_backward_dq_sm90 and
# attention_backward_dkdv_sm90).
SM90_BWD_CASES = [
    # B, Hq, Hkv, Sq, Skv, D, causal, align, window, alibi, layout, dtype
    (2, 4, 4, 256, 256, 128, True, "top_left", None, False, "bhsd", torch.bfloat16),
    (1, 4, 2, 1000, 1000, 128, True, "top_left", None, True, "bshd", torch.bfloat16),
    (1, 2, 1, 113, 300, 64, True, "bottom_right", None, False, "bhsd", torch.float16),
    (1, 2, 2, 300, 113, 128, True, "top_left", None, False, "bhsd", torch.bfloat16),
    (1, 2, 2, 17, 17, 64, False, "top_left", None, True, "bshd", torch.bfloat16),
    (1, 2, 2, 1, 777, 128, True, "bottom_right", None, False, "bhsd", torch.bfloat16),
    (2, 3, 3, 1024, 1024, 128, True, "top_left", (200, 0), False, "bshd", torch.bfloat16),
    (1, 2, 2, 700, 900, 64, False, "top_left", (100, 50), True, "bhsd", torch.float16),
    (1, 8, 2, 2048, 2048, 128, True, "top_left", (511, 0), True, "bhsd", torch.bfloat16),
    (1, 4, 4, 2048, 2048, 128, False, "top_left", None, False, "bhsd", torch.bfloat16),
    # key blocks that no query sees (causal top-left with Skv > Sq): an empty range
    (1, 2, 2, 100, 256, 128, True, "top_left", None, True, "bhsd", torch.bfloat16),
    (1, 2, 2, 1100, 2300, 128, True, "top_left", None, True, "bshd", torch.bfloat16),
]


def _grads_with(mode, q, k, v, kw, seed=1, dq="triton"):
    """Forward and backward with the dK/dV kernel ``mode`` and the dQ kernel ``dq``."""
    saved = fa_mod.BACKWARD_KERNEL, fa_mod.DQ_KERNEL
    fa_mod.BACKWARD_KERNEL, fa_mod.DQ_KERNEL = mode, dq
    try:
        out, lse = _op(q, k, v, **kw)
        grads, g, gl = _grads(out, lse, (q, k, v), seed=seed)
    finally:
        fa_mod.BACKWARD_KERNEL, fa_mod.DQ_KERNEL = saved
    return out, lse, grads, g, gl


def _bwd_case_inputs(case):
    B, Hq, Hkv, Sq, Skv, D, causal, align, window, alibi, layout, dt = case
    g = torch.Generator().manual_seed(0)

    def mk(h, s):
        if layout == "bshd":
            t = torch.randn(B, s, h, D, generator=g).to(DEVICE, dt).transpose(1, 2)
        else:
            t = torch.randn(B, h, s, D, generator=g).to(DEVICE, dt)
        return t.requires_grad_()

    kw = dict(causal=causal, causal_align=align, window=window,
              alibi_slopes=_slopes(Hq) if alibi else None)
    return mk(Hq, Sq), mk(Hkv, Skv), mk(Hkv, Skv), kw


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("kind", ["dkdv", "dq"])
@pytest.mark.parametrize("case", SM90_BWD_CASES, ids=[str(i) for i in range(len(SM90_BWD_CASES))])
def test_gpu_sm90_backward_matches_reference(case, kind, monkeypatch):
    """The Gluon backward kernels against float64, next to the Triton kernels' error, with a
    gradient on the log-sum-exp too (it enters through delta). "dkdv": the Gluon dK/dV kernel
    after the Triton dQ kernel. "dq": both Gluon kernels, so dK and dV also check the delta and
    lse2 that the Gluon dQ kernel wrote."""
    q, k, v, kw = _bwd_case_inputs(case)
    calls = []
    launcher = "attention_backward_dq_sm90" if kind == "dq" else "attention_backward_dkdv_sm90"
    real = getattr(sm90, launcher)
    monkeypatch.setattr(sm90, launcher, lambda *a, **k_: calls.append(1) or real(*a, **k_))
    monkeypatch.setattr(sm90, "DQ_DISABLED", None)
    monkeypatch.setattr(sm90, "BACKWARD_DISABLED", None)
    _, _, ours, go, gl = _grads_with("gluon", q, k, v, kw,
                                     dq="gluon" if kind == "dq" else "triton")
    assert calls, f"the Gluon {kind} kernel did not run"
    assert sm90.DQ_DISABLED is None and sm90.BACKWARD_DISABLED is None, "a Gluon kernel fell back"
    _, _, tri, _, _ = _grads_with("triton", q, k, v, kw, dq="triton")
    assert len(calls) == 1
    _, _, ref = _reference_with_grads(q, k, v, go, gl, **kw)
    for name, x, t, r in zip(("dq", "dk", "dv"), ours, tri, ref):
        assert torch.isfinite(x).all(), name
        # dK's bound is the one these cases passed under on the H100 (2x; a tighter one has not
        # been run); dV and dQ get the forward's 1.5x.
        factor = 2.0 if name == "dk" else 1.5
        assert _rel(x, r) <= factor * _rel(t, r) + 1e-4, (name, _rel(x, r), _rel(t, r))


@pytest.mark.gpu
@needs_sm90
def test_gpu_sm90_backward_refuses_what_it_lacks():
    q = torch.randn(1, 2, 256, 128, device=DEVICE, dtype=torch.bfloat16)
    assert sm90.supported_backward(q, q, q, q)
    assert not sm90.supported_backward(q, q, q, q, softcap=30.0)
    assert not sm90.supported_backward(q, q, q, q, dropout_p=0.1)
    odd = torch.randn(1, 2, 256, 129, device=DEVICE, dtype=torch.bfloat16)[..., :128]
    assert not sm90.supported_backward(q, q, q, odd)
    assert not sm90.supported_backward(q, q, q, q.half())


@pytest.mark.parametrize("kind,launcher,flag", [
    ("dkdv", "attention_backward_dkdv_sm90", "BACKWARD_DISABLED"),
    ("dq", "attention_backward_dq_sm90", "DQ_DISABLED")])
def test_sm90_backward_failure_falls_back_to_triton(monkeypatch, kind, launcher, flag):
    """A Gluon dK/dV or dQ launch that raises never reaches the user: the Triton kernel answers,
    one warning names the error, and later backwards do not try that Gluon kernel again."""
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError(f"simulated Gluon {kind} failure")

    monkeypatch.setattr(sm90, flag, None)
    monkeypatch.setattr(sm90, launcher, broken)
    monkeypatch.setattr(fa_mod, "_sm90_backward_plan",
                        lambda *a: tuple(k_ == kind and getattr(sm90, flag) is None
                                         for k_ in ("dq", "dkdv")))
    q, k, v = _inputs(1, 2, 2, 40, 40, 32)
    out, lse = _op(q, k, v, scale=0.2, causal=True)
    with pytest.warns(RuntimeWarning, match=f"simulated Gluon {kind} failure"):
        grads, g, gl = _grads(out, lse, (q, k, v))
    _, _, ref = _reference_with_grads(q, k, v, g, gl, scale=0.2, causal=True)
    for x, r in zip(grads, ref):
        assert _rel(x, r) < FP32_TOL
    assert isinstance(getattr(sm90, flag), RuntimeError)
    out, lse = _op(q, k, v, scale=0.2, causal=True)
    _grads(out, lse, (q, k, v))
    assert len(calls) == 1


def test_sm90_dq_choice_rule():
    choice = fa_mod._sm90_dq_choice
    # (mode, head_dim, has_alibi, has_left, has_right, bf16, sq, skv)
    assert choice("gluon", 64, False, True, False, False, 1, 1)
    assert not choice("triton", 128, True, False, True, True, 4096, 4096)
    assert choice("auto", 128, True, False, True, True, 4096, 4096)     # causal ALiBi: 1.03x
    assert choice("auto", 128, False, False, True, True, 4096, 4096)    # causal: 1.03x
    assert not choice("auto", 128, False, True, True, True, 4096, 4096)  # the window loses
    for untimed in ((64, False, False, True, True, 4096, 4096), (128, False, False, False, True,
                    4096, 4096), (128, False, False, True, False, 4096, 4096),
                    (128, False, False, True, True, 1024, 1024),
                    (128, False, False, True, True, 2048, 4096)):
        assert not choice("auto", *untimed)


def test_sm90_backward_choice_rule():
    choice = fa_mod._sm90_backward_choice
    # (mode, head_dim, has_alibi, has_left, has_right, bf16, sq, skv)
    assert choice("gluon", 64, False, True, False, False, 1, 1)
    assert not choice("triton", 128, True, False, True, True, 4096, 4096)
    assert choice("auto", 128, True, False, True, True, 4096, 4096)      # causal ALiBi: 1.04x
    assert not choice("auto", 128, False, False, True, True, 4096, 4096)  # causal alone: a tie
    assert not choice("auto", 128, True, True, True, True, 4096, 4096)    # windows lose
    for untimed in ((64, True, False, True, True, 4096, 4096), (128, True, False, False, True,
                    4096, 4096), (128, True, False, True, False, 4096, 4096),
                    (128, True, False, True, True, 512, 512),
                    (128, True, False, True, True, 1100, 4096)):
        assert not choice("auto", *untimed)


def test_sm90_backward_plan_checks_support_once(monkeypatch):
    """One support check serves both Gluon backward kernels; a check that raises turns off
    every kernel that was a candidate, and a kernel in mode "triton" is never one."""
    from types import SimpleNamespace
    monkeypatch.setattr(fa_mod, "_INTERPRET", False)
    monkeypatch.setattr(sm90, "DQ_DISABLED", None)
    monkeypatch.setattr(sm90, "BACKWARD_DISABLED", None)
    checks = []
    monkeypatch.setattr(sm90, "supported_backward", lambda *a, **kw: checks.append(1) or True)
    q = SimpleNamespace(is_cuda=True, shape=(1, 16, 4096, 128), dtype=torch.bfloat16)
    meta = {"HAS_LEFT": False, "HAS_RIGHT": True}
    slopes = torch.ones(16)
    plan = lambda alibi=slopes: fa_mod._sm90_backward_plan(q, q, q, q, meta, alibi, None, None,
                                                           0.0)
    monkeypatch.setattr(fa_mod, "DQ_KERNEL", "auto")
    monkeypatch.setattr(fa_mod, "BACKWARD_KERNEL", "auto")
    assert plan() == (True, True) and len(checks) == 1       # causal ALiBi: both rules say yes
    assert plan(None) == (True, False) and len(checks) == 2  # causal alone: the dQ kernel only
    monkeypatch.setattr(fa_mod, "DQ_KERNEL", "triton")
    monkeypatch.setattr(fa_mod, "BACKWARD_KERNEL", "triton")
    assert plan() == (False, False) and len(checks) == 2     # no candidate: no check

    def broken(*a, **kw):
        raise RuntimeError("simulated support-check failure")

    monkeypatch.setattr(sm90, "supported_backward", broken)
    monkeypatch.setattr(fa_mod, "BACKWARD_KERNEL", "gluon")
    with pytest.warns(RuntimeWarning, match="simulated support-check failure"):
        assert plan() == (False, False)
    assert sm90.DQ_DISABLED is None and isinstance(sm90.BACKWARD_DISABLED, RuntimeError)


# ------------------------------------------------------------------------------------------
# The stored-dS backward (bands): the dK/dV kernel stores dS, a light dQ kernel reads it.
# ------------------------------------------------------------------------------------------

DS_CASES = [
    (1, 2, 2, 100, 100, 32, dict(causal=True, window=(20, 0))),
    (1, 4, 1, 64, 64, 32, dict(causal=True, window=(16, 0))),
    (1, 2, 1, 150, 190, 32, dict(window=(60, 50), causal_align="bottom_right")),
    (1, 2, 2, 70, 50, 32, dict(window=(12, 7), causal_align="bottom_right")),
    (2, 4, 2, 30, 47, 32, dict(causal=True, causal_align="bottom_right", window=(9, 0),
                               alibi_slopes="alibi", softcap=4.0, key_padding_mask="pad")),
    (1, 2, 2, 1000, 300, 16, dict(window=(40, 30))),  # key blocks no query sees
    (1, 2, 2, 45, 45, 80, dict(causal=True, window=(10, 0))),  # head dim padded to 128
]


def _count_ds_launches(monkeypatch):
    launches = []
    run = fa_mod._attn_bwd_dq_ds_kernel.run
    monkeypatch.setattr(fa_mod._attn_bwd_dq_ds_kernel, "run",
                        lambda *a, **kw: launches.append(1) or run(*a, **kw))
    return launches


@pytest.mark.parametrize("case", DS_CASES, ids=[_case_id(c) for c in DS_CASES])
def test_stored_ds_backward_matches_reference(case, monkeypatch):
    """Forced on, the stored-dS path runs (its dQ kernel launches once), and its gradients match
    the float64 reference and the recomputing backward (dK, dV bit for bit: same kernel)."""
    B, Hq, Hkv, Sq, Skv, D, kw = case
    kw = _materialize(kw, B, Hq, Skv)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D)
    launches = _count_ds_launches(monkeypatch)
    grads = {}
    for mode in ("on", "off"):
        monkeypatch.setattr(fa_mod, "DS_BACKWARD", mode)
        out, lse = _op(q, k, v, **kw)
        grads[mode], g, gl = _grads(out, lse, (q, k, v), lse_grad=False)
        assert len(launches) == 1, mode
    _, _, ref = _reference_with_grads(q, k, v, g, None, **kw)
    for name, x, y, r in zip(("dq", "dk", "dv"), grads["on"], grads["off"], ref):
        assert _rel(x, r) < FP32_TOL, name
        assert _rel(x, y) < 1e-6, name
    assert torch.equal(grads["on"][1], grads["off"][1])
    assert torch.equal(grads["on"][2], grads["off"][2])


def test_stored_ds_backward_is_chosen_for_bands_only(monkeypatch):
    """"auto" takes the stored-dS path for a band; a one-sided window, a causal mask alone, a
    head dim over 128, or a band whose dS would exceed DS_MAX_Q_RATIO x q keep the recomputing
    dQ kernel; "off" turns it off."""
    launches = _count_ds_launches(monkeypatch)
    monkeypatch.setattr(fa_mod, "DS_BACKWARD", "auto")

    def run(Sq, D, **kw):
        q, k, v = _inputs(1, 2, 2, Sq, Sq, D)
        out = flash_attention(q, k, v, **kw)
        before = len(launches)
        torch.autograd.grad(out.sum(), (q, k, v))
        return len(launches) - before

    assert run(64, 32, causal=True, window=(16, 0)) == 1
    assert run(64, 32, window=(16, 16)) == 1
    assert run(64, 32, window=(16, None)) == 0    # no right edge
    assert run(64, 32, causal=True) == 0          # no left edge
    assert run(40, 160, causal=True, window=(8, 0)) == 0  # head dim 160 (pads to 256)
    monkeypatch.setattr(fa_mod, "DS_MAX_Q_RATIO", 0.5)
    assert run(64, 32, causal=True, window=(16, 0)) == 0  # over the memory budget
    monkeypatch.setattr(fa_mod, "DS_BACKWARD", "on")
    assert run(64, 32, causal=True, window=(16, 0)) == 1  # "on" ignores the budget
    monkeypatch.setattr(fa_mod, "DS_BACKWARD", "off")
    assert run(64, 32, causal=True, window=(16, 0)) == 0


def test_stored_ds_backward_falls_back_when_memory_is_short(monkeypatch):
    """A dS buffer the device cannot allocate sends the backward down the recomputing path, with
    the same gradients, instead of failing the user's step."""
    launches = _count_ds_launches(monkeypatch)
    monkeypatch.setattr(fa_mod, "DS_BACKWARD", "on")
    q, k, v = _inputs(1, 2, 2, 64, 64, 32)
    out = flash_attention(q, k, v, causal=True, window=(16, 0))
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    assert len(launches) == 1

    real_empty = torch.empty

    def empty(*size, **kw):  # refuses only a buffer the size of the stored dS (one flat dim)
        if len(size) == 1 and isinstance(size[0], int) and size[0] >= 4096:
            raise torch.OutOfMemoryError("simulated: no room for dS")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert len(launches) == 1  # the stored-dS dQ kernel did not run again
    for x, y in zip(got, want):
        assert _rel(x, y) < 1e-6


@pytest.mark.parametrize("sq,skv,lo_off,hi_off", [
    (4096, 4096, -511, 0), (100, 100, -20, 0), (70, 50, -32, -13), (1000, 300, -40, 30),
    (300, 1000, 660, 760), (17, 17, -3, 2)])
def test_ds_span_is_the_longest_walked_query_range(sq, skv, lo_off, hi_off):
    """_ds_span against a brute force over key blocks: the rows a key block's visible queries
    occupy, from its first query step, rounded up to whole steps."""
    bm, bn = 32, 64
    want = 0
    for start_n in range(0, skv, bn):
        cols = range(start_n, min(start_n + bn, skv))
        rows = [i for i in range(sq) if any(lo_off <= j - i <= hi_off for j in cols)]
        if rows:
            lo = max(start_n - hi_off, 0) // bm * bm
            assert lo <= rows[0]
            want = max(want, -(-(rows[-1] + 1 - lo) // bm) * bm)
    assert fa_mod._ds_span(sq, skv, lo_off, hi_off, bm, bn) == want


DS_GPU_CASES = [
    (1, 16, 16, 4096, 4096, 128, dict(causal=True, window=(511, 0))),
    (2, 8, 2, 3000, 3000, 128, dict(window=(300, 200))),
    (1, 8, 8, 2000, 2100, 64, dict(causal=True, causal_align="bottom_right", window=(255, 0),
                                   alibi_slopes="alibi", softcap=30.0)),
    (2, 4, 4, 1500, 1500, 96, dict(causal=True, window=(127, 0), key_padding_mask="pad")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DS_GPU_CASES, ids=[_case_id(c) for c in DS_GPU_CASES])
def test_gpu_stored_ds_backward_bf16(case, monkeypatch):
    """Real sizes, bf16, the stored-dS path forced on: within 2x eager's error of the float64
    reference, and its dQ within 2x the recomputing backward's error."""
    B, Hq, Hkv, Sq, Skv, D, kw = case
    kw = _materialize(kw, B, Hq, Skv)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.bfloat16)
    launches = _count_ds_launches(monkeypatch)
    g = None
    grads = {}
    for mode in ("on", "off"):
        monkeypatch.setattr(fa_mod, "DS_BACKWARD", mode)
        out = flash_attention(q, k, v, **kw)
        g = torch.randn_like(out) if g is None else g
        grads[mode] = torch.autograd.grad(out, (q, k, v), g)
    assert len(launches) == 1
    _, _, ref = _reference_with_grads(q, k, v, g, None, **kw)
    qe, ke, ve = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = torch.autograd.grad(_eager_lowp(qe, ke, ve, **kw), (qe, ke, ve), g)
    for name, x, y, e, r in zip(("dq", "dk", "dv"), grads["on"], grads["off"], eager, ref):
        assert _rel(x, r) <= 2 * _rel(e, r), name
        assert _rel(x, r) <= 2 * _rel(y, r), name


# --------------------------------------------------------------------------------------------
# The short launch path (rewriter/kernels/_launch.py) on the real kernels.
# --------------------------------------------------------------------------------------------

from rewriter.kernels import _launch  # noqa: E402

LAUNCH_GPU_VARIANTS = {
    "causal": dict(causal=True),                    # Gluon kernels on sm_90 (TMA descriptors)
    "window": dict(causal=True, window=(255, 0)),    # the stored-dS band backward
    "softcap": dict(causal=True, softcap=30.0),      # the Triton forward, dQ and dK/dV kernels
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(LAUNCH_GPU_VARIANTS))
def test_gpu_short_launch_path_same_result(monkeypatch, variant):
    """Forward and gradients through the short path equal Triton's own launches bit for bit,
    also when only the batch changes (same launch signature, a different grid)."""
    kw = LAUNCH_GPU_VARIANTS[variant]
    for batch in (2, 3):
        g = torch.Generator(device="cuda").manual_seed(batch)
        q, k, v = [torch.randn(batch, 4, 1000, 128, device="cuda", dtype=torch.bfloat16,
                               generator=g).requires_grad_() for _ in range(3)]
        do = torch.randn(batch, 4, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=g)

        def step():
            out = flash_attention(q, k, v, **kw)
            return (out,) + torch.autograd.grad(out, (q, k, v), do)

        monkeypatch.setattr(_launch, "ENABLED", False)
        ref = step()
        monkeypatch.setattr(_launch, "ENABLED", True)
        before = _launch.LAUNCHES
        first, second, again = step(), step(), step()  # the third by the short path
        torch.cuda.synchronize()
        assert _launch.ENABLED and _launch.LAUNCHES > before
        for a, b, c, d in zip(ref, first, second, again):
            assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
        lo = attention_reference(q.detach()[:, :1].double(), k.detach()[:, :1].double(),
                                 v.detach()[:, :1].double(), **kw)[0]
        err = (again[0][:, :1].double() - lo).abs().max().item()
        assert err < 2e-2, err
