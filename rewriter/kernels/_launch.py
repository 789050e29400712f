"""A short launch path for this package's Triton kernels (``launch(fn, grid, *args, **kwargs)``).

``fn[grid](*args, **kwargs)`` does a lot of Python on every call. The autotuner rebuilds its key
from every argument (a list-membership test per argument, then a ``hasattr`` per argument). The
heuristics evaluate their lambdas over a fresh dict of every argument. Triton's binder then
specializes each argument, and ``JITFunction.run`` re-checks every global the kernel read when it
was compiled. For the attention kernels (40-odd arguments, autotuned, with heuristics) this path
saves 250-400 us of the 1.1-1.4 ms of host time an eager forward+backward (three or four
launches) took on the H100 host, where SDPA's whole forward+backward takes 0.15-0.2 ms
(``benchmarks/results/attention_host_launch_h100.txt``). An eager call that runs for less than
that on the GPU waits on the host.

Everything those steps compute is fixed by the launch's *signature*: the device; the type and
value of every non-tensor argument; the dtype and 16-byte alignment of every tensor argument
(all that Triton specializes a tensor on), and its shape and strides (which heuristics might
read); the dtype, shape, strides, block shape and layout of every tensor descriptor; and the
keyword arguments. So when a signature comes
back (its second launch, through Triton's own path), this module remembers the compiled kernel
and the values of every parameter the call did not pass (the autotuner's chosen config, the
heuristics' values, the defaults); from the third launch on, that kernel's launcher is called
directly. (Remembering on first sight would cost every call whose signature never returns, such
as a decode step's with a growing cache, the extra binding.) The
grid is evaluated on every launch, since it can depend on things outside the signature (a value
captured by the grid function, say).

Launches take Triton's own path when:

- the signature is new, or seen once: the first launch, which compiles or autotunes, and the
  second, after which the signature is remembered;
- an argument is of a kind this module does not know;
- a config has a pre-hook, or the kernel has pre-run hooks;
- Triton runs in interpreter mode;
- the kernel is still compiling in the background.

An unexpected error turns the short path off for the process.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # Triton's launch internals; absent (another Triton version): always Triton's own path
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.autotuner import Autotuner as _Autotuner
    from triton.runtime.autotuner import Heuristics as _Heuristics
    from triton.runtime.jit import JITFunction as _JITFunction
    from triton.runtime.jit import compute_cache_key as _compute_cache_key
except ImportError:  # pragma: no cover - another Triton version
    _knobs = _driver = _Autotuner = _Heuristics = _JITFunction = _compute_cache_key = None

__all__ = ["launch", "plain_eager", "row_strides"]

ENABLED = True  # turned off for the process by an unexpected error in the short path
LAUNCHES = 0  # launches made by the short path (for tests and benchmarks)
_MEMO: dict = {}  # signature -> what the short path needs, or None once seen
_MEMO_MAX = 4096  # signatures remembered; the memo is emptied when full (dynamic shapes)


class _Mark:
    """A memo entry that is not a launch plan (false in a test, like None)."""

    def __bool__(self):
        return False


_UNSEEN = _Mark()  # a signature not in the memo
_NEVER = _Mark()  # a signature the short path cannot stand in for (see resolve)
_SIMPLE = (int, float, bool, str, type(None))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _simple_key(v):
    return (v.__class__, v)


def _tensor_key(v):
    # Triton specializes a tensor on its dtype and alignment alone; the shape and strides are
    # here for heuristics and autotuning keys that might read them (none of this package's do).
    return (v.dtype, v.data_ptr() % 16 == 0, v.shape, v.stride())


def _value_key(v: Any):
    """What Triton's specialization can depend on for one argument, or ``...`` if unknown.

    The type is part of the key: ``1``, ``True`` and ``1.0`` are equal in Python but specialize
    differently (i32, i1, fp32)."""
    if isinstance(v, torch.Tensor):
        return _tensor_key(v)
    if isinstance(v, _SIMPLE):
        return _simple_key(v)
    if v.__class__.__name__ == "TensorDescriptor":  # host TMA descriptors (Triton's and Gluon's)
        try:
            key = (v.__class__, v.base.dtype, v.base.data_ptr() % 16 == 0, tuple(v.shape),
                   tuple(v.strides), tuple(v.block_shape), v.layout, v.padding)
            hash(key)  # an unhashable layout: Triton's own path
            return key
        except (AttributeError, TypeError):
            return ...
    return ...


_KEYS = {torch.Tensor: _tensor_key, int: _simple_key, float: _simple_key, bool: _simple_key,
         str: _simple_key, type(None): _simple_key}


def signature(args: tuple, kwargs: dict) -> Optional[tuple]:
    """The launch signature of ``args`` and ``kwargs`` (see the module docstring), or None if an
    argument is of a kind this module does not know."""
    try:  # the common kinds, by exact type
        return (tuple([_KEYS[v.__class__](v) for v in args]),
                tuple([(n, _KEYS[v.__class__](v)) for n, v in kwargs.items()]))
    except KeyError:  # a subclass or another kind: one at a time
        pass
    keys = [_value_key(v) for v in args]
    named = [(n, _value_key(v)) for n, v in kwargs.items()]
    if any(k is ... for k in keys) or any(k is ... for _, k in named):
        return None
    return (tuple(keys), tuple(named))


def row_strides(*tensors: torch.Tensor) -> tuple:
    """The (batch, head, row) strides of each (B, H, S, D) tensor, one after another: the stride
    arguments of the attention kernels (their head dim is unit-stride)."""
    return tuple(st for t in tensors for st in t.stride()[:3])


def plain_eager(*tensors) -> bool:
    """True when every tensor given (None skipped) is an ordinary tensor in eager execution:
    nothing traces or transforms the call (no Dynamo, no dispatch mode such as a fake-tensor or
    functionalization mode, no functorch wrapper), so an op's implementation can run without the
    dispatcher."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (type(t) is torch.Tensor
                             and not torch._C._functorch.is_functorch_wrapped_tensor(t))
               for t in tensors)


