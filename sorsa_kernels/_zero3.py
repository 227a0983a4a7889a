"""DeepSpeed ZeRO-3 partitioned parameters, for adapter files and checkpoints.

Under ZeRO-3 every parameter outside a module's forward is a placeholder (empty local tensor,
``ds_id`` / ``ds_shape`` attributes) whose data is spread over the ranks. These helpers find such
parameters, gather one module's at a time (a collective: every rank must call them in the same
order), write values back from one rank, and keep the ZeRO optimizer's fp32 master copy in step
(under ZeRO-1/2 too, whose parameters are whole but whose optimizer keeps its own fp32 copy).
deepspeed is imported only when a model holds such parameters (or, for the device of a
collective, when it is imported already).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Dict, Iterable, Iterator, Tuple

import torch
import torch.nn as nn


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id")


def is_zero3_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is ZeRO-3 partitioned."""
    return any(is_partitioned(p) for p in model.parameters())


def full_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """The shape of ``p`` as a whole (a partitioned parameter's local tensor is empty)."""
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank=None) -> Iterator[None]:
    """Inside, the partitioned ones of ``params`` hold their full data on every rank; on exit,
    ``modifier_rank``'s values (if given) are re-partitioned, else the gathered copies are freed.
    A no-op without partitioned parameters; a collective otherwise."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def comm_device(dist=None) -> torch.device:
    """The device of a small tensor for a collective of ``dist``'s (default ``torch.distributed``)
    default process group: the CPU under gloo (its own device: no copy); else, when deepspeed is
    imported, its accelerator's current device (NCCL on CUDA, but also HCCL, XCCL, CCL...); else
    the current CUDA device under NCCL and the CPU under any other backend."""
    dist = torch.distributed if dist is None else dist
    backend = str(dist.get_backend())
    if backend == "gloo":
        return torch.device("cpu")
    if "deepspeed" in sys.modules:  # imported by whoever started DeepSpeed: its accelerator is set
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def agree(ok: bool, what: str) -> None:
    """A barrier that also fails on every rank when ``ok`` is False on any: a rank that fails
    alone (a write error on the writer, a file missing on one node) must not leave the others
    waiting in a collective forever. Raises ``RuntimeError`` on the ranks that did not fail."""
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()):
        return
    flag = torch.tensor([0 if ok else 1], device=comm_device(d))
    d.all_reduce(flag)
    if int(flag.item()) and ok:
        raise RuntimeError(f"{what} failed on another rank (see its error)")


@contextlib.contextmanager
def all_or_none(what: str, collective: bool = True) -> Iterator[None]:
    """Run the block on every rank, then :func:`agree` on whether it succeeded everywhere: the
    rank that failed re-raises its own error, the others a ``RuntimeError`` naming ``what``, so
    no rank goes on into a collective the failed one never reaches. ``collective=False``
    (a model without ZeRO parameters): just run the block."""
    if not collective:
        yield
        return
    try:
        yield
    except Exception:
        agree(False, what)
        raise
    agree(True, what)


def local_slice(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's partition of the full ``value`` of the partitioned ``p`` (``value``'s dtype):
    DeepSpeed pads the flattened parameter with zeros to ``partition_numel() * world`` elements,
    in partition-group rank order, so the last ranks' slices are short (or empty) and padded here."""
    n = p.partition_numel()
    me = torch.distributed.get_rank(group=getattr(p, "ds_process_group", None))
    flat = value.detach().reshape(-1)
    local = flat[min(me * n, flat.numel()):(me + 1) * n]
    return torch.cat([local, local.new_zeros(n - local.numel())]) if local.numel() < n else local


def set_master(p: torch.Tensor, value: torch.Tensor) -> None:
    """Give a trainable parameter's fp32 master copy (kept by a ZeRO optimizer apart from the
    module's parameter, which it overwrites at the next step) the full ``value``. ZeRO-3: this
    rank's (padded) partition; ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the fragment this rank
    owns, if any. No communication, so every rank calls it with the same value; a no-op for a
    parameter no ZeRO optimizer holds."""
    if is_partitioned(p):
        if p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_set_local_fp32_param

            # not safe_set_full_fp32_param: its slice ignores the padding, failing on the last rank
            # whenever the numel is not a multiple of the world size
            safe_set_local_fp32_param(p, local_slice(p, value).to(torch.float32))
    elif getattr(p, "_hp_mapping", None) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(torch.float32))


def is_zero12_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are held by a ZeRO-1/2 (or bf16) DeepSpeed optimizer with an
    fp32 master copy (DeepSpeed links every parameter it optimises, ``_hp_mapping``, on every rank,
    ``None`` where this rank owns no fragment of it)."""
    return any(hasattr(p, "_hp_mapping") for p in model.parameters())


@torch.no_grad()
def gathered_state_dict(model: nn.Module, writer: int = 0) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every partitioned parameter's full data, as CPU copies on rank
    ``writer`` (an empty dict elsewhere). Gathers one module's own parameters at a time, so no
    rank ever holds more than one module's full parameters besides the writer's CPU copies."""
    full: Dict[int, torch.Tensor] = {}
    me = rank()
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if is_partitioned(p) and id(p) not in full]
        if not own:
            continue
        with gathered(own):
            for p in own:
                full[id(p)] = p.detach().to("cpu", copy=True) if me == writer else torch.empty(0)
    if me != writer:
        return {}
    return {k: full[id(v)] if id(v) in full else v.detach().to("cpu")
            for k, v in model.state_dict(keep_vars=True).items()}
