"""SORSA linear: ``y = x·W_rᵀ + scale·((drop(x)·Aᵀ) ⊙ S)·Bᵀ + bias`` (public function; the custom
ops and their autograd are in :mod:`.op`, the reference in :mod:`.reference`, the torch path in
:mod:`.torch_path`, the Triton kernels and launchers in :mod:`.kernels` / :mod:`.launch`, the timed
choice's case in :mod:`.autotune`)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _autotune, _backend
from ..._validate import check_device, check_dropout_p, check_float, check_scale, check_shape
from .autotune import linear_case
from . import op
from .reference import sorsa_linear_naive

OP = "sorsa_linear"
# fp16/bf16/fp32 only: float64 has no tensor-core dot and the kernels pick fp32 dot precisions
SPEC = _backend.register(_backend.OpSpec(
    name=OP, doc="x·W_rᵀ + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ + bias, forward and backward",
    impls={"triton": (torch.float16, torch.bfloat16, torch.float32)}, timed=True,
    check="sorsa_kernels.ops.linear.check", aot="sorsa_kernels.ops.linear.aot",
    bench="sorsa_kernels.ops.linear.bench"))


def _autocast(x, weight, A, S, B, bias):
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):  # meta has no autocast state
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
        x: input ``(..., in_features)``; any strides.
        weight: frozen residual ``W_r`` ``(out_features, in_features)``.
        A, S, B: adapters ``(r, in)``, ``(r,)``, ``(out, r)``, ``r >= 1``.
        scale: ``alpha / r`` (1 when alpha is None).
        bias: optional ``(out_features,)``.
        dropout_p: dropout on the adapter branch's input, applied only when ``training``.
            The mask is regenerated from a seed in backward, never stored.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`sorsa_kernels._backend`).

    Returns:
        ``(..., out_features)`` tensor with ``x``'s dtype (the autocast dtype under autocast).
    """
    for name, t in (("x", x), ("weight", weight), ("A", A), ("S", S), ("B", B), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}")
    x, weight, A, S, B, bias = _autocast(x, weight, A, S, B, bias)
    check_linear_args(x, weight, A, S, B, bias)
    scale = check_scale(scale)
    p = check_dropout_p(dropout_p)  # validated even in eval, where it is not applied
    p = p if training else 0.0
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    # auto on CUDA: fused or torch, timed once per shape bucket (see sorsa_kernels._autotune)
    impl = _backend.choose(OP, backend, x.device, lambda: linear_case(
        x2, weight, A, bias, p, train=_autotune.wants_grad(x, weight, A, S, B, bias)), dtype=x.dtype)
    y = op.linear(x2, weight, A, S, B, bias, scale, p, impl)
    if x.dim() == 2:
        return y
    # not a view of y (as aten's linear): FSDP2 and in-place ops on the output (h += x) need an
    # output that owns its autograd history
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


__all__ = ["sorsa_linear", "sorsa_linear_naive", "check_linear_args", "OP", "SPEC"]
