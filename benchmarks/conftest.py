"""Shared pieces of the pytest-benchmark suites (one file per op):

    pytest benchmarks --benchmark-only          # all ops on the hardware present

Each test times one implementation of one case with pytest-benchmark (synchronised calls) and
stores the CUDA-event / wall-clock median from sorsa_kernels.bench.time_fn in extra_info, so
ratios between implementations come from the same run. CPU shapes are scaled down.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from sorsa_kernels import bench  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
QUICK = DEV.type == "cpu"


@pytest.fixture
def measure(benchmark):
    def run(fn, grad=True):
        sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)

        def call():
            fn()
            sync()

        with torch.set_grad_enabled(grad):
            benchmark.extra_info["median_ms"] = bench.time_fn(call, DEV)
            benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    return run


# shared by the two linear suites (fwd, fwd+bwd): cases and implementation names; the names
# come from a tiny case so collection allocates nothing large
LINEAR_CASES = bench.linear_cases(DEV, QUICK)
LINEAR_IDS = [f"M{m}-in{k}-out{n}-r{r}" for m, k, n, r in LINEAR_CASES]


def linear_impls(backward: bool):
    return list(bench.linear_callables((64, 64, 64, 16), backward, DEV, DT))
