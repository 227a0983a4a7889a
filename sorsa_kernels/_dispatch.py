"""Timed choice between an op's fused kernels and its cuBLAS-composed torch path (``backend="auto"``).

The fused path must win for the shapes it was designed for; this dispatcher is the floor that
keeps ``auto`` from ever being slower than plain PyTorch elsewhere, the way ``torch.compile``'s
max-autotune picks between Triton templates and ATen. It is consulted only by
:func:`sorsa_kernels._backend.choose` (the one place that decides the backend), for CUDA tensors.

* Key: op, shape bucket (M rounded up to a power of two; the other dims exact: they are the
  model's), dtype, dropout on/off, bias, ``train`` (grad enabled and some operand requires grad:
  the call will be followed by a backward), x's memory layout (:func:`x_layout`: aligned rows
  take TMA/cp.async, offset views or column-major x the synchronous-load path, and the bench
  lays its x out the same way), GPU arch, torch/triton/package versions, GPU name.
* Timing: the op's case gives ``bench(name)``, a thunk of candidate ``name`` on random inputs
  of the real shapes (fwd+bwd for ``train`` keys, forward only under ``torch.no_grad()`` for
  inference keys; both candidates share one set of inputs). The two candidates are timed
  interleaved, ``ROUNDS`` rounds (fused, torch, fused, torch, ...), each sample by the timer
  (``triton.testing.do_bench`` median with short warmup/rep, so 3 rounds cost about what one
  long run did; injectable with :func:`set_timer`). The entry stores per-candidate median
  (``ms``) and spread (max - min, ``spread_ms``).
* Choice: the lower median when it is clear of noise (the medians differ by more than the
  larger spread); otherwise ``"unclear": true`` and the fused path (ties, too: it saves the
  intermediate ``x·Aᵀ`` round trip). A candidate that raises, or times NaN/inf, is never chosen;
  if none ran, the torch path (the fused path if it only ran out of memory: it needs less).
* Memory: before timing, the bytes the bench needs (inputs, output, dy and grads, the torch
  path's intermediates, in the real dtypes; ``need_bytes`` from the case) are compared with the
  free memory of the device (``cudaMemGetInfo`` plus what torch's caching allocator holds
  unused; :func:`free_bytes`, patchable). If it needs more than ``MEM_FRACTION`` of it, nothing
  is timed: the fused path is chosen with ``reason = "not timed: needs X MiB, Y MiB free"``.
  A candidate that runs out of memory while timed is recorded as failed and the allocator's
  cache is emptied (CUDA only).
* Persistence: in memory for the process always; on disk (``$SORSA_KERNELS_CACHE_DIR`` or
  ``sorsa_kernels/`` next to Triton's cache dir, one JSON file, merged with what other
  processes wrote) only when the decision was timed, clear of noise and no candidate ran out
  of memory: "not timed", "unclear" and out-of-memory decisions are made again by the next
  process.
* Distributed: every rank decides on its own; no collective is issued. A collective inside a
  layer call would hang as soon as ranks reach different keys (per-rank dynamic padding puts
  their row counts in different M buckets). Ranks may then run different backends for one
  shape: outputs differ by rounding only, and DDP/FSDP keep the parameters identical anyway
  (gradients are all-reduced before the optimizer step).
* No side effects on the user's call (timing runs inside it, on the first call of a key):
  RNG states are forked around the timing (the bench's dropout draws its seeds from torch's
  generators: ``manual_seed(3); m(x)`` must give the same mask whether or not this call timed,
  and a reentrant checkpoint's recompute, which finds the key cached, must draw the seed its
  forward drew); an enclosing checkpoint's saved-tensor hooks are shadowed by identity hooks
  (a non-reentrant checkpoint would reject the bench's saved tensors and both candidates would
  "fail"); during a CUDA-graph capture of the current stream, under a torch dispatch or function
  mode (selective activation checkpointing counts op calls: the bench's would shift the
  recompute's cached outputs) and inside torch.func transforms nothing is timed: the fused path
  is used and nothing is recorded, so a later plain eager call times the key. Known limits: a
  capture on another stream or thread is not visible here (torch has no "any capture" query), and
  the forked RNG is process-global, so another thread's draws during a timing are rewound.
* ``SORSA_KERNELS_AUTOTUNE=0``: no timing, always the fused path.
* Under ``torch.compile`` nothing is timed or communicated: the tracer asks
  :func:`cached_choice`, which returns the decision already cached for the key (in this process or
  on disk) or the fused path, and the answer is a constant of the graph. To get timed choices in
  compiled graphs, run one eager step (forward and backward) before compiling; a decision made
  later does not recompile a graph. Under dynamic shapes (M symbolic) the fused path is used.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch

ENV_AUTOTUNE = "SORSA_KERNELS_AUTOTUNE"
ENV_CACHE_DIR = "SORSA_KERNELS_CACHE_DIR"
CACHE_FILE = "dispatch.json"
ROUNDS = 3  # interleaved samples per candidate: a median and a spread, not one noisy number
MEM_FRACTION = 0.5  # time only if the bench needs at most this share of the free device memory

# timer(candidate name, thunk) -> median milliseconds of thunk()
Timer = Callable[[str, Callable[[], Any]], float]
# bench(candidate name) -> thunk running that candidate once
Bench = Callable[[str], Callable[[], Any]]


def _do_bench(name: str, fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench
    # warmup/rep are milliseconds; called ROUNDS times per candidate: 3 x (8 + 33) ms, about
    # 125 ms per candidate and shape key in all
    return float(do_bench(fn, warmup=8, rep=33, return_mode="median"))


_timer: Timer = _do_bench
_lock = threading.Lock()
_memory: Dict[str, dict] = {}
_volatile: Set[str] = set()  # keys decided for this process only (never written to disk)
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


def wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a backward may follow: grad mode is on and some operand requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def free_bytes(device: Optional[torch.device]) -> Optional[int]:
    """Bytes a new allocation on ``device`` can use: the driver's free memory plus what torch's
    caching allocator reserved but does not use; None when not a visible CUDA device."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    except Exception:  # a driver that cannot say: do not guess
        return None


