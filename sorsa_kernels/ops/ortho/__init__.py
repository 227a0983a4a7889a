"""Orthonormal regularizer: ``reg = mean_i ‖A_i·A_iᵀ − I‖_F`` over every ``A``-like matrix
(rows orthonormal, r × in: SORSA's ``sorsa_A``, PEFT's ``lora_A.weight``) and
``‖B_iᵀ·B_i − I‖_F`` over every ``B``-like matrix (columns orthonormal, out × r: ``sorsa_B``,
``lora_B.weight``); ``squared=True``: ``‖·‖_F²``.

Gradients (E symmetric): ``d‖E‖/dA = 2·E·A/‖E‖`` and ``d‖E‖/dB = 2·B·E/‖E‖``;
squared: ``4·E·A`` and ``4·B·E``. ``‖E‖ = 0`` gives a zero gradient, never NaN.

The reference is in :mod:`.reference`, the torch path in :mod:`.torch_path`, the Triton kernels
and launcher in :mod:`.kernels` / :mod:`.launch`, backend choice and autograd in :mod:`.op`; the
model-level API (``ortho_loss``, ``orthonormal_grad_``) is :mod:`sorsa_kernels.regularizer`.
"""
from __future__ import annotations

import torch

from ... import _backend
from .op import OP
from .reference import calc_ortho_naive, grad_coefs

SPEC = _backend.register(_backend.OpSpec(
    name=OP, doc="orthonormal regularizer: mean ‖A·Aᵀ−I‖_F, ‖Bᵀ·B−I‖_F and its gradient, over all adapters",
    impls={"triton": (torch.float16, torch.bfloat16, torch.float32)},
    check="sorsa_kernels.ops.ortho.check", aot="sorsa_kernels.ops.ortho.aot",
    bench="sorsa_kernels.ops.ortho.bench"))

__all__ = ["calc_ortho_naive", "grad_coefs", "OP", "SPEC"]
