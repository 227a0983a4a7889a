"""Interleaved timing: every implementation of one case is timed in rounds (A B C, A B C, ...),
each sample at least ``min_sample_ms`` of work (the call repeated to that), after warm-up.

Load on a shared machine drifts over seconds; a ratio taken within one round sees the same load
on both sides, so the per-round ratios are what the report summarises (median and interquartile
range), never a ratio of two medians taken at different times.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Milliseconds per call over ``reps`` back-to-back calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float:
    """Median host-side milliseconds of one call (queueing only: the device is idle before each
    call and synchronised after, outside the timed span)."""
    out = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
        sync(device)
    return statistics.median(out)


def quartiles(xs: Sequence[float]) -> tuple:
    """(q1, median, q3) of ``xs`` (inclusive method: defined for 1 or 2 values too)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def time_interleaved(impls: Dict[str, Callable[[], object]], device: torch.device, *, rounds: int = 5,
                     min_sample_ms: float = 50.0, warmup: int = 1, max_reps: int = 10_000,
                     on_sample: Optional[Callable[[str, int, int], None]] = None) -> Dict[str, List[float]]:
    """Per-round milliseconds per call of each implementation: ``{name: [ms_round0, ...]}``.

    Each implementation is warmed up (``warmup`` calls plus one timed call that sizes its
    repeat count so a sample is ≥ ``min_sample_ms``), then the rounds run all implementations
    in turn, rotating the order each round so none always runs first. ``on_sample(name, round,
    total_samples)`` is called after every sample (progress). An implementation that raises is dropped from the
    rounds and the exception re-raised after the others finish, wrapped in ``ImplError``.
    """
    reps: Dict[str, int] = {}
    errors: Dict[str, BaseException] = {}
    for name, fn in impls.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            one = max(_timed(fn, 1, device), 1e-3)
            reps[name] = int(min(max_reps, max(1, math.ceil(min_sample_ms / one))))
        except Exception as exc:  # recorded; the other implementations still run
            errors[name] = exc
    samples: Dict[str, List[float]] = {n: [] for n in reps}
    names = list(reps)
    for r in range(rounds):
        k = r % max(1, len(names))
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            try:
                samples[name].append(_timed(impls[name], reps[name], device))
            except Exception as exc:
                errors[name] = exc
            if on_sample is not None:
                on_sample(name, r, len(names) * rounds)
    if errors:
        raise ImplError({n: s for n, s in samples.items() if n not in errors}, errors)
    return samples


class ImplError(RuntimeError):
    """Some implementations of a case raised; ``samples`` holds the others' timings."""

    def __init__(self, samples: Dict[str, List[float]], errors: Dict[str, BaseException]):
        super().__init__("; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in errors.items()))
        self.samples, self.errors = samples, errors
