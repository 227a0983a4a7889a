"""pytest-benchmark suite for the SORSA linear op, fwd and fwd+bwd:
ours (each backend available) vs sorsa 1.0.1's formula vs a dense frozen F.linear.
GPU: CUDA-event medians (triton.testing.do_bench, L2 flushed between runs) in extra_info.
CPU: scaled-down shapes; read results as ratios within one run.

    pytest benchmarks/test_bench_linear.py --benchmark-only
"""
import pytest
import torch

from sorsa_kernels import _backend, bench
from sorsa_kernels.ops.linear import OP, sorsa_linear

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
CASES = bench.linear_cases(DEV, quick=DEV.type == "cpu")
IMPLS = [f"ours[{b}]" for b in _backend.available_backends(OP) if b == "torch" or DEV.type == "cuda"]
IMPLS += ["sorsa-1.0.1", "dense F.linear"]


def _fn(impl, t):
    x, W, A, S, B = t
    if impl.startswith("ours["):
        return lambda: sorsa_linear(x, W, A, S, B, 2.0, backend=impl[5:-1])
    if impl == "sorsa-1.0.1":
        return lambda: bench.reference_forward(x, W, A, S, B, 2.0)
    return lambda: torch.nn.functional.linear(x, W)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=[f"M{m}-in{k}-out{n}-r{r}" for m, k, n, r in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear(benchmark, impl, case, backward):
    m, k, n, r = case
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, DT)  # noqa: E731
    t = (mk(m, k).requires_grad_(backward), mk(n, k) / k ** 0.5, (mk(r, k) / k ** 0.5).requires_grad_(),
         mk(r).abs().requires_grad_(), (mk(n, r) / n ** 0.5).requires_grad_())
    dy = mk(m, n)
    f = _fn(impl, t)
    call = (lambda: f().backward(dy)) if backward else f
    sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)

    def run():
        call()
        sync()

    with torch.set_grad_enabled(backward):
        benchmark.extra_info["median_ms"] = bench.time_fn(run, DEV)
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
