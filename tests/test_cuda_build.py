"""The CUDA sources compile and link on this CPU machine (nvcc, no GPU): a CUDA file that does not
compile fails CI. Recipe from shared/ENVIRONMENT.md: the CUDA library headers and libcudart come
from the nvidia pip wheels that the CUDA build of torch installs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_env(tmp):
    env = dict(os.environ, SORSA_KERNELS_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0;9.0", MAX_JOBS="2")
    try:
        import nvidia
        nv = os.path.join(nvidia.__path__[0], "cu13")
    except ImportError:
        return env
    if os.path.isdir(nv):
        libdir = os.path.join(tmp, "cudalib")
        os.makedirs(libdir, exist_ok=True)
        rt = os.path.join(nv, "lib", "libcudart.so.13")
        if os.path.exists(rt):
            os.symlink(rt, os.path.join(libdir, "libcudart.so"))
        env["CPATH"] = os.pathsep.join(filter(None, [os.path.join(nv, "include"), env.get("CPATH")]))
        env["LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.path.join(nv, "lib"), env.get("LIBRARY_PATH")]))
    env.setdefault("CUDA_HOME", "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else "")
    return env


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch (both present on the CI machine)")
def test_cuda_extension_compiles_links_and_registers(tmp_path):
    env = _nvidia_env(str(tmp_path))
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "nvcc" in out.stdout + out.stderr, "the CUDA sources were not compiled"
    so = [f for f in os.listdir(tmp_path / "lib" / "sorsa_kernels") if f.startswith("_C")]
    assert so
    probe = (f"import torch; torch.ops.load_library({str(tmp_path / 'lib' / 'sorsa_kernels' / so[0])!r}); "
             "print(torch._C._dispatch_has_kernel_for_dispatch_key('sorsa_kernels::jacobi_svd', 'CUDA'))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stdout + res.stderr
