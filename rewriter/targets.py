"""Models to run the optimizer on from the command line: ``hf:MODEL_TYPE`` or ``file.py:factory``.

``hf:gpt2`` builds a transformers model offline from that model type's default configuration with
random weights and eager attention (what users get when they do not ask for SDPA), optionally
shrunk. ``path/to/file.py:factory`` imports the file and calls ``factory()``, which returns
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Target", "load_target", "hf_model"]

# transformers config fields for each size knob, across model families.
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_HEADS = ("num_attention_heads", "n_head")
_KV_HEADS = ("num_key_value_heads",)


@dataclass
class Target:
    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict


def _set(cfg: Any, names: tuple[str, ...], value: Any) -> None:
    for n in names:
        if hasattr(cfg, n):
            setattr(cfg, n, value)


def hf_model(model_type: str, *, layers: int | None = None, hidden: int | None = None, heads: int | None = None,
             kv_heads: int | None = None, vocab: int | None = None, **overrides: Any) -> torch.nn.Module:
    """A transformers base model of ``model_type`` from its default config, random weights, eager attention."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("hf: targets need transformers: pip install 'rewriter[transformers]'") from exc
    try:
        cfg = AutoConfig.for_model(model_type)
    except ValueError as exc:
        raise ValueError(f"unknown transformers model type {model_type!r}: {exc}") from None
    if layers is not None:
        _set(cfg, _LAYERS, layers)
    if heads is not None:
        _set(cfg, _HEADS, heads)
    if hidden is not None:
        _set(cfg, _HIDDEN, hidden)
        n_heads = next((getattr(cfg, n) for n in _HEADS if hasattr(cfg, n)), None)
        # (Multi-head latent attention sets its head sizes apart from the hidden size, and calls
        # its rotary size head_dim: left as they are.)
        if n_heads and getattr(cfg, "head_dim", None) and not hasattr(cfg, "qk_rope_head_dim"):
            try:
                cfg.head_dim = hidden // n_heads
            except AttributeError:  # a read-only property that follows hidden / heads (Falcon)
                pass
        if n_heads and getattr(cfg, "rotary_dim", None):
            # GPT-J, CodeGen: rotary on the first rotary_dim channels of a head, at most all of them.
            cfg.rotary_dim = min(cfg.rotary_dim, hidden // n_heads)
        if getattr(cfg, "intermediate_size", None):
            cfg.intermediate_size = 4 * hidden  # n_inner=None already means 4 * hidden (GPT-2)
    if kv_heads is not None:
        _set(cfg, _KV_HEADS, kv_heads)
    elif heads is not None and getattr(cfg, "num_key_value_heads", None):
        cfg.num_key_value_heads = max(1, min(cfg.num_key_value_heads, heads))
        while heads % cfg.num_key_value_heads:
            cfg.num_key_value_heads -= 1
    if vocab is not None:
        cfg.vocab_size = vocab
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AutoModel.from_config(cfg, attn_implementation="eager")


def _load_file(spec: str) -> Target:
    path, _, factory = spec.rpartition(":")
    if not path or not factory:
        raise ValueError(f"expected path/to/file.py:factory, got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"no such file: {path}")
    mod_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules.setdefault(file.stem, module)
    mod_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ValueError(f"{path} has no callable {factory!r}")
    out = fn()
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ValueError(f"{factory}() must return (model, example_inputs[, example_kwargs])")
    model, args = out[0], out[1]
    kwargs = out[2] if len(out) == 3 else {}
    if isinstance(args, torch.Tensor):
        args = (args,)
    return Target(spec, model, tuple(args), dict(kwargs))


def load_target(spec: str, *, batch: int = 1, seq: int = 128, layers: int | None = None, hidden: int | None = None,
                heads: int | None = None) -> Target:
    """Build the model and example inputs that ``spec`` names."""
    if spec.startswith("hf:"):
        model_type = spec[3:]
        model = hf_model(model_type, layers=layers, hidden=hidden, heads=heads)
        vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
        ids = torch.randint(0, vocab, (batch, seq))
        return Target(spec, model.eval(), (ids,), {})
    return _load_file(spec)
