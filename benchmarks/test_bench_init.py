"""SVD init of a stack of weights: ours vs sorsa 1.0.1's full SVD vs torch.svd_lowrank."""
import pytest

from sorsa_kernels import bench

from conftest import DEV, DT, QUICK

CASES = bench.init_cases(DEV, QUICK)
IMPLS = ["ours[svd]", "sorsa-1.0.1", "svd_lowrank(q=r,niter=4)"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c}x{m}x{n}-r{r}" for c, m, n, r in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_init(measure, impl, case):
    measure(bench.init_callables(case, DEV, DT)[impl], grad=False)
