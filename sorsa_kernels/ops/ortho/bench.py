"""Benchmark case of the orthonormal regularizer: one step over a Llama-shaped model's adapters."""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

from ...bench.cases import Case
from ...bench.runners import Built, auto_choice
from ...bench.timing import host_ms
from ...regularizer import orthonormal_grad_
from .op import OP
from .reference import calc_ortho_naive

OPS = {"ortho_step": "regularizer step"}


def label(case: Case) -> str:
    p = case.params
    return f"{p['layers']}x7 adapters {p['d']}/{p['h']} r={p['r']} {str(case.dtype).replace('torch.', '')}"


def cases(device: torch.device, mode: str, dt: torch.dtype, ops, model: Optional[str]) -> List[Case]:
    if "ortho_step" not in ops:
        return []
    if device.type == "cuda":  # the GPU goal shape: 32 layers × 7 adapters of Llama-2-7B, r = 128
        dts = [dt] if mode == "quick" else [torch.bfloat16, torch.float32]
        return [Case("ortho_step", d, dict(layers=32 if mode != "quick" else 4, d=4096, h=11008, r=128)) for d in dts]
    # the CPU goal shape: 448 adapters of 512×512 / 512×1376, r = 16
    out = [Case("ortho_step", dt, dict(layers=4 if mode == "quick" else 32, d=512, h=1376, r=16))]
    if mode == "full":
        out.append(Case("ortho_step", dt, dict(layers=8, d=1024, h=2752, r=64)))
    return out


def ortho_bench_case(layers: int = 32, d: int = 512, h: int = 1376, r: int = 16, *, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu", seed: int = 0, gamma: float = 0.5,
                     lr: float = 1.0) -> Dict[str, object]:
    """The regularizer step over a Llama-shaped model's adapters: ``layers`` × {q, k, v, o (d×d),
    gate, up (d→h), down (h→d)} with rank ``r``, i.e. ``14·layers`` adapter matrices.

    Defaults are the CPU goal shape (448 adapters of 512×512 / 512×1376, r = 16); the GPU goal
    is ``d=4096, h=11008, r=128``. Returns ``model`` (an ``nn.ModuleList`` whose modules hold
    ``sorsa_A`` / ``sorsa_B``), ``params`` and zero-argument callables, each one full step with
    grads set to None first (``set_to_none``): ``"ours"`` (``orthonormal_grad_``, backend auto),
    ``"ours[torch]"``, ``"reference"`` (sorsa 1.0.1: ``calc_ortho`` loop + autograd backward of
    ``gamma/lr · reg``), and ``nbytes``: the bytes a step must move (adapters read twice, grads
    written), for a bandwidth floor.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.ModuleList()
    for _ in range(layers):
        for k, n in [(d, d)] * 4 + [(d, h), (d, h), (h, d)]:
            mod = torch.nn.Module()
            mod.sorsa_A = torch.nn.Parameter((torch.randn(r, k, generator=gen) / k ** 0.5).to(device, dtype))
            mod.sorsa_B = torch.nn.Parameter((torch.randn(n, r, generator=gen) / n ** 0.5).to(device, dtype))
            model.append(mod)
    params = [p for p in model.parameters()]

    def clear():
        for p in params:
            p.grad = None

    def ours(backend="auto"):
        clear()
        return orthonormal_grad_(model, gamma, lr, backend=backend)

    def reference():
        clear()
        (gamma / lr * calc_ortho_naive(model.named_parameters())).backward()

    return {"model": model, "params": params, "ours": ours, "ours[torch]": lambda: ours("torch"),
            "reference": reference, "nbytes": sum(p.numel() * p.element_size() for p in params) * 3,
            "label": f"{layers}x7 adapters d={d} h={h} r={r} {str(dtype).replace('torch.', '')}"}


def build(case: Case, device: torch.device) -> Built:
    """One regularizer step: ours (auto, torch), sorsa 1.0.1's calc_ortho + autograd, a copy floor."""
    p = case.params
    c = ortho_bench_case(p["layers"], p["d"], p["h"], p["r"], dtype=case.dtype, device=device)
    auto = auto_choice(OP, device)
    primary = f"ours[auto:{auto}]"
    impls = {primary: c["ours"]}
    roles = {primary: "ours"}
    if auto != "torch":
        impls["ours[torch]"], roles["ours[torch]"] = c["ours[torch]"], "other"
    name = "sorsa 1.0.1 calc_ortho + autograd (our copy)"
    impls[name], roles[name] = c["reference"], "ref"
    # floor: a device copy moving the bytes the step must move (adapters read twice, grads written)
    src = torch.ones(int(c["nbytes"]) // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    impls["floor: copy of the same bytes"] = lambda: dst.copy_(src)
    roles["floor: copy of the same bytes"] = "floor"

    def finish():
        if device.type != "cuda":  # on the CPU host time is the time
            return {}
        return {n: {"host_ms": host_ms(impls[n], device)} for n in impls if roles[n] != "floor"}
    return Built(impls, roles, primary, {primary: {"auto": auto}}, finish)
