"""Compile the Triton programs that actually run, for sm_80 and sm_90, on a machine without a GPU.

At run time Triton specialises every launch on its arguments (integers divisible by 16 or equal
to 1, 16-byte aligned pointers, host tensor descriptors); a kernel compiled with plain ``i32``
arguments is a different program (the main bf16 tile: 254 registers / 32 KB / no cp.async plain,
126 registers / 96 KB / 48 cp.async specialised). So this check drives the REAL launchers
(each registered op's ``OpSpec.aot`` module: ``cases(dtypes)``) on META-device tensors
of representative shapes, intercepts every Triton launch (``Autotuner.run`` / ``JITFunction.run``)
instead of running it, and for each launch × shipped config × arch computes the signature and
specialisation with the installed Triton's own binder (``create_function_from_signature`` +
``JITFunction._pack_args``, as ``JITFunction.run`` does) and calls ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``. SM count and compute capability are patched per arch.

Gates (exit status 1): a compile/ptxas error, register spills, shared memory over the arch's
limit, an sm_90 fp16/bf16 tensor-core dot with a ≥ 64-row tile and no wgmma, an sm_90
launch given host tensor descriptors whose PTX has no TMA (``cp.async.bulk.tensor``), a launch
that leaves ``enable_fp_fusion`` to Triton's default (it flips in 3.10), any warning raised
while compiling (Triton 3.9's deprecations become 3.10's errors), a ``tl.dot`` in a loop fed by
neither cp.async nor TMA (an unpipelined main loop), and less than ``SMEM_HEADROOM``
of shared memory left below the limit (unless the launcher falls back on OutOfResources). TMA
presence is otherwise reported, not gated.

Run: ``TRITON_INTERPRET=0 python -m sorsa_kernels.aot_check [--json PATH] [--markdown PATH]``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

# Shared memory per block a kernel may opt into (bytes): A100 163 KB, H100/H200 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
# Room every program must leave below the limit: a Triton update that adds scratch space (barriers,
# reduction or layout-conversion buffers) must not make a shipped program fail at launch. Programs
# whose launcher relaunches a leaner variant on OutOfResources (the op's ``aot.SMEM_FALLBACK``) are
# reported, not failed.
SMEM_HEADROOM = 8 * 1024
# What the launchers see for each arch (SM count, capability): A100, H100/H200 SXM.
ARCH_DEVICE = {80: (108, (8, 0)), 90: (132, (9, 0))}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One representative call of a launcher on meta tensors."""
    name: str
    op: str  # the op's short name in case names and ``--ops``
    dtype: str
    run: Callable[[], None]


def _op_modules():
    """The AOT modules of every registered op (``OpSpec.aot``)."""
    import importlib
    from . import _backend, ops  # noqa: F401  (importing the ops registers them)
    return [importlib.import_module(sp.aot) for sp in _backend.specs() if sp.aot]


def all_cases(dtypes) -> List[Case]:
    """Every registered op's cases for ``dtypes``."""
    return [c for m in _op_modules() for c in m.cases(dtypes)]


# ----------------------------------------------------------------------------- capture
@dataclass
class Launch:
    jit: Any  # the JITFunction
    args: tuple
    kwargs: Dict[str, Any]
    configs: List[Any]  # triton.Config, or [None] for a direct launch


def _unwrap(fn):
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


