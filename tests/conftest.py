import importlib.util
import os

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# absolute floor of the tolerance rule, by dtype (a few ulps at unit scale)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def load_reference_layer():
    """sorsa 1.0.1's layer.py, loaded by file path: its package __init__ imports transformers
    internals that transformers 5 no longer has."""
    spec = importlib.util.find_spec("sorsa")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "layer.py")
    mspec = importlib.util.spec_from_file_location("sorsa_reference_layer", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def ref():
    mod = load_reference_layer()
    if mod is None:
        pytest.skip("sorsa==1.0.1 is not installed (it comes with the [test] extra)")
    return mod


def assert_tolerance(out, lowp, ref64, name="output", floor=None):
    """flash-attention's rule: |out - ref64| <= 2 * |lowp - ref64| + floor, elementwise max;
    out must be finite. ``lowp`` is the plain-torch path in the same low precision."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    floor = FLOOR[out.dtype] if floor is None else floor
    err = (out.double() - ref64).abs().max().item()
    base = (lowp.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + floor * scale, f"{name}: err {err:.3g} > 2*{base:.3g} + {floor * scale:.3g}"
