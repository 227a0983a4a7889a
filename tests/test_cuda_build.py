"""Build switches (setup.py) and the CUDA build on this CPU machine (nvcc, no GPU).

The switch logic is tested directly; one real build runs setup.py with nothing but the environment
a user has (no CPATH / LIBRARY_PATH / arch list / switches): it must find nvcc and the CUDA
library headers and libcudart of torch's pip CUDA wheels by itself, compile our sources without
warnings for sm_80 and sm_90 (+ PTX), and write the build record. The wheel built from it is
checked by .ci/stage_20_cuda_wheel.sh."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")  # functions only


def test_cuda_switches():
    plan = SETUP["cuda_plan"]
    assert plan("13.0", "13.0", {}) == (True, "torch CUDA 13.0, nvcc 13.0")        # auto: build it
    assert plan("13.0", "13.0", {"SORSA_KERNELS_SKIP_CUDA": "1"})[0] is False
    assert plan("13.0", "13.0", {"SORSA_KERNELS_CUDA": "0"})[0] is False          # older name
    assert plan("13.0", "13.0", {"SORSA_KERNELS_FORCE_CUDA": "1"})[0] is True
    ok, why = plan(None, "13.0", {})                                               # auto: CPU-only torch
    assert not ok and "CPU-only build" in why
    ok, why = plan("13.0", None, {})                                               # auto: no nvcc
    assert not ok and "no CUDA compiler" in why
    ok, why = plan("13.0", "12.8", {})                                             # auto: major mismatch
    assert not ok and "major versions must match" in why
    for env in ({"SORSA_KERNELS_FORCE_CUDA": "1"}, {"SORSA_KERNELS_CUDA": "1"}):   # forced: fail loudly
        with pytest.raises(SystemExit, match="SORSA_KERNELS_FORCE_CUDA=1 but torch is a CPU-only build"):
            plan(None, "13.0", env)
        with pytest.raises(SystemExit, match="SORSA_KERNELS_FORCE_CUDA=1 but no CUDA compiler found"):
            plan("13.0", None, env)
    with pytest.raises(SystemExit, match="both set"):
        plan("13.0", "13.0", {"SORSA_KERNELS_FORCE_CUDA": "1", "SORSA_KERNELS_SKIP_CUDA": "1"})
    assert SETUP["DEFAULT_ARCHS"] == "8.0;9.0+PTX"
    assert SETUP["default_max_jobs"]() >= 1


def test_wheel_version_tag():
    version = SETUP["package_version"]
    import sorsa_kernels
    assert version({}, torch) == sorsa_kernels.__version__
    assert version({"SORSA_KERNELS_LOCAL_VERSION": "abc1"}, torch) == sorsa_kernels.__version__ + "+abc1"
    if torch.version.cuda is None:
        with pytest.raises(SystemExit, match="needs a CUDA build of torch"):
            version({"SORSA_KERNELS_LOCAL_VERSION": "auto"}, torch)
    else:
        cu = torch.version.cuda.replace(".", "")
        assert version({"SORSA_KERNELS_LOCAL_VERSION": "auto"}, torch) == \
            f"{sorsa_kernels.__version__}+cu{cu}torch{torch.__version__.split('+')[0]}"


@pytest.mark.skipif(torch.version.cuda is None, reason="torch's pip CUDA wheels come with a CUDA build of torch")
def test_finds_the_cuda_libraries_of_torchs_pip_wheels(tmp_path):
    incs, libs = SETUP["pip_cuda_dirs"](torch.version.cuda.split(".")[0])
    assert any(os.path.exists(os.path.join(d, "cublas_v2.h")) for d in incs), incs
    assert any(os.path.exists(os.path.join(d, "cusolverDn.h")) for d in incs), incs
    link = SETUP["link_dir_for_cudart"](libs, str(tmp_path / "cudart"))
    assert link and os.path.realpath(os.path.join(link, "libcudart.so")).startswith(tuple(libs))
    assert SETUP["link_dir_for_cudart"]([str(tmp_path)], str(tmp_path / "x")) is None


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch (both present on the CI machine)")
def test_cuda_extension_builds_by_itself(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CPATH", "LIBRARY_PATH", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "SORSA_KERNELS_CUDA",
                        "SORSA_KERNELS_FORCE_CUDA", "SORSA_KERNELS_SKIP_CUDA", "SORSA_KERNELS_NO_EXT")}
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "sorsa-kernels: building CPU + CUDA kernels" in log, log[-3000:]
    assert re.search(r"nvcc .*rsvd_ops_cuda\.cu", log), "the CUDA sources were not compiled"
    warnings = re.findall(r"csrc/\S+: warning.*", log)
    assert not warnings, warnings  # -Wall -Wextra, third-party headers are -isystem
    pkg = tmp_path / "lib" / "sorsa_kernels"
    so = [f for f in os.listdir(pkg) if f.startswith("_C") and f.endswith(".so")]
    assert len(so) == 1, os.listdir(pkg)
    rec = json.loads((pkg / "_C_build.json").read_text())
    assert rec["torch"] == torch.__version__ and rec["cuda_archs"] == "8.0;9.0+PTX" and rec["cuda"], rec

    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    elf = subprocess.run([cuobjdump, "--list-elf", str(pkg / so[0])], capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(pkg / so[0])], capture_output=True, text=True).stdout
    assert ".sm_80.cubin" in elf and ".sm_90.cubin" in elf and ".sm_90.ptx" in ptx, elf + ptx

    probe = (f"import torch; torch.ops.load_library({str(pkg / so[0])!r}); "
             "print(torch._C._dispatch_has_kernel_for_dispatch_key('sorsa_kernels::jacobi_svd', 'CUDA'))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stdout + res.stderr


def test_build_without_torch_says_what_to_do(monkeypatch):
    """`pip install --no-build-isolation .` before torch is installed: a clear message, not a traceback."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.delenv("SORSA_KERNELS_NO_EXT", raising=False)
    with pytest.raises(SystemExit, match="torch must be importable to build the extension. Install torch first"):
        SETUP["extensions"]()


