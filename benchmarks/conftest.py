"""Shared pieces of the pytest-benchmark suites (one file per op family):

    pytest benchmarks --benchmark-only          # every op on the hardware present

The cases are sorsa_kernels.bench.cases — the same definitions ``sorsa-kernels bench`` runs
(``quick`` on a CPU, ``default`` on a GPU). Each test times one role of one case (``ours``: what
backend="auto" runs; ``ref``: sorsa 1.0.1; ``floor``) with pytest-benchmark, synchronising CUDA
after every call; the main job's interleaved ratios are the numbers to quote.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from sorsa_kernels import bench  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODE = "default" if DEV.type == "cuda" else "quick"
CASES = bench.cases(DEV, MODE)
ROLES = ["ours", "ref", "floor"]


def cases_of(*ops):
    return [c for c in CASES if c.op in ops]


def ids(cs):
    return [f"{c.op}:{c.label}".replace(" ", "_") for c in cs]


@pytest.fixture
def measure(benchmark):
    def run(case, role):
        built = bench.build(case, DEV)
        names = [n for n, r in built.roles.items() if r == role and n in built.impls]
        if not names:
            pytest.skip(f"{case.label} has no '{role}' row (e.g. no floor for init)")
        fn = built.impls[names[0]]
        sync = torch.cuda.synchronize if DEV.type == "cuda" else (lambda: None)

        def call():
            fn()
            sync()
        benchmark.extra_info["impl"] = names[0]
        benchmark.pedantic(call, rounds=1 if built.single_shot else 5, iterations=1, warmup_rounds=1)
        if built.finish is not None:
            benchmark.extra_info.update({k: v for k, v in built.finish().get(names[0], {}).items()
                                         if isinstance(v, (int, float, str))})
    return run
