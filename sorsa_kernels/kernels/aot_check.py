"""Compile every Triton kernel at every shipped config for the GPUs we ship for (sm_80,
sm_90) on a machine without a GPU, and check shared memory and register spills.

The interpreter accepts programs the GPU compiler rejects (and the reverse); this is the
CPU-side proof that the kernels build. Run: ``TRITON_INTERPRET=0 python -m
sorsa_kernels.kernels.aot_check`` (exit status 1 on any failure).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Tuple

# Shared memory per block available to a kernel (bytes, opt-in maximum).
SMEM_LIMIT = {80: 166912, 90: 232448}
PTR_T = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclass
class Job:
    kernel: str
    arch: int
    dtype: str
    config: Dict
    num_warps: int
    num_stages: int
    flags: Dict


def _jobs(archs, dtypes) -> List[Job]:
    from .linear_launch import CONFIGS, ROLE_FLAGS
    from .ortho_launch import configs as ortho_configs
    import torch
    TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    jobs = []
    for arch in archs:
        for dt in dtypes:
            for (role, f32), cfgs in CONFIGS.items():
                if f32 != (dt == "fp32"):
                    continue
                for c in cfgs:
                    flags = dict(ROLE_FLAGS[role])
                    # int64 Philox offsets (M·in >= 2³¹) only change index math: one dtype suffices
                    bigs = (False, True) if ("DROP_Q" in flags or flags.get("DROP_IN") or flags.get("DROP_OUT")) and dt == dtypes[0] else (False,)
                    for big in bigs:
                        jobs.append(Job("tn" if role == "tn" else "mm", arch, dt, dict(c.kwargs), c.num_warps,
                                        c.num_stages, dict(flags, BIG=big)))
            # the regularizer's three grouped kernels, with the config ortho_launch ships for dt
            (gram, gw, gs), (fin, fw, fs), (grad, dw, ds) = ortho_configs(TORCH_DT[dt])
            jobs.append(Job("ortho_gram", arch, dt, gram, gw, gs, dict(UPCAST=False, PREC="ieee" if dt == "fp32" else "tf32")))
            jobs.append(Job("ortho_finalize", arch, dt, fin, fw, fs, {}))
            jobs.append(Job("ortho_grad", arch, dt, grad, dw, ds, dict(PREC="ieee" if dt == "fp32" else "tf32")))
    return jobs


def _signature(fn, ptr_types: Dict[str, str], constexprs: Dict) -> Dict[str, str]:
    """Pointers as given in ``ptr_types``, constexprs as such, floats fp32, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in ("p", "inv_keep", "coef"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas() -> str:
    import triton
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise RuntimeError("no ptxas in triton/backends/nvidia/bin")


def compile_one(job: Job) -> Tuple[str, bool, str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from . import linear_kernels, ortho_kernels
    fn = {"mm": linear_kernels.sorsa_mm_kernel, "tn": linear_kernels.sorsa_tn_kernel,
          "ortho_gram": ortho_kernels.ortho_gram_kernel, "ortho_finalize": ortho_kernels.ortho_finalize_kernel,
          "ortho_grad": ortho_kernels.ortho_grad_kernel}[job.kernel]
    tag = (f"{job.kernel} sm_{job.arch} {job.dtype} {job.config} w{job.num_warps} s{job.num_stages}"
           f"{' int64-offsets' if job.flags.get('BIG') else ''}")
    const = dict(job.flags, **job.config)
    if job.kernel in ("mm", "tn"):
        const.update(UPCAST=False, PREC="ieee" if job.dtype == "fp32" else "tf32")
    t = PTR_T[job.dtype]
    tables = dict(META="*i64", WORK="*i64", WS="*fp32", E="*fp32", NSQ="*fp32", COEF="*fp32")
    ptrs = {"mm": dict(X1=t, W1=t, X2=t, W2=t, BIAS=t, C=t, SEED_PTR="*i64"),
            "tn": dict(P=t, Q=t, C="*fp32", SEED_PTR="*i64")}.get(job.kernel, tables)
    if job.kernel in ("ortho_gram", "ortho_grad"):
        import triton.language as tl
        const["DT"] = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[job.dtype]
    sig = _signature(fn, ptrs, const)
    try:
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", job.arch, 32),
                           options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as exc:  # a compile error is the finding
        return tag, False, f"compile error: {str(exc).splitlines()[0][:300]}"
    shared = k.metadata.shared
    if shared > SMEM_LIMIT[job.arch]:
        return tag, False, f"shared memory {shared} B > {SMEM_LIMIT[job.arch]} B"
    if job.arch == 90 and job.dtype != "fp32" and job.kernel == "mm" and "wgmma" not in k.asm["ptx"]:
        return tag, False, "no wgmma in the sm_90 PTX: the tile would not use Hopper tensor cores"
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        arch = f"sm_{job.arch}a" if job.arch == 90 else f"sm_{job.arch}"
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        return tag, False, f"ptxas failed: {out.stderr.strip()[:300]}"
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)]
    info = f"shared {shared} B, {regs.group(1) if regs else '?'} regs, spill {max(spill or [0])} B"
    return tag, not any(spill), info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces @triton.jit functions)")
        return 2
    jobs = _jobs(a.archs, a.dtypes)
    bad = 0
    with ProcessPoolExecutor(a.jobs) as ex:
        for tag, ok, info in ex.map(compile_one, jobs):
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {tag}: {info}", flush=True)
    print(f"aot_check: {len(jobs) - bad}/{len(jobs)} kernels compiled within limits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
