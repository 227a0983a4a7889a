"""The orthonormal regularizer on adapters that DeepSpeed's ZeRO optimizers own.

Imported by :mod:`sorsa_kernels.regularizer` once a ZeRO-managed adapter is seen and by
:class:`sorsa_kernels.SORSACallback` when a Trainer starts; it imports deepspeed only inside the
functions that need it (``import sorsa_kernels`` imports neither). Two ways in, both equal to one
plain process (tested in fp32 and bf16 on 2 CPU ranks; the fp16 loss-scale paths only with a
stand-in optimizer):

* **Loss term** (``loss = task + gamma * sk.ortho_loss(model)``): under ZeRO-3 a parameter is an
  empty tensor outside its module's forward (the data is partitioned over the ranks), so
  :func:`zero3_ortho_loss` all-gathers the ``A`` / ``B`` matrices once
  (``deepspeed.zero.GatheredParameters``; a collective: every rank calls it), computes the value
  and keeps the fp32 stacked copies the gradient needs. Its backward does not hand the
  partitioned adapters' gradients to autograd (accumulating into a released parameter fails):
  it keeps them in fp32, summed over the micro-batches, and adds this rank's slice of them to
  its gradient partition when the engine's optimizer steps (:func:`run_before_step`), like the
  route below. So the term may be computed before or after the forward, with activation
  checkpointing, or for adapters the forward does not use. No collective runs in the backward.
  Under ZeRO-1/2 the parameters are whole on every rank and the ordinary op is used.
* **After the backward** (``orthonormal_grad_`` / ``SORSARegularizer`` / ``SORSACallback``, sorsa
  1.0.1's semantics): ZeRO has already reduced the gradients into per-rank partitions and
  ``param.grad`` is gone, so :func:`add_partitioned_grads` computes the regularizer's gradient
  from the gathered matrices (ZeRO-3) or the local ones (ZeRO-1/2) and adds to each rank's own
  slice of it (BF16_Optimizer: to its fp32 accumulation buffer), multiplied by the loss scale
  the gradients still carry (DeepSpeed's fp16 scaler, its ``torch_autocast`` GradScaler or a
  custom scale; DeepSpeed unscales in its step). No gradient is all-gathered or all-reduced.
  Only at a gradient accumulation boundary: elsewhere it adds nothing and warns.

Cost per step: one all-gather of the adapters ``A`` and ``B`` under ZeRO-3 (``r·(in + out)``
values per layer, none under ZeRO-1/2) and an fp32 copy of them held until the backward (loss
term) or the end of the call, plus (loss term) an fp32 gradient of them until the optimizer
step; never the frozen weights. Every rank must make the same calls in the same order (the
gather is a collective). The module reads private DeepSpeed attributes: it checks the version
(:func:`check_deepspeed_version`) when first used.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._zero3 import full_shape, gathered, is_partitioned, local_slice
from ..ops.ortho import torch_path
from ..ops.ortho.reference import grad_coefs


# DeepSpeed versions this module was written against: it reads private attributes (``_hp_mapping``,
# ``_hp_grad``, ``get_lp_grad_fragment``, ``_z3_optimizer``, ``torch_autocast_gradscaler``) that
# DeepSpeed may rename in any release.
MIN_DEEPSPEED = (0, 16)
TESTED_DEEPSPEED = (0, 19)
_version_checked = False


def _version_tuple(version: str) -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_deepspeed_version(version: Optional[str] = None) -> None:
    """Refuse a DeepSpeed older than :data:`MIN_DEEPSPEED` and warn (once) above the newest
    minor version tested (:data:`TESTED_DEEPSPEED`, 0.19.8): the integration relies on private
    DeepSpeed attributes, and a clear message here beats an AttributeError inside a step.
    ``version``: the version string to check (default: the installed ``deepspeed.__version__``)."""
    global _version_checked
    installed = version is None
    if installed:
        if _version_checked:
            return
        import deepspeed
        version = str(deepspeed.__version__)
    v = _version_tuple(version)
    if v < MIN_DEEPSPEED:
        raise RuntimeError(f"the SORSA regularizer under DeepSpeed ZeRO needs deepspeed >= "
                           f"{'.'.join(map(str, MIN_DEEPSPEED))}, this is {version}: upgrade deepspeed")
    if v > TESTED_DEEPSPEED:
        warnings.warn(f"deepspeed {version} is newer than the versions the SORSA regularizer's ZeRO integration "
                      f"was tested with (up to {'.'.join(map(str, TESTED_DEEPSPEED))}.x); it reads private "
                      "DeepSpeed attributes, so check its results against one plain process", UserWarning,
                      stacklevel=3)
    _version_checked = _version_checked or installed


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


_LINK = "_sorsa_zero_optimizer"  # on a ZeRO-1/2 parameter: its engine's optimizer, set by link_optimizer


def _optimizer_of(p: torch.Tensor):
    """The ZeRO optimizer that owns ``p``: DeepSpeed links it under ZeRO-3 (and ZeRO-1/2 with CPU
    offload), :func:`link_optimizer` otherwise; None when neither did (BF16_Optimizer, or the
    module passed instead of the engine)."""
    return getattr(p, "_z3_optimizer", None) or getattr(p, "_zero_optimizer", None) or getattr(p, _LINK, None)


def link_optimizer(ds_optimizer, mats: Sequence[torch.Tensor]) -> None:
    """Record ``ds_optimizer`` (a DeepSpeed engine's optimizer) on those of ``mats`` it holds
    without a link DeepSpeed made, so the loss scale and the accumulation boundary can be read."""
    if ds_optimizer is None:
        return
    for p in mats:
        if _optimizer_of(p) is None and hasattr(p, "_hp_mapping"):
            setattr(p, _LINK, ds_optimizer)


def link_engine(model, mats: Sequence[torch.Tensor]) -> None:
    """:func:`link_optimizer` with the optimizer of ``model`` when it is a ``DeepSpeedEngine``."""
    from deepspeed import DeepSpeedEngine
    if isinstance(model, DeepSpeedEngine):
        link_optimizer(model.optimizer, mats)


# ---------------------------------------------------------------- the loss term under ZeRO-3

_PENDING = "_sorsa_pending_grads"  # on a ZeRO-3 optimizer: id(param) -> [param, fp32 full-shape grad]


def _defer(p: torch.Tensor, g: torch.Tensor) -> None:
    """Keep ``g`` (fp32, full shape) for ``p`` until its ZeRO-3 optimizer steps (see
    :func:`_flush_pending`); summed over the backwards in between (gradient accumulation)."""
    opt = p._z3_optimizer
    pending: Optional[Dict[int, list]] = opt.__dict__.get(_PENDING)
    if pending is None:
        pending = opt.__dict__[_PENDING] = {}
        run_before_step(opt, lambda: _flush_pending(opt), tag="ortho_loss")
    entry = pending.get(id(p))
    if entry is None:
        pending[id(p)] = [p, g]
    else:
        entry[1].add_(g)


def _flush_pending(opt) -> None:
    """Add the deferred loss-term gradients to this rank's gradient partitions (run just before
    ``opt.step()``, after ZeRO-3 reduce-scattered the other gradients)."""
    pending = opt.__dict__.get(_PENDING)
    if not pending:
        return
    items = list(pending.values())
    pending.clear()
    for p, g in items:
        _add_grad(p, g)


class _Zero3OrthoLoss(torch.autograd.Function):
    """value = mean_m reg_m of the gathered matrices; backward: gradients from the stacked fp32
    copies kept in the forward. The partitioned parameters are not inputs of this node: as inputs
    their gradient accumulation would wait for it, and a node created before the model's forward
    runs after the layers' backward, when ZeRO-3 has already released them. Their gradient is kept
    in fp32 and added to the rank's gradient partition when the engine's optimizer steps
    (:func:`_defer`); ``anchor`` (a fresh leaf that requires grad) links the node to the loss.
    ``gout`` already carries DeepSpeed's loss scale and ``1 / gradient_accumulation_steps``.
    ``cfg = (is_b, squared, mats)``; ``plain``: the mats that are not partitioned (ordinary inputs)."""

    @staticmethod
    def forward(ctx, cfg, anchor, *plain):
        is_b, squared, mats = cfg
        norms, state = torch_path.ortho_torch_forward(mats, is_b)
        # the state's stacked copies (torch.stack) outlive the gather; the parameters do not
        ctx.state, ctx.norms, ctx.squared, ctx.mats = state, norms, squared, mats
        vals = norms * norms if squared else norms
        return vals.mean()

    @staticmethod
    def backward(ctx, gout):
        n = len(ctx.mats)
        coef = grad_coefs(ctx.norms, ctx.squared, gout.to(ctx.norms.dtype) / n)
        grads = torch_path.ortho_torch_backward([None] * n, ctx.state, coef, inplace=False, cast=False)
        ctx.state = None
        out = []
        for p, g in zip(ctx.mats, grads):
            if is_partitioned(p):
                if p.requires_grad:
                    _defer(p, g)
            else:
                out.append(g.to(p.dtype) if p.requires_grad else None)
        return (None, None, *out)


def zero3_ortho_loss(mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool, backend: str) -> torch.Tensor:
    """:func:`sorsa_kernels.ortho_loss` when some adapters are ZeRO-3 partitioned: a collective
    (the adapters are all-gathered), so every rank must call it."""
    check_deepspeed_version()
    _check_backend(backend)
    grad = torch.is_grad_enabled() and any(p.requires_grad and is_partitioned(p) for p in mats)
    if grad:
        _check_engine(mats)
    anchor = torch.zeros((), device=mats[0].device, requires_grad=grad)
    with gathered(mats):
        return _Zero3OrthoLoss.apply((tuple(is_b), bool(squared), tuple(mats)), anchor,
                                     *(p for p in mats if not is_partitioned(p)))


# ---------------------------------------------------------------- after the backward

def _loss_scale(mats: Sequence[torch.Tensor]) -> float:
    """The factor the ZeRO optimizer still holds in the gradients and divides out in its step:
    a custom loss scale, the ``torch.amp.GradScaler`` of DeepSpeed's ``torch_autocast`` fp16,
    else its own fp16 loss scale (1 without fp16)."""
    for p in mats:
        opt = _optimizer_of(p)
        if opt is None:
            continue
        if getattr(opt, "custom_loss_scaler", False):
            return float(opt.external_loss_scale)
        scaler = getattr(opt, "torch_autocast_gradscaler", None)
        if scaler is not None:
            return float(scaler.get_scale())
        return float(getattr(opt, "loss_scale", 1.0))
    if any(p.dtype == torch.float16 for p in mats):  # fp16 gradients carry a loss scale we cannot read
        raise RuntimeError("the adapters are fp16 DeepSpeed ZeRO-1/2 parameters, whose gradients carry the "
                           "engine's loss scale, but their optimizer is unknown: pass the engine (not "
                           "engine.module) to sk.orthonormal_grad_ / sk.SORSARegularizer")
    return 1.0


@torch.no_grad()
def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add the full-shape ``g`` to wherever DeepSpeed keeps ``p``'s gradient now, in the order of
    ``deepspeed.utils.safe_get_full_grad``: BF16_Optimizer's fp32 accumulation buffer
    (``_hp_grad``: the whole parameter on every rank; its bf16 ``p.grad`` was already copied
    there), ``p.grad``, ZeRO-3's partition, ZeRO-1/2's fragment."""
    hp = getattr(p, "_hp_grad", None)
    if hp is not None:
        hp.add_(g.reshape(hp.shape).to(hp.dtype))
    elif p.grad is not None:
        p.grad.add_(g.to(p.grad.dtype))
    elif is_partitioned(p):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad
        local = safe_get_local_grad(p)
        # ZeRO-3 copies (not adds) a partition's first gradient of a step into its buffer, so the
        # buffer of a parameter no backward reached since the last step (an adapter the forward
        # did not use) still holds the previous step's gradient: start from zero there
        reduced = getattr(p._z3_optimizer, "_offload_boundary_param_ids", None)
        if reduced is not None and p.ds_id not in reduced:
            local = torch.zeros_like(local)
        safe_set_local_grad(p, local + local_slice(p, g).to(local.dtype))
    else:
        m = p._hp_mapping
        if m is None:  # this rank's optimizer partition holds no part of p
            return
        frag = m.get_lp_grad_fragment(p._index_in_param_group)
        a = m.lp_fragment_address
        flat = g.reshape(-1)
        if frag.numel() != p.numel() or a.numel == p.numel():  # BF16_Optimizer's is the whole parameter
            flat = flat.narrow(0, a.start, a.numel)
        frag.add_(flat.reshape_as(frag).to(frag.dtype))


