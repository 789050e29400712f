"""The passes, in pipeline order. Each is one file; this registry is the only place that lists them.

A pass is a :class:`~rewriter.passes.base.GraphPass` subclass. Adding one means writing its file
and adding its class to ``_PASS_CLASSES`` below.
"""

from __future__ import annotations

from .attention import AttentionPass
from .base import GraphPass, Rewrite

__all__ = ["GraphPass", "Rewrite", "all_passes", "get_pass", "pass_names"]

_PASS_CLASSES: tuple[type[GraphPass], ...] = (AttentionPass,)


def all_passes() -> list[GraphPass]:
    """One instance of every registered pass, in pipeline order."""
    return [cls() for cls in _PASS_CLASSES]


def pass_names() -> list[str]:
    return [cls.name for cls in _PASS_CLASSES]


def get_pass(name: str) -> GraphPass:
    for cls in _PASS_CLASSES:
        if cls.name == name:
            return cls()
    raise ValueError(f"unknown pass {name!r}; known passes: {', '.join(pass_names())}")
