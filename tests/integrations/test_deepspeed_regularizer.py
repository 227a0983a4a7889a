"""The orthonormal regularizer under DeepSpeed ZeRO-3, ZeRO-2 and ZeRO-1 on 2 CPU ranks (gloo): as
a loss term (``sk.ortho_loss``), after the backward (``orthonormal_grad_`` / ``SORSARegularizer``)
and through ``SORSACallback`` in a ``transformers.Trainer`` with a ZeRO-3 config; each compared
with one plain process on the same data (losses, regularizer values and trained adapters, AdamW)."""
import os

import pytest
import torch
import torch.nn as nn

import zero3_helpers as zh  # sets DS_ACCELERATOR=cpu before deepspeed is imported

pytest.importorskip("deepspeed")

import sorsa_kernels as sk  # noqa: E402

LR, GAMMA, GAMMA_LOSS, STEPS = 1e-2, 0.05, 0.5, 3
# fp32 on both sides; the ranks' gradients are averaged (identical data), so only summation order differs
TOL = dict(rtol=1e-5, atol=1e-6)


def build(seed=0):
    """Two SORSA layers with odd sizes (uneven ZeRO-3 partitions), adapters pushed off orthonormal
    so the regularizer's gradient is as large as the task's."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(15, 22), nn.GELU(), nn.Linear(22, 9))
    sk.apply_sorsa(m, ["0", "2"], r=3, alpha=3, init="svd")
    sk.mark_only_sorsa_trainable(m)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "sorsa_A" in n or "sorsa_B" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def batch(step, micro):
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(4, 15, generator=g), torch.randn(4, 9, generator=g)


def adapters(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "sorsa_" in n}


def train(route, gas, engine_cfg=None):
    """STEPS optimizer steps of gas micro-batches each; route: 'loss' (task + GAMMA_LOSS · ortho_loss),
    'grad' (orthonormal_grad_ after the backward), 'regularizer' (SORSARegularizer built before the
    engine), 'none'. engine_cfg: a DeepSpeed config, or None for one plain process. Returns the
    per-micro-step task losses, the regularizer values and the trained adapters (full tensors)."""
    m = build()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    reg = sk.SORSARegularizer(m, GAMMA, lr=LR) if route == "regularizer" else None
    model = m
    if engine_cfg is not None:
        import deepspeed
        model, opt, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=engine_cfg)
    losses, values = [], []
    for step in range(STEPS):
        for micro in range(gas):
            x, t = batch(step, micro)
            task = nn.functional.mse_loss(model(x), t)
            loss = task
            if route == "loss":
                v = sk.ortho_loss(model)  # the engine itself (its parameters are "module.<name>")
                values.append(v.detach())
                loss = task + GAMMA_LOSS * v
            if engine_cfg is None:
                (loss / gas).backward()
            else:
                model.backward(loss)  # the engine divides by gas itself
            losses.append(task.detach())
            if micro == gas - 1:
                if route == "grad":
                    values.append(sk.orthonormal_grad_(getattr(model, "module", model), GAMMA, LR))
                elif route == "regularizer":
                    values.append(reg.step())
            if engine_cfg is None:
                if micro == gas - 1:
                    opt.step()
                    opt.zero_grad()
            else:
                model.step()
    if engine_cfg is None:
        return torch.stack(losses), torch.stack(values) if values else None, adapters(m)
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(model.module.parameters())):  # no-op under ZeRO-1/2
        out = adapters(model.module)
    return torch.stack(losses), torch.stack(values) if values else None, out


def _assert_same(got, ref, what):
    (lg, vg, ag), (lr_, vr, ar) = got, ref
    torch.testing.assert_close(lg, lr_, **TOL, msg=f"{what}: task losses")
    torch.testing.assert_close(vg, vr, **TOL, msg=f"{what}: regularizer values")
    assert ag.keys() == ar.keys()
    for n in ar:
        torch.testing.assert_close(ag[n], ar[n], **TOL, msg=f"{what}: {n}")


def _far(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


class Frame(nn.Module):
    """Bare adapter parameters (for zero.Init without an engine)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.sorsa_A = nn.Parameter(torch.randn(3, 15, generator=g) / 4)
        self.sorsa_B = nn.Parameter(torch.randn(22, 3, generator=g) / 4)


