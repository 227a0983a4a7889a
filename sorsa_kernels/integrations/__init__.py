"""Integrations with other libraries; each submodule imports its library only when used.

* :mod:`sorsa_kernels.integrations.peft` — run PEFT LoRA / KaSA / PiSSA layers through the
  fused SORSA linear op, batched SVD init for PiSSA / KaSA, and the fused orthonormal
  regularizer on PEFT parameters (needs ``pip install peft``).
"""
from __future__ import annotations

import importlib

__all__ = ["peft"]


def __getattr__(name: str):
    # lazy: ``import sorsa_kernels`` must not import peft (an optional dependency)
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
