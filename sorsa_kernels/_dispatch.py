"""Timed choice between an op's fused kernels and its cuBLAS-composed torch path (``backend="auto"``).

The fused path must win for the shapes it was designed for; this dispatcher is the floor that
keeps ``auto`` from ever being slower than plain PyTorch elsewhere, the way ``torch.compile``'s
max-autotune picks between Triton templates and ATen. It is consulted only by
:func:`sorsa_kernels._backend.choose` (the one place that decides the backend).

* Key: op, shape bucket (M rounded up to a power of two; the other dims exact: they are the
  model's), dtype, dropout on/off, bias, GPU arch. Decisions are cached in memory and on disk.
* Disk cache: ``$SORSA_KERNELS_CACHE_DIR`` or ``sorsa_kernels/`` next to Triton's cache dir,
  one JSON file whose entries are keyed also by torch/triton/package versions and GPU name.
* Timing: each candidate runs fwd+bwd once on random inputs of the real shapes, timed by
  ``triton.testing.do_bench`` (median, CUDA events). The timer is injectable (:func:`set_timer`).
* ``SORSA_KERNELS_AUTOTUNE=0``: no timing, always the fused path.
* Under ``torch.compile`` tracing nothing is timed: a cached decision is used, else the fused
  path (the choice is a constant of the traced graph).
* A candidate that raises while timed is recorded as failed and never chosen; if the fused
  candidate fails the torch path runs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ENV_AUTOTUNE = "SORSA_KERNELS_AUTOTUNE"
ENV_CACHE_DIR = "SORSA_KERNELS_CACHE_DIR"
CACHE_FILE = "dispatch.json"

# timer(candidate name, thunk) -> median milliseconds of thunk()
Timer = Callable[[str, Callable[[], Any]], float]


def _do_bench(name: str, fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench
    # warmup/rep are milliseconds: ~100 timed runs of fwd+bwd, once per shape key
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


_timer: Timer = _do_bench
_lock = threading.Lock()
_memory: Dict[str, dict] = {}
_loaded_from: Optional[str] = None


def set_timer(timer: Optional[Timer]) -> Timer:
    """Replace the timer (``None`` restores ``do_bench``); returns the previous one. For tests."""
    global _timer
    prev, _timer = _timer, (timer or _do_bench)
    return prev


def autotune_enabled() -> bool:
    """False when ``SORSA_KERNELS_AUTOTUNE=0``: ``auto`` then always takes the fused path."""
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_path() -> str:
    """The JSON file holding the decisions."""
    d = os.environ.get(ENV_CACHE_DIR)
    if not d:
        try:
            from triton import knobs
            tdir = knobs.cache.dir
        except Exception:  # triton missing or older layout
            tdir = os.path.join(os.path.expanduser("~"), ".triton", "cache")
        d = os.path.join(os.path.dirname(os.path.abspath(tdir)), "sorsa_kernels")
    return os.path.join(d, CACHE_FILE)


def _env_key(device: torch.device) -> str:
    """Versions and GPU: a decision is valid only for the stack that measured it."""
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    from . import __version__ as pv
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"torch {torch.__version__}|triton {tv}|sorsa_kernels {pv}|{gpu}"


def bucket(m: int) -> int:
    """Power-of-two bucket of the row count (at least 16): shapes in one bucket share a decision."""
    return 16 if m <= 16 else 1 << math.ceil(math.log2(m))


def _load() -> Dict[str, dict]:
    global _loaded_from
    path = cache_path()
    if _loaded_from != path:
        _memory.clear()
        try:
            with open(path) as f:
                data = json.load(f)
            _memory.update(data.get("entries", {}))
        except (OSError, ValueError):
            pass  # no cache yet, or unreadable: decide again
        _loaded_from = path
    return _memory


def _save() -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "entries": _memory}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # read-only home: decisions stay in memory for this process


def make_key(op: str, fields: Dict[str, Any], device: torch.device) -> str:
    """Cache key: op, the shape/dtype fields (already bucketed by the caller), arch, versions, GPU."""
    arch = "x".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else device.type
    body = ",".join(f"{k}={fields[k]}" for k in sorted(fields))
    return f"{op}|{body}|arch={arch}|{_env_key(device)}"


def decide(op: str, fused: str, key: str, fields: Dict[str, Any],
           bench: Callable[[str], Callable[[], Any]], device: Optional[torch.device] = None) -> str:
    """Return ``fused`` or ``"torch"`` for this key: cached, else timed once with ``bench(name)``
    (which builds the fwd+bwd thunk of candidate ``name`` on random inputs of the real shapes)."""
    if not autotune_enabled() or torch.compiler.is_compiling():
        return fused  # never lock, read files or time inside a trace
    with _lock:
        hit = _load().get(key)
    if hit is not None:
        return hit["choice"]
    times: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    # Events, synchronisation and the L2 flush of the timer act on the current device: make it
    # the tensors' device, or a layer on cuda:1 would be timed as ~0 ms on cuda:0.
    on_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    guard = torch.cuda.device(device) if on_cuda else contextlib.nullcontext()
    with guard:
        for name in (fused, "torch"):
            try:
                times[name] = float(_timer(name, bench(name)))
            except Exception as exc:  # a failing candidate is never chosen
                errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    ok = {n: t for n, t in times.items() if math.isfinite(t)}
    # ties go to the fused path (it saves memory: no intermediate x·Aᵀ round trip)
    choice = min(ok, key=lambda n: (ok[n], n != fused)) if ok else "torch"
    entry = dict(op=op, choice=choice, ms=times, errors=errors, **fields)
    with _lock:
        _load()[key] = entry
        if ok:  # nothing ran (e.g. out of memory): remember for this process only, retry next time
            _save()
    return choice


def report() -> List[Dict[str, Any]]:
    """Cached decisions (from disk and this process), one dict per key: op, shape fields, choice,
    the measured milliseconds per candidate and any candidate errors."""
    with _lock:
        return [dict(key=k, **v) for k, v in sorted(_load().items())]


def clear(disk: bool = False) -> None:
    """Forget decisions in memory (and on disk with ``disk=True``)."""
    global _loaded_from
    with _lock:
        _memory.clear()
        _loaded_from = None
        if disk:
            try:
                os.remove(cache_path())
            except OSError:
                pass


# ----------------------------------------------------------------------------- the linear op's case
def linear_case(x2: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, bias: Optional[torch.Tensor],
                p: float) -> Optional[Tuple[Dict[str, Any], Callable[[str], Callable[[], Any]]]]:
    """(fields, bench) for ``sorsa_linear`` on ``x2`` (M, K); None when M is symbolic (a
    dynamic-shape trace: the fused path is used and nothing is timed)."""
    M, K = x2.shape
    if not isinstance(M, int):
        return None
    N, r = weight.shape[0], A.shape[0]
    dt, adt, dev = x2.dtype, A.dtype, x2.device
    fields = dict(M=bucket(M), K=K, N=N, r=r, dtype=str(dt).replace("torch.", ""),
                  adapter_dtype=str(adt).replace("torch.", ""), dropout=p > 0, bias=bias is not None)

    def bench(name: str) -> Callable[[], Any]:
        with torch.inference_mode(False):  # normal tensors even if the call came under inference_mode
            return _linear_bench(name, M, K, N, r, dt, adt, dev, bias is not None, p)

    return fields, bench


def _linear_bench(name, M, K, N, r, dt, adt, dev, has_bias, p) -> Callable[[], Any]:
    """fwd+bwd thunk of candidate ``name`` on random (never zero) inputs of the real shapes."""
    from .ops.linear import sorsa_linear
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=dt: torch.randn(*s, generator=g, device=dev, dtype=dtype)  # noqa: E731
    x = rnd(M, K).requires_grad_()
    w = rnd(N, K) / K ** 0.5
    a, s, b = (rnd(r, K, dtype=adt).requires_grad_(), rnd(r, dtype=adt).requires_grad_(),
               rnd(N, r, dtype=adt).requires_grad_())
    bb = rnd(N) if has_bias else None
    dy = rnd(M, N)

    def step():  # as a training step runs it, also when the user's call came under no_grad/inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            sorsa_linear(x, w, a, s, b, 0.5, bb, dropout_p=p, training=True, backend=name).backward(dy)
        x.grad = a.grad = s.grad = b.grad = None
    return step
