"""SVD initialisation of SORSA adapters: ``W = W_r + scale·B·diag(S)·A``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._validate import check_finite, check_rank

INIT_METHODS = ("svd",)


def svd_factors(W: torch.Tensor, r: int, method: str = "svd", **svd_kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` singular triplets ``(U (m,r), S (r,), Vh (r,n))`` of ``W`` in float32
    (float64 when ``W`` is float64), whatever ``W``'s storage dtype."""
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    if svd_kwargs:
        raise TypeError(f"method='svd' takes no extra arguments, got {sorted(svd_kwargs)}")
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(W.to(work), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


@torch.no_grad()
def sorsa_decompose(
    W: torch.Tensor,
    r: int,
    scale: float,
    weight_dtype: Optional[torch.dtype] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    method: str = "svd",
    **svd_kwargs,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``W`` (out×in) into ``(W_r, A, S, B)`` with ``B = U[:, :r]``, ``S = Σ[:r]``,
    ``A = Vᵀ[:r]`` and ``W_r = W − scale·B·diag(S)·A``.

    The SVD runs in float32 (float64 for float64 weights) even for bf16/fp16 weights.
    ``W_r`` is computed in that precision from the adapters *as stored* (rounded to
    ``adapter_dtype``), so ``W_r + scale·B·diag(S)·A`` reproduces ``W`` up to the final
    rounding of ``W_r`` to ``weight_dtype``.
    """
    out_f, in_f = W.shape
    check_rank(r, in_f, out_f)
    if r == 0:
        raise ValueError("r must be >= 1 to initialise SORSA adapters, got 0")
    check_finite("weight", W)
    weight_dtype = weight_dtype or W.dtype
    adapter_dtype = adapter_dtype or weight_dtype
    U, S, Vh = svd_factors(W, r, method, **svd_kwargs)
    A, S_, B = Vh.to(adapter_dtype), S.to(adapter_dtype), U.to(adapter_dtype)
    work = U.dtype
    W_r = W.to(work) - scale * (B.to(work) * S_.to(work)) @ A.to(work)
    return W_r.to(weight_dtype), A.contiguous(), S_.contiguous(), B.contiguous()
