"""The SORSA paper's ΔΣ/ΔD figure in miniature: SORSA, LoRA, PiSSA and full fine-tuning of the same
layers of a small pre-trained model on the same data, their spectral shift recorded as they train.

* Base: the tiny byte-level Llama shipped in ``examples/assets/tiny_base/`` (pretrained on Python
  source code by ``examples/pretrain_tiny_base.py``).
* Downstream data, another domain: English prose, the Python language reference's topic texts
  that ship with every CPython (``pydoc_data.topics``, the text of ``help("TOPIC")``), sorted by
  topic, UTF-8 bytes; the last 10 % of the topics is held out.
* The same layers (q/k/v/o/gate/up/down of all 4 layers: 28 weights), steps, batches (one seeded
  sequence of windows, identical for every method), AdamW with no weight decay and a cosine
  schedule with 3 % warm-up, as the paper's scripts. Learning rates keep the paper's proportions
  (its scripts: LoRA and PiSSA 2e-5, SORSA 3e-5 with γ = 4e-4 divided by the initial lr; none
  for full fine-tuning), scaled up for a 128-wide model and a few hundred steps: LoRA, PiSSA and
  full fine-tuning ``--lr`` (1e-3), SORSA 1.5× that with γ = 4e-4; rank ``--rank`` (8) with
  α = r (scale 1) for every adapter.
  SORSA: ``sk.apply_sorsa`` + ``sk.SORSARegularizer(gamma, "initial")``; LoRA and PiSSA: PEFT
  (PiSSA's SVD through ``sk.integrations.peft.fast_svd_init``); full fine-tuning: only those 28
  weights trainable.
* Every ``--record-every`` steps ``sk.SpectralTracker`` records ΔΣ and ΔD of the 28 weights
  against the shipped base (its SVD computed once, kept in ``OUT/svd_cache``); each method's
  trajectory is written as ``OUT/<method>.json`` (the schema of ``sorsa-kernels analyze --json``)
  and all four as one figure by ``sorsa_kernels.analysis.plot_shift`` (what ``analyze --plot
  --compare`` draws), its panels on shared axes (``share_axes=True``) so the distances compare.

Run (the picture in docs/usage.md)::

    python examples/spectral_figure.py --plot docs/img/spectral_shift.png

One CPU thread by default: reproducible run to run (two default runs printed the same table) and
no slowdown when the cores are shared; the default run took 3.5 minutes on a shared 2-core CPU
(its table is in docs/usage.md). ``--quick`` is the test's setting (seconds of training). At the end a table: per method the
mean ΔΣ and ΔD at the last step, the held-out loss on the new domain (prose) before → after, and
on the old one (the base's held-out Python code: what was forgotten).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import tempfile
import time
from typing import Dict, List, Tuple

import torch
from transformers import LlamaForCausalLM

import sorsa_kernels as sk
from sorsa_kernels import analysis

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_DIR = os.path.join(HERE, "assets", "tiny_base")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("sorsa", "lora", "pissa", "ft")
TITLES = {"sorsa": "SORSA", "lora": "LoRA", "pissa": "PiSSA", "ft": "Full FT (same layers)"}
GAMMA = 4e-4  # the paper's γ (its scripts divide it by the initial lr)
SORSA_LR_RATIO = 1.5  # the paper's scripts: SORSA 3e-5 against 2e-5 for LoRA / PiSSA


def _pretrain_module():
    """examples/pretrain_tiny_base.py (corpus and loss helpers shared with the base's pretraining)."""
    spec = importlib.util.spec_from_file_location("pretrain_tiny_base", os.path.join(HERE, "pretrain_tiny_base.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prose(heldout: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) UTF-8 bytes of the language reference's topics (``pydoc_data.topics``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data off the standard library
        raise FileNotFoundError("this example's fine-tuning text is the standard library's pydoc_data.topics, "
                                "missing from this Python") from exc
    keys = sorted(topics)
    cut = int(len(keys) * (1 - heldout))

    def encode(ks: List[str]) -> torch.Tensor:
        return torch.frombuffer(bytearray("\n\n".join(topics[k] for k in ks).encode()), dtype=torch.uint8)

    return encode(keys[:cut]), encode(keys[cut:])


def load_base(path: str = BASE_DIR) -> LlamaForCausalLM:
    """The shipped pre-trained model, float32, in training mode (no dropout in this config)."""
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"no model.safetensors in {path!r}: run examples/pretrain_tiny_base.py --out {path}")
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def target_weight_names(model: torch.nn.Module) -> List[str]:
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]


def prepare(method: str, base: LlamaForCausalLM, rank: int) -> Tuple[torch.nn.Module, List[torch.nn.Parameter]]:
    """(model to train, its trainable parameters) for one method, from a copy of ``base``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model = copy.deepcopy(base)
    if method == "sorsa":
        sk.apply_sorsa(model, TARGETS, r=rank, alpha=rank, match="peft")
        sk.mark_only_sorsa_trainable(model)
        return model, list(sk.sorsa_parameters(model))
    if method in ("lora", "pissa"):
        from peft import LoraConfig, get_peft_model

        from sorsa_kernels.integrations import peft as skp

        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                            init_lora_weights="pissa" if method == "pissa" else True)
        if method == "pissa":
            with skp.fast_svd_init():  # PiSSA's SVDs, batched by weight shape
                model = get_peft_model(model, config)
        else:
            torch.manual_seed(0)  # LoRA's A: kaiming-uniform from the global generator
            model = get_peft_model(model, config)
        return model, [p for p in model.parameters() if p.requires_grad]
    names = set(target_weight_names(model))  # full fine-tuning of the same layers, nothing else
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    return model, params


def cosine_warmup(step: int, steps: int, warmup: float = 0.03) -> float:
    """The paper's schedule (``get_cosine_schedule_with_warmup``, 3 % warm-up) as a factor of the lr."""
    w = max(1, math.ceil(steps * warmup))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def run_method(method: str, base: LlamaForCausalLM, data: Dict[str, torch.Tensor], args: argparse.Namespace,
               out: str, heldout_loss) -> dict:
    """Fine-tune one method, recording its spectral shift; returns its numbers (and the model)."""
    t0 = time.time()
    model, params = prepare(method, base, args.rank)
    lr = args.lr * (SORSA_LR_RATIO if method == "sorsa" else 1.0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_warmup(s, args.steps))
    reg = sk.SORSARegularizer(model, GAMMA, "initial", optimizer=opt) if method == "sorsa" else None
    tracker = sk.SpectralTracker(model, base=args.base, names=TARGETS, cache_dir=os.path.join(out, "svd_cache"))
    tracker.record(0)
    prose_before = heldout_loss(model, data["prose_held"], args.seq, args.eval_windows)
    g = torch.Generator().manual_seed(args.seed)  # the same windows, in the same order, for every method
    losses = []
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data["prose"]) - args.seq, (args.batch,), generator=g).tolist()
        x = torch.stack([data["prose"][s:s + args.seq] for s in starts]).long()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if reg is not None:
            reg.step()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.record_every == 0 or step == args.steps:
            tracker.record(step)
    traj = analysis.trajectory_json(args.base, [f"step {s}" for s in tracker.steps], tracker.results)
    path = os.path.join(out, f"{method}.json")
    with open(path, "w") as f:
        json.dump(traj, f, indent=1)
    last = traj["checkpoints"][-1]["mean"]
    res = {"method": method, "json": path, "lr": lr, "trainable": sum(p.numel() for p in params),
           "delta_sigma": last["delta_sigma"], "delta_d": last["delta_d"],
           "train_loss_first": losses[0], "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
           "prose_loss_before": prose_before,
           "prose_loss": heldout_loss(model, data["prose_held"], args.seq, args.eval_windows),
           "code_loss": heldout_loss(model, data["code_held"], args.seq, args.eval_windows),
           "seconds": time.time() - t0, "model": model}
    print(f"{method}: {args.steps} steps in {res['seconds']:.0f} s", flush=True)
    return res


