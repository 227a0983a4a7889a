"""DeepSpeed ZeRO-3 partitioned parameters, for adapter files and checkpoints.

Under ZeRO-3 every parameter outside a module's forward is a placeholder (empty local tensor,
``ds_id`` / ``ds_shape`` attributes) whose data is spread over the ranks. These helpers find such
parameters, gather one module's at a time (a collective: every rank must call them in the same
order), write values back from one rank, and keep the ZeRO optimizer's fp32 master copy in step.
deepspeed is imported only when a model holds partitioned parameters.
"""
from __future__ import annotations

import contextlib
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


def agree(ok: bool, what: str) -> None:
    """A barrier that also fails on every rank when ``ok`` is False on any: a rank that fails
    alone (a write error on the writer, a file missing on one node) must not leave the others
    waiting in a collective forever. Raises ``RuntimeError`` on the ranks that did not fail."""
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()):
        return
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(d.get_backend()) else "cpu"
    flag = torch.tensor([0 if ok else 1], device=device)
    d.all_reduce(flag)
    if int(flag.item()) and ok:
        raise RuntimeError(f"{what} failed on another rank (see its error)")


def set_master(p: torch.Tensor, value: torch.Tensor) -> None:
    """Give a trainable partitioned parameter's fp32 master copy (kept by the ZeRO-3 optimizer
    apart from the module's parameter, which it overwrites at the next step) the full ``value``;
    local to this rank's partition, so every rank calls it with the same value."""
    if is_partitioned(p) and p.requires_grad and getattr(p, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(torch.float32))


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
