"""The passes, in pipeline order. Each is one file; this registry is the only place that lists them.

A pass is a :class:`~rewriter.passes.base.GraphPass` subclass. Adding one to the project means
writing its file and adding its class to ``_BUILTIN`` below; code outside the project can plug one in
with :func:`register_pass` (and take it out with :func:`unregister_pass`).
"""

from __future__ import annotations

from .attention import AttentionPass
from .base import GraphPass, ModuleContext, ModulePass, Pass, Rewrite
from .fp8 import FP8Pass
from .fuse_linear import FuseLinear
from .fuse_linear_graph import FuseLinearGraph
from .nvfp4 import NVFP4Pass
from .sparse24 import Sparse24Pass

__all__ = ["Pass", "GraphPass", "ModulePass", "ModuleContext", "Rewrite", "all_passes", "get_pass", "pass_names", "register_pass", "unregister_pass"]

_BUILTIN: tuple[type[Pass], ...] = (FuseLinearGraph, AttentionPass, FP8Pass, Sparse24Pass, NVFP4Pass, FuseLinear)
_PASS_CLASSES: list[type[Pass]] = list(_BUILTIN)


def register_pass(cls: type[Pass], *, before: str | None = None) -> type[Pass]:
    """Add a pass class to the pipeline (at the end, or before the pass named ``before``)."""
    if not (isinstance(cls, type) and issubclass(cls, (GraphPass, ModulePass))) or not cls.name:
        raise TypeError("register_pass takes a GraphPass or ModulePass subclass with a name")
    if cls.name in pass_names():
        raise ValueError(f"a pass named {cls.name!r} is already registered")
    index = len(_PASS_CLASSES)
    if before is not None:
        if before not in pass_names():
            raise ValueError(f"unknown pass {before!r}")
        index = pass_names().index(before)
    _PASS_CLASSES.insert(index, cls)
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass added with :func:`register_pass`; built-in passes stay."""
    for cls in _PASS_CLASSES:
        if cls.name == name:
            if cls in _BUILTIN:
                raise ValueError(f"{name!r} is a built-in pass; disable it with Config(disable=...)")
            _PASS_CLASSES.remove(cls)
            return
    raise ValueError(f"unknown pass {name!r}")


def all_passes() -> list[Pass]:
    """One instance of every registered pass, in pipeline order."""
    return [cls() for cls in _PASS_CLASSES]


def pass_names() -> list[str]:
    return [cls.name for cls in _PASS_CLASSES]


def get_pass(name: str) -> Pass:
    for cls in _PASS_CLASSES:
        if cls.name == name:
            return cls()
    raise ValueError(f"unknown pass {name!r}; known passes: {', '.join(pass_names())}")
