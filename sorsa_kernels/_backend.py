"""The one place that decides which implementation (backend) runs an op.

Every public op takes ``backend=`` and asks :func:`resolve`; nothing else in the package
branches on the backend name.

* ``"torch"``: plain PyTorch, any device, always available.
* ``"triton"``: fused Triton kernels; needs Triton plus CUDA tensors, or CPU tensors
  while the Triton interpreter is on (``TRITON_INTERPRET=1`` set before import).
* ``"ext"``: the compiled C++/CUDA extension ``sorsa_kernels._C`` (CPU build always, CUDA
  implementations when it was built with nvcc).
* ``"auto"``: the op's accelerated backend when it can run on the tensors' device (Triton
  only for CUDA tensors: the interpreter is a test vehicle), else ``"torch"``. An op may set
  its own per-device-type order with :func:`prefer` (e.g. rsvd: torch on the CPU). Ops that pass
  a shape signature to :func:`choose` get, on CUDA, a timed per-shape choice between the
  fused path and the torch path (:mod:`sorsa_kernels._dispatch`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "ext")

# op name -> backends with an implementation besides "torch"; filled by the op modules.
_IMPLEMENTED: Dict[str, set] = {}
# (op, backend) -> the dtypes that implementation handles (absent: any); the torch path handles all.
_DTYPES: Dict[Tuple[str, str], Tuple[torch.dtype, ...]] = {}

# What "auto" tries, in order, before falling back to "torch".
_AUTO_ORDER_DEFAULT: Tuple[str, ...] = ("triton", "ext")
# (op, device type) -> that order, where an op measured differently; set by the op modules via
# :func:`prefer` so that resolve() (and describe(), hence `sorsa-kernels info`) is the one place.
_AUTO_ORDER: Dict[Tuple[str, str], Tuple[str, ...]] = {}


def register(op: str, backend: str, dtypes: Optional[Tuple[torch.dtype, ...]] = None) -> None:
    """Declare that ``op`` has an implementation for ``backend`` (handling ``dtypes``; None: any)."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _IMPLEMENTED.setdefault(op, {"torch"}).add(backend)
    if dtypes is not None:
        _DTYPES[(op, backend)] = tuple(dtypes)


def prefer(op: str, device_type: str, order: Tuple[str, ...]) -> None:
    """Set the backends ``"auto"`` tries for ``op`` on ``device_type`` (in order; ``"torch"``
    is the fallback and need not be listed; ``()`` means always torch there)."""
    bad = [b for b in order if b not in BACKENDS[1:]]
    if bad:
        raise ValueError(f"order entries must be in {BACKENDS[1:]}, got {bad}")
    _AUTO_ORDER[(op, device_type)] = tuple(order)


def auto_order(op: str, device_type: str) -> Tuple[str, ...]:
    """The backends ``"auto"`` tries for ``op`` on ``device_type``, before ``"torch"``."""
    return _AUTO_ORDER.get((op, device_type), _AUTO_ORDER_DEFAULT)


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


def _probe_ext() -> tuple[bool, bool, str]:
    from ._build_info import load_extension  # checks the build record against torch before loading
    ok, why = load_extension()
    if not ok:
        return False, False, why
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("sorsa_kernels::jacobi_svd", "CUDA")
    return True, bool(has_cuda), "ok"


# probed once at import: plain constants for torch.compile
_TRITON_STATUS = _probe_triton()
_EXT_STATUS = _probe_ext()


def triton_status() -> tuple[bool, str]:
    """(importable, reason): the reason says what is missing. Whether kernels can also *run*
    here (a CUDA GPU, or the interpreter) is :func:`triton_runtime_status`."""
    return _TRITON_STATUS


def triton_runtime_status() -> tuple[bool, str]:
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


def ext_status() -> tuple[bool, bool, str]:
    """(extension loaded, built with CUDA kernels, reason)."""
    return _EXT_STATUS


def _can_run(backend: str, device: torch.device, forced: bool) -> tuple[bool, str]:
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if device.type == "cuda" or (forced and device.type == "cpu" and triton_interpret()):
            return True, "ok"
        return False, (f"it needs CUDA tensors (got device '{device}'); CPU tensors run only under the "
                       "Triton interpreter (set TRITON_INTERPRET=1 before importing triton)")
    ok, cuda, why = ext_status()
    if not ok:
        return False, why
    if device.type == "cpu" or (device.type == "cuda" and cuda):
        return True, "ok"
    if device.type == "cuda":
        return False, "the extension was built without CUDA (rebuild with SORSA_KERNELS_FORCE_CUDA=1 and nvcc)"
    return False, f"it has no kernels for device '{device}'"


