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
           "dtype_bytes"]


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    matrix_tflops: float  # bf16 / fp16 dense GEMM, measured
    tf32_tflops: float
    fp32_tflops: float  # vector (non-tensor-core) fp32
    fp8_tflops: float
    bandwidth_tbps: float  # device memory, measured copy bandwidth
    fused_attention_efficiency: float = 0.65

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
    "H100": DeviceSpec("H100", 798.0, 400.0, 60.0, 1500.0, 3.0),
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
    causal: bool,
    inductor: bool,
) -> Estimate:
    """Eager (or Inductor-fused) matmul-softmax-matmul against one fused attention kernel.

    ``batch`` counts query (batch x head) slices, ``kv_batch`` the distinct K/V slices (fewer under
    GQA). ``score_ops`` is the number of elementwise ops between the products, the softmax included.
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
    frac = 0.5 if causal else 1.0
    bytes_after = qkvo + (mask_bytes if mask_kept else 0)
    est = Estimate(flops, bytes_before, flops * frac, bytes_after)
    if spec is None:
        return est
    g1_bytes = (batch * q_len * head_dim + kv_batch * kv_len * head_dim) * e + scores * es
    g2_bytes = scores * es + (kv_batch * kv_len * value_dim + batch * q_len * value_dim) * e
    mid = scores * es * passes + mask_bytes
    est.seconds_before = (kernel_time(gemm1, g1_bytes, spec, dtype) + kernel_time(gemm2, g2_bytes, spec, dtype)
                          + mid / (spec.bandwidth_tbps * 1e12))
    est.seconds_after = kernel_time(flops * frac, bytes_after, spec, dtype, spec.fused_attention_efficiency)
    return est
