"""What the launchers may ask about a device: SM count, compute capability, and the guard that
makes it current. The only place they ask, so the AOT check can patch these for each target
architecture (a leaf module)."""
from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch


@functools.lru_cache(maxsize=16)
def _cuda_props(index: int):
    return torch.cuda.get_device_properties(index)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``."""
    if device.type != "cuda":
        return 4  # interpreter / meta: a small persistent grid
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count


def device_capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) compute capability of ``device``."""
    if device.type != "cuda":
        return (0, 0)
    p = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return (p.major, p.minor)


def device_guard(device: torch.device):
    """Make ``device`` current (so Triton launches on it and on its current stream); a no-op
    for CPU (interpreter) and meta tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
