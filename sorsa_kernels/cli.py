"""``sorsa-kernels`` command line: ``info`` and ``bench``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def info() -> str:
    from . import __version__, _backend
    from .ops.linear import OP as LIN
    from .ops.ortho import OP as ORTHO
    from .rsvd import OP as RSVD
    ok, why = _backend.triton_status()
    e_ok, e_cuda, e_why = _backend.ext_status()
    ext_line = (f"C++ extension: loaded, CUDA kernels {'built' if e_cuda else 'not built (CPU build only)'}"
                if e_ok else f"C++ extension: not available ({e_why})")
    tv = "not installed"
    if ok:
        import triton
        tv = triton.__version__
    lines = [
        f"sorsa-kernels {__version__}",
        f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}",
        f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}",
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"triton usable: {ok}{'' if ok else ' (' + why + ')'}; interpreter on: {_backend.triton_interpret()}",
        f"backends: {LIN}: {_backend.available_backends(LIN)}; {ORTHO}: {_backend.available_backends(ORTHO)}; "
        f"{RSVD}: {_backend.available_backends(RSVD)}",
        ext_line,
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sorsa-kernels", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, backends, GPU, extension")
    b = sub.add_parser("bench", help="benchmark ours vs sorsa 1.0.1 vs the dense floor on this hardware")
    b.add_argument("--quick", action="store_true", help="small shapes, < 1 min on a CPU")
    b.add_argument("--ops", nargs="+", default=None, help="subset of: linear_fwd linear_fwdbwd ortho_step init")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    b.add_argument("--json", default=None, metavar="PATH", help="write results as JSON (and a PNG plot next to it)")
    b.add_argument("--plot", default=None, metavar="PATH", help="PNG plot path (default: the JSON path with .png)")
    a = p.parse_args(argv)
    if a.cmd == "info":
        print(info())
        return 0
    from . import bench
    print(info(), "\n", flush=True)
    results = bench.run(a.ops, DTYPES.get(a.dtype), a.quick)
    print(bench.format_table(results))
    print()
    print(bench.summary_table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info(), "results": bench.to_json(results)}, f, indent=1)
    png = a.plot or (os.path.splitext(a.json)[0] + ".png" if a.json else None)
    if png:
        made = bench.plot(results, png)
        print(f"plot: {made}" if made else "plot: skipped (pip install 'sorsa-kernels[plot]' for matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
