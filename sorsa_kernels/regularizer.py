"""Orthonormal regularizer on a model's adapters: value, in-place gradient, differentiable loss.

Orientation convention (what "A-like" and "B-like" mean everywhere here):

* A-like: ``r × in`` with orthonormal *rows*, penalty ``‖A·Aᵀ − I_r‖_F`` — SORSA's ``sorsa_A``,
  PEFT's ``lora_A.<adapter>.weight`` (an ``nn.Linear(in, r)`` weight).
* B-like: ``out × r`` with orthonormal *columns*, penalty ``‖Bᵀ·B − I_r‖_F`` — ``sorsa_B``,
  PEFT's ``lora_B.<adapter>.weight`` (an ``nn.Linear(r, out)`` weight).

Sharded parameters (``torch.distributed.tensor.DTensor``, e.g. after FSDP2's ``fully_shard``)
are handled without gathering where the math allows: a matrix sharded along its long
dimension (``B`` under FSDP2's default ``Shard(0)``, or ``A`` with ``Shard(1)``) contributes
an ``r × r`` partial Gram, summed across the shard group with one all-reduce per step;
a matrix sharded along ``r`` (``A`` under the default ``Shard(0)``) has no such partial
(every Gram entry pairs two rows that live on different ranks), so that ``r × in`` matrix is
all-gathered. Sharded parameters use the torch backend.

DeepSpeed ZeRO (:mod:`sorsa_kernels.integrations.deepspeed`, imported only when a ZeRO-managed
adapter is seen). Under ZeRO-3 a parameter is an empty tensor outside its module's forward, so
:func:`ortho_loss` and :func:`calc_ortho` all-gather the adapters (collectives: every rank must
call them, in the same order; on one rank alone they hang) and keep the fp32 copies the backward
needs; the backward keeps the partitioned adapters' gradients in fp32 and adds each rank's slice
to its gradient partition when the engine's optimizer steps (no collective in the backward; the
loss term may be computed before or after the model's forward, with activation checkpointing or
adapters unused in the forward). Under ZeRO-1/2/3 the gradients have left ``.grad`` by the end of
the backward, so :func:`orthonormal_grad_` (and ``SORSARegularizer``, ``SORSACallback``) adds the
regularizer's gradient to each rank's own partition of them (BF16_Optimizer: its fp32
accumulation buffer), times the optimizer's loss scale; it gathers only the adapters (ZeRO-3),
never a gradient. Call it only at a gradient accumulation boundary
(``engine.is_gradient_accumulation_boundary()``): elsewhere it adds nothing and warns.
``backend="triton"`` is refused for partitioned adapters, and a gradient for partitioned adapters
that no DeepSpeed engine owns is an error.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._zero3 import full_shape, is_partitioned, is_zero3_model
from .ops.ortho.op import OrthoLoss, backend_pair, run_forward
from .ops.ortho.reference import calc_ortho_naive, grad_coefs

NamedParams = Iterable[Tuple[str, torch.Tensor]]
SORSA_NAMES = ("sorsa_A", "sorsa_B")
PEFT_NAMES = ("lora_A", "lora_B")


def any_partitioned(mats: Iterable[torch.Tensor]) -> bool:
    """Whether some of ``mats`` are DeepSpeed ZeRO-3 partitioned parameters."""
    return any(is_partitioned(m) for m in mats)


def is_zero_managed(p: torch.Tensor) -> bool:
    """Whether a DeepSpeed ZeRO optimizer moves ``p``'s gradient out of ``p.grad`` during the
    backward: ZeRO-3 (``ds_id``) or ZeRO-1/2 (``_hp_mapping``, set on every rank, None on a rank
    that holds no part of ``p``)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def any_zero_managed(mats: Iterable[torch.Tensor]) -> bool:
    """Whether a DeepSpeed ZeRO optimizer keeps some of ``mats``' gradients outside ``.grad``."""
    return any(is_zero_managed(m) for m in mats)


