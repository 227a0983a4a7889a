"""What every op's benchmark builder shares: :class:`Built` (named zero-argument callables on the
public APIs, inputs made on the target device, random normal, never zeros), the role names, the
sorsa 1.0.1 reference loader, and :func:`build`, which hands a case to its op's bench module.

Each implementation has a role: ``ours`` (the package; ``ours[auto:X]`` is what
``backend="auto"`` runs here), ``ref`` (sorsa 1.0.1: the installed package's layer when
importable, else our copy of its formula, and the name says which), ``floor`` (the work the op
cannot avoid, measured in the same run) or ``other``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from .. import _backend
from .cases import Case, module_of


def load_reference_layer():
    """sorsa 1.0.1's ``layer.py`` loaded by file path, or None when sorsa is not installed (its
    package ``__init__`` imports transformers internals that transformers 5 no longer has)."""
    spec = importlib.util.find_spec("sorsa")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "layer.py")
    if not os.path.exists(path):
        return None
    mspec = importlib.util.spec_from_file_location("sorsa_reference_layer", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


_REF = []


def reference_layer():
    """Cached :func:`load_reference_layer` (None when absent or broken)."""
    if not _REF:
        try:
            _REF.append(load_reference_layer())
        except Exception:  # a broken install: fall back to our copy of the formula
            _REF.append(None)
    return _REF[0]


REF_LAYER = "sorsa 1.0.1 (installed layer)"
REF_FORMULA = "sorsa 1.0.1 formula (our copy)"


@dataclass
class Built:
    """A built case: ``impls`` (name → callable), ``roles`` (name → ours/ref/floor/other),
    ``primary`` (the ours row the verdict uses), ``extra`` (name → facts shown per row),
    ``finish`` (after timing: name → extra facts such as σ error), ``single_shot``."""
    impls: Dict[str, Callable[[], object]]
    roles: Dict[str, str]
    primary: str
    extra: Dict[str, dict] = field(default_factory=dict)
    finish: Optional[Callable[[], Dict[str, dict]]] = None
    single_shot: bool = False


def randn(shape, device, dtype, gen, scale=1.0):
    """Random normal (never zeros) made in fp32 on ``device`` and cast: the same values in every dtype."""
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def auto_choice(op: str, device: torch.device, case=None) -> str:
    """The backend ``backend="auto"`` runs for ``op`` on ``device`` (with the dispatcher's timed
    fused-vs-torch choice for ``case`` where the package has one)."""
    if case is not None:
        return _backend.choose(op, "auto", device, case=case)
    return _backend.resolve(op, "auto", device)


def build(case: Case, device: torch.device) -> Built:
    """Allocate and wire up ``case`` on ``device`` (by the bench module of the case's op)."""
    return module_of(case.op).build(case, device)
