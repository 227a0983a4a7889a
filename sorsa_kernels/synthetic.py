"""Synthetic weight stacks with pretrained-LLM-like spectra, for tests and benchmarks.

``synthetic_weights(count, m, n, device=..., dtype=..., seed=..., family=...)`` returns
``(count, m, n)`` matrices ``W = U·diag(s)·Vᵀ + noise`` with

* ``family="llm"``: ``s_i = i^-0.5`` (the power-law head of pretrained projections),
* ``family="flat"``: ``s_i = i^-0.25`` (a flatter head: smaller gaps, harder for rsvd),

plus an i.i.d. Gaussian bulk of entry std ``0.1/sqrt(max(m, n))`` (operator norm ≈ 0.1·(1+sqrt(min/max))),
which gives the flat noise tail seen in real weights. The exact σ are not the ``s_i`` (the bulk
shifts them): take them from an exact SVD, as the benchmarks do.

Generation is cheap on any device: no per-matrix m×m QR. The orthogonal factors are Kronecker
products ``Q₁⊗Q₂`` of two small random orthogonal matrices (sizes a·b = m, a ≈ √m, so the QRs are
of ~64×64 and ~172×172 matrices), with random column permutations and two Householder
reflections per side to break the tensor structure. Applying ``Q₁⊗Q₂`` to an m×n matrix costs
``2·m·n·(a+b)`` flops (≈ 19 GFLOP at 4096×11008, against ~10× that for one 4096² QR).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

FAMILIES = {"llm": 0.5, "flat": 0.25}
NOISE = 0.1


def _split(m: int) -> Tuple[int, int]:
    """m = a·b with a the largest divisor ≤ √m (a = 1 for a prime m: then Q₂ is one m×m QR)."""
    a = int(math.isqrt(m))
    while m % a:
        a -= 1
    return a, m // a


def _orthogonal(count: int, k: int, g: torch.Generator, device) -> torch.Tensor:
    """(count, k, k) Haar-random orthogonal matrices (QR of a Gaussian with sign-fixed R)."""
    Q, R = torch.linalg.qr(torch.randn(count, k, k, generator=g, device=device, dtype=torch.float32))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).add(0.5).sign()[:, None, :]


def _kron_apply(X: torch.Tensor, Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """(Q₁⊗Q₂)·X for X (count, a·b, n), without forming the Kronecker product."""
    c, m, n = X.shape
    a, b = Q1.shape[-1], Q2.shape[-1]
    Y = X.reshape(c, a, b * n)
    Y = (Q1 @ Y).reshape(c, a, b, n)  # mixes the a-index
    return (Q2[:, None] @ Y).reshape(c, m, n)  # mixes the b-index


def _householder_(X: torch.Tensor, g: torch.Generator, reflections: int = 2) -> torch.Tensor:
    """X ← H_k…H_1·X with random unit-vector Householder reflections (O(m·n) each)."""
    c, m, _ = X.shape
    for _ in range(reflections):
        v = torch.randn(c, m, 1, generator=g, device=X.device, dtype=X.dtype)
        v = v / v.norm(dim=1, keepdim=True)
        X.sub_(2 * v @ (v.mT @ X))
    return X


@torch.no_grad()
def synthetic_weights(
    count: int,
    m: int,
    n: int,
    device=None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    family: str = "llm",
) -> torch.Tensor:
    """``(count, m, n)`` weights with an LLM-like spectrum (see the module doc), generated on
    ``device`` in float32 and returned in ``dtype``; deterministic for a given seed and device."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if count < 1 or m < 1 or n < 1:
        raise ValueError(f"count, m and n must be >= 1, got {(count, m, n)}")
    device = torch.device(device or "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    p = min(m, n)
    s = torch.arange(1, p + 1, device=device, dtype=torch.float32) ** -FAMILIES[family]
    # X = the m×n "diagonal" s placed at random (row, column) positions: a permuted diag(s)
    rows = torch.rand(count, m, generator=g, device=device).argsort(dim=1)[:, :p]
    cols = torch.rand(count, n, generator=g, device=device).argsort(dim=1)[:, :p]
    X = torch.zeros(count, m, n, device=device, dtype=torch.float32)
    X[torch.arange(count, device=device)[:, None], rows, cols] = s
    (a1, b1), (a2, b2) = _split(m), _split(n)
    X = _kron_apply(X, _orthogonal(count, a1, g, device), _orthogonal(count, b1, g, device))
    X = _householder_(X, g)
    Xt = _kron_apply(X.mT.contiguous(), _orthogonal(count, a2, g, device), _orthogonal(count, b2, g, device))
    X = _householder_(Xt, g).mT
    X += torch.randn(count, m, n, generator=g, device=device, dtype=torch.float32) * (NOISE / math.sqrt(max(m, n)))
    return X.to(dtype).contiguous()


def llm_like_weights(count: int, m: int, n: int, device=None, dtype: torch.dtype = torch.float32,
                     seed: int = 0, family: str = "llm") -> torch.Tensor:
    """Alias of :func:`synthetic_weights` (the benchmarks' historical name)."""
    return synthetic_weights(count, m, n, device=device, dtype=dtype, seed=seed, family=family)


def exact_sigmas(W: torch.Tensor, r: int) -> torch.Tensor:
    """Top-``r`` singular values of each matrix of ``W``: fp64 on CPU, fp32 on GPU (fp64 SVD of
    thousands-wide matrices is slow there; fp32's ~1e-6 relative error is far below the ~1e-3
    errors measured)."""
    Wd = W.double() if W.device.type == "cpu" else W.float()
    return torch.linalg.svdvals(Wd)[..., :r].double()


def max_rel_sigma_err(S: torch.Tensor, exact: torch.Tensor) -> float:
    """max_i |S_i − σ_i| / σ_i over the batch."""
    return ((S.double() - exact).abs() / exact).max().item()
