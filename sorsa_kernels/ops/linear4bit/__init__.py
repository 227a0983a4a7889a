"""SORSA linear with a 4-bit residual (QSORSA): ``y = x·deq(W_r)ᵀ + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ + bias``,
``W_r`` a bitsandbytes ``Params4bit`` (NF4/FP4, frozen).

No kernel of its own: the linear op's kernels (fused ``[x | s]·[W_r | B]ᵀ`` GEMM on the GPU, its torch
path elsewhere, both AOT-checked and tested as that op) run on ``W_r`` dequantized by bitsandbytes for
the call and freed after it. The backward dequantizes again for ``dX`` instead of keeping it, so
activation memory is QLoRA's (bitsandbytes' own ``matmul_4bit`` dequantizes the same way for any
batch of more than one row); ``W_r`` gets no gradient. Up to ``DECODE_M`` rows without gradients
(decoding) go to bitsandbytes' 4-bit GEMV / small-M GEMM on CUDA, plus the three adapter GEMMs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backend
from ..._validate import check_dropout_p, check_scale
from ...quant import check_device, dequantize, is_params4bit, require_bnb, weight_shape
from ..linear import _autocast, check_linear_args
from ..linear.autotune import DECODE_M
from ..linear import op as linear_op
from .reference import sorsa_linear_4bit_naive


OP = "sorsa_linear_4bit"
# the linear op's kernels, so its dtypes; untimed ("auto" takes the fused path where it runs)
SPEC = _backend.register(_backend.OpSpec(
    name=OP, doc="x·deq(W_r)ᵀ + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ + bias on a 4-bit W_r, forward and backward",
    impls={"triton": (torch.float16, torch.bfloat16, torch.float32)},
    check="sorsa_kernels.ops.linear4bit.check"))

#: devices whose calls of <= DECODE_M rows without gradients go to bitsandbytes. Not the CPU:
#: there bitsandbytes 0.50.2 dequantizes some shapes wrongly (see sorsa_kernels.quant.dequantize)
GEMV_DEVICES = ("cuda",)


class _Linear4bit(torch.autograd.Function):
    """The linear op's forward/backward around a dequantize per pass (its custom ops under
    torch.compile, which sees their fakes and the dropout pair's cudagraph_unsafe tag instead of
    tracing into the launchers; its kernels directly in eager)."""

    @staticmethod
    def forward(ctx, x2, weight, A, S, B, bias, scale, p, seed, impl):
        y, xa = linear_op.forward_pass(x2, dequantize(weight, x2.dtype), A, S, B, bias, scale, p, seed, impl)
        ctx.save_for_backward(x2, A, S, B, xa, seed)
        ctx.weight, ctx.scale, ctx.p, ctx.impl = weight, scale, p, impl
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, A, S, B, xa, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        # W_r again, only for dX (the adapters' gradients do not read it); a zero-byte stand-in otherwise
        W = dequantize(ctx.weight, dy.dtype) if need[0] else dy.new_empty(()).expand(dy.shape[1], x2.shape[1])
        dx, dA, dS, dB = linear_op.backward_pass(dy, x2, W, A, S, B, xa, ctx.scale, ctx.p, seed, ctx.impl, need[0],
                                                 need[2], need[4])
        db = dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[5] else None
        return (dx if need[0] else None), None, (dA if need[2] else None), (dS if need[3] else None), \
            (dB if need[4] else None), db, None, None, None, None


def check_weight4(weight) -> None:
    if not is_params4bit(weight) or getattr(weight, "quant_state", None) is None:
        raise TypeError(f"weight must be a quantized bitsandbytes Params4bit (see sorsa_kernels.quant.quantize), "
                        f"got {type(weight).__module__}.{type(weight).__name__}")


def sorsa_linear_4bit(
    x: torch.Tensor,
    weight,
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
    """Differentiable SORSA linear on a 4-bit residual: :func:`sorsa_kernels.sorsa_linear` with
    ``weight`` a quantized ``bitsandbytes.nn.Params4bit`` of shape (out, in) (dequantized to ``x``'s
    dtype per pass; no gradient). Same arguments, dtype rules (autocast included) and backends
    ("auto", "torch", "triton") as the linear op; returns ``(..., out_features)`` in ``x``'s dtype."""
    require_bnb()
    check_weight4(weight)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}")
    out_f, in_f = weight_shape(weight)
    x, _, A, S, B, bias = _autocast(x, None, A, S, B, bias)
    if weight.device != x.device:
        raise ValueError(f"weight must be on the same device as x ({x.device}), got {weight.device}")
    check_device(weight)
    # the linear op's checks on a zero-byte stand-in of W_r's shape, dtype and device
    check_linear_args(x, x.new_empty(()).expand(out_f, in_f), A, S, B, bias)
    scale = check_scale(scale)
    p = check_dropout_p(dropout_p) if training else (check_dropout_p(dropout_p), 0.0)[1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    bias_ = None if bias is None else bias.to(x.dtype)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, S, B, bias))
    if x2.shape[0] <= DECODE_M and not grad and p == 0.0 and x.device.type in GEMV_DEVICES:
        # decoding / small batches without gradients: bitsandbytes' 4-bit GEMV (one row) or its tuned
        # small-M gemm_4bit (>= 0.50; it picks its kernel or dequantize + GEMM per GPU) read the packed
        # weight; the adapter is three small GEMMs
        bnb = require_bnb()
        dt = x2.dtype
        y = bnb.matmul_4bit(x2, weight.t(), bias=bias_, quant_state=weight.quant_state).to(dt)
        y = torch.addmm(y, (x2 @ A.to(dt).t()) * (S.to(dt) * scale), B.to(dt).t())
        return y.reshape(*x.shape[:-1], out_f)
    impl = _backend.choose(OP, backend, x.device, dtype=x.dtype)
    seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64) if p > 0 else None
    y = _Linear4bit.apply(x2, weight, A, S, B, bias_, scale, p, seed, impl)
    return y.reshape(*x.shape[:-1], out_f)


__all__ = ["sorsa_linear_4bit", "sorsa_linear_4bit_naive", "check_weight4", "OP", "SPEC"]
