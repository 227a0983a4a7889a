"""SORSA linear forward, backward and forward+backward: ours vs sorsa 1.0.1 vs a dense frozen F.linear."""
import pytest

from conftest import ROLES, cases_of, ids

CASES = cases_of("linear_fwd", "linear_bwd", "linear_fwdbwd")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_linear(measure, case, role):
    measure(case, role)
