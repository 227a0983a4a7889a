"""``sorsa-kernels check`` cases of the linear op: forward and gradients of the fused path vs the
torch path and a float64 reference (dropout cases replay the kernels' documented mask)."""
from __future__ import annotations

import numpy as np
import torch

from ...check import Case, ratio, time_ms
from .op import fwd_op
from .reference import sorsa_linear_naive


def philox_keep_mask(seed: int, M: int, K: int, p: float) -> torch.Tensor:
    """The fused kernels' dropout keep-mask of an (M, K) input, in numpy (the documented stream:
    element (m, k) uses Philox4x32-10 counter ``m·cdiv(K, 4) + k // 4`` with key ``seed``, word
    ``k % 4``, and is kept iff ``word >> 8 >= round(p·2^24)``)."""
    m, k = np.meshgrid(np.arange(M, dtype=np.uint64), np.arange(K, dtype=np.uint64), indexing="ij")
    ctr = m * np.uint64((K + 3) // 4) + k // np.uint64(4)
    M32 = np.uint64(0xFFFFFFFF)
    c = [ctr & M32, ctr >> np.uint64(32), np.zeros_like(ctr), np.zeros_like(ctr)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = A * c[0], B * c[2]
        c = [((pb >> np.uint64(32)) ^ c[1] ^ k0) & M32, pb & M32, ((pa >> np.uint64(32)) ^ c[3] ^ k1) & M32, pa & M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    words = np.stack(c, -1)
    w = np.take_along_axis(words, (k % np.uint64(4)).astype(np.int64)[..., None], -1)[..., 0]
    return torch.from_numpy((w >> np.uint64(8)) >= np.uint64(round(p * 2 ** 24)))


def run(case: Case, device: torch.device, fault: bool):
    # (for p > 0 "torch ms" times the formula with a precomputed mask, not the torch backend,
    # which draws its own mask: the two paths would not compare)
    M, K, N, r = case.shape
    dt = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    o = dict(x=rn(M, K), W=rn(N, K) / K ** 0.5, A=rn(r, K) / K ** 0.5, S=rn(r).abs() + 0.5, B=rn(N, r) / N ** 0.5,
             b=rn(N), dy=rn(M, N))
    seed = torch.tensor([1234567], dtype=torch.int64)

    mask = philox_keep_mask(int(seed), M, K, case.p).to(device) if case.p > 0 else None

    def run(impl: str, dtype):
        """Outputs and gradients of ``impl`` in ``dtype``, and a thunk that repeats the step:
        ``naive`` is the literal formula with the fused kernels' mask (the float64 reference, and
        the low-precision baseline for p > 0: the torch backend draws its own mask)."""
        x = o["x"].to(device, dtype)
        if case.layout == "rows":  # an offset view: aligned rows, unaligned start
            buf = torch.empty(M * K + 1, dtype=dtype, device=device)
            buf[1:].view(M, K).copy_(x)
            x = buf[1:].view(M, K)
        x.requires_grad_()
        A, S, B, b = (o[k].to(device, dtype).requires_grad_() for k in ("A", "S", "B", "b"))
        W, dy = o["W"].to(device, dtype), o["dy"].to(device, dtype)

        def fwd():
            if impl == "naive":
                return sorsa_linear_naive(x, W, A, S, B, 0.5, b, mask=mask, dropout_p=case.p)
            return fwd_op(case.p)(x, W, A, S, B, b, 0.5, case.p, seed, impl)[0]
        y = fwd()
        grads = torch.autograd.grad(y, (x, A, S, B, b), dy)
        return [y.detach()] + list(grads), lambda: torch.autograd.grad(fwd(), (x, A, S, B, b), dy)

    ref, _ = run("naive", torch.float64)
    lowp, t_torch = run("torch" if case.p == 0 else "naive", dt)
    got, t_fused = run("triton", dt)
    return score(ref, lowp, got, t_fused, t_torch, device, fault)


def score(ref, lowp, got, t_fused, t_torch, device, fault: bool):
    """A case's result from ``[y, dx, dA, dS, dB, dbias]`` of the float64 reference, the low-precision
    torch path and the fused path (``fault``: the fused ``y`` perturbed, to prove the check can fail),
    and the two paths' timed callables. Shared by the ops built on this one."""
    if fault:
        got[0] = got[0].clone()
        got[0].view(-1)[0] += 1.0
    names = ("y", "dx", "dA", "dS", "dB", "dbias")
    ratios = {n: ratio(a.cpu(), lp.cpu(), rf.cpu()) for n, a, lp, rf in zip(names, got, lowp, ref)}
    return ratios, time_ms(t_fused, device), time_ms(t_torch, device)


OP = "sorsa_linear"
CASES = [
    Case("linear bf16 2048x4096->4096 r16", OP, "bfloat16", (2048, 4096, 4096, 16), run),
    Case("linear bf16 2048x4096->4096 r128 p0.05", OP, "bfloat16", (2048, 4096, 4096, 128), run, 0.05),
    Case("linear fp16 ragged 1000x4000->4097 r33", OP, "float16", (1000, 4000, 4097, 33), run),
    Case("linear bf16 offset-view x 1024x4096->4096 r16", OP, "bfloat16", (1024, 4096, 4096, 16), run, 0.0, "rows"),
    Case("linear fp32 1024x1024->1024 r16 p0.05", OP, "float32", (1024, 1024, 1024, 16), run, 0.05),
    Case("linear fp32 37x40->48 r5", OP, "float32", (37, 40, 48, 5), run, gpu=False, interpret=True),
    Case("linear fp32 37x40->48 r5 p0.1", OP, "float32", (37, 40, 48, 5), run, 0.1, gpu=False, interpret=True),
]
