"""``sorsa-kernels check``: every fused op against the torch path and a float64 reference, one
case per subprocess, so a kernel that crashes (illegal address, launch failure, segfault) takes
down only its own row and the report still comes back.

Each row: case, status (``ok`` / ``mismatch`` / ``crashed`` / ``timeout``), the worst
``error / tolerance`` over the op's outputs (tolerance rule: fused error vs float64 ≤ 2× the
torch path's error in the same dtype + a small floor; ≤ 1 passes), and the fused and torch times.
Dropout cases replay the fused kernels' documented Philox mask (:func:`philox_keep_mask`) for the
float64 reference. Without a GPU it says so and exits 2 within seconds; ``--interpret`` runs tiny
cases on the CPU under the Triton interpreter (how the harness itself is tested).

Run: ``sorsa-kernels check [--json PATH] [--only SUBSTR] [--timeout S]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._tolerance import rule

MARK = "SORSA-CHECK-RESULT "
ENV_FAULT = "SORSA_KERNELS_CHECK_FAULT"  # "wrong:<case>,crash:<case>": proves the harness catches both


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "linear", "ortho" or "rsvd"
    dtype: str
    shape: Tuple[int, ...]
    p: float = 0.0
    layout: str = "rows16"


GPU_CASES = [
    Case("linear bf16 2048x4096->4096 r16", "linear", "bfloat16", (2048, 4096, 4096, 16)),
    Case("linear bf16 2048x4096->4096 r128 p0.05", "linear", "bfloat16", (2048, 4096, 4096, 128), 0.05),
    Case("linear fp16 ragged 1000x4000->4097 r33", "linear", "float16", (1000, 4000, 4097, 33)),
    Case("linear bf16 offset-view x 1024x4096->4096 r16", "linear", "bfloat16", (1024, 4096, 4096, 16), 0.0, "rows"),
    Case("linear fp32 1024x1024->1024 r16 p0.05", "linear", "float32", (1024, 1024, 1024, 16), 0.05),
    Case("ortho bf16 4 adapters 4096/11008 r128", "ortho", "bfloat16", (4, 4096, 11008, 128)),
    Case("ortho fp32 4 adapters 1000/777 r33", "ortho", "float32", (4, 1000, 777, 33)),
    Case("rsvd ext fp32 8x1024x1024 r64", "rsvd", "float32", (8, 1024, 1024, 64)),
]
INTERPRET_CASES = [
    Case("linear fp32 37x40->48 r5", "linear", "float32", (37, 40, 48, 5)),
    Case("linear fp32 37x40->48 r5 p0.1", "linear", "float32", (37, 40, 48, 5), 0.1),
    Case("ortho fp32 2 adapters 40/37 r5", "ortho", "float32", (2, 40, 37, 5)),
]


# ----------------------------------------------------------------------------- the mask reference
def philox_keep_mask(seed: int, M: int, K: int, p: float) -> torch.Tensor:
    """The fused kernels' dropout keep-mask of an (M, K) input, in numpy (the documented stream:
    element (m, k) uses Philox4x32-10 counter ``m·cdiv(K, 4) + k // 4`` with key ``seed``, word
    ``k % 4``, and is kept iff ``word >> 8 >= round(p·2^24)``)."""
    m, k = np.meshgrid(np.arange(M, dtype=np.uint64), np.arange(K, dtype=np.uint64), indexing="ij")
    ctr = m * np.uint64((K + 3) // 4) + k // np.uint64(4)
    M32 = np.uint64(0xFFFFFFFF)
    c = [ctr & M32, ctr >> np.uint64(32), np.zeros_like(ctr), np.zeros_like(ctr)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = A * c[0], B * c[2]
        c = [((pb >> np.uint64(32)) ^ c[1] ^ k0) & M32, pb & M32, ((pa >> np.uint64(32)) ^ c[3] ^ k1) & M32, pa & M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M32, (k1 + np.uint64(0xBB67AE85)) & M32
    words = np.stack(c, -1)
    w = np.take_along_axis(words, (k % np.uint64(4)).astype(np.int64)[..., None], -1)[..., 0]
    return torch.from_numpy((w >> np.uint64(8)) >= np.uint64(round(p * 2 ** 24)))


# ----------------------------------------------------------------------------- one case (child)
def _ratio(out: torch.Tensor, lowp: torch.Tensor, ref: torch.Tensor) -> float:
    """error / tolerance of the rule (:mod:`sorsa_kernels._tolerance`); inf for a non-finite output."""
    err, tol, _ = rule(out, lowp, ref)
    return err / tol


def _time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _linear(case: Case, device: torch.device, fault: bool):
    # (for p > 0 "torch ms" times the formula with a precomputed mask, not the torch backend,
    # which draws its own mask: the two paths would not compare)
    from .ops.linear import fwd_op, sorsa_linear_naive
    M, K, N, r = case.shape
    dt = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    o = dict(x=rn(M, K), W=rn(N, K) / K ** 0.5, A=rn(r, K) / K ** 0.5, S=rn(r).abs() + 0.5, B=rn(N, r) / N ** 0.5,
             b=rn(N), dy=rn(M, N))
    seed = torch.tensor([1234567], dtype=torch.int64)

    mask = philox_keep_mask(int(seed), M, K, case.p).to(device) if case.p > 0 else None

    def run(impl: str, dtype):
        """Outputs and gradients of ``impl`` in ``dtype``, and a thunk that repeats the step:
        ``naive`` is the literal formula with the fused kernels' mask (the float64 reference, and
        the low-precision baseline for p > 0: the torch backend draws its own mask)."""
        x = o["x"].to(device, dtype)
        if case.layout == "rows":  # an offset view: aligned rows, unaligned start
            buf = torch.empty(M * K + 1, dtype=dtype, device=device)
            buf[1:].view(M, K).copy_(x)
            x = buf[1:].view(M, K)
        x.requires_grad_()
        A, S, B, b = (o[k].to(device, dtype).requires_grad_() for k in ("A", "S", "B", "b"))
        W, dy = o["W"].to(device, dtype), o["dy"].to(device, dtype)

        def fwd():
            if impl == "naive":
                return sorsa_linear_naive(x, W, A, S, B, 0.5, b, mask=mask, dropout_p=case.p)
            return fwd_op(case.p)(x, W, A, S, B, b, 0.5, case.p, seed, impl)[0]
        y = fwd()
        grads = torch.autograd.grad(y, (x, A, S, B, b), dy)
        return [y.detach()] + list(grads), lambda: torch.autograd.grad(fwd(), (x, A, S, B, b), dy)

    ref, _ = run("naive", torch.float64)
    lowp, t_torch = run("torch" if case.p == 0 else "naive", dt)
    got, t_fused = run("triton", dt)
    if fault:
        got[0] = got[0].clone()
        got[0].view(-1)[0] += 1.0
    names = ("y", "dx", "dA", "dS", "dB", "dbias")
    ratios = {n: _ratio(a.cpu(), lp.cpu(), rf.cpu()) for n, a, lp, rf in zip(names, got, lowp, ref)}
    return ratios, _time(t_fused, device), _time(t_torch, device)


def _ortho(case: Case, device: torch.device, fault: bool):
    from .regularizer import ortho_loss
    n, L1, L2, r = case.shape
    dt = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    mats = []
    for i in range(n):  # near-orthonormal adapters, as in training
        L = L1 if i % 2 == 0 else L2
        q = torch.linalg.qr(torch.randn(L, r, generator=g, dtype=torch.float64))[0]
        mats.append((q + 1e-3 * torch.randn(L, r, generator=g, dtype=torch.float64)).t().contiguous())
    a, b = mats[0::2], [m.t().contiguous() for m in mats[1::2]]

    def run(backend, dtype):
        A = [m.to(device, dtype).requires_grad_() for m in a]
        B = [m.to(device, dtype).requires_grad_() for m in b]
        v = ortho_loss(a=A, b=B, backend="torch" if backend == "float64" else backend)
        gr = torch.autograd.grad(v, A + B)
        return [v.detach().reshape(1)] + list(gr), lambda: torch.autograd.grad(
            ortho_loss(a=A, b=B, backend="torch" if backend == "float64" else backend), A + B)

    ref, _ = run("float64", torch.float64)
    lowp, t_torch = run("torch", dt)
    got, t_fused = run("triton", dt)
    if fault:
        got[0] = got[0] + 1.0
    ratios = {("value" if i == 0 else f"grad{i - 1}"): _ratio(x.cpu(), lp.cpu(), rf.cpu())
              for i, (x, lp, rf) in enumerate(zip(got, lowp, ref))}
    return ratios, _time(t_fused, device), _time(t_torch, device)


def _rsvd(case: Case, device: torch.device, fault: bool):
    from .rsvd import rsvd
    n, m, k, r = case.shape
    W = torch.randn(n, m, k, generator=torch.Generator().manual_seed(0)).to(device)
    exact = torch.linalg.svdvals(W.double())[:, :r]

    def run(backend):
        S = rsvd(W, r, backend=backend, seed=0)[1]
        return S, lambda: rsvd(W, r, backend=backend, seed=0)
    got, t_fused = run("ext")
    lowp, t_torch = run("torch")
    if fault:
        got = got + 1.0
    # rsvd is approximate by design: the rule compares its σ error with the torch path's
    err = ((got.double() - exact).abs() / exact).max().item()
    base = ((lowp.double() - exact).abs() / exact).max().item()
    return {"sigma": err / (2 * base + 1e-6)}, _time(t_fused, device), _time(t_torch, device)


OPS = {"linear": _linear, "ortho": _ortho, "rsvd": _rsvd}


def run_one(case: Case, device: torch.device) -> dict:
    if case.op == "rsvd":
        from ._backend import ext_status
        ok, _, why = ext_status()
        if not ok:  # not a kernel failure: the extension is not built for this torch
            return dict(case=case.name, status="skipped", error=f"rsvd's extension is not loaded: {why[:200]}")
    faults = os.environ.get(ENV_FAULT, "").split(",")
    if f"crash:{case.name}" in faults:
        os.abort()  # what an illegal memory access does to the process
    ratios, t_f, t_t = OPS[case.op](case, device, f"wrong:{case.name}" in faults)
    worst = max(ratios.values())
    return dict(case=case.name, status="ok" if worst <= 1.0 else "mismatch", worst=worst, ratios=ratios,
                fused_ms=t_f, torch_ms=t_t)


# ----------------------------------------------------------------------------- the harness (parent)
def _device_or_reason(interpret: bool) -> Tuple[Optional[torch.device], str]:
    from ._backend import triton_interpret, triton_status
    if interpret:
        if not triton_interpret():
            return None, "--interpret needs TRITON_INTERPRET=1 set before triton is imported"
        return torch.device("cpu"), ""
    if not torch.cuda.is_available():
        return None, ("no CUDA GPU is visible (torch.cuda.is_available() is False): the fused kernels run "
                      "only there (--interpret checks the harness on the CPU)")
    ok, why = triton_status()
    if not ok:
        return None, f"triton is not usable: {why}"
    return torch.device("cuda"), ""


def check(cases: List[Case], interpret: bool, timeout: float, json_path: Optional[str] = None,
          echo: Callable[[str], None] = print) -> List[dict]:
    """Run each case in its own subprocess; one row per case, written to ``json_path`` as it comes."""
    rows: List[dict] = []
    echo(f"{'case':<48} {'status':<9} {'err/tol':>8} {'fused ms':>9} {'torch ms':>9}")
    for case in cases:
        cmd = [sys.executable, "-m", "sorsa_kernels.check", "--one", case.name] + (["--interpret"] if interpret else [])
        t0 = time.time()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            found = [ln[len(MARK):] for ln in res.stdout.splitlines() if ln.startswith(MARK)]
            if res.returncode == 0 and found:
                row = json.loads(found[-1])
            else:
                tail = (res.stderr.strip().splitlines() or [""])[-1][:300]
                row = dict(case=case.name, status="crashed", returncode=res.returncode, error=tail)
        except subprocess.TimeoutExpired:
            row = dict(case=case.name, status="timeout", error=f"no result within {timeout:.0f} s")
        row["wall_s"] = round(time.time() - t0, 2)
        rows.append(row)
        w = row.get("worst")
        echo(f"{case.name:<48} {row['status']:<9} {('%.3g' % w) if w is not None else '-':>8} "
             f"{('%.3f' % row['fused_ms']) if 'fused_ms' in row else '-':>9} "
             f"{('%.3f' % row['torch_ms']) if 'torch_ms' in row else '-':>9}"
             + (f"  {row['error']}" if row.get("error") else ""))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(dict(rows=rows), f, indent=1)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="sorsa-kernels check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", dest="json_path", help="write the rows here (updated per case)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per case (default 180)")
    ap.add_argument("--interpret", action="store_true", help="tiny cases on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: run this case, print its row
    a = ap.parse_args(argv)
    device, why = _device_or_reason(a.interpret)
    if device is None:
        print(f"sorsa-kernels check: {why}", file=sys.stderr)
        return 2
    cases = INTERPRET_CASES if a.interpret else GPU_CASES
    if a.one is not None:
        case, = (c for c in cases if c.name == a.one)
        print(MARK + json.dumps(run_one(case, device)), flush=True)
        return 0
    if a.only:
        cases = [c for c in cases if a.only in c.name]
    rows = check(cases, a.interpret, a.timeout, a.json_path)
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    print(f"sorsa-kernels check: {len(rows) - len(bad)}/{len(rows)} ok"
          + ("" if not bad else " — " + ", ".join(f"{r['case']}: {r['status']}" for r in bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
