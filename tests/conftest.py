import os

# Kernels run under the Triton interpreter on CPU tensors; must be set before triton is
# imported. benchmarks/gpu_check.sh sets TRITON_INTERPRET=0 to run the same tests on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import sorsa_kernels._backend as _backend

HAS_TRITON = _backend.triton_status()[0]
# Device the kernel tests run on: the GPU when present (gpu_check.sh), else the CPU interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not _backend.triton_interpret() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# absolute floor of the tolerance rule, by dtype (a few ulps at unit scale)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


from sorsa_kernels.bench.runners import load_reference_layer  # noqa: E402  (one loader, by path)

REQUIRE_GPU = os.environ.get("SORSA_KERNELS_REQUIRE_GPU", "0") not in ("", "0")


def _gpu_missing() -> str:
    """Why `gpu`-marked tests cannot run here ('' when they can)."""
    if _backend.triton_interpret():
        return "the Triton interpreter is on (TRITON_INTERPRET=1): gpu tests never run under it"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if not HAS_TRITON:
        return "triton is not importable: " + _backend.triton_status()[1]
    return ""


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """`gpu` tests: skipped without a usable GPU, FAILED instead when SORSA_KERNELS_REQUIRE_GPU=1
    (benchmarks/gpu_check.sh), so a GPU run can never pass by skipping."""
    if item.get_closest_marker("gpu") is None:
        return
    why = _gpu_missing()
    if why and REQUIRE_GPU:
        pytest.fail(f"SORSA_KERNELS_REQUIRE_GPU=1 but {why}", pytrace=False)
    if why:
        pytest.skip(f"gpu test: {why} (benchmarks/gpu_check.sh runs it on a GPU)")


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


def set_launch_options(monkeypatch, **changes):
    """The linear launchers' options changed for one test (monkeypatch restores them)."""
    import dataclasses
    from sorsa_kernels.ops.linear import launch as L
    monkeypatch.setattr(L, "_options", dataclasses.replace(L.options(), **changes))
