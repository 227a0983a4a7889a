"""Benchmarks behind ``sorsa-kernels bench``: ours vs the sorsa 1.0.1 formula vs the floor.

Timing: CUDA events around many calls after warm-up on GPU (``triton.testing.do_bench``
when available), median wall time of repeated calls on CPU. Inputs are random normal,
never zeros. CPU numbers are noisy: read them as ratios within one run.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import _backend
from .ops.linear import OP as LINEAR_OP, sorsa_linear


@dataclass
class Result:
    op: str
    case: str
    impl: str
    ms: float
    extra: Dict[str, float] = field(default_factory=dict)


def time_fn(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2, warmup: int = 2) -> float:
    """Median milliseconds per call of ``fn``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:  # pragma: no cover
            pass
    for _ in range(warmup):
        fn()
    times: List[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < 5 or time.perf_counter() < t_end:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    return statistics.median(times)


def reference_forward(x, weight, A, S, B, scale, bias=None):
    """sorsa 1.0.1's unmerged forward: dense ``(B*S)@A`` rebuilt every call, second GEMM."""
    result = F.linear(x, weight)
    result = result + F.linear(x, (B * S) @ A) * scale
    return result if bias is None else result + bias


def linear_cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        shapes = [(8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096)]
        ranks = [16, 64, 128]
    elif quick:
        shapes, ranks = [(512, 512, 512)], [16, 64]
    else:
        shapes = [(1024, 1024, 1024), (1024, 1024, 2752), (1024, 2752, 1024)]
        ranks = [16, 64, 128]
    return [(m, k, n, r) for (m, k, n) in shapes for r in ranks]


def bench_linear(device: torch.device, dtype: torch.dtype, quick: bool, backward: bool) -> List[Result]:
    op = "linear_fwdbwd" if backward else "linear_fwd"
    out: List[Result] = []
    backends = [b for b in _backend.available_backends(LINEAR_OP)
                if b == "torch" or device.type == "cuda"]
    for (m, k, n, r) in linear_cases(device, quick):
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        x = mk(m, k).requires_grad_(backward)
        W = mk(n, k) / k ** 0.5
        A = (mk(r, k) / k ** 0.5).requires_grad_()
        S = mk(r).abs().requires_grad_()
        B = (mk(n, r) / n ** 0.5).requires_grad_()
        dy = mk(m, n)
        impls = {f"ours[{b}]": (lambda b=b: sorsa_linear(x, W, A, S, B, 2.0, backend=b)) for b in backends}
        impls["sorsa-1.0.1"] = lambda: reference_forward(x, W, A, S, B, 2.0)
        impls["dense F.linear"] = lambda: F.linear(x, W)
        case = f"M={m} in={k} out={n} r={r}"
        for name, f in impls.items():
            # fwd+bwd of the dense floor computes dx only: its weight is frozen.
            fn = (lambda f=f: f().backward(dy)) if backward else f
            with torch.set_grad_enabled(backward):
                ms = time_fn(fn, device)
            for t in (x, A, S, B):
                t.grad = None
            out.append(Result(op, case, name, ms))
    return out


OPS: Dict[str, Callable[..., List[Result]]] = {
    "linear_fwd": lambda d, dt, q: bench_linear(d, dt, q, backward=False),
    "linear_fwdbwd": lambda d, dt, q: bench_linear(d, dt, q, backward=True),
}


def run(ops: Optional[List[str]] = None, dtype: Optional[torch.dtype] = None, quick: bool = False,
        device: Optional[torch.device] = None) -> List[Result]:
    """Run the selected benchmark ``ops`` (default: all) on the present hardware."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ops = ops or list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"ops must be among {list(OPS)}, got {unknown}")
    results: List[Result] = []
    for o in ops:
        results += OPS[o](device, dtype, quick)
    return results


def format_table(results: List[Result], baselines=("sorsa-1.0.1", "ours[torch]", "dense F.linear")) -> str:
    """One row per (op, case, impl): time and ratio vs each baseline from the same run."""
    base = {(r.op, r.case, r.impl): r.ms for r in results}
    head = f"{'op':<14} {'case':<28} {'impl':<16} {'ms':>10}" + "".join(f" {'x vs ' + b:>20}" for b in baselines)
    lines = [head, "-" * len(head)]
    for r in results:
        cols = ""
        for b in baselines:
            ref = base.get((r.op, r.case, b))
            cols += f" {ref / r.ms:>19.2f}x" if ref else f" {'-':>20}"
        lines.append(f"{r.op:<14} {r.case:<28} {r.impl:<16} {r.ms:>10.3f}{cols}")
    return "\n".join(lines)


def to_json(results: List[Result]) -> List[dict]:
    return [asdict(r) for r in results]


def summary_table(results: List[Result]) -> str:
    """One line per (op, case): our fastest backend vs sorsa 1.0.1, unfused torch and the dense floor."""
    by: Dict[tuple, Dict[str, float]] = {}
    for r in results:
        by.setdefault((r.op, r.case), {})[r.impl] = r.ms
    head = f"{'op':<14} {'case':<28} {'best ours':<14} {'ms':>9} {'vs 1.0.1':>9} {'vs torch':>9} {'/dense':>8}"
    lines = [head, "-" * len(head)]
    for (op, case), d in by.items():
        ours = {k: v for k, v in d.items() if k.startswith("ours[")}
        if not ours:
            continue
        best = min(ours, key=ours.get)
        ms = ours[best]
        f = lambda key, inv=False: (f"{(ms / d[key] if inv else d[key] / ms):.2f}x" if key in d else "-")  # noqa: E731
        lines.append(f"{op:<14} {case:<28} {best:<14} {ms:>9.3f} {f('sorsa-1.0.1'):>9} {f('ours[torch]'):>9} "
                     f"{f('dense F.linear', inv=True):>8}")
    return "\n".join(lines)
