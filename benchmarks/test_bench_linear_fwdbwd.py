"""SORSA linear fwdbwd: ours (each backend) vs sorsa 1.0.1's formula vs a dense frozen F.linear."""
import pytest

from sorsa_kernels import bench

from conftest import DEV, DT, LINEAR_CASES, LINEAR_IDS, linear_impls


@pytest.mark.parametrize("case", LINEAR_CASES, ids=LINEAR_IDS)
@pytest.mark.parametrize("impl", linear_impls(True))
def test_linear_fwdbwd(measure, impl, case):
    measure(bench.linear_callables(case, True, DEV, DT)[impl], grad=True)
