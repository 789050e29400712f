"""The linear matcher: every spelling of a product with a weight, siblings grouped, activations left out."""

from __future__ import annotations

import torch
from torch import nn

import models as M
from rewriter.api import capture
from rewriter.context import GraphContext
from rewriter.patterns.linear import find_linears, sibling_groups


def linears(model, *args):
    (gm, ex), = capture(model, args, {}, [])
    ctx = GraphContext(gm, ex, None, None)
    return find_linears(gm.graph, ctx.kinds)


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.w_kn = nn.Parameter(torch.randn(6, 5))  # stored (in, out): x @ w
        self.w_nk = nn.Parameter(torch.randn(4, 5))  # stored (out, in): x @ w.T
        self.b = nn.Parameter(torch.randn(4))
        self.b5 = nn.Parameter(torch.randn(5))

    def forward(self, x):
        y = self.lin(x)
        y2 = torch.addmm(self.b5, y.view(-1, 6), self.w_kn)  # GPT-2 Conv1D
        y3 = y2 @ self.w_nk.t() + self.b
        return y3, torch.softmax(y @ y.transpose(-1, -2), -1)  # activation x activation: not a linear


def test_every_spelling_found_with_shape_and_owner():
    sites = linears(Spellings(), torch.randn(2, 3, 8))
    by_name = {s.weight_name: s for s in sites}
    assert set(by_name) == {"lin.weight", "w_kn", "w_nk"}
    lin = by_name["lin.weight"]
    assert lin.where == "lin" and (lin.rows, lin.in_features, lin.out_features) == (6, 8, 6)
    assert lin.bias is not None and not lin.weight_transposed
    assert by_name["w_kn"].weight_transposed and by_name["w_kn"].shape == (6, 6, 5)
    assert not by_name["w_nk"].weight_transposed and by_name["w_nk"].shape == (6, 5, 4)


def test_qkv_siblings_grouped():
    sites = linears(M.Einsum(), torch.randn(2, 5, 32))
    groups = sibling_groups(sites)
    assert len(groups) == 1
    assert sorted(s.where for s in groups[0]) == ["k", "q", "v"]
    assert all(s.rows == 10 for s in groups[0])
