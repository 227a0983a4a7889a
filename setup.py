"""Build script for the compiled extension ``sorsa_kernels._C`` (csrc/).

The CPU build (g++) is always made. The CUDA kernels (csrc/*.cu) are added when torch is a CUDA
build and a CUDA compiler (nvcc) is found; no GPU is needed to build them. Environment switches:

  SORSA_KERNELS_FORCE_CUDA=1   build the CUDA kernels or fail (never a silent CPU-only build)
  SORSA_KERNELS_SKIP_CUDA=1    CPU build only, even where CUDA could be built
  SORSA_KERNELS_NO_EXT=1       no compiled extension at all (pure-Python package)
  TORCH_CUDA_ARCH_LIST         GPU archs, default "8.0;9.0+PTX" (A100, H100/H200, PTX so later GPUs JIT)
  MAX_JOBS, NVCC_THREADS       parallel compile jobs (ninja) and nvcc threads per .cu file
  SORSA_KERNELS_LOCAL_VERSION  "auto": tag the version with the build, e.g. 0.1.0+cu130torch2.14.1
                               (scripts/build_wheel.sh sets it); any other value is used as the tag
  SORSA_KERNELS_CUDA=1 / =0    older names for FORCE_CUDA / SKIP_CUDA

The extension is compiled against the torch that runs this script, which must be the torch it will
load into: build with ``pip install --no-build-isolation .`` in an environment that has torch.
A record of what it was built against (``sorsa_kernels.build_info()``) is written next to it; at
import a mismatching torch gets a warning and the extension is not loaded.
"""
import glob
import hashlib
import json
import os
import shutil
import re
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
RECORD_NAME = "_C_build.json"  # read by sorsa_kernels/_build_info.py
# Headers that torch's ATen/cuda/CUDAContext.h includes beyond the CUDA runtime's.
CUDA_LIB_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
# -Wall -Wextra for our sources; torch's own headers come in through -isystem (see BuildExt).
CXX_FLAGS = ["-O3", "-Wall", "-Wextra",
             # reassociation lets g++ vectorise the Jacobi dot products; NaN/Inf semantics are kept
             # (no -ffinite-math-only)
             "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]


def env_flag(name: str, env=os.environ) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def package_version(env=os.environ, torch=None) -> str:
    """The version in sorsa_kernels/_version.py, plus the local tag SORSA_KERNELS_LOCAL_VERSION asks for."""
    with open(os.path.join(ROOT, "sorsa_kernels", "_version.py")) as f:
        base = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    local = env.get("SORSA_KERNELS_LOCAL_VERSION", "").strip()
    if local == "auto":
        if torch is None or torch.version.cuda is None:
            raise SystemExit("SORSA_KERNELS_LOCAL_VERSION=auto needs a CUDA build of torch")
        local = "cu{}torch{}".format(torch.version.cuda.replace(".", ""), torch.__version__.split("+")[0])
    return f"{base}+{local}" if local else base


def nvcc_version(cuda_home):
    """'13.0' from `nvcc --version`, or None when there is no working nvcc under cuda_home."""
    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    if not cuda_home or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_plan(torch_cuda, nvcc, env=os.environ):
    """(build the CUDA kernels?, why). torch_cuda: torch.version.cuda; nvcc: nvcc_version(...).
    Raises SystemExit when SORSA_KERNELS_FORCE_CUDA=1 asks for what cannot be built."""
    force = env_flag("SORSA_KERNELS_FORCE_CUDA", env) or env.get("SORSA_KERNELS_CUDA") == "1"
    skip = env_flag("SORSA_KERNELS_SKIP_CUDA", env) or env.get("SORSA_KERNELS_CUDA") == "0"
    if force and skip:
        raise SystemExit("sorsa-kernels: SORSA_KERNELS_FORCE_CUDA and SORSA_KERNELS_SKIP_CUDA are both set")
    if skip:
        return False, "SORSA_KERNELS_SKIP_CUDA=1"
    missing = None
    if torch_cuda is None:
        missing = "torch is a CPU-only build (install a CUDA build of torch)"
    elif nvcc is None:
        missing = "no CUDA compiler found (put nvcc on PATH or set CUDA_HOME)"
    elif nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        missing = f"nvcc is CUDA {nvcc} but torch was built with CUDA {torch_cuda} (the major versions must match)"
    if missing is None:
        return True, f"torch CUDA {torch_cuda}, nvcc {nvcc}"
    if force:
        raise SystemExit(f"sorsa-kernels: SORSA_KERNELS_FORCE_CUDA=1 but {missing}")
    return False, missing


def pip_cuda_dirs(cuda_major: str):
    """(include dirs, lib dirs) of the CUDA toolkit wheels that a pip CUDA build of torch installs:
    nvidia/cu13/{include,lib} for CUDA 13, nvidia/<component>/{include,lib} for CUDA 12."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    incs, libs = [], []
    for base in (spec.submodule_search_locations if spec else None) or []:
        merged = os.path.join(base, f"cu{cuda_major}")
        comps = [merged] if os.path.isdir(merged) else [os.path.join(base, c) for c in sorted(os.listdir(base))]
        incs += [os.path.join(c, "include") for c in comps if os.path.isdir(os.path.join(c, "include"))]
        libs += [os.path.join(c, "lib") for c in comps if os.path.isdir(os.path.join(c, "lib"))]
    return incs, libs


def link_dir_for_cudart(lib_dirs, dest):
    """The pip wheels ship libcudart.so.N only; the linker's -lcudart needs libcudart.so. Make that
    name in dest (a build-temp folder) and return dest, or None when no libcudart was found."""
    for lib in lib_dirs:
        found = sorted(glob.glob(os.path.join(lib, "libcudart.so.[0-9]*")), key=len)
        if found:
            os.makedirs(dest, exist_ok=True)
            link = os.path.join(dest, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(found[0], link)
            return dest
    return None


def default_max_jobs() -> int:
    """One compile job per core, at most one per 2 GiB of free memory (an nvcc job with torch's headers
    peaks near 1.5 GiB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        free_gib = 2.0 * cores
    return max(1, min(cores, int(free_gib // 2)))


def extensions():
    if env_flag("SORSA_KERNELS_NO_EXT"):
        return [], {}, package_version()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit("sorsa-kernels: torch must be importable to build the extension. Install torch first, "
                         "then: pip install --no-build-isolation .   (SORSA_KERNELS_NO_EXT=1 builds without it)")
    version = package_version(torch=torch)
    nvcc = nvcc_version(cpp_extension.CUDA_HOME)
    use_cuda, why = cuda_plan(torch.version.cuda, nvcc)
    print(f"sorsa-kernels: {'building CPU + CUDA kernels' if use_cuda else 'building the CPU extension only'} ({why})")
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    # ninja in this interpreter's environment counts even when that environment is not activated
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    sources = sorted(glob.glob("csrc/*.cpp"))
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2"), "-Xcompiler", "-Wall,-Wextra"]
        ext = cpp_extension.CUDAExtension(
            "sorsa_kernels._C", sources + sorted(glob.glob("csrc/*.cu")), include_dirs=[os.path.abspath("csrc")],
            define_macros=[("SORSA_WITH_CUDA", "1")], extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags})
    else:
        ext = cpp_extension.CppExtension("sorsa_kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                                         extra_compile_args={"cxx": CXX_FLAGS})
    record = {
        "version": version, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda": nvcc if use_cuda else None,
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if use_cuda else None,
        "python": "{}.{}".format(*sys.version_info[:2]), "platform": sysconfig.get_platform(),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja) plus: a build folder per torch/interpreter/configuration (so
        objects built against another torch are never reused), the CUDA libraries of torch's pip wheels
        when the toolkit lacks them, and the build record next to the extension."""

        def finalize_options(self):
            super().finalize_options()
            key = json.dumps([sys.executable, torch.__file__, record], sort_keys=True)
            self.build_temp = os.path.join(self.build_temp, "sorsa-" + hashlib.sha1(key.encode()).hexdigest()[:10])
            self.force = True  # ninja decides what is stale (by command line and header deps), not mtimes

        def build_extensions(self):
            own = os.path.abspath("csrc")
            for e in self.extensions:
                if use_cuda:
                    home = cpp_extension.CUDA_HOME
                    incs, libs = pip_cuda_dirs(torch.version.cuda.split(".")[0])
                    if not all(os.path.exists(os.path.join(home, "include", h)) for h in CUDA_LIB_HEADERS):
                        e.include_dirs.extend(incs)  # after the toolkit's own include folder
                    if not any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib")):
                        link = link_dir_for_cudart(libs, os.path.join(os.path.abspath(self.build_temp), "cudart"))
                        e.library_dirs[:0] = [link] if link else []
                # torch's and CUDA's headers as system headers: -Wall -Wextra then report our sources only
                system = [d for d in e.include_dirs if os.path.abspath(d) != own]
                e.include_dirs = [d for d in e.include_dirs if os.path.abspath(d) == own]
                flags = [f for d in system for f in ("-isystem", d)]
                for lang in e.extra_compile_args:
                    e.extra_compile_args[lang] = flags + e.extra_compile_args[lang]
            super().build_extensions()
            for e in self.extensions:
                out = os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), RECORD_NAME)
                with open(out, "w") as f:
                    json.dump(record, f, indent=1, sort_keys=True)
                    f.write("\n")

        def get_outputs(self):
            return super().get_outputs() + [os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), RECORD_NAME)
                                            for e in self.extensions]

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=False)}, version


def drop_stale_build_sources(root: str = ROOT) -> list:
    """Delete ``build/lib*/sorsa_kernels/**/*.py`` files whose source no longer exists: setuptools
    copies sources into build/lib and installs everything there, so a module moved or removed in
    the tree would otherwise still be installed from an earlier build. Returns what was deleted."""
    import glob
    gone = []
    for lib in glob.glob(os.path.join(root, "build", "lib*", "sorsa_kernels")):
        for path in glob.glob(os.path.join(lib, "**", "*.py"), recursive=True):
            if not os.path.exists(os.path.join(root, "sorsa_kernels", os.path.relpath(path, lib))):
                os.remove(path)
                gone.append(path)
        for d, _, _ in sorted(os.walk(lib), reverse=True):  # then folders left with no module
            if not glob.glob(os.path.join(d, "**", "*.py"), recursive=True) and not os.path.exists(
                    os.path.join(root, "sorsa_kernels", os.path.relpath(d, lib))):
                shutil.rmtree(d)
    return gone


if __name__ == "__main__":
    drop_stale_build_sources()
    ext_modules, cmdclass, version = extensions()
    setup(version=version, ext_modules=ext_modules, cmdclass=cmdclass)
