"""SORSA linear: ``y = x·W_rᵀ + scale·((drop(x)·Aᵀ) ⊙ S)·Bᵀ + bias``.

Dtype rule (all backends): ``x`` and ``weight`` share a dtype (as for ``F.linear``);
the adapters ``A, S, B`` share one dtype that is either ``x``'s dtype or float32
(fp32 "master" adapters next to a bf16/fp16 base). Adapters are cast to ``x``'s dtype
for the matmuls, accumulation is fp32 on the fused path, the output has ``x``'s dtype and
each gradient has its parameter's dtype. ``bias`` has ``x``'s or ``weight``'s dtype.
Under autocast every operand is first cast to the autocast dtype, as ``nn.Linear`` is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _backend, _dispatch
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


def _torch_keep(x2: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Keep-mask of the torch backend, regenerated from ``seed`` in backward (never saved).

    ``seed`` is a CPU tensor (see :func:`sorsa_linear`), so reading it never waits for the GPU.
    """
    if x2.device.type == "meta":  # shapes only (meta forward, fake tensors)
        return torch.empty(x2.shape, dtype=torch.bool, device="meta")
    g = torch.Generator(device=x2.device).manual_seed(int(seed.reshape(-1)[0]))
    return torch.rand(x2.shape, generator=g, device=x2.device) >= p


def _torch_fwd(x2, weight, A, S, B, bias, scale: float, p: float, seed):
    """Unfused factored forward: ``(y, xa)`` with ``xa = drop(x)·Aᵀ`` in fp32 (saved for backward).
    Never materialises B·diag(S)·A; the up-projection accumulates into y in one addmm."""
    dt = x2.dtype
    xd = x2 * _torch_keep(x2, p, seed).to(dt) / (1.0 - p) if p > 0 else x2
    xa = xd @ A.to(dt).t()
    y = F.linear(x2, weight, None if bias is None else bias.to(dt))
    y = torch.addmm(y, xa * (S.to(dt) * scale), B.to(dt).t())
    return y, xa.float()


def _torch_bwd(dy, x2, weight, A, S, B, xa, scale: float, p: float, seed, need_dx: bool,
               need_dA: bool = True, need_dB: bool = True):
    """Unfused backward: ``(dx, dA, dS, dB)`` from the formulas in the module docstring;
    gradients that are not needed come back as ``None`` (not computed)."""
    dt = dy.dtype
    Sf = S.float() * scale
    g = (dy @ B.to(dt)).float()
    dS = (g * xa).sum(0) * scale
    gs = (g * Sf).to(dt)
    dB = (dy.t() @ (xa * Sf).to(dt)).to(B.dtype) if need_dB else None
    keep = _torch_keep(x2, p, seed).to(dt) / (1.0 - p) if p > 0 and (need_dA or need_dx) else None
    dA = (gs.t() @ (x2 if keep is None else x2 * keep)).to(A.dtype) if need_dA else None
    dx = None
    if need_dx:
        up = gs @ A.to(dt)
        dx = dy @ weight + (up if keep is None else up * keep)
    return dx, dA, dS.to(S.dtype), dB


# backend name -> (forward, backward); the Triton pair is added when Triton imports.
_KERNELS = {"torch": (_torch_fwd, _torch_bwd)}
if _backend.triton_status()[0]:
    from ..kernels import linear_launch as _tl

    _KERNELS["triton"] = (_tl.linear_fwd, _tl.linear_bwd)
    # fp16/bf16/fp32 only: float64 has no tensor-core dot and the kernels pick fp32 dot precisions
    # (the interpreter returned garbage for it, caught by the dispatcher's verification)
    _backend.register(OP, "triton", dtypes=(torch.float16, torch.bfloat16, torch.float32))


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
              bias: Optional[torch.Tensor], scale: float, p: float, seed: Optional[torch.Tensor],
              backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    y, xa = _KERNELS[backend][0](x, weight, A, S, B, bias, scale, p, seed)
    return y, xa


