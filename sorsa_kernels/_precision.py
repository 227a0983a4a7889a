"""Precision settings the package's own computations need, whatever the caller set (a leaf module)."""
from __future__ import annotations

import contextlib

import torch


def _new_api_knobs():
    """The per-backend ``fp32_precision`` settings of torch ≥ 2.9 that allow TF32 (or bf16) for fp32
    work: CUDA matmul, cuDNN convolutions and RNNs, oneDNN matmul."""
    knobs = []
    for path in (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul")):
        obj = torch.backends
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            knobs.append(obj)
    return knobs


@contextlib.contextmanager
def no_tf32():
    """TF32 off for the fp32 GEMMs inside (cuBLAS matmul, cuDNN and torch's matmul precision),
    the caller's settings restored on exit: with Hugging Face's ``tf32=True`` the init GEMMs
    would otherwise lose orthonormality (~1e-3) and ``W_r + scale·B·diag(S)·A`` would not be W.
    Uses the API the caller used: torch refuses to read the legacy flags once the per-backend
    ``fp32_precision`` ones were set (and a legacy read after our new-API write would fail in the
    caller's code), so a caller on the legacy API keeps it and one on the new API gets the new."""
    try:
        legacy = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                  torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the caller set fp32_precision (torch ≥ 2.9's API)
        legacy = None
    if legacy is None:
        knobs = _new_api_knobs()
        saved = [k.fp32_precision for k in knobs]
        try:
            for k in knobs:
                k.fp32_precision = "ieee"
            yield
        finally:
            for k, v in zip(knobs, saved):
                k.fp32_precision = v
        return
    prec, mm, cudnn = legacy
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.allow_tf32 = cudnn
