"""SORSA's orthonormal regularizer and KaSA's auxiliary loss on a PEFT model's LoRA factors, through
the fused regularizer (:mod:`sorsa_kernels.regularizer`)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

try:
    from peft.tuners.lora import LoraLayer
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("sorsa_kernels.integrations.peft needs the 'peft' package (pip install peft)") from exc

from ...regularizer import PEFT_NAMES
from ...regularizer import ortho_loss as _ortho_loss
from ...regularizer import orthonormal_grad_ as _grad_


def _adapter_names(model: nn.Module, adapter_names) -> Optional[List[str]]:
    if adapter_names is None:
        return None
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _factor_pairs(model: nn.Module, adapter_names=None, kasa_only: bool = False):
    """``(layer, adapter, A, B)`` for every 2-D LoRA factor pair of the chosen adapters
    (default: each layer's active adapters)."""
    names = _adapter_names(model, adapter_names)
    out = []
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        for a in (names if names is not None else mod.active_adapters):
            if a not in mod.lora_A or (kasa_only and a not in getattr(mod, "lora_diag", {})):
                continue
            A, B = mod.lora_A[a].weight, mod.lora_B[a].weight
            if A.dim() == 2 and B.dim() == 2:  # Conv factors are 4-D
                out.append((mod, a, A, B))
    return out


def lora_ortho_loss(model: nn.Module, squared: bool = False, *, adapter_names: Union[str, Sequence[str], None] = None,
               backend: str = "auto") -> Optional[torch.Tensor]:
    """SORSA's regularizer on a PEFT model: mean over LoRA factors of ``‖AAᵀ−I‖_F`` (``lora_A``)
    and ``‖BᵀB−I‖_F`` (``lora_B``), differentiable, through :func:`sorsa_kernels.regularizer.ortho_loss`.

    ``adapter_names``: which adapters (default: each layer's active ones). Raises ``ValueError``
    when the model has no LoRA factors.
    """
    pairs = _factor_pairs(model, adapter_names)
    if not pairs:
        raise ValueError("lora_ortho_loss found no PEFT LoRA factors (lora_A / lora_B) in the model"
                         + (f" for adapter_names={adapter_names!r}" if adapter_names is not None else ""))
    return _ortho_loss(None, squared, a=[p[2] for p in pairs], b=[p[3] for p in pairs], backend=backend)


def lora_orthonormal_grad_(model: nn.Module, gamma: float, lr: float, *, squared: bool = False,
                      backend: str = "auto") -> Optional[torch.Tensor]:
    """:func:`sorsa_kernels.orthonormal_grad_` on a PEFT model's ``lora_A`` / ``lora_B`` weights
    (all adapters): adds ``∇ (gamma/lr)·ortho`` to their ``.grad`` before ``optimizer.step()``."""
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    return _grad_(named, gamma, lr, squared=squared, backend=backend, names=PEFT_NAMES)


def kasa_loss(model: nn.Module, adapter_names: Union[str, Sequence[str], None] = None, *,
              backend: str = "auto") -> Union[torch.Tensor, float]:
    """KaSA's auxiliary loss, equal to PEFT's ``LoraModel._get_kasa_loss`` (summed over KaSA
    layers: ``β·Σ lora_diag² + γ·(‖BᵀB−I‖_F + ‖AAᵀ−I‖_F)``, β, γ from each adapter's
    ``KasaConfig``), with the orthogonal term through the fused regularizer (one call per
    adapter). ``model``: the ``PeftModel`` (its ``peft_config`` holds β and γ). Returns 0.0
    without KaSA layers, like PEFT.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(f"model must be a PeftModel (with .peft_config), got {type(model).__name__}")
    names = _adapter_names(model, adapter_names)
    if names is None:
        names = list(getattr(model, "active_adapters", None) or [])
    total: Union[torch.Tensor, float] = 0.0
    for a in names:
        pairs = _factor_pairs(model, [a], kasa_only=True)
        if not pairs:
            continue
        cfg = configs[a].kasa_config
        l2 = sum((mod.lora_diag[a].float() ** 2).sum() for mod, _, _, _ in pairs)
        # the fused loss is the mean over the 2·len(pairs) matrices; KaSA sums them
        ortho = _ortho_loss(None, a=[p[2] for p in pairs], b=[p[3] for p in pairs], backend=backend)
        total = total + cfg.beta * l2 + cfg.gamma * (2 * len(pairs)) * ortho
    return total