def table(results: List[dict], code_before: float) -> str:
    lines = [f"{'method':<8} {'lr':>8} {'trainable':>9} {'mean ΔΣ':>9} {'mean ΔD':>9} "
             f"{'prose loss':>15} {'code loss':>15}"]
    for r in results:
        lines.append(f"{r['method']:<8} {r['lr']:>8.2g} {r['trainable']:>9d} {r['delta_sigma']:>9.4f} "
                     f"{r['delta_d']:>9.4f} {r['prose_loss_before']:>6.3f} → {r['prose_loss']:<6.3f} "
                     f"{code_before:>6.3f} → {r['code_loss']:<6.3f}")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 200; --quick 12)")
    ap.add_argument("--record-every", type=int, default=None,
                    help="steps between records (default: steps // 10, at least 1)")
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA, PiSSA and full fine-tuning; SORSA 1.5× it")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None, help="windows per batch (default 16; --quick 8)")
    ap.add_argument("--seq", type=int, default=None, help="bytes per window (default 128; --quick 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible)")
    ap.add_argument("--quick", action="store_true", help="the test's setting: 12 steps of 8×64 bytes")
    ap.add_argument("--base", default=BASE_DIR, help="the pre-trained model's folder (default: the shipped one)")
    ap.add_argument("--out", default=None, help="folder for the JSON files (default: a temporary one)")
    ap.add_argument("--plot", default=None, help="the figure's PNG path (default: OUT/spectral_shift.png)")
    args = ap.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (12 if args.quick else 200)
    args.batch = args.batch if args.batch is not None else (8 if args.quick else 16)
    args.seq = args.seq if args.seq is not None else (64 if args.quick else 128)
    args.record_every = args.record_every if args.record_every is not None else max(1, args.steps // 10)
    args.eval_windows = 8 if args.quick else 64
    for name in ("steps", "record_every", "rank", "batch", "seq", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> List[dict]:
    out = args.out or tempfile.mkdtemp(prefix="spectral_figure_")
    os.makedirs(out, exist_ok=True)
    pre = _pretrain_module()
    _, code_held, _ = pre.load_corpus(pre.corpus_files())
    prose_train, prose_held = prose()
    if len(prose_train) <= args.seq:
        raise ValueError(f"--seq {args.seq} is longer than the fine-tuning text ({len(prose_train)} bytes)")
    data = {"prose": prose_train, "prose_held": prose_held, "code_held": code_held}
    base = load_base(args.base)
    code_before = pre.heldout_loss(base, code_held, args.seq, args.eval_windows)
    print(f"base {args.base}; {len(target_weight_names(base))} target weights; fine-tuning text "
          f"{len(prose_train)} + {len(prose_held)} held-out bytes; {args.steps} steps of {args.batch}×{args.seq}",
          flush=True)
    t0 = time.time()
    results = [run_method(m, base, data, args, out, pre.heldout_loss) for m in args.methods]
    runs = []
    for r in results:  # the figure from the files, as `sorsa-kernels analyze --compare` reads them
        with open(r["json"]) as f:
            runs.append(json.load(f))
    plot = args.plot or os.path.join(out, "spectral_shift.png")
    if os.path.dirname(plot):
        os.makedirs(os.path.dirname(plot), exist_ok=True)
    # one scale for all panels: the figure is read as "which method moved least"
    analysis.plot_shift(runs, plot, titles=[TITLES[r["method"]] for r in results], share_axes=True)
    print(table(results, code_before))
    print(f"total {time.time() - t0:.0f} s; JSON in {out}; figure {plot}")
    for r in results:
        r["plot"], r["code_loss_before"] = plot, code_before
    return results


if __name__ == "__main__":
    main()