def _at_boundary(mats: Sequence[torch.Tensor]) -> bool:
    """False when the ZeRO optimizer says this backward is not a gradient accumulation boundary
    (``engine.step()`` will not step the optimizer); True when it cannot tell."""
    for p in mats:
        opt = _optimizer_of(p)
        if opt is not None and hasattr(opt, "is_gradient_accumulation_boundary"):
            return bool(opt.is_gradient_accumulation_boundary())
    return True


def add_partitioned_grads(mats: List[torch.Tensor], is_b: List[bool], scale, squared: bool,
                          backend: str, owner=None) -> torch.Tensor:
    """:func:`sorsa_kernels.regularizer.grad_step` for ZeRO-managed adapters: add ``scale ·
    d(sum_m reg_m)/dM`` (times the loss scale) to each one's gradient; returns the per-matrix
    norms. Call after ``engine.backward`` and before ``engine.step`` on every rank (a collective
    under ZeRO-3). After a backward that is not a gradient accumulation boundary it adds nothing
    and warns (the engine's step would not step the optimizer: added at every micro-step, the
    regularizer would count ``gradient_accumulation_steps`` times). ``owner``: the module or
    engine the adapters were collected from (an engine supplies the optimizer under ZeRO-1/2)."""
    check_deepspeed_version()
    link_engine(owner, mats)
    if any(is_partitioned(p) for p in mats):
        _check_backend(backend)
        _check_engine(mats)
    add = _at_boundary(mats)
    if not add:
        warnings.warn("orthonormal_grad_ after a backward that is not a gradient accumulation boundary: nothing "
                      "was added (call it only when engine.is_gradient_accumulation_boundary() is True, just "
                      "before the engine.step() that steps the optimizer)", UserWarning, stacklevel=4)
    factor = scale * _loss_scale(mats) if add else None
    norms: Optional[torch.Tensor] = None
    # a matrix's gradient needs only its own norm (the mean's 1/n is in ``scale``), so chunks of
    # at most CHUNK_BYTES of fp32 copies bound the memory; the same chunks on every rank
    for idx in _chunks(mats):
        sub = [mats[i] for i in idx]
        with gathered(sub):
            n_sub, state = torch_path.ortho_torch_forward(sub, [is_b[i] for i in idx])
        if norms is None:
            norms = n_sub.new_empty(len(mats))
        norms[idx] = n_sub
        if not add:
            continue
        grads = torch_path.ortho_torch_backward(sub, state, grad_coefs(n_sub, squared, factor), inplace=False,
                                                cast=False)
        for p, g in zip(sub, grads):
            if p.requires_grad:
                _add_grad(p, g)
    return norms


