"""Orthonormal regularizer: ``reg = mean_i ‖A_i·A_iᵀ − I‖_F`` over every ``sorsa_A`` and
``‖B_iᵀ·B_i − I‖_F`` over every ``sorsa_B`` (``squared=True``: ``‖·‖_F²``).

Gradients (E symmetric): ``d‖E‖/dA = 2·E·A/‖E‖`` and ``d‖E‖/dB = 2·B·E/‖E‖``;
squared: ``4·E·A`` and ``4·B·E``. ``‖E‖ = 0`` gives a zero gradient, never NaN.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

OP = "orthonormal_grad"


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


def accumulate_grad_(p: torch.Tensor, g: torch.Tensor) -> None:
    """``p.grad += g`` (cast to p's dtype), creating ``.grad`` where it is None."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.contiguous() if g.shape == p.shape else g.reshape(p.shape)
    else:
        p.grad.add_(g)


def ortho_value_and_grads(
    mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool = False
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Torch backend: per-matrix ``‖E‖`` (fp32, shape (n,)) and d‖E‖/dM (fp32), batched by shape.

    Matrices of one (shape, kind, device) are stacked and handled with ``bmm``, so the cost
    is a few launches per distinct shape instead of several per matrix.
    """
    groups = defaultdict(list)
    for i, (m, b) in enumerate(zip(mats, is_b)):
        groups[(tuple(m.shape), bool(b), m.device)].append(i)
    norms: List[Optional[torch.Tensor]] = [None] * len(mats)
    grads: List[Optional[torch.Tensor]] = [None] * len(mats)
    for (shape, b, device), idx in groups.items():
        M = torch.stack([mats[i].detach().to(torch.float32) for i in idx])  # (k, rows, cols)
        r = shape[1] if b else shape[0]
        G = torch.bmm(M.transpose(1, 2), M) if b else torch.bmm(M, M.transpose(1, 2))
        E = G - torch.eye(r, device=device, dtype=torch.float32)
        n = torch.linalg.matrix_norm(E, "fro")  # (k,)
        if squared:
            coef = torch.full_like(n, 4.0)
        else:
            coef = torch.where(n > 0, 2.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
        g = torch.bmm(M, E) if b else torch.bmm(E, M)
        g = g * coef[:, None, None]
        val = n * n if squared else n
        for j, i in enumerate(idx):
            norms[i], grads[i] = val[j], g[j]
    return torch.stack(norms) if norms else torch.zeros(0), grads  # type: ignore[return-value]


def ortho_torch_(mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool, coef: float) -> torch.Tensor:
    """Torch backend of the in-place step: values, and ``coef ·`` gradient into each ``.grad``."""
    vals, grads = ortho_value_and_grads(mats, is_b, squared)
    for p, g in zip(mats, grads):
        if p.requires_grad:
            accumulate_grad_(p, g * coef)
    return vals
