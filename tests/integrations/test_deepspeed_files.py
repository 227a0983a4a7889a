"""Adapter files and transformers checkpoints of DeepSpeed ZeRO-3 models: 2 CPU ranks over gloo
train a tiny Llama, save and load; everything is compared with one plain process trained on the
same batches (the ranks' micro-batches are its halves, so the averaged gradient is its gradient).

One spawn runs every ZeRO-3 step (starting DeepSpeed on 2 ranks dominates the time); the tests
then check what it recorded."""
import os
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")
from zero3_helpers import ds_config, spawn  # noqa: E402  (sets DS_ACCELERATOR first)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import sorsa_kernels as sk  # noqa: E402
from trainer_helpers import affine_dataset  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ, BATCH, STEPS, LR = 64, 16, 8, 3, 5e-3
# fp32, one process vs 2 ranks: the gradients differ by the order of a sum only
TOL = dict(rtol=1e-4, atol=1e-5)


def base_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def sorsa_model(base_dir, init="svd"):
    m = LlamaForCausalLM.from_pretrained(base_dir)
    sk.apply_sorsa(m, TARGETS, r=4, alpha=4, init=init)
    sk.mark_only_sorsa_trainable(m)
    return m


def batches():
    """STEPS + 1 batches of BATCH sequences (the last one for a step after loading)."""
    ids = torch.stack([d["input_ids"] for d in affine_dataset((STEPS + 1) * BATCH, VOCAB, SEQ)])
    return ids.split(BATCH)


PROBE = torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB


@torch.no_grad()
def logits(model):
    model.eval()
    return model(input_ids=PROBE).logits


def step(model, opt, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def zero3_engine(model, world):
    """A fp32 ZeRO-3 engine with torch's AdamW (no compiled DeepSpeed ops on CPU); every parameter
    truly partitioned (no persistence threshold: a tiny model would keep all of them whole)."""
    import deepspeed

    cfg = ds_config(3, micro_batch=BATCH // world, world=world, zero_allow_untested_optimizer=True,
                    zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]


def train(model, out_dir, world, deepspeed_cfg=None):
    """STEPS steps of a Trainer on the first STEPS batches (constant lr, no clipping); under
    DeepSpeed each of the ``world`` ranks takes half of each batch. Returns the trainer."""
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids, "labels": ids} for b in batches()[:STEPS] for ids in b]
    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                             max_grad_norm=0.0, per_device_train_batch_size=BATCH // world if deepspeed_cfg else BATCH,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                             disable_tqdm=True, deepspeed=deepspeed_cfg)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


def _zero3_step(engine, ids, rank, world):
    engine.train()
    part = ids.chunk(world)[rank]
    engine.backward(engine(input_ids=part, labels=part).loss)
    engine.step()


def _record_gathers(log):
    """Record the elements each gather of sorsa_kernels holds (to check: one module at a time)."""
    import sorsa_kernels._zero3 as Z

    real = Z.gathered

    def gathered(params, modifier_rank=None):
        params = list(params)
        log.append(sum(int(p.ds_numel) for p in params if Z.is_partitioned(p)))
        return real(params, modifier_rank)

    Z.gathered = gathered


def _worker(rank, world, base_dir, out):
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    res = {}
    gathers = []
    _record_gathers(gathers)
    data = batches()
    cfg = ds_config(3, micro_batch="auto", grad_accum="auto", world=world, gradient_clipping="auto",
                    zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_gather_16bit_weights_on_model_save": True})
    trainer = train(sorsa_model(base_dir), os.path.join(out, f"run{rank}"), world, cfg)
    engine = trainer.model_wrapped
    mod = engine.module
    assert all(p.numel() == 0 for p in mod.parameters())  # truly partitioned
    res["logits"] = logits(engine)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(mod.parameters())):  # DeepSpeed's own gather: the truth
        res["adapters"] = {n: p.detach().clone() for n, p in mod.named_parameters() if "sorsa_" in n}

    sk.save_adapter(mod, os.path.join(out, "adapter"))
    res["file_seen"] = os.path.isfile(os.path.join(out, "adapter", sk.adapters.ADAPTER_FILE))  # right after, every rank
    mod.save_pretrained(os.path.join(out, "full"))  # every rank: gathered module by module to rank 0
    mod.save_pretrained(os.path.join(out, "hf_adapter"), sorsa_format="adapter")
    res["largest_gather"] = max(gathers)
    trainer.save_model(os.path.join(out, "trainer_full"))  # every rank consolidates, the main process saves
    sk.checkpoints.install(mod, sk.adapters.adapter_config, "adapter")  # as SORSACallback(save="adapter")
    trainer.save_model(os.path.join(out, "trainer_adapter"))
    if rank == 0:  # without stage3_gather_16bit_weights_on_model_save the Trainer passes {} on rank 0 only
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod.save_pretrained(os.path.join(out, "no_gather"), state_dict={}, sorsa_format="adapter")
        res["no_gather_warning"] = " | ".join(str(w.message) for w in caught)

    # a fresh engine, adapters never initialised: load_adapter recomputes W_r from each gathered weight
    fresh = zero3_engine(sorsa_model(base_dir, init=None), world)
    gathers.clear()
    sk.load_adapter(fresh.module, os.path.join(out, "adapter"))
    res["largest_load_gather"] = max(gathers)
    res["loaded_logits"] = logits(fresh)
    _zero3_step(fresh, data[STEPS], rank, world)  # the optimizer's fp32 master copies were loaded too
    res["stepped_logits"] = logits(fresh)

    # errors: a file only rank 0 can read fails on every rank (no rank left waiting in a gather)
    try:
        sk.load_adapter(fresh.module, os.path.join(out, "adapter" if rank == 0 else "missing"))
    except (FileNotFoundError, RuntimeError) as e:
        res["one_rank_missing"] = f"{type(e).__name__}: {e}"
    base = LlamaForCausalLM.from_pretrained(base_dir)
    plain = zero3_engine(base, world)  # targets still nn.Linear under ZeRO-3
    try:
        sk.load_adapter(plain.module, os.path.join(out, "adapter"))
    except ValueError as e:
        res["linear_target"] = str(e)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("base")
    base_model().save_pretrained(base_dir)
    out = tmp_path_factory.mktemp("zero3")
    spawn(_worker, str(base_dir), str(out))
    return base_dir, out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """The plain model trained by a Trainer in one process on the full batches."""
    base_dir = run[0]
    return train(sorsa_model(base_dir), str(tmp_path_factory.mktemp("plain")), 2).model


