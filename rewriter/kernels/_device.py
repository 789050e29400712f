"""Device facts the kernels' launchers read on every call, looked up once per device."""

import functools

import torch


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, looked up once per device (it is read on every launch)."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())
