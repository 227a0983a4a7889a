"""SVD init of a stack of LLM-like weights: ours (rsvd, each backend) vs sorsa 1.0.1's full SVD
vs torch.svd_lowrank; the max relative σ error of each goes to extra_info."""
import pytest

from sorsa_kernels import bench

from conftest import DEV, DT, QUICK

CASES = bench.init_cases(DEV, QUICK)
IMPLS = list(bench.init_callables((1, 32, 32, 4), DEV, DT))


@pytest.mark.parametrize("case", CASES, ids=[f"{c}x{m}x{n}-r{r}" for c, m, n, r in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_init(measure, benchmark, impl, case):
    fn = bench.init_callables(case, DEV, DT)[impl]
    count, m, n, r = case
    exact = bench.reference_sigmas(bench.llm_like_weights(count, m, n, DEV, DT), r)
    benchmark.extra_info["max_rel_sigma_err"] = ((fn().double() - exact).abs() / exact).max().item()
    measure(fn, grad=False)
