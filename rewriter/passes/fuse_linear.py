"""Sibling linears (Q/K/V, gate/up) get one concatenated weight, so that one GEMM can serve them all.

What it does: for each group of ``nn.Linear`` modules that read the same input tensor in the
captured graph, the weights (and biases) are concatenated ONCE into a new parameter held by a
:class:`FusedLinearWeights`, and each linear is replaced by a :class:`LinearSlice` whose weight is
a row slice (a view) of it. The model then computes exactly what it did, with the same kernels;
the graph pass ``fuse_linear_graph`` turns the slices, wherever a graph reads them side by side,
into one GEMM whose output is split into views. Concatenating inside the graph instead would redo
the copy on every call.

A group is fused when its linears are plain ``nn.Linear`` modules (exactly: a subclass may compute
something else) called through their own ``forward``, without hooks (a swapped module would lose
them), inside ``Config.modules``, with weights that no other module shares (a tied weight would
drift apart from its copy), and with the same dtype, device, bias presence and ``requires_grad``;
siblings that differ form their own groups. It is fused only where the cost model predicts a gain
for the example inputs (:func:`rewriter.cost.sibling_linear_estimate`: a measured table decides
where one exists for the device; otherwise one GEMM never costs more than its parts).

The graph pass decides again for each captured shape, and leaves a group as slices where the
outputs' new layout could matter (an output modified in place, returned, or viewed in a way the
strides do not allow); the report says why. Slices cost nothing: each is a contiguous block of
rows, so the model then runs the GEMMs it ran before.

State: ``state_dict()`` keeps the model's own keys and values: each :class:`LinearSlice` writes its
rows under its usual ``weight`` / ``bias`` keys, and the fused parameter itself is not written. So
a checkpoint of the optimized model loads into the original model, and ``load_state_dict`` of a
checkpoint of the original (or of another optimized copy) copies each entry into its rows, also
with ``assign=True`` (rows of one parameter cannot be assigned separately).

Training: a model optimized in training mode is not fused (its sites are reported skipped): the
fused weight is a new ``Parameter``, which an optimizer built on the model's own ``parameters()``
would silently not update. A model optimized in eval mode and trained afterwards gets its
gradients on the fused parameter: build the optimizer on the optimized model's ``parameters()``,
which list the fused parameters in place of the siblings' own. The original
model keeps its separate weights, so both exist in memory until it is dropped
(``Config(inplace=True)`` swaps the modules of the model itself and leaves one copy).

Example::

    fast = rewriter.optimize(model, (ids,))
    for s in fast.report.rewritten("fuse_linear"):
        print(s.where, s.detail)  # layers.0.self_attn  q_proj, k_proj, v_proj: M 16, K 4096, N 4096+1024+1024 -> ...
    opt = torch.optim.AdamW(fast.parameters())
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ..context import GraphContext
from ..cost import linear_table, sibling_linear_estimate
from ..patterns.graph import module_path
from ..patterns.linear import LinearSite, find_linears, sibling_groups
from ..patterns.ops import op
from .base import ModuleContext, ModulePass

__all__ = ["FuseLinear", "FusedLinearWeights", "LinearSlice"]

# Hooks a module swap would drop.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")


class FusedLinearWeights(nn.Module):
    """The concatenated weight ``(sum(out), in)`` and bias of a group of sibling linears.

    It is a child of every :class:`LinearSlice` that reads it (so ``.to()``, ``.parameters()``
    and the optimized model's optimizer see it) and writes nothing to ``state_dict()``: the slices
    write their rows under the original names.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, names: tuple[str, ...]):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.names = names

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}, in={self.weight.shape[1]}, bias={self.bias is not None}, " \
               f"siblings={', '.join(self.names)}"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass  # the slices write these rows under the original names

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix))


