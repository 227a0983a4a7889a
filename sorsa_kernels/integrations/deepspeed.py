"""The orthonormal regularizer on adapters that DeepSpeed's ZeRO optimizers own.

Imported by :mod:`sorsa_kernels.regularizer` once a ZeRO-managed adapter is seen and by
:class:`sorsa_kernels.SORSACallback` when a Trainer starts; it imports deepspeed only inside the
functions that need it (``import sorsa_kernels`` imports neither). Two ways in, both equal to one
plain process (tested in fp32 on 2 CPU ranks; the fp16 loss-scale path has not been run):

* **Loss term** (``loss = task + gamma * sk.ortho_loss(model)``): under ZeRO-3 a parameter is an
  empty tensor outside its module's forward (the data is partitioned over the ranks), so
  :func:`zero3_ortho_loss` all-gathers the ``A`` / ``B`` matrices once
  (``deepspeed.zero.GatheredParameters``), computes the value and keeps the fp32 stacked copies
  the gradient needs (the torch path's state); its backward returns full-shape gradients, which
  ZeRO-3's own gradient hooks reduce-scatter like any other. No collective runs in the backward.
  Under ZeRO-1/2 the parameters are whole on every rank and the ordinary op is used.
* **After the backward** (``orthonormal_grad_`` / ``SORSARegularizer`` / ``SORSACallback``, sorsa
  1.0.1's semantics): ZeRO has already reduced the gradients into per-rank partitions and
  ``param.grad`` is gone, so :func:`add_partitioned_grads` computes the regularizer's gradient
  from the gathered matrices (ZeRO-3) or the local ones (ZeRO-1/2) and adds to each rank's own
  slice of it, multiplied by the optimizer's loss scale (DeepSpeed unscales in its step). No
  gradient is all-gathered or all-reduced.

Cost per step: one all-gather of the adapters ``A`` and ``B`` under ZeRO-3 (``r·(in + out)``
values per layer, none under ZeRO-1/2) and an fp32 copy of them held until the backward (loss
term) or the end of the call; never the frozen weights. Every rank must make the same calls in
the same order (the gather is a collective).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .._zero3 import gathered, is_partitioned
from ..ops.ortho import torch_path
from ..ops.ortho.reference import grad_coefs


def _check_backend(backend: str) -> None:
    if backend == "triton":
        raise RuntimeError("backend='triton' is not available for DeepSpeed ZeRO-3 partitioned adapters (the "
                           "gradient is computed from the fp32 copy gathered in the forward): use backend='auto' "
                           "or 'torch'")


def _check_engine(mats: Sequence[torch.Tensor]) -> None:
    """A gradient for partitioned parameters needs the ZeRO-3 optimizer that owns them."""
    if any(is_partitioned(p) and p.requires_grad and getattr(p, "_z3_optimizer", None) is None for p in mats):
        raise RuntimeError("the adapters are ZeRO-3 partitioned (deepspeed.zero.Init) but no DeepSpeed ZeRO-3 "
                           "engine owns them, so their gradient has nowhere to go: call "
                           "deepspeed.initialize(model=...) (or train with a DeepSpeed config) first, or compute "
                           "the value under torch.no_grad()")


class _Zero3OrthoLoss(torch.autograd.Function):
    """value = mean_m reg_m of the gathered matrices; backward: full-shape gradients from the
    stacked fp32 copies kept in the forward (ZeRO-3's hooks partition them). ``cfg = (is_b, squared)``."""

    @staticmethod
    def forward(ctx, cfg, *mats):
        is_b, squared = cfg
        norms, state = torch_path.ortho_torch_forward(mats, is_b)
        # the state's stacked copies (torch.stack) outlive the gather; the parameters do not
        ctx.state, ctx.norms, ctx.squared, ctx.n = state, norms, squared, len(mats)
        vals = norms * norms if squared else norms
        return vals.mean()

    @staticmethod
    def backward(ctx, gout):
        coef = grad_coefs(ctx.norms, ctx.squared, gout.to(ctx.norms.dtype) / ctx.n)
        grads = torch_path.ortho_torch_backward([None] * ctx.n, ctx.state, coef, inplace=False)
        ctx.state = None
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])))


