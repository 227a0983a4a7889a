"""Regularizer step over a whole model's adapters (Llama-2-7B-shaped on GPU): ours vs the
reference's loop + autograd vs the bandwidth floor measured in the same run."""
import pytest

from sorsa_kernels import bench

from conftest import DEV, DT, QUICK

IMPLS = list(bench.ortho_callables(DEV, DT, quick=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_ortho_step(measure, impl):
    measure(bench.ortho_callables(DEV, DT, QUICK)[impl])