def _fwd_fake(x, weight, A, S, B, bias, scale, p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32)


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, S: torch.Tensor,
              B: torch.Tensor, xa: torch.Tensor, scale: float, p: float, seed: Optional[torch.Tensor], backend: str,
              need_dx: bool, need_dA: bool = True,
              need_dB: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # custom ops cannot return None: an unneeded gradient comes back as an empty tensor
    dx, dA, dS, dB = _KERNELS[backend][1](dy, x, weight, A, S, B, xa, scale, p, seed, need_dx,
                                          need_dA=need_dA, need_dB=need_dB)
    return (x.new_empty(0) if dx is None else dx), (A.new_empty(0) if dA is None else dA), dS, \
        (B.new_empty(0) if dB is None else dB)


def _bwd_fake(dy, x, weight, A, S, B, xa, scale, p, seed, backend, need_dx, need_dA=True, need_dB=True):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    return (dx, torch.empty_like(A) if need_dA else A.new_empty(0), torch.empty_like(S),
            torch.empty_like(B) if need_dB else B.new_empty(0))


def _define(name: str, impl, fake, tags=()):
    op = torch.library.custom_op(f"sorsa_kernels::{name}", mutates_args=(), tags=tags)(impl)
    op.register_fake(fake)
    return op


# Two op pairs, one without and one with dropout. The dropout pair reads its seed (a CPU tensor) on
# the host at launch: a CUDA graph would bake the seed of the captured step into every replay, one
# mask for all steps. Tagged cudagraph_unsafe, Inductor splits the graph around it (reduce-overhead
# mode still graphs the rest); without dropout the seed is None, the op has no host input and stays
# inside graphs.
_linear_fwd_op = _define("linear_fwd", _fwd_impl, _fwd_fake)
_linear_bwd_op = _define("linear_bwd", _bwd_impl, _bwd_fake)
_linear_fwd_dropout_op = _define("linear_fwd_dropout", _fwd_impl, _fwd_fake, (torch.Tag.cudagraph_unsafe,))
_linear_bwd_dropout_op = _define("linear_bwd_dropout", _bwd_impl, _bwd_fake, (torch.Tag.cudagraph_unsafe,))


def fwd_op(p: float):
    """The forward custom op for dropout probability ``p`` (its backward is the matching pair's)."""
    return _linear_fwd_dropout_op if p > 0 else _linear_fwd_op


def _setup_context(ctx, inputs, output):
    x, weight, A, S, B, bias, scale, p, seed, backend = inputs
    ctx.save_for_backward(x, weight, A, S, B, output[1], seed)
    ctx.scale, ctx.p, ctx.backend, ctx.has_bias = scale, p, backend, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dxa):
    x, weight, A, S, B, xa, seed = ctx.saved_tensors
    dy = dy.contiguous()
    need = ctx.needs_input_grad
    bwd = _linear_bwd_dropout_op if ctx.p > 0 else _linear_bwd_op  # the pair of the forward's fwd_op
    dx, dA, dS, dB = bwd(dy, x, weight, A, S, B, xa, ctx.scale, ctx.p, seed, ctx.backend, need[0], need[2], need[4])
    dW = dy.t() @ x if need[1] else None  # only if the caller unfroze W_r
    db = dy.sum(0).to(ctx.bias_dtype) if ctx.has_bias and need[5] else None
    return (dx if need[0] else None), dW, (dA if need[2] else None), (dS if need[3] else None), \
        (dB if need[4] else None), db, None, None, None, None


_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_linear_fwd_dropout_op.register_autograd(_backward, setup_context=_setup_context)


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
    # auto on CUDA: fused or torch, timed once per shape bucket (see _dispatch)
    impl = _backend.choose(OP, backend, x.device, lambda: _dispatch.linear_case(
        x2, weight, A, bias, p, train=_dispatch.wants_grad(x, weight, A, S, B, bias)), dtype=x.dtype)
    # The seed lives on the CPU, drawn from torch's CPU generator (torch.manual_seed governs
    # it): kernels and the torch path read it as a host int without a device sync, and every
    # call (layer, step) gets a fresh one, so masks are independent across layers and steps.
    # Without dropout there is no seed: no host tensor in the call, so CUDA graphs keep the op.
    seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64) if p > 0 else None
    y, _ = fwd_op(p)(x2, weight, A, S, B, bias, scale, p, seed, impl)
    return y.reshape(*x.shape[:-1], weight.shape[0])