@contextlib.contextmanager
def _intercept(arch: int, sink: List[Launch]):
    """Record Triton launches instead of running them; the launchers see ``arch``'s device."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    from . import _device
    sms, cap = ARCH_DEVICE[arch]

    def at_run(self, *args, **kwargs):
        kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        sink.append(Launch(_unwrap(self.fn), args, kw, list(self.configs)))

    def jit_run(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(self, args, dict(kwargs), [None]))

    # the launchers' contract: SM count and arch only through sorsa_kernels._device
    patches = [(Autotuner, "run", at_run), (JITFunction, "run", jit_run),
               (_device, "num_sms", lambda *a, **k: sms), (_device, "device_capability", lambda *a, **k: cap)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, val in patches:
            setattr(obj, name, val)
        yield
    finally:
        for obj, name, val in saved:
            setattr(obj, name, val)


# ----------------------------------------------------------------------------- specialisation
@dataclass
class Unit:
    """One distinct program: a kernel compiled with one specialisation, config and arch."""
    key: str
    kernel: str
    arch: int
    config: Dict[str, Any]
    num_warps: int
    num_stages: int
    has_desc: bool
    spec: Tuple[Any, Any, Any, Any]  # (signature, constexprs, attrs, options dict)
    jit: Any = None
    fp_fusion: Optional[bool] = None  # what the launcher passed (None: left to Triton's default)
    cases: List[str] = field(default_factory=list)
    dtypes: List[str] = field(default_factory=list)


def _specialise(launch: Launch, cfg, arch: int):
    """The (signature, constexprs, attrs, options) ``JITFunction.run`` would compile, via Triton's own binder."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton.tools.tensor_descriptor import TensorDescriptor
    jit = launch.jit
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    args = tuple(copy.copy(a) if isinstance(a, TensorDescriptor) else a for a in launch.args)
    kwargs = {k: (copy.copy(v) if isinstance(v, TensorDescriptor) else v) for k, v in launch.kwargs.items()}
    if cfg is not None:
        kwargs.update(cfg.all_kwargs())
        if cfg.pre_hook is not None:  # e.g. sets the descriptors' block shapes for this config
            cfg.pre_hook({**dict(zip(jit.arg_names, args)), **kwargs})
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    has_desc = any(isinstance(v, TensorDescriptor) for v in bound.values())
    return (signature, constexprs, attrs, options.__dict__), has_desc


def _units(cases: List[Case], archs: List[int]) -> Tuple[List[Unit], List[dict]]:
    units: Dict[str, Unit] = {}
    errors = []
    for arch in archs:
        for case in cases:
            sink: List[Launch] = []
            try:
                with _intercept(arch, sink):
                    case.run()
                if not sink:
                    raise RuntimeError("the launcher made no Triton launch")
                for launch in sink:
                    for cfg in launch.configs:
                        spec, has_desc = _specialise(launch, cfg, arch)
                        key = repr((launch.jit.cache_key, arch, spec))
                        u = units.get(key)
                        if u is None:
                            opts = spec[3]
                            conf = dict(cfg.kwargs) if cfg is not None else {
                                k: v for k, v in launch.kwargs.items() if k.startswith(("BLOCK", "GROUP", "SPLIT"))}
                            u = units[key] = Unit(key, launch.jit.fn.__name__, arch, conf, opts["num_warps"],
                                                  opts["num_stages"], has_desc, spec, launch.jit,
                                                  launch.kwargs.get("enable_fp_fusion"))
                        if case.name not in u.cases:
                            u.cases.append(case.name)
                        if case.dtype not in u.dtypes:
                            u.dtypes.append(case.dtype)
            except Exception as exc:  # a launcher that cannot be driven is a finding
                errors.append(dict(kernel=case.op + " launcher", arch=arch, cases=[case.name], ok=False,
                                   problems=[f"capture failed: {type(exc).__name__}: {str(exc)[:300]}"]))
    return list(units.values()), errors


# ----------------------------------------------------------------------------- compile + inspect
_UNITS: List[Unit] = []  # set before the pool forks: workers read their unit by index


def _bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _sass_counts(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True)
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", out.stdout, re.M)
    return dict(Counter(ops).most_common())


def _ptxas_stats(log: str) -> Tuple[Optional[int], int]:
    regs = re.search(r"Used (\d+) registers", log)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return (int(regs.group(1)) if regs else None), max(spill or [0])