def _read_disk(path: str) -> Dict[str, dict]:
    try:
        with open(path) as f:
            return dict(json.load(f).get("entries", {}))
    except (OSError, ValueError, AttributeError):
        return {}  # no cache yet, or unreadable: decide again


def _load() -> Dict[str, dict]:
    global _loaded_from
    path = cache_path()
    if _loaded_from != path:
        _memory.clear()
        _volatile.clear()
        _memory.update(_read_disk(path))
        _loaded_from = path
    return _memory


def _save() -> None:
    path = cache_path()
    # merge with what other processes wrote since we read the file; never write volatile keys
    entries = _read_disk(path)
    entries.update({k: v for k, v in _memory.items() if k not in _volatile})
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # read-only home: decisions stay in memory for this process


def make_key(op: str, fields: Dict[str, Any], device: torch.device) -> str:
    """Cache key: op, the shape/dtype fields (already bucketed by the caller), arch, versions, GPU."""
    arch = "x".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else device.type
    body = ",".join(f"{k}={fields[k]}" for k in sorted(fields))
    return f"{op}|{body}|arch={arch}|{_env_key(device)}"


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


_warned: Set[str] = set()
# Verify the fused candidate before timing it (see :func:`_measure`); tests of the timing logic
# alone turn it off, the verification's own tests keep it on.
VERIFY = True


def _mismatch_warning(op: str, fields: Dict[str, Any], fused: str, what: str, device: Optional[torch.device]) -> str:
    """The once-per-key warning text: enough to paste into a bug report."""
    import platform
    from . import __version__
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "not installed"
    gpu = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else str(device)
    shape = " ".join(f"{k}={fields[k]}" for k in sorted(fields))
    return (f"sorsa_kernels: the fused {op} ({fused}) disagreed with the torch path on this machine and is "
            f"not used for this shape (torch runs it; decision cached). {what}. Please report it: "
            f"sorsa-kernels {__version__}, torch {torch.__version__}, triton {tv}, GPU {gpu}, "
            f"python {platform.python_version()}, {shape}")


