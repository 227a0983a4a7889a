"""The torch path of the SORSA linear op: unfused, factored (``B·diag(S)·A`` is never formed),
cuBLAS/MKL GEMMs; the formulas of the backward are in :mod:`sorsa_kernels.ops.linear.op`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_mask(x2: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Keep-mask of the torch backend, regenerated from ``seed`` in backward (never saved).

    ``seed`` is a CPU tensor (see :func:`sorsa_kernels.ops.linear.sorsa_linear`), so reading it
    never waits for the GPU.
    """
    if x2.device.type == "meta":  # shapes only (meta forward, fake tensors)
        return torch.empty(x2.shape, dtype=torch.bool, device="meta")
    g = torch.Generator(device=x2.device).manual_seed(int(seed.reshape(-1)[0]))
    return torch.rand(x2.shape, generator=g, device=x2.device) >= p


def forward(x2, weight, A, S, B, bias, scale: float, p: float, seed):
    """Unfused factored forward: ``(y, xa)`` with ``xa = drop(x)·Aᵀ`` in fp32 (saved for backward).
    Never materialises B·diag(S)·A; the up-projection accumulates into y in one addmm."""
    dt = x2.dtype
    xd = x2 * keep_mask(x2, p, seed).to(dt) / (1.0 - p) if p > 0 else x2
    xa = xd @ A.to(dt).t()
    y = F.linear(x2, weight, None if bias is None else bias.to(dt))
    y = torch.addmm(y, xa * (S.to(dt) * scale), B.to(dt).t())
    return y, xa.float()


def backward(dy, x2, weight, A, S, B, xa, scale: float, p: float, seed, need_dx: bool,
               need_dA: bool = True, need_dB: bool = True):
    """Unfused backward: ``(dx, dA, dS, dB)`` from the formulas in the module docstring;
    gradients that are not needed come back as ``None`` (not computed)."""
    dt = dy.dtype
    Sf = S.float() * scale
    g = (dy @ B.to(dt)).float()
    dS = (g * xa).sum(0) * scale
    gs = (g * Sf).to(dt)
    dB = (dy.t() @ (xa * Sf).to(dt)).to(B.dtype) if need_dB else None
    keep = keep_mask(x2, p, seed).to(dt) / (1.0 - p) if p > 0 and (need_dA or need_dx) else None
    dA = (gs.t() @ (x2 if keep is None else x2 * keep)).to(A.dtype) if need_dA else None
    dx = None
    if need_dx:
        up = gs @ A.to(dt)
        dx = dy @ weight + (up if keep is None else up * keep)
    return dx, dA, dS.to(S.dtype), dB


def eager(x2, weight, A, S, B, bias, scale: float, p: float = 0.0, seed=None):
    """:func:`forward` as plain autograd ops, for eager fp32 CPU calls: the same GEMMs, the same
    mask from the same seed and every gradient, without the custom op's per-call dispatch and
    autograd node (~0.2 ms on the CPU: more than a small layer's whole adapter branch; PEFT's
    forward was 2.25× faster at 64×64, r = 4). Autograd keeps the dropped input for backward
    instead of regenerating the mask (drawn once, not twice)."""
    dt = x2.dtype
    xd = x2 * keep_mask(x2, p, seed).to(dt) / (1.0 - p) if p > 0 else x2
    y = F.linear(x2, weight, None if bias is None else bias.to(dt))
    return torch.addmm(y, (xd @ A.to(dt).t()) * (S.to(dt) * scale), B.to(dt).t())