def _rerun_ptxas(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    return out.stderr


_TC_DOT = re.compile(r"tt\.dot(?:_scaled)? .*?:\s*tensor<(\d+)x\d+x(bf16|f16)")


def compile_unit(i: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    u = _UNITS[i]
    signature, constexprs, attrs, options = u.spec
    rec = dict(kernel=u.kernel, arch=u.arch, config=u.config, num_warps=u.num_warps, num_stages=u.num_stages,
               cases=u.cases, dtypes=u.dtypes, triton=triton.__version__, tensor_descriptors=u.has_desc,
               specialised={k: v for k, v in signature.items() if v != "constexpr"},
               # runtime arguments that the binder turned into constants (== 1: unit strides)
               constant_args=sorted(k for k, v in signature.items() if v == "constexpr" and k not in u.config
                                    and k in u.jit.arg_names and not u.jit.params[u.jit.arg_names.index(k)].is_constexpr),
               divisible_16=sorted(_attr_names(u.jit.arg_names, attrs, "tt.divisibility")),
               problems=[])
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.time()
    try:
        from triton._utils import warn_once  # Triton >= 3.9: deprecations are warned once per process
        warn_once.cache_clear()
    except ImportError:
        pass
    try:
        # any warning while compiling our kernel (Triton's deprecations: non-bool tl.where, and/or on
        # tensors, an unset FP-fusion default) is a finding: the next Triton turns them into errors
        with contextlib.redirect_stdout(log), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k = triton.compile(ASTSource(u.jit, signature, constexprs, attrs), target=GPUTarget("cuda", u.arch, 32),
                               options=options)
    except Exception as exc:
        rec.update(ok=False, problems=[f"compile error: {str(exc).strip().splitlines()[0][:300]}"])
        return rec
    rec["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
    rec["compile_s"] = round(time.time() - t0, 2)
    ptx = k.asm["ptx"]
    ptxlog = log.getvalue()
    if "Used" not in ptxlog:
        ptxlog = _rerun_ptxas(ptx, u.arch)
    regs, spill = _ptxas_stats(ptxlog)
    sass = _sass_counts(k.asm["cubin"])
    dots = _TC_DOT.findall(k.asm.get("ttir", ""))
    rec.update(registers=regs, spill_bytes=spill, shared=k.metadata.shared, smem_limit=SMEM_LIMIT[u.arch],
               wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
               cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
               tc_dots=len(dots), sass_total=sum(sass.values()), sass=sass,
               fp_fusion=u.fp_fusion, fma_f32=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)))
    p = rec["problems"]
    if u.fp_fusion is None:
        p.append("launched without enable_fp_fusion (Triton 3.10 changes its default)")
    p.extend(f"warning while compiling: {w}" for w in rec["warnings"])
    if spill:
        p.append(f"register spills: {spill} B")
    rec["smem_headroom"] = SMEM_LIMIT[u.arch] - k.metadata.shared
    if k.metadata.shared > SMEM_LIMIT[u.arch]:
        p.append(f"shared memory {k.metadata.shared} B > {SMEM_LIMIT[u.arch]} B")
    elif rec["smem_headroom"] < SMEM_HEADROOM:
        flag = _smem_fallback(u)
        if flag is None:
            p.append(f"shared memory headroom {rec['smem_headroom']} B < {SMEM_HEADROOM} B")
        else:
            rec["smem_fallback"] = f"headroom {rec['smem_headroom']} B: the launcher relaunches with {flag}=False"
    # wgmma needs ≥ 64 rows per warpgroup: a 16/32-row tile legitimately falls back to mma.sync
    if u.arch == 90 and any(int(m) >= 64 for m, _ in dots) and not rec["wgmma"]:
        p.append("fp16/bf16 dot with a >= 64-row tile but no wgmma in the sm_90 PTX")
    if u.arch == 90 and u.has_desc and not rec["tma"]:
        p.append("launched with tensor descriptors but no TMA (cp.async.bulk.tensor) in the sm_90 PTX")
    # a dot fed inside a loop by neither cp.async nor TMA waits on every load: not pipelined. A
    # defect when every pointer and stride is 16-byte divisible; with an unaligned operand (a row
    # stride of 4097 bf16) cp.async is impossible, and that is reported, not failed.
    if _dot_in_loop(k.asm.get("ttir", "")) and not rec["cp_async"] and not rec["tma"] and u.num_stages > 1:
        unaligned = _unaligned_operands(u, signature, rec["divisible_16"])
        if unaligned:
            rec["unpipelined_because"] = "operands not 16-byte divisible: " + ", ".join(unaligned)
        else:
            p.append("a tl.dot inside a loop is fed by neither cp.async nor TMA (loads not pipelined)")
    rec["ok"] = not p
    return rec


def _unaligned_operands(u: Unit, signature: Dict[str, Any], divisible: List[str]) -> List[str]:
    """Why the main loop's operands cannot be proven 16-byte aligned (empty: they can): a kernel's
    own ``VEC`` constexpr when it has one (1: unaligned), else its op's ``aot.PIPELINE_OPERANDS``
    (or every pointer and ``s_*`` stride) that the specialisation could not prove 16-divisible."""
    PIPELINE_OPERANDS = {k: v for m in _op_modules() for k, v in m.PIPELINE_OPERANDS.items()}
    if "VEC" in u.jit.arg_names:  # the kernel's own alignment flag (its strides come from a table)
        vec = _constexpr(u, "VEC")
        return [] if vec is not None and vec > 1 else ["VEC=1 (the launcher found no 16-byte alignment)"]
    names = PIPELINE_OPERANDS.get(u.kernel)
    out = []
    for name, ty in signature.items():
        if ty == "constexpr" or name in divisible:
            continue
        if (name in names) if names else (str(ty).startswith("*") or name.startswith("s_")):
            out.append(name)
    return out


def _dot_in_loop(ttir: str) -> bool:
    """Whether the TTIR has a ``tt.dot`` inside an ``scf.for`` (the loops the pipeliner serves)."""
    depth, loops = 0, []
    for line in ttir.splitlines():
        if "scf.for" in line:
            loops.append(depth)
        if "tt.dot" in line and loops:
            return True
        depth += line.count("{") - line.count("}")
        while loops and depth <= loops[-1]:
            loops.pop()
    return False


def _smem_fallback(u: Unit) -> Optional[str]:
    """The constexpr whose True value this program has and whose launcher falls back without it
    on OutOfResources (the op's ``aot.SMEM_FALLBACK``), else None."""
    SMEM_FALLBACK = {k: v for m in _op_modules() for k, v in m.SMEM_FALLBACK.items()}
    flag = SMEM_FALLBACK.get(u.kernel)
    return flag if flag is not None and _constexpr(u, flag) is True else None


def _constexpr(u: Unit, name: str) -> Any:
    """The value of constexpr argument ``name`` in this program (None when it has none); Triton
    keys its constexprs by argument path ``(index,)``."""
    if name not in u.jit.arg_names:
        return None
    idx = u.jit.arg_names.index(name)
    constexprs = u.spec[1]
    return constexprs.get((idx,), constexprs.get(idx))


def _attr_names(params, attrs, attr: str) -> List[str]:
    out = []
    for path, vals in attrs.items():
        if any(v[0] == attr for v in vals):
            out.append(params[path[0]] + "".join(f"[{j}]" for j in path[1:]))
    return out


# ----------------------------------------------------------------------------- report
def _fmt_cfg(rec: dict) -> str:
    """``M128 N128 K64 G8 w8 s3``: the config's block sizes (``BLOCK_`` dropped), warps, stages."""
    c = rec["config"]
    tile = " ".join(k.replace("BLOCK_", "").replace("GROUP_", "G")[:3] + str(v) for k, v in c.items()
                    if isinstance(v, int) and not isinstance(v, bool))
    return f"{tile} w{rec['num_warps']} s{rec['num_stages']}".strip()


def _kb(a: dict) -> str:
    return f"{a['smem'] / 1024:.0f}"


def markdown(runs: Dict[str, List[dict]]) -> str:
    """One table from one or more runs (Triton version -> records): a row per kernel × config ×
    arch (max over the dtypes and shapes that hit it), a column per Triton version."""
    rows: Dict[tuple, Dict[str, dict]] = {}
    for ver, records in runs.items():
        for r in records:
            if "registers" not in r:
                continue
            a = rows.setdefault((r["kernel"], _fmt_cfg(r), r["arch"]), {}).setdefault(
                ver, dict(regs=0, spill=0, smem=0, wgmma=False, tma=False, cpa=0, sass=0, fma=0, ok=True, dt=set()))
            a["regs"] = max(a["regs"], r["registers"] or 0)
            a["spill"] = max(a["spill"], r["spill_bytes"])
            a["smem"] = max(a["smem"], r["shared"])
            a["wgmma"] |= r["wgmma"]
            a["tma"] |= r["tma"]
            a["cpa"] = max(a["cpa"], r["cp_async"])
            a["sass"] = max(a["sass"], r["sass_total"])
            a["fma"] = max(a["fma"], r.get("fma_f32", 0))
            a["ok"] &= r["ok"]
            a["dt"].update(r["dtypes"])
    vers = sorted(runs, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")))
    fails = {v: sum(not r["ok"] for r in runs[v]) for v in vers}

    def cell(a: Optional[dict]) -> str:
        if a is None:
            return "–"
        feats = [f"{a['regs']} reg", f"{a['spill']} spill", f"{_kb(a)} KB"]
        feats += (["wgmma"] if a["wgmma"] else []) + (["TMA"] if a["tma"] else [])
        feats += [f"{a['cpa']} cp.async"] if a["cpa"] else []
        feats += [f"{a['sass']} SASS", f"{a['fma']} fma", "ok" if a["ok"] else "**FAIL**"]
        return " · ".join(feats)

    out = [f"Triton {', '.join(vers)}: " + ", ".join(f"{len(runs[v])} programs ({fails[v]} failing)" for v in vers)
           + ". Max over the dtypes and shapes that hit each row; per version: registers, spill bytes, shared "
           "memory, wgmma / TMA / cp.async present, SASS instructions, fma.rn.f32 in the PTX, gate.", "",
           "| kernel | config | arch | dtypes | " + " | ".join(f"triton {v}" for v in vers) + " |",
           "|---|---|---|---|" + "---|" * len(vers)]
    for (kern, cfg, arch), d in sorted(rows.items()):
        dts = ",".join(sorted(set().union(*(x["dt"] for x in d.values()))))
        out.append(f"| {kern} | {cfg} | sm_{arch} | {dts} | " + " | ".join(cell(d.get(v)) for v in vers) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--ops", nargs="+", help="only the cases of these ops (the short name that starts each case name; default all)")
    ap.add_argument("--quick", action="store_true", help="only the first case of each op per dtype")
    ap.add_argument("--jobs", type=int, default=2, help="compile workers (default 2: CI has 2 shared cores)")
    ap.add_argument("--json", dest="json_path", help="write one record per program here")
    ap.add_argument("--markdown", dest="md_path", help="write a compact table here")
    ap.add_argument("--table", nargs="+", metavar="JSON",
                    help="only print the combined markdown table of these --json reports (no compile)")
    a = ap.parse_args(argv)
    if a.table:
        runs = {}
        for path in a.table:
            with open(path) as f:
                rep = json.load(f)
            runs[rep["triton"]] = rep["records"]
        print(markdown(runs), end="")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces @triton.jit functions)")
        return 2
    import triton
    t0 = time.time()
    cases = [c for c in all_cases(a.dtypes) if a.ops is None or c.op in a.ops]
    if not cases:
        print(f"aot_check: no case for --ops {a.ops}")
        return 2
    if a.quick:
        seen, keep = set(), []
        for c in cases:
            if (c.op, c.dtype) not in seen:
                seen.add((c.op, c.dtype))
                keep.append(c)
        cases = keep
    units, records = _units(cases, a.archs)
    global _UNITS
    _UNITS = units  # forked workers inherit them (JITFunctions and meta tensors need no pickling)
    print(f"aot_check: triton {triton.__version__}, {len(cases)} cases -> {len(units)} distinct programs "
          f"(captured in {time.time() - t0:.1f} s)", flush=True)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max(1, a.jobs), mp_context=ctx) as ex:
        for rec in ex.map(compile_unit, range(len(units))):
            records.append(rec)
            info = (f"{rec.get('registers')} regs, spill {rec.get('spill_bytes')} B, smem {rec.get('shared')} B, "
                    f"wgmma {rec.get('wgmma')}, tma {rec.get('tma')}, cp.async {rec.get('cp_async')}")
            print(f"{'ok  ' if rec['ok'] else 'FAIL'} {rec['kernel']} sm_{rec['arch']} {_fmt_cfg(rec)} "
                  f"[{len(rec['cases'])} cases]: {info}"
                  + ("" if rec["ok"] else " -- " + "; ".join(rec["problems"])), flush=True)
    for rec in records:
        if "registers" not in rec and "config" not in rec:
            print(f"FAIL {rec['kernel']} sm_{rec['arch']} {rec['cases']}: {'; '.join(rec['problems'])}")
    bad = sum(not r["ok"] for r in records)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(dict(triton=triton.__version__, archs=a.archs, cases=[c.name for c in cases],
                           elapsed_s=round(time.time() - t0, 1), records=records), f, indent=1, default=str)
    if a.md_path:
        with open(a.md_path, "w") as f:
            f.write(markdown({triton.__version__: records}))
    print(f"aot_check: {len(records) - bad}/{len(records)} programs compiled within limits "
          f"in {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
