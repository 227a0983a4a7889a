"""sorsa_kernels.compat: sorsa 1.0.1's Hugging Face API (its README's script with only the import
changed), checked against sorsa 1.0.1's own layer math (``sorsa/layer.py`` loaded by path) and
against directories in the format its ``SORSAModel.save_pretrained`` writes."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import sorsa_kernels as sk
from trainer_helpers import affine_dataset
from sorsa_kernels import compat

TARGETS = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # sorsa's README
VOCAB, SEQ = 96, 24
N_LAYERS = 2 * len(TARGETS)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved as a local "hub" checkpoint (random weights, no download)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def dataset(n=64, seed=1):
    return affine_dataset(n, VOCAB, SEQ, seed)


def ids(seed=5):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def perturb(params, seed=3, eps=0.05):
    """Move adapters off their (orthonormal) init, as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(eps * torch.randn(p.shape, generator=g))


def sorsa_model(base_dir, rank=4, alpha=8.0, seed=3):
    model = compat.SORSAModel(compat.SORSAConfig(base_model_name_or_path=base_dir, rank=rank, alpha=alpha,
                                                 target_modules=TARGETS))
    model.sorsa_init()
    perturb(model.get_parameters(), seed)
    return model


def training_args(out_dir, **kw):
    kw = {"max_steps": 1, "per_device_train_batch_size": 16, "learning_rate": 1e-2,
          "lr_scheduler_type": "constant", "save_strategy": "no", "report_to": [], "use_cpu": True,
          "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0, **kw}
    return compat.SORSATrainingArguments(output_dir=str(out_dir), **kw)


def test_readme_training_script_runs_with_only_the_import_changed(base_dir, tmp_path):
    from sorsa_kernels.compat import SORSAConfig, SORSAModel, SORSATrainer, SORSATrainingArguments
    train_dataset = dataset()
    # sorsa 1.0.1's README, base model and device changed (no download, no GPU)
    config = SORSAConfig(
        base_model_name_or_path=base_dir,
        target_modules=["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        rank=16,
        dropout=0,
    )
    sorsaModel = SORSAModel(config)
    sorsaModel.to("cpu")
    sorsaModel.sorsa_init()  # Initialize SORSA adapters.
    trainingArguments = SORSATrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=16, learning_rate=1e-2,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        gamma=4e-4,
    )
    trainer = SORSATrainer(
        model=sorsaModel,
        args=trainingArguments,
        train_dataset=train_dataset,
    )
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"] - 0.5, logs
    # the last regularizer value is logged as sorsa's Trainer does; adapters drift off orthonormal
    assert all(0 < h["orthonormality"] < 1 for h in logs)
    assert logs[-1]["orthonormality"] == pytest.approx(float(sk.calc_ortho(sorsaModel).detach()), rel=0.5)
    assert trainingArguments.remove_unused_columns is False
    assert sum(isinstance(m, compat.Linear) for m in sorsaModel.modules()) == N_LAYERS


def test_regularizer_step_is_gamma_over_lr_times_the_reference_gradient(base_dir, tmp_path, monkeypatch, ref):
    """One SGD step with gamma minus the same step with gamma = 0 is -lr·(gamma/lr)·∇calc_ortho,
    the gradient taken with sorsa 1.0.1's own calc_ortho, both where the Trainer has the
    pre-optimizer-step event (transformers >= 4.45) and through the optimizer pre-hook used
    before it. S gets no regularizer gradient."""
    model = sorsa_model(base_dir)
    model.set_trainable()
    lr, gamma = 0.1, 0.05
    probe = copy.deepcopy(model)
    ref.calc_ortho(probe).backward()
    expected = {n: -lr * (gamma / lr) * p.grad for n, p in probe.named_parameters() if p.grad is not None}

    def step(g, hook=False):
        m = copy.deepcopy(model)
        with monkeypatch.context() as mp:
            if hook:
                mp.setattr(compat, "_has_pre_optimizer_event", lambda: False)
            trainer = compat.SORSATrainer(model=m, args=training_args(tmp_path, learning_rate=lr, optim="sgd",
                                                                      gamma=g), train_dataset=dataset(16))
            # the event where the Trainer fires it (transformers >= 4.45), else the optimizer pre-hook
            assert (trainer.sorsa_callback in trainer.callback_handler.callbacks) == compat._has_pre_optimizer_event()
            trainer.train()
        return dict(m.named_parameters())

    without = step(0.0)
    for hook in (False, True):
        with_reg = step(gamma, hook)
        assert set(expected) == {n for n in with_reg if "sorsa_A" in n or "sorsa_B" in n}
        for n, p in with_reg.items():
            if "sorsa_" not in n:
                continue
            delta = p.detach() - without[n].detach()
            want = expected.get(n, torch.zeros_like(delta))
            torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n} (hook={hook}): {s}")
        assert max(e.abs().max() for e in expected.values()) > 1e-3  # the check is not vacuous


