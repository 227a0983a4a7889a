"""Benchmark rows of the linear op (``linear_fwd``, ``linear_bwd``, ``linear_fwdbwd``): the cases per
device and mode, and their builder (see :mod:`sorsa_kernels.bench`)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ... import _backend
from ...bench.cases import Case
from ...bench.runners import REF_FORMULA, REF_LAYER, Built, auto_choice, randn, reference_layer
from . import OP, sorsa_linear
from .autotune import linear_case as case_of

OPS = {"linear_fwd": "linear forward", "linear_bwd": "linear backward", "linear_fwdbwd": "linear fwd+bwd"}


def label(case: Case) -> str:
    p, dt = case.params, str(case.dtype).replace("torch.", "")
    s = f"M={p['M']} {p['K']}→{p['N']} r={p['r']} p={p['p']:g} {dt}"
    return s + (f" ({p['tag']})" if p.get("tag") else "")


def _rows(op, dt, shapes, ranks, ps, compile_=False, tag=None) -> List[Case]:
    return [Case(op, dt, dict(M=m, K=k, N=n, r=r, p=p, compile=compile_, tag=tag))
            for (m, k, n) in shapes for r in ranks for p in ps]


def cases(device: torch.device, mode: str, dt: torch.dtype, ops, model: Optional[str]) -> List[Case]:
    """GPU shapes are Llama-2-7B's (hidden 4096, MLP 11008, 8192 tokens per call) plus LoRAFusion's
    setting (hidden 4096/5120/8192, r = 16, 8×256 tokens); CPU shapes are scaled down."""
    out: List[Case] = []
    gpu = device.type == "cuda"
    for op in OPS:
        if op not in ops:
            continue
        if gpu:
            main = [(8192, 4096, 4096)]
            mlp = [(8192, 4096, 11008), (8192, 11008, 4096)]
            lorafusion = [(2048, h, h) for h in (4096, 5120, 8192)]
            if mode == "quick":
                out += _rows(op, dt, main, [16], [0.0])
            elif mode == "default":
                out += _rows(op, dt, main, [16], [0.0], compile_=op != "linear_bwd")
                out += _rows(op, dt, main, [128], [0.0]) + _rows(op, dt, main, [16, 128], [0.05])
                out += _rows(op, dt, mlp, [16], [0.0])
                if op == "linear_fwdbwd":
                    out += _rows(op, dt, lorafusion, [16], [0.0], tag="LoRAFusion")
            else:
                out += _rows(op, dt, main + mlp, [16, 64, 128], [0.0, 0.05], compile_=op != "linear_bwd")
                out += _rows(op, dt, lorafusion, [16], [0.0, 0.05], tag="LoRAFusion")
        else:
            if mode == "quick":
                out += _rows(op, dt, [(256, 512, 512)], [16], [0.0])
            elif mode == "default":
                out += _rows(op, dt, [(1024, 1024, 1024)], [16, 128], [0.0])
                out += _rows(op, dt, [(1024, 1024, 1024)], [16], [0.05])
            else:
                out += _rows(op, dt, [(1024, 1024, 1024), (1024, 1024, 2752), (1024, 2752, 1024)],
                             [16, 64, 128], [0.0, 0.05])
                if op == "linear_fwdbwd":
                    out += _rows(op, dt, [(2048, 1024, 1024)], [16], [0.0], tag="LoRAFusion, hidden ÷4")
    return out


def reference_forward(x, weight, A, S, B, scale, bias=None):
    """sorsa 1.0.1's unmerged forward, our copy: ``F.linear(x, W) + F.linear(x, (B*S)@A)·scale``
    (the dense ``B·diag(S)·A`` rebuilt every call)."""
    result = F.linear(x, weight) + F.linear(x, (B * S) @ A) * scale
    return result if bias is None else result + bias


PEFT_LORA = "PEFT LoRA (lora.Linear)"
PEFT_KASA = "PEFT KaSA (lora.Linear + KaSA)"


def peft_layers(W, A, S, B, scale, drop) -> Dict[str, tuple]:
    """PEFT's own ``lora.Linear`` for plain LoRA and KaSA on the same base weight, rank, scale
    and dropout (what PEFT users run today): name -> (the layer, its trainable params); empty
    without peft. Their adapters hold A and B·diag(S) (LoRA) or A, S, B (KaSA): equal work."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return {}
    try:
        from peft.tuners.lora import KasaConfig
        kinds = ((PEFT_LORA, None), (PEFT_KASA, KasaConfig()))
    except ImportError:  # peft < 0.21: LoRA only
        kinds = ((PEFT_LORA, None),)
    out = {}
    r, (N, K) = A.shape[0], W.shape
    for name, kasa in kinds:
        base = torch.nn.Module()
        base.proj = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            base.proj.weight.copy_(W)
        conf = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=drop, target_modules=["proj"],
                          kasa_config=kasa)
        # adapters in the model's dtype (PEFT's default upcasts bf16 adapters to float32: slower, not its usual run)
        layer = get_peft_model(base, conf, autocast_adapter_dtype=False).base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B if kasa else B * S)
            if kasa:
                layer(torch.zeros(1, K, device=W.device, dtype=W.dtype))  # KaSA's deferred base truncation
                layer.lora_diag["default"].copy_(S)
        out[name] = (layer, [p for p in layer.parameters() if p.requires_grad])
    return out


