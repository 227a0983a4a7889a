"""QSORSA numbers for BENCHMARKS.md: (1) per-weight error of the 4-bit residual vs QLoRA's 4-bit
weight on real pretrained weights (examples/assets/tiny_base: 28 projections), (2) bytes, measured
on that model and by arithmetic for Llama-2-7B, (3) a CPU training step, QSORSA vs PEFT QLoRA
(LoRA on bitsandbytes Linear4bit) on the same model, interleaved rounds, median and IQR of the
per-round ratios (time ÷ PEFT QLoRA's).

Run: ``python benchmarks/qsorsa.py [--r 16] [--rounds 11] [--steps 10]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn as nn

import sorsa_kernels as sk
from sorsa_kernels import quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "assets", "tiny_base")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def load():
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def errors(r: int, blocksize: int = 64):
    base = load()
    W = {n: m.weight.detach().clone() for n, m in base.named_modules()
         if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS}
    out = {}
    for iters in (0, 2):
        for qt in ("nf4", "fp4"):
            m = sk.apply_sorsa(copy.deepcopy(base), TARGETS, r=r, quantize=qt, quant_iters=iters, match="peft",
                               init="svd", quant_blocksize=blocksize)
            mods = dict(m.named_modules())
            ratios = [rel(mods[n].effective_weight(), w) / rel(quant.dequantize(quant.quantize(w, qt, blocksize)), w)
                      for n, w in W.items()]
            out[(qt, iters)] = ratios
    return W, out


def to_linear4bit(model, quant_type="nf4"):
    """QLoRA's base: every target nn.Linear replaced by a bitsandbytes Linear4bit (quantized on .to)."""
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            l4 = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                   compute_dtype=torch.float32, quant_type=quant_type)
            l4.load_state_dict(mod.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, l4.to("cpu"))
    return model


def step_models(r: int):
    from peft import LoraConfig, get_peft_model
    qlora = get_peft_model(to_linear4bit(load()), LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    qsorsa = sk.apply_sorsa(load(), TARGETS, r=r, alpha=r, quantize="nf4", match="peft")
    sk.mark_only_sorsa_trainable(qsorsa)
    # (model, with the regularizer): QSORSA with and without it, so the like-for-like row is visible
    return {"PEFT QLoRA": (qlora, False), "QSORSA, no regularizer": (qsorsa, False),
            "QSORSA + regularizer (ours)": (qsorsa, True)}


def timed_steps(model, batch, steps: int, regularize: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    reg = sk.SORSARegularizer(model, gamma=4e-4, lr=opt) if regularize else None
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if reg is not None:
            reg.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def llama7b_bytes(r: int) -> dict:
    """Llama-2-7B by arithmetic: 32 layers of q/k/v/o (4096²) and gate/up (11008×4096), down (4096×11008);
    embeddings + lm_head 2 × 32000×4096 and the norms stay bf16. NF4 with double quant: 4 bits per weight,
    one 8-bit absmax per 64 weights and one fp32 scale per 256 absmax (bitsandbytes' nested statistics)."""
    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    lin = 32 * sum(o * i for o, i in shapes)
    other = 2 * 32000 * 4096 + 32 * 2 * 4096 + 4096
    nf4 = lin * (0.5 + 1 / 64 + 4 / (64 * 256))
    adapters = 32 * sum((o + i + 1) * r for o, i in shapes)
    return {"bf16": 2 * (lin + other), "qsorsa": nf4 + 2 * (other + adapters), "adapters_bf16": 2 * adapters}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    W, errs = errors(args.r)
    print(f"## error of the 4-bit weight, ratio QSORSA / QLoRA per weight ({len(W)} weights of {TINY}, r={args.r}, "
          f"blocksize 64, double quant)")
    print("| format | quant_iters | min | median | max | weights below QLoRA |")
    print("|---|---|---|---|---|---|")
    for (qt, iters), rs in errs.items():
        print(f"| {qt} | {iters} | {min(rs):.3f} | {statistics.median(rs):.3f} | {max(rs):.3f} | "
              f"{sum(x < 1 for x in rs)}/{len(rs)} |")

    model = sk.apply_sorsa(load(), TARGETS, r=args.r, quantize="nf4", match="peft")
    layers = [m for m in model.modules() if isinstance(m, sk.SORSALinear4bit)]
    q_bytes = sum(quant.nbytes(m.weight) for m in layers)
    fp32_bytes = sum(m.in_features * m.out_features * 4 for m in layers)
    print(f"\n## bytes of the {len(layers)} targeted weights (tiny base): 4-bit residual {q_bytes:,} B = "
          f"{q_bytes / fp32_bytes:.4f}x fp32, {2 * q_bytes / fp32_bytes:.4f}x bf16")
    b7 = llama7b_bytes(args.r)
    print(f"Llama-2-7B by arithmetic (r={args.r}): bf16 {b7['bf16'] / 2**30:.2f} GiB; QSORSA NF4 residual + bf16 "
          f"embeddings, norms and adapters {b7['qsorsa'] / 2**30:.2f} GiB (adapters {b7['adapters_bf16'] / 2**30:.3f} GiB)")

    ms = step_models(args.r)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 128), generator=g)
    for m, reg in ms.values():
        timed_steps(m, batch, 2, reg)  # warm-up
    times = {k: [] for k in ms}
    for _ in range(args.rounds):
        for k, (m, reg) in ms.items():
            times[k].append(timed_steps(m, batch, args.steps, reg))
    ref = times["PEFT QLoRA"]
    print(f"\n## CPU training step (batch 4x128, r={args.r}, AdamW), "
          f"{args.rounds} interleaved rounds of {args.steps} steps, torch {torch.__version__}, {os.cpu_count()} cores")
    print("| model | median ms/step | ratio to PEFT QLoRA (median) | IQR of ratio |")
    print("|---|---|---|---|")
    for k, ts in times.items():
        ratios = sorted(t / r0 for t, r0 in zip(ts, ref))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(f"| {k} | {1e3 * statistics.median(ts):.1f} | {statistics.median(ratios):.3f} | {q[0]:.3f}–{q[2]:.3f} |")


if __name__ == "__main__":
    main()
