"""Orthonormal regularizer on a model's SORSA adapters: value and in-place gradient."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import _backend
from .ops.ortho import OP, calc_ortho_naive, ortho_torch_

NamedParams = Iterable[Tuple[str, torch.Tensor]]


def _adapters(model_or_params: Union[nn.Module, NamedParams]) -> Tuple[List[torch.Tensor], List[bool]]:
    named = model_or_params.named_parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    mats, is_b = [], []
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("model_or_params must be an nn.Module or an iterable of (name, parameter) pairs")
        name, p = item
        if "sorsa_A" in name or "sorsa_B" in name:
            if p.dim() != 2:
                raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(p.shape)}")
            mats.append(p)
            is_b.append("sorsa_B" in name and "sorsa_A" not in name)
    return mats, is_b


def calc_ortho(model: nn.Module) -> Optional[torch.Tensor]:
    """Mean over all ``sorsa_A``/``sorsa_B`` of ``‖AAᵀ−I‖_F`` / ``‖BᵀB−I‖_F``, as sorsa 1.0.1.

    Differentiable (backward through it is the reference's way of applying the
    regularizer); ``None`` when the model has no adapters. :func:`orthonormal_grad_`
    does the same job without an autograd graph.
    """
    return calc_ortho_naive(model.named_parameters())


@torch.no_grad()
def orthonormal_grad_(
    model_or_params: Union[nn.Module, NamedParams],
    gamma: float,
    lr: float,
    *,
    squared: bool = False,
    backend: str = "auto",
) -> Optional[float]:
    """Add the gradient of ``(gamma / lr) · calc_ortho(model)`` to every adapter's ``.grad``.

    Call after the task loss's ``backward()`` (and any gradient clipping), before
    ``optimizer.step()``. ``.grad`` is created where it is None; parameters with
    ``requires_grad=False`` count in the mean but get no gradient (as with autograd).
    Math is fp32 whatever the parameter dtype.

    Args:
        model_or_params: a module, or ``(name, parameter)`` pairs; names containing
            ``sorsa_A`` / ``sorsa_B`` are the adapters.
        gamma: regularizer weight; lr: current learning rate (the reference scales by gamma/lr).
        squared: use ``‖·‖_F²`` instead of ``‖·‖_F``.
        backend: "auto" | "torch" | "triton".

    Returns:
        The regularizer's value (before the gamma/lr factor), or None without adapters.
    """
    gamma, lr = float(gamma), float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    mats, is_b = _adapters(model_or_params)
    if not mats:
        return None
    impl = _IMPLS[_backend.resolve(OP, backend, mats[0].device)]
    vals = impl(mats, is_b, squared, gamma / (lr * len(mats)))
    return float(vals.double().mean())


_IMPLS = {"torch": ortho_torch_}
if _backend.triton_status()[0]:
    from .kernels.ortho_launch import ortho_triton_

    _IMPLS["triton"] = ortho_triton_
    _backend.register(OP, "triton")