def _measure(op: str, fused: str, fields: Dict[str, Any], bench: Bench, on_cuda: bool,
             device: Optional[torch.device], need_bytes: Optional[int],
             verify: Optional[Callable[[str], Optional[str]]] = None) -> Tuple[dict, bool]:
    """Verify, then time the candidates (or decide not to); returns (entry, persist on disk)."""
    free = free_bytes(device) if need_bytes else None
    if need_bytes and free is not None and need_bytes > MEM_FRACTION * free:
        reason = (f"not timed: needs {need_bytes / 2 ** 20:.0f} MiB, {free / 2 ** 20:.0f} MiB free "
                  f"(at most {MEM_FRACTION:.0%} of it is used for timing)")
        return dict(op=op, choice=fused, ms={}, spread_ms={}, errors={}, unclear=False, reason=reason,
                    **fields), False
    if verify is not None and VERIFY:
        bad, oom_in_verify = None, False
        try:
            bad = verify(fused)  # a fused launch error comes back as a message
        except torch.OutOfMemoryError:
            oom_in_verify = True  # no room to compare here: timed as before
        except Exception:  # the torch path or the reference failed: not the fused kernel's fault
            bad = None
        if oom_in_verify and on_cuda:
            torch.cuda.empty_cache()  # after the except block: its traceback no longer holds tensors
        if bad is not None:
            key = repr(sorted(fields.items()))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(_mismatch_warning(op, fields, fused, bad, device), RuntimeWarning, stacklevel=4)
            return dict(op=op, choice="torch", ms={}, spread_ms={}, errors={fused: f"mismatch: {bad}"},
                        unclear=False, reason="fused result disagreed with torch", **fields), True
    names = (fused, "torch")
    samples: Dict[str, List[float]] = {n: [] for n in names}
    errors: Dict[str, str] = {}
    oom: Set[str] = set()  # candidates that ran out of memory (not a property of the kernel)
    thunks: Dict[str, Callable[[], Any]] = {}
    for name in names:
        try:
            thunks[name] = bench(name)
        except Exception as exc:  # a failing candidate is never chosen
            errors[name] = _err(exc)
            oom |= {name} if isinstance(exc, torch.OutOfMemoryError) else set()
    for _ in range(ROUNDS):  # interleaved: drift (clocks, other work) hits both candidates alike
        for name in names:
            if name not in thunks:
                continue
            try:
                samples[name].append(float(_timer(name, thunks[name])))
            except Exception as exc:
                errors[name] = _err(exc)
                oom |= {name} if isinstance(exc, torch.OutOfMemoryError) else set()
                del thunks[name]
                samples[name] = []
    thunks.clear()  # drops the bench inputs before the cache is emptied
    if oom and on_cuda:
        torch.cuda.empty_cache()  # give the failed bench's blocks back to the training step
    med = {n: statistics.median(s) for n, s in samples.items() if s}
    spread = {n: max(s) - min(s) for n, s in samples.items() if s}
    ok = {n: m for n, m in med.items() if math.isfinite(m) and math.isfinite(spread[n])}
    if len(ok) == 2:
        margin = max(spread[fused], spread["torch"])
        clear = abs(ok[fused] - ok["torch"]) > margin
        choice = "torch" if clear and ok["torch"] < ok[fused] else fused
    else:  # one candidate left: it is the choice; none: retried next process, meanwhile the
        # fused path if it only ran out of memory (it needs less than torch), else torch
        clear = len(ok) == 1
        choice = next(iter(ok)) if ok else (fused if fused in oom else "torch")
    entry = dict(op=op, choice=choice, ms=med, spread_ms=spread, errors=errors, unclear=not clear, **fields)
    return entry, clear and not oom


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # no CUDA runtime (CPU build)
        return False


