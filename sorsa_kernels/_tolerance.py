"""The tolerance rule every fused result is held to (flash-attention's): the fused output's error
against a high-precision reference may be at most twice the plain-torch path's error in the same
low precision, plus a small floor scaled by the reference's magnitude. Used by
``sorsa-kernels check`` and by the dispatcher's verification (the tests keep their own copy in
``tests/conftest.py``, so the rule the package applies is itself under test)."""
from __future__ import annotations

from typing import Tuple

import torch

# absolute floor of the rule by the output's dtype (a few ulps at unit scale)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rule(out: torch.Tensor, lowp: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float, float]:
    """``(err, tol, base)``: the fused error, the bound it must stay within and the torch path's
    error, all against ``ref`` in ``ref``'s dtype; ``err`` is inf for a non-finite output."""
    base = (lowp.to(ref.dtype) - ref).abs().max().item()
    tol = 2 * base + FLOOR.get(out.dtype, 1e-5) * max(1.0, ref.abs().max().item())
    err = (out.to(ref.dtype) - ref).abs().max().item() if torch.isfinite(out).all() else float("inf")
    return err, tol, base
