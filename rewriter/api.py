"""``rewriter.optimize``: the front door.

Example::

    import rewriter
    fast = rewriter.optimize(model, (input_ids,))
    print(fast.report)
    out = fast(input_ids)

What happens: the model is captured with Dynamo (graph breaks are fine: each piece is its own
graph), the passes rewrite each graph, and Inductor compiles the result (``Config(inductor=False)``
runs it as is). The example inputs are run once before ``optimize`` returns, so the report is
complete. Later calls with other shapes, dtypes or devices are re-captured and re-rewritten for
that case (every rewrite is specialized to the shapes it was checked on, so a new shape never
reuses a decision made for another); once Dynamo's recompile limit is reached, further new shapes
run the original eager code.

The model object is left as it was (modules, hooks, training flag): the result wraps a structural
copy that shares every parameter and buffer with it, so an optimizer step through the result
updates the original weights. ``Config(inplace=True)`` works on the model itself instead.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import time
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .config import Config
from .context import GraphContext
from .cost import device_spec
from .dynamo import Backend
from .passes import ModuleContext, get_pass
from .patterns.graph import remember_sources
from .pipeline import input_device
from .report import PassRun, Report

__all__ = ["optimize", "OptimizedModel"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def clone_structure(model: nn.Module) -> nn.Module:
    """New module objects with the same parameters and buffers (shared, not copied)."""
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = copy.copy(m)
        memo[id(m)] = new
        new._parameters = OrderedDict(m._parameters) if isinstance(m._parameters, OrderedDict) else dict(m._parameters)
        new._buffers = OrderedDict(m._buffers) if isinstance(m._buffers, OrderedDict) else dict(m._buffers)
        new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
        for name in _HOOK_DICTS:
            if name in m.__dict__:
                setattr(new, name, type(getattr(m, name))(getattr(m, name)))
        new._modules = type(m._modules)((k, None if v is None else clone(v)) for k, v in m._modules.items())
        return new

    return clone(model)


_entries = itertools.count()


def _entry_point(model: nn.Module):
    """A function calling ``model``, with a code object of its own.

    Dynamo keeps compiled graphs per code object and stops compiling a code object after a few
    recompilations. Compiling ``model.forward`` directly would share that budget between every
    optimized instance of a class; a fresh code object per :func:`optimize` call gives each
    optimized model its own.
    """

    def call(*args, **kwargs):
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=f"rewriter_entry_{next(_entries)}")
    return types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns: called like the model, with ``.report``.

    ``state_dict()`` / ``load_state_dict()`` use the model's own names. ``train()``, ``eval()`` and
    ``to()`` apply to the wrapped model (and trigger a re-capture where they change the graph).
    Other attributes are looked up on the wrapped model.
    """

    def __init__(self, model: nn.Module, backend: Backend):
        super().__init__()
        self.model = model
        compiled = torch.compile(_entry_point(model), backend=backend, dynamic=False)
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_fallback", None)

    @property
    def report(self) -> Report:
        return self._backend.report

    @property
    def config(self) -> Config:
        return self._backend.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._fallback is not None:
            return self.model(*args, **kwargs)
        return self._compiled(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)


def _check_args(model: Any, example_inputs: Any, example_kwargs: Any, config: Any) -> tuple[tuple, dict, Config]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple of positional arguments, got {type(example_inputs).__name__}")
    if example_kwargs is None:
        example_kwargs = {}
    if not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    if config is None:
        config = Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a rewriter.Config, got {type(config).__name__}")
    try:
        inspect.signature(model.forward).bind(*example_inputs, **example_kwargs)
    except TypeError as exc:
        raise TypeError(f"example inputs do not match {type(model).__name__}.forward: {exc}") from None
    except ValueError:
        pass  # no inspectable signature (a builtin forward): let the call itself decide
    return tuple(example_inputs), dict(example_kwargs), config


@contextlib.contextmanager
def _state_preserved(model: nn.Module, tensors: list[torch.Tensor]):
    """Run the example without a trace on the user's state: buffers (e.g. batch-norm statistics)
    and the random number generators are restored afterwards."""
    saved = [(b, b.detach().clone()) for b in dict.fromkeys(model.buffers())]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in saved:
                    if b.shape == v.shape:
                        b.copy_(v)