CHUNK_BYTES = 256 * 2 ** 20  # fp32 bytes of adapters add_partitioned_grads gathers and holds at once


def _chunks(mats: Sequence[torch.Tensor]) -> List[List[int]]:
    """Consecutive indices of ``mats`` in groups of at most :data:`CHUNK_BYTES` of fp32 (a larger
    matrix alone); from the full shapes, so every rank forms the same groups."""
    out: List[List[int]] = []
    cur: List[int] = []
    size = 0
    for i, p in enumerate(mats):
        nbytes = 4 * math.prod(full_shape(p))
        if cur and size + nbytes > CHUNK_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    if cur:
        out.append(cur)
    return out


# ---------------------------------------------------------------- transformers.Trainer

def engine_optimizer(optimizer) -> Optional[torch.optim.Optimizer]:
    """The DeepSpeed engine's optimizer behind accelerate's ``DeepSpeedOptimizerWrapper`` (what a
    Trainer hands its callbacks under DeepSpeed), else None."""
    if optimizer is None or type(optimizer).__name__ != "DeepSpeedOptimizerWrapper":
        return None
    check_deepspeed_version()
    return optimizer.optimizer


def adapter_lr(ds_optimizer, mats: Sequence[torch.Tensor]) -> float:
    """The current lr of the param group of the DeepSpeed optimizer that holds the adapters
    (its ``param_groups`` hold flat fp32 partitions, so the group is found through the
    low-precision groups it keeps in the same order); the first group when none is found."""
    ids = {id(p) for p in mats if p.requires_grad}
    for attr in ("fp16_groups", "bit16_groups", "bf16_groups"):
        groups = getattr(ds_optimizer, attr, None)
        for i, group in enumerate(groups or ()):
            if any(id(p) in ids for p in group):
                return float(ds_optimizer.param_groups[i]["lr"])
    return float(ds_optimizer.param_groups[0]["lr"])


