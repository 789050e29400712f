"""FP8 linears: each ``nn.Linear`` whose GEMM is measured faster in FP8 becomes a torchao FP8 linear.

What it does: the weight is quantized once to ``float8_e4m3fn`` with one scale per output row, and
on every call the activation is quantized per row and multiplied by ``torch._scaled_mm``; this is
torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``, applied through
``torchao.quantization.quantize_``. Where the measured table shows that it pays (small M, a column
``fp8_wo_ms``), torchao's ``Float8WeightOnlyConfig`` is used instead: FP8 weights dequantized on
the fly, bf16 products.

Why every site is gated by measurement: on an H200, torchao's FP8 linear is 15x slower than bf16
at M=16, K=N=4096 and 1.9x faster at M=8192, K=4096, N=14336 (``shared/ANCHORS.md``). A rewrite
applied without a shape-aware decision makes models slower. So each site is looked up in the
table ``benchmarks/linear.py --table`` measured on the device (:func:`rewriter.cost.linear_table`).

Decision for each linear module, deduplicated over its call sites (the report shows the largest
M; the table's times are summed over every call, each at its own M, so a layer called once with
many rows and once with few is judged on the total):

1. an ``nn.Linear`` (exactly; a subclass may compute something else), in eval mode (FP8
   weights do not train), called through its own ``forward``, inside ``Config.modules``, with
   bf16 weights (fp16: weight-only only, since torchao's row-wise dynamic path takes bf16),
   activations of the weight's dtype, and K and N multiples of 16 (``torch._scaled_mm``);
2. a CUDA device of compute capability 8.9 or newer (FP8 tensor cores: Ada, Hopper, Blackwell);
3. a measured table for the device, predicting a speedup over bf16 above :data:`MIN_SPEEDUP`
   (1.02: the 2% margin absorbs interpolation between measured M and run-to-run noise, so that a
   site is never converted for a gain the table cannot resolve) and a saving per call above
   :data:`MIN_SAVING_MS` (what an FP8 linear was measured to cost in a whole model beyond the
   GEMM the table times);
4. when pass ``sparse24`` runs too (mode "max") and the table predicts 2:4 sparsity faster at
   this shape, the site is left to it;
5. the SQNR of a converted copy's output against the original's, on the real example activation
   (up to :data:`SQNR_ROWS` rows), at least ``Config.min_sqnr_db["fp8"]`` (20 dB by default);
   otherwise it is not swapped in.

The user's weights are never touched: the converted module is a new ``nn.Linear`` holding a new
quantized weight (the bias parameter is shared, as the rest of the model's parameters are).

The decision is made for the shapes of the example inputs: a model optimized with a prefill-sized
example keeps its FP8 weights when later called with one token, whatever the table says about
M=1. Optimize with inputs of the size that matters. The table holds GPU times of FP8 linears
compiled by Inductor (the default, ``Config(inductor=True)``), without host overhead; run
uncompiled, the activation quantization is several unfused kernels and the estimates are
optimistic (the report notes it).

State: ``state_dict()`` holds, for each converted linear, torchao's ``Float8Tensor`` (FP8 data and
per-row scales) under the module's usual ``weight`` key. ``torch.save`` / ``torch.load`` (also
with ``weights_only=True``) keep it, and ``load_state_dict`` into a model optimized the same way
(same config, same example shapes, so the same linears converted) copies it in. It does not load
into the original model, or where the same linear stayed in bf16: torch cannot copy a
``Float8Tensor`` into a plain parameter. Converted weights do not train (``requires_grad=False``).

Example::

    fast = rewriter.optimize(model, (ids,), config=rewriter.Config(mode="fast"))
    for s in fast.report.rewritten("fp8"):
        print(s.where, s.detail, s.checks["sqnr_db"])

Forcing the conversion, with no cost model and no accuracy floor (accuracy studies)::

    from rewriter.passes.fp8 import convert_linears
    convert_linears(model, lambda m, path: not path.endswith("lm_head"))
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..cost import LinearTable, linear_table
from ..patterns.linear import LinearModule, swap_blocker
from ..validate import sample_rows, sqnr_db
from .base import ModuleContext, ModulePass, linear_inputs, measure_swap

__all__ = ["FP8Pass", "to_fp8", "convert_linears", "fp8_device_support", "MIN_SPEEDUP", "SQNR_ROWS"]

MIN_SPEEDUP = 1.02
# Whole-model overhead of one FP8 linear beyond what the table's GEMM timing sees (activation
# quantization kernels, launches): in the 8-layer Llama-3-8B-shaped decode on an H200, 17 linears
# predicted to save ~0.0095 ms each made the call 0.75 ms slower, about 0.044 ms each
# (benchmarks/results/llama8b_h200.md, first run). A conversion must be predicted to save more.
MIN_SAVING_MS = 0.045
SQNR_ROWS = 2048  # rows of the example activation the SQNR is measured on (evenly spaced)
_DYNAMIC, _WEIGHT_ONLY = "fp8", "fp8_wo"  # table variants (columns fp8_ms, fp8_wo_ms)
_CHOICE = {_DYNAMIC: "fp8 row-wise dynamic", _WEIGHT_ONLY: "fp8 weight-only (row-wise scales)"}


def fp8_device_support(device: torch.device) -> str | None:
    """None if FP8 matmuls run on ``device``, else why not."""
    if device.type != "cuda":
        return f"FP8 matmul needs a CUDA GPU of compute capability 8.9 or newer; the weights are on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 matmul needs compute capability 8.9 or newer (Ada, Hopper); this GPU has {major}.{minor}"
    return None


def to_fp8(linear: nn.Linear, weight_only: bool = False) -> nn.Linear:
    """A new ``nn.Linear`` computing ``linear`` with FP8 weights through torchao; ``linear`` is unchanged.

    ``weight_only=False``: row-wise dynamic FP8 activations and weights (bf16 weights only);
    ``True``: FP8 weights, bf16/fp16 products. Raises ``ValueError`` if torchao leaves the weight
    unconverted.
    """
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8Tensor,
                                      Float8WeightOnlyConfig, PerRow, quantize_)

    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    new.bias = linear.bias
    new.train(linear.training)
    # set_inductor_config=False: torchao would otherwise change process-wide Inductor settings.
    if weight_only:
        cfg = Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    else:
        cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(new, cfg)
    if not isinstance(new.weight, Float8Tensor):
        raise ValueError(f"torchao left the weight unconverted ({type(new.weight).__name__})")
    return new


def convert_linears(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
                    weight_only: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` submodule of ``model`` (where ``filter_fn(module, path)`` allows)
    by :func:`to_fp8` of it, in place, with no cost model and no accuracy floor; returns the paths.

    The forced path, for accuracy studies: the pass decides per site, this does not. Example::

        done = convert_linears(model, lambda m, path: not path.endswith("lm_head"))
    """
    targets = [(path, m) for path, m in model.named_modules()
               if path and type(m) is nn.Linear and (filter_fn is None or filter_fn(m, path))]
    for path, linear in targets:
        parent_path, _, name = path.rpartition(".")
        model.get_submodule(parent_path)._modules[name] = to_fp8(linear, weight_only)
    return [path for path, _ in targets]


