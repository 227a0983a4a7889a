"""The orthonormal regularizer as an op: which backend's two phases run, and the differentiable
value (one autograd node whose backward is the backend's gradient phase). Collecting a model's
adapters and sharded (DTensor) parameters are model-level (:mod:`sorsa_kernels.regularizer`)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ... import _backend
from . import torch_path
from .reference import grad_coefs

OP = "orthonormal_grad"
# (local Gram partials flattened, reduce key) -> summed in place across the key's process group
Reducer = Callable[[object, torch.Tensor], None]


def backend_pair(backend: str, device: torch.device, sharded: bool, mats: Sequence[torch.Tensor] = ()
                 ) -> Tuple[Callable, Callable]:
    """The ``(forward, backward)`` phases of the backend that runs these adapters."""
    # the adapters' one dtype when they share it; mixed dtypes: the kernels group by dtype, and a
    # dtype they do not handle (float64) sends the whole call to torch under auto
    dts = {m.dtype for m in mats}
    dtype = next(iter(dts)) if len(dts) == 1 else (torch.float64 if torch.float64 in dts else None)
    name = _backend.resolve(OP, backend, device, dtype)
    if backend == "auto" and len({m.device for m in mats}) > 1:
        name = "torch"  # a model spread over several GPUs: the fused launch takes one device's adapters
    if sharded:
        if backend == "triton":
            raise RuntimeError("backend='triton' is not available for sharded (DTensor) adapters: "
                               "use backend='auto' or 'torch'")
        name = "torch"
    if name == "triton":
        from .launch import ortho_triton_backward, ortho_triton_forward
        return ortho_triton_forward, ortho_triton_backward
    return torch_path.ortho_torch_forward, torch_path.ortho_torch_backward


def run_forward(fwd: Callable, local: Sequence[torch.Tensor], is_b: Sequence[bool],
                keys: Optional[Sequence[object]], reducer: Optional[Reducer]):
    """Per-matrix ``‖E‖_F`` and the backward's state; sharded operands (``keys``) only on the
    torch path, whose Gram partials ``reducer`` sums across ranks."""
    if fwd is torch_path.ortho_torch_forward:
        return fwd(local, is_b, keys, reducer if keys else None)
    return fwd(local, is_b)


class OrthoLoss(torch.autograd.Function):
    """value = mean_m reg_m over the local operands; backward = the backend's gradient phase.
    ``cfg = (is_b, squared, keys, reducer, forward, backward)``."""

    @staticmethod
    def forward(ctx, cfg, *local):
        is_b, squared, keys, reducer, fwd, bwd = cfg
        norms, state = run_forward(fwd, local, is_b, keys, reducer)
        ctx.state, ctx.norms, ctx.squared, ctx.bwd = state, norms, squared, bwd
        ctx.save_for_backward(*local)  # in-place changes before backward are caught by autograd
        vals = norms * norms if squared else norms
        return vals.mean()

    @staticmethod
    def backward(ctx, gout):
        local = ctx.saved_tensors
        coef = grad_coefs(ctx.norms, ctx.squared, gout.to(ctx.norms.dtype) / len(local))
        grads = ctx.bwd(local, ctx.state, coef, inplace=False)
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])))
