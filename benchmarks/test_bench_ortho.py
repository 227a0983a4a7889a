"""Regularizer step over a whole model's adapters (Llama-2-7B-shaped on a GPU): ours vs the
reference's loop + autograd vs the bandwidth floor measured in the same run."""
import pytest

from conftest import ROLES, cases_of, ids

CASES = cases_of("ortho_step")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ortho_step(measure, case, role):
    measure(case, role)
