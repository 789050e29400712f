"""Values computed from the example inputs see the in-place writes the graph makes to them.

The passes evaluate only what a value depends on; an in-place op (``inv[perm] = ...``, ``x += y``,
``x.add_(y)``) is a user of what it changes, not an input of it, so it must be added on purpose.
Before it was, the router of a mixture-of-experts block (``inv = torch.empty_like(perm)`` then
``inv[perm] = arange``) left ``inv`` uninitialized, the index op after it failed, and the attention
and linear-fusion passes were undone on the whole graph of such models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter.api import capture
from rewriter.context import GraphContext
from rewriter.patterns.graph import mutated_input, with_mutations, ancestors


class Writes(nn.Module):
    def forward(self, x, y):
        a = x * 2
        a += y  # operator.iadd
        b = x.clone()
        b.mul_(3)  # in-place method, result unused
        v = b.view(-1)
        v[0] = 100.0  # through a view of b
        p = torch.argsort(x.flatten())
        inv = torch.empty_like(p)
        inv[p] = torch.arange(p.numel())  # setitem, result unused
        return a + 1, b + 1, inv.float() + 1


def _graph(model, *args):
    (gm, ex), = capture(model, args, {}, [])
    return gm, GraphContext(gm, ex, None, None)


def test_evaluate_sees_in_place_writes():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    gm, ctx = _graph(Writes(), x, y)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    a1, b1, inv1 = out
    got = ctx.evaluate([a1, b1, inv1])
    want = Writes()(x, y)
    for node, w in zip((a1, b1, inv1), want):
        assert torch.equal(got[node], w), node


def test_mutated_input_and_closure():
    gm, _ = _graph(Writes(), torch.randn(3, 4), torch.randn(3, 4))
    muts = {n.name: mutated_input(n) for n in gm.graph.nodes if mutated_input(n) is not None}
    # iadd, mul_, the setitem through the view, the setitem of inv
    assert len(muts) == 4, muts
    nodes = list(gm.graph.nodes)
    out = nodes[-1].args[0]
    for target in out:
        plain = ancestors([target])
        closed = with_mutations(nodes, plain)
        assert plain <= closed
    # b + 1 needs mul_ and the write through its view; inv + 1 needs the setitem; a + 1 needs iadd
    # only through its data edge (x += y returns the new a), and none of the others.
    b_plus = out[1]
    extra = {n.name for n in with_mutations(nodes, ancestors([b_plus])) - ancestors([b_plus])}
    assert any("mul_" in n for n in extra) and any("setitem" in n for n in extra), extra
    a_plus = out[0]
    assert not any(mutated_input(n) is not None and n not in ancestors([a_plus])
                   for n in with_mutations(nodes, ancestors([a_plus])))


class Attention(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.h)
        att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d))


class RoutedExperts(nn.Module):
    """Top-2 routing over 4 experts, tokens sorted by expert and put back through an inverse
    permutation written in place (as transformers' mixture-of-experts blocks do)."""

    def __init__(self, d=32, e=4):
        super().__init__()
        self.router = nn.Linear(d, e, bias=False)
        self.w = nn.Parameter(torch.randn(e, d, d) / math.sqrt(d))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        top_w, top_i = torch.topk(F.softmax(self.router(t), -1), 2, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        ids = top_i.reshape(-1)
        order_ids, perm = torch.sort(ids)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        tok = t.repeat_interleave(2, dim=0)[perm]
        y = torch.bmm(tok.unsqueeze(1), self.w[order_ids]).squeeze(1) * top_w.reshape(-1)[perm, None]
        return y[inv].reshape(t.shape[0], 2, -1).sum(1).reshape(x.shape)


class MoEBlocks(nn.Module):
    """Two layers: the second attention's inputs come through the first layer's experts."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleList([Attention(), Attention()])
        self.moe = nn.ModuleList([RoutedExperts(), RoutedExperts()])

    def forward(self, x):
        for attn, moe in zip(self.attn, self.moe):
            x = x + attn(x)
            x = x + moe(x)
        return x


def test_attention_found_in_a_graph_with_a_routed_expert_block():
    torch.manual_seed(1)
    model = MoEBlocks().eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        want = model(x)
        fast = rewriter.optimize(model, (x,), config=rewriter.Config(inductor=False))
        got = fast(x)
    errors = [p for p in fast.report.passes if p.status == "error"]
    assert not errors, [(p.name, p.message) for p in errors]
    attn = [s for s in fast.report.sites if s.kind == "attention"]
    assert len(attn) == 2 and all(s.rewritten for s in attn), [(s.where, s.reason) for s in attn]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class CountsCalls(nn.Module):
    """A frozen parameter the forward increments in place (and reads back)."""

    def __init__(self):
        super().__init__()
        self.calls = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x):
        self.calls.add_(1)
        return x * self.calls


def test_evaluation_leaves_parameters_written_in_place_alone():
    model = CountsCalls()
    x = torch.randn(4)
    gm, ctx = _graph(model, x)
    before = model.calls.item()
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (tuple, list)) else out
    got = ctx.evaluate([node])[node]
    assert model.calls.item() == before  # the replay wrote into a copy
    torch.testing.assert_close(got, x * (before + 1))


def test_run_graph_leaves_the_inputs_of_a_graph_that_writes_them():
    from torch.fx import symbolic_trace
    from rewriter.validate import run_graph

    def f(q, k):
        q.mul_(0.5)  # an in-place write into an input
        return (q @ k.T).softmax(-1)

    gm = symbolic_trace(f)
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    keep = q.clone()
    first = run_graph(gm, [q, k])
    assert torch.equal(q, keep)
    assert torch.equal(run_graph(gm, [q, k]), first)  # a second run sees the same inputs


class SlicedKeys(nn.Module):
    """Keys assembled in place from two parts (DeepSeek-V3's latent attention builds its keys so:
    an empty tensor, then ``copy_`` into two slices of it), then causal attention."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q = nn.Linear(d, d)
        self.k_nope = nn.Linear(d, d // 2)
        self.k_rot = nn.Linear(d, d // 2)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        heads = lambda t: t.view(b, s, self.h, -1).transpose(1, 2)
        q, v = heads(self.q(x)), heads(self.v(x))
        nope, rot = heads(self.k_nope(x)), heads(self.k_rot(x))
        k = nope.new_empty(b, self.h, s, d // self.h)
        k[..., : d // self.h // 2].copy_(nope)
        k[..., d // self.h // 2:].copy_(rot)
        att = (q @ k.transpose(-1, -2)) * (d // self.h) ** -0.5
        att = att.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)


def test_attention_on_keys_written_in_place_is_validated_as_it_reads_them():
    # The site's key input is the empty tensor; its value at the site (after the two copies) is
    # what the rewrite reads, and the validation's random trial replaces it whole (the copies into
    # a site input are not replayed inside the checked subgraph).
    torch.manual_seed(2)
    model, x = SlicedKeys().eval(), torch.randn(2, 10, 32)
    with torch.no_grad():
        want = model(x)
        fast = rewriter.optimize(model, (x,), config=rewriter.Config(inductor=False))
        got = fast(x)
    (site,) = [s for s in fast.report.sites if s.kind == "attention"]
    assert site.rewritten, site.reason
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class Masks(nn.Module):
    def forward(self, a, b):
        return ((a > 0) & (b > 0)) | (a < b)


def test_operator_functions_with_a_trailing_underscore_are_not_in_place():
    gm, _ = _graph(Masks(), torch.randn(4), torch.randn(4))
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ in ("and_", "or_")]
    assert len(ops) == 2 and not [n for n in gm.graph.nodes if mutated_input(n) is not None]


def test_evaluate_until_a_later_use_sees_the_writes_made_before_it():
    torch.manual_seed(3)
    model, x = SlicedKeys().eval(), torch.randn(1, 6, 32)
    gm, ctx = _graph(model, x)
    (empty,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "new_empty"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    heads = lambda t: t.view(1, 6, 4, -1).transpose(1, 2)
    with torch.no_grad():
        want = torch.cat([heads(model.k_nope(x)), heads(model.k_rot(x))], -1)
    got = ctx.evaluate([empty], until=[out])[empty]
    torch.testing.assert_close(got, want)
