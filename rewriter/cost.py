"""Cost model: device specs and roofline estimates, in one place. Passes ask; they carry no numbers.

Assumptions (first version):

* A kernel takes ``max(flops / matrix_rate, bytes / bandwidth)``; a sequence of kernels takes the
  sum. Launch overhead is ignored, so estimates for tiny shapes are optimistic for both sides.
* Rates are measured, not datasheet: bf16/fp16 dense GEMM 798 TFLOP/s on H100 SXM and 788 on
  H200, device copies at 3.0 and 4.3 TB/s (see ANCHORS); A100 uses 80% of its datasheet figures.
  fp32 matrix work runs at the TF32 rate when ``torch.backends.cuda.matmul.allow_tf32`` is set,
  else at the plain fp32 vector rate.
* Eager attention writes the S x S scores from the first GEMM, reads and writes them once per
  elementwise op and the softmax, and reads them again in the second GEMM. Under Inductor the
  elementwise ops and the softmax fuse into one read and one write (plus reading the mask).
* A fused attention kernel reads Q, K, V (and a kept mask) once and writes O once. Its matrix work
  runs at ``fused_attention_efficiency`` of the GEMM rate (SDPA is_causal reached 512 TFLOP/s
  against 788 for a GEMM on H200: 0.65) and skips the masked half under a causal mask.
* Devices not in the table (CPUs included) get no estimate; the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DeviceSpec", "DEVICES", "device_spec", "Estimate", "attention_estimate", "kernel_time",
           "dtype_bytes", "LinearTable", "linear_table", "device_slug"]


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    matrix_tflops: float  # bf16 / fp16 dense GEMM, measured
    tf32_tflops: float
    fp32_tflops: float  # vector (non-tensor-core) fp32
    fp8_tflops: float
    bandwidth_tbps: float  # device memory, measured copy bandwidth
    fused_attention_efficiency: float = 0.65
    # The defaults are the H200's. Our Triton FlashAttention kernel: 0.82-0.85x of SDPA's
    # throughput on H200 (D=128, S=4096, causal and plain, forward; benchmarks/results/
    # attention_nvidia-h200*.md, kernels of the first rounds), so 0.65 * 0.83.
    triton_attention_efficiency: float = 0.54
    # FlexAttention: 363-365 TFLOP/s against SDPA's 508-536 on causal D=128 S=4096 (H200, same runs):
    # 0.68 of SDPA, so 0.65 * 0.68.
    flex_attention_efficiency: float = 0.44

    def matrix_rate(self, dtype: torch.dtype) -> float:
        """FLOP/s for matrix work in ``dtype``."""
        if dtype in (torch.float16, torch.bfloat16):
            return self.matrix_tflops * 1e12
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return self.fp8_tflops * 1e12
        if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            return self.tf32_tflops * 1e12
        return self.fp32_tflops * 1e12


DEVICES: dict[str, DeviceSpec] = {
    # H100 attention efficiencies from the H100 table (D = 128, S = 4096, causal and plain,
    # forward, CUDA-graph times; benchmarks/results/attention_nvidia-h100-80gb-hbm3_full_d128a.md):
    # SDPA 522 / 612 TFLOP/s (0.65 of the GEMM rate); ours 0.92x / 0.90x of SDPA, so 0.65 * 0.91;
    # Flex 0.70x / 0.75x, so 0.65 * 0.73.
    "H100": DeviceSpec("H100", 798.0, 400.0, 60.0, 1500.0, 3.0, fused_attention_efficiency=0.65,
                       triton_attention_efficiency=0.59, flex_attention_efficiency=0.47),
    "H200": DeviceSpec("H200", 788.0, 400.0, 60.0, 1500.0, 4.3),
    "A100": DeviceSpec("A100", 250.0, 125.0, 15.6, 0.0, 1.6),
}


def device_spec(device: str | torch.device | None) -> DeviceSpec | None:
    """The spec for a device name (``"H100"``, ``"NVIDIA H200"``) or a torch device; None if unknown."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        device = torch.cuda.get_device_name(device)
    name = str(device).upper()
    for key, spec in DEVICES.items():
        if key in name:
            return spec
    return None


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kernel_time(flops: float, nbytes: float, spec: DeviceSpec, dtype: torch.dtype, efficiency: float = 1.0) -> float:
    """Roofline seconds for one kernel."""
    return max(flops / (spec.matrix_rate(dtype) * efficiency), nbytes / (spec.bandwidth_tbps * 1e12))


@dataclass
class Estimate:
    flops_before: float
    bytes_before: float
    flops_after: float
    bytes_after: float
    seconds_before: float | None = None
    seconds_after: float | None = None

    @property
    def speedup(self) -> float | None:
        if not self.seconds_before or not self.seconds_after:
            return None
        return self.seconds_before / self.seconds_after

    @property
    def saved_ms(self) -> float | None:
        if self.seconds_before is None or self.seconds_after is None:
            return None
        return (self.seconds_before - self.seconds_after) * 1e3


