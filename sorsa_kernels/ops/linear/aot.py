"""AOT compile cases of the linear op's launchers (see :mod:`sorsa_kernels.aot_check`): the real
forward and backward launch paths on meta tensors of representative shapes, per dtype."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ...aot_check import DTYPES, Case
from .kernels import PIPELINE_OPERANDS, SMEM_FALLBACK  # noqa: F401  (read by the AOT gates)
from .launch import linear_bwd, linear_fwd


def _case(name: str, dt: str, M: int, K: int, N: int, r: int, p: float, bias: bool = True,
                 x_row_stride: Optional[int] = None) -> Case:
    def run():
        t = getattr(torch, DTYPES[dt])
        mk = lambda *s: torch.empty(*s, dtype=t, device="meta")  # noqa: E731
        x = mk(M, K) if x_row_stride is None else torch.empty_strided((M, K), (x_row_stride, 1), dtype=t,
                                                                          device="meta")
        w, A, S, B = mk(N, K), mk(r, K), mk(r), mk(N, r)
        b = mk(N) if bias else None
        seed = torch.zeros(1, dtype=torch.int64, device="meta")
        y, xa = linear_fwd(x, w, A, S, B, b, 0.5, p, seed)
        linear_bwd(torch.empty_like(y), x, w, A, S, B, xa, 0.5, p, seed, True)
    return Case(name, "linear", dt, run)


def cases(dtypes: Sequence[str]) -> List[Case]:
    """Representative calls per dtype in ``dtypes`` (``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    cases = []
    for dt in dtypes:
        for r in (16, 128):
            for p in (0.0, 0.05):
                cases.append(_case(f"linear {dt} 8192x4096x4096 r{r} p{p}", dt, 8192, 4096, 4096, r, p))
    # every dtype: a dtype's programs differ (fp32: ieee dot, other tiles), and a spill found
    # only in one dtype's ragged or narrow program is still a shipped spill
    for d in dtypes:
        # ragged: nothing divisible by 16, odd r
        cases.append(_case(f"linear {d} ragged 1000x4000x4097 r33 p0.05", d, 1000, 4000, 4097, 33, 0.05))
        # the other TMA_CONFIGS M buckets (medium 128 <= M < 1024, small M < 128), masked dX included
        for M in (512, 64):
            cases.append(_case(f"linear {d} {M}x4096x4096 r16 p0.05", d, M, 4096, 4096, 16, 0.05))
        # a narrow output (N = 64) with r = 48: the one-pass g/dB kernel at BLOCK_R = 64
        cases.append(_case(f"linear {d} narrow 4096x4096x64 r48 p0.0", d, 4096, 4096, 64, 48, 0.0))
        # x rows 2²⁰ elements apart: row·stride passes 2³¹, the launcher must pick 64-bit offsets
        cases.append(_case(f"linear {d} int64-offsets 4096x4096x4096 r16 p0.05", d, 4096, 4096, 4096, 16,
                                  0.05, x_row_stride=1 << 20))
    return cases
