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


class Net(nn.Sequential):
    """``build``'s layers under reentrant activation checkpointing, plus a SORSA layer "3" that the
    forward does not use (its adapters get only the regularizer's gradient)."""

    def forward(self, x):
        run = lambda h: self[2](self[1](self[0](h)))  # noqa: E731
        return torch.utils.checkpoint.checkpoint(run, x.detach().requires_grad_(), use_reentrant=True)


def off_orthonormal(m, seed, amount):
    """Only the adapters trainable, A and B pushed off orthonormal (seeded) so the regularizer's
    gradient is as large as the task's."""
    sk.mark_only_sorsa_trainable(m)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "sorsa_A" in n or "sorsa_B" in n:
                p.add_(amount * torch.randn(p.shape, generator=g))
    return m


def build(seed=0, net=False):
    """Two SORSA layers with odd sizes (uneven ZeRO-3 partitions), adapters pushed off orthonormal
    so the regularizer's gradient is as large as the task's. ``net``: a :class:`Net` instead."""
    torch.manual_seed(seed)
    layers = [nn.Linear(15, 22), nn.GELU(), nn.Linear(22, 9)] + ([nn.Linear(9, 9)] if net else [])
    m = Net(*layers) if net else nn.Sequential(*layers)
    sk.apply_sorsa(m, ["0", "2", "3"] if net else ["0", "2"], r=3, alpha=3, init="svd")
    return off_orthonormal(m, seed, 0.3)


def batch(step, micro):
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(4, 15, generator=g), torch.randn(4, 9, generator=g)


def adapters(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "sorsa_" in n}


def train(route, gas, engine_cfg=None, net=False):
    """STEPS optimizer steps of gas micro-batches each; route: 'loss' (task + GAMMA_LOSS · ortho_loss),
    'loss_first' (the same with ortho_loss computed before the forward), 'grad' (orthonormal_grad_
    after the backward), 'grad_every' (orthonormal_grad_ after every backward, not only the last
    of a step), 'regularizer' (SORSARegularizer built before the engine), 'none'. engine_cfg: a
    DeepSpeed config, or None for one plain process. ``net``: ``build(net=True)``. Returns the
    per-micro-step task losses, the regularizer values and the trained adapters (full tensors)."""
    m = build(net=net)
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
            if route == "loss_first":
                v = sk.ortho_loss(model)
            task = nn.functional.mse_loss(model(x), t)
            loss = task
            if route in ("loss", "loss_first"):
                if route == "loss":
                    v = sk.ortho_loss(model)  # the engine itself (its parameters are "module.<name>")
                values.append(v.detach())
                loss = task + GAMMA_LOSS * v
            if engine_cfg is None:
                (loss / gas).backward()
            else:
                model.backward(loss)  # the engine divides by gas itself
            losses.append(task.detach())
            if route == "grad_every" and micro < gas - 1:  # a DeepSpeed engine's own micro-steps: skipped
                if engine_cfg is not None:
                    with pytest.warns(UserWarning, match="not a gradient accumulation boundary"):
                        sk.orthonormal_grad_(model, GAMMA, LR)  # the engine: ZeRO-1/2 learn its optimizer
            if route == "grad_every" and micro == gas - 1:
                values.append(sk.orthonormal_grad_(model, GAMMA, LR))
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
    return off_orthonormal(m, seed, 0.2)


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


# ---------------------------------------------------------------- placements and optimizers beyond the plain loops