def _cannot_time_here() -> Optional[str]:
    """Why timing must not run inside the current call (None: it may). Timing would run the bench
    inside whatever intercepts this call: under a torch dispatch mode (selective activation
    checkpointing counts the op's calls and would hand the recompute the bench's outputs, a
    silently wrong gradient; FakeTensor, FSDP or profiler modes), a torch function mode, or a
    torch.func transform (which forbids saved-tensor hooks)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        if _get_current_dispatch_mode_stack():
            return "a torch dispatch mode is active"
    except ImportError:  # pragma: no cover - private API moved
        pass
    if torch._C._is_torch_function_mode_enabled() and torch.overrides._get_current_function_mode_stack():
        return "a torch function mode is active"
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return "inside a torch.func transform"
    except AttributeError:  # pragma: no cover
        pass
    return None


def _keep(t: torch.Tensor) -> torch.Tensor:
    # detached: an identity pack hook on a tensor a node saves from its own output makes an
    # uncollectable reference cycle (torch's saved_tensors_hooks docs); a failed bench would leak it
    return t.detach()


@contextlib.contextmanager
def _no_side_effects(device: Optional[torch.device]):
    """Timing inside a user's call leaves no trace in it: the CPU generator (and ``device``'s)
    come back as they were, and the saved-tensor hooks of an enclosing checkpoint are shadowed
    (only the innermost hook pair applies) so the bench's autograd keeps its tensors itself."""
    with torch.random.fork_rng(devices=[device] if device is not None else []), \
            torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        yield