def collect_adapters(model_or_params=None, a: Optional[Sequence[torch.Tensor]] = None,
              b: Optional[Sequence[torch.Tensor]] = None,
              names: Tuple[str, str] = SORSA_NAMES) -> Tuple[List[torch.Tensor], List[bool]]:
    """The adapter matrices and whether each is B-like (see the module docstring)."""
    mats: List[torch.Tensor] = []
    is_b: List[bool] = []
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) and n for n in names)):
        raise TypeError(f"names must be a pair of non-empty strings (A-like, B-like), got {names!r}")
    if model_or_params is not None:
        named = model_or_params.named_parameters() if isinstance(model_or_params, nn.Module) else model_or_params
        try:
            it = iter(named)
        except TypeError:
            raise TypeError("model_or_params must be an nn.Module or an iterable of (name, parameter) pairs, "
                            f"got {type(model_or_params).__name__}") from None
        for item in it:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError("model_or_params must be an nn.Module or an iterable of (name, parameter) pairs")
            name, p = item
            ia, ib = names[0] in name, names[1] in name
            if ia or ib:
                shape = full_shape(p)
                if len(shape) != 2:
                    raise ValueError(f"{name} must be a 2-D matrix, got shape {shape}")
                mats.append(p)
                is_b.append(ib and not ia)
    for kind, lst in (("a", a), ("b", b)):
        for j, p in enumerate(lst or ()):
            if not isinstance(p, torch.Tensor) or len(full_shape(p)) != 2:
                shape = full_shape(p) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"{kind}[{j}] must be a 2-D tensor, got {shape}")
            mats.append(p)
            is_b.append(kind == "b")
    return mats, is_b


def _check_number(name: str, v) -> Union[float, torch.Tensor]:
    if isinstance(v, torch.Tensor):  # device scalars pass through: validating them would sync
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        return v.reshape(())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def calc_ortho(model: nn.Module) -> Optional[torch.Tensor]:
    """Mean over all ``sorsa_A``/``sorsa_B`` of ``‖AAᵀ−I‖_F`` / ``‖BᵀB−I‖_F``, as sorsa 1.0.1.

    Differentiable (backward through it is the reference's way of applying the
    regularizer); ``None`` when the model has no adapters. :func:`orthonormal_grad_`
    does the same job without an autograd graph, :func:`ortho_loss` with a fused one.
    DeepSpeed ZeRO-3 partitioned adapters go through :func:`ortho_loss` (same value).
    """
    if is_zero3_model(model):  # the literal formula needs the whole matrices
        return ortho_loss(model, backend="torch")
    return calc_ortho_naive(model.named_parameters())


def check_gamma(gamma) -> Union[float, torch.Tensor]:
    """gamma: finite and >= 0 (a negative weight would push A and B away from orthonormal)."""
    gamma = _check_number("gamma", gamma)
    if not isinstance(gamma, torch.Tensor) and gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return gamma


def _no_adapters_message(names: Tuple[str, str]) -> str:
    return (f"found no adapters: no 2-D parameter name contains {names[0]!r} or {names[1]!r} "
            "(apply sk.apply_sorsa first; for PEFT LoRA/KaSA pass names=sk.regularizer.PEFT_NAMES "
            "or use sk.integrations.peft)")


def check_lr(lr) -> Union[float, torch.Tensor]:
    lr = _check_number("lr", lr)
    if isinstance(lr, float) and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return lr


# ---------------------------------------------------------------- sharded (DTensor) parameters

def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
        return DTensor
    except Exception:  # pragma: no cover - builds without distributed
        return None


def _shard_dim(p) -> Optional[int]:
    """The tensor dim ``p`` is sharded on (None: replicated); 1-D meshes only."""
    from torch.distributed.tensor import Replicate, Shard
    if p.device_mesh.ndim != 1:
        raise NotImplementedError("sharded adapters on a multi-dimensional device mesh (HSDP, TP) are not supported")
    pl = p.placements[0]
    if isinstance(pl, Shard):
        return pl.dim
    if isinstance(pl, Replicate):
        return None
    raise NotImplementedError(f"adapter placement {pl} is not supported (Shard or Replicate only)")


def _allreduce(group, flat: torch.Tensor) -> None:
    import torch.distributed as dist
    dist.all_reduce(flat, group=group)


def any_dtensor(mats: Sequence[torch.Tensor]) -> bool:
    DTensor = _dtensor_cls()
    return DTensor is not None and any(isinstance(m, DTensor) for m in mats)