def _adapters(model):
    return {n: p.detach() for n, p in model.named_parameters() if "sorsa_" in n}


def test_zero3_trains_like_one_process(run, reference):
    _, _, res = run
    torch.testing.assert_close(res[0]["logits"], logits(reference), **TOL)
    torch.testing.assert_close(res[1]["logits"], res[0]["logits"], rtol=0, atol=0)


def test_adapter_file_from_zero3_loads_into_a_plain_model(run, reference):
    base_dir, out, res = run
    assert res[0]["file_seen"] and res[1]["file_seen"]
    loaded = sk.load_adapter(LlamaForCausalLM.from_pretrained(base_dir), str(out / "adapter"))
    # the file holds the ZeRO-3 model's adapters exactly (the reference's only to within Adam's
    # amplification of the gradients' rounding, so the model outputs are compared with it)
    got = _adapters(loaded)
    assert got.keys() == res[0]["adapters"].keys() and len(got) == 3 * len(TARGETS) * 2
    for k, v in res[0]["adapters"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(logits(loaded), logits(reference), **TOL)
    torch.testing.assert_close(logits(loaded), res[0]["logits"], **TOL)


def test_gathers_hold_one_layer_at_a_time(run):
    _, _, res = run
    base = base_model()
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in base.modules())
    largest_layer = max(m.weight.numel() + 4 * (1 + sum(m.weight.shape))  # W_r + A, S, B of r = 4
                        for m in base.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in base.parameters())
    for r in res:
        assert 0 < r["largest_gather"] <= max(largest_module, largest_layer) < total / 4
        assert 0 < r["largest_load_gather"] <= largest_layer


def test_load_adapter_into_a_fresh_zero3_engine(run, reference):
    base_dir, out, res = run
    torch.testing.assert_close(res[0]["loaded_logits"], logits(reference), **TOL)
    torch.testing.assert_close(res[1]["loaded_logits"], res[0]["loaded_logits"], rtol=0, atol=0)
    # one more step from the loaded state with a fresh optimizer, in one plain process
    plain = sk.load_adapter(sorsa_model(base_dir, init=None), str(out / "adapter"))
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=LR)
    before = logits(plain)
    step(plain, opt, batches()[STEPS])
    after = logits(plain)
    assert (after - before).abs().max() > 100 * TOL["atol"]  # the step moved the outputs
    torch.testing.assert_close(res[0]["stepped_logits"], after, **TOL)


def test_save_pretrained_and_trainer_saves_under_zero3(run, reference):
    base_dir, out, res = run
    want = logits(reference)
    for name in ("full", "trainer_full"):  # merged weights: the stock loader gets the tuned model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unused sorsa_* keys
            stock = LlamaForCausalLM.from_pretrained(out / name)
        torch.testing.assert_close(logits(stock), want, **TOL, msg=name)
    for name in ("hf_adapter", "trainer_adapter"):
        loaded = sk.load_adapter(LlamaForCausalLM.from_pretrained(base_dir), str(out / name))
        torch.testing.assert_close(logits(loaded), want, **TOL, msg=name)
    assert "stage3_gather_16bit_weights_on_model_save" in res[0]["no_gather_warning"]
    assert not (out / "no_gather").exists()


def test_zero3_errors_are_clear_and_reach_every_rank(run):
    _, _, res = run
    assert res[1]["one_rank_missing"].startswith("FileNotFoundError")
    assert res[0]["one_rank_missing"].startswith("RuntimeError") and "another rank" in res[0]["one_rank_missing"]
    for r in res:
        assert "ZeRO-3" in r["linear_target"] and "apply_sorsa" in r["linear_target"]