_HOOKS = "_sorsa_before_step"  # on a DeepSpeed optimizer: tag -> fn, run before each step()


def run_before_step(ds_optimizer, fn: Callable[[], None], tag: str = "SORSACallback") -> Callable[[], None]:
    """Make ``ds_optimizer.step()`` call ``fn()`` first; returns the undo. One ``fn`` per ``tag``:
    a second one (two ``SORSACallback`` s, or two Trainers on one engine) would apply the
    regularizer twice, so it raises ``RuntimeError``.

    accelerate runs ``engine.backward`` and ``engine.step`` together inside
    ``accelerator.backward``, so the Trainer's pre-optimizer-step event comes after the update;
    the engine's call of its optimizer's ``step`` is the one point between the two (after the
    gradients are reduced; before DeepSpeed's own clipping for ZeRO-1/2/3, after it otherwise)."""
    hooks: Optional[Dict[str, Callable[[], None]]] = ds_optimizer.__dict__.get(_HOOKS)
    if hooks is None:
        hooks = {}
        orig = ds_optimizer.step

        def step(*args, **kwargs):
            for f in list(hooks.values()):
                f()
            return orig(*args, **kwargs)

        ds_optimizer.step = step
        ds_optimizer.__dict__[_HOOKS] = hooks
    if tag in hooks:
        raise RuntimeError(f"the DeepSpeed optimizer's step already runs a {tag} (a second SORSACallback, or a "
                           "second Trainer on the same engine): the regularizer would be applied twice; use one "
                           "callback per engine")
    hooks[tag] = fn

    def undo() -> None:
        if hooks.get(tag) is fn:
            del hooks[tag]

    return undo
