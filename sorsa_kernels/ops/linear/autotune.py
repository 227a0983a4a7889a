"""The linear op's case for the timed choice of ``backend="auto"`` on CUDA (:mod:`sorsa_kernels._autotune`):
the key's fields, the bench that times both candidates on inputs of the call's shapes and layout,
the bytes that bench needs, and the verification of the fused result before anything is timed."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ... import _autotune
from ..._autotune import Bench, bucket, err_text, wants_grad
from ..._precision import no_tf32
from ..._tolerance import rule
from .op import linear
from .reference import sorsa_linear_naive

# Rows at or below this go to the torch path by rule, untimed (decode steps): both paths then
# read the same W_r bytes once (the adapter terms are tiny), so fusing saves nothing, while the
# fused call costs more host work (~15 launches per fwd+bwd, descriptors) and the dispatcher's
# lookup (~18 µs); the rule skips both. A choice by counting, not timing.
DECODE_M = 32


def linear_case(x2: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, bias: Optional[torch.Tensor],
                p: float, train: Optional[bool] = None
                ) -> Union[None, str, Tuple[Dict[str, Any], Bench, int, Callable[[str], Optional[str]]]]:
    """(fields, bench, need_bytes, verify) for ``sorsa_linear`` on ``x2`` (M, K); ``"torch"`` for
    decode-sized rows (:data:`DECODE_M`). Inside a ``torch.compile`` trace only ``(fields,)``, with
    ``M`` None: the row count may be symbolic there, and K, N, r come from the parameters.

    ``train``: whether a backward follows the call (the caller passes :func:`wants_grad` of all
    its operands; None: computed from ``x2, weight, A, bias``). It is part of the key, and picks
    fwd+bwd or forward-only thunks."""
    M = x2.shape[0]
    if M <= DECODE_M:  # under a trace: one guard on the row count, not a specialisation
        return "torch"
    N, K, r = weight.shape[0], weight.shape[1], A.shape[0]
    dt, adt, dev = x2.dtype, A.dtype, x2.device
    train = wants_grad(x2, weight, A, bias) if train is None else bool(train)
    has_bias = bias is not None
    layout = x_layout(x2)
    tracing = torch.compiler.is_compiling()
    fields = dict(M=None if tracing else bucket(M), K=K, N=N, r=r, dtype=str(dt).replace("torch.", ""),
                  adapter_dtype=str(adt).replace("torch.", ""), dropout=p > 0, bias=has_bias, train=train,
                  x_layout=layout)
    if tracing:
        return (fields,)
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
    ref_dt = torch.float64 if dt == torch.float32 else torch.float32
    e, er = dt.itemsize, ref_dt.itemsize
    # inputs in dt and ref_dt, y and dx of the three runs, the reference's temporaries
    need = (M * K + N * K + M * N) * (e + er) + (M * N + M * K) * (2 * e + er) + 2 * M * N * er
    free = _autotune.free_bytes(dev) if dev.type == "cuda" else None
    if need > (_autotune.MEM_FRACTION * free if free is not None else VERIFY_MAX_BYTES):
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
    run = lambda name: lambda lv, w, b: linear(lv[0], w, *lv[1:], b, 0.5, 0.0, name)  # noqa: E731
    # the user's autocast or TF32 settings must not lower the reference's (or the paths') precision
    with torch.autocast(dev.type, enabled=False), no_tf32():
        try:
            got = outputs(run(fused), lambda v: v)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a launch error (or a crash surfaced as one) is a failure too
            return f"the fused path raised {err_text(exc)}"
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

    def step():  # as a training step runs it, also when the user's call came under no_grad/inference_mode
        try:
            with torch.inference_mode(False), torch.enable_grad():
                linear(t.x, t.w, t.a, t.s, t.b, t.bias, 0.5, p, name).backward(t.dy)
        finally:  # also after a failed step: the other candidate starts from no grads
            t.x.grad = t.a.grad = t.s.grad = t.b.grad = None

    def forward():  # as an inference call runs it: no graph, no saved tensors
        with torch.inference_mode(False), torch.no_grad():
            linear(t.x, t.w, t.a, t.s, t.b, t.bias, 0.5, p, name)
    return step if train else forward
