"""KaSA init (PEFT's base-weight truncation: drop each weight's r smallest singular components):
PEFT's own ``get_peft_model`` (a float32 ``torch.linalg.svd`` per weight) vs the same call inside
``sk.integrations.peft.fast_svd_init()`` (the r minor triplets from a batched float64 Gram matrix,
``sk.init.svd_bottom``), interleaved rounds on one Llama-shaped model built from a config (random
weights with an LLM-like spectrum do not change the cost of an SVD). Also the error of each
truncation against a float64 SVD's, on the first round.

Run: ``python benchmarks/kasa_init.py [--hidden 1024] [--mlp 2752] [--layers 2] [--r 16] [--rounds 3]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


def main(argv=None) -> None:
    from peft import KasaConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import sorsa_kernels as sk

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=2752)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), vocab_size=256)
    base = LlamaForCausalLM(cfg).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    conf = LoraConfig(r=args.r, target_modules=targets, kasa_config=KasaConfig())
    runs = {"PEFT": lambda m: get_peft_model(m, copy.deepcopy(conf)), "fast_svd_init (ours)": None}

    def ours(m):
        with sk.integrations.peft.fast_svd_init():
            return get_peft_model(m, copy.deepcopy(conf))
    runs["fast_svd_init (ours)"] = ours
    times = {k: [] for k in runs}
    errs = {}
    for rnd in range(args.rounds):
        for name, fn in runs.items():
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            pm = fn(m)
            times[name].append(time.perf_counter() - t0)
            if rnd == 0:
                worst = 0.0
                for mn, mod in pm.named_modules():
                    if hasattr(mod, "lora_diag") and hasattr(mod, "base_layer"):
                        W = base.get_submodule(mn.replace("base_model.model.", "", 1)).weight.double()
                        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                        keep = min(W.shape) - args.r
                        want = (U[:, :keep] * S[:keep]) @ Vh[:keep]
                        worst = max(worst, float((mod.base_layer.weight.double() - want).norm() / want.norm()))
                errs[name] = worst
    n = 7 * args.layers
    print(f"## KaSA init, {n} weights (hidden {args.hidden}, MLP {args.mlp}), r={args.r}, {args.rounds} interleaved "
          f"rounds, torch {torch.__version__}, {os.cpu_count()} cores")
    print("| init | median s | ratio to PEFT (per round) | worst relative error vs float64 truncation |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ratios = [t / p for t, p in zip(ts, times["PEFT"])]
        print(f"| {name} | {statistics.median(ts):.2f} | {min(ratios):.2f}–{max(ratios):.2f} | {errs[name]:.1e} |")


if __name__ == "__main__":
    main()
