"""Deployment: :func:`merge_and_unload` (plain ``nn.Linear`` / ``Conv1D``) and
:func:`export_lora` (a PEFT-format LoRA adapter that any LoRA-aware loader or server reads).

Which export to use:

* ``kind="delta"`` (default, rank 2r): ``ΔW = scale·(B·diag(S)·A − B0·diag(S0)·A0)`` on the
  **original, unmodified** base weights — the way PEFT converts PiSSA adapters. Right when the
  adapter is served on the stock base checkpoint (LoRA servers, several adapters on one base).
* ``kind="residual"`` (rank r): ``scale·B·diag(S)·A`` with σ folded into ``lora_B``, on a base
  whose targeted weights are replaced by ``W_r`` (written next to it as
  ``residual_weights.safetensors``). Right when you ship that residual base yourself, e.g. for
  several adapters trained from the same init; half the adapter size.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import quant
from .adapters import _INIT_PARTS, named_sorsa_layers, read_adapter
from .layer import SORSALinear

EXPORT_KINDS = ("delta", "residual")
RESIDUAL_FILE = "residual_weights.safetensors"


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every SORSA layer by a plain ``nn.Linear`` (a transformers ``Conv1D`` for
    :class:`~sorsa_kernels.SORSAConv1D`) holding the merged weight ``W_r + scale·B·diag(S)·A``
    (summed in float32, stored in the weight's original dtype, frozen as the base was) and the
    same bias, on the same device. Returns ``model`` (modified in place), as PEFT does."""
    replaced: Dict[int, nn.Module] = {}
    sites = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, SORSALinear) and n]
    if any(quant.is_params4bit(m.weight) for _, m in sites):
        warnings.warn("merge_and_unload: 4-bit SORSA layers give dequantized merged weights in the dtype they were "
                      "quantized from; they carry the residual's quantization error (relative ~0.1 of W_r's norm "
                      "for NF4), so they are not the full-precision base plus the adapter update: for that, apply "
                      "sk.export_lora(kind='delta') to the original base", UserWarning, stacklevel=2)
    for name, layer in sites:
        if id(layer) not in replaced:
            W = layer.effective_weight().to(layer.weight_dtype)  # = what merge() stores (4-bit: dequantized)
            if layer.fan_in_fan_out:
                from transformers.pytorch_utils import Conv1D

                new = Conv1D(layer.out_features, layer.in_features).to(device="meta")
                new.weight = nn.Parameter(W.T.contiguous(), requires_grad=False)
            else:
                new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                device="meta", dtype=layer.weight_dtype)
                new.weight = nn.Parameter(W, requires_grad=False)
            if layer.bias is not None:
                new.bias = nn.Parameter(layer.bias.detach(), requires_grad=layer.bias.requires_grad)
            replaced[id(layer)] = new
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, replaced[id(layer)])
    return model


def lora_config(r_of: Dict[str, int], fan_in_fan_out: bool) -> dict:
    ranks = sorted(set(r_of.values()))
    r = ranks[0]
    pattern = {} if len(ranks) == 1 else {n: k for n, k in r_of.items() if k != r}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": r, "lora_alpha": r,  # scaling = alpha / r = 1: the scale is folded into lora_B
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(r_of), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


@torch.no_grad()
def export_lora(model: nn.Module, out_dir: str, initial_adapter: Optional[str] = None,
                kind: str = "delta", dtype: torch.dtype = torch.float32) -> None:
    """Write ``model``'s SORSA adapters as a PEFT LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``, keys ``base_model.model.<name>.lora_A.weight`` /
    ``lora_B.weight``), loadable with ``peft.PeftModel.from_pretrained(base, out_dir)``.

    Args:
        kind: "delta" (rank 2r, on the original base weights; ``lora_A = [A; A0]``,
            ``lora_B = scale·[B·diag(S), −B0·diag(S0)]``) or "residual" (rank r, on a base with
            ``W_r`` in place of each targeted weight, also written to ``residual_weights.safetensors``
            under the base model's parameter names). See the module docstring for when each is right.
        initial_adapter: directory written by :func:`sorsa_kernels.save_adapter` (any time after
            init: it holds the initial adapter); default: the initial adapter the layers keep.
        dtype: dtype of the LoRA tensors (float32 by default: the products are formed in
            float32, float64 for float64 weights).

    Only the weight update is exported: bias changes (if biases were trained) are not.
    """
    from safetensors.torch import save_file

    if kind not in EXPORT_KINDS:
        raise ValueError(f"kind must be one of {EXPORT_KINDS}, got {kind!r}")
    layers = named_sorsa_layers(model)
    if not layers:
        raise ValueError("export_lora: the model has no SORSA layer with r >= 1")
    saved = read_adapter(initial_adapter)[1] if initial_adapter is not None else None
    tensors, residual, r_of = {}, {}, {}
    problems = []
    for name, m in layers:
        if kind == "delta":
            if saved is not None:
                keys = [f"{name}.{p}" for p in _INIT_PARTS]
                if not all(k in saved for k in keys):
                    problems.append(f"{name}: not in {initial_adapter}")
                    continue
                init = tuple(saved[k].to(m.sorsa_A.device) for k in keys)
            else:
                init = m.initial_adapter()
                if init is None:
                    problems.append(f"{name}: initial adapter unknown (pass initial_adapter=PATH)")
                    continue
            A0, S0, B0 = init
            if (A0.shape, S0.shape, B0.shape) != (m.sorsa_A.shape, m.sorsa_S.shape, m.sorsa_B.shape):
                problems.append(f"{name}: initial adapter shapes {tuple(A0.shape)}, {tuple(B0.shape)} differ "
                                f"from the layer's {tuple(m.sorsa_A.shape)}, {tuple(m.sorsa_B.shape)}")
                continue
        work = m._work(m.weight_dtype)
        f = lambda t: t.to(work)  # noqa: E731
        lora_A = f(m.sorsa_A)
        lora_B = m.scale * f(m.sorsa_B) * f(m.sorsa_S)
        if kind == "delta":
            lora_A = torch.cat([lora_A, f(A0)], 0)
            lora_B = torch.cat([lora_B, -m.scale * f(B0) * f(S0)], 1)
        else:
            W_r = m.residual_weight()
            residual[f"{name}.weight"] = (W_r.T if m.fan_in_fan_out else W_r).cpu().contiguous().clone()
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = lora_A.to(dtype).cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora_B.to(dtype).cpu().contiguous()
        r_of[name] = lora_A.shape[0]
    if problems:
        raise ValueError("export_lora:\n  - " + "\n  - ".join(problems))
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    if residual:
        save_file(residual, os.path.join(out_dir, RESIDUAL_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(lora_config(r_of, any(m.fan_in_fan_out for _, m in layers)), fh, indent=2)
