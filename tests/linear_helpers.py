"""Shared by the linear op's tests: an independent numpy Philox (the fused kernels' documented
dropout mask), float64 operands, and a forward+backward runner."""
import numpy as np
import torch


# --- an independent numpy Philox4x32-10 (Salmon et al. 2011, Triton's constants) ----------
def philox4x32(seed: int, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    M32 = np.uint64(0xFFFFFFFF)
    c = [c0.astype(np.uint64), c1.astype(np.uint64), np.zeros_like(c0, np.uint64), np.zeros_like(c0, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = A * c[0], B * c[2]
        c = [((pb >> np.uint64(32)) ^ c[1] ^ k0) & M32, pb & M32, ((pa >> np.uint64(32)) ^ c[3] ^ k1) & M32, pa & M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    return np.stack(c, -1)  # (..., 4) words


def replay_mask(seed: int, M: int, K: int, p: float) -> torch.Tensor:
    """The documented mask: (m, k) uses counter m·cdiv(K,4) + k//4, word k % 4, kept iff
    word >> 8 >= round(p·2^24)."""
    m, k = np.meshgrid(np.arange(M), np.arange(K), indexing="ij")
    ctr = (m * ((K + 3) // 4) + k // 4).astype(np.uint64)
    words = philox4x32(seed, ctr & np.uint64(0xFFFFFFFF), ctr >> np.uint64(32))
    w = np.take_along_axis(words, (k % 4)[..., None], -1)[..., 0]
    return torch.from_numpy((w >> np.uint64(8)) >= np.uint64(round(p * 2 ** 24)))


def operands(M_shape, k, n, r, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=rn(*M_shape, k), W=rn(n, k) / k ** 0.5, A=rn(r, k) / k ** 0.5, S=rn(r).abs() + 0.5,
                B=rn(n, r) / n ** 0.5, b=rn(n) if bias else None, dy=rn(*M_shape, n))


def run(fn, o, dt, device="cpu", x_view=None):
    x = o["x"].to(device, dt, copy=True)
    if x_view is not None:
        x = x_view(x)
    x.requires_grad_()
    A, S, B = (o[k].to(device, dt, copy=True).requires_grad_() for k in "ASB")
    b = None if o["b"] is None else o["b"].to(device, dt, copy=True).requires_grad_()
    y = fn(x, o["W"].to(device, dt), A, S, B, b)
    y.backward(o["dy"].to(device, dt))
    ts = [x, A, S, B] + ([b] if b is not None else [])
    return [y.detach().cpu()] + [t.grad.cpu() for t in ts]


def seed_of(s: int) -> int:
    torch.manual_seed(s)
    return int(torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64))
