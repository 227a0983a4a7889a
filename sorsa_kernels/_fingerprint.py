"""A cheap fingerprint of a base weight: saved with adapters, compared when they are loaded
(a leaf module: the adapter format and the 4-bit layer both take it at init)."""
from __future__ import annotations

import torch

_FP_PROJECTIONS = 4
_FP_CHUNK = 1 << 20


def base_fingerprint(W: torch.Tensor) -> dict:
    """Cheap float64 statistics of an out×in base weight ``W`` (any device and dtype): numel,
    sum, sum of squares and ``_FP_PROJECTIONS`` sums of ``W`` against fixed ±1 patterns of the
    flat index (these also catch permuted or transposed weights). One pass, chunked."""
    flat = W.detach().reshape(-1)
    stats = torch.zeros(2 + _FP_PROJECTIONS, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _FP_CHUNK):
        x = flat[start:start + _FP_CHUNK].to(torch.float64)
        idx = torch.arange(start, start + x.numel(), device=flat.device, dtype=torch.int64)
        h = (idx * 2654435761) & 0xFFFFFFFF  # Knuth's multiplicative hash: well-mixed bits
        signs = [1.0 - 2.0 * ((h >> (7 + 5 * k)) & 1).to(torch.float64) for k in range(_FP_PROJECTIONS)]
        stats += torch.stack([x.sum(), (x * x).sum()] + [(x * s_).sum() for s_ in signs])
    v = stats.tolist()
    return {"numel": flat.numel(), "sum": v[0], "sumsq": v[1], "proj": v[2:]}