def available_backends(op: str) -> list[str]:
    """Backends that could run ``op`` on some device in this process."""
    out = ["torch"]
    for b in sorted(_IMPLEMENTED.get(op, set()) - {"torch"}):
        if (triton_status()[0] if b == "triton" else ext_status()[0]):
            out.append(b)
    return out


def _handles(op: str, backend: str, dtype: Optional[torch.dtype]) -> bool:
    allowed = _DTYPES.get((op, backend))
    return dtype is None or allowed is None or dtype in allowed


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Return the concrete backend for running ``op`` on ``device`` (with inputs of ``dtype``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` naming what is
    missing when a forced backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    impls = _IMPLEMENTED.get(op, set())
    if backend == "auto":
        for b in auto_order(op, device.type):
            if b in impls and _handles(op, b, dtype) and _can_run(b, device, forced=False)[0]:
                return b
        return "torch"
    if backend not in impls:
        raise RuntimeError(f"backend='{backend}' is not available for {op}: this op has no {backend} implementation")
    if not _handles(op, backend, dtype):
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[(op, backend)])
        raise RuntimeError(f"backend='{backend}' is not available for {op} with {str(dtype).replace('torch.', '')} "
                           f"inputs: it handles {names} (backend='torch' or 'auto' runs any float dtype)")
    ok, why = _can_run(backend, device, forced=True)
    if not ok:
        raise RuntimeError(f"backend='{backend}' is not available for {op}: {why}")
    return backend


def choose(op: str, backend: str, device: torch.device,
           case: Optional[Callable[[], Optional[Tuple[Any, ...]]]] = None,
           dtype: Optional[torch.dtype] = None) -> str:
    """:func:`resolve`, plus the timed fused-vs-torch choice for ``backend="auto"`` on CUDA.

    ``case()`` (called only when a choice is to be made) returns a backend name when the op's
    rule decides without timing, or ``(fields, bench[, need_bytes[, verify]])``:
    the op's signature (bucketed dims, dtype, dropout on/off, bias, train), ``bench(name)``, which
    builds a thunk of candidate ``name`` on random inputs of those shapes (fwd+bwd when training,
    else forward only), optionally the bytes that bench needs on the device and ``verify(fused)``,
    which compares the fused candidate with the torch path by the tolerance rule (None: agree;
    else what differs) before anything is timed; it returns
    None when the shapes are symbolic. A forced backend is never second-guessed.
    """
    impl = resolve(op, backend, device, dtype)
    if backend != "auto" or impl == "torch" or device.type != "cuda" or case is None:
        return impl
    from . import _dispatch
    if torch.compiler.is_compiling():
        # Inside a trace nothing is timed: the decision an eager call already cached for this key
        # becomes a constant of the graph; a key never timed takes the fused path.
        got = case()
        if got is None or isinstance(got, str):
            return impl if got is None else got
        return _dispatch.cached_choice(op, impl, tuple(sorted(got[0].items())), str(device))
    if not _dispatch.autotune_enabled():
        return impl
    got = case()
    if got is None:
        return impl
    if isinstance(got, str):  # decided by the op's rule (e.g. decode-sized rows), not timed
        return got
    fields, bench, *rest = got
    return _dispatch.decide(op, impl, _dispatch.make_key(op, fields, device), fields, bench, device=device,
                            need_bytes=rest[0] if rest else None, verify=rest[1] if len(rest) > 1 else None)


def describe() -> Dict[str, Dict[str, str]]:
    """Per op, what ``backend="auto"`` runs on ``cpu`` and on ``cuda`` in this process (with why),
    for ``sorsa-kernels info``."""
    t_ok, t_why = triton_runtime_status()
    out: Dict[str, Dict[str, str]] = {}
    for op in sorted(_IMPLEMENTED):
        row = {"cpu": resolve(op, "auto", torch.device("cpu"))}
        if torch.cuda.is_available():
            cuda = resolve(op, "auto", torch.device("cuda"))
            timed = op in _TIMED and cuda != "torch"
            row["cuda"] = cuda + (" or torch, timed per shape (SORSA_KERNELS_AUTOTUNE=0: always fused)"
                                  if timed else "")
        else:
            row["cuda"] = "no CUDA device visible"
        if "triton" in _IMPLEMENTED[op] and not t_ok:
            row["triton"] = t_why
        out[op] = row
    return out


# ops whose "auto" goes through the timed dispatcher on CUDA (they call choose() with a signature)
_TIMED = {"sorsa_linear"}
