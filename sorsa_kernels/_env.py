"""Facts about this process's environment that decide what can run: whether Triton imports,
whether its interpreter is on, whether the compiled extension loaded (and with CUDA kernels).

A leaf module: kernels and launchers import it, it imports nothing of the package but the
extension loader. Probed once at import (plain constants, so ``torch.compile`` traces through).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch


def triton_interpret() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return False, f"'import triton' failed: {exc!r}"
    return True, "ok"


def _probe_ext() -> Tuple[bool, bool, str]:
    if os.environ.get("SORSA_KERNELS_NO_EXT", "0") not in ("", "0"):
        return False, False, "SORSA_KERNELS_NO_EXT=1: the compiled extension is not loaded"
    from ._build_info import load_extension  # checks the build record against torch before loading
    ok, why = load_extension()
    if not ok:
        return False, False, why
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("sorsa_kernels::jacobi_svd", "CUDA")
    return True, bool(has_cuda), "ok"


_TRITON_STATUS = _probe_triton()
_EXT_STATUS = _probe_ext()


def triton_status() -> Tuple[bool, str]:
    """(importable, reason): the reason says what is missing. Whether kernels can also *run*
    here (a CUDA GPU, or the interpreter) is :func:`triton_runtime_status`."""
    return _TRITON_STATUS


def triton_runtime_status() -> Tuple[bool, str]:
    """(Triton kernels can run in this process, reason)."""
    ok, why = triton_status()
    if not ok:
        return False, why
    if triton_interpret():
        return True, "interpreter on (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
    if torch.cuda.is_available():
        return True, f"CUDA GPU: {torch.cuda.get_device_name()}"
    return False, ("triton is installed but no CUDA GPU is visible: its kernels cannot run here "
                   "(the torch path runs; TRITON_INTERPRET=1 runs them in the interpreter for tests)")


def ext_status() -> Tuple[bool, bool, str]:
    """(extension loaded, built with CUDA kernels, reason)."""
    return _EXT_STATUS
