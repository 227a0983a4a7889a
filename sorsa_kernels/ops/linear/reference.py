"""Plain-torch reference of the SORSA linear op: the formula, literally."""
from __future__ import annotations

from typing import Optional

import torch


def sorsa_linear_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    S: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Literal reference of the formula in the operands' dtype (run it in float64 for tests).

    ``mask`` is an explicit keep-mask of ``x``'s shape (dropout is then ``x·mask/(1-p)``),
    so a fused path's dropout can be replayed exactly.
    """
    xd = x if mask is None else x * mask.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.t() + scale * ((xd @ A.t()) * S) @ B.t()
    return y if bias is None else y + bias