def resolve(fn, args: tuple, kwargs: dict):
    """``(jit_fn, kwargs)``: the JIT function under ``fn``'s autotuner and heuristics, and every
    keyword argument its last launch through ``fn`` with these arguments received (the call's,
    the autotuner's config for them, the heuristics' values). None where the short path cannot
    stand in for the decorators (a config pre-hook, pre-run hooks, a wrapper it does not know)."""
    full = dict(kwargs)
    if isinstance(fn, _Autotuner):
        config = fn.best_config
        if config is None or config.pre_hook is not None:
            return None
        full.update(config.all_kwargs())
        fn = fn.fn
    while isinstance(fn, _Heuristics):
        named = dict(zip(fn.arg_names, args))
        for name, heur in fn.values.items():
            full[name] = heur({**named, **full})
        fn = fn.fn
    if not isinstance(fn, _JITFunction) or fn.pre_run_hooks:
        return None
    return fn, full


def _remember(fn, key, args: tuple, kwargs: dict) -> None:
    """After a launch through Triton's own path: remember what the short path needs for ``key``."""
    resolved = resolve(fn, args, kwargs)
    if resolved is None:
        _store(key, _NEVER)
        return
    jit_fn, full = resolved
    device = key[1]
    caches = jit_fn.device_caches.get(device)
    if caches is None:
        return
    kernel_cache, key_cache, _, _, binder = caches
    full["debug"] = full.get("debug", jit_fn.debug) or _knobs.runtime.debug
    full["instrumentation_mode"] = _knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **full)
    kernel = kernel_cache.get(_compute_cache_key(key_cache, specialization, options))
    if kernel is None or hasattr(kernel, "result"):  # not compiled, or compiling in the background
        return
    values = list(bound.values())
    _store(key, (kernel, tuple(bound.keys()), tuple(values[len(args):])))


def _store(key, value) -> None:
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.clear()
    _MEMO[key] = value


def launch(fn, grid, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``, by the short path once two launches with the same
    signature have gone through Triton's own path (see the module docstring)."""
    global ENABLED, LAUNCHES
    key, hit = None, _UNSEEN
    if ENABLED and _knobs is not None and not _interpreting():
        try:
            sig = signature(args, kwargs)
            if sig is not None:
                device = _driver.active.get_current_device()
                key = (id(fn), device, _knobs.runtime.debug,
                       _knobs.compilation.instrumentation_mode, sig)
                hit = _MEMO.get(key, _UNSEEN)
                if hit:  # (kernel, names, tail); None (seen once), _NEVER and _UNSEEN are false
                    kernel, names, tail = hit
                    values = (*args, *tail)
                    g = grid(dict(zip(names, values))) if callable(grid) else grid
                    g3 = tuple(g) + (1, 1)
                    stream = _driver.active.get_current_stream(device)
                    kernel.run(g3[0], g3[1], g3[2], stream, kernel.function,
                               kernel.packed_metadata, kernel.launch_metadata(g, stream, *values),
                               _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook,
                               *values)
                    LAUNCHES += 1
                    return
        except Exception:  # noqa: BLE001 - another Triton version: its own path from now on
            ENABLED = False
            key = None
    fn[grid](*args, **kwargs)
    if key is not None and ENABLED and hit is not _NEVER:
        if hit is _UNSEEN:  # first sighting: only noted (a signature seen once, such as a
            _store(key, None)  # growing decode cache's, would pay for remembering every call)
            return
        try:
            _remember(fn, key, args, kwargs)
        except Exception:  # noqa: BLE001 - as above
            ENABLED = False
