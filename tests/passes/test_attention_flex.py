"""The attention pass with FlexAttention as a target: masks and biases that depend on no input
(document ids in a buffer, a prefix-LM rule from arange, a static relative-position table) become
compile-time tables; the rewrite matches eager; input- or parameter-dependent ones are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import models as M
import rewriter.passes.attention as attention_pass
from utils import check_fp32, optimize, rel

X = lambda b=2, s=24, c=32: torch.randn(b, s, c)


class Documents(M._QKV):
    """Packed sequences: tokens attend within their own document (ids from a buffer), causally."""

    def __init__(self, seq=24, docs=3, cap=None):
        super().__init__()
        self.register_buffer("doc", torch.arange(seq) * docs // seq)
        self.cap = cap

    def forward(self, x):
        q, k, v = self.split(x)
        S = x.shape[1]
        same = self.doc[:S, None] == self.doc[None, :S]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5
        if self.cap:
            s = self.cap * torch.tanh(s / self.cap)
        s = s.masked_fill(~(same & causal), float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class PrefixLM(M._QKV):
    """The first 6 positions see each other; the rest attend causally (a rule on arange)."""

    def forward(self, x):
        q, k, v = self.split(x)
        i = torch.arange(x.shape[1])
        keep = (i[None, :] <= i[:, None]) | (i[None, :] < 6)
        s = torch.where(keep, q @ k.transpose(-2, -1) / self.hd ** 0.5, float("-inf"))
        return self.merge(torch.softmax(s, -1) @ v)


class StaticRelBias(M._QKV):
    """A per-head relative-position bias looked up in a buffer (not a parameter)."""

    def __init__(self, seq=24):
        super().__init__()
        self.register_buffer("table", torch.randn(self.heads, 2 * seq - 1))

    def forward(self, x):
        q, k, v = self.split(x)
        S = x.shape[1]
        i = torch.arange(S)
        idx = i[None, :] - i[:, None] + S - 1
        bias = self.table[:, idx]  # (H, S, S)
        s = q @ k.transpose(-2, -1) * self.hd ** -0.5 + bias
        return self.merge(s.softmax(-1) @ v)


def test_document_mask_forced_to_flex():
    _, sites = check_fp32(Documents(), (X(),), attention_backend="flex")
    assert sites[0].target == "flex" and "mask (static)" in sites[0].detail


def test_document_mask_with_softcap_forced_to_flex():
    _, sites = check_fp32(Documents(cap=4.0), (X(),), attention_backend="flex")
    assert sites[0].target == "flex" and "softcap 4" in sites[0].detail


def test_prefix_lm_forced_to_flex():
    _, sites = check_fp32(PrefixLM(), (X(),), attention_backend="flex")
    assert sites[0].target == "flex"


def test_static_per_head_bias_forced_to_flex():
    _, sites = check_fp32(StaticRelBias(), (X(),), attention_backend="flex")
    assert sites[0].target == "flex" and "bias (static)" in sites[0].detail


def test_gradients_through_flex_match_eager():
    model = Documents().train()
    opt = optimize(model, (X(),), attention_backend="flex")
    assert opt.report.rewritten("attention")[0].target == "flex"
    x1 = X().requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    opt(x1).square().sum().backward()
    model(x2).square().sum().backward()
    assert rel(x1.grad, x2.grad) <= 1e-5


def test_parameter_bias_is_refused_with_a_reason():
    opt = optimize(M.RelPosBias().eval(), (X(),), attention_backend="flex")
    (site,) = [s for s in opt.report.sites if s.pass_name == "attention"]
    assert not site.rewritten and "depends on the inputs or on parameters" in site.reason


def test_cost_model_prefers_flex_for_sparse_document_masks(monkeypatch):
    """On a (simulated) H100, eight documents over 256 tokens leave 1/8 of the blocks: Flex, which
    skips the rest, beats SDPA with the mask; a plain causal site stays with SDPA."""
    monkeypatch.setattr(attention_pass, "_on_cuda", lambda m: True)
    model = Documents(seq=256, docs=8).eval()
    x = X(1, 256)
    opt = optimize(model, (x,), device="H100")
    (site,) = opt.report.rewritten("attention")
    assert site.target == "flex", site.detail
    with torch.no_grad():
        assert rel(opt(x), model(x)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("cap", [None, 30.0])
def test_gpu_document_mask_site_runs_flex_and_matches_eager(cap):
    """On the GPU the cost model picks Flex for a sparse document mask by itself; bf16 output and
    gradients within twice eager bf16's own error against float64."""
    torch.manual_seed(5)
    model = Documents(seq=2048, docs=8, cap=cap)
    model.q, model.k, model.v, model.o = (torch.nn.Linear(512, 512) for _ in range(4))
    model.dim, model.heads, model.kv_heads, model.hd = 512, 8, 8, 64
    model = model.cuda()
    x = torch.randn(2, 2048, 512, device="cuda")
    low = copy.deepcopy(model).to(torch.bfloat16)
    opt = optimize(low, (x.to(torch.bfloat16),))
    (site,) = opt.report.rewritten("attention")
    assert site.target == "flex", site.detail
    ref = copy.deepcopy(model).double()
    xs = [x.to(torch.bfloat16).requires_grad_() for _ in range(2)]
    x64 = x.double().requires_grad_()
    outs = [fn(t) for fn, t in ((opt, xs[0]), (low, xs[1]), (ref, x64))]
    g = torch.randn_like(outs[2])
    for o, t in zip(outs, (*xs, x64)):
        o.backward(g.to(o.dtype))
    err = lambda a, b: float((a.double() - b).norm() / b.norm())
    assert err(outs[0], outs[2]) <= 2 * err(outs[1], outs[2]) + 1e-3
    assert err(xs[0].grad, x64.grad) <= 2 * err(xs[1].grad, x64.grad) + 1e-3