class LinearSlice(nn.Module):
    """``F.linear(x, weight, bias)`` with ``weight`` and ``bias`` rows ``start:start+out_features``
    of a :class:`FusedLinearWeights`: an ``nn.Linear`` whose parameters live in a shared tensor.

    ``weight`` and ``bias`` are views, read-only as attributes; ``state_dict()`` and
    ``load_state_dict()`` use the keys ``weight`` and ``bias`` as ``nn.Linear`` does.
    """

    def __init__(self, fused: FusedLinearWeights, start: int, out_features: int):
        super().__init__()
        self.fused = fused
        self.start = start
        self.in_features = fused.weight.shape[1]
        self.out_features = out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight.narrow(0, self.start, self.out_features)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b.narrow(0, self.start, self.out_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.fused.bias is not None}, rows={self.start}:{self.start + self.out_features}"

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in (("weight", self.weight), ("bias", self.bias)) if t is not None}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, t in self._tensors().items():
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        own = self._tensors()
        for name, rows in own.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or value.shape != rows.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                                  f"the shape in current model is {tuple(rows.shape)}.")
                continue
            with torch.no_grad():
                rows.copy_(value)
        for key in state_dict:
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest is not None and "." not in rest and rest not in own:
                unexpected_keys.append(key)


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _relative(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent else path


class FuseLinear(ModulePass):
    """Sibling ``nn.Linear`` modules reading one input -> slices of one concatenated weight."""

    name = "fuse_linear"
    kind = "linear"
    description = "sibling nn.Linear layers on one input (Q/K/V, gate/up) -> one concatenated weight, once"

    def run(self, ctx: ModuleContext) -> None:
        if ctx.model.training:
            # The fused weights are new Parameter objects. An optimizer built on the model's own
            # parameters (the usual way: before or without looking at the optimized model) would
            # silently stop updating them, so training models keep their own weights.
            for g in ctx.graphs:
                for group in sibling_groups(find_linears(g.graph, g.kinds)):
                    paths = sorted({s.where for s in group})
                    self.skip(ctx, _common_path(paths) or "<model>",
                              "training mode: fused weights would be new parameters, which an optimizer "
                              "built on the model's own parameters would not update; optimize the model "
                              "in eval mode to fuse", detail=", ".join(paths))
            return
        owners = Counter(id(p) for _, p in ctx.model.named_parameters(remove_duplicate=False))
        taken: set[str] = set()  # module paths already handled (a module seen in several groups)
        table = linear_table(ctx.device_spec)
        for g in ctx.graphs:
            for group in sibling_groups(find_linears(g.graph, g.kinds)):
                self._group(ctx, g, group, owners, taken, table)

    def _group(self, ctx: ModuleContext, g: GraphContext, group: list[LinearSite], owners: Counter,
               taken: set[str], table) -> None:
        by_path: dict[str, LinearSite] = {}
        for s in group:
            by_path.setdefault(s.where, s)  # a module called twice on the same input counts once
        sites = list(by_path.values())
        if all(s.where in taken for s in sites):
            return  # the same group again (its modules called in another graph too): decided already
        parent = _common_path([s.where for s in sites])
        name = lambda s: _relative(s.where, parent)
        where = parent or "<model>"
        reasons: dict[str, str] = {}
        buckets: dict[tuple, list[LinearSite]] = {}
        for s in sites:
            why = _why_not(ctx, g, s, owners, taken)
            if why:
                reasons[name(s)] = why
                continue
            m = ctx.module(s.where)
            key = (m.weight.dtype, m.weight.device, m.weight.requires_grad,
                   None if m.bias is None else (m.bias.dtype, m.bias.requires_grad))
            buckets.setdefault(key, []).append(s)
        fusable = []
        for members in buckets.values():
            members = self._aligned(ctx, members, name, reasons)
            if len(members) > 1:
                fusable.append(members)
            else:
                reasons[name(members[0])] = "no sibling with the same dtype, device, bias and requires_grad"
        left = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        listing = ", ".join(name(s) for s in sites)
        if not fusable:
            self.skip(ctx, where, left, detail=listing)
            return
        for members in fusable:
            self._fuse(ctx, where, members, name, left, taken, table)

    @staticmethod
    def _aligned(ctx: ModuleContext, members: list[LinearSite], name, reasons: dict[str, str]) -> list[LinearSite]:
        """``members``, less those whose output width would leave the fused output's rows off
        16-byte boundaries (cuBLAS's fastest GEMM kernels want 16-byte aligned rows), when at least
        two others keep them aligned: an FFN's gate/up of 5632 each stay fused and a one-column gate
        beside them (N = 1) runs alone, instead of all three at N = 11265."""
        if len(members) < 3:
            return members
        mods = [ctx.module(s.where) for s in members]
        per = max(1, 16 // mods[0].weight.element_size())
        if sum(m.out_features for m in mods) % per == 0:
            return members
        keep = [s for s, m in zip(members, mods) if m.out_features % per == 0]
        if len(keep) < 2:
            return members
        for s, m in zip(members, mods):
            if m.out_features % per:
                reasons[name(s)] = (f"N {m.out_features} would leave the fused output's rows off 16-byte "
                                    f"boundaries (N a multiple of {per}), which slows the GEMM; the others are fused")
        return keep

    def _fuse(self, ctx: ModuleContext, where: str, members: list[LinearSite], name, left: str,
              taken: set[str], table) -> None:
        modules = [ctx.module(s.where) for s in members]
        ns = [m.out_features for m in modules]
        k, rows, dtype = modules[0].in_features, members[0].rows, modules[0].weight.dtype
        has_bias = modules[0].bias is not None
        est, source = sibling_linear_estimate(ctx.device_spec, table, rows, k, ns, dtype, has_bias)
        shape = f"{', '.join(name(s) for s in members)}: M {rows}, K {k}, N {'+'.join(map(str, ns))}"
        if est.speedup is not None and est.speedup <= 1.0:
            self.skip(ctx, where, f"the cost model predicts no gain: one GEMM {est.seconds_after * 1e3:.4g} ms "
                                   f"against {est.seconds_before * 1e3:.4g} ms for the parts ({source})",
                      detail=shape, est_speedup=round(est.speedup, 2))
            return
        detail = f"{shape} -> one weight of N {sum(ns)}"
        if est.speedup is not None:
            detail += f" (GEMMs est. {est.speedup:.2f}x, {source})"
        if left:
            detail += f" (left out: {left})"
        first = modules[0]
        weight = nn.Parameter(torch.cat([m.weight.detach() for m in modules]), first.weight.requires_grad)
        bias = None
        if has_bias:
            bias = nn.Parameter(torch.cat([m.bias.detach() for m in modules]), first.bias.requires_grad)
        fused = FusedLinearWeights(weight, bias, tuple(name(s) for s in members))
        fused.train(modules[0].training)
        start = 0
        for s, m in zip(members, modules):
            new = LinearSlice(fused, start, m.out_features)
            new.train(m.training)
            ctx.swap(s.where, new)
            taken.add(s.where)
            start += m.out_features
        # The per-call saving belongs to the graph pass, which fuses the GEMMs per captured shape.
        ctx.report.add(self.site(ctx, where, detail, target="concatenated weight",
                                 est_saved_ms=None if est.speedup is None else 0.0))


def _why_not(ctx: ModuleContext, g: GraphContext, s: LinearSite, owners: Counter, taken: set[str]) -> str | None:
    """Why the linear at site ``s`` cannot become a slice of a fused weight, or None."""
    if not ctx.config.selects(s.where):
        return "outside Config.modules"
    if s.where in taken:
        return "already fused with other siblings"
    m = ctx.module(s.where)
    if type(m) is not nn.Linear:
        return f"the weight belongs to a {type(m).__name__}, not an nn.Linear"
    o = op(s.node)
    if o is None or o.name != "linear" or module_path(s.node) != s.where:
        return "the product is not the module's own nn.Linear.forward call"
    if m.weight is not g.placeholder_value(s.weight) or (s.bias is not None
                                                          and m.bias is not g.placeholder_value(s.bias)):
        return "the graph reads other tensors than the module's parameters"
    if any(getattr(m, h, None) for h in _HOOKS):
        return "the module has hooks, which a swapped module would lose"
    if any(owners[id(p)] > 1 for p in (m.weight, m.bias) if p is not None):
        return "a parameter is shared with another module (tied)"
    tensors = [p for p in (m.weight, m.bias) if p is not None]
    if any(type(p) not in (torch.Tensor, nn.Parameter) for p in tensors):
        return f"the weight is a {type(m.weight).__name__}, not a plain tensor (already converted)"
    if not m.weight.dtype.is_floating_point:
        return f"weights are {m.weight.dtype}"
    return None