def decide(op: str, fused: str, key: str, fields: Dict[str, Any], bench: Bench,
           device: Optional[torch.device] = None, need_bytes: Optional[int] = None,
           verify: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """Return ``fused`` or ``"torch"`` for this key: cached, else timed with ``bench(name)``
    (the thunk of candidate ``name`` on random inputs of the real shapes), ``need_bytes`` being
    what those inputs and the worst candidate's intermediates take. See the module docstring."""
    if not autotune_enabled() or torch.compiler.is_compiling():
        return fused  # never lock, read files or time inside a trace
    with _lock:
        hit = _load().get(key)
    if hit is not None:
        return hit["choice"]
    if _cannot_time_here() is not None:
        return fused  # not recorded: a later plain eager call of this key times it
    # Events, synchronisation and the L2 flush of the timer act on the current device: make it
    # the tensors' device, or a layer on cuda:1 would be timed on cuda:0.
    on_cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    guard = torch.cuda.device(device) if on_cuda else contextlib.nullcontext()
    with guard:
        if device is not None and device.type == "cuda" and _capturing():
            return fused  # no events/syncs in a CUDA-graph capture of the tensors' device's stream
        with _no_side_effects(device if on_cuda else None):
            entry, persist = _measure(op, fused, fields, bench, on_cuda, device, need_bytes, verify)
    with _lock:
        mem = _load()
        mem[key] = entry
        if persist:
            _volatile.discard(key)
            _save()
        else:
            _volatile.add(key)
    return entry["choice"]


@torch.compiler.assume_constant_result
def cached_choice(op: str, fused: str, fields: Tuple[Tuple[str, Any], ...], device: str) -> str:
    """The cached decision for ``(op, fields, device)``, else ``fused``; never times. Called by
    the tracer as plain Python (its arguments are constants) and the result baked into the graph."""
    if not autotune_enabled():
        return fused
    key = make_key(op, dict(fields), torch.device(device))
    with _lock:
        hit = _load().get(key)
    return fused if hit is None else hit["choice"]


def report() -> List[Dict[str, Any]]:
    """Cached decisions (from disk and this process), one dict per key: op, shape fields, choice,
    the median milliseconds and spread per candidate, candidate errors, ``unclear`` and, when not
    timed, the ``reason``; ``persisted`` says whether it is on disk."""
    with _lock:
        mem = _load()
        return [dict(key=k, persisted=k not in _volatile, **v) for k, v in sorted(mem.items())]


_FIELD_ORDER = ("M", "K", "N", "r", "dtype", "adapter_dtype", "dropout", "bias", "train", "x_layout")


def format_entry(d: Dict[str, Any]) -> str:
    """One line for ``sorsa-kernels info``: shape fields, choice, medians ± spread, notes."""
    skip = {"key", "op", "choice", "ms", "spread_ms", "errors", "unclear", "reason", "persisted"}
    fields = [k for k in _FIELD_ORDER if k in d] + sorted(k for k in d if k not in skip and k not in _FIELD_ORDER)
    ms, spread = d.get("ms") or {}, d.get("spread_ms") or {}
    times = ", ".join(f"{n} {t:.3g}" + (f"±{spread[n]:.2g}" if n in spread else "") + " ms" for n, t in ms.items())
    notes = [d["reason"]] if d.get("reason") else []
    if d.get("unclear"):
        notes.append("unclear (within noise)")
    notes += [f"{n} failed: {e}" for n, e in (d.get("errors") or {}).items()]
    if d.get("persisted") is False:
        notes.append("this process only")
    out = f"{d.get('op', '?')} {' '.join(f'{k}={d[k]}' for k in fields)} -> {d.get('choice', '?')}"
    return out + (f" ({times})" if times else "") + "".join(f"; {n}" for n in notes)


def clear(disk: bool = False) -> None:
    """Forget decisions in memory (and on disk with ``disk=True``)."""
    global _loaded_from
    with _lock:
        _memory.clear()
        _volatile.clear()
        _loaded_from = None
        if disk:
            try:
                os.remove(cache_path())
            except OSError:
                pass


# ----------------------------------------------------------------------------- the linear op's case
# Rows at or below this go to the torch path by rule, untimed (decode steps): both paths then
# read the same W_r bytes once (the adapter terms are tiny), so fusing saves nothing, while the
# fused call costs more host work (~15 launches per fwd+bwd, descriptors) and the dispatcher's
# lookup (~18 µs); the rule skips both. A choice by counting, not timing.
DECODE_M = 32


def linear_case(x2: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, bias: Optional[torch.Tensor],
                p: float, train: Optional[bool] = None
                ) -> Union[None, str, Tuple[Dict[str, Any], Bench, int, Callable[[str], Optional[str]]]]:
    """(fields, bench, need_bytes, verify) for ``sorsa_linear`` on ``x2`` (M, K); ``"torch"`` for
    decode-sized rows (:data:`DECODE_M`); None when M is symbolic (a dynamic-shape trace: the
    fused path is used and nothing is timed).

    ``train``: whether a backward follows the call (the caller passes :func:`wants_grad` of all
    its operands; None: computed from ``x2, weight, A, bias``). It is part of the key, and picks
    fwd+bwd or forward-only thunks."""
    M, K = x2.shape
    if not isinstance(M, int):
        return None
    if M <= DECODE_M:
        return "torch"
    N, r = weight.shape[0], A.shape[0]
    dt, adt, dev = x2.dtype, A.dtype, x2.device
    train = wants_grad(x2, weight, A, bias) if train is None else bool(train)
    has_bias = bias is not None
    layout = x_layout(x2)
    fields = dict(M=bucket(M), K=K, N=N, r=r, dtype=str(dt).replace("torch.", ""),
                  adapter_dtype=str(adt).replace("torch.", ""), dropout=p > 0, bias=has_bias, train=train,
                  x_layout=layout)
    shared: List[Any] = [None]  # weak reference to the inputs both candidates' thunks use

    def bench(name: str) -> Callable[[], Any]:
        inputs = shared[0]() if shared[0] is not None else None
        if inputs is None:
            with torch.inference_mode(False):  # normal tensors even if the call came under inference_mode
                inputs = _LinearInputs(M, K, N, r, dt, adt, dev, has_bias, train, layout)
            shared[0] = weakref.ref(inputs)  # freed with the last thunk, not kept by this closure
        return _linear_thunk(name, inputs, p, train)

    def verify(fused: str) -> Optional[str]:
        return _linear_verify(fused, M, K, N, r, dt, adt, dev, has_bias, train, layout)

    return fields, bench, linear_bench_bytes(M, K, N, r, dt, adt, has_bias, p, train), verify


# The reference of the verification: float64 for fp32 inputs, float32 for 16-bit ones (its error is
# ~1e-7 relative, far below the 16-bit paths' ~1e-3, so it stands in for float64 in the rule).
VERIFY_MAX_BYTES = 1 << 30


def _linear_verify(fused: str, M: int, K: int, N: int, r: int, dt: torch.dtype, adt: torch.dtype,
                   dev: torch.device, has_bias: bool, train: bool, layout: str) -> Optional[str]:
    """One call of each candidate (dropout off: the two paths draw different masks; the fused mask
    is tested against its documented Philox stream) on the bench's inputs, compared by the
    tolerance rule with a high-precision reference: None when they agree, else what differs."""
    from ._tolerance import rule
    from .ops.linear import sorsa_linear, sorsa_linear_naive
    from .rsvd import no_tf32
    ref_dt = torch.float64 if dt == torch.float32 else torch.float32
    e, er = dt.itemsize, ref_dt.itemsize
    # inputs in dt and ref_dt, y and dx of the three runs, the reference's temporaries
    need = (M * K + N * K + M * N) * (e + er) + (M * N + M * K) * (2 * e + er) + 2 * M * N * er
    free = free_bytes(dev) if dev.type == "cuda" else None
    if need > (MEM_FRACTION * free if free is not None else VERIFY_MAX_BYTES):
        return None  # the comparison would not fit beside the training step: not verified
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        t = _LinearInputs(M, K, N, r, dt, adt, dev, has_bias, train, layout, scaled=True)

    def outputs(fn, cast):
        with torch.inference_mode(False), torch.enable_grad():
            leaves = [cast(v).detach().requires_grad_(train) for v in (t.x, t.a, t.s, t.b)]
            w, bias = cast(t.w), None if t.bias is None else cast(t.bias)
            y = fn(leaves, w, bias)
            if not train:
                return [y.detach()]
            grads = torch.autograd.grad(y, leaves, cast(t.dy))
            return [y.detach()] + [g.detach() for g in grads]
    run = lambda name: lambda lv, w, b: sorsa_linear(lv[0], w, *lv[1:], 0.5, b, dropout_p=0.0,  # noqa: E731
                                                     training=True, backend=name)
    # the user's autocast or TF32 settings must not lower the reference's (or the paths') precision
    with torch.autocast(dev.type, enabled=False), no_tf32():
        try:
            got = outputs(run(fused), lambda v: v)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a launch error (or a crash surfaced as one) is a failure too
            return f"the fused path raised {_err(exc)}"
        lowp = outputs(run("torch"), lambda v: v)
        ref = outputs(lambda lv, w, b: sorsa_linear_naive(lv[0], w, *lv[1:], 0.5, b), lambda v: v.to(ref_dt))
    names = ("y", "dx", "dA", "dS", "dB")
    for name, g, lp, rf in zip(names, got, lowp, ref):
        err, tol, base = rule(g, lp, rf)
        if err == float("inf"):
            return f"{name} has non-finite values"
        if err > tol:
            return f"{name}: max error {err:.3g} vs the tolerance {tol:.3g} (torch path's error {base:.3g})"
    return None


def linear_bench_bytes(M: int, K: int, N: int, r: int, dt: torch.dtype, adt: torch.dtype,
                       has_bias: bool, p: float, train: bool) -> int:
    """Peak bytes of timing ``sorsa_linear``'s candidates on (M, K) x (N, K): the inputs, y, and
    for training dy, dx and the adapter grads, plus the larger set of the torch path's
    intermediates (the fused path's are smaller): forward, addmm's second (M, N) output; backward,
    dy·W and the rank-r term of dx (M, K) each; with dropout, the mask's fp32 uniforms, bool and
    dtype copies and the dropped x (M, K) each."""
    e, ea = dt.itemsize, adt.itemsize
    adapters = (r * K + r + N * r) * ea
    inputs = (M * K + N * K + (N if has_bias else 0)) * e + adapters
    drop = M * K * (4 + 1 + 2 * e) if p > 0 else 0
    xa = M * r * (4 + e)  # fp32 saved copy and the dtype product
    fwd_tmp = M * N * e + drop
    total = inputs + M * N * e + xa  # + y
    if train:
        bwd_tmp = 2 * M * K * e + drop + 2 * M * r * (4 + e)  # dy·W, dx's rank-r term; g, g·S
        total += M * N * e + M * K * e + adapters + max(fwd_tmp, bwd_tmp)  # dy, dx, grads
    else:
        total += fwd_tmp
    return int(total) + (32 << 20)  # + cuBLAS/Triton workspaces


def x_layout(x: torch.Tensor) -> str:
    """How ``x`` (M, K) lies in memory, as far as the fused kernels care: ``rows16`` (row-major,
    16-byte aligned start and rows: TMA-legal on sm_90, cp.async elsewhere), ``rows`` (row-major,
    unaligned), ``cols`` (column-major), ``strided`` (anything else). Part of the key, and the
    bench's x is laid out the same way: an offset view must not be timed as a contiguous tensor."""
    es = x.element_size()
    if x.stride(1) == 1 or x.shape[1] <= 1:
        # a traced tensor has no address: its start is taken as aligned (as allocations are)
        start = torch.compiler.is_compiling() or x.data_ptr() % 16 == 0
        aligned = start and (x.stride(0) * es) % 16 == 0
        return "rows16" if aligned else "rows"
    if x.stride(0) == 1:
        return "cols"
    return "strided"


class _LinearInputs:
    """Random (never zero) inputs of the real shapes and x's layout, shared by both candidates' thunks."""

    def __init__(self, M, K, N, r, dt, adt, dev, has_bias, train, layout="rows16", scaled=False):
        g = torch.Generator(device=dev).manual_seed(0)
        rnd = lambda *s, dtype=dt: torch.randn(*s, generator=g, device=dev, dtype=dtype)  # noqa: E731
        if layout == "cols":
            x = rnd(K, M).t()
        elif layout == "strided":
            x = rnd(M, 2 * K)[:, ::2]
        elif layout == "rows" and (K * dt.itemsize) % 16 == 0:
            x = rnd(M * K + 1)[1:].view(M, K)  # aligned rows, unaligned start: an offset view
        else:
            x = rnd(M, K)
        self.x = x.detach().requires_grad_(train)
        self.w = rnd(N, K).mul_(K ** -0.5)
        self.a, self.s, self.b = (rnd(r, K, dtype=adt).requires_grad_(train), rnd(r, dtype=adt).requires_grad_(train),
                                  rnd(N, r, dtype=adt).requires_grad_(train))
        if scaled:  # as trained adapters are: the rank-r term no larger than x·Wᵀ, so the
            # verification sees an error in the base GEMM (unscaled, the rank-r term hid it)
            with torch.no_grad():
                self.a.mul_(K ** -0.5)
                self.b.mul_(r ** -0.5)
                self.s.abs_().add_(0.5)
        self.bias = rnd(N) if has_bias else None
        self.dy = rnd(M, N) if train else None


def _linear_thunk(name: str, t: _LinearInputs, p: float, train: bool) -> Callable[[], Any]:
    """fwd+bwd (train) or forward-only (inference, under no_grad) thunk of candidate ``name``."""
    from .ops.linear import sorsa_linear

    def step():  # as a training step runs it, also when the user's call came under no_grad/inference_mode
        try:
            with torch.inference_mode(False), torch.enable_grad():
                sorsa_linear(t.x, t.w, t.a, t.s, t.b, 0.5, t.bias, dropout_p=p, training=True,
                             backend=name).backward(t.dy)
        finally:  # also after a failed step: the other candidate starts from no grads
            t.x.grad = t.a.grad = t.s.grad = t.b.grad = None

    def forward():  # as an inference call runs it: no graph, no saved tensors
        with torch.inference_mode(False), torch.no_grad():
            sorsa_linear(t.x, t.w, t.a, t.s, t.b, 0.5, t.bias, dropout_p=p, training=True, backend=name)
    return step if train else forward
