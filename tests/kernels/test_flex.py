"""The FlexAttention op over compile-time tables: forward and gradients equal a materialized-table
reference and a float64 computation; GQA, per-head tables, soft-cap; bad tables are refused."""

from __future__ import annotations

import pytest
import torch

from rewriter.kernels.flex import flex_attention_static, flex_reference, register
from utils import count_calls, recording_mode


def fp64(q, k, v, keep, bias, scale, cap=None):
    r = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if bias is not None:
        s = s + bias.double()
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def doc_keep(s, docs=3):
    d = torch.arange(s) * docs // s
    return d[:, None] == d[None, :]


@pytest.mark.parametrize("hq, hkv, s, per_head_bias, cap", [
    (2, 2, 32, False, None), (4, 2, 40, True, None), (2, 1, 17, False, 5.0), (4, 4, 64, True, 3.0)])
def test_forward_and_gradients_match_float64(hq, hkv, s, per_head_bias, cap):
    torch.manual_seed(0)
    keep = doc_keep(s) & (torch.arange(s)[None, :] <= torch.arange(s)[:, None])
    bias = torch.randn(hq, s, s) if per_head_bias else torch.randn(s, s)
    key = register(keep, bias, 0.25, cap)
    q = torch.randn(2, hq, s, 16, requires_grad=True)
    k = torch.randn(2, hkv, s, 16, requires_grad=True)
    v = torch.randn(2, hkv, s, 16, requires_grad=True)
    out = flex_attention_static(q, k, v, key=key)
    want = fp64(q, k, v, keep, bias, 0.25, cap)
    assert (out.double() - want).norm() / want.norm() < 1e-5
    assert (flex_reference(q, k, v, key).double() - want).norm() / want.norm() < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g.double())
    for a, b in zip(got, ref):
        assert (a.double() - b).norm() / b.norm() < 1e-5


def test_compiles_without_graph_break():
    key = register(doc_keep(16), None, 0.5)
    q = torch.randn(1, 2, 16, 8)
    fn = torch.compile(lambda q: flex_attention_static(q, q, q, key=key), backend="aot_eager", fullgraph=True)
    assert torch.allclose(fn(q), flex_reference(q, q, q, key), atol=1e-5)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="bool"):
        register(torch.ones(4, 4), None, 1.0)
    empty = torch.ones(4, 4, dtype=torch.bool)
    empty[2] = False
    with pytest.raises(ValueError, match="at least one key"):
        register(empty, None, 1.0)


@pytest.mark.parametrize("per_head, cap", [(False, None), (True, 4.0)])
def test_derived_mods_and_block_mask_equal_the_tables(per_head, cap):
    """The score_mod / mask_mod / BlockMask that the GPU path hands to flex_attention compute the
    tables' function (checked with flex_attention's CPU forward)."""
    from torch.nn.attention.flex_attention import flex_attention

    from rewriter.kernels.flex import _block_mask, _mods, tables

    torch.manual_seed(1)
    s = 48
    keep = doc_keep(s, 4) | (torch.arange(s)[None, :] < 5)  # documents plus a shared prefix
    bias = torch.randn(2, s, s) if per_head else torch.randn(s, s)
    key = register(keep, bias, 0.3, cap)
    q, k, v = (torch.randn(1, 2, s, 16) for _ in range(3))
    _, score_mod, _ = _mods(tables(key), q.device)
    with torch.no_grad():
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=_block_mask(tables(key), q, k), scale=0.3)
    want = fp64(q, k, v, keep, bias, 0.3, cap)
    assert (out.double() - want).norm() / want.norm() < 1e-5


def _counting_run(monkeypatch):
    import rewriter.kernels.flex as flex

    return count_calls(monkeypatch, flex, "_run")


def test_eager_backward_does_not_recompute_the_forward(monkeypatch):
    calls = _counting_run(monkeypatch)
    torch.manual_seed(6)
    s = 24
    keep = doc_keep(s) & (torch.arange(s)[None, :] <= torch.arange(s)[:, None])
    key = register(keep, None, 0.25)
    q, k, v = (torch.randn(1, 2, s, 16, requires_grad=True) for _ in range(3))
    out = flex_attention_static(q, k, v, key=key)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert len(calls) == 1  # one forward, its graph reused by the backward
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = fp64(q64, k64, v64, keep, None, 0.25)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q64, k64, v64))):
        assert (g.double() - w).norm() / w.norm() < 1e-5
    # No gradient needed: no graph kept.
    with torch.no_grad():
        assert flex_attention_static(q, k, v, key=key).grad_fn is None


