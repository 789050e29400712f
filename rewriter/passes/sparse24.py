"""2:4 sparse linears: prune each weight to 2 of every 4 along K and run it on the sparse tensor cores.

What it does: in every group of 4 consecutive weights of a row (along the input dimension K) the
2 with the largest score are kept and the others set to zero (:func:`prune_2_4`). The score is
``|w|`` (``Config(sparse_method="magnitude")``, the default) or ``|w| * ||x_j||_2`` (``"wanda"``,
Sun et al. 2023: weights that meet large inputs matter more), with ``x_j`` the j-th input feature
of the example activations, over every call of the layer. The pruned weight is stored compressed
as PyTorch's semi-structured sparse tensor (cuSPARSELt where torch has it, else CUTLASS), which
``F.linear`` multiplies on the 2:4 sparse tensor cores of Ampere and newer GPUs.

Pruning changes the function: this is an accuracy trade the user asks for (mode "max", or
``Config(mode="fast", enable=("sparse24",))``). Without fine-tuning after pruning the error is
large: on the 36 trained encoder linears of all-MiniLM-L6-v2, one-shot 2:4 gives 8-25 dB SQNR per
layer on real activations (median 10 dB by magnitude, 12 dB by wanda), and pruning all of them
leaves sentence embeddings at a mean cosine of 0.64 (magnitude) or 0.75 (wanda) to the original
(``benchmarks/minilm.py --force``, CPU). So the SQNR of each site on the example activation is
reported, and a site is rolled back when ``Config.min_sqnr_db`` has a ``"sparse24"`` entry it
fails (none by default: the mode itself is the user's consent).

Decision for each linear module, deduplicated over its call sites (the report shows the largest
M; the table's times are summed over every call, each at its own M):

1. an ``nn.Linear`` (exactly), in eval mode, called through its own ``forward``, inside
   ``Config.modules``, with bf16 or fp16 weights and activations of the same dtype, and a weight
   not already converted (in mode "max" the FP8 pass runs first and leaves to this one the sites
   where the table predicts 2:4 faster than FP8);
2. a CUDA device of compute capability 8.0 or newer, and a shape the backend takes: cuSPARSELt
   needs N and K multiples of 16, CUTLASS N a multiple of 32 and K a multiple of 64 (torch
   refuses anything else rather than padding);
3. a measured table for the device predicting a speedup over bf16 above :data:`MIN_SPEEDUP`
   (1.02; column ``sparse24_ms`` of ``benchmarks/linear.py --table``): on an H200 2:4 is 4x
   slower than bf16 at M=2048, K=N=4096 and 1.4-1.5x faster on the largest GEMMs.

State: ``state_dict()`` holds each pruned weight as an ordinary dense tensor with its zeros, under
the usual ``weight`` key (:class:`Sparse24Linear` decompresses it when saving and compresses it
again when loading, after checking that every group of 4 has at most 2 nonzeros). So a saved state
loads into a model optimized the same way, and also into the original model, which then computes
the pruned function densely. Pruned weights do not train (``requires_grad=False``).

Example::

    cfg = rewriter.Config(mode="max", sparse_method="wanda", min_sqnr_db={"fp8": 20, "sparse24": 8})
    fast = rewriter.optimize(model, (ids,), config=cfg)
    print(fast.report)

Forcing it, with no cost model and no accuracy floor: :func:`convert_linears` (magnitude), or
:func:`to_sparse24` per layer with an ``act_norm`` for wanda.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import LinearTable, linear_table
from ..patterns.linear import LinearModule, swap_blocker
from ..validate import sample_rows, sqnr_db
from .base import ModuleContext, ModulePass, linear_inputs, measure_swap

__all__ = ["Sparse24Pass", "Sparse24Linear", "prune_2_4", "is_2_4", "to_sparse24", "convert_linears",
           "sparse24_device_support", "MIN_SPEEDUP", "SQNR_ROWS"]

MIN_SPEEDUP = 1.02
SQNR_ROWS = 2048  # rows of the example activation the SQNR is measured on (evenly spaced)


def prune_2_4(weight: Tensor, method: str = "magnitude", act_norm: Tensor | None = None) -> Tensor:
    """``weight`` (N, K) with the 2 lowest-scoring of every 4 consecutive entries of a row set to 0.

    Scores are ``|w|`` for ``method="magnitude"`` and ``|w| * act_norm`` for ``"wanda"``, where
    ``act_norm`` (K,) is the L2 norm of each input feature over the example rows. Returns a new
    dense tensor of ``weight``'s dtype and device; runs anywhere (CPU included).

    >>> prune_2_4(torch.tensor([[4., -1., 3., 2.]]))
    tensor([[4., 0., 3., 0.]])
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"2:4 pruning needs a 2-D weight with K a multiple of 4, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach()
    score = w.abs().float()
    if method == "wanda":
        if act_norm is None or tuple(act_norm.shape) != (k,):
            raise ValueError(f"wanda pruning needs act_norm of shape ({k},), got "
                             f"{None if act_norm is None else tuple(act_norm.shape)}")
        score = score * act_norm.detach().float().to(score.device)[None, :]
    elif method != "magnitude":
        raise ValueError(f"method must be 'magnitude' or 'wanda', got {method!r}")
    groups = score.view(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return w.masked_fill(~keep.view(n, k), 0)


def is_2_4(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive entries of each row has at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _backend() -> tuple[str, int, int]:
    """The semi-structured backend used here: (name, N must divide by, K must divide by)."""
    if torch.backends.cusparselt.is_available():
        return "cuSPARSELt", 16, 16
    return "CUTLASS", 32, 64


def _compress(weight: Tensor) -> Tensor:
    """The semi-structured (compressed) form of a 2:4 pruned dense CUDA weight."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if _backend()[0] == "cuSPARSELt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(weight.contiguous())


class Sparse24Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` 2:4 sparse, held compressed for the sparse tensor cores.

    ``weight`` is a semi-structured sparse tensor (inference only); ``state_dict()`` holds its dense
    form under ``weight`` (see the module docstring), so the layer saves and loads like an
    ``nn.Linear``. Build one with :func:`to_sparse24`.
    """

    def __init__(self, weight: Tensor, bias: nn.Parameter | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        # The semi-structured kernels take 2-D operands; reshape copies a non-contiguous x.
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> Tensor:
        """The pruned weight as a dense tensor (zeros included)."""
        w = self.weight.detach()
        return w.to_dense() if type(w) not in (Tensor, nn.Parameter) else w

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "bias"):
            key = prefix + name
            if getattr(self, name) is None:
                continue
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(getattr(self, name).shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in the current model is {tuple(getattr(self, name).shape)}")
            elif name == "bias":
                with torch.no_grad():
                    self.bias.copy_(value)
            elif not is_2_4(value):
                error_msgs.append(f"{key} is not 2:4 sparse (a group of 4 along K has more than 2 nonzeros); "
                                  "a Sparse24Linear loads only pruned weights")
            else:
                dense = value.detach().to(self.weight.device, self.weight.dtype)
                self.weight = nn.Parameter(_compress(dense), requires_grad=False)
        if strict:
            expected = {prefix + "weight", prefix + "bias"}
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k not in expected and "." not in k[len(prefix):])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=2:4 semi-structured sparse")


def to_sparse24(linear: nn.Linear, method: str = "magnitude", act_norm: Tensor | None = None) -> Sparse24Linear:
    """A :class:`Sparse24Linear` computing ``linear`` with its weight pruned by :func:`prune_2_4`;
    ``linear`` is unchanged (the bias parameter is shared). Needs a CUDA weight the backend takes."""
    return Sparse24Linear(_compress(prune_2_4(linear.weight, method, act_norm)), linear.bias)


def convert_linears(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` submodule of ``model`` (where ``filter_fn(module, path)`` allows)
    by :func:`to_sparse24` of it, pruned by magnitude (wanda needs example activations: the pass
    does it), in place, with no cost model and no accuracy floor; returns the paths. The forced
    path, for accuracy studies."""
    targets = [(path, m) for path, m in model.named_modules()
               if path and type(m) is nn.Linear and (filter_fn is None or filter_fn(m, path))]
    for path, linear in targets:
        parent_path, _, name = path.rpartition(".")
        model.get_submodule(parent_path)._modules[name] = to_sparse24(linear)
    return [path for path, _ in targets]


def sparse24_device_support(device: torch.device) -> str | None:
    """None if semi-structured sparse matmuls run on ``device``, else why not."""
    if device.type != "cuda":
        return (f"2:4 sparse matmul needs a CUDA GPU of compute capability 8.0 or newer; "
                f"the weights are on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 sparse matmul needs compute capability 8.0 or newer (Ampere); this GPU has {major}.{minor}"
    return None


def _guard(lin: LinearModule) -> str | None:
    """Why this module cannot become a 2:4 sparse linear, or None."""
    reason = swap_blocker(lin, "pruned weights", "2:4 sparse linears take")
    if reason is not None:
        return reason
    m = lin.module
    reason = sparse24_device_support(m.weight.device)
    if reason is not None:
        return reason
    backend, n_mult, k_mult = _backend()
    if m.out_features % n_mult or m.in_features % k_mult:
        return (f"{backend} takes N a multiple of {n_mult} and K a multiple of {k_mult}; "
                f"this weight has N={m.out_features}, K={m.in_features}")
    return None


def _act_norm(xs) -> Tensor:
    """L2 norm of each input feature over every example row of every call."""
    return torch.sqrt(sum((x.reshape(-1, x.shape[-1]).float() ** 2).sum(0) for x in xs))


class Sparse24Pass(ModulePass):
    """``nn.Linear`` -> :class:`Sparse24Linear` (2:4 pruned) where the measured table says it pays."""

    name = "sparse24"
    kind = "linear"
    description = "nn.Linear -> 2:4 pruned semi-structured sparse linear where measured faster"
    exact = False
    modes = ("max",)

    def run(self, ctx: ModuleContext) -> None:
        table = linear_table(ctx.device_spec)
        chosen: list[LinearModule] = []
        for lin, detail in self.linear_candidates(ctx, table, _guard):
            speedup, _, note = table.predict(self.name, lin.shapes)
            where = f"at {detail}" + (f" ({note})" if note else "")
            if speedup is None:
                self.skip(ctx, lin.path, f"the measured table has no 2:4 times {where}", detail=detail)
            elif speedup <= MIN_SPEEDUP:
                self.skip(ctx, lin.path, f"predicted {speedup:.2f}x for 2:4 {where}; converts above {MIN_SPEEDUP}x",
                          detail=detail, est_speedup=round(speedup, 2))
            else:
                chosen.append(lin)
        # Each chosen linear with the example activations of all its calls.
        for lin, xs in linear_inputs(chosen, lambda lin: lin.calls):
            self._convert(ctx, table, lin, xs)

    def _convert(self, ctx: ModuleContext, table: LinearTable, lin: LinearModule, xs: dict) -> None:
        _, s = lin.main
        method = ctx.config.sparse_method
        speedup, saved, note = table.predict(self.name, lin.shapes)
        detail = f"{lin.describe()}: 2:4 {method}, {_backend()[0]}"
        if note:
            detail += f" ({note})"
        try:
            new = to_sparse24(lin.module, method, _act_norm(xs.values()) if method == "wanda" else None)
            x = sample_rows(xs[s.x], SQNR_ROWS)
            with torch.no_grad():
                sqnr = sqnr_db(lin.module(x), new(x))
        except Exception as exc:  # noqa: BLE001 - torch refusing one site must not stop the pass
            self.skip(ctx, lin.path, f"semi-structured conversion failed: {type(exc).__name__}: {exc}", detail=detail)
            return
        checks = {"sqnr_db": round(sqnr, 2) if math.isfinite(sqnr) else sqnr}
        floor = ctx.config.min_sqnr_db.get(self.name)
        if floor is not None and not sqnr >= floor:
            self.skip(ctx, lin.path, f"SQNR {sqnr:.1f} dB on the example activation is under the {floor:g} dB "
                      f"floor (Config.min_sqnr_db['{self.name}']); left dense", detail=detail, checks=checks,
                      est_speedup=round(speedup, 2))
            return
        site = self.site(ctx, lin.path, detail, target=self.name, est_speedup=round(speedup, 2),
                         est_saved_ms=round(saved, 4), checks=checks)
        measure_swap(ctx, site, lin.module, new, xs[s.x])
        ctx.swap(lin.path, new)
        ctx.report.add(site)
