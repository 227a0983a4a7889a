"""Precision settings the package's own computations need, whatever the caller set (a leaf module)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def no_tf32():
    """TF32 off for the fp32 GEMMs inside (cuBLAS matmul, cuDNN and torch's matmul precision),
    the caller's settings restored on exit: with Hugging Face's ``tf32=True`` the init GEMMs
    would otherwise lose orthonormality (~1e-3) and ``W_r + scale·B·diag(S)·A`` would not be W."""
    prec = torch.get_float32_matmul_precision()
    mm, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.allow_tf32 = cudnn
