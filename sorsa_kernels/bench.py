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


def time_fn(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2, warmup: int = 2,
            min_reps: int = 5) -> float:
    """Median milliseconds per call of ``fn`` (at least ``min_reps`` calls after ``warmup``)."""
    if device.type == "cuda" and min_reps > 1:
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:  # pragma: no cover
            pass
    for _ in range(warmup):
        fn()
    times: List[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < min_reps or time.perf_counter() < t_end:
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
    """(M, in, out, r) cases: Llama-2-7B-like on GPU, scaled down on CPU."""
    if device.type == "cuda":
        shapes = [(8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096)]
        ranks = [16, 64, 128]
    elif quick:
        shapes, ranks = [(512, 512, 512)], [16, 64]
    else:
        shapes = [(1024, 1024, 1024), (1024, 1024, 2752), (1024, 2752, 1024)]
        ranks = [16, 64, 128]
    return [(m, k, n, r) for (m, k, n) in shapes for r in ranks]


def _randn(*shape, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def linear_callables(case, backward: bool, device: torch.device, dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    """impl name -> zero-argument callable running one fwd (or fwd+bwd) of the case."""
    m, k, n, r = case
    mk = lambda *s: _randn(*s, device=device, dtype=dtype, seed=len(s) + sum(s))  # noqa: E731
    x = mk(m, k).requires_grad_(backward)
    W = mk(n, k) / k ** 0.5
    A = (mk(r, k) / k ** 0.5).requires_grad_()
    S = mk(r).abs().requires_grad_()
    B = (mk(n, r) / n ** 0.5).requires_grad_()
    dy = mk(m, n)
    backends = [b for b in _backend.available_backends(LINEAR_OP) if b == "torch" or device.type == "cuda"]
    impls = {f"ours[{b}]": (lambda b=b: sorsa_linear(x, W, A, S, B, 2.0, backend=b)) for b in backends}
    impls["sorsa-1.0.1"] = lambda: reference_forward(x, W, A, S, B, 2.0)
    impls["dense F.linear"] = lambda: F.linear(x, W)  # the floor; with backward: dX only (frozen W)
    if not backward:
        return impls

    def fb(f):
        def run():
            f().backward(dy)
            for t in (x, A, S, B):
                t.grad = None
        return run
    return {name: fb(f) for name, f in impls.items()}


def bench_linear(device: torch.device, dtype: torch.dtype, quick: bool, backward: bool) -> List[Result]:
    op = "linear_fwdbwd" if backward else "linear_fwd"
    out: List[Result] = []
    for case in linear_cases(device, quick):
        m, k, n, r = case
        label = f"M={m} in={k} out={n} r={r}"
        for name, fn in linear_callables(case, backward, device, dtype).items():
            with torch.set_grad_enabled(backward):
                out.append(Result(op, label, name, time_fn(fn, device), {"r": r}))
    return out


def adapter_shapes(device: torch.device, quick: bool):
    """(layers, [(in, out)] per layer, r): Llama-2-7B's q,k,v,o,gate,up,down on GPU, scaled on CPU."""
    if device.type == "cuda":
        d, h, layers, r = 4096, 11008, 32, 128
    elif quick:
        d, h, layers, r = 256, 688, 2, 16
    else:
        d, h, layers, r = 512, 1376, 4, 32
    return layers, [(d, d)] * 4 + [(d, h), (d, h), (h, d)], r


def ortho_callables(device: torch.device, dtype: torch.dtype, quick: bool) -> Dict[str, Callable[[], object]]:
    """The regularizer step (value + gradient into .grad) over a whole model's adapters."""
    from .layer import SORSALinear
    from .ops.ortho import OP as ORTHO_OP
    from .regularizer import calc_ortho, orthonormal_grad_
    layers, shapes, r = adapter_shapes(device, quick)
    model = torch.nn.ModuleList()
    for i in range(layers * len(shapes)):
        k, n = shapes[i % len(shapes)]
        layer = SORSALinear(k, n, r=r, device="meta")
        layer.sorsa_A = torch.nn.Parameter(_randn(r, k, device=device, dtype=dtype, seed=i) / k ** 0.5)
        layer.sorsa_B = torch.nn.Parameter(_randn(n, r, device=device, dtype=dtype, seed=i + 7) / n ** 0.5)
        model.append(layer)
    params = [p for n, p in model.named_parameters() if "sorsa_A" in n or "sorsa_B" in n]
    for p in params:
        p.grad = torch.zeros_like(p)

    def reference():  # sorsa 1.0.1: Python loop of matmul/sub/norm, then autograd of (gamma/lr)·reg
        (0.5 * calc_ortho(model)).backward()

    impls = {f"ours[{b}]": (lambda b=b: orthonormal_grad_(model, 0.5, 1.0, backend=b))
             for b in _backend.available_backends(ORTHO_OP) if b == "torch" or device.type == "cuda"}
    impls["sorsa-1.0.1"] = reference
    # floor: the bytes the step must move (two reads of every adapter + grad read-modify-write),
    # timed as a device copy of the same volume in this run
    nbytes = sum(p.numel() * p.element_size() for p in params) * 4
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    impls["bandwidth floor"] = lambda: dst.copy_(src)
    return impls


def bench_ortho(device: torch.device, dtype: torch.dtype, quick: bool) -> List[Result]:
    layers, shapes, r = adapter_shapes(device, quick)
    label = f"{layers}x{len(shapes)} adapters r={r}"
    return [Result("ortho_step", label, name, time_fn(fn, device), {"r": r})
            for name, fn in ortho_callables(device, dtype, quick).items()]


def init_cases(device: torch.device, quick: bool):
    """(count, m, n, r): a stack of same-shaped weights to initialise."""
    if device.type == "cuda":
        # a slice of a 7B model's 224 projections: the full-SVD baseline takes seconds per matrix
        return [(8, 4096, 4096, 128), (4, 11008, 4096, 128)]
    return [(4, 512, 512, 32)] if quick else [(16, 2048, 2048, 64)]


def llm_like_weights(count: int, m: int, n: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """Synthetic weights with the spectrum shape of pretrained LLM projections: power-law
    decay (σ_i ∝ i^-0.5) plus a flat noise bulk."""
    p = min(m, n)
    U = torch.linalg.qr(_randn(count, m, p, device=device, dtype=torch.float32, seed=seed))[0]
    V = torch.linalg.qr(_randn(count, n, p, device=device, dtype=torch.float32, seed=seed + 1))[0]
    s = torch.arange(1, p + 1, device=device, dtype=torch.float32) ** -0.5
    noise = _randn(count, m, n, device=device, dtype=torch.float32, seed=seed + 2) * (0.1 / max(m, n) ** 0.5)
    return ((U * s) @ V.mT + noise).to(dtype)


def reference_sigmas(Ws: torch.Tensor, r: int) -> torch.Tensor:
    """Exact top-r singular values for the accuracy column: fp64 on CPU, fp32 on GPU (fp64 SVD
    of thousands-wide matrices is too slow there; fp32's ~1e-6 error is far below what we report)."""
    return torch.linalg.svdvals(Ws.double() if Ws.device.type == "cpu" else Ws.float())[:, :r].double()


def init_callables(case, device: torch.device, dtype: torch.dtype) -> Dict[str, Callable[[], torch.Tensor]]:
    """impl -> callable returning the top-r singular values (count, r) it computes for the stack."""
    from .rsvd import OP as RSVD_OP, rsvd
    count, m, n, r = case
    Ws = llm_like_weights(count, m, n, device, dtype)
    impls = {f"ours[rsvd:{b}]": (lambda b=b: rsvd(Ws, r, seed=0, backend=b)[1])
             for b in _backend.available_backends(RSVD_OP) if b != "triton"}
    # the reference's full SVD per layer (in fp32: its bf16 path fails on CUDA, whose SVD has no bf16)
    impls["sorsa-1.0.1"] = lambda: torch.stack([torch.linalg.svd(W.T.float(), full_matrices=False)[1][:r] for W in Ws])
    impls["svd_lowrank(q=r,niter=4)"] = lambda: torch.stack([torch.svd_lowrank(W.float(), q=r, niter=4)[1] for W in Ws])
    return impls


def bench_init(device: torch.device, dtype: torch.dtype, quick: bool) -> List[Result]:
    out = []
    for case in init_cases(device, quick):
        count, m, n, r = case
        label = f"{count}x {m}x{n} r={r}"
        exact = reference_sigmas(llm_like_weights(count, m, n, device, dtype), r)
        for name, fn in init_callables(case, device, dtype).items():
            got = {}
            ms = time_fn(lambda: got.__setitem__("S", fn()), device, min_time_s=0.0, warmup=0, min_reps=1)
            err = ((got["S"].double() - exact).abs() / exact).max().item()
            out.append(Result("init", label, name, ms, {"r": r, "max_rel_sigma_err": err}))
    return out


OPS: Dict[str, Callable[..., List[Result]]] = {
    "linear_fwd": lambda d, dt, q: bench_linear(d, dt, q, backward=False),
    "linear_fwdbwd": lambda d, dt, q: bench_linear(d, dt, q, backward=True),
    "ortho_step": bench_ortho,
    "init": bench_init,
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


def format_table(results: List[Result], baselines=("sorsa-1.0.1", "ours[torch]")) -> str:
    """One row per (op, case, impl): time and ratio vs each baseline from the same run."""
    base = {(r.op, r.case, r.impl): r.ms for r in results}
    head = f"{'op':<14} {'case':<28} {'impl':<16} {'ms':>10}" + "".join(f" {'x vs ' + b:>20}" for b in baselines)
    lines = [head, "-" * len(head)]
    for r in results:
        cols = ""
        for b in baselines:
            ref = base.get((r.op, r.case, b))
            cols += f" {ref / r.ms:>19.2f}x" if ref else f" {'-':>20}"
        err = r.extra.get("max_rel_sigma_err")
        lines.append(f"{r.op:<14} {r.case:<28} {r.impl:<16} {r.ms:>10.3f}{cols}"
                     + (f"   σ err {100 * err:.2f}%" if err is not None else ""))
    return "\n".join(lines)


def to_json(results: List[Result]) -> List[dict]:
    return [asdict(r) for r in results]


FLOORS = ("dense F.linear", "bandwidth floor")


def plot(results: List[Result], path: str) -> Optional[str]:
    """PNG of our best speed-up over sorsa 1.0.1 per case, grouped by op (needs matplotlib:
    ``pip install sorsa-kernels[plot]``). Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by: Dict[tuple, Dict[str, float]] = {}
    for r in results:
        by.setdefault((r.op, r.case), {})[r.impl] = r.ms
    ops = sorted({op for op, _ in by})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        cases = [(c, d) for (o, c), d in by.items() if o == op and "sorsa-1.0.1" in d]
        labels, vals = [], []
        for c, d in cases:
            ours = min(v for k, v in d.items() if k.startswith("ours["))
            labels.append(c.replace(" ", "\n"))
            vals.append(d["sorsa-1.0.1"] / ours)
        ax.bar(range(len(vals)), vals, color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(vals)), labels, fontsize=6)
        ax.set_title(op)
        ax.set_ylabel("speed-up vs sorsa 1.0.1 (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(results: List[Result]) -> str:
    """One line per (op, case): our fastest backend vs sorsa 1.0.1, unfused torch and the dense floor."""
    by: Dict[tuple, Dict[str, float]] = {}
    for r in results:
        by.setdefault((r.op, r.case), {})[r.impl] = r.ms
    head = f"{'op':<14} {'case':<28} {'best ours':<14} {'ms':>9} {'vs 1.0.1':>9} {'vs torch':>9} {'/floor':>8}"
    lines = [head, "-" * len(head)]
    for (op, case), d in by.items():
        ours = {k: v for k, v in d.items() if k.startswith("ours[")}
        if not ours:
            continue
        best = min(ours, key=ours.get)
        ms = ours[best]
        f = lambda key, inv=False: (f"{(ms / d[key] if inv else d[key] / ms):.2f}x" if key in d else "-")  # noqa: E731
        floor = next((k for k in FLOORS if k in d), None)
        lines.append(f"{op:<14} {case:<28} {best:<14} {ms:>9.3f} {f('sorsa-1.0.1'):>9} {f('ours[torch]'):>9} "
                     f"{f(floor, inv=True) if floor else '-':>8}")
    return "\n".join(lines)
