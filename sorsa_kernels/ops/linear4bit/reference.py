"""Plain-torch reference of the 4-bit SORSA linear op: the linear op's formula on the dequantized
residual."""
from __future__ import annotations

from typing import Optional

import torch

from ...quant import dequantize
from ..linear.reference import sorsa_linear_naive


def sorsa_linear_4bit_naive(x: torch.Tensor, weight, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
                            scale: float = 1.0, bias: Optional[torch.Tensor] = None,
                            mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`sorsa_linear_naive` with ``weight = dequantize(weight)`` in ``x``'s dtype (run it in
    float64 for tests: the dequantized values are exact in every float dtype's float64 image)."""
    return sorsa_linear_naive(x, dequantize(weight, x.dtype), A, S, B, scale, bias, mask, dropout_p)