def capture(model: nn.Module, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> list[tuple[Any, list]]:
    """The graphs Dynamo captures from one call of ``model`` (with their real example inputs)."""
    graphs: list[tuple[Any, list]] = []

    def collect(gm, example_inputs):
        remember_sources(gm.graph, list(example_inputs))
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    fn = torch.compile(_entry_point(model), backend=collect, dynamic=False)
    grad = torch.enable_grad() if model.training else torch.no_grad()
    with _state_preserved(model, tensors), grad:
        fn(*args, **kwargs)
    return graphs


def _run_module_passes(model: nn.Module, args: tuple, kwargs: dict, tensors: list[torch.Tensor], config: Config,
                       report: Report, names: list[str]) -> None:
    """Capture the model once, let each module pass change modules; undo a pass that raises."""
    spec = device_spec(config.device) if config.device else device_spec(input_device(tensors))
    ctx: ModuleContext | None = None
    for name in names:
        p = get_pass(name)
        if ctx is None or ctx.stale:
            try:
                graphs = capture(model, args, kwargs, tensors)
            except Exception as exc:  # noqa: BLE001 - the model must still be optimizable
                report.passes.append(PassRun(name, -1, "error", f"capture failed: {type(exc).__name__}: {exc}"))
                continue
            contexts = [GraphContext(gm, ex, config, report, -1, spec) for gm, ex in graphs]
            ctx = ModuleContext(model, contexts, config, report, spec)
        mark, first_site = ctx.mark(), len(report.sites)
        start = time.perf_counter()
        try:
            p.run(ctx)
        except Exception as exc:  # noqa: BLE001 - a failing pass must never break the model
            ctx.revert(mark)
            message = f"{type(exc).__name__}: {exc}"
            for site in report.sites[first_site:]:
                if site.rewritten:
                    site.status = "skipped"
                    site.reason = f"pass {name} failed and its changes were undone ({message})"
            report.passes.append(PassRun(name, -1, "error", message, time.perf_counter() - start))
            continue
        report.passes.append(PassRun(name, -1, "ok", seconds=time.perf_counter() - start))
        ctx.stale = ctx.mark() != mark  # modules changed: the next pass needs a fresh capture


def optimize(model: nn.Module, example_inputs: Any = (), *, example_kwargs: dict | None = None,
             config: Config | None = None) -> OptimizedModel:
    """Rewrite ``model`` for speed; returns a module called like it, with a ``.report``.

    Args:
        model: any ``torch.nn.Module``.
        example_inputs: positional arguments for one representative call.
        example_kwargs: keyword arguments for that call.
        config: a :class:`rewriter.Config` (default: exact rewrites, validated, then Inductor).

    Raises ``TypeError`` for a non-module, inputs that do not fit ``model.forward`` or a wrong
    config type, ``ValueError`` for bad config values. Anything the passes cannot handle is left as
    it was and reported; it does not raise.
    """
    args, kwargs, config = _check_args(model, example_inputs, example_kwargs, config)
    target = model if config.inplace else clone_structure(model)
    # What Config(measure=True) times the result against: the model as given (with inplace, a
    # structural copy taken before any module is swapped).
    baseline = (clone_structure(model) if config.inplace else model) if config.measure else None
    backend = Backend(config)
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    module_passes = [name for name in config.active_passes() if get_pass(name).stage == "module"]
    if module_passes:
        _run_module_passes(target, args, kwargs, tensors, config, backend.report, module_passes)
    backend.modules_done = True
    result = OptimizedModel(target, backend)
    grad = torch.enable_grad() if target.training else torch.no_grad()
    with _state_preserved(target, tensors), grad:
        try:
            result(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - decide whose failure it is
            try:
                target(*args, **kwargs)
            except Exception:
                raise  # the model itself fails on these inputs: the user's error, not ours
            object.__setattr__(result, "_fallback", exc)
            backend.report.note(f"the optimized model failed on the example inputs and runs as the original "
                                f"eager model: {type(exc).__name__}: {exc}")
    if backend.report.graphs == 0 and result._fallback is None:
        backend.report.note("no graph was captured (Dynamo ran the model eagerly, e.g. after reaching its "
                            "recompile limit for this code); nothing was rewritten")
    if baseline is not None:
        _measure_model(baseline, result, args, kwargs, tensors, config, backend.report)
    return result


def _measure_model(baseline: nn.Module, result: OptimizedModel, args: tuple, kwargs: dict,
                   tensors: list[torch.Tensor], config: Config, report: Report) -> None:
    """Config(measure=True): the whole model, original eager against optimized, into report.measured."""
    from .measure import compare, device_of

    if not config.validate:
        report.note("measure: per-site timings reuse the validation's example activations, so with "
                    "validate=False only the converted linears and the whole model were timed")
    if result._fallback is not None:
        report.measured = {"note": "not timed: the optimized model runs as the original eager model"}
        return
    training = result.model.training
    grad = torch.enable_grad() if training else torch.no_grad()
    try:
        with _state_preserved(result.model, tensors), grad:
            t = compare(lambda: baseline(*args, **kwargs), lambda: result(*args, **kwargs), device_of(tensors))
    except Exception as exc:  # noqa: BLE001 - the optimized model already ran; timing is extra
        report.measured = {"note": f"timing failed: {type(exc).__name__}: {exc}"}
        return
    what = (f"forward{' with autograd' if training else ''} on the example inputs, against the original "
            f"eager model; median of {t['rounds']} alternating rounds of {t['calls'][0]} / {t['calls'][1]} calls"
            + ("" if config.inductor else "; Inductor off"))
    report.measured = {"original_ms": round(t["ms_before"], 6), "optimized_ms": round(t["ms_after"], 6),
                       "speedup": round(t["speedup"], 4), "device": str(device_of(tensors)), "what": what}
