"""A training step of a tiny Llama with PEFT LoRA (q/k/v/o/gate/up/down), PEFT's own forward vs the
same model after ``sk.integrations.peft.accelerate`` (backend "auto" and "torch"), and our
``apply_sorsa`` model — interleaved rounds, median and IQR of the per-round ratios (time ÷ PEFT's).

Run: ``python benchmarks/peft_step.py [--rounds 21] [--steps 30] [--dropout 0.05]``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sorsa_kernels as sk
from sorsa_kernels.integrations.peft import accelerate

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def models(dropout: float):
    peft = get_peft_model(base(), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    auto, forced = copy.deepcopy(peft), copy.deepcopy(peft)
    accelerate(auto, backend="auto", warn=False)
    accelerate(forced, backend="torch", warn=False)
    ours = sk.apply_sorsa(base(), TARGETS, r=8, alpha=16, dropout=dropout)
    sk.mark_only_sorsa_trainable(ours)
    return {"PEFT LoRA": peft, "accelerate(auto)": auto, "accelerate(torch op)": forced, "SORSA (ours)": ours}


def step_fn(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dropout", type=float, default=0.0)
    a = ap.parse_args(argv)
    batch = torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(1))
    steps = {name: step_fn(m, batch) for name, m in models(a.dropout).items()}
    for f in steps.values():  # warm-up
        for _ in range(3):
            f()
    times = {n: [] for n in steps}
    for _ in range(a.rounds):
        for n, f in steps.items():
            t = time.perf_counter()
            for _ in range(a.steps):
                f()
            times[n].append((time.perf_counter() - t) / a.steps * 1e3)
    ref = times["PEFT LoRA"]
    print(f"tiny Llama (4 layers, hidden 64, 28 adapted linears), batch 16x24, dropout {a.dropout}, "
          f"{torch.get_num_threads()} threads; {a.rounds} interleaved rounds x {a.steps} steps")
    for n, ts in times.items():
        r = sorted(t / b for t, b in zip(ts, ref))
        q = statistics.quantiles(r, n=4)
        print(f"  {n:<22} {statistics.median(ts):7.2f} ms/step   time / PEFT's: {statistics.median(r):.2f} "
              f"(IQR {q[0]:.2f}-{q[2]:.2f})")


if __name__ == "__main__":
    main()
