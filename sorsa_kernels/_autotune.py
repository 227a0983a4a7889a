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
  :func:`cached_choice` with the row count left open (it may be symbolic, and reading it would
  add a guard and a recompile per bucket): the decision the cached entries of those other fields
  agree on (made by eager calls in this process or on disk), else the fused path. The answer is a
  constant of the graph. To get timed choices in compiled graphs, run one eager step (forward and
  backward) before compiling; a decision made later does not recompile a graph.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

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
    from ._version import __version__ as pv
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


def _key_suffix(device: torch.device) -> str:
    arch = "x".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else device.type
    return f"arch={arch}|{_env_key(device)}"


def make_key(op: str, fields: Dict[str, Any], device: torch.device) -> str:
    """Cache key: op, the shape/dtype fields (already bucketed by the caller), arch, versions, GPU."""
    body = ",".join(f"{k}={fields[k]}" for k in sorted(fields))
    return f"{op}|{body}|{_key_suffix(device)}"


def err_text(exc: BaseException) -> str:
    """A candidate's exception, short enough for the cache entry and a warning."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


_warned: Set[str] = set()
# Verify the fused candidate before timing it (see :func:`_measure`); tests of the timing logic
# alone turn it off, the verification's own tests keep it on.
VERIFY = True


def _mismatch_warning(op: str, fields: Dict[str, Any], fused: str, what: str, device: Optional[torch.device]) -> str:
    """The once-per-key warning text: enough to paste into a bug report."""
    import platform
    from ._version import __version__
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
            errors[name] = err_text(exc)
            oom |= {name} if isinstance(exc, torch.OutOfMemoryError) else set()
    for _ in range(ROUNDS):  # interleaved: drift (clocks, other work) hits both candidates alike
        for name in names:
            if name not in thunks:
                continue
            try:
                samples[name].append(float(_timer(name, thunks[name])))
            except Exception as exc:
                errors[name] = err_text(exc)
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
    """The decision cached for ``(op, fields, device)``, else ``fused``; never times. A field given
    as None matches any value (the row count of a traced call, which may be symbolic): then the
    entries that match must all agree, else ``fused``. Called by the tracer as plain Python (its
    arguments are constants) and the result baked into the graph."""
    if not autotune_enabled():
        return fused
    want = dict(fields)
    dev = torch.device(device)
    with _lock:
        mem = _load()
        if all(v is not None for v in want.values()):
            hit = mem.get(make_key(op, want, dev))
            return fused if hit is None else hit["choice"]
        suffix, fixed = "|" + _key_suffix(dev), {k: v for k, v in want.items() if v is not None}
        choices = {e["choice"] for k, e in mem.items() if k.endswith(suffix) and e.get("op") == op
                   and all(e.get(f) == v for f, v in fixed.items())}
    return choices.pop() if len(choices) == 1 else fused


def report() -> List[Dict[str, Any]]:
    """Cached decisions (from disk and this process), one dict per key: op, shape fields, choice,
    the median milliseconds and spread per candidate, candidate errors, ``unclear`` and, when not
    timed, the ``reason``; ``persisted`` says whether it is on disk."""
    with _lock:
        mem = _load()
        return [dict(key=k, persisted=k not in _volatile, **v) for k, v in sorted(mem.items())]


def format_entry(d: Dict[str, Any]) -> str:
    """One line for ``sorsa-kernels info``: shape fields, choice, medians ± spread, notes."""
    skip = {"key", "op", "choice", "ms", "spread_ms", "errors", "unclear", "reason", "persisted"}
    fields = [k for k in d if k not in skip]  # the op's fields, in the order its case gave them
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
