"""``sorsa-kernels check`` case of the batched randomized SVD: the extension's singular values vs
the torch path's, both against float64 (rsvd is approximate by design: the rule compares errors)."""
from __future__ import annotations

import torch

from ..._env import ext_status
from ...check import Case, Skipped, time_ms
from . import rsvd


def run(case: Case, device: torch.device, fault: bool):
    ok, _, why = ext_status()
    if not ok:  # not a kernel failure: the extension is not built for this torch
        raise Skipped(f"rsvd's extension is not loaded: {why}")
    n, m, k, r = case.shape
    W = torch.randn(n, m, k, generator=torch.Generator().manual_seed(0)).to(device)
    exact = torch.linalg.svdvals(W.double())[:, :r]

    def run(backend):
        S = rsvd(W, r, backend=backend, seed=0)[1]
        return S, lambda: rsvd(W, r, backend=backend, seed=0)
    got, t_fused = run("ext")
    lowp, t_torch = run("torch")
    if fault:
        got = got + 1.0
    # rsvd is approximate by design: the rule compares its σ error with the torch path's
    err = ((got.double() - exact).abs() / exact).max().item()
    base = ((lowp.double() - exact).abs() / exact).max().item()
    return {"sigma": err / (2 * base + 1e-6)}, time_ms(t_fused, device), time_ms(t_torch, device)


CASES = [Case("rsvd ext fp32 8x1024x1024 r64", "rsvd", "float32", (8, 1024, 1024, 64), run),
         Case("rsvd ext fp32 2x64x48 r5", "rsvd", "float32", (2, 64, 48, 5), run, gpu=False, interpret=True)]
