"""Configuration: one validated dataclass.

Example::

    cfg = rewriter.Config(mode="exact", disable=("attention",), modules=r"^encoder\\.")
    fast = cfg.replace(mode="fast")

Bad values raise at construction: ``ValueError`` for unknown names or out-of-range values,
``TypeError`` for values of the wrong type, each naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Config", "MODES", "ATTENTION_BACKENDS"]

MODES = ("exact", "fast", "max")
ATTENTION_BACKENDS = ("auto", "sdpa", "triton", "flex")


@dataclass(frozen=True)
class Config:
    """How :func:`rewriter.optimize` and the ``rewriter`` backend rewrite a model.

    Attributes:
        mode: ``"exact"`` (default) runs only rewrites that compute the same function within
            floating-point rounding; ``"fast"`` adds lossy rewrites that a cost model and an
            accuracy check both accept (FP8 linears); ``"max"`` adds 2:4 sparsity too.
        enable: passes to run beyond the mode's defaults (e.g. ``("nvfp4",)``).
        disable: passes not to run.
        modules: which sites to touch, by module path: a regular expression searched in the path,
            or a predicate ``fn(path) -> bool``. Sites outside are reported as skipped.
        validate: check every rewritten site against the original on random and example inputs
            and roll back any that differ.
        inplace: allow changing the model object itself (module swaps for weight rewrites);
            otherwise the model is left as it was and shares its parameters with the result.
        inductor: hand the rewritten graph to Inductor; ``False`` runs it as it is.
        attention_backend: force the attention target: ``"sdpa"``, ``"triton"``, ``"flex"``, or
            ``"auto"`` to let the cost model choose per site.
        device: device name for cost estimates (``"H100"``, ``"H200"``, ``"A100"``); by default
            the device of the example inputs.
        min_sqnr_db: accuracy floor per lossy pass, in dB of signal-to-quantization-noise ratio
            on the example activations; sites under it are rolled back. A pass missing from the
            dict (2:4 sparsity by default) only reports its SQNR.
        sparse_method: how 2:4 sparsity picks the weights it keeps: ``"magnitude"`` (default) or
            ``"wanda"`` (magnitude times the norm of the matching input activation, measured on the
            example inputs).
        measure: also time what was done, on this machine with the example inputs: every
            checked site before and after its rewrite, every converted linear, and the whole
            model against the original eager one (``Site.measured_ms_before`` / ``_after``,
            ``Report.measured``; method in :mod:`rewriter.measure`). Off by default: it adds
            about a second per site and model.
        cuda_graphs: have Inductor run each compiled graph as a CUDA graph (its cudagraph trees,
            what ``torch.compile(mode="reduce-overhead")`` does): one launch per graph instead of
            one per kernel, which is what a decode step needs to turn GPU savings (NVFP4) into
            time saved. The usual conditions apply: an output of one call may be overwritten by
            the next call of the same graph (clone what you keep), and shapes are static. CUDA
            only; Inductor records the graphs (with ``inductor=False`` nothing does, but the
            passes still decide as for replayed graphs: record the model yourself). Off by
            default.
    """

    mode: str = "exact"
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    modules: str | Callable[[str], bool] | None = None
    validate: bool = True
    inplace: bool = False
    inductor: bool = True
    attention_backend: str = "auto"
    device: str | None = None
    min_sqnr_db: dict[str, float] = field(default_factory=lambda: {"fp8": 20.0, "nvfp4": 15.0})
    sparse_method: str = "magnitude"
    measure: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str):
            raise TypeError(f"Config.mode must be a string, got {type(self.mode).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"Config.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("enable", "disable"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"Config.{name} must be a tuple of pass names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        from .passes import pass_names, get_pass

        known = pass_names()
        for name in self.enable + self.disable:
            if name not in known:
                raise ValueError(f"unknown pass {name!r}; known passes: {', '.join(known)}")
        for name in self.enable:
            if not get_pass(name).exact and self.mode == "exact":
                raise ValueError(
                    f"pass {name!r} is lossy and mode 'exact' runs only exact rewrites; "
                    f"use mode='fast' or mode='max' to enable it")
        if self.modules is not None and not (isinstance(self.modules, str) or callable(self.modules)):
            raise TypeError("Config.modules must be a regular expression string or a callable")
        if isinstance(self.modules, str):
            try:
                re.compile(self.modules)
            except re.error as exc:
                raise ValueError(f"Config.modules is not a valid regular expression: {exc}") from None
        for name in ("validate", "inplace", "inductor", "measure", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Config.{name} must be a bool, got {getattr(self, name)!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"Config.attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError("Config.device must be a device name string or None")
        if self.sparse_method not in ("magnitude", "wanda"):
            raise ValueError(f"Config.sparse_method must be 'magnitude' or 'wanda', got {self.sparse_method!r}")
        if not isinstance(self.min_sqnr_db, dict):
            raise TypeError("Config.min_sqnr_db must be a dict of pass name -> dB")
        for key, value in self.min_sqnr_db.items():
            if not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"Config.min_sqnr_db[{key!r}] must be a number, got {value!r}")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def selects(self, path: str) -> bool:
        """Whether a site at module ``path`` may be rewritten under ``modules``."""
        if self.modules is None:
            return True
        if isinstance(self.modules, str):
            return re.search(self.modules, path) is not None
        return bool(self.modules(path))

    def active_passes(self) -> list[str]:
        """Names of the passes this config runs, in pipeline order."""
        from .passes import all_passes

        names = []
        for p in all_passes():
            on = (self.mode in p.modes or p.name in self.enable) and p.name not in self.disable
            if on and (p.exact or self.mode != "exact"):
                names.append(p.name)
        return names
