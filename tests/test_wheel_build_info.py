"""The build record (sorsa_kernels.build_info()) is checked before the compiled extension is loaded:
a torch that does not match the build gives one warning naming both versions and the fix, and the
package runs on its torch/Triton paths; a broken extension file warns instead of raising. Each case
imports a copy of the installed package in a fresh interpreter, with the record edited to simulate
the situation (the CI stage .ci/stage_20_cuda_wheel.sh checks the real thing: the wheel next to
torch 2.13.0)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import sorsa_kernels

PKG = os.path.dirname(os.path.abspath(sorsa_kernels.__file__))
NO_EXT = os.environ.get("SORSA_KERNELS_NO_EXT") == "1"

PROBE = textwrap.dedent("""
    import json, sys, warnings
    # an editable install's finder would serve sorsa_kernels._C from the source tree: only the copy counts
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "") + type(f).__module__]
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sorsa_kernels as sk
        from sorsa_kernels import _backend
    W = torch.randn(30, 20, dtype=torch.float64)
    S = sk.rsvd(W, 3, seed=0)[1]
    err = ((S - torch.linalg.svdvals(W)[:3]).abs() / S).max().item()
    try:
        sk.rsvd(W, 3, backend="ext")
        forced = "ran"
    except RuntimeError as e:
        forced = str(e)
    print(json.dumps({
        "file": sk.__file__, "info": sk.build_info(), "status": list(_backend.ext_status()),
        "loaded": "sorsa_kernels._C" in sys.modules, "rsvd_err": err, "forced": forced,
        "warnings": [[type(w.message).__name__, str(w.message)] for w in caught],
    }))
