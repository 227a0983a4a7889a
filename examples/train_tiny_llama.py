"""Fine-tune a tiny LlamaForCausalLM with Hugging Face's Trainer, two ways (CPU, no downloads):

* ``--method sorsa``: SORSA layers (``sk.apply_sorsa``) + the orthonormal regularizer
  (``sk.SORSACallback``); ends with ``sk.save_adapter`` and ``sk.export_lora`` (a PEFT LoRA of
  rank 2r for the original base).
* ``--method kasa``: PEFT's KaSA (``LoraConfig(kasa_config=KasaConfig())``) with its SVD
  truncation batched (``fast_svd_init``), the adapter branch on the fused op (``accelerate``) and
  KaSA's auxiliary loss through the fused regularizer (``kasa_loss``); ends with PEFT's
  ``save_pretrained`` (KaSA adapters are PEFT files already) and ``export_lora`` (a plain LoRA
  for the original base).

Both check at the end that the exported LoRA, loaded by the real ``peft`` onto the original base,
reproduces the fine-tuned model. Run: ``python examples/train_tiny_llama.py --method both``.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from typing import Dict, List

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import sorsa_kernels as sk

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ = 96, 24


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama built from a config (random weights: stands in for a checkpoint)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 256, seed: int = 1) -> List[Dict[str, torch.Tensor]]:
    """Sequences of an affine recurrence t ← (a·t + b) mod V, (a, b) per sequence: learnable
    from the context, so the loss falls quickly."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b, t = (int(v) for v in torch.randint(1, VOCAB, (3,), generator=g))
        ids = []
        for _ in range(SEQ):
            ids.append(t)
            t = (a * t + b) % VOCAB
        ids = torch.tensor(ids)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def training_args(out_dir: str, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=max(1, steps // 5),
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)


def first_last_loss(trainer: Trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[0], losses[-1]


def check_export(original: torch.nn.Module, tuned: torch.nn.Module, lora_dir: str) -> float:
    """Max |logits| difference between the fine-tuned model and the exported LoRA loaded by peft
    onto the original base."""
    from peft import PeftModel

    ids = torch.stack([d["input_ids"] for d in dataset(4, seed=7)])
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), lora_dir).eval()
    tuned.eval()
    with torch.no_grad():
        return (loaded(ids).logits - tuned(ids).logits).abs().max().item()


def run_sorsa(out_dir: str, steps: int = 30, r: int = 4) -> dict:
    model = tiny_llama()
    original = copy.deepcopy(model)
    sk.apply_sorsa(model, TARGETS, r=r, alpha=r, match="peft")
    sk.mark_only_sorsa_trainable(model)
    sk.save_adapter(model, os.path.join(out_dir, "initial_adapter"))  # right after init
    trainer = Trainer(model=model, args=training_args(os.path.join(out_dir, "trainer"), steps),
                      train_dataset=dataset(), callbacks=[sk.SORSACallback(gamma=4e-4)])
    trainer.train()
    sk.save_adapter(model, os.path.join(out_dir, "adapter"))
    lora_dir = os.path.join(out_dir, "lora")
    sk.export_lora(model, lora_dir, initial_adapter=os.path.join(out_dir, "initial_adapter"))
    first, last = first_last_loss(trainer)
    return {"method": "sorsa", "first_loss": first, "last_loss": last,
            "export_max_abs_diff": check_export(original, model, lora_dir), "dir": out_dir}


class KasaTrainer(Trainer):
    """Trainer adding KaSA's auxiliary loss (β·Σ diag² + γ·orthogonal term, PEFT's
    ``_get_kasa_loss``) through the fused regularizer."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from sorsa_kernels.integrations.peft import kasa_loss

        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = loss + kasa_loss(model)
        return (loss, outputs) if return_outputs else loss


def run_kasa(out_dir: str, steps: int = 30, r: int = 4) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import KasaConfig

    from sorsa_kernels.integrations import peft as skp

    model = tiny_llama()
    original = copy.deepcopy(model)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, lora_dropout=0.05, kasa_config=KasaConfig())
    with skp.fast_svd_init():  # KaSA's base truncations, batched by weight shape
        model = get_peft_model(model, config)
    report = skp.accelerate(model)
    trainer = KasaTrainer(model=model, args=training_args(os.path.join(out_dir, "trainer"), steps),
                          train_dataset=dataset())
    trainer.train()
    model.save_pretrained(os.path.join(out_dir, "adapter"))  # PEFT's own KaSA adapter files
    lora_dir = os.path.join(out_dir, "lora")
    skp.export_plain_lora(model, lora_dir, original)
    first, last = first_last_loss(trainer)
    return {"method": "kasa", "first_loss": first, "last_loss": last, "accelerated": len(report.accelerated),
            "export_max_abs_diff": check_export(original, model, lora_dir), "dir": out_dir}


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["sorsa", "kasa", "both"], default="both")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="sorsa_example_")
    runs = {"sorsa": run_sorsa, "kasa": run_kasa}
    results = []
    for m in (["sorsa", "kasa"] if args.method == "both" else [args.method]):
        res = runs[m](os.path.join(out, m), steps=args.steps)
        print(res)
        results.append(res)
    return results


if __name__ == "__main__":
    main()
