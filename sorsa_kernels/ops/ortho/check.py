"""``sorsa-kernels check`` cases of the orthonormal regularizer: value and gradients of the fused
path vs the torch path and a float64 reference, on near-orthonormal adapters as in training."""
from __future__ import annotations

import torch

from ...check import Case, ratio, time_ms
from ...regularizer import ortho_loss


def run(case: Case, device: torch.device, fault: bool):
    n, L1, L2, r = case.shape
    dt = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    mats = []
    for i in range(n):  # near-orthonormal adapters, as in training
        L = L1 if i % 2 == 0 else L2
        q = torch.linalg.qr(torch.randn(L, r, generator=g, dtype=torch.float64))[0]
        mats.append((q + 1e-3 * torch.randn(L, r, generator=g, dtype=torch.float64)).t().contiguous())
    a, b = mats[0::2], [m.t().contiguous() for m in mats[1::2]]

    def run(backend, dtype):
        A = [m.to(device, dtype).requires_grad_() for m in a]
        B = [m.to(device, dtype).requires_grad_() for m in b]
        v = ortho_loss(a=A, b=B, backend="torch" if backend == "float64" else backend)
        gr = torch.autograd.grad(v, A + B)
        return [v.detach().reshape(1)] + list(gr), lambda: torch.autograd.grad(
            ortho_loss(a=A, b=B, backend="torch" if backend == "float64" else backend), A + B)

    ref, _ = run("float64", torch.float64)
    lowp, t_torch = run("torch", dt)
    got, t_fused = run("triton", dt)
    if fault:
        got[0] = got[0] + 1.0
    ratios = {("value" if i == 0 else f"grad{i - 1}"): ratio(x.cpu(), lp.cpu(), rf.cpu())
              for i, (x, lp, rf) in enumerate(zip(got, lowp, ref))}
    return ratios, time_ms(t_fused, device), time_ms(t_torch, device)


OP = "orthonormal_grad"
CASES = [
    Case("ortho bf16 4 adapters 4096/11008 r128", OP, "bfloat16", (4, 4096, 11008, 128), run),
    Case("ortho fp32 4 adapters 1000/777 r33", OP, "float32", (4, 1000, 777, 33), run),
    Case("ortho fp32 2 adapters 40/37 r5", OP, "float32", (2, 40, 37, 5), run, gpu=False, interpret=True),
]