def _placement_worker(rank, world):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from sorsa_kernels.ops.ortho.reference import calc_ortho_naive

    # ZeRO-3 with every parameter partitioned (persistence threshold 0): the loss term computed
    # before the forward, under reentrant activation checkpointing, with an adapter the forward
    # does not use; each equals one plain process
    cfg = zh.ds_config(3, grad_accum=2, world=world)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ref = train("loss", 2, net=True)
    _assert_same(train("loss_first", 2, cfg, net=True), ref, "ZeRO-3 loss term before the forward")
    _assert_same(train("loss", 2, cfg, net=True), ref, "ZeRO-3 loss term after the forward")

    # orthonormal_grad_ one matrix at a time (chunks of at most CHUNK_BYTES) gives the same result
    import sorsa_kernels.integrations.deepspeed as dsi
    cfg1 = zh.ds_config(3, world=world)
    cfg1["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    saved, dsi.CHUNK_BYTES = dsi.CHUNK_BYTES, 1
    try:
        got = train("grad", 1, cfg1, net=True)
    finally:
        dsi.CHUNK_BYTES = saved
    _assert_same(got, train("grad", 1, net=True), "ZeRO-3 orthonormal_grad_ in chunks")

    # orthonormal_grad_ after every micro-batch's backward still counts once per optimizer step
    _assert_same(train("grad_every", 2, zh.ds_config(2, grad_accum=2, world=world)), train("grad", 2),
                 "ZeRO-2 orthonormal_grad_ at every micro-step")

    # ZeRO-1 + bf16 with fp32 gradient accumulation runs BF16_Optimizer: the regularizer's
    # gradient must reach its fp32 buffer (its bf16 .grad was already copied there), with and
    # without immediate_grad_update; compared with float64 autograd at the same bf16 values
    for immediate in (False, True):
        m = build()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
        cfg = zh.ds_config(1, world=world, bf16={"enabled": True, "immediate_grad_update": immediate},
                           data_types={"grad_accum_dtype": "fp32"})
        eng, *_ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
        assert type(eng.optimizer).__name__ == "BF16_Optimizer"
        x, t = batch(0, 0)
        eng.backward(nn.functional.mse_loss(eng(x.bfloat16()).float(), t))
        named = [(n, p) for n, p in eng.module.named_parameters() if "sorsa_A" in n or "sorsa_B" in n]
        before = [safe_get_full_grad(p).clone() for _, p in named]
        sk.orthonormal_grad_(eng.module, GAMMA, LR)
        ref64 = [(n, p.detach().double().requires_grad_()) for n, p in named]
        (GAMMA / LR * calc_ortho_naive(ref64)).backward()
        for (n, p), g0, (_, r) in zip(named, before, ref64):
            added = safe_get_full_grad(p) - g0
            torch.testing.assert_close(added, r.grad.float(), rtol=1e-4, atol=1e-3,
                                       msg=f"bf16 immediate_grad_update={immediate}: {n}")
        eng.step()


def test_zero_loss_term_placement_bf16_optimizer_and_micro_steps():
    zh.spawn(_placement_worker)


class _Scaler:
    """What DeepSpeed's torch_autocast fp16 keeps on its optimizer (a GradScaler's get_scale)."""

    def get_scale(self):
        return 8.0


class _FakeZeroOptimizer:
    """A stand-in ZeRO-1/2 optimizer: the attributes the integration reads."""

    def __init__(self, scaler=None):
        self.loss_scale, self.custom_loss_scaler, self.torch_autocast_gradscaler = 1.0, False, scaler

    def is_gradient_accumulation_boundary(self):
        return True


def _as_zero(m, scaler):
    """Mark ``m``'s adapters as ZeRO-1/2 managed with the gradient still in ``.grad``."""
    opt = _FakeZeroOptimizer(scaler)
    for n, p in m.named_parameters():
        if "sorsa_" in n:
            p._hp_mapping, p._zero_optimizer = None, opt
            p.grad = torch.zeros_like(p)


def test_torch_autocast_fp16_grad_scaler_scales_the_added_gradient():
    """Under torch_autocast fp16 the gradients carry the GradScaler's scale (not opt.loss_scale):
    the regularizer's gradient must carry it too, as DeepSpeed divides it out in its step."""
    ref, m = build(), build()
    sk.orthonormal_grad_(ref, GAMMA, LR)
    _as_zero(m, _Scaler())
    sk.orthonormal_grad_(m, GAMMA, LR)
    for (n, p), (_, r) in zip(m.named_parameters(), ref.named_parameters()):
        if "sorsa_A" in n or "sorsa_B" in n:
            torch.testing.assert_close(p.grad, 8.0 * r.grad, **TOL, msg=n)


def test_deepspeed_version_range():
    from sorsa_kernels.integrations.deepspeed import check_deepspeed_version
    with pytest.raises(RuntimeError, match="needs deepspeed >= 0.16, this is 0.15.4"):
        check_deepspeed_version("0.15.4")
    with pytest.warns(UserWarning, match="deepspeed 0.20.0 is newer than"):
        check_deepspeed_version("0.20.0")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_deepspeed_version("0.19.8")
        check_deepspeed_version("0.16.0")


class DeepSpeedOptimizerWrapper:
    """Named as accelerate's wrapper (what the callback recognises); ``optimizer`` the engine's."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


class _FakeEngineOptimizer:
    """A ZeRO-1/2 optimizer's shape: flat param_groups, model parameters in ``bit16_groups``."""

    def __init__(self, groups, lrs):
        self.bit16_groups = groups
        self.param_groups = [{"lr": lr, "params": [torch.zeros(1)]} for lr in lrs]
        self.steps = 0

    def step(self):
        self.steps += 1


def test_callback_adapters_lr_and_refuses_a_second_wrap():
    """The lr comes from the param group holding the adapters (not the first group), in the
    DeepSpeed path and the plain one; a second callback on the same engine is refused."""
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState, TrainingArguments
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, learning_rate=LR)
    ref = build()
    sk.orthonormal_grad_(ref, GAMMA, LR)
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    def check(m, what):
        for n, p in m.named_parameters():
            if n in want:
                torch.testing.assert_close(p.grad, want[n], **TOL, msg=f"{what}: {n}")

    m = build()
    adapters_ = [p for n, p in m.named_parameters() if "sorsa_" in n and p.requires_grad]
    others = [p for n, p in m.named_parameters() if "sorsa_" not in n]
    ds_opt = _FakeEngineOptimizer([others, adapters_], [1.0, LR])
    cb1, cb2 = (sk.SORSACallback(GAMMA, warn_trainable=False) for _ in range(2))
    cb1.on_train_begin(args, TrainerState(), TrainerControl(), model=m, optimizer=DeepSpeedOptimizerWrapper(ds_opt))
    with pytest.raises(RuntimeError, match="already runs a SORSACallback"):
        cb2.on_train_begin(args, TrainerState(), TrainerControl(), model=m, optimizer=DeepSpeedOptimizerWrapper(ds_opt))
    ds_opt.step()
    assert ds_opt.steps == 1
    check(m, "DeepSpeed path")
    cb1.on_train_end(args, TrainerState(), TrainerControl())
    cb2.on_train_begin(args, TrainerState(), TrainerControl(), model=m, optimizer=DeepSpeedOptimizerWrapper(ds_opt))
    cb2.on_train_end(args, TrainerState(), TrainerControl())

    m = build()
    adapters_ = [p for n, p in m.named_parameters() if "sorsa_" in n and p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for n, p in m.named_parameters() if "sorsa_" not in n], "lr": 1.0},
                           {"params": adapters_, "lr": LR}])
    cb = sk.SORSACallback(GAMMA, warn_trainable=False)
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=m, optimizer=opt)
    cb.on_pre_optimizer_step(args, TrainerState(), TrainerControl(), model=m, optimizer=opt)
    check(m, "plain path")
