"""What the compiled extension ``sorsa_kernels._C`` was built against, and loading it only into
the torch it matches.

setup.py writes ``_C_build.json`` next to the extension. A C++ extension uses torch's C++ ABI,
which changes between torch releases: loaded into another torch it fails with an undefined
symbol, or worse loads and misbehaves. So the record is checked *before* the extension is
loaded; on a mismatch the package warns (naming both versions and the fix) and runs without it.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import sysconfig
import warnings
from typing import Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(_HERE, "_C_build.json")
# How to rebuild from a source checkout for the torch that is installed.
REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall <sorsa-kernels source dir>"
# torch releases a CUDA wheel is built for (scripts/build_wheel.sh --torch V) -> the CUDA of its PyPI build.
WHEEL_TORCH = {"2.11.0": "13.0", "2.14.1": "13.0", "2.15.0": "13.2"}


class ExtensionMismatchWarning(UserWarning):
    """The compiled extension does not match the installed torch and is not used."""


def build_info() -> Optional[dict]:
    """What the installed extension was built against, or None when there is no compiled extension
    record (pure-Python install, SORSA_KERNELS_NO_EXT=1).

    Keys: ``version`` (package version incl. a ``+cu…torch…`` wheel tag), ``torch`` (torch.__version__
    at build time), ``torch_cuda`` (that torch's CUDA), ``cuda`` (nvcc version the CUDA kernels were
    compiled with, None for a CPU-only build), ``cuda_archs`` (TORCH_CUDA_ARCH_LIST used),
    ``python``, ``platform``, ``cxx11_abi``.
    """
    try:
        with open(RECORD) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def mismatch(info: Optional[dict] = None) -> Optional[str]:
    """None when an extension built as ``info`` (default: the installed record) can load into the
    running torch, else a message naming both builds and the fix."""
    info = build_info() if info is None else info
    if info is None:
        return None
    built = info.get("torch")
    if built == torch.__version__:
        return None
    base = str(built).split("+")[0]
    return (f"sorsa_kernels: the compiled extension sorsa_kernels._C was built against torch {built} "
            f"(CUDA {info.get('torch_cuda') or 'none'}), but torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}) is installed, so it is not loaded: rsvd runs its torch "
            f"path, the Triton and torch paths are unaffected. Fix: install the torch it was built for "
            f"(pip install torch=={base}); {wheel_for_installed_torch(info)}; "
            f"or rebuild it for this torch: {REBUILD}")


def wheel_for_installed_torch(info: Optional[dict] = None) -> str:
    """What fits the running torch instead, as a clause for the mismatch message: the wheel built
    for it (file name and the command that builds it), or why none exists."""
    info = build_info() if info is None else info
    tv = torch.__version__.split("+")[0]
    cuda = WHEEL_TORCH.get(tv)
    if torch.version.cuda is None:
        return (f"no CUDA wheel fits a CPU-only build of torch ({torch.__version__}): install a CUDA build "
                f"of torch, or rebuild for this one")
    if cuda is None or torch.version.cuda != cuda:
        return (f"no sorsa-kernels wheel is built for torch {torch.__version__} (wheels exist for torch "
                + ", ".join(f"{v} with CUDA {c}" for v, c in WHEEL_TORCH.items()) + ")")
    base = str((info or {}).get("version", "")).split("+")[0] or "<version>"
    py = "cp{}{}".format(*sys.version_info[:2])
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    name = f"sorsa_kernels-{base}+cu{cuda.replace('.', '')}torch{tv}-{py}-{py}-{plat}.whl"
    return (f"or use the wheel for torch {tv}: build it with `bash scripts/build_wheel.sh --torch {tv}` "
            f"from the source tree, then pip install dist/{name}")


def load_extension() -> tuple[bool, str]:
    """Import ``sorsa_kernels._C`` when its build record matches the running torch.

    Returns (loaded, reason). Never raises: a mismatch or a failing load is a warning plus
    (False, reason); a package installed without the extension is (False, reason) silently.
    """
    bad = mismatch()
    if bad is not None:
        warnings.warn(bad, ExtensionMismatchWarning, stacklevel=2)
        return False, bad
    try:
        importlib.import_module("sorsa_kernels._C")
    except Exception as exc:
        why = (f"the C++ extension sorsa_kernels._C could not be loaded ({type(exc).__name__}: {exc}); "
               f"rebuild it for this torch: {REBUILD}")
        if build_info() is not None:  # it was built, so failing to load is a broken install: say so
            warnings.warn(f"sorsa_kernels: {why}; running without it", ExtensionMismatchWarning, stacklevel=2)
        return False, why
    return True, "ok"