def attention_estimate(
    spec: DeviceSpec | None,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    value_dim: int,
    kv_batch: int,
    dtype: torch.dtype,
    score_dtype: torch.dtype,
    score_ops: int,
    mask_elems: int,
    mask_kept: bool,
    visible_fraction: float,
    inductor: bool,
    efficiency: str | None = None,
) -> Estimate:
    """Eager (or Inductor-fused) matmul-softmax-matmul against one fused attention kernel.

    ``batch`` counts query (batch x head) slices, ``kv_batch`` the distinct K/V slices (fewer under
    GQA). ``score_ops`` is the number of elementwise ops between the products, the softmax included.
    ``visible_fraction`` is the share of score entries the fused kernel computes (it skips blocks a
    causal or window mask removes); ``efficiency="triton"`` / ``"flex"`` rates our kernel or
    FlexAttention instead of SDPA.
    """
    e, es = dtype_bytes(dtype), dtype_bytes(score_dtype)
    scores = batch * q_len * kv_len
    qkvo = (batch * q_len * head_dim + kv_batch * kv_len * (head_dim + value_dim) + batch * q_len * value_dim) * e
    mask_bytes = mask_elems * es
    gemm1 = 2.0 * scores * head_dim
    gemm2 = 2.0 * scores * value_dim
    flops = gemm1 + gemm2 + 5.0 * scores
    passes = 2 if inductor else 2 * max(score_ops, 1)
    bytes_before = qkvo + scores * es * (2 + passes) + mask_bytes
    frac = visible_fraction
    bytes_after = qkvo + (mask_bytes if mask_kept else 0)
    est = Estimate(flops, bytes_before, flops * frac, bytes_after)
    if spec is None:
        return est
    g1_bytes = (batch * q_len * head_dim + kv_batch * kv_len * head_dim) * e + scores * es
    g2_bytes = scores * es + (kv_batch * kv_len * value_dim + batch * q_len * value_dim) * e
    mid = scores * es * passes + mask_bytes
    est.seconds_before = (kernel_time(gemm1, g1_bytes, spec, dtype) + kernel_time(gemm2, g2_bytes, spec, dtype)
                          + mid / (spec.bandwidth_tbps * 1e12))
    eff = {"triton": spec.triton_attention_efficiency, "flex": spec.flex_attention_efficiency}.get(
        efficiency or "", spec.fused_attention_efficiency)
    est.seconds_after = kernel_time(flops * frac, bytes_after, spec, dtype, eff)
    return est


# ---- linear layers: measured GEMM times per device ---------------------------------------------
#
# Whether a lossy linear rewrite pays depends on the shape far more than any roofline says
# (torchao FP8 is 15x slower than bf16 at M=16 and 1.9x faster at M=8192 on an H200). So linear
# passes decide from a table of times measured on the device by ``benchmarks/linear.py --table``
# and committed under ``rewriter/data/linear_<device>.json``. Each row holds one (M, K, N) and a
# time in ms per variant (``bf16``, ``fp8``, ``sparse24``, ``nvfp4``, ...). Between measured M the
# time is interpolated linearly in log M; (K, N) must be in the table (nearest in log distance
# otherwise, and the answer says how far it had to look).

import json
import math as _math
from pathlib import Path

_DATA = Path(__file__).parent / "data"


@dataclass
class LinearTable:
    device: str
    rows: list[dict]
    source: str = ""

    def shapes(self) -> set[tuple[int, int]]:
        return {(int(r["K"]), int(r["N"])) for r in self.rows}

    def time_ms(self, variant: str, m: int, k: int, n: int) -> tuple[float | None, str]:
        """Interpolated time of ``variant`` at (m, k, n) and a note on how it was found."""
        if not self.rows:
            return None, "empty table"
        kn = min(self.shapes(), key=lambda s: abs(_math.log(s[0] / k)) + abs(_math.log(s[1] / n)))
        note = "" if kn == (k, n) else f"nearest measured shape K={kn[0]} N={kn[1]}"
        pts = sorted((int(r["M"]), r.get(f"{variant}_ms")) for r in self.rows if (int(r["K"]), int(r["N"])) == kn)
        pts = [(mm, t) for mm, t in pts if t is not None]
        if not pts:
            return None, f"no {variant} measurement"
        scale = (k * n) / (kn[0] * kn[1])
        if m <= pts[0][0]:
            return pts[0][1] * scale, note
        if m >= pts[-1][0]:
            return pts[-1][1] * scale * (m / pts[-1][0]), note  # beyond the table: linear in M
        for (m0, t0), (m1, t1) in zip(pts, pts[1:]):
            if m0 <= m <= m1:
                w = (_math.log(m) - _math.log(m0)) / (_math.log(m1) - _math.log(m0))
                return (t0 + w * (t1 - t0)) * scale, note
        return None, "no bracket"

    def predict(self, variant: str, shapes: list[tuple[int, int, int]],
                baseline: str = "bf16") -> tuple[float | None, float | None, str]:
        """(speedup, saved ms, note) of ``variant`` over ``baseline`` for a layer called at each of
        ``shapes`` (M, K, N): times summed over the calls, each at its own M, so a layer called once
        large and once small is judged on the total. The note says where the table used another shape."""
        before = after = 0.0
        note = ""
        for shape in shapes:
            t_old, _ = self.time_ms(baseline, *shape)
            t_new, note = self.time_ms(variant, *shape)
            if t_old is None or t_new is None or t_new <= 0:
                return None, None, note
            before, after = before + t_old, after + t_new
        return before / after, before - after, note

    def speedup(self, variant: str, m: int, k: int, n: int, baseline: str = "bf16") -> tuple[float | None, str]:
        """Predicted time(baseline) / time(variant) at (m, k, n)."""
        t_new, note = self.time_ms(variant, m, k, n)
        t_old, _ = self.time_ms(baseline, m, k, n)
        if t_new is None or t_old is None or t_new <= 0:
            return None, note or f"no {variant} measurement"
        return t_old / t_new, note


