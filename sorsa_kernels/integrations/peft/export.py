"""A PEFT model's adapter (LoRA, KaSA, PiSSA, OLoRA) written as a plain PEFT LoRA for the original base."""
from __future__ import annotations

from typing import Dict, Union

import torch
import torch.nn as nn

try:
    from peft.tuners.lora import Linear as LoraLinear
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("sorsa_kernels.integrations.peft needs the 'peft' package (pip install peft)") from exc


@torch.no_grad()
def export_plain_lora(model: nn.Module, out_dir: str, original: Union[nn.Module, Dict[str, torch.Tensor]],
                adapter_name: str = "default", dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Write a PEFT model's adapter (plain LoRA, KaSA, PiSSA, OLoRA) as a plain PEFT LoRA for the
    **original, unmodified** base: ``ΔW = scaling·B·diag(d)·A + (W_now − W_orig)`` with ``d`` =
    ``lora_diag`` (KaSA) or ones. The second term is what the init took out of the base (KaSA's
    dropped r smallest components, PiSSA/OLoRA's principal part), rank ≤ r, factored by an exact
    SVD: the export has rank 2r where it is non-zero, r otherwise (scaling folded into
    ``lora_B``, ``lora_alpha = r``). KaSA adapters cannot be converted by PEFT itself
    (``supports_lora_conversion`` is False) because of that base change; this export carries it.

    Args:
        model: the ``PeftModel`` (adapters unmerged). original: the original base model, or its
            state dict (``<module>.weight`` keys, as the base model names them).
        adapter_name: which adapter. dtype: dtype of the written tensors.

    Returns:
        The rank written per module name.
    """
    import json
    import os

    from safetensors.torch import save_file

    from ...export import lora_config

    sd = original.state_dict() if isinstance(original, nn.Module) else original
    inner = model.base_model.model if hasattr(model, "base_model") and hasattr(model.base_model, "model") else model
    tensors, r_of, problems = {}, {}, []
    for name, mod in inner.named_modules():
        if not isinstance(mod, LoraLinear) or adapter_name not in mod.lora_A:
            continue
        if mod.merged:
            problems.append(f"{name}: merged (unmerge first)")
            continue
        if f"{name}.weight" not in sd and f"{name}.base_layer.weight" not in sd:
            problems.append(f"{name}: no '{name}.weight' in original")
            continue
        W0 = sd.get(f"{name}.weight", sd.get(f"{name}.base_layer.weight")).to(torch.float32)
        W = mod.get_base_layer().weight.to(torch.float32)
        if mod.fan_in_fan_out:
            W0, W = W0.t(), W.t()
        A = mod.lora_A[adapter_name].weight.float()
        B = mod.lora_B[adapter_name].weight.float() * mod.scaling[adapter_name]
        if adapter_name in getattr(mod, "lora_diag", {}):
            B = B * mod.lora_diag[adapter_name].float()
        D = W.to(W0.device) - W0
        if D.abs().max() > 0:
            r = mod.r[adapter_name]
            U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
            A = torch.cat([A.to(W0.device), Vh[:r].float()], 0)
            B = torch.cat([B.to(W0.device), (U[:, :r] * S[:r]).float()], 1)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = A.to(dtype).cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.to(dtype).cpu().contiguous()
        r_of[name] = A.shape[0]
    if problems or not r_of:
        raise ValueError("export_plain_lora: " + ("\n  - ".join([""] + problems) if problems
                                            else f"no lora.Linear layer holds adapter {adapter_name!r}"))
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    fifo = any(getattr(m, "fan_in_fan_out", False) for m in inner.modules() if isinstance(m, LoraLinear))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(lora_config(r_of, fifo), fh, indent=2)
    return r_of
