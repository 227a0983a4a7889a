"""The benchmark cases: one source for ``sorsa-kernels bench`` and the pytest-benchmark suites.

A :class:`Case` is a description (op, shape, dtype, dropout...) — nothing is allocated until a
runner builds it (:func:`sorsa_kernels.bench.runners.build`). :func:`cases` picks the set for a
device and a mode:

* ``quick``: CI smoke run (small shapes, few rounds);
* ``default``: what ``sorsa-kernels bench`` runs — the cases that matter most on this hardware,
  sized for ≤ 2 min on a quiet 2-core CPU and ≤ 3 min on one H200;
* ``full``: a wider sweep (more shapes, ranks, dropout, ``torch.compile`` on a GPU).

GPU shapes are Llama-2-7B's (hidden 4096, MLP 11008, 8192 tokens per call) plus LoRAFusion's
setting (hidden 4096/5120/8192, r = 16, 8×256 tokens); CPU shapes are scaled down so the
default run fits its time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

OPS = ("linear_fwd", "linear_bwd", "linear_fwdbwd", "ortho_step", "init")
MODES = ("quick", "default", "full")

#: model-wide init cases (``--model``): hidden size, MLP size, layers, rank. ``llama2-7b`` is the
#: 224 matrices of Llama-2-7B (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008 per
#: layer); ``tiny`` is the same layout scaled down (tests, CPU).
MODELS: Dict[str, tuple] = {"llama2-7b": (4096, 11008, 32, 128), "tiny": (64, 172, 2, 8)}


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``params`` by op:

    * linear_*: ``M, K, N, r, p`` (tokens, in, out, rank, dropout), ``compile`` (also time
      ``torch.compile`` of ours), ``tag`` (e.g. ``"LoRAFusion"``);
    * ortho_step: ``layers, d, h, r`` (``layers`` × 7 adapters of a Llama-shaped model);
    * init: ``count, m, n, r`` (a stack of same-shaped weights) or ``model`` (a name in MODELS).
    """
    op: str
    dtype: torch.dtype
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        p, dt = self.params, str(self.dtype).replace("torch.", "")
        if self.op.startswith("linear"):
            s = f"M={p['M']} {p['K']}→{p['N']} r={p['r']} p={p['p']:g} {dt}"
            return s + (f" ({p['tag']})" if p.get("tag") else "")
        if self.op == "ortho_step":
            return f"{p['layers']}x7 adapters {p['d']}/{p['h']} r={p['r']} {dt}"
        if "model" in p:
            d, h, layers, r = MODELS[p["model"]]
            return f"{p['model']}: {7 * layers} matrices r={r} {dt}"
        return f"{p['count']}x {p['m']}x{p['n']} r={p['r']} {dt}"

    def __hash__(self):  # params is a dict: hash the label
        return hash((self.op, self.label))


def _linear(op, dt, shapes, ranks, ps, compile_=False, tag=None) -> List[Case]:
    return [Case(op, dt, dict(M=m, K=k, N=n, r=r, p=p, compile=compile_, tag=tag))
            for (m, k, n) in shapes for r in ranks for p in ps]


def cases(device: torch.device, mode: str = "default", dtype: Optional[torch.dtype] = None,
          ops=OPS, model: Optional[str] = None) -> List[Case]:
    """The cases of ``ops`` for ``device`` in ``mode`` (see the module doc), in run order
    (init last: on a GPU it is the op most likely to hit memory limits). ``model`` adds the
    model-wide init case (and replaces the stack cases of ``init``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"ops must be among {list(OPS)}, got {unknown}")
    if model is not None and model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    gpu = device.type == "cuda"
    dt = dtype or (torch.bfloat16 if gpu else torch.float32)
    out: List[Case] = []
    for op in ("linear_fwd", "linear_bwd", "linear_fwdbwd"):
        if op not in ops:
            continue
        if gpu:
            main = [(8192, 4096, 4096)]
            mlp = [(8192, 4096, 11008), (8192, 11008, 4096)]
            lorafusion = [(2048, h, h) for h in (4096, 5120, 8192)]
            if mode == "quick":
                out += _linear(op, dt, main, [16], [0.0])
            elif mode == "default":
                out += _linear(op, dt, main, [16], [0.0], compile_=op != "linear_bwd")
                out += _linear(op, dt, main, [128], [0.0]) + _linear(op, dt, main, [16, 128], [0.05])
                out += _linear(op, dt, mlp, [16], [0.0])
                if op == "linear_fwdbwd":
                    out += _linear(op, dt, lorafusion, [16], [0.0], tag="LoRAFusion")
            else:
                out += _linear(op, dt, main + mlp, [16, 64, 128], [0.0, 0.05], compile_=op != "linear_bwd")
                out += _linear(op, dt, lorafusion, [16], [0.0, 0.05], tag="LoRAFusion")
        else:
            if mode == "quick":
                out += _linear(op, dt, [(256, 512, 512)], [16], [0.0])
            elif mode == "default":
                out += _linear(op, dt, [(1024, 1024, 1024)], [16, 128], [0.0])
                out += _linear(op, dt, [(1024, 1024, 1024)], [16], [0.05])
            else:
                out += _linear(op, dt, [(1024, 1024, 1024), (1024, 1024, 2752), (1024, 2752, 1024)],
                               [16, 64, 128], [0.0, 0.05])
                if op == "linear_fwdbwd":
                    out += _linear(op, dt, [(2048, 1024, 1024)], [16], [0.0], tag="LoRAFusion, hidden ÷4")
    if "ortho_step" in ops:
        if gpu:  # the goal shape: 32 layers × 7 adapters of Llama-2-7B, r = 128
            dts = [dt] if mode == "quick" else [torch.bfloat16, torch.float32]
            out += [Case("ortho_step", d, dict(layers=32 if mode != "quick" else 4, d=4096, h=11008, r=128)) for d in dts]
        else:  # the CPU goal shape: 448 adapters of 512×512 / 512×1376, r = 16
            out.append(Case("ortho_step", dt, dict(layers=4 if mode == "quick" else 32, d=512, h=1376, r=16)))
            if mode == "full":
                out.append(Case("ortho_step", dt, dict(layers=8, d=1024, h=2752, r=64)))
    if "init" in ops:
        if model is not None:
            out.append(Case("init", dt, dict(model=model)))
        elif gpu:
            # the reference's full SVD costs seconds per matrix on a GPU: the default keeps one stack
            stacks = {"quick": [(2, 4096, 4096, 128)], "default": [(4, 4096, 4096, 128)],
                      "full": [(8, 4096, 4096, 128), (4, 11008, 4096, 128)]}[mode]
            out += [Case("init", dt, dict(count=c, m=m, n=n, r=r)) for c, m, n, r in stacks]
        else:
            stacks = {"quick": [(2, 256, 256, 16)], "default": [(2, 1024, 1024, 64)],
                      "full": [(4, 1024, 1024, 64), (16, 2048, 2048, 64)]}[mode]
            out += [Case("init", dt, dict(count=c, m=m, n=n, r=r)) for c, m, n, r in stacks]
    return out


#: timing plan per mode and device: rounds (interleaved ABAB...) and the minimum work per sample
def plan(device: torch.device, mode: str) -> Dict[str, float]:
    """``rounds`` and ``min_sample_ms`` for ``mode`` on ``device`` (init stacks are single-shot
    per round: each call is already seconds)."""
    if device.type == "cuda":
        return {"rounds": 3 if mode == "quick" else 5, "min_sample_ms": 50.0}
    return {"rounds": 3 if mode == "quick" else 7, "min_sample_ms": 50.0}