""")


def _copy_package(tmp_path, record=None, so=True, garbage_so=False):
    """A copy of the installed package under tmp_path, with the given build record (None: none)."""
    dst = tmp_path / "sorsa_kernels"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__", "_C_build.json"))
    sos = [f for f in os.listdir(dst) if f.startswith("_C.") and f.endswith(".so")]
    for f in sos:
        if not so:
            os.remove(dst / f)
        elif garbage_so:
            (dst / f).write_bytes(b"not an ELF file")
    if record is not None:
        (dst / "_C_build.json").write_text(json.dumps(record))
    return sos


def _probe(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "undefined symbol" not in res.stderr, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path)), out["file"]  # the copy was imported
    assert out["rsvd_err"] < 1e-6, out
    return out


def _record(torch_version):
    return {"version": "0.1.0+cu999torch" + torch_version, "torch": torch_version, "torch_cuda": "99.0",
            "cuda": "99.0", "cuda_archs": "8.0;9.0+PTX", "python": "3.x", "platform": "linux-x86_64",
            "cxx11_abi": True}


def test_mismatched_torch_warns_and_falls_back(tmp_path):
    _copy_package(tmp_path, record=_record("2.0.0+cu118"))
    out = _probe(tmp_path)
    mism = [m for k, m in out["warnings"] if k == "ExtensionMismatchWarning"]
    assert len(mism) == 1, out["warnings"]
    msg = mism[0]
    for part in ("built against torch 2.0.0+cu118", f"torch {torch.__version__}", "pip install torch==2.0.0",
                 "pip install --no-build-isolation"):
        assert part in msg, (part, msg)
    assert out["info"]["torch"] == "2.0.0+cu118"       # build_info() is the record
    assert out["loaded"] is False                      # the mismatched binary was never loaded
    assert out["status"] == [False, False, msg]
    assert "2.0.0+cu118" in out["forced"] and out["forced"].startswith("backend='ext' is not available for rsvd")


@pytest.mark.skipif(NO_EXT, reason="SORSA_KERNELS_NO_EXT=1: built without the extension on purpose")
def test_matching_record_loads_the_extension(tmp_path):
    assert _copy_package(tmp_path, record=_record(torch.__version__)), "the installed package has no _C extension"
    out = _probe(tmp_path)
    assert out["warnings"] == [] or all(k != "ExtensionMismatchWarning" for k, _ in out["warnings"]), out["warnings"]
    assert out["loaded"] is True and out["status"][0] is True, out
    assert out["forced"] == "ran"


@pytest.mark.skipif(NO_EXT, reason="SORSA_KERNELS_NO_EXT=1: built without the extension on purpose")
def test_unloadable_extension_warns_instead_of_raising(tmp_path):
    assert _copy_package(tmp_path, record=_record(torch.__version__), garbage_so=True)
    out = _probe(tmp_path)
    mism = [m for k, m in out["warnings"] if k == "ExtensionMismatchWarning"]
    assert len(mism) == 1 and "could not be loaded" in mism[0] and "--no-build-isolation" in mism[0], out["warnings"]
    assert out["status"][0] is False and out["loaded"] is False
    assert "could not be loaded" in out["forced"]


def test_pure_python_install_is_silent(tmp_path):
    """No extension and no record (SORSA_KERNELS_NO_EXT=1 install): no warning, build_info() is None."""
    _copy_package(tmp_path, record=None, so=False)
    out = _probe(tmp_path)
    assert all(k != "ExtensionMismatchWarning" for k, _ in out["warnings"]), out["warnings"]
    assert out["info"] is None and out["status"][0] is False
    assert "could not be loaded" in out["forced"]


def test_build_info_is_exported():
    assert "build_info" in sorsa_kernels.__all__
    info = sorsa_kernels.build_info()
    rec = os.path.join(PKG, "_C_build.json")
    assert info == (json.load(open(rec)) if os.path.exists(rec) else None)


@pytest.mark.parametrize("tv,cuda,expect", [
    ("2.15.0+cu132", "13.2", "`bash scripts/build_wheel.sh --torch 2.15.0` from the source tree, then pip install "
                             "dist/sorsa_kernels-0.1.0+cu132torch2.15.0-{py}-{py}-{plat}.whl"),
    ("2.11.0+cu130", "13.0", "`bash scripts/build_wheel.sh --torch 2.11.0` from the source tree, then pip install "
                             "dist/sorsa_kernels-0.1.0+cu130torch2.11.0-{py}-{py}-{plat}.whl"),
    ("2.15.0+cpu", None, "no CUDA wheel fits a CPU-only build of torch (2.15.0+cpu)"),  # never the cu132 wheel
    ("2.13.0+cu130", "13.0", "no sorsa-kernels wheel is built for torch 2.13.0+cu130 (wheels exist for torch "
                             "2.11.0 with CUDA 13.0, 2.14.1 with CUDA 13.0, 2.15.0 with CUDA 13.2)"),
    ("2.15.0+cu126", "12.6", "no sorsa-kernels wheel is built for torch 2.15.0+cu126"),  # not the PyPI CUDA build
])
def test_mismatch_names_the_wheel_for_the_installed_torch(monkeypatch, tv, cuda, expect):
    import sysconfig
    from sorsa_kernels import _build_info as B
    monkeypatch.setattr(B.torch, "__version__", tv)
    monkeypatch.setattr(B.torch.version, "cuda", cuda)
    py = "cp{}{}".format(*sys.version_info[:2])
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    msg = B.mismatch(_record("2.14.1+cu130") | {"version": "0.1.0+cu130torch2.14.1"})
    assert expect.format(py=py, plat=plat) in msg, msg
    assert "pip install torch==2.14.1" in msg and B.REBUILD in msg


def test_build_wheel_script_knows_every_wheel_torch_and_refuses_others():
    from sorsa_kernels import _build_info as B
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "build_wheel.sh")
    res = subprocess.run(["bash", script, "--torch", "2.12.0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a supported torch" in res.stderr, res.stdout + res.stderr
    for v, cuda in B.WHEEL_TORCH.items():
        assert f"{v} (CUDA {cuda})" in res.stderr, res.stderr
    res = subprocess.run(["bash", script, "--torch"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--torch needs a version" in res.stderr, res.stderr
    res = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--torch 2.15.0" in res.stdout and "set -euo" not in res.stdout, res.stdout