def test_merged_layers_under_zero3_are_refused_before_any_collective(tmp_path):
    # ZeRO-3 is recognised by the partitioned parameters' ds_id: a marked plain model reaches
    # the checks without a process group (they run before any gather)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    sk.apply_sorsa(model, ["0"], r=2, init="svd")
    sk.save_adapter(model, str(tmp_path / "a"))
    sk.merge_sorsa(model)
    model[0].weight.ds_id = 0
    for call in (lambda: sk.save_adapter(model, str(tmp_path / "b")),
                 lambda: sk.load_adapter(model, str(tmp_path / "a"))):
        with pytest.raises(ValueError, match="merged under DeepSpeed ZeRO-3.*unmerge_sorsa"):
            call()
    assert not (tmp_path / "b").exists()


# --- load_adapter into ZeRO engines whose tensors do not split evenly, and into ZeRO-1/2 ---

SMALL_R = 3  # odd: A, S, B of both layers have numels not divisible by 2 ranks (ZeRO-3 pads the last partition)


def small_model(seed):
    """A tiny SORSA model: the same init (and so W_r) for every seed, adapters moved by ``seed``."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(15, 22), torch.nn.GELU(), torch.nn.Linear(22, 9))
    sk.apply_sorsa(m, ["0", "2"], r=SMALL_R, alpha=3, init="svd")
    sk.mark_only_sorsa_trainable(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _full_state(module):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):  # a no-op below ZeRO-3
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _small_worker(rank, world, adapter, out):
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    import deepspeed
    import sorsa_kernels._zero3 as Z

    res = {}
    x = torch.randn(4, 15, generator=torch.Generator().manual_seed(rank))
    for stage in (3, 2):
        m = small_model(2)
        # lr=0: the step must leave the loaded values (it writes the optimizer's fp32 master copies back)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0, weight_decay=0.0)
        cfg = ds_config(stage, world=world, zero_allow_untested_optimizer=True,
                        zero_optimization={"stage": stage, "stage3_param_persistence_threshold": 0})
        engine = deepspeed.initialize(model=m, optimizer=opt, config=cfg)[0]
        sk.load_adapter(engine.module, adapter)
        res[f"loaded{stage}"] = _full_state(engine.module)
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        res[f"stepped{stage}"] = _full_state(engine.module)
        if stage == 3:  # a failure on one rank while setting the master copies raises on both
            real = Z.set_master

            def failing(p, value):
                if rank == 1:
                    raise OSError("injected master-copy failure")
                real(p, value)

            Z.set_master = failing
            try:
                sk.load_adapter(engine.module, adapter)
            except (OSError, RuntimeError) as e:
                res["one_rank_fails"] = f"{type(e).__name__}: {e}"
            finally:
                Z.set_master = real
            res["after_failure"] = _full_state(engine.module)  # both ranks still gather together
    plain = torch.nn.Sequential(torch.nn.Linear(15, 22), torch.nn.GELU(), torch.nn.Linear(22, 9))
    engine = deepspeed.initialize(model=plain, optimizer=torch.optim.AdamW(plain.parameters(), lr=0.0),
                                  config=ds_config(2, world=world, zero_allow_untested_optimizer=True))[0]
    try:
        sk.load_adapter(engine.module, adapter)
    except ValueError as e:
        res["linear_target_zero2"] = str(e)
    torch.save(res, os.path.join(out, f"small{rank}.pt"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    sk.save_adapter(small_model(1), str(out / "adapter"))  # a plain process writes the file
    spawn(_small_worker, str(out / "adapter"), str(out))
    return out, [torch.load(out / f"small{r}.pt") for r in range(2)]


def test_load_adapter_into_zero_engines_survives_a_step(small_run):
    out, res = small_run
    want = sk.load_adapter(small_model(2), str(out / "adapter")).state_dict()  # one plain process
    before = small_model(2).state_dict()
    assert any(not torch.equal(want[k], before[k]) for k in want if "sorsa_A" in k)  # the load changes the adapters
    for r in res:
        for key in ("loaded3", "stepped3", "loaded2", "stepped2"):
            assert r[key].keys() == want.keys()
            for k, v in want.items():
                torch.testing.assert_close(r[key][k], v, rtol=0, atol=0, msg=f"{key} {k}")


def test_zero3_master_copy_failure_on_one_rank_raises_on_every_rank(small_run):
    _, res = small_run
    assert res[1]["one_rank_fails"] == "OSError: injected master-copy failure"
    assert res[0]["one_rank_fails"].startswith("RuntimeError") and "another rank" in res[0]["one_rank_fails"]
    torch.testing.assert_close(res[0]["after_failure"], res[1]["after_failure"], rtol=0, atol=0)


def test_load_adapter_refuses_new_layers_under_zero12(small_run):
    _, res = small_run
    for r in res:
        msg = r["linear_target_zero2"]
        assert "ZeRO-1/2" in msg and "apply_sorsa" in msg and "0: a Linear" in msg
