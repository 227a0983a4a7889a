"""The one place that decides which implementation (backend) runs an op.

Every public op takes ``backend="auto" | "torch" | "triton"`` and asks :func:`resolve`;
nothing else in the package branches on the backend name.

* ``"torch"``: plain PyTorch, any device, always available.
* ``"triton"``: fused Triton kernels; needs Triton plus CUDA tensors, or CPU tensors
  while the Triton interpreter is on (``TRITON_INTERPRET=1`` set before import).
* ``"auto"``: ``"triton"`` for CUDA tensors when the op has a Triton kernel and Triton
  is usable, else ``"torch"``.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("auto", "torch", "triton")

# op name -> set of backends with a kernel; filled by the op modules at import time.
_IMPLEMENTED: Dict[str, set] = {}


def register(op: str, backend: str) -> None:
    """Declare that ``op`` has an implementation for ``backend``."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLEMENTED.setdefault(op, {"torch"}).add(backend)


def triton_interpret() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return False, f"'import triton' failed: {exc!r}"
    return True, "ok"


_TRITON_STATUS = _probe_triton()  # probed once at import: a plain constant for torch.compile


def triton_status() -> tuple[bool, str]:
    """(usable, reason): the reason says what is missing."""
    return _TRITON_STATUS


def available_backends(op: str) -> list[str]:
    """Backends that could run ``op`` on some device in this process."""
    out = ["torch"]
    if "triton" in _IMPLEMENTED.get(op, ()) and triton_status()[0]:
        out.append("triton")
    return out


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Return the concrete backend ("torch" or "triton") for running ``op`` on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` naming what is
    missing when a forced backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    has_kernel = "triton" in _IMPLEMENTED.get(op, ())
    ok, why = triton_status()
    device_ok = device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    if backend == "auto":
        # The interpreter is a test vehicle, never chosen automatically for CPU tensors.
        return "triton" if (has_kernel and ok and device.type == "cuda") else "torch"
    if not has_kernel:
        raise RuntimeError(f"backend='triton' is not available for {op}: this op has no Triton kernel yet")
    if not ok:
        raise RuntimeError(f"backend='triton' is not available for {op}: {why}")
    if not device_ok:
        raise RuntimeError(
            f"backend='triton' for {op} needs CUDA tensors (got device '{device}'); "
            "CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    return "triton"
