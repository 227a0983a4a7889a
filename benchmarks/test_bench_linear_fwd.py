"""SORSA linear fwd: ours (each backend) vs sorsa 1.0.1's formula vs a dense frozen F.linear."""
import pytest

from sorsa_kernels import bench

from conftest import DEV, DT, QUICK

CASES = bench.linear_cases(DEV, QUICK)
IMPLS = list(bench.linear_callables(CASES[0] if DEV.type == "cpu" else (64, 64, 64, 16), False, DEV, DT))


@pytest.mark.parametrize("case", CASES, ids=[f"M{m}-in{k}-out{n}-r{r}" for m, k, n, r in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_fwd(measure, impl, case):
    measure(bench.linear_callables(case, False, DEV, DT)[impl], grad=False)
