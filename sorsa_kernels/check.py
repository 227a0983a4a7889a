"""``sorsa-kernels check``: every fused op against the torch path and a float64 reference, one
case per subprocess, so a kernel that crashes (illegal address, launch failure, segfault) takes
down only its own row and the report still comes back.

Each row: case, status (``ok`` / ``mismatch`` / ``crashed`` / ``timeout``), the worst
``error / tolerance`` over the op's outputs (tolerance rule: fused error vs float64 ≤ 2× the
torch path's error in the same dtype + a small floor; ≤ 1 passes), and the fused and torch times.
The cases come from the registry (each op's ``OpSpec.check_cases``); each runs its op and returns
the error/tolerance per output (``OpSpec.check``). Without a GPU it says so and exits 2 within seconds;
``--interpret`` runs tiny cases on the CPU under the Triton interpreter (how the harness itself is
tested).

Run: ``sorsa-kernels check [--json PATH] [--only SUBSTR] [--timeout S]``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._tolerance import rule

MARK = "SORSA-CHECK-RESULT "
ENV_FAULT = "SORSA_KERNELS_CHECK_FAULT"  # "wrong:<case>,crash:<case>": proves the harness catches both


@dataclass(frozen=True)
class Case:
    """One check: ``run(case, device, fault)`` returns ``({output: error/tolerance}, fused ms,
    torch ms)``; ``fault`` asks it to spoil the fused result (the harness's own test). ``gpu``:
    in the GPU set; ``interpret``: in the tiny CPU set run under the Triton interpreter."""
    name: str
    op: str
    dtype: str
    shape: Tuple[int, ...]
    run: Callable[["Case", torch.device, bool], Tuple[Dict[str, float], float, float]]
    p: float = 0.0
    layout: str = "rows16"
    gpu: bool = True
    interpret: bool = False


class Skipped(Exception):
    """Raised by a case that cannot run here for a reason that is not a kernel failure."""


def cases(interpret: bool) -> List[Case]:
    """Every registered op's cases of the GPU set, or of the interpreter set."""
    from . import _backend, ops  # noqa: F401  (importing the ops registers them)
    out: List[Case] = []
    for spec in _backend.specs():
        if spec.check:
            out += [c for c in importlib.import_module(spec.check).CASES if (c.interpret if interpret else c.gpu)]
    return out


# ----------------------------------------------------------------------------- one case (child)
def ratio(out: torch.Tensor, lowp: torch.Tensor, ref: torch.Tensor) -> float:
    """error / tolerance of the rule (:mod:`sorsa_kernels._tolerance`); inf for a non-finite output."""
    err, tol, _ = rule(out, lowp, ref)
    return err / tol


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
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


def run_one(case: Case, device: torch.device) -> dict:
    faults = os.environ.get(ENV_FAULT, "").split(",")
    if f"crash:{case.name}" in faults:
        os.abort()  # what an illegal memory access does to the process
    try:
        ratios, t_f, t_t = case.run(case, device, f"wrong:{case.name}" in faults)
    except Skipped as why:
        return dict(case=case.name, status="skipped", error=str(why)[:300])
    worst = max(ratios.values())
    return dict(case=case.name, status="ok" if worst <= 1.0 else "mismatch", worst=worst, ratios=ratios,
                fused_ms=t_f, torch_ms=t_t)


# ----------------------------------------------------------------------------- the harness (parent)
def _device_or_reason(interpret: bool) -> Tuple[Optional[torch.device], str]:
    from ._env import triton_interpret, triton_status
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
    todo = cases(a.interpret)
    if a.one is not None:
        case, = (c for c in todo if c.name == a.one)
        print(MARK + json.dumps(run_one(case, device)), flush=True)
        return 0
    if a.only:
        todo = [c for c in todo if a.only in c.name]
    rows = check(todo, a.interpret, a.timeout, a.json_path)
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    print(f"sorsa-kernels check: {len(rows) - len(bad)}/{len(rows)} ok"
          + ("" if not bad else " — " + ", ".join(f"{r['case']}: {r['status']}" for r in bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: the ops' check modules import
    # sorsa_kernels.check, and its Skipped (and Case) must be the classes run_one catches
    from sorsa_kernels import check as _check
    sys.exit(_check.main())