def device_slug(name: str) -> str:
    return name.lower().replace("nvidia ", "").replace(" ", "-")


def linear_table(spec: DeviceSpec | None, path: str | Path | None = None) -> LinearTable | None:
    """The measured linear table for ``spec``'s device (or the file at ``path``), or None."""
    if path is None:
        if spec is None:
            return None
        path = _DATA / f"linear_{device_slug(spec.name)}.json"
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return LinearTable(data.get("device", spec.name if spec else ""), data.get("rows", []), str(path))


# ---- sibling linears as one GEMM ---------------------------------------------------------------
#
# Linears that read the same input (Q/K/V, gate/up) can run as one GEMM over their concatenated
# weights: the same FLOPs and weight bytes, the input read once instead of once per linear, one
# launch instead of several. A roofline does not see launches, so each kernel is charged
# LAUNCH_OVERHEAD_S on top of it. Under that model one GEMM never costs more than its parts (the
# roofline max is subadditive and the fused kernel moves fewer bytes), so without a table the
# answer is always "fuse" and the figures only size the gain. A measured table (bf16/fp16 weights;
# fp16 is read from the bf16 column) can say otherwise, e.g. where the fused width falls badly on
# tiles or waves, and then decides.

LAUNCH_OVERHEAD_S = 4e-6  # assumed per-kernel cost (launch and tail); not measured in this project

__all__ += ["LAUNCH_OVERHEAD_S", "sibling_linear_estimate"]


def sibling_linear_estimate(spec: DeviceSpec | None, table: LinearTable | None, rows: int, in_features: int,
                            out_features: list[int], dtype: torch.dtype, bias: bool) -> tuple[Estimate, str]:
    """Separate GEMMs ``(rows, in_features) x (in_features, n)`` for each ``n`` in ``out_features``
    against one GEMM of width ``sum(out_features)``; returns the estimate and where its times come
    from (``"measured table ..."``, ``"roofline + ... per launch"``, or ``""`` when the device is
    unknown and there are no times).

    Example::

        est, source = sibling_linear_estimate(device_spec("H100"), None, 16, 4096, [4096, 1024, 1024],
                                              torch.bfloat16, bias=False)
        est.speedup  # > 1: the input is read once and two launches are saved
    """
    e = dtype_bytes(dtype)
    n_total = sum(out_features)

    def flops(n: int) -> float:
        return 2.0 * rows * in_features * n + (rows * n if bias else 0)

    def nbytes(n: int) -> float:
        return (rows * in_features + in_features * n + rows * n + (n if bias else 0)) * e

    est = Estimate(sum(flops(n) for n in out_features), sum(nbytes(n) for n in out_features),
                   flops(n_total), nbytes(n_total))
    if table is not None and dtype in (torch.bfloat16, torch.float16):
        fused, note = table.time_ms("bf16", rows, in_features, n_total)
        parts = [table.time_ms("bf16", rows, in_features, n) for n in out_features]
        if fused is not None and all(t is not None for t, _ in parts):
            est.seconds_before = sum(t for t, _ in parts) * 1e-3
            est.seconds_after = fused * 1e-3
            notes = sorted({note, *(n for _, n in parts)} - {""})
            return est, f"measured table {table.source}" + (f" ({'; '.join(notes)})" if notes else "")
    if spec is None:
        return est, ""
    est.seconds_before = sum(kernel_time(flops(n), nbytes(n), spec, dtype) + LAUNCH_OVERHEAD_S for n in out_features)
    est.seconds_after = kernel_time(flops(n_total), nbytes(n_total), spec, dtype) + LAUNCH_OVERHEAD_S
    return est, f"roofline + {LAUNCH_OVERHEAD_S * 1e6:g} us per launch"
