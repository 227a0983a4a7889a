"""``sorsa-kernels check`` cases of the 4-bit linear op: forward and gradients of the fused path
vs the torch path and a float64 reference on the dequantized residual (no dropout: the masks of
the two backends differ; the linear op's own cases check the fused mask)."""
from __future__ import annotations

import torch

from ...check import Case, Skipped
from ..linear.check import score
from ...quant import quantize
from . import OP, sorsa_linear_4bit, sorsa_linear_4bit_naive


def run(case: Case, device: torch.device, fault: bool):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skipped('bitsandbytes is not installed (pip install "sorsa-kernels[quant]")') from None
    M, K, N, r = case.shape
    dt = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    o = dict(x=rn(M, K), A=rn(r, K) / K ** 0.5, S=rn(r).abs() + 0.5, B=rn(N, r) / N ** 0.5, b=rn(N), dy=rn(M, N))
    q = quantize((rn(N, K) / K ** 0.5).to(device, dt), "nf4", 64, True)

    def go(impl: str, dtype, dev):
        x, A, S, B, b = (o[k].to(dev, dtype).requires_grad_() for k in ("x", "A", "S", "B", "b"))
        dy = o["dy"].to(dev, dtype)

        def fwd():
            if impl == "naive":
                return sorsa_linear_4bit_naive(x, q, A, S, B, 0.5, b)
            return sorsa_linear_4bit(x, q, A, S, B, 0.5, b, backend=impl)
        y = fwd()
        grads = torch.autograd.grad(y, (x, A, S, B, b), dy)
        return [y.detach()] + list(grads), lambda: torch.autograd.grad(fwd(), (x, A, S, B, b), dy)

    ref, _ = go("naive", torch.float64, device)
    lowp, t_torch = go("torch", dt, device)
    got, t_fused = go("triton", dt, device)
    return score(ref, lowp, got, t_fused, t_torch, device, fault)


CASES = [
    Case("linear4bit bf16 2048x4096->4096 r16 nf4", OP, "bfloat16", (2048, 4096, 4096, 16), run),
    Case("linear4bit bf16 ragged 1000x4000->4097 r33 nf4", OP, "bfloat16", (1000, 4000, 4097, 33), run),
    Case("linear4bit fp32 37x96->80 r5 nf4", OP, "float32", (37, 96, 80, 5), run, gpu=False, interpret=True),
]