def build(case: Case, device: torch.device) -> Built:
    """The three linear rows: ours (auto, the other backends, compiled), sorsa 1.0.1, the dense floor."""
    p = case.params
    M, K, N, r, drop = p["M"], p["K"], p["N"], p["r"], p["p"]
    dt, mode = case.dtype, case.op.split("_")[1]
    g = torch.Generator(device=device).manual_seed(0)
    x = randn((M, K), device, dt, g).requires_grad_(mode != "fwd")
    W = randn((N, K), device, dt, g, K ** -0.5)
    A = randn((r, K), device, dt, g, K ** -0.5).requires_grad_()
    S = (randn((r,), device, torch.float32, g).abs() + 0.5).to(dt).requires_grad_()
    B = randn((N, r), device, dt, g, N ** -0.5).requires_grad_()
    dy = randn((M, N), device, dt, g)
    scale = 2.0
    # fwd rows run under no_grad: the inference key, as the timed call will use
    linear_case = lambda: case_of(x.detach(), W, A, None, drop, train=mode != "fwd")  # noqa: E731
    auto = auto_choice(OP, device, linear_case)
    fwds: Dict[str, Callable[[], torch.Tensor]] = {}
    roles: Dict[str, str] = {}
    primary = f"ours[auto:{auto}]"
    fwds[primary] = lambda: sorsa_linear(x, W, A, S, B, scale, dropout_p=drop)
    roles[primary] = "ours"
    for b in _backend.available_backends(OP):
        if b != auto and (b == "torch" or device.type == "cuda"):
            fwds[f"ours[{b}]"] = (lambda b=b: sorsa_linear(x, W, A, S, B, scale, dropout_p=drop, backend=b))
            roles[f"ours[{b}]"] = "other"
    if p.get("compile") and mode != "bwd":
        cf = torch.compile(lambda x, W, A, S, B: sorsa_linear(x, W, A, S, B, scale, dropout_p=drop))
        fwds[primary + "+compile"] = lambda: cf(x, W, A, S, B)
        roles[primary + "+compile"] = "other"
    mod = reference_layer()
    if mod is not None:
        ref = mod.Linear(K, N, r=r, alpha=scale * r, dropout=drop).to(device)
        with torch.no_grad():
            ref.weight = torch.nn.Parameter(W, requires_grad=False)
            ref.sorsa_A, ref.sorsa_S, ref.sorsa_B = (torch.nn.Parameter(t.detach()) for t in (A, S, B))
        ref_params = [ref.sorsa_A, ref.sorsa_S, ref.sorsa_B]
        fwds[REF_LAYER] = lambda: ref(x)
        roles[REF_LAYER] = "ref"
    else:  # no dropout in our copy: it times the p = 0 formula (the reference's dropout is one extra mask)
        ref_params = []
        fwds[REF_FORMULA] = lambda: reference_forward(x, W, A, S, B, scale)
        roles[REF_FORMULA] = "ref"
    peft_params = []
    for kind, (layer, params) in peft_layers(W, A, S, B, scale, drop).items():
        fwds[kind] = lambda layer=layer: layer(x)
        roles[kind] = "peft" if kind == PEFT_LORA else "other"
        peft_params += params
    fwds["floor: dense F.linear"] = lambda: F.linear(x, W)  # with backward: dX only (frozen W)
    roles["floor: dense F.linear"] = "floor"
    extra = {n: {"auto": auto} for n in fwds if n.startswith("ours")}
    grads = [x, A, S, B] + ref_params + peft_params

    def clear():
        for t in grads:
            t.grad = None

    if mode == "fwd":
        def nograd(f):
            def run():
                with torch.no_grad():
                    return f()
            return run
        impls = {n: nograd(f) for n, f in fwds.items()}
    elif mode == "fwdbwd":
        def fb(f):
            def run():
                f().backward(dy)
                clear()
            return run
        impls = {n: fb(f) for n, f in fwds.items()}
    else:  # bwd alone: one forward graph kept, its backward replayed
        def bw(f):
            y = f()

            def run():
                y.backward(dy, retain_graph=True)
                clear()
            return run
        impls = {n: bw(f) for n, f in fwds.items()}
    return Built(impls, roles, primary, extra)


def cross_check(results) -> None:
    """Flag impossible results across cases: a linear forward (or backward) slower than the
    forward+backward of the same case and implementation."""
    full = {(r.case, r.impl): r for r in results if r.op == "linear_fwdbwd" and r.ms}
    for r in results:
        if r.op in ("linear_fwd", "linear_bwd") and r.ms:
            fb = full.get((r.case, r.impl))
            if fb is not None and r.ms_q1 > fb.ms_q3:
                msg = f"! {r.op.split('_')[1]} slower than fwd+bwd (noise)"
                for x in (r, fb):
                    if msg not in x.flags:
                        x.flags.append(msg)
