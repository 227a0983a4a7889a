"""Build script. Always builds the C++ extension ``sorsa_kernels._C`` (CPU implementations of
the randomized-SVD building blocks, g++ only). Adds the CUDA implementations (csrc/*.cu)
when ``SORSA_KERNELS_CUDA=1`` or a GPU is visible at build time, which needs nvcc and a CUDA
build of torch. ``SORSA_KERNELS_NO_EXT=1`` skips the extension (pure-Python package; rsvd
then reports that the extension is missing)."""
import glob
import os

from setuptools import setup


def extensions():
    if os.environ.get("SORSA_KERNELS_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sorsa-kernels: torch is not importable at build time; building without the C++ extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    want_cuda = os.environ.get("SORSA_KERNELS_CUDA") == "1" or (
        os.environ.get("SORSA_KERNELS_CUDA") != "0" and torch.cuda.is_available())
    use_cuda = want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not use_cuda:
        print("sorsa-kernels: CUDA requested but nvcc / a CUDA build of torch is missing; CPU build only")
    # -O3 plus the reassociation that lets g++ vectorise the Jacobi dot products (NaN/Inf
    # semantics are kept: no -ffinite-math-only). The C++ standard comes from torch.
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "sorsa_kernels._C", sources + sorted(glob.glob("csrc/*.cu")), include_dirs=[os.path.abspath("csrc")],
            define_macros=[("SORSA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = cpp_extension.CppExtension("sorsa_kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                                         extra_compile_args=cxx)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