def test_quick_start_installs_torch_once():
    """README's two commands install torch, then build against it without an isolated build env
    (which would download and install torch a second time)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(block) == 2, block  # .ci/run runs exactly these two lines
    for line in block:
        steps = [s.strip() for s in line.split("&&")]
        build = [i for i, s in enumerate(steps) if re.search(r"pip install (--\S+ )*(\.|\"\.\[\w+\]\")$", s)]
        torch_first = [i for i, s in enumerate(steps) if re.match(r"\S*pip install .*\btorch\b", s)]
        assert len(build) == 1 and "--no-build-isolation" in steps[build[0]], line
        assert torch_first and torch_first[0] < build[0], line


def test_stale_build_sources_are_dropped_before_a_build(tmp_path):
    """A module moved out of the tree must not be installed again from build/lib."""
    drop = SETUP["drop_stale_build_sources"]
    (tmp_path / "sorsa_kernels" / "ops").mkdir(parents=True)
    (tmp_path / "sorsa_kernels" / "__init__.py").write_text("")
    (tmp_path / "sorsa_kernels" / "ops" / "linear.py").write_text("")
    lib = tmp_path / "build" / "lib.x" / "sorsa_kernels"
    (lib / "ops").mkdir(parents=True)
    (lib / "old").mkdir()
    for f in ("__init__.py", "_dispatch.py", "ops/linear.py", "old/gone.py", "_C.so"):
        (lib / f).write_text("")
    gone = drop(str(tmp_path))
    assert sorted(os.path.relpath(g, lib) for g in gone) == ["_dispatch.py", os.path.join("old", "gone.py")]
    assert (lib / "__init__.py").exists() and (lib / "ops" / "linear.py").exists() and (lib / "_C.so").exists()
    assert not (lib / "old").exists()
