"""The short launch path (rewriter/kernels/_launch.py) against Triton's own launch path.

On the CPU, Triton's own ``fn[grid](...)`` runs for real (autotuner, heuristics, binder, cache
lookup) over a stand-in driver and a stand-in compiled kernel that records how it was launched;
the short path must launch the same kernel with the same grid and arguments."""

import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.jit as tjit
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from rewriter.kernels import _launch


def _body(X, Y, n, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    pass


class _Kernel:
    """A compiled kernel as the launcher sees it: records every launch."""

    function = "function"
    packed_metadata = "packed"

    def __init__(self, key, calls):
        self.key, self.calls = key, calls

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, exit_, *values):
        self.calls.append((self, (g0, g1, g2), stream, values))


class _Cache(dict):
    """Triton's per-device kernel cache, handing out one stand-in kernel per cache key."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def get(self, key, default=None):
        return self.setdefault(key, _Kernel(key, self.calls))


class _Active:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


class _Driver:
    active = _Active()


CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4)]


@pytest.fixture
def kernel(monkeypatch):
    """An autotuned kernel with a heuristic, set up to launch on the stand-in driver; returns
    ``(fn, calls)``."""
    calls = []
    jit = JITFunction(_body)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    jit.device_caches = {0: (_Cache(calls), {}, None, BaseBackend, binder)}
    heur = triton.heuristics({"EVEN": lambda a: a["n"] % a["BLOCK"] == 0})(jit)
    fn = triton.autotune(configs=CONFIGS, key=["n"])(heur)
    # The autotuner's choice per key (as if tuned): 64-wide blocks for n = 1000, 32 otherwise.
    for n in (1000, 96, 7):
        for dtype in ("torch.bfloat16", "torch.float32"):
            fn.cache[(n, dtype, dtype)] = CONFIGS[1] if n == 1000 else CONFIGS[0]
    monkeypatch.setattr(tjit, "driver", _Driver())
    monkeypatch.setattr(_launch, "_driver", _Driver())
    monkeypatch.setattr(_launch, "_interpreting", lambda: False)
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "_MEMO", {})
    return fn, calls


def _grid(batch):
    return lambda m: (triton.cdiv(m["n"], m["BLOCK"]), batch)


def test_short_path_launches_what_triton_launches(kernel):
    fn, calls = kernel
    x = torch.zeros(2048, dtype=torch.bfloat16)
    y = torch.zeros(2048, dtype=torch.bfloat16)
    before = _launch.LAUNCHES
    _launch.launch(fn, _grid(3), x, y, 1000, 0.5, FLAG=True)      # Triton's path: noted
    assert _launch.LAUNCHES == before and _launch._MEMO and not any(_launch._MEMO.values())
    _launch.launch(fn, _grid(3), x, y, 1000, 0.5, FLAG=True)      # Triton's path: remembered
    assert _launch.LAUNCHES == before
    _launch.launch(fn, _grid(3), x, y, 1000, 0.5, FLAG=True)      # short path
    assert _launch.LAUNCHES == before + 1
    (k1, g1, s1, v1), (k2, g2, s2, v2), (k3, g3, s3, v3) = calls
    assert k1 is k2 is k3 and s1 == s2 == s3 == 1234
    assert g1 == g2 == g3 == (16, 3, 1)  # the autotuner's 64-wide config for n = 1000
    # Every parameter, positional, config and heuristic (1000 % 64 != 0), in the same order.
    assert v1 == v2 == v3 and v1[2:] == (1000, 0.5, True, 64, False)
    assert v3[0] is x and v3[1] is y


def test_grid_is_evaluated_on_every_launch(kernel):
    # Nothing in the signature changes with the batch (a pointer's size is invisible to it), so
    # the grid must be recomputed from the call, never remembered.
    fn, calls = kernel
    x = torch.zeros(64, dtype=torch.float32)
    before = _launch.LAUNCHES
    _launch.launch(fn, _grid(2), x, x, 96, 1.0, FLAG=False)
    _launch.launch(fn, _grid(2), x, x, 96, 1.0, FLAG=False)
    _launch.launch(fn, _grid(5), x, x, 96, 1.0, FLAG=False)
    assert _launch.LAUNCHES == before + 1  # the last by the short path
    assert [c[1] for c in calls] == [(3, 2, 1), (3, 2, 1), (3, 5, 1)]
    assert calls[2][3][-3:] == (False, 32, True)  # 96 % 32 == 0


def test_signature_changes_take_tritons_path(kernel, monkeypatch):
    fn, calls = kernel
    base = torch.zeros(4096, dtype=torch.bfloat16)
    aligned, shifted = base[:2048], base[1:2049]  # 2-byte offset: not 16-byte aligned
    seen = []
    real = fn.run

    def counting_run(*args, **kwargs):
        seen.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, "run", counting_run)
    for _ in range(2):  # twice each: every signature remembered
        _launch.launch(fn, _grid(1), aligned, aligned, 1000, 0.5, FLAG=True)
        _launch.launch(fn, _grid(1), shifted, aligned, 1000, 0.5, FLAG=True)  # alignment differs
        _launch.launch(fn, _grid(1), aligned, aligned, 7, 0.5, FLAG=True)     # an int differs
        _launch.launch(fn, _grid(1), aligned, aligned, 1000, 0.5, FLAG=False)  # a keyword differs
    assert len(seen) == 8  # Triton's own path every time
    _launch.launch(fn, _grid(1), shifted, aligned, 1000, 0.5, FLAG=True)
    _launch.launch(fn, _grid(1), aligned, aligned, 7, 0.5, FLAG=True)
    assert len(seen) == 8  # the short path
    # The shifted pointer's launches used their own compiled kernel (another specialization).
    assert calls[8][0] is calls[1][0] and calls[1][0] is not calls[0][0]
    assert calls[9][0] is calls[2][0] and calls[9][3][2] == 7


def test_signature_keeps_types_apart():
    assert _launch.signature((1,), {}) != _launch.signature((True,), {})
    assert _launch.signature((1,), {}) != _launch.signature((1.0,), {})
    t = torch.zeros(16, dtype=torch.float16)
    assert _launch.signature((t,), {}) != _launch.signature((t.float(),), {})
    assert _launch.signature((t,), {}) != _launch.signature((t[1:],), {})
    assert _launch.signature((t.view(4, 4),), {}) != _launch.signature((t,), {})
    assert _launch.signature((t,), {"A": 1}) != _launch.signature((t,), {"B": 1})
    assert _launch.signature((object(),), {}) is None


def test_resolve_unwraps_autotuner_and_heuristics(kernel):
    fn, _ = kernel
    fn.best_config = CONFIGS[1]
    jit, full = _launch.resolve(fn, (None, None, 128, 1.0), {"FLAG": True})
    assert isinstance(jit, JITFunction)
    assert full["BLOCK"] == 64 and full["num_warps"] == 4 and full["EVEN"] is True
    assert full["FLAG"] is True


def test_resolve_refuses_what_it_cannot_stand_in_for(kernel):
    fn, _ = kernel
    fn.best_config = triton.Config({"BLOCK": 32}, pre_hook=lambda args: None)
    assert _launch.resolve(fn, (None, None, 128, 1.0), {}) is None
    fn.best_config = None
    assert _launch.resolve(fn, (None, None, 128, 1.0), {}) is None
    assert _launch.resolve(object(), (), {}) is None


def test_pre_run_hooks_keep_tritons_path(kernel):
    fn, calls = kernel
    hooked = []
    fn.fn.fn.add_pre_run_hook(lambda *a, **k: hooked.append(1))
    x = torch.zeros(64, dtype=torch.float32)
    before = _launch.LAUNCHES
    for _ in range(4):
        _launch.launch(fn, _grid(1), x, x, 96, 1.0, FLAG=False)
    assert len(hooked) == 4 and len(calls) == 4 and _launch.LAUNCHES == before
    assert list(_launch._MEMO.values()) == [_launch._NEVER]  # not retried on every launch


def test_an_unexpected_error_turns_the_short_path_off(kernel, monkeypatch):
    fn, calls = kernel
    x = torch.zeros(64, dtype=torch.float32)
    _launch.launch(fn, _grid(1), x, x, 96, 1.0, FLAG=False)
    _launch.launch(fn, _grid(1), x, x, 96, 1.0, FLAG=False)
    assert len(_launch._MEMO) == 1 and all(_launch._MEMO.values())

    class Changed(_Active):
        def get_current_stream(self, device):
            raise RuntimeError("driver changed")

    class Driver:
        active = Changed()

    monkeypatch.setattr(_launch, "_driver", Driver())
    _launch.launch(fn, _grid(1), x, x, 96, 1.0, FLAG=False)
    assert _launch.ENABLED is False
    assert len(calls) == 3  # the launch still happened, through Triton's own path


def test_off_in_interpreter_mode(monkeypatch):
    launched = []

    class Plain:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append((grid, a, k))

    monkeypatch.setattr(_launch, "_interpreting", lambda: True)
    monkeypatch.setattr(_launch, "_MEMO", {})
    _launch.launch(Plain(), (3,), 1, FLAG=True)
    assert launched == [((3,), (1,), {"FLAG": True})] and not _launch._MEMO


def test_tensor_descriptors_are_keyed_by_their_layout():
    class TensorDescriptor:  # the fields Triton's and Gluon's host descriptors carry
        def __init__(self, base, block, layout):
            self.base, self.shape, self.strides = base, list(base.shape), list(base.stride())
            self.block_shape, self.layout, self.padding = block, layout, "zero"

    t = torch.zeros(64, 32, dtype=torch.bfloat16)
    a = _launch.signature((TensorDescriptor(t, [16, 32], ("swizzle", 64)),), {})
    b = _launch.signature((TensorDescriptor(t, [16, 32], ("swizzle", 128)),), {})
    c = _launch.signature((TensorDescriptor(t, [32, 32], ("swizzle", 64)),), {})
    assert a is not None and len({a, b, c}) == 3
    assert a == _launch.signature((TensorDescriptor(t, [16, 32], ("swizzle", 64)),), {})
    assert _launch.signature((TensorDescriptor(t, [16, 32], ["unhashable"]),), {}) is None


def test_signatures_seen_once_are_not_remembered(kernel, monkeypatch):
    # A decode step with a growing cache brings a new signature every call: each is only noted,
    # never bound a second time for the memo.
    fn, calls = kernel
    remembered = []
    monkeypatch.setattr(_launch, "_remember", lambda *a: remembered.append(a))
    x = torch.zeros(64, dtype=torch.float32)
    for n in (1000, 96, 7):
        _launch.launch(fn, _grid(1), x, x, n, 1.0, FLAG=False)
    assert len(calls) == 3 and remembered == []
    _launch.launch(fn, _grid(1), x, x, 96, 1.0, FLAG=False)
    assert len(remembered) == 1
