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
  its own per-device-type order (``OpSpec.auto_order``; e.g. rsvd: torch on the CPU). Ops whose spec says
  ``timed`` get, on CUDA, a timed per-shape choice between the fused path and the torch path
  (:mod:`sorsa_kernels._autotune`).

The registry: each op's package describes itself in one :class:`OpSpec` and calls
:func:`register` when it is imported. Generic code (this module, ``sorsa-kernels info`` and
``check``, the benchmarks, the AOT check) iterates :func:`specs` and names no op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ._env import ext_status, triton_interpret, triton_runtime_status, triton_status

BACKENDS = ("auto", "torch", "triton", "ext")
# What "auto" tries, in order, before falling back to "torch", unless the op says otherwise.
AUTO_ORDER_DEFAULT: Tuple[str, ...] = ("triton", "ext")


@dataclass(frozen=True)
class OpSpec:
    """What generic code needs to know about one op. Its hooks are module paths, imported only
    when used (a Triton-only module is never imported without Triton, and the registry adds no
    import edges).

    Attributes:
        name: the op's name in ``backend`` errors and ``sorsa-kernels info``.
        doc: one line saying what the op computes.
        impls: accelerated backends (besides ``"torch"``, which every op has) -> the dtypes that
            implementation handles (None: any).
        auto_order: device type -> the backends ``"auto"`` tries there, in order (default
            :data:`AUTO_ORDER_DEFAULT`; ``()``: always torch there).
        timed: ``"auto"`` on CUDA is a timed per-shape choice (the op passes a case to :func:`choose`).
        check: module with ``CASES``, the op's ``sorsa-kernels check`` cases (:class:`sorsa_kernels.check.Case`).
        aot: module with ``cases(dtypes)`` (:class:`sorsa_kernels.aot_check.Case`: thunks driving the
            op's launchers on meta tensors), ``PIPELINE_OPERANDS`` and ``SMEM_FALLBACK`` (kernel name ->
            the constexpr flag read by the AOT gates; see :mod:`sorsa_kernels.aot_check`).
        bench: module with the op's benchmark rows (``OPS``, ``cases``, ``build``; see
            :mod:`sorsa_kernels.bench`).
    """
    name: str
    doc: str
    impls: Mapping[str, Optional[Tuple[torch.dtype, ...]]] = field(default_factory=dict)
    auto_order: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    timed: bool = False
    check: Optional[str] = None
    aot: Optional[str] = None
    bench: Optional[str] = None

    def __post_init__(self):
        bad = [b for b in list(self.impls) + [b for o in self.auto_order.values() for b in o] if b not in BACKENDS[2:]]
        if bad:
            raise ValueError(f"OpSpec {self.name!r}: backends must be in {BACKENDS[2:]}, got {bad}")


_SPECS: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry (an op's package calls this once, on import)."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"spec must be an OpSpec, got {type(spec).__name__}")
    _SPECS[spec.name] = spec
    return spec


def specs() -> List[OpSpec]:
    """Every registered op, in registration order."""
    return list(_SPECS.values())


def spec(op: str) -> OpSpec:
    """The registered :class:`OpSpec` named ``op``."""
    try:
        return _SPECS[op]
    except KeyError:
        raise ValueError(f"op must be one of {sorted(_SPECS)}, got {op!r}") from None


def auto_order(op: str, device_type: str) -> Tuple[str, ...]:
    """The backends ``"auto"`` tries for ``op`` on ``device_type``, before ``"torch"``."""
    return tuple(spec(op).auto_order.get(device_type, AUTO_ORDER_DEFAULT))

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
    for b in sorted(spec(op).impls):
        if (triton_status()[0] if b == "triton" else ext_status()[0]):
            out.append(b)
    return out


def _handles(op: str, backend: str, dtype: Optional[torch.dtype]) -> bool:
    allowed = spec(op).impls.get(backend)
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
    impls = spec(op).impls
    if backend == "auto":
        for b in auto_order(op, device.type):
            if b in impls and _handles(op, b, dtype) and _can_run(b, device, forced=False)[0]:
                return b
        return "torch"
    if backend not in impls:
        raise RuntimeError(f"backend='{backend}' is not available for {op}: this op has no {backend} implementation")
    if not _handles(op, backend, dtype):
        names = ", ".join(str(d).replace("torch.", "") for d in impls[backend])
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
    else what differs) before anything is timed. Inside a ``torch.compile`` trace it returns
    ``(fields,)`` with the fields it cannot read as None. A forced backend is never second-guessed.
    """
    impl = resolve(op, backend, device, dtype)
    if backend != "auto" or impl == "torch" or device.type != "cuda" or case is None:
        return impl
    from . import _autotune
    if not _autotune.autotune_enabled():
        return impl
    if torch.compiler.is_compiling():
        # Inside a trace nothing is timed: the decision eager calls already cached for these
        # fields becomes a constant of the graph; fields never timed take the fused path.
        got = case()
        if got is None or isinstance(got, str):
            return impl if got is None else got
        return _autotune.cached_choice(op, impl, tuple(sorted(got[0].items())), str(device))
    got = case()
    if got is None:
        return impl
    if isinstance(got, str):  # decided by the op's rule (e.g. decode-sized rows), not timed
        return got
    fields, bench, *rest = got
    return _autotune.decide(op, impl, _autotune.make_key(op, fields, device), fields, bench, device=device,
                            need_bytes=rest[0] if rest else None, verify=rest[1] if len(rest) > 1 else None)


def describe() -> Dict[str, Dict[str, str]]:
    """Per op, what ``backend="auto"`` runs on ``cpu`` and on ``cuda`` in this process (with why),
    for ``sorsa-kernels info``."""
    t_ok, t_why = triton_runtime_status()
    out: Dict[str, Dict[str, str]] = {}
    for sp in specs():
        op = sp.name
        row = {"cpu": resolve(op, "auto", torch.device("cpu"))}
        if torch.cuda.is_available():
            cuda = resolve(op, "auto", torch.device("cuda"))
            timed = sp.timed and cuda != "torch"
            row["cuda"] = cuda + (" or torch, timed per shape (SORSA_KERNELS_AUTOTUNE=0: always fused)"
                                  if timed else "")
        else:
            row["cuda"] = "no CUDA device visible"
        if "triton" in sp.impls and not t_ok:
            row["triton"] = t_why
        out[op] = row
    return out

