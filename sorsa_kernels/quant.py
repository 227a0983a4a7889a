"""bitsandbytes 4-bit storage for QSORSA (the frozen residual ``W_r`` in NF4 / FP4).

Only this module imports bitsandbytes, lazily: the package works without it and names the
extra (``pip install "sorsa-kernels[quant]"``) when a 4-bit feature is asked for. A 4-bit weight
is a ``bitsandbytes.nn.Params4bit`` (packed uint8 data + its ``QuantState``), as in
``bitsandbytes.nn.Linear4bit``, so models mix with QLoRA tooling and save the same keys.
"""
from __future__ import annotations

import copy
import sys
from typing import Optional, Tuple

import torch
import torch.nn as nn

#: 4-bit formats (bitsandbytes' names): NormalFloat4 (QLoRA's) and a 4-bit float
QUANT_TYPES = ("nf4", "fp4")
#: blocksizes bitsandbytes quantizes with on every device
QUANT_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
MIN_BNB = (0, 45)
#: dtypes bitsandbytes dequantizes to
DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EXTRA_HINT = 'pip install "sorsa-kernels[quant]"'


def require_bnb():
    """Import bitsandbytes (>= 0.45: the first with NF4 on the CPU) or raise naming the extra."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"4-bit (QSORSA) layers need bitsandbytes >= 0.45: {EXTRA_HINT} "
                          f"(import failed: {e})") from e
    ver = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if ver < MIN_BNB:
        raise ImportError(f"4-bit (QSORSA) layers need bitsandbytes >= 0.45, found {bnb.__version__}: {EXTRA_HINT}")
    return bnb


def check_quant_args(quantize: Optional[str], quant_blocksize: int = 64, double_quant: bool = True,
                     quant_iters: int = 0) -> Optional[str]:
    """Validate the 4-bit options of :func:`sorsa_kernels.apply_sorsa`; returns ``quantize``."""
    if quantize is None:
        return None
    if quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {quantize!r}")
    if isinstance(quant_blocksize, bool) or quant_blocksize not in QUANT_BLOCKSIZES:
        raise ValueError(f"quant_blocksize must be one of {QUANT_BLOCKSIZES}, got {quant_blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if isinstance(quant_iters, bool) or not isinstance(quant_iters, int) or quant_iters < 0:
        raise ValueError(f"quant_iters must be an int >= 0, got {quant_iters!r}")
    require_bnb()
    return quantize


def is_params4bit(t) -> bool:
    """Whether ``t`` is a ``bitsandbytes.nn.Params4bit`` (never imports bitsandbytes)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(t, getattr(bnb_nn, "Params4bit", ()))


def is_linear4bit(mod: nn.Module) -> bool:
    """Whether ``mod`` is a ``bitsandbytes.nn.Linear4bit`` (a QLoRA base layer, e.g. from
    ``BitsAndBytesConfig(load_in_4bit=True)``) holding a quantized weight."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return (bnb_nn is not None and isinstance(mod, getattr(bnb_nn, "Linear4bit", ()))
            and is_params4bit(mod.weight))


def _state(param):
    """The weight's QuantState in bitsandbytes' portable layout (a Linear4bit that ran an eval
    forward on an AVX512-BF16 CPU repacks its weight for its CPU kernel: undo that, in place,
    as bitsandbytes' own ``_save_to_state_dict`` does)."""
    qs = getattr(param, "quant_state", None)
    if qs is None:
        raise ValueError("the 4-bit weight has no quant_state (not quantized yet: move its module to a device "
                         "first, as bitsandbytes requires)")
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
        param.data, param.quant_state = _convert_weight_packed_for_cpu_inverse(param.data, qs)
        qs = param.quant_state
    return qs


def check_device(param) -> None:
    """Raise unless the weight's quantization statistics are on its device (bitsandbytes' CUDA
    kernels read them by pointer: a stray CPU absmax is an illegal memory access later, not an error)."""
    qs = _state(param)
    parts = {"absmax": qs.absmax, "code": qs.code}
    if getattr(qs, "state2", None) is not None:
        parts.update({"state2.absmax": qs.state2.absmax, "state2.code": qs.state2.code})
    wrong = {k: str(t.device) for k, t in parts.items() if t is not None and t.device != param.device}
    if wrong:
        raise ValueError(f"the 4-bit weight is on {param.device} but its quant_state tensors are not: {wrong}; move "
                         f"the module with .to(device) (which moves both), not by assigning weight.data")


def weight_shape(param) -> Tuple[int, int]:
    """``(out_features, in_features)`` of a 4-bit weight."""
    return tuple(_state(param).shape)


def weight_dtype(param) -> torch.dtype:
    """The dtype a 4-bit weight was quantized from (what it dequantizes to)."""
    return _state(param).dtype


@torch.no_grad()
def quantize(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True):
    """A frozen ``Params4bit`` holding ``W`` (out×in, on its device) quantized blockwise;
    it dequantizes to ``W``'s dtype. Deterministic: the same ``W`` gives the same bytes."""
    bnb = require_bnb()
    data, qs = bnb.functional.quantize_4bit(W.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type=quant_type)
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, blocksize=blocksize,
                             compress_statistics=double_quant, quant_type=quant_type, bnb_quantized=True)


@torch.no_grad()
def dequantize(param, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The out×in matrix a 4-bit weight stands for, in ``dtype`` (default: its original dtype)."""
    bnb = require_bnb()
    qs = copy.copy(_state(param))
    shape, qs.shape = qs.shape, torch.Size([1, qs.shape.numel()])
    # As one (1, numel) row: bitsandbytes 0.50.2's CPU kernel dequantizes an (m, n) matrix wrongly
    # when n is a multiple of 16 but not of the blocksize and m > 1 (e.g. n = 96, 688 at blocksize
    # 64: relative error 0.26 instead of 0.09 on Gaussian data; its own quantize is right). Blocks
    # run along the flattened matrix either way, so the row is the true result on every device.
    # Two dimensions, not one: that CPU kernel returns (1, numel) for a 1-D shape, which
    # torch.compile's check against the op's fake (1-D) rejects.
    if qs.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        # straight to the compute dtype: one temporary, not two; the same values (bitsandbytes forms
        # code·absmax in fp32 and rounds once). Not when widening: that would skip a rounding
        qs.dtype = dtype
    W = bnb.functional.dequantize_4bit(param.data, qs).reshape(shape)
    return W if dtype is None or W.dtype == dtype else W.to(dtype)


def packed_state(param) -> dict:
    """The QuantState as the tensors bitsandbytes saves under ``<prefix>weight.<key>``."""
    return _state(param).as_dict(packed=True)


def from_packed(data: torch.Tensor, stats: dict, device):
    """A ``Params4bit`` from saved packed data and :func:`packed_state` tensors."""
    bnb = require_bnb()
    return bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device)


def nbytes(param) -> int:
    """Bytes a 4-bit weight occupies: packed data plus its quantization statistics."""
    return param.data.numel() * param.data.element_size() + sum(
        t.numel() * t.element_size() for t in packed_state(param).values())
