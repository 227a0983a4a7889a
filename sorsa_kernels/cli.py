"""sorsa-kernels command line.

  sorsa-kernels info               what will run on this machine (versions, GPU, backends)
  sorsa-kernels bench              the main job: ours vs sorsa 1.0.1 vs the floor, every op
  sorsa-kernels bench --quick      a short smoke run (CI)
  sorsa-kernels bench --full       a wider sweep
  sorsa-kernels check              every fused op vs the torch path and float64, one subprocess per case (GPU)
  sorsa-kernels analyze BASE TUNED...  ΔΣ and ΔD of every weight (the SORSA paper's analysis)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _what_runs() -> List[str]:
    """Per registered op: what backend="auto" runs on this machine, and the cached timed choices."""
    from . import _autotune, _backend
    from . import ops  # noqa: F401  (importing the ops registers them)
    out = []
    for op, row in _backend.describe().items():
        out.append(f"  {op:<16} auto runs: {row['cpu']} on cpu; on cuda: {row['cuda']}")
        out += [f"  {'':<16} {k}: {v}" for k, v in row.items() if k not in ("cpu", "cuda")]
    rep = _autotune.report()
    out.append(f"cached auto decisions (fused vs torch, timed once per shape; {_autotune.cache_path()}): {len(rep)}")
    out += [f"  {_autotune.format_entry(d)}" for d in rep]
    return out


def info() -> str:
    """What will actually run on this machine."""
    from ._env import ext_status, triton_interpret, triton_status
    from ._version import __version__
    ok, why = triton_status()
    e_ok, e_cuda, e_why = ext_status()
    gpu = torch.cuda.is_available()
    tv = "not installed"
    if ok:
        import triton
        tv = triton.__version__
    if not ok:
        triton_line = f"Triton kernels: will not run ({why})"
    elif gpu:
        triton_line = f"Triton kernels: run on the GPU (triton {tv})"
    elif triton_interpret():
        triton_line = (f"Triton kernels: no GPU; triton {tv} is installed and TRITON_INTERPRET=1, so they run only "
                       "when forced (backend='triton') under the slow interpreter (a test vehicle)")
    else:
        triton_line = f"Triton kernels: will not run (no CUDA GPU; triton {tv} is installed but needs one)"
    ext_line = (f"C++ extension: loaded; CUDA kernels {'built' if e_cuda else 'not built (CPU build only)'}"
                if e_ok else f"C++ extension: not available ({e_why})")
    return "\n".join([
        f"sorsa-kernels {__version__}",
        f"python {platform.python_version()}  torch {torch.__version__} ({torch.get_num_threads()} threads)  triton {tv}",
        f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}",
        f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none visible'}",
        triton_line,
        ext_line,
        "what runs (backend='auto'):",
        *_what_runs(),
    ])


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .bench import models, op_texts
    OPS, MODELS = list(op_texts()), models()
    p = argparse.ArgumentParser(prog="sorsa-kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sorsa-kernels {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{info,bench,check,analyze}")
    sub.add_parser("info", help="what will run on this machine: versions, GPU, backends, extension")
    sub.add_parser("check", add_help=False, help="every fused op vs the torch path and float64, each case in a "
                                                 "subprocess (needs a GPU; --help for options)")
    an = sub.add_parser("analyze", help="ΔΣ and ΔD of every weight of fine-tuned checkpoints against the base "
                                        "(the SORSA paper's analysis)")
    an.add_argument("base", help="the pre-trained weights: a .safetensors file, a .bin/.pt state dict or a folder")
    an.add_argument("tuned", nargs="+", help="fine-tuned checkpoints (same kinds), in order")
    an.add_argument("--names", nargs="+", default=None, help="only weights whose name contains one of these")
    an.add_argument("--json", default=None, metavar="PATH", help="write the per-layer and mean shifts here")
    an.add_argument("--plot", default=None, metavar="PATH", help="the paper's figure as a PNG")
    an.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                    help="earlier --json outputs (other runs of the same base) drawn as panels beside this one")
    an.add_argument("--device", default=None, help="where the SVDs run (default: cuda when visible, else cpu)")
    an.add_argument("--cache", default=None, metavar="DIR",
                    help="keep the base's SVD in DIR and reuse it in later runs (keyed by the weights' bytes)")
    b = sub.add_parser("bench", help="benchmark ours vs sorsa 1.0.1 vs the floor on this machine",
                       description="Times every op (ours, sorsa 1.0.1, the floor) interleaved in rounds and "
                                   "prints a verdict table, then the details. Default: about 2 minutes on a "
                                   "2-core CPU (never run on a GPU yet).")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes, few rounds (CI smoke run)")
    size.add_argument("--full", action="store_true", help="a wider sweep: more shapes, ranks, dropout")
    b.add_argument("--ops", nargs="+", default=None, metavar="OP", help=f"subset of: {' '.join(OPS)}")
    b.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="init case: a whole model's matrices instead of weight stacks (llama2-7b: 224 matrices, r=128, needs a GPU; tiny: its layout scaled down)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    b.add_argument("--json", default=None, metavar="PATH",
                   help="write results as JSON (updated as each case completes) and a PNG plot next to it")
    b.add_argument("--plot", default=None, metavar="PATH", help="PNG plot path (default: the JSON path with .png)")
    b.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="skip (and record) the cases left after S seconds")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (rows still print as they complete)")
    return p


def analyze(a: argparse.Namespace) -> int:
    """``sorsa-kernels analyze``: per checkpoint, every layer's (ΔΣ, ΔD) and their mean."""
    from . import analysis
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        results = analysis.spectral_shift(a.base, list(a.tuned), names=a.names, device=dev, cache_dir=a.cache)
    except (ValueError, FileNotFoundError, TypeError) as exc:  # the user's input: say it, no traceback
        print(f"sorsa-kernels analyze: {exc}", file=sys.stderr)
        return 2
    out = analysis.trajectory_json(a.base, list(a.tuned), results)
    print(f"{'checkpoint':<48} {'layers':>6} {'mean ΔΣ':>12} {'mean ΔD':>12}")
    for cp in out["checkpoints"]:
        print(f"{cp['path'][-48:]:<48} {len(cp['layers']):>6} {cp['mean']['delta_sigma']:>12.5g} "
              f"{cp['mean']['delta_d']:>12.5g}")
    print(f"{sum(len(c['layers']) for c in out['checkpoints'])} weights analysed on {dev} in "
          f"{time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"json: {a.json}")
    if a.plot:
        runs = [out] + [json.load(open(p)) for p in (a.compare or [])]
        print(f"plot: {analysis.plot_shift(runs, a.plot)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:  # its own options: sorsa_kernels.check parses them
        from . import check
        return check.main(argv[1:])
    p = _parser()
    a = p.parse_args(argv)
    if a.cmd == "info":
        print(info())
        return 0
    if a.cmd == "analyze":
        return analyze(a)
    from . import bench
    if a.ops:
        bad = [o for o in a.ops if o not in bench.op_texts()]
        if bad:
            p.error(f"unknown op(s) {' '.join(bad)}; choose from: {' '.join(bench.op_texts())}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.model == "llama2-7b" and dev.type != "cuda":
        p.error("--model llama2-7b needs a CUDA GPU (its 224 matrices take ~26 GB in fp32); "
                "try --model tiny on a CPU")
    ops = a.ops
    mode = "quick" if a.quick else "full" if a.full else "default"
    head = bench.header(dev, mode)
    print(bench.header_text(head), flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    results = bench.run(ops, mode, bench_dtype(a.dtype), dev, a.model, a.json, a.max_seconds,
                        progress=not a.no_progress)
    print()
    print("Verdict (per op; our default path in each case: geometric mean over its cases, range in brackets)")
    busy = bench.busy_warning(results)
    if busy:
        print(busy)
    print(bench.verdict_table(results))
    if bench.isatty(sys.stdout) and bench.isatty(sys.stderr):  # the rows are on screen already, above the verdict
        print("(each row was printed as it completed, above; --json PATH keeps them all)")
    else:
        print()
        print("Details")
        print(bench.details_table(results))
    print(f"finished in {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU time "
          f"(this process, all threads)")
    png = a.plot or (os.path.splitext(a.json)[0] + ".png" if a.json else None)
    if png:
        made = bench.plot(results, png)
        print(f"plot: {made}" if made else
              f"plot: skipped, matplotlib is missing (install it with: {sys.executable} -m pip install matplotlib)")
    failed = [r for r in results if r.error and not r.error.startswith("skipped")]
    return 1 if failed else 0


def bench_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return DTYPES.get(name) if name else None


if __name__ == "__main__":
    sys.exit(main())
