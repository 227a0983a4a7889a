"""transformers checkpoints of SORSA models (sorsa_kernels.checkpoints): whatever a transformers
user saves — save_pretrained, Trainer.save_model, periodic checkpoints — reloads with the stock
from_pretrained to the tuned model or fails loudly, and a Trainer resumes bit-exactly."""
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import sorsa_kernels as sk  # noqa: E402
from trainer_helpers import affine_dataset  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ = 64, 16


def base_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype)


def sorsa_model(base_dir, dtype=torch.float32, freeze=True):
    m = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype)
    sk.apply_sorsa(m, TARGETS, r=4, alpha=4, dropout=0.1, init="svd")
    if freeze:
        sk.mark_only_sorsa_trainable(m)
    return m


def data(n=32, seed=1):
    return affine_dataset(n, VOCAB, SEQ, seed)


def trainer(model, out, steps, save_steps=None, callback_kw=None):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data(),
                   callbacks=[sk.SORSACallback(1e-3, **(callback_kw or {}))])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    base_model().save_pretrained(d)
    return d


def logits(model, ids=None):
    ids = torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB if ids is None else ids
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "sorsa_" in n}


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A SORSA model trained 6 steps with the Trainer, periodic checkpoint at step 3."""
    out = tmp_path_factory.mktemp("run")
    m = sorsa_model(base_dir)
    trainer(m, out, 6, save_steps=3).train()
    return m, out


def test_save_pretrained_reloads_with_stock_from_pretrained(trained, tmp_path):
    m, _ = trained
    want = logits(m)
    m.save_pretrained(tmp_path / "full")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "full")
    assert not any(isinstance(x, sk.SORSALinear) for x in plain.modules())
    torch.testing.assert_close(logits(plain), want, rtol=1e-5, atol=1e-5)
    # the stored weight is the merged one, not W_r (which reloaded alone was the bug)
    sd = load_file(tmp_path / "full" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    layer = m.get_submodule(name)
    torch.testing.assert_close(sd[f"{name}.weight"], layer.effective_weight(), rtol=0, atol=1e-6)
    assert not torch.equal(sd[f"{name}.weight"], layer.weight)
    # merged: no sorsa keys at all (a clean deployment checkpoint)
    m.save_pretrained(tmp_path / "merged", sorsa_format="merged")
    assert not [k for k in load_file(tmp_path / "merged" / "model.safetensors") if "sorsa" in k]
    torch.testing.assert_close(logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged")), want,
                               rtol=1e-5, atol=1e-5)
    # the layer's own state dict is still sorsa 1.0.1's (weight = W_r)
    assert torch.equal(m.state_dict()[f"{name}.weight"], layer.weight)


def test_trainer_save_model_and_periodic_checkpoint_reload(trained, tmp_path):
    m, out = trained
    ckpt = out / "checkpoint-6"
    torch.testing.assert_close(logits(LlamaForCausalLM.from_pretrained(ckpt)), logits(m), rtol=1e-5, atol=1e-5)
    t = trainer(m, tmp_path, 1)
    t.save_model(str(tmp_path / "saved"))
    torch.testing.assert_close(logits(LlamaForCausalLM.from_pretrained(tmp_path / "saved")), logits(m),
                               rtol=1e-5, atol=1e-5)


def test_full_checkpoint_loads_back_into_a_sorsa_model(trained, base_dir, tmp_path):
    m, _ = trained
    m.save_pretrained(tmp_path / "full")
    sd = load_file(tmp_path / "full" / "model.safetensors")
    fresh = sorsa_model(base_dir)  # same base and settings: W_r kept bit for bit
    res = fresh.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for (n, a), b in zip(adapters(m).items(), adapters(fresh).values()):
        assert torch.equal(a, b), n
    for (n, x), y in zip(m.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(x, y), n
    # onto another base: W_r recovered from the merged weight (one rounding), with a warning
    other = LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    sk.apply_sorsa(other, TARGETS, r=4, alpha=4, init="svd")
    with pytest.warns(UserWarning, match="recovered from a checkpoint's merged weights"):
        other.load_state_dict(sd, strict=False)
    torch.testing.assert_close(logits(other), logits(m), rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_is_exact(trained, base_dir, tmp_path):
    m, out = trained
    resumed = sorsa_model(base_dir)
    t = trainer(resumed, out, 6, save_steps=3)
    t.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    for (n, a), b in zip(adapters(m).items(), adapters(resumed).values()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(logits(resumed), logits(m), rtol=0, atol=0)


def test_adapter_checkpoints(base_dir, tmp_path):
    m = sorsa_model(base_dir)
    m.lm_head.weight.requires_grad_(False)
    m.model.norm.weight.requires_grad_(True)  # a trained non-adapter parameter travels with the adapter
    trainer(m, tmp_path / "run", 4, save_steps=2, callback_kw={"save": "adapter"}).train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {"model.safetensors", "sorsa_config.json", "config.json"} <= files
    sd = load_file(ckpt / "model.safetensors")
    assert not [k for k in sd if k.endswith(".weight") and "norm" not in k]  # no base weights: small
    assert json.load(open(ckpt / "sorsa_config.json"))["trainable"] == ["model.norm.weight"]
    for cls in (LlamaForCausalLM, transformers.AutoModelForCausalLM):  # stock loaders stop, saying why
        with pytest.raises(Exception, match="NOT A MODEL: a sorsa-kernels adapter-only checkpoint"):
            cls.from_pretrained(ckpt)
    # sk.load_adapter onto the plain base reproduces the tuned model
    plain = LlamaForCausalLM.from_pretrained(base_dir)
    sk.load_adapter(plain, str(ckpt))
    torch.testing.assert_close(logits(plain), logits(m), rtol=1e-5, atol=1e-5)
    # resume onto a model built the same way: exact
    resumed = sorsa_model(base_dir)
    resumed.model.norm.weight.requires_grad_(True)
    trainer(resumed, tmp_path / "run", 4, save_steps=2, callback_kw={"save": "adapter"}).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(logits(resumed), logits(m), rtol=0, atol=0)
    # onto a model initialised from other weights: a loud error, not a silently wrong W_r
    other = LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    sk.apply_sorsa(other, TARGETS, r=4, alpha=4, init="svd")
    with pytest.raises(RuntimeError, match="initialised differently"):
        other.load_state_dict(sd, strict=False)


def test_trainable_non_adapters_warned_once(base_dir, tmp_path):
    m = sorsa_model(base_dir, freeze=False)
    t = trainer(m, tmp_path, 1)
    with pytest.warns(UserWarning, match=r"besides the SORSA adapters are trainable .*embed_tokens"):
        t.train()
    m2 = sorsa_model(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer(m2, tmp_path, 1).train()


def test_bad_format_is_an_error(base_dir):
    m = sorsa_model(base_dir)
    with pytest.raises(ValueError, match="sorsa_format must be one of"):
        m.save_pretrained("/nonexistent", sorsa_format="lora")
    with pytest.raises(ValueError, match="save must be one of"):
        sk.SORSACallback(1e-3, save="peft")
    with pytest.raises(ValueError, match="cannot resume"):
        sk.SORSACallback(1e-3, save="merged")


def test_bf16_model_full_checkpoint(base_dir, tmp_path):
    m = sorsa_model(base_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "sorsa_A" in n:
                p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "bf16")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ref = logits(m).float()
    err = float((logits(plain).float() - ref).abs().max())
    assert err < 0.1 * float(ref.abs().max()), err  # one bf16 rounding of each merged weight


@pytest.mark.parametrize("order", [1, -1])
def test_sharded_full_checkpoint_resumes_in_any_shard_order(trained, base_dir, tmp_path, order):
    """Shards can split a layer's keys (the Trainer loads them one by one, in set order): its weight
    and its marker may arrive in either order."""
    m, _ = trained
    m.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    index = json.load(open(tmp_path / "sh" / "model.safetensors.index.json"))["weight_map"]
    files = sorted(set(index.values()))[::order]
    assert len(files) > 3
    split = [n for n in {k.rsplit(".", 1)[0] for k in index if k.endswith(".sorsa_merged")}
             if index[n + ".weight"] != index[n + ".sorsa_merged"]]
    fresh = sorsa_model(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a weight before its marker: W_r recovered (warned)
        for f in files:
            fresh.load_state_dict(load_file(tmp_path / "sh" / f), strict=False)
    torch.testing.assert_close(logits(fresh), logits(m), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(adapters(m).items(), adapters(fresh).values()):
        assert torch.equal(a, b), n
    if order == 1 and not split:  # every layer whole in one shard: bit-exact
        torch.testing.assert_close(logits(fresh), logits(m), rtol=0, atol=0)
    from transformers.trainer_utils import load_sharded_checkpoint
    again = sorsa_model(base_dir)
    load_sharded_checkpoint(again, str(tmp_path / "sh"), strict=False)
    torch.testing.assert_close(logits(again), logits(m), rtol=1e-5, atol=1e-5)


def test_wrapper_names_and_merged_layers(trained, base_dir, tmp_path):
    m, _ = trained
    sd = sk.checkpoints.checkpoint_state_dict(m)
    sk.merge_sorsa(m)
    try:  # a merged layer writes its weight as is
        merged = sk.checkpoints.checkpoint_state_dict(m)
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(merged[name], m.get_submodule(name[:-7]).weight.cpu())
        torch.testing.assert_close(merged[name], sd[name], rtol=0, atol=1e-6)
    finally:
        sk.unmerge_sorsa(m)
    # a state dict none of whose keys name the SORSA layers (a wrapper renamed them): refused
    renamed = {"x." + k: v for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="none of the model's SORSA layers"):
        sk.checkpoints.checkpoint_state_dict(m, renamed)


def test_all_zero_adapters_are_warned(base_dir, tmp_path):
    m = LlamaForCausalLM.from_pretrained(base_dir)
    sk.apply_sorsa(m, TARGETS, r=4, init=None)  # forgot to initialise (sorsa 1.0.1: no sorsa_init())
    sk.mark_only_sorsa_trainable(m)
    with pytest.warns(UserWarning, match="all-zero adapters"):
        trainer(m, tmp_path, 1).train()
