"""Whole tensors from, and back into, dim-0-sharded DTensor parameters (FSDP2's ``fully_shard``).

The SVD init needs each weight whole, on one rank only: the rank that decomposes it. These helpers
move one parameter at a time between its shards and one rank with point-to-root collectives
(``gather`` / ``scatter``: every rank sends or receives its own shard, and no rank but the root
ever holds the whole tensor), for 1-D device meshes over the whole default process group with a
``Shard(0)`` placement, FSDP2's default. A shard is ``torch.chunk``'s piece for its rank (FSDP2 and
DTensor split dim 0 so; checked against the local shape); collectives carry shards padded to the
largest one. Every rank must call them, in the same order.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def is_dtensor(p: torch.Tensor) -> bool:
    """Whether ``p`` (or a Parameter's data) is a ``torch.distributed.tensor.DTensor``."""
    data = p.data if isinstance(p, torch.nn.Parameter) else p
    if type(data) is torch.Tensor:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(data, DTensor)


def check_layout(params: Sequence[torch.Tensor], who: str) -> None:
    """Raise a clear error unless every param is a DTensor sharded on dim 0 over a 1-D mesh that
    spans the whole default process group, in rank order (what the helpers below support)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}: sharded (DTensor) weights need the initialised torch.distributed process group")
    world = dist.get_world_size()
    for p in params:
        if not is_dtensor(p):
            raise ValueError(f"{who}: a layer mixes DTensor and plain parameters; shard each SORSA layer whole "
                             f"(fully_shard after apply_sorsa)")
        mesh = p.device_mesh
        ranks = mesh.mesh.flatten().tolist()
        if mesh.ndim != 1 or ranks != list(range(world)):
            raise ValueError(f"{who}: sharded weights must live on a 1-D device mesh over all {world} ranks in order "
                             f"(FSDP2's default); got a mesh of shape {tuple(mesh.mesh.shape)} over ranks {ranks} "
                             f"(HSDP and tensor-parallel meshes are not supported)")
        if tuple(p.placements) != (Shard(0),):
            raise ValueError(f"{who}: sharded weights must have placements (Shard(0),) (FSDP2's default), got "
                             f"{tuple(p.placements)}")


def _pieces(n: int, world: int) -> List[int]:
    """Rows of each rank's shard of an n-row tensor: ``torch.chunk``'s pieces, then empty ones."""
    step = -(-n // world) if n else 0
    return [max(0, min(step, n - k * step)) for k in range(world)]


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``p`` (a view: writes reach the parameter), its size checked."""
    import torch.distributed as dist

    local = p.data.to_local()
    want = _pieces(p.shape[0], dist.get_world_size())[dist.get_rank()]
    if local.shape[0] != want or tuple(local.shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(f"unexpected shard shape {tuple(local.shape)} of a {tuple(p.shape)} DTensor on rank "
                         f"{dist.get_rank()}: expected torch.chunk's {want} rows")
    return local


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def gather_to(p: torch.Tensor, dst: int, device: torch.device) -> Optional[torch.Tensor]:
    """``p`` whole (a new tensor on ``device``) on rank ``dst``; None on the others. A collective."""
    import torch.distributed as dist

    from ._zero3 import comm_device

    world, comm = dist.get_world_size(), comm_device(dist)
    pieces = _pieces(p.shape[0], world)
    local = _padded(_local(p).detach(), max(pieces)).to(comm)
    bufs = [torch.empty_like(local) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(local, bufs, dst=dst)
    if bufs is None:
        return None
    return torch.cat([b[:k] for b, k in zip(bufs, pieces)]).to(device)


def scatter_from_(p: torch.Tensor, full: Optional[torch.Tensor], src: int) -> None:
    """Write rank ``src``'s whole tensor ``full`` (ignored elsewhere) into every rank's shard of
    ``p``, in ``p``'s dtype. A collective."""
    import torch.distributed as dist

    from ._zero3 import comm_device

    world, comm = dist.get_world_size(), comm_device(dist)
    local = _local(p)
    pieces = _pieces(p.shape[0], world)
    out = torch.empty((max(pieces), *p.shape[1:]), dtype=p.dtype, device=comm)
    chunks = None
    if dist.get_rank() == src:
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"scatter_from_: shape {tuple(full.shape)} does not match the parameter's {tuple(p.shape)}")
        rows = torch.split(full.to(device=comm, dtype=p.dtype), pieces)
        chunks = [_padded(r, max(pieces)) for r in rows]
    dist.scatter(out, chunks, src=src)
    local.copy_(out[: local.shape[0]])


def write_rows_(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of ``full`` (the same whole tensor on every rank) into its shard."""
    import torch.distributed as dist

    local = _local(p)
    start = sum(_pieces(p.shape[0], dist.get_world_size())[: dist.get_rank()])
    local.copy_(full[start: start + local.shape[0]])