def _localize(mats: Sequence[torch.Tensor], is_b: Sequence[bool]):
    """Local operands for the math: (tensors, reduce keys, how each maps back).

    kinds: "plain"; "partial" (local shard along L, Gram all-reduced); "gathered" (full
    matrix all-gathered, grad sliced back to the local shard); "replicated"."""
    if not any_dtensor(mats):
        return list(mats), None, None
    DTensor = _dtensor_cls()
    local, keys, kinds = [], [], []
    for m, b in zip(mats, is_b):
        if not isinstance(m, DTensor):
            local.append(m), keys.append(None), kinds.append("plain")
            continue
        d = _shard_dim(m)
        if d is None:
            local.append(m.to_local()), keys.append(None), kinds.append("replicated")
        elif d == (0 if b else 1):  # sharded along L: the Gram is a sum of per-rank partials
            local.append(m.to_local()), keys.append(m.device_mesh.get_group()), kinds.append("partial")
        else:  # sharded along r: the rows must meet, gather this r × L matrix
            local.append(m.full_tensor()), keys.append(None), kinds.append("gathered")
    return local, keys, kinds


def _to_shard(g: torch.Tensor, p, kind: str) -> torch.Tensor:
    """The part of the gradient ``g`` (of p's local operand) that belongs to p's local shard."""
    if kind != "gathered":
        return g
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(g, p.device_mesh, [Replicate()], run_check=False).redistribute(
        p.device_mesh, p.placements).to_local()


def ortho_loss(
    model_or_params: Union[nn.Module, NamedParams, None] = None,
    squared: bool = False,
    *,
    a: Optional[Sequence[torch.Tensor]] = None,
    b: Optional[Sequence[torch.Tensor]] = None,
    names: Tuple[str, str] = SORSA_NAMES,
    backend: str = "auto",
) -> Optional[torch.Tensor]:
    """Differentiable ``calc_ortho``: mean over adapters of ``‖A·Aᵀ−I‖_F`` / ``‖Bᵀ·B−I‖_F``.

    A fused op (one autograd node; its backward is the fused gradient kernel), so
    ``loss + (gamma / lr) * sk.ortho_loss(model)`` works wherever autograd works (DDP,
    FSDP2 ``fully_shard``, DeepSpeed ZeRO-1/2/3, ``GradScaler``, gradient accumulation): the
    gradient reaches the parameters the ordinary way, wherever they keep their grads. ZeRO-3
    partitioned adapters are all-gathered for the value (see the module docstring): call it on
    every rank, with the engine or ``engine.module``.

    Args:
        model_or_params: a module, or ``(name, parameter)`` pairs; names containing
            ``names[0]`` are A-like, ``names[1]`` B-like (see the module docstring for the
            orientation). For PEFT LoRA/KaSA pass ``names=sk.regularizer.PEFT_NAMES``
            (``("lora_A", "lora_B")``), or explicit lists via ``a=`` / ``b=``.
        squared: ``‖·‖_F²`` instead of ``‖·‖_F``.
        a, b: explicit A-like (r × in) and B-like (out × r) matrices, added to the above.
        backend: "auto" | "torch" | "triton" (sharded parameters use "torch").

    Returns:
        A 0-d fp32 tensor (no host sync). Raises ``ValueError`` when there are no adapters
        (``loss + c * None`` would fail later with an unrelated TypeError).
    """
    mats, is_b = collect_adapters(model_or_params, a, b, names)
    if not mats:
        raise ValueError(f"ortho_loss {_no_adapters_message(names)}")
    if any_partitioned(mats):
        from .integrations.deepspeed import zero3_ortho_loss
        return zero3_ortho_loss(mats, is_b, bool(squared), backend)
    local, keys, kinds = _localize(mats, is_b)
    fwd, bwd = backend_pair(backend, local[0].device, keys is not None, local)
    return OrthoLoss.apply((tuple(is_b), bool(squared), keys, _allreduce if keys else None, fwd, bwd), *local)


