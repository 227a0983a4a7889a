"""SORSA layers on DeepSpeed ZeRO-3 models (``deepspeed.zero.Init``, or transformers'
``from_pretrained`` with a ZeRO-3 config): the pieces :func:`sorsa_kernels.apply_sorsa` and
:func:`sorsa_kernels.init.init_layers` need beyond gathering (:mod:`sorsa_kernels._zero3`).

Imported only when a model holds ZeRO-3 partitioned parameters; imports deepspeed only then.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .._zero3 import is_partitioned


def check_partitioned_over_world(params: Sequence[torch.Tensor], who: str) -> None:
    """The init shares chunks out over the default process group and writes each through
    ``GatheredParameters(modifier_rank=owner)``: every partitioned parameter must be spread over
    all ranks (not a sub-group, as with MiCS or a ZeRO data-parallel group smaller than the job)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}: the weights are DeepSpeed ZeRO-3 partitions but torch.distributed is not "
                           f"initialised (deepspeed.init_distributed() first)")
    world = dist.get_world_size()
    for p in params:
        if is_partitioned(p) and dist.get_world_size(group=p.ds_process_group) != world:
            raise NotImplementedError(
                f"{who}: a ZeRO-3 parameter is partitioned over {dist.get_world_size(group=p.ds_process_group)} of "
                f"the {world} ranks (MiCS or a data-parallel sub-group); SORSA init needs parameters partitioned "
                f"over all ranks")


@torch.no_grad()
def partition_like(ref: nn.Parameter, params: Sequence[nn.Parameter]) -> None:
    """Make the plain ``params`` (full and equal on every rank) ZeRO-3 parameters partitioned as
    ``ref`` is (its ``zero.Init``'s group, device and offload): what ``deepspeed.initialize``
    would do to them, but now, so no rank keeps full copies until then. A collective."""
    todo = [p for p in params if not is_partitioned(p)]
    if todo:
        ref.convert_to_zero_parameters(todo)


@contextlib.contextmanager
def paused_zero_init() -> Iterator[None]:
    """Inside an active ``deepspeed.zero.Init`` block, suspend its module and tensor-creation
    patches (as ``deepspeed.initialize`` does), so a new SORSA layer is built plainly and then
    partitioned explicitly by :func:`partition_like`, never twice, and the init's float tensors are
    created in the dtype it asks for (the patched constructors would make them the model's dtype).
    Nested uses pause once."""
    from deepspeed.runtime.zero import partition_parameters as pp

    active = pp.top_level_context is not None and getattr(pp.top_level_context, "patched", False)
    if active:
        pp.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            pp.restore_init_context()