def test_eager_calls_skip_the_dispatcher_and_traced_calls_keep_the_op(monkeypatch):
    """An eager call on plain tensors runs the op's implementation without the dispatcher; under
    a dispatch mode (as under tracing) the op runs; forward and gradients are the same."""
    import rewriter.kernels.flex as flex_mod

    direct = []
    real = flex_mod._direct
    monkeypatch.setattr(flex_mod, "_direct", lambda *a: direct.append(1) or real(*a))

    torch.manual_seed(8)
    s = 20
    keep = doc_keep(s, 2) & (torch.arange(s)[None, :] <= torch.arange(s)[:, None])
    key = register(keep, torch.randn(s, s), 0.3, 4.0)
    q, k, v = (torch.randn(1, 2, s, 8, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, s, 8)
    eager = flex_attention_static(q, k, v, key=key)
    g_eager = torch.autograd.grad(eager, (q, k, v), do)
    with torch.no_grad():
        assert torch.equal(flex_attention_static(q, k, v, key=key), eager)
    assert len(direct) == 2
    mode = recording_mode()
    with mode:
        traced = flex_attention_static(q, k, v, key=key)
        g_traced = torch.autograd.grad(traced, (q, k, v), do)
        with torch.no_grad():
            traced_no_grad = flex_attention_static(q, k, v, key=key)
    assert len(direct) == 2
    # (With gradients the op's autograd kernel keeps Flex's own graph, so only the no-grad call
    # reaches the op below autograd, where the mode sees it.)
    assert "rewriter.flex_attention_static.default" in mode.ops
    assert torch.equal(eager, traced) and torch.equal(eager, traced_no_grad)
    for a, b in zip(g_eager, g_traced):
        assert torch.equal(a, b)


def test_traced_forward_and_backward_match_eager():
    # Under torch.compile (aot_eager traces forward and backward through the fake kernel and the
    # recomputing backward) the gradients equal the eager ones.
    torch.manual_seed(7)
    s = 20
    keep = doc_keep(s, 2) & (torch.arange(s)[None, :] <= torch.arange(s)[:, None])
    key = register(keep, torch.randn(s, s), 0.3, 4.0)
    q, k, v = (torch.randn(2, 2, s, 8, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return flex_attention_static(q, k, v, key=key).square().sum()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_export_keeps_the_op():
    s = 16
    key = register(doc_keep(s), None, 0.25)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return flex_attention_static(q, k, v, key=key)

    q, k, v = (torch.randn(1, 2, s, 8) for _ in range(3))
    ep = torch.export.export(M(), (q, k, v))
    assert torch.ops.rewriter.flex_attention_static.default in [n.target for n in ep.graph.nodes]
    assert torch.equal(ep.module()(q, k, v), M()(q, k, v))


# --------------------------------------------------------------------------------------------------
# GPU: the compiled FlexAttention path at real sizes
# --------------------------------------------------------------------------------------------------


def _documents(s, docs, device):
    doc = torch.arange(s, device=device) * docs // s
    return (doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool, device=device).tril()


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_flex_matches_reference_forward_and_backward(with_bias):
    torch.manual_seed(3)
    s, h, d = 1024, 8, 64
    keep = _documents(s, 4, "cpu")
    bias = torch.randn(h, s, s) * 0.5 if with_bias else None
    key = register(keep, bias, scale=d ** -0.5, softcap=20.0 if with_bias else None)
    q, k, v = (torch.randn(2, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, h, s, d, device="cuda", dtype=torch.bfloat16)
    out = flex_attention_static(q, k, v, key=key)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = flex_reference(q64, k64, v64, key)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        err = float((a.double() - b).norm() / b.norm())
        assert err < 2e-2, err


@pytest.mark.gpu
def test_gpu_flex_shapes_do_not_exhaust_the_compile_cache():
    # One site called at many sequence lengths: each shape builds its own block mask, and the
    # site's own compiled wrapper must keep producing the right answer (no silent eager fallback).
    torch.manual_seed(4)
    keep = _documents(512, 3, "cpu")
    key = register(keep, None, scale=0.125)
    for s in (512, 512, 256, 384, 128, 512):
        sub = register(keep[:s, :s].clone(), None, scale=0.125) if s != 512 else key
        q, k, v = (torch.randn(1, 4, s, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = flex_attention_static(q, k, v, key=sub)
        ref = flex_reference(q.double(), k.double(), v.double(), sub)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_retry_only_on_shared_memory_failures_and_only_while_options_remain():
    from rewriter.kernels.flex import _SMALLER_KERNEL_OPTIONS, _retry_level, tables

    t = tables(register(doc_keep(8), None, 0.25))
    cuda = torch.device("cuda")
    oom = RuntimeError("No valid triton configs. OutOfMemoryError: out of resource: triton_tem_fused_flex_attention_0")
    assert not _retry_level(t, cuda, ValueError("something else")) and t._level == 0
    assert not _retry_level(t, torch.device("cpu"), oom) and t._level == 0
    for level in range(1, len(_SMALLER_KERNEL_OPTIONS) + 1):
        assert _retry_level(t, cuda, oom) and t._level == level
    assert not _retry_level(t, cuda, oom) and t._level == len(_SMALLER_KERNEL_OPTIONS)
