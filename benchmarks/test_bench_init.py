"""SVD init of a stack of LLM-like weights: ours vs sorsa 1.0.1's full SVD per matrix; the max
relative σ error goes to extra_info."""
import pytest

from conftest import cases_of, ids

CASES = cases_of("init")


@pytest.mark.parametrize("role", ["ours", "ref"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_init(measure, case, role):
    measure(case, role)