def _guard(lin: LinearModule) -> str | None:
    """Why this module cannot become an FP8 linear, or None."""
    reason = swap_blocker(lin, "FP8 weights", "FP8 conversion takes")
    if reason is not None:
        return reason
    m = lin.module
    if m.in_features % 16 or m.out_features % 16:
        return f"K={m.in_features} and N={m.out_features} must be multiples of 16 for torch._scaled_mm"
    return fp8_device_support(m.weight.device)


class FP8Pass(ModulePass):
    """``nn.Linear`` -> torchao FP8 linear where the measured table says it pays and SQNR allows."""

    name = "fp8"
    kind = "linear"
    description = "nn.Linear -> torchao FP8 (row-wise dynamic) where measured faster and accurate enough"
    exact = False
    modes = ("fast", "max")

    def run(self, ctx: ModuleContext) -> None:
        table = linear_table(ctx.device_spec)
        rival = "sparse24" in ctx.config.active_passes()
        chosen: list[tuple[LinearModule, str]] = []
        for lin, detail in self.linear_candidates(ctx, table, _guard):
            variant, why, speedup = self._decide(table, lin, rival)
            if variant is None:
                self.skip(ctx, lin.path, why, detail=detail, est_speedup=speedup)
                continue
            chosen.append((lin, variant))
        # Each chosen linear with the example activation of its largest call.
        for (lin, variant), xs in linear_inputs(chosen, lambda item: [item[0].main]):
            self._convert(ctx, table, lin, variant, xs[lin.main[1].x])
        if chosen and not ctx.config.inductor:
            ctx.report.note("fp8: the measured table times FP8 linears compiled by Inductor; with "
                            "Config(inductor=False) the activation quantization runs unfused and the "
                            "estimated gains are optimistic")

    def _decide(self, table: LinearTable, lin: LinearModule, rival: bool) -> tuple[str | None, str, float | None]:
        """(variant, "", speedup) for the variant that pays most, else (None, why not, best speedup).
        ``rival``: pass sparse24 runs too, and takes the sites where 2:4 is predicted faster."""
        bf16 = lin.module.weight.dtype == torch.bfloat16
        predicted: dict[str, float] = {}
        notes = set()
        for v in [_DYNAMIC, _WEIGHT_ONLY] if bf16 else [_WEIGHT_ONLY]:
            speedup, _, note = table.predict(v, lin.shapes)
            if speedup is not None:
                predicted[v] = speedup
                notes.add(note)
        notes.discard("")
        where = f"at {lin.describe()}" + (f" ({min(notes)})" if notes else "")
        if not predicted:
            return None, f"the measured table has no FP8 times {where}", None
        best = max(predicted, key=predicted.get)
        if predicted[best] <= MIN_SPEEDUP:
            shown = ", ".join(f"{_CHOICE[v]} {predicted[v]:.2f}x" for v in predicted)
            if not bf16:
                shown += " (fp16 weights: torchao's row-wise dynamic FP8 takes bf16 only)"
            return None, f"predicted {shown} {where}; converts above {MIN_SPEEDUP}x", round(predicted[best], 2)
        _, saved, _ = table.predict(best, lin.shapes)
        if saved is not None and saved < MIN_SAVING_MS:
            return (None, f"predicted {_CHOICE[best]} {predicted[best]:.2f}x {where}, but it saves only "
                          f"{saved * 1e3:.1f} us per call, under the {MIN_SAVING_MS * 1e3:.0f} us an FP8 linear "
                          "costs in a whole model beyond its GEMM", round(predicted[best], 2))
        if rival:
            sparse, _, _ = table.predict("sparse24", lin.shapes)
            if sparse is not None and sparse > predicted[best]:
                return (None, f"2:4 sparsity is predicted faster {where} ({sparse:.2f}x against "
                              f"{predicted[best]:.2f}x for FP8); left to pass sparse24", round(predicted[best], 2))
        return best, "", predicted[best]

    def _convert(self, ctx: ModuleContext, table: LinearTable, lin: LinearModule, variant: str, x: torch.Tensor) -> None:
        speedup, saved, note = table.predict(variant, lin.shapes)
        detail = f"{lin.describe()}: {_CHOICE[variant]}"
        if note:
            detail += f" ({note})"
        try:
            new = to_fp8(lin.module, weight_only=variant == _WEIGHT_ONLY)
            x_all, x = x, sample_rows(x, SQNR_ROWS)
            with torch.no_grad():
                sqnr = sqnr_db(lin.module(x), new(x))
        except Exception as exc:  # noqa: BLE001 - torchao refusing one site must not stop the pass
            self.skip(ctx, lin.path, f"torchao could not convert it: {type(exc).__name__}: {exc}", detail=detail)
            return
        checks = {"sqnr_db": round(sqnr, 2) if math.isfinite(sqnr) else sqnr}
        floor = ctx.config.min_sqnr_db.get(self.name)
        if floor is not None and not sqnr >= floor:
            self.skip(ctx, lin.path, f"SQNR {sqnr:.1f} dB on the example activation is under the {floor:g} dB "
                      f"floor (Config.min_sqnr_db['{self.name}']); left in {lin.module.weight.dtype}",
                      detail=detail, checks=checks, est_speedup=round(speedup, 2))
            return
        site = self.site(ctx, lin.path, detail, target=variant, est_speedup=round(speedup, 2),
                         est_saved_ms=round(saved, 4), checks=checks)
        measure_swap(ctx, site, lin.module, new, x_all)
        ctx.swap(lin.path, new)
        ctx.report.add(site)
