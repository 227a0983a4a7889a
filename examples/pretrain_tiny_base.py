"""Pretrain the tiny byte-level Llama shipped in ``examples/assets/tiny_base/`` (CPU, no downloads).

It is the "pre-trained model" of ``examples/spectral_figure.py``: its weights have trained
spectra (a random init has none worth analysing) and it is small enough to commit (3.3 MB, float32).

* Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` — bytes as tokens (vocabulary 256), 4
  layers, hidden 128, MLP 344, 4 heads, tied input/output embeddings; 824 448 parameters.
* Corpus: the top-level ``*.py`` files of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``), sorted by name, concatenated; the last 5 % is held out.
  It is on every machine with Python, but differs between Python versions: the shipped weights
  were made from CPython 3.11.7's (168 files, 4 698 722 bytes joined; its sha256 is in
  ``pretrain.json`` next to the weights).
* Training: AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1, gradient clip 1.0), 5 % linear
  warm-up then cosine decay to 10 %, batches of 16 random 256-byte windows drawn from a seeded
  generator. Deterministic on one machine at one thread count (two runs of the first 20 steps
  gave identical files); other CPUs may round float32 reductions differently, so a re-run there
  need not give the same bytes.

Made with ``python examples/pretrain_tiny_base.py`` (default settings: 600 steps, one thread) on
a 2-core CPU shared with other jobs: 15.3 minutes of wall time (0.7–1 s a step, with one stall);
held-out loss 5.463 (init) → 1.427 nats per byte. The shipped ``model.safetensors`` has sha256
:data:`SHIPPED_SHA256`, also recorded with the run's settings in ``pretrain.json``
(``tests/integrations/test_spectral_example.py`` checks both, and the held-out loss).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from typing import List, Tuple

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "assets", "tiny_base")
SHIPPED_SHA256 = "42dc5df9251bc68695a0b499ae049c2d9b7f4b8b08db475907a57af36c825487"


def tiny_config() -> LlamaConfig:
    """The shipped model's architecture (byte vocabulary, no special tokens)."""
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def corpus_files(stdlib: str = None) -> List[str]:
    """The pretraining files: the standard library's top-level modules, sorted (reproducible order)."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(stdlib, f) for f in os.listdir(stdlib) if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library folder {stdlib!r}")
    return files


def load_corpus(files: List[str], heldout: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, held-out bytes, sha256 of the whole corpus) as uint8 tensors."""
    data = b"\n\n".join(open(f, "rb").read() for f in files)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    cut = int(len(ids) * (1 - heldout))
    return ids[:cut], ids[cut:], hashlib.sha256(data).hexdigest()


def batch(ids: torch.Tensor, n: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``seq`` bytes as int64 token ids."""
    starts = torch.randint(0, len(ids) - seq, (n,), generator=g)
    return torch.stack([ids[s:s + seq] for s in starts.tolist()]).long()


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, ids: torch.Tensor, seq: int = 256, windows: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows`` evenly spaced windows of ``ids``."""
    model.eval()
    step = max(1, (len(ids) - seq) // windows)
    x = torch.stack([ids[s:s + seq] for s in range(0, step * windows, step)]).long()
    loss = sum(model(input_ids=x[i:i + 16], labels=x[i:i + 16]).loss.item() * len(x[i:i + 16])
               for i in range(0, len(x), 16)) / len(x)
    model.train()
    return loss


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup``·steps, then cosine decay to ``floor``·lr."""
    w = max(1, int(steps * warmup))
    if step < w:
        return lr * (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the same float32 reduction order run to run, and no "
                         "slowdown when the cores are shared)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _pretrain(args, argv)
    finally:
        torch.set_num_threads(threads)


def _pretrain(args: argparse.Namespace, argv) -> dict:
    files = corpus_files()
    train, held, corpus_sha = load_corpus(files)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(tiny_config())
    g = torch.Generator().manual_seed(args.seed)
    # no weight decay on norms (1-D): they are gains, not weights to shrink
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    init_loss = heldout_loss(model, held)
    print(f"corpus: {len(files)} files, {len(train) + len(held)} bytes, sha256 {corpus_sha[:16]}…; "
          f"held-out loss at init {init_loss:.3f}")
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        x = batch(train, args.batch, args.seq, g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  train loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)
    minutes = (time.time() - t0) / 60
    final = heldout_loss(model, held)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    info = {"command": " ".join(["python examples/pretrain_tiny_base.py"] + list(sys.argv[1:] if argv is None else argv)),
            "python": platform.python_version(), "torch": torch.__version__, "corpus_files": len(files),
            "corpus_bytes": len(train) + len(held), "corpus_sha256": corpus_sha, "steps": args.steps,
            "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed, "threads": args.threads,
            "heldout_loss_init": round(init_loss, 4), "heldout_loss": round(final, 4),
            "train_minutes": round(minutes, 2),
            "model_sha256": sha256_of(os.path.join(args.out, "model.safetensors"))}
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
