"""sorsa_kernels.synthetic: shapes, determinism, the spectrum families, bad input."""
import pytest
import torch

from sorsa_kernels.synthetic import exact_sigmas, synthetic_weights


@pytest.mark.parametrize("m,n", [(96, 64), (64, 97), (97, 97)])  # tall, wide (prime n), prime square
def test_shapes_dtype_determinism(m, n):
    W = synthetic_weights(2, m, n, dtype=torch.bfloat16, seed=3)
    assert W.shape == (2, m, n) and W.dtype == torch.bfloat16 and W.is_contiguous()
    assert torch.equal(W, synthetic_weights(2, m, n, dtype=torch.bfloat16, seed=3))
    assert not torch.equal(W, synthetic_weights(2, m, n, dtype=torch.bfloat16, seed=4))
    assert not torch.equal(W[0], W[1])  # each matrix has its own factors


@pytest.mark.parametrize("family,power", [("llm", 0.5), ("flat", 0.25)])
def test_spectrum_head_follows_the_family(family, power):
    """The signal head is σᵢ ≈ i^-power (the bulk only lifts the tail): the orthogonal factors are
    orthogonal, so the generator's spectrum is what it claims."""
    S = exact_sigmas(synthetic_weights(1, 400, 300, family=family), 4)[0]
    target = torch.arange(1, 5, dtype=torch.float64) ** -power
    assert ((S - target).abs() / target).max() < 0.05


def test_bad_input():
    with pytest.raises(ValueError, match="family must be one of"):
        synthetic_weights(1, 8, 8, family="gauss")
    with pytest.raises(ValueError, match="count, m and n must be >= 1"):
        synthetic_weights(0, 8, 8)
