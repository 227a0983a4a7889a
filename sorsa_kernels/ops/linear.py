"""SORSA linear: ``y = x·W_rᵀ + scale·((drop(x)·Aᵀ) ⊙ S)·Bᵀ + bias``.

Dtype rule (all backends): ``x`` and ``weight`` share a dtype (as for ``F.linear``);
the adapters ``A, S, B`` share one dtype that is either ``x``'s dtype or float32
(fp32 "master" adapters next to a bf16/fp16 base). Adapters are cast to ``x``'s dtype
for the matmuls, accumulation is fp32 on the fused path, the output has ``x``'s dtype and
each gradient has its parameter's dtype. ``bias`` has ``x``'s or ``weight``'s dtype.
Under autocast every operand is first cast to the autocast dtype, as ``nn.Linear`` is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend
from .._validate import check_device, check_dropout_p, check_float, check_scale, check_shape

OP = "sorsa_linear"


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


def _autocast(x, weight, A, S, B, bias):
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, A, S, B, bias
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t if t is None or t.dtype == dt else t.to(dt)  # noqa: E731
    return cast(x), cast(weight), cast(A), cast(S), cast(B), cast(bias)


def check_linear_args(x, weight, A, S, B, bias) -> None:
    """Validate operands of :func:`sorsa_linear`; raises naming the offending argument."""
    for name, t in (("x", x), ("weight", weight), ("A", A), ("S", S), ("B", B)):
        check_float(name, t)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must have last dimension in_features={in_f}, got shape {tuple(x.shape)}")
    if A.dim() != 2 or A.shape[0] < 1:
        raise ValueError(f"A must be 2-D (r, in_features) with r >= 1, got shape {tuple(A.shape)}")
    r = A.shape[0]
    check_shape("A", A, (r, in_f), "r, in_features")
    check_shape("S", S, (r,), "r")
    check_shape("B", B, (out_f, r), "out_features, r")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype} (as in F.linear), got {weight.dtype}")
    if not (A.dtype == S.dtype == B.dtype):
        raise TypeError(f"A, S and B must share one dtype, got {A.dtype}, {S.dtype}, {B.dtype}")
    if A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"adapters A, S, B must have x's dtype {x.dtype} or float32, got {A.dtype}")
    for name, t in (("weight", weight), ("A", A), ("S", S), ("B", B)):
        check_device(name, t, x.device)
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (out_f,), "out_features")
        check_device("bias", bias, x.device)
        if bias.dtype not in (x.dtype, weight.dtype):
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")


def _sorsa_linear_torch(x, weight, A, S, B, scale, bias, dropout_p, training):
    # Factored form: never materialises B·diag(S)·A (out×in) per step; the adapter's
    # up-projection accumulates into y inside one addmm instead of a separate add pass.
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, None if bias is None else bias.to(dt))
    xd = F.dropout(x2, dropout_p, training=True) if (training and dropout_p > 0) else x2
    s = (xd @ A.to(dt).t()) * (S.to(dt) * scale)
    return torch.addmm(y, s, B.to(dt).t()).reshape(*x.shape[:-1], weight.shape[0])


def sorsa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    S: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable SORSA linear ``x·Wᵀ + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ + bias``.

    Args:
        x: input ``(..., in_features)``.
        weight: frozen residual ``W_r`` ``(out_features, in_features)``; receives no gradient
            through this op unless it requires grad.
        A, S, B: adapters ``(r, in)``, ``(r,)``, ``(out, r)``, ``r >= 1``.
        scale: ``alpha / r`` (1 when alpha is None).
        bias: optional ``(out_features,)``.
        dropout_p: dropout on the adapter branch's input, applied only when ``training``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`sorsa_kernels._backend`).

    Returns:
        ``(..., out_features)`` tensor with ``x``'s dtype (the autocast dtype under autocast).
    """
    x, weight, A, S, B, bias = _autocast(x, weight, A, S, B, bias)
    check_linear_args(x, weight, A, S, B, bias)
    scale = check_scale(scale)
    dropout_p = check_dropout_p(dropout_p)
    impl = _IMPLS[_backend.resolve(OP, backend, x.device)]
    return impl(x, weight, A, S, B, scale, bias, dropout_p, bool(training))


# backend name -> implementation with the signature of _sorsa_linear_torch
_IMPLS = {"torch": _sorsa_linear_torch}
