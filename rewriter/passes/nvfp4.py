"""NVFP4 pass: ``nn.Linear`` layers become :class:`~rewriter.kernels.nvfp4.NVFP4Linear` (weights in
4.5 bits) where the measured linear table says the NVFP4 kernel beats bf16 at the layer's shape.

Lossy and opt-in: ``Config(mode="fast", enable=("nvfp4",))``; mode "exact" refuses it. Inference
only: a model in training mode keeps every linear, and a converted layer refuses to build a graph
for gradients, so call the optimized model under ``torch.no_grad()`` or ``torch.inference_mode()``
(the report notes it).

Which layers: each linear product the matcher finds in the captured graphs that runs in an
``nn.Linear`` (the class itself, not a subclass) whose weight is read only by that forward and tied
to no other module, with bf16/fp16 weights and activations, ``K % 16 == 0`` and finite weights.
Then the cost model decides, per layer, from the M (rows) of every call seen with the example
inputs (:func:`nvfp4_cost`):

* weights on the CPU (or any non-CUDA device): skipped. NVFP4 kernels need a CUDA GPU; on the CPU
  a converted layer would dequantize its whole weight on every call and then run the same matmul.
* compute capability 10.0+ (FP4 tensor cores): skipped with that reason; NVFP4 there is the
  hardware path (torchao / ``torch._scaled_mm``), which this pass does not emit yet.
* CUDA without a measured table (``rewriter/data/linear_<device>.json``): skipped. The kernel
  beats bf16 only at decode-sized M (1.3-1.8x at M <= 16 on an H200, 0.4-0.9x from M = 64 on:
  ``benchmarks/results/nvfp4_nvidia-h200.md``), so without measurements it is not assumed to pay.
  (The committed H200 table times with L2 emptied by a memset before each call, which adds the
  same few microseconds to both sides: it shows 0.92-1.63x at M <= 16, so its choices are
  conservative for small layers.)
* with a table: converted when ``time(bf16) / time(nvfp4)``, summed over the calls, is above 1,
  and, unless ``Config(cuda_graphs=True)``, when the GPU time saved per call also exceeds
  :data:`HOST_EXTRA_MS`: at decode sizes a step launched from Python is bound by host time, and an
  NVFP4 call costs ~90 us more of it than ``F.linear`` (measured on the H100's host), more than any
  layer's GPU saving there. With CUDA graphs the launches cost nothing per call and the table
  decides alone (16-layer Llama-shaped decode through ``optimize``: 1.35x over bf16 on an H100).

fp32 models are skipped: the Triton kernel takes bf16/fp16 activations, so an fp32 layer would run
the dequantize-then-matmul reference on every call, which moves more bytes than the fp32 linear it
replaces (over 10x slower than ``F.linear`` at MiniLM's shapes, measured on a CPU).

Each converted layer is checked on the activations it saw with the example inputs: the SQNR of its
output against the original layer's (computed in fp32) must reach ``config.min_sqnr_db["nvfp4"]``
(15 dB by default), or the layer is put back and the report says so. Rewritten sites report
``sqnr_db`` and ``bytes_saved`` (dense weight bytes minus packed bytes) in ``checks``.

The decision is made once, for the example inputs: unlike graph rewrites, a module swap applies to
every later call whatever its shape, so give ``optimize`` the shape the model will mostly run at
(a decode step, for instance). The converted modules hold only the packed weight; the dense weight
stays alive as long as the original model holds it (``Config(inplace=True)`` converts the model
object itself).

Forcing the conversion, whatever the device or cost (accuracy studies, memory savings)::

    from rewriter.passes.nvfp4 import convert_linears
    done = convert_linears(model)                                         # every eligible nn.Linear
    done = convert_linears(model, lambda m, path: "lm_head" not in path)  # a filter, torchao style
    print(sum(c.bytes_saved for c in done), min(c.weight_sqnr_db for c in done))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..context import GraphContext
from ..cost import LinearTable, linear_table
from ..kernels.nvfp4 import BLOCK_SIZE, NVFP4Linear, unpack_nvfp4
from ..patterns.graph import module_path
from ..patterns.linear import LinearSite, find_linears
from ..patterns.ops import meta
from ..validate import sqnr_db
from .base import ModuleContext, ModulePass, measure_swap

__all__ = ["NVFP4Pass", "Conversion", "CostDecision", "convert_linears", "nvfp4_convertible", "nvfp4_cost"]

_HALF = (torch.bfloat16, torch.float16)


def nvfp4_convertible(module: nn.Module) -> str:
    """Why :func:`convert_linears` would leave ``module`` alone, or ``""`` if it converts it.

    Only ``nn.Linear`` itself qualifies: a subclass may compute something else in its forward or
    have its weight read by its parent (``nn.MultiheadAttention.out_proj``). The weight needs
    ``K % 16 == 0`` (one scale per 16 elements along K) and finite values.
    """
    if type(module) is not nn.Linear:
        if isinstance(module, nn.Linear):
            return (f"{type(module).__name__} subclasses nn.Linear; only nn.Linear itself is converted "
                    "(a subclass may compute something else or have its weight read by its parent)")
        return f"{type(module).__name__} is not an nn.Linear"
    if module.in_features % BLOCK_SIZE != 0:
        return (f"K={module.in_features} is not a multiple of {BLOCK_SIZE} "
                f"(one NVFP4 scale per {BLOCK_SIZE} weights along K)")
    if not bool(torch.isfinite(module.weight.detach()).all()):
        return "the weight holds NaN or inf"
    return ""


@dataclass(frozen=True)
class Conversion:
    """One ``nn.Linear`` replaced by :func:`convert_linears`.

    ``dense_bytes`` are the original weight's bytes, ``packed_bytes`` the NVFP4 values and scales
    (the bias is kept as it was and counted in neither); ``weight_sqnr_db`` compares the dequantized
    weight with the original one.
    """

    path: str
    module: NVFP4Linear
    dtype: torch.dtype
    dense_bytes: int
    packed_bytes: int
    weight_sqnr_db: float

    @property
    def bytes_saved(self) -> int:
        return self.dense_bytes - self.packed_bytes


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent._modules[name]
    parent._modules[name] = new
    return old


def convert_linears(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    swap: Callable[[str, nn.Module], object] | None = None,
) -> list[Conversion]:
    """Replace every eligible ``nn.Linear`` submodule of ``model`` by an :class:`NVFP4Linear`, in place.

    This is the forced path: no cost model, no device check and no accuracy floor (the NVFP4 pass
    applies those and then converts through this function). Eligible means
    :func:`nvfp4_convertible` returns ``""`` and ``filter_fn(module, path)`` (if given) is true;
    any floating-point dtype is converted, fp32 included (such layers run the dequantize-then-matmul
    reference). A linear whose weight is tied to another module's (an ``lm_head`` tied to the
    embedding) gets a packed copy while the other module keeps the dense weight: more memory, not
    less (``bytes_saved`` does not know); leave it out with ``filter_fn`` when saving memory is the
    aim. Code that reads a converted layer's ``.weight`` (outside its forward) fails afterwards: with
    no graph to look at, this function cannot see it (the pass does). A module registered at
    several paths becomes one NVFP4 module at all of them (one :class:`Conversion`, named by the
    first path); the model itself is never replaced, only its submodules. ``swap(path, new)`` puts
    each new module in place (default: set it on the parent module).

    Returns one :class:`Conversion` per converted module.

    Example::

        done = convert_linears(model, lambda m, path: not path.endswith("lm_head"))
        print(f"{len(done)} linears, {sum(c.bytes_saved for c in done) / 1e6:.1f} MB saved")
    """
    put = swap if swap is not None else (lambda path, new: _set_submodule(model, path, new))
    targets = [(path, m) for path, m in model.named_modules(remove_duplicate=False)
               if path and not nvfp4_convertible(m) and (filter_fn is None or filter_fn(m, path))]
    done: dict[int, Conversion] = {}
    with torch.no_grad():
        for path, linear in targets:
            if id(linear) not in done:
                new = NVFP4Linear.from_linear(linear)
                w = linear.weight
                wq = unpack_nvfp4(new.nvfp4_weight(), torch.float32)
                done[id(linear)] = Conversion(path, new, w.dtype, w.numel() * w.element_size(), new.nbytes(),
                                              sqnr_db(w.float(), wq))
            put(path, done[id(linear)].module)
    return list(done.values())


@dataclass(frozen=True)
class CostDecision:
    """What :func:`nvfp4_cost` decided for one layer; ``reason`` says why not when ``convert`` is false."""

    convert: bool
    reason: str = ""
    est_speedup: float | None = None
    est_saved_ms: float | None = None
    note: str = ""  # how the table answered (nearest measured shape), when it did


# Host time an NVFP4 linear costs per call beyond a bf16 one, where nothing hides it (no CUDA
# graph): Inductor-compiled module at M = 1 on the H100 host, 131-137 us against 35-45 us for a
# compiled F.linear (benchmarks/results/nvfp4_host_h100.md: the Python op and its Triton launch
# against one cuBLAS call). A decode step of a whole model measured the same way: 4-layer
# Llama-shaped, hidden 2048, one token, Inductor: bf16 1.08 ms, NVFP4 3.83 ms; with CUDA graphs
# 0.317 against 0.227 ms (benchmarks/results/decode_*_h100.txt).
HOST_EXTRA_MS = 0.09


def nvfp4_cost(device_type: str, table: LinearTable | None, rows: Sequence[int], k: int, n: int,
               capability: tuple[int, int] | None = None, cuda_graphs: bool = True) -> CostDecision:
    """Whether an NVFP4 linear of shape (K=``k``, N=``n``) pays for calls with ``rows`` rows (M) each.

    A pure function of where the weight lives, the device's measured table and the shape:

    * ``device_type`` not ``"cuda"``: no (the kernels need a CUDA GPU).
    * compute ``capability`` 10.0 or newer: no. Those GPUs have FP4 tensor cores, where NVFP4
      belongs to the hardware path (torchao's NVFP4 GEMMs, ``torch._scaled_mm``), not to this
      weight-only kernel; the pass does not emit the hardware path (no such GPU to measure it on).
    * no table: no (the kernel wins only at small M; without measurements that is not assumed).
    * otherwise: yes when ``sum time(bf16) / sum time(nvfp4)`` over the calls is above 1. The table's
      ``bf16_ms`` column stands for fp16 too (same bytes, same tensor cores).
    * and, without ``cuda_graphs`` (the calls launched one by one from Python): only when the GPU
      time saved per call exceeds :data:`HOST_EXTRA_MS`, the extra host time of each call. At the
      small M where NVFP4 pays, a layer's GPU time is a few to a few tens of microseconds and the
      host time of a launch is the step's time, so this keeps NVFP4 off unless CUDA graphs hide
      the launches (``Config(cuda_graphs=True)``).

    Example::

        nvfp4_cost("cuda", linear_table(device_spec("H200")), [1], 4096, 14336)
    """
    if device_type != "cuda":
        on = "CPU" if device_type == "cpu" else device_type
        return CostDecision(False, f"NVFP4 kernels need a CUDA GPU; on {on} it would only dequantize")
    if capability is not None and tuple(capability) >= (10, 0):
        return CostDecision(False, f"compute capability {capability[0]}.{capability[1]} has FP4 tensor cores: "
                                   "NVFP4 there is the hardware path (torchao NVFP4 / torch._scaled_mm), "
                                   "which this pass does not emit; the weight-only kernel is for GPUs without them")
    if table is None:
        return CostDecision(False, "no measured table for this device: NVFP4 beats bf16 only at small M, "
                                   "so it is not assumed to pay without measurements")
    before = after = 0.0
    notes = []
    for m in rows:
        t_new, note = table.time_ms("nvfp4", m, k, n)
        t_old, _ = table.time_ms("bf16", m, k, n)
        if t_new is None or t_old is None or t_new <= 0:
            return CostDecision(False, f"the measured table has no nvfp4/bf16 times for K={k} N={n} "
                                       f"({note or 'missing column'})")
        before, after = before + t_old, after + t_new
        if note:
            notes.append(note)
    speedup = before / after
    note = "; ".join(dict.fromkeys(notes))
    saved = before - after
    if speedup > 1.0 and not cuda_graphs and saved < HOST_EXTRA_MS * len(rows):
        return CostDecision(False, f"saves {saved * 1e3:.1f} us of GPU time per call ({speedup:.2f}x), less than "
                                   f"the ~{HOST_EXTRA_MS * 1e3:.0f} us of host time an NVFP4 call adds where each "
                                   "launch comes from Python: with Config(cuda_graphs=True) (one launch per graph) "
                                   "it converts", speedup, saved, note)
    if speedup > 1.0:
        return CostDecision(True, "", speedup, saved, note)
    ms = ", ".join(str(m) for m in dict.fromkeys(rows))
    return CostDecision(False, f"the measured table gives {speedup:.2f}x against bf16 at M={ms} "
                               f"(NVFP4 pays only where reading the weight dominates)", speedup, saved, note)


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3g} MB"


class NVFP4Pass(ModulePass):
    """``nn.Linear`` -> :class:`NVFP4Linear` where the measured table says it pays (module docstring)."""

    name = "nvfp4"
    kind = "linear"
    description = "nn.Linear -> NVFP4 weight-only linear (4.5-bit weights) where measured faster; opt-in"
    exact = False
    modes = ()

    def run(self, ctx: ModuleContext) -> None:
        # One entry per module whose forward runs a linear product (a layer called twice has two
        # calls), keyed by that module's path: a tied weight is then reported at the layer using it.
        groups: dict[str, list[tuple[GraphContext, LinearSite]]] = {}
        for gc in ctx.graphs:
            for s in find_linears(gc.graph, gc.kinds):
                groups.setdefault(module_path(s.node), []).append((gc, s))
        owners: dict[int, list[str]] = {}  # parameter or module (by id) -> every name it has in the model
        for name, p in ctx.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(name)
        for name, m in ctx.model.named_modules(remove_duplicate=False):
            owners.setdefault(id(m), []).append(name)
        table = linear_table(ctx.device_spec)
        accepted: dict[str, tuple[list[tuple[GraphContext, LinearSite]], CostDecision]] = {}
        for where, calls in groups.items():
            reason = self._guard(ctx, where, calls, owners)
            if reason:
                self.skip(ctx, where, reason, self._shape(calls))
                continue
            site = calls[0][1]
            weight = ctx.module(where).weight
            decision = nvfp4_cost(weight.device.type, table, [s.rows for _, s in calls],
                                  site.in_features, site.out_features, _capability(weight.device),
                                  cuda_graphs=ctx.config.cuda_graphs)
            if not decision.convert:
                self.skip(ctx, where, decision.reason, self._shape(calls), target="nvfp4",
                          est_speedup=decision.est_speedup, est_saved_ms=decision.est_saved_ms)
                continue
            accepted[where] = (calls, decision)
        if accepted:
            self._convert(ctx, accepted)

    @staticmethod
    def _shape(calls: list[tuple[GraphContext, LinearSite]]) -> str:
        s = calls[0][1]
        ms = ", ".join(str(c.rows) for _, c in calls)
        return f"M {ms}, K {s.in_features}, N {s.out_features}"

    def _guard(self, ctx: ModuleContext, where: str, calls: list[tuple[GraphContext, LinearSite]],
               owners: dict[int, list[str]]) -> str:
        """Why the linear at ``where`` is left alone, or ``""``; ``owners`` maps each parameter and
        module (by id) to all its names in the model."""
        if ctx.model.training:
            return "inference only: NVFP4Linear has no backward and the model is in training mode"
        if not ctx.config.selects(where):
            return "outside Config.modules"
        module = ctx.module(where)
        why = nvfp4_convertible(module)
        if why:
            return why
        if where == "":
            return "the model itself is the linear; only submodules are replaced"
        if len(owners[id(module)]) > 1:
            return f"the module is registered at several paths ({', '.join(owners[id(module)])})"
        tied = [name for name in owners.get(id(module.weight), []) if name != f"{where}.weight"]
        if tied:
            return (f"its weight is tied to {tied[0]}, which keeps the dense weight: converting would add "
                    "memory, not save it")
        for gc in {id(gc): gc for gc, _ in calls}.values():
            mine = {s.node for g, s in calls if g is gc}
            params = {p for g, s in calls if g is gc for p in (s.weight, s.bias) if p is not None}
            if any(u not in mine for p in params for u in p.users):
                return ("its weight or bias is also read outside its forward "
                        "(the model would still need the dense one)")
        for dtype, what in ((module.weight.dtype, "weights"), *((meta(s.x).dtype, "activations") for _, s in calls)):
            if dtype not in _HALF:
                return (f"{what} are {str(dtype).replace('torch.', '')}: the NVFP4 kernel takes bf16/fp16 "
                        "activations, and the dequantize-then-matmul fallback would be slower than the original "
                        "(convert_linears() converts it regardless)")
        return ""

    def _convert(self, ctx: ModuleContext, accepted: dict) -> None:
        """Convert the accepted linears, check each on its example activations, put back those under
        the accuracy floor, and report every one."""
        wanted: dict[GraphContext, list] = {}
        for calls, _ in accepted.values():
            for gc, s in calls:
                wanted.setdefault(gc, []).append(s.x)
        values = {}
        for gc, nodes in wanted.items():
            values.update(gc.evaluate(nodes))
        old = {where: ctx.module(where) for where in accepted}
        floor = ctx.config.min_sqnr_db.get(self.name)
        for conv in convert_linears(ctx.model, lambda m, path: path in accepted, swap=ctx.swap):
            calls, decision = accepted[conv.path]
            linear = old[conv.path]
            with torch.no_grad():
                x = torch.cat([values[s.x].reshape(-1, linear.in_features) for _, s in calls])
                bias = None if linear.bias is None else linear.bias.float()
                ref = F.linear(x.float(), linear.weight.float(), bias)
                got = conv.module(x)
            sqnr = sqnr_db(ref, got)
            shape = self._shape(calls)
            size = (f"{_mb(conv.dense_bytes)} {str(conv.dtype).replace('torch.', '')} -> {_mb(conv.packed_bytes)} "
                    f"NVFP4 (saves {_mb(conv.bytes_saved)})")
            estimate = dict(target="nvfp4", est_speedup=decision.est_speedup, est_saved_ms=decision.est_saved_ms)
            if floor is not None and not sqnr >= floor:
                ctx.swap(conv.path, linear)
                site = self.skip(ctx, conv.path, f"SQNR {sqnr:.1f} dB on the example activations is under "
                                 f"min_sqnr_db['nvfp4'] = {floor:g} dB; put back", f"{shape}, {size}", **estimate)
                site.checks["sqnr_db"] = round(sqnr, 2)
                continue
            note = f" ({decision.note})" if decision.note else ""
            site = self.site(ctx, conv.path, f"{shape}, {size}, SQNR {sqnr:.1f} dB{note}", **estimate)
            site.checks.update(sqnr_db=round(sqnr, 2), bytes_saved=conv.bytes_saved)
            measure_swap(ctx, site, linear, conv.module, values[calls[0][1].x])
            ctx.report.add(site)
            ctx.report.note("nvfp4: converted linears are inference-only; call the optimized model under "
                            "torch.no_grad() or torch.inference_mode()")