def zero3_ortho_loss(mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool, backend: str) -> torch.Tensor:
    """:func:`sorsa_kernels.ortho_loss` when some adapters are ZeRO-3 partitioned."""
    _check_backend(backend)
    if torch.is_grad_enabled():
        _check_engine(mats)
    with gathered(mats):
        # applied while gathered: a gradient accumulator created here records the full shape
        return _Zero3OrthoLoss.apply((tuple(is_b), bool(squared)), *mats)


def _loss_scale(mats: Sequence[torch.Tensor]) -> float:
    """The loss scale the ZeRO optimizer still holds in the gradients (1 without fp16)."""
    for p in mats:
        opt = getattr(p, "_z3_optimizer", None) or getattr(p, "_zero_optimizer", None)
        if opt is not None:
            return float(getattr(opt, "loss_scale", 1.0))
    return 1.0


def _local_slice(g: torch.Tensor, p: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's ``n`` values of the flattened ``g``, as ZeRO-3 partitions ``p`` (contiguous
    equal slices in partition-group rank order, the last one zero-padded)."""
    import torch.distributed as dist
    start = n * dist.get_rank(group=p.ds_process_group)
    flat = g.reshape(-1)[start:start + n]
    return flat if flat.numel() == n else torch.nn.functional.pad(flat, (0, n - flat.numel()))


@torch.no_grad()
def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add the full-shape ``g`` to wherever DeepSpeed keeps ``p``'s gradient now (the order of
    ``deepspeed.utils.safe_set_full_grad``: ``p.grad``, ZeRO-3's partition, ZeRO-1/2's fragment)."""
    if p.grad is not None:
        p.grad.add_(g.to(p.grad.dtype))
    elif is_partitioned(p):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad
        local = safe_get_local_grad(p)
        safe_set_local_grad(p, local + _local_slice(g, p, local.numel()).to(local.dtype))
    else:
        m = p._hp_mapping
        if m is None:  # this rank's optimizer partition holds no part of p
            return
        frag = m.get_lp_grad_fragment(p._index_in_param_group)
        a = m.lp_fragment_address
        frag.add_(g.reshape(-1).narrow(0, a.start, a.numel).reshape_as(frag).to(frag.dtype))


def add_partitioned_grads(mats: List[torch.Tensor], is_b: List[bool], scale, squared: bool,
                          backend: str) -> torch.Tensor:
    """:func:`sorsa_kernels.regularizer.grad_step` for ZeRO-managed adapters: add ``scale ·
    d(sum_m reg_m)/dM`` (times the loss scale) to each one's gradient; returns the per-matrix
    norms. Call after ``engine.backward`` and before ``engine.step`` on every rank."""
    if any(is_partitioned(p) for p in mats):
        _check_backend(backend)
        _check_engine(mats)
    with gathered(mats):
        norms, state = torch_path.ortho_torch_forward(mats, is_b)
    grads = torch_path.ortho_torch_backward(mats, state, grad_coefs(norms, squared, scale * _loss_scale(mats)),
                                            inplace=False, cast=False)
    for p, g in zip(mats, grads):
        if p.requires_grad:
            _add_grad(p, g)
    return norms


# ---------------------------------------------------------------- transformers.Trainer

def engine_optimizer(optimizer) -> Optional[torch.optim.Optimizer]:
    """The DeepSpeed engine's optimizer behind accelerate's ``DeepSpeedOptimizerWrapper`` (what a
    Trainer hands its callbacks under DeepSpeed), else None."""
    if optimizer is None or type(optimizer).__name__ != "DeepSpeedOptimizerWrapper":
        return None
    return optimizer.optimizer


def run_before_step(ds_optimizer, fn: Callable[[], None]) -> Callable[[], None]:
    """Make ``ds_optimizer.step()`` call ``fn()`` first; returns the undo.

    accelerate runs ``engine.backward`` and ``engine.step`` together inside
    ``accelerator.backward``, so the Trainer's pre-optimizer-step event comes after the update;
    the engine's call of its optimizer's ``step`` is the one point between the two (after the
    gradients are reduced; before DeepSpeed's own clipping for ZeRO-1/2/3, after it otherwise)."""
    orig = ds_optimizer.step

    def step(*args, **kwargs):
        fn()
        return orig(*args, **kwargs)

    ds_optimizer.step = step

    def undo() -> None:
        if ds_optimizer.__dict__.get("step") is step:
            del ds_optimizer.step

    return undo
