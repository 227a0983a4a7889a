"""The benchmark cases: one source for ``sorsa-kernels bench`` and the pytest-benchmark suites.

A :class:`Case` is a description (op, shape, dtype, dropout...) — nothing is allocated until
its op's bench module builds it (:func:`sorsa_kernels.bench.runners.build`). Each registered op
brings its bench module (``OpSpec.bench``: ``OPS``, ``label``, ``cases``, ``build``, optionally
``MODELS`` and ``cross_check``); :func:`cases` collects the set for a device and a mode:

* ``quick``: CI smoke run (small shapes, few rounds);
* ``default``: what ``sorsa-kernels bench`` runs — the cases that matter most on this hardware,
  sized for ≤ 2 min on a quiet 2-core CPU (on a GPU the size is an estimate: never run there);
* ``full``: a wider sweep (more shapes, ranks, dropout, ``torch.compile`` on a GPU).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import torch

MODES = ("quick", "default", "full")


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``op`` (a row name of some op's bench module, e.g. ``linear_fwd``),
    ``dtype`` and ``params`` (what that module's builder reads; its ``label`` says them)."""
    op: str
    dtype: torch.dtype
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return module_of(self.op).label(self)

    def __hash__(self):  # params is a dict: hash the label
        return hash((self.op, self.label))


def modules() -> List[ModuleType]:
    """The bench modules of the registered ops (``OpSpec.bench``), in registration order."""
    from .. import _backend, ops  # noqa: F401  (importing the ops registers them)
    return [importlib.import_module(sp.bench) for sp in _backend.specs() if sp.bench]


def op_texts() -> Dict[str, str]:
    """Every bench row name -> the words the tables use for it, in run order."""
    return {op: text for m in modules() for op, text in m.OPS.items()}


def module_of(op: str) -> ModuleType:
    for m in modules():
        if op in m.OPS:
            return m
    raise ValueError(f"op must be one of {list(op_texts())}, got {op!r}")


def models() -> Dict[str, tuple]:
    """Model-wide cases (``--model``) the bench modules offer: name -> their shape tuple."""
    return {k: v for m in modules() for k, v in getattr(m, "MODELS", {}).items()}


def cases(device: torch.device, mode: str = "default", dtype: Optional[torch.dtype] = None,
          ops: Optional[Sequence[str]] = None, model: Optional[str] = None) -> List[Case]:
    """The cases of ``ops`` (default: all) for ``device`` in ``mode`` (see the module doc), in
    run order: the ops' registration order (init last: on a GPU it is the op most likely to hit
    memory limits). ``model`` adds a model-wide case (it replaces the stacks of that op)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    known = op_texts()
    ops = list(known) if ops is None else list(ops)
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"ops must be among {list(known)}, got {unknown}")
    if model is not None and model not in models():
        raise ValueError(f"model must be one of {sorted(models())}, got {model!r}")
    dt = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [c for m in modules() for c in m.cases(device, mode, dt, ops, model)]


#: timing plan per mode and device: rounds (interleaved ABAB...) and the minimum work per sample
def plan(device: torch.device, mode: str) -> Dict[str, float]:
    """``rounds`` and ``min_sample_ms`` for ``mode`` on ``device`` (init stacks are single-shot
    per round: each call is already seconds)."""
    if device.type == "cuda":
        return {"rounds": 3 if mode == "quick" else 5, "min_sample_ms": 50.0}
    return {"rounds": 3 if mode == "quick" else 7, "min_sample_ms": 50.0}