@torch.no_grad()
def orthonormal_grad_(
    model_or_params: Union[nn.Module, NamedParams],
    gamma: float,
    lr: float,
    *,
    squared: bool = False,
    backend: str = "auto",
    names: Tuple[str, str] = SORSA_NAMES,
) -> Optional[torch.Tensor]:
    """Add the gradient of ``(gamma / lr) · calc_ortho(model)`` to every adapter's ``.grad``.

    Call after the task loss's ``backward()`` (and any gradient clipping), before
    ``optimizer.step()``: sorsa 1.0.1's exact semantics. ``.grad`` is created where it is
    None; parameters with ``requires_grad=False`` count in the mean but get no gradient
    (as with autograd). Math is fp32 whatever the parameter dtype. No host sync. Under
    DeepSpeed ZeRO call it on every rank between ``engine.backward`` and ``engine.step`` when
    ``engine.is_gradient_accumulation_boundary()``: it adds to ZeRO's gradient partitions
    instead; after any other backward it adds nothing and warns (see the module docstring).

    Args:
        model_or_params: a module, or ``(name, parameter)`` pairs (see :func:`ortho_loss`).
        gamma: regularizer weight (finite). lr: learning rate (finite, > 0); the reference
            scales by gamma/lr. Either may be a 0-d device tensor (then not validated).
        squared: use ``‖·‖_F²`` instead of ``‖·‖_F``.
        backend: "auto" | "torch" | "triton".
        names: substrings naming A-like and B-like parameters.

    Returns:
        The regularizer's value (before the gamma/lr factor) as a 0-d fp32 tensor on the
        adapters' device (``float()`` it when you want a number: that syncs), or None
        without adapters (with a warning: the regularizer then does nothing).
    """
    gamma = check_gamma(gamma)
    lr = check_lr(lr)
    mats, is_b = collect_adapters(model_or_params, names=names)
    if not mats:
        warnings.warn(f"orthonormal_grad_ {_no_adapters_message(names)}; nothing was added", stacklevel=2)
        return None
    return grad_step(mats, is_b, gamma, lr, squared, backend, owner=model_or_params)


def grad_step(mats: List[torch.Tensor], is_b: List[bool], gamma, lr, squared: bool, backend: str,
               plain: bool = False, owner=None) -> torch.Tensor:
    """:func:`orthonormal_grad_` on adapters already collected and checked (``SORSARegularizer``
    calls this every step with its cached list). ``plain``: the caller knows no adapter is a
    DTensor or DeepSpeed-managed (skips the per-step scans). ``owner``: what they were collected
    from (a DeepSpeed engine tells ZeRO-1/2 adapters their optimizer)."""
    scale = gamma / (lr * len(mats))
    if not plain and any_zero_managed(mats):  # the grads are in ZeRO's partitions, not in .grad
        from .integrations.deepspeed import add_partitioned_grads
        norms = add_partitioned_grads(mats, is_b, scale, squared, backend, owner)
        return (norms * norms if squared else norms).mean()
    local, keys, kinds = (mats, None, None) if plain else _localize(mats, is_b)
    if keys is None:
        fwd, bwd = backend_pair(backend, mats[0].device, False, local)
        norms, state = run_forward(fwd, local, is_b, None, None)
        bwd(local, state, grad_coefs(norms, squared, scale), inplace=True)
    else:  # sharded: gradients of the local operands, then into each DTensor's local .grad
        from torch.distributed.tensor import DTensor
        fwd, bwd = backend_pair(backend, local[0].device, True, local)
        norms, state = run_forward(fwd, local, is_b, keys, _allreduce)
        grads = bwd(local, state, grad_coefs(norms, squared, scale), inplace=False)
        for p, g, kind in zip(mats, grads, kinds):
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
                continue
            g = _to_shard(g, p, kind).to(p.dtype)
            if p.grad is None:
                p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
            else:
                p.grad.to_local().add_(g)
    return (norms * norms if squared else norms).mean()


LrSource = Union[float, Callable[[], float], torch.optim.Optimizer, str]


def adapter_group(param_groups: Sequence[dict], mats: Sequence[torch.Tensor]) -> int:
    """The index of the first of ``param_groups`` that holds one of the adapters ``mats`` (the
    lr the regularizer divides by is theirs: another group, e.g. embeddings, may have its own);
    0 when none does."""
    ids = {id(m) for m in mats}
    for i, g in enumerate(param_groups):
        if any(id(p) in ids for p in g["params"]):
            return i
    return 0


def _initial_lr(optimizer: torch.optim.Optimizer, mats: Sequence[torch.Tensor] = ()) -> float:
    """The adapters' param group's learning rate before any scheduler touched it (schedulers
    record it as ``initial_lr``)."""
    g = optimizer.param_groups[adapter_group(optimizer.param_groups, mats)]
    return float(g.get("initial_lr", g["lr"]))


def _lr_getter(lr: LrSource, mats: Sequence[torch.Tensor] = ()) -> Callable[[], float]:
    if isinstance(lr, torch.optim.Optimizer):
        i = adapter_group(lr.param_groups, mats)
        return lambda: float(lr.param_groups[i]["lr"])
    if callable(lr):
        return lambda: float(lr())
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return lambda: float(lr)
    raise TypeError(f"lr must be a float, a callable returning the current lr, or an optimizer; got {type(lr).__name__}")


