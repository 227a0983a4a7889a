"""SVD initialisation of SORSA adapters: ``W = W_r + scale·B·diag(S)·A``.

``method="svd"``: exact ``torch.linalg.svd``; ``method="rsvd"``: the batched randomized SVD
(:func:`sorsa_kernels.rsvd`), which is what :func:`sorsa_kernels.apply_sorsa` uses by default.
Either way ``W_r`` is computed from the adapters *as stored*, so ``W_r + scale·B·diag(S)·A``
reproduces ``W`` to rounding whatever the SVD's accuracy: the model's function is unchanged at init.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Sequence, Tuple

import torch

from ._validate import check_finite, check_rank
from .rsvd import rsvd

INIT_METHODS = ("svd", "rsvd")
DEFAULT_CHUNK_BYTES = 1 << 30


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def svd_factors(W: torch.Tensor, r: int, method: str = "svd", **svd_kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` singular triplets ``(U (…,m,r), S (…,r), Vh (…,r,n))`` of ``W`` (batched over
    leading dims) in float32 (float64 for float64 ``W``), whatever ``W``'s storage dtype."""
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    if method == "rsvd":
        return rsvd(W, r, **svd_kwargs)
    if svd_kwargs:
        raise TypeError(f"method='svd' takes no extra arguments, got {sorted(svd_kwargs)}")
    check_finite("weight", W)  # rsvd checks its own input: each path checks exactly once
    U, S, Vh = torch.linalg.svd(W.to(_work_dtype(W)), full_matrices=False)
    return U[..., :r], S[..., :r], Vh[..., :r, :]


def adapters_from_factors(W, U, S, Vh, scale: float, weight_dtype=None, adapter_dtype=None):
    """``(W_r, A, S, B)`` with ``B = U``, ``A = Vh`` rounded to ``adapter_dtype`` and ``W_r`` computed
    from the rounded adapters in the working precision, then rounded to ``weight_dtype``."""
    weight_dtype = weight_dtype or W.dtype
    adapter_dtype = adapter_dtype or weight_dtype
    A, S_, B = Vh.to(adapter_dtype), S.to(adapter_dtype), U.to(adapter_dtype)
    work = _work_dtype(W)
    W_r = W.to(work) - scale * (B.to(work) * S_.to(work)[..., None, :]) @ A.to(work)
    return W_r.to(weight_dtype), A.contiguous(), S_.contiguous(), B.contiguous()


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
    """Split ``W`` (out×in, or a batch ``(…, out, in)``) into ``(W_r, A, S, B)`` with
    ``B = U[:, :r]``, ``S = Σ[:r]``, ``A = Vᵀ[:r]`` and ``W_r = W − scale·B·diag(S)·A``.

    The SVD runs in float32 (float64 for float64 weights) even for bf16/fp16 weights."""
    out_f, in_f = W.shape[-2:]
    check_rank(r, in_f, out_f)
    if r == 0:
        raise ValueError("r must be >= 1 to initialise SORSA adapters, got 0")
    U, S, Vh = svd_factors(W, r, method, **svd_kwargs)
    return adapters_from_factors(W, U, S, Vh, scale, weight_dtype, adapter_dtype)


@torch.no_grad()
def init_layers(
    layers: Sequence,
    method: str = "rsvd",
    weight_dtype: Optional[torch.dtype] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    **svd_kwargs,
) -> None:
    """Initialise many SORSA layers at once.

    Layers are grouped by (shape up to transposition, rank, dtype, device) — an out×in and an
    in×out weight share a batch, one of them transposed — and each group is decomposed in
    batched calls over chunks of at most ``chunk_bytes`` of float32 weights. ``progress``
    shows a tqdm bar over layers.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    groups = defaultdict(list)
    for layer in layers:
        if layer.r == 0:
            raise ValueError("sorsa_init needs r >= 1; a layer has r = 0 (no adapters)")
        out_f, in_f = layer.weight.shape
        groups[(max(out_f, in_f), min(out_f, in_f), layer.r, layer.weight.dtype, layer.weight.device)].append(layer)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(layers), desc="SORSA init", unit="layer")
        except ImportError:
            bar = None
    try:
        for (m, n, r, _, _), members in groups.items():
            per_chunk = max(1, chunk_bytes // (4 * m * n * 3))  # weights + fp32 copy + workspace
            for c in range(0, len(members), per_chunk):
                chunk = members[c:c + per_chunk]
                Ws = [layer.effective_weight() for layer in chunk]
                flip = [W.shape[0] < W.shape[1] for W in Ws]  # orient every matrix as m×n, m ≥ n
                stack = torch.stack([W.mT if f else W for W, f in zip(Ws, flip)])
                U, S, Vh = svd_factors(stack, r, method, **svd_kwargs)
                for i, (layer, W, f) in enumerate(zip(chunk, Ws, flip)):
                    Ui, Vhi = (Vh[i].mT, U[i].mT) if f else (U[i], Vh[i])
                    layer.set_decomposition(*adapters_from_factors(
                        W, Ui, S[i], Vhi, layer.scale, weight_dtype or layer.weight.dtype, adapter_dtype))
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
