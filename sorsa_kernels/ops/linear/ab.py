"""A/B timings of the fused linear's design switches that were chosen by counting, not timing.

Each switch is a field of :class:`sorsa_kernels.ops.linear.launch.LaunchOptions` (read at launch time):

* ``tma_flatten``: the sm_90 TMA GEMM's flattened persistent loop (vs the nested loop);
* ``overlap``: dA (and a second-pass dB) on a side stream next to the dX GEMM (vs in line);
* ``one_pass_dy``: ``g = dY·B`` and ``dB = dYᵀ·s`` in one pass over dY (vs two; ``None`` is the
  shipped byte-count rule);
* ``reserve_sms``: SMs the persistent dX GEMM leaves free for the side stream (0 vs 16).

For each case the shipped defaults and one variant per switch (that switch flipped, the others
at their defaults) run fwd+bwd interleaved (:func:`sorsa_kernels.bench.timing.time_interleaved`);
the report gives each variant's median time over the default's in the same round: above 1 means
the shipped choice is faster. ``benchmarks/gpu_check.sh`` runs this on the GPU; on a CPU it runs
the same code (interpreter: the switches change the schedule, not the meaning).

Run: ``python -m sorsa_kernels.ops.linear.ab [--json PATH] [--rounds N]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import launch as L
from . import sorsa_linear
from ...bench.timing import time_interleaved

DEFAULTS = dataclasses.asdict(L.LaunchOptions())
FLIPPED = {"tma_flatten": False, "overlap": False, "one_pass_dy": False, "reserve_sms": 16}
# (M, K, N, r, p, switches that matter there): r = 16 takes every switch; r = 128 keeps the nested
# loop and two passes over dY (so only overlap changes anything there)
GPU_CASES = [(8192, 4096, 4096, 16, 0.0, ("tma_flatten", "overlap", "one_pass_dy", "reserve_sms")),
             (8192, 4096, 4096, 128, 0.05, ("overlap", "reserve_sms"))]
CPU_CASES = [(48, 40, 56, 8, 0.1, ("tma_flatten", "overlap", "one_pass_dy"))]


def _step(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype,
          device: torch.device) -> Callable[[], None]:
    """A fwd+bwd call of the fused op on random (never zero) inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    x = rnd(M, K).requires_grad_()
    W = rnd(N, K) / K ** 0.5
    A, S, B = rnd(r, K).requires_grad_(), rnd(r).requires_grad_(), rnd(N, r).requires_grad_()
    dy = rnd(M, N)

    def step():
        sorsa_linear(x, W, A, S, B, 0.5, dropout_p=p, backend="triton").backward(dy)
        x.grad = A.grad = S.grad = B.grad = None
    return step


def _with(flags: Dict[str, object], fn: Callable[[], None]) -> Callable[[], None]:
    def run():
        with L.launch_options(**flags):
            fn()
    return run


def run_ab(device: torch.device, cases: Optional[Sequence[Tuple]] = None, dtype: Optional[torch.dtype] = None,
           rounds: int = 5, min_sample_ms: float = 50.0,
           on_case: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """One row per (case, variant): ``case``, ``variant`` ("default" or "SWITCH=value"),
    ``ms`` (median per call), ``ratio`` (median over rounds of variant / default in that round).
    ``on_case(rows so far)`` is called after each case (so a timeout keeps finished cases)."""
    gpu = device.type == "cuda"
    cases = cases if cases is not None else (GPU_CASES if gpu else CPU_CASES)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    rows: List[Dict[str, object]] = []
    for M, K, N, r, p, switches in cases:
        step = _step(M, K, N, r, p, dtype, device)
        impls = {"default": _with(DEFAULTS, step)}
        for s in switches:
            impls[f"{s}={FLIPPED[s]}"] = _with({**DEFAULTS, s: FLIPPED[s]}, step)
        samples = time_interleaved(impls, device, rounds=rounds, min_sample_ms=min_sample_ms)
        label = f"M={M} {K}→{N} r={r} p={p:g} {str(dtype).replace('torch.', '')}"
        base = samples["default"]
        for name, ms in samples.items():
            rows.append(dict(case=label, variant=name, ms=statistics.median(ms),
                             ratio=statistics.median(v / b for v, b in zip(ms, base))))
        if on_case is not None:
            on_case(rows)
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    """Plain-text table of :func:`run_ab` rows."""
    out = ["design switch A/B (fwd+bwd; ratio = variant / shipped default in the same round, "
           ">1: the default is faster)"]
    for row in rows:
        out.append(f"  {row['case']:<36} {row['variant']:<20} {row['ms']:9.3f} ms  ×{row['ratio']:.3f}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sorsa_kernels.ops.linear.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..._env import triton_interpret
    if dev.type != "cuda" and not triton_interpret():
        print("the A/B compares GPU kernel schedules: it needs a CUDA GPU, or TRITON_INTERPRET=1 to run "
              "the same code on the CPU (tiny shapes, interpreter speed)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

    def on_case(rows):  # print and write per case: a timeout keeps what finished
        print(table(rows), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "rows": rows}, f, indent=1)

    run_ab(dev, rounds=args.rounds, on_case=on_case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
