"""Build script. The pure-Python package always installs; the C++/CUDA extension in csrc/
is built only when csrc/ has sources *and* torch is importable at build time (CUDA parts
additionally need nvcc and a CUDA build of torch). Set SORSA_KERNELS_NO_EXT=1 to skip it."""
import glob
import os

from setuptools import setup


def extensions():
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources or os.environ.get("SORSA_KERNELS_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("sorsa-kernels: torch not importable at build time; building without the C++ extension")
        return [], {}
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = bool(cu) and cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda
    ext_cls = cpp_extension.CUDAExtension if use_cuda else cpp_extension.CppExtension
    ext = ext_cls("sorsa_kernels._C", sources + (cu if use_cuda else []),
                  define_macros=[("SORSA_WITH_CUDA", "1")] if use_cuda else [],
                  extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]} if use_cuda else ["-O3"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