def unscale_once(scaler, optimizer: torch.optim.Optimizer) -> None:
    """Unscale ``optimizer``'s grads with the ``GradScaler`` unless that happened this iteration
    (e.g. for clipping): the regularizer's gradient is added unscaled, so the grads it joins must be."""
    from torch.amp.grad_scaler import OptState
    if not scaler.is_enabled():
        return
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    elif state["stage"] is OptState.STEPPED:
        raise RuntimeError("the regularizer's step came after scaler.step(optimizer): call it before the optimizer step")


class SORSARegularizer:
    """Apply the orthonormal regularizer in a plain training loop::

        reg = sk.SORSARegularizer(model, gamma=4e-4, lr=optimizer)
        loss.backward(); clip_grad_norm_(...); reg.step(); optimizer.step()

    With mixed precision (``torch.amp.GradScaler``)::

        reg = sk.SORSARegularizer(model, gamma=4e-4, lr=optimizer, scaler=scaler)
        scaler.scale(loss).backward(); reg.step(); scaler.step(optimizer); scaler.update()

    ``step`` then unscales the optimizer's grads first (``scaler.unscale_``, unless already
    done this iteration), so the regularizer's gradient is not divided by the loss scale.

    Args:
        model: the model (its ``sorsa_A`` / ``sorsa_B`` parameters are collected once, here).
        gamma: regularizer weight (finite).
        lr: the learning rate: an optimizer (the current lr of its first param group holding
            an adapter), a callable,
            a constant, or ``"initial"``: the optimizer's initial lr (``initial_lr`` as recorded
            by its scheduler, else its lr at construction), which reproduces sorsa 1.0.1's
            ``gamma / lr0`` exactly; needs ``optimizer=`` unless ``lr`` is one.
        squared, backend: as :func:`sorsa_kernels.orthonormal_grad_`.
        scaler: a ``GradScaler`` whose scaled grads must be unscaled before the step.
        optimizer: the optimizer owning the adapters (for ``lr="initial"`` and ``scaler``).
    """

    def __init__(self, model: nn.Module, gamma: float, lr: LrSource, *, squared: bool = False, backend: str = "auto",
                 scaler=None, optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._model = model
        self.params = [(n, p) for n, p in model.named_parameters() if "sorsa_A" in n or "sorsa_B" in n]
        if not self.params:
            raise ValueError("model has no sorsa_A / sorsa_B parameters: apply_sorsa first")
        # collected once: a step then does no per-parameter name matching or DTensor scan
        self._mats, self._is_b = collect_adapters(self.params)
        self._plain = not any_dtensor(self._mats) and not any_zero_managed(self._mats)
        self.gamma, self.squared, self.backend = check_gamma(gamma), squared, backend
        if optimizer is None and isinstance(lr, torch.optim.Optimizer):
            optimizer = lr
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None:
            if not hasattr(scaler, "unscale_"):
                raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
            if optimizer is None:
                raise ValueError("scaler= needs the optimizer (pass lr=optimizer or optimizer=) to unscale its grads "
                                 "before the regularizer's gradient is added")
        self.scaler, self.optimizer = scaler, optimizer
        if isinstance(lr, str):
            if lr != "initial":
                raise ValueError(f"lr must be a float, a callable, an optimizer or 'initial', got {lr!r}")
            if optimizer is None:
                raise ValueError("lr='initial' needs the optimizer: pass optimizer=")
            lr0 = _initial_lr(optimizer, self._mats)
            self._lr = lambda: lr0
        else:
            self._lr = _lr_getter(lr, self._mats)
        self.last_value: Optional[torch.Tensor] = None

    def _unscale(self) -> None:
        unscale_once(self.scaler, self.optimizer)

    def step(self) -> Optional[torch.Tensor]:
        """Add the regularizer's gradient; returns its value as a 0-d tensor (no host sync),
        or None when the lr is 0 (skipped)."""
        lr = self._lr()
        if lr == 0.0:
            return None
        if self.scaler is not None:
            self._unscale()
        if self._plain and is_zero_managed(self._mats[0]):  # built before deepspeed.initialize took the model
            self._plain = False
        self.last_value = grad_step(self._mats, self._is_b, self.gamma, check_lr(lr), self.squared, self.backend,
                                     plain=self._plain, owner=self._model)
        return self.last_value

    __call__ = step
