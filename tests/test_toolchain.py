"""The toolchains we declare are the ones we test: Triton's deprecation warnings fail the suite
(pyproject's filterwarnings), every Triton launch chooses FP fusion explicitly, and the declared
torch/triton/Python ranges match the README's support matrix and the CI stages."""
import os
import re
import warnings

import pytest

from conftest import needs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warn_from(module: str, category):
    exec("import warnings\nwarnings.warn('x is deprecated', category)", {"__name__": module, "category": category})


def test_triton_warnings_are_errors_in_the_suite():
    with pytest.raises(UserWarning):
        _warn_from("triton.language.semantic", UserWarning)
    with pytest.raises(UserWarning):
        _warn_from("triton.knobs", UserWarning)
    with warnings.catch_warnings(record=True):  # other libraries' warnings stay warnings
        _warn_from("somelib.module", UserWarning)


@needs_triton
def test_non_bool_where_condition_fails_under_triton_39():
    """Triton >= 3.9 warns on a non-bool tl.where condition (an error in 3.10): with the suite's
    filters that warning is an error, so a kernel of ours that did it could not pass."""
    import torch
    import triton
    import triton.language as tl
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"triton {triton.__version__} does not warn on non-bool tl.where conditions (3.9 does)")
    from sorsa_kernels._env import triton_interpret
    if not triton_interpret():
        pytest.skip("interpreter-only check")

    @triton.jit
    def k(O):
        r = tl.arange(0, 4)
        tl.store(O + r, tl.where(r % 2, 1.0, 0.0))  # int32 condition

    with pytest.raises(Exception, match="non-boolean condition"):
        k[(1,)](torch.zeros(4))


@needs_triton
def test_every_kernel_declares_fp_fusion():
    """Each @triton.jit kernel that a launcher starts has an explicit FP_FUSION entry, and each
    launch site passes it (Triton 3.10 flips the default; the AOT check gates the launches)."""
    from sorsa_kernels.ops.linear import kernels as linear_kernels
    from sorsa_kernels.ops.ortho import kernels as ortho_kernels
    for mod, launcher in ((linear_kernels, "linear"), (ortho_kernels, "ortho")):
        src = open(os.path.join(ROOT, "sorsa_kernels", "ops", launcher, "launch.py")).read()
        launched = set(re.findall(r"\b(\w+_kernel)\[", src)) | ({"sorsa_mm_kernel"} if "_TUNED[" in src else set())
        assert launched and launched <= set(mod.FP_FUSION), (launched, mod.FP_FUSION)
        assert all(isinstance(v, bool) for v in mod.FP_FUSION.values())
        for name in launched:
            assert f'enable_fp_fusion=FP_FUSION["{name}"]' in src, name


def test_declared_support_matches_what_ci_runs():
    py = open(os.path.join(ROOT, "pyproject.toml")).read()
    readme = open(os.path.join(ROOT, "docs", "install.md")).read()  # the support matrix moved there from README.md
    assert 'requires-python = ">=3.11"' in py
    assert '"torch>=2.11,<2.16"' in py and '"triton>=3.6,<3.10"' in py
    ci = {f: open(os.path.join(ROOT, ".ci", f)).read() for f in os.listdir(os.path.join(ROOT, ".ci"))}
    assert any("TORCH=2.15.0" in s and "TRITON=3.9.0" in s for s in ci.values())
    assert any("torch==2.11.0" in s for s in ci.values()) and any("3.6.0" in s for s in ci.values())
    matrix = readme[readme.index("### Support matrix"):]
    matrix = matrix[:matrix.index("\n## ")]
    for cell in ("2.11.0", "3.6.0", "2.14.1", "3.8.0", "2.15.0", "3.9.0", "3.11", "3.12"):
        assert cell in matrix, cell
