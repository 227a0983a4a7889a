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

from ..._env import triton_status
from . import torch_path


# backend name -> (forward, backward); the Triton pair only where Triton imports.
_KERNELS = {"torch": (torch_path.forward, torch_path.backward)}
if triton_status()[0]:
    from . import launch

    _KERNELS["triton"] = (launch.linear_fwd, launch.linear_bwd)


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


def bwd_op(p: float):
    """The backward custom op matching :func:`fwd_op` ``(p)``."""
    return _linear_bwd_dropout_op if p > 0 else _linear_bwd_op


def forward_pass(x, weight, A, S, B, bias, scale: float, p: float, seed, backend: str):
    """``(y, xa)`` of the op, outside its autograd (for ops built on it): the custom op inside a
    torch.compile trace (its fake, the dropout pair's tag), the kernels themselves in eager (a
    custom op's dispatch costs ~0.2 ms per call on the CPU)."""
    if torch.compiler.is_compiling():
        return fwd_op(p)(x, weight, A, S, B, bias, scale, p, seed, backend)
    return _fwd_impl(x, weight, A, S, B, bias, scale, p, seed, backend)


def backward_pass(dy, x, weight, A, S, B, xa, scale: float, p: float, seed, backend: str, need_dx: bool,
                  need_dA: bool, need_dB: bool):
    """``(dx, dA, dS, dB)`` matching :func:`forward_pass` (None where not needed)."""
    if torch.compiler.is_compiling():
        dx, dA, dS, dB = bwd_op(p)(dy, x, weight, A, S, B, xa, scale, p, seed, backend, need_dx, need_dA, need_dB)
        return (dx if need_dx else None), (dA if need_dA else None), dS, (dB if need_dB else None)
    return _KERNELS[backend][1](dy, x, weight, A, S, B, xa, scale, p, seed, need_dx, need_dA=need_dA,
                                need_dB=need_dB)


def _setup_context(ctx, inputs, output):
    x, weight, A, S, B, bias, scale, p, seed, backend = inputs
    ctx.save_for_backward(x, weight, A, S, B, output[1], seed)
    ctx.scale, ctx.p, ctx.backend, ctx.has_bias = scale, p, backend, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dxa):
    x, weight, A, S, B, xa, seed = ctx.saved_tensors
    dy = dy.contiguous()
    need = ctx.needs_input_grad
    dx, dA, dS, dB = bwd_op(ctx.p)(dy, x, weight, A, S, B, xa, ctx.scale, ctx.p, seed, ctx.backend, need[0], need[2], need[4])
    dW = dy.t() @ x if need[1] else None  # only if the caller unfroze W_r
    db = dy.sum(0).to(ctx.bias_dtype) if ctx.has_bias and need[5] else None
    return (dx if need[0] else None), dW, (dA if need[2] else None), (dS if need[3] else None), \
        (dB if need[4] else None), db, None, None, None, None


_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_linear_fwd_dropout_op.register_autograd(_backward, setup_context=_setup_context)


# the eager fp32 CPU path (see linear); tests switch it off to cover the custom op. Only fp32: the
# op computes xa, g and dS in fp32 (fp64 inputs would differ between eager and compiled runs)
_EAGER = True


def linear(x2: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
           bias: Optional[torch.Tensor], scale: float, p: float, backend: str) -> torch.Tensor:
    """The differentiable op on 2-D ``x2`` with a concrete ``backend`` and validated operands.

    The dropout seed lives on the CPU, drawn from torch's CPU generator (torch.manual_seed
    governs it): kernels and the torch path read it as a host int without a device sync, and
    every call (layer, step) gets a fresh one, so masks are independent across layers and steps.
    Without dropout there is no seed: no host tensor in the call, so CUDA graphs keep the op."""
    seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64) if p > 0 else None
    # eager fp32 on the CPU's torch path: plain autograd ops. Not on CUDA, where the backend is a
    # timed choice that a checkpoint's recompute could see change (recorded ops must match), nor
    # in compiled / exported graphs (is_compiling: they keep the custom op; make_fx / jit.trace
    # record these aten ops instead)
    if (_EAGER and backend == "torch" and x2.dtype == torch.float32 and x2.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        return torch_path.eager(x2, weight, A, S, B, bias, scale, p, seed)
    return fwd_op(p)(x2, weight, A, S, B, bias, scale, p, seed, backend)[0]