def _loops_worker(rank, world):
    import deepspeed
    cases = [(3, "loss", 2), (3, "grad", 1), (2, "loss", 1), (2, "regularizer", 2), (1, "grad", 1)]
    plain = {}
    for stage, route, gas in cases:
        if (route, gas) not in plain:
            plain[route, gas] = train(route, gas)
        got = train(route, gas, zh.ds_config(stage, grad_accum=gas, world=world))
        _assert_same(got, plain[route, gas], f"ZeRO-{stage} {route} gas={gas}")
    # each regularizer changed the result by far more than the tolerance: the comparisons can fail
    for (route, gas), (_, _, ad) in plain.items():
        assert _far(ad, train("none", gas)[2]) > 1e-3, (route, gas)

    # ZeRO-3 partitioned, no engine: the value alone works, a gradient is refused
    ref = Frame()
    with deepspeed.zero.Init(config_dict_or_path=zh.ds_config(3, world=world)):
        part = Frame()
    assert part.sorsa_A.numel() == 0 and hasattr(part.sorsa_A, "ds_id")
    with torch.no_grad():
        torch.testing.assert_close(sk.ortho_loss(part), sk.ortho_loss(ref), **TOL)
        torch.testing.assert_close(sk.calc_ortho(part), sk.calc_ortho(ref), **TOL)
    with pytest.raises(RuntimeError, match="no DeepSpeed ZeRO-3 engine"):
        sk.ortho_loss(part)
    with pytest.raises(RuntimeError, match="no DeepSpeed ZeRO-3 engine"):
        sk.orthonormal_grad_(part, GAMMA, LR)
    with pytest.raises(RuntimeError, match="backend='triton' is not available for DeepSpeed ZeRO-3"):
        sk.ortho_loss(part, backend="triton")


def test_zero_training_loops_match_one_process():
    zh.spawn(_loops_worker)


# ---------------------------------------------------------------- transformers.Trainer + ZeRO-3

VOCAB, SEQ, BATCH = 64, 16, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    m = LlamaForCausalLM(cfg)
    sk.apply_sorsa(m, TARGETS, r=4, alpha=4, init="svd")
    sk.mark_only_sorsa_trainable(m)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "sorsa_A" in n or "sorsa_B" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m


def run_trainer(model, out_dir, world, deepspeed_cfg=None, gamma=GAMMA):
    """STEPS steps of a Trainer with SORSACallback; under DeepSpeed each of the ``world`` ranks
    takes BATCH rows of the global batch, the plain process all ``world · BATCH``."""
    from transformers import Trainer, TrainingArguments
    from trainer_helpers import affine_dataset
    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="linear",
                             optim="adamw_torch", warmup_steps=1, max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
                             per_device_train_batch_size=BATCH if deepspeed_cfg else world * BATCH,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                             disable_tqdm=True, deepspeed=deepspeed_cfg)
    cb = sk.SORSACallback(gamma, warn_trainable=False)
    trainer = Trainer(model=model, args=args, train_dataset=affine_dataset(STEPS * world * BATCH, VOCAB, SEQ),
                      callbacks=[cb])
    trainer.train()
    losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
    module = trainer.model_wrapped.module if deepspeed_cfg else trainer.model
    if deepspeed_cfg:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            ad = adapters(module)
    else:
        ad = adapters(module)
    return losses, cb.last_value, ad


def _trainer_worker(rank, world, model, out_dir):
    import warnings
    cfg = zh.ds_config(3, micro_batch="auto", grad_accum="auto", world=world, gradient_clipping="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_trainer(model, os.path.join(out_dir, f"ds{rank}"), world, cfg)
    # partitioned (empty) S tensors must not read as all-zero adapters
    assert not [w for w in caught if "all-zero adapters" in str(w.message)]
    assert got[1] is not None  # the callback ran through the engine's optimizer step
    if rank == 0:
        torch.save(got, os.path.join(out_dir, "ds.pt"))


def test_trainer_zero3_sorsa_callback_matches_plain_trainer(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM, Trainer  # noqa: F401  imported once, before the fork
    # one initial model for both runs (the forked ranks inherit it): an SVD init computed with
    # another thread count differs in its last bits, and near-equal singular values amplify that
    model = tiny_llama()
    zh.spawn(_trainer_worker, model, str(tmp_path))
    got = torch.load(tmp_path / "ds.pt")
    # the plain Trainer in this (non-distributed) process: one rank with the whole global batch
    ref = run_trainer(model, str(tmp_path / "plain"), 2)
    torch.testing.assert_close(got[0], ref[0], **TOL, msg="logged losses")
    torch.testing.assert_close(got[1], ref[1], **TOL, msg="last regularizer value")
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], **TOL, msg=n)


def test_callback_refuses_zero_parameters_without_the_deepspeed_optimizer():
    """ZeRO-managed adapters with an optimizer the callback cannot hook: its pre-optimizer-step
    event would come after the engine's step, so it raises instead of adding a stale gradient."""
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState, TrainingArguments
    m = build()
    for p in m.parameters():
        p._hp_mapping = None  # what ZeRO-1/2 set on a parameter this rank holds no part of
    cb = sk.SORSACallback(GAMMA, warn_trainable=False)
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(RuntimeError, match="managed by DeepSpeed ZeRO"):
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=m, optimizer=torch.optim.SGD(m.parameters()))
