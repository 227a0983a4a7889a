"""Plain-torch reference of the orthonormal regularizer (sorsa 1.0.1's formula) and the
per-matrix gradient factor every backend applies."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch


def calc_ortho_naive(named_params: Iterable[Tuple[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """sorsa 1.0.1's ``calc_ortho`` formula, literally (differentiable, one loop step per matrix)."""
    total, den = 0.0, 0
    for name, p in named_params:
        if "sorsa_A" in name:
            total = total + torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0], device=p.device), "fro")
            den += 1
        elif "sorsa_B" in name:
            total = total + torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1], device=p.device), "fro")
            den += 1
    return total / den if den else None


def grad_coefs(norms: torch.Tensor, squared: bool, scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """Per-matrix factor ``c_m`` with ``scale · d reg_m / dM = c_m · (E·A or B·E)`` (fp32, device)."""
    if squared:
        return torch.ones_like(norms) * (4.0 * scale)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, (2.0 * scale) / safe, torch.zeros_like(norms))