def reference_sorsa_state(ref, base_dir, rank=4, alpha=8.0, seed=3):
    """What sorsa 1.0.1's SORSAModel holds after ``sorsa_init`` and training, built from its own
    layer (``sorsa/layer.py``) and replacement rule: the wrapped model, and the wrapper's state
    dict (keys ``model.<name>``)."""
    base = LlamaForCausalLM.from_pretrained(base_dir)
    for name, lin in list(base.named_modules()):
        if isinstance(lin, nn.Linear) and any(t in "model." + name for t in TARGETS):
            layer = ref.Linear(lin.in_features, lin.out_features, r=rank, alpha=alpha, bias=lin.bias is not None)
            layer.weight.data = lin.weight.data.clone()
            layer.sorsa_init()
            perturb([layer.sorsa_A, layer.sorsa_S, layer.sorsa_B], seed + len(name))
            base.set_submodule(name, layer)
    base.eval()
    return base, {"model." + k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}


def write_sorsa_dir(path, sd, layout, base_dir, rank=4, alpha=8.0):
    """A directory as sorsa 1.0.1's ``SORSAModel.save_pretrained`` writes it under transformers 4.42:
    ``config.json`` and one safetensors file, safetensors shards with an index, or a ``.bin``."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"alpha": alpha, "architectures": ["SORSAModel"], "base_model_name_or_path": base_dir,
                   "dropout": 0, "model_type": "sorsa", "rank": rank, "target_modules": TARGETS,
                   "torch_dtype": "float32", "transformers_version": "4.42.4"}, f, indent=2)
    if layout == "safetensors":
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:  # split between a layer's weight and its sorsa_A: shards need not hold whole layers
        keys = list(sd)
        cut = next(i for i, k in enumerate(keys) if k.endswith(".sorsa_A"))
        shards = {"model-00001-of-00002.safetensors": keys[:cut], "model-00002-of-00002.safetensors": keys[cut:]}
        for fname, ks in shards.items():
            save_file({k: sd[k] for k in ks}, os.path.join(path, fname), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_directory_in_sorsa_format_loads_with_equal_outputs(base_dir, tmp_path, ref, layout):
    theirs, sd = reference_sorsa_state(ref, base_dir)
    write_sorsa_dir(str(tmp_path / "ckpt"), sd, layout, base_dir)
    ours = compat.SORSAModel.from_pretrained(str(tmp_path / "ckpt"))
    assert not ours.training and ours.config.rank == 4 and ours.config.alpha == 8.0
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids()).logits, theirs(input_ids=ids()).logits,
                                   rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trip_writes_sorsa_format(base_dir, tmp_path, ref, monkeypatch):
    model = sorsa_model(base_dir)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    residual = {n: m.residual_weight().clone() for n, m in model.named_modules() if isinstance(m, compat.Linear)}
    model.merge(True)  # a merged model still saves W_r (sorsa 1.0.1 would save the merged weight)
    model.save_pretrained(str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    _, reference_sd = reference_sorsa_state(ref, base_dir)
    assert set(saved) == set(reference_sd)  # exactly sorsa 1.0.1's keys
    for n, W_r in residual.items():  # W_r to rounding: the layer takes the merged delta out again
        torch.testing.assert_close(saved[n + ".weight"], W_r, rtol=0, atol=1e-6)
    # sorsa 1.0.1's layer loads a saved layer strictly and computes the same
    name = "model.model.layers.1.mlp.down_proj"
    theirs = ref.Linear(160, 64, r=4, alpha=8.0)
    theirs.load_state_dict({k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")})
    x = torch.randn(3, 160)
    model.merge(False)
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(name)(x), theirs(x), rtol=1e-5, atol=1e-5)

    back = compat.SORSAModel.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-5)
    assert not any(m.merged for m in sk.sorsa_layers(back))
    # a hub id goes through huggingface_hub.snapshot_download with the hub arguments
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path / "out"))
    hub = compat.SORSAModel.from_pretrained("someone/sorsa-tiny", revision="v1", torch_dtype=torch.float64)
    assert calls[0][0] == "someone/sorsa-tiny" and calls[0][1]["revision"] == "v1"
    assert all(p.dtype == torch.float64 for p in hub.parameters())
    # forward and generate are the wrapped model's
    mask = torch.ones_like(ids())
    gen = back.generate(input_ids=ids(), attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, back.model.generate(input_ids=ids(), attention_mask=mask, max_new_tokens=3,
                                                do_sample=False))
    assert back.get_input_embeddings() is back.model.get_input_embeddings()
    # what TrainingArguments(gradient_checkpointing=True) calls, by its name in this transformers
    getattr(back, "activation_checkpointing_enable", back.gradient_checkpointing_enable)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in back.model.modules())
    back.set_trainable()  # frozen embeddings: gradients must still reach the checkpointed blocks
    back.train()
    back(input_ids=ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in back.get_parameters())


def test_merge_modes_match_the_reference_layer(base_dir, ref):
    model = sorsa_model(base_dir)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    layers = {n: m for n, m in model.named_modules() if isinstance(m, compat.Linear)}
    merged_ref, residual = {}, {}
    for n, m in layers.items():
        theirs = ref.Linear(m.in_features, m.out_features, r=4, alpha=8.0)
        theirs.load_state_dict(m.state_dict())
        theirs._merge(True)
        merged_ref[n], residual[n] = theirs.weight.detach().clone(), m.weight.detach().clone()
    for _ in range(2):  # merging twice is merging once
        model.merge(True)
        for n, m in layers.items():
            assert m.merged
            torch.testing.assert_close(m.weight, merged_ref[n], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-5)
    model.merge(mode=False)
    for n, m in layers.items():
        assert not m.merged
        torch.testing.assert_close(m.weight, residual[n], rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="mode must be a bool"):
        model.merge("yes")


def test_parameters_trainable_state_and_calc_ortho(base_dir, ref):
    model = sorsa_model(base_dir)
    params = model.get_parameters()
    assert [id(p) for p in params] == [id(p) for n, p in model.named_parameters() if "sorsa_" in n]
    assert len(params) == 3 * N_LAYERS
    # as in sorsa 1.0.1: the wrapped weights are frozen, everything else keeps requires_grad
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n + ".weight" for n, m in model.named_modules() if isinstance(m, compat.Linear)}
    model.set_trainable()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                          if "sorsa_" in n}
    model.set_trainable(False)
    assert not any(p.requires_grad for p in model.parameters())
    assert float(compat.calc_ortho(model)) == pytest.approx(float(ref.calc_ortho(model)), rel=1e-5)
    assert compat.Linear is sk.SORSALinear and compat.SORSALinear is sk.SORSALinear


def test_bad_arguments_raise_naming_them(base_dir, tmp_path):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        compat.SORSAConfig(rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        compat.SORSAConfig(rank="4")
    with pytest.raises(ValueError, match="dropout must be in"):
        compat.SORSAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="alpha must be finite"):
        compat.SORSAConfig(alpha=float("inf"))
    with pytest.raises(TypeError, match="target_modules must be"):
        compat.SORSAConfig(target_modules=5)
    with pytest.raises(ValueError, match="base_model_name_or_path must name"):
        compat.SORSAModel(compat.SORSAConfig())
    with pytest.raises(TypeError, match="config must be a SORSAConfig"):
        compat.SORSAModel(LlamaConfig())
    with pytest.raises(ValueError, match="matched no nn.Linear"):  # sorsa's default targets are BERT's
        compat.SORSAModel(compat.SORSAConfig(base_model_name_or_path=base_dir))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        training_args(tmp_path, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma must be a finite"):
        training_args(tmp_path, gamma=float("nan"))
    model = compat.SORSAModel(compat.SORSAConfig(base_model_name_or_path=base_dir, target_modules=TARGETS))
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="args must be a SORSATrainingArguments"):
        compat.SORSATrainer(model=model, args=plain)
    with pytest.raises(TypeError, match="init=None takes no SVD arguments|takes no extra arguments"):
        model.sorsa_init(niter=4)  # the exact SVD has no iterations
    tok = object()  # sorsa's tokenizer= became processing_class= in transformers 5
    trainer = compat.SORSATrainer(model=model, args=training_args(tmp_path), tokenizer=tok)
    assert getattr(trainer, "processing_class", None) is tok or trainer.tokenizer is tok

    ckpt = str(tmp_path / "ckpt")
    model.save_pretrained(ckpt)
    with pytest.raises(TypeError, match=r"does not take \['device_map'\]"):
        compat.SORSAModel.from_pretrained(ckpt, device_map="auto")
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 checkpoint tensors not in the model \['model.extra.weight'\]"):
        compat.SORSAModel.from_pretrained(ckpt)
    sd.pop("model.model.norm.weight")
    save_file(sd, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 model tensors not in the checkpoint \['model.model.norm.weight'\]"):
        compat.SORSAModel.from_pretrained(ckpt)
    os.remove(os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        compat.SORSAModel.from_pretrained(ckpt)
