"""The paper's analysis (ΔΣ, ΔD per weight): float32 batched vs the float64 formulas, every kind of
source (modules read as the weights they compute with, state dicts, safetensors files and folders,
lists of checkpoints), clear errors, the CLI's JSON and plot, and tracking in a real Trainer run."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk
from sorsa_kernels.analysis import mean_shift, spectral_shift_naive, weights_of
from sorsa_kernels.synthetic import synthetic_weights


def _close(got, want, rel=1e-5, abs=1e-6):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=rel, abs=abs), n


def _pair(seed=0, shapes=((96, 64), (96, 64), (80, 120)), rank=8, scale=0.05):
    """LLM-like base weights and a low-rank update of them (what fine-tuning makes)."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i, (m, n) in enumerate(shapes):
        W = synthetic_weights(1, m, n, seed=seed + i)[0]
        d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / (m * n) ** 0.5
        base[f"layers.{i}.weight"], tuned[f"layers.{i}.weight"] = W, W + scale * W.norm() / d.norm() * d
    return base, tuned


def test_float32_batched_matches_the_float64_formulas():
    base, tuned = _pair()
    got = sk.spectral_shift(base, tuned)
    assert sorted(got) == sorted(base)
    for n in base:
        ds, dd = spectral_shift_naive(base[n], tuned[n])
        assert abs(got[n][0] - ds) <= 1e-3 * ds, (n, got[n], ds)
        assert abs(got[n][1] - dd) <= 1e-4, (n, got[n], dd)
        assert ds > 0 and dd > 0


def test_identical_models_give_zero_and_bf16_is_read_in_float32():
    base, _ = _pair()
    same = sk.spectral_shift(base, {k: v.clone() for k, v in base.items()})
    assert all(abs(a) < 1e-6 and abs(b) < 1e-5 for a, b in same.values()), same
    half = {k: v.bfloat16() for k, v in base.items()}
    got = sk.spectral_shift(half, {k: v.clone() for k, v in half.items()})
    assert all(abs(a) < 1e-6 and abs(b) < 1e-5 for a, b in got.values())


def test_sorsa_module_is_read_as_its_merged_weight_without_changing_it():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    tuned = sk.apply_sorsa(copy.deepcopy(base), ["0", "2"], r=4)
    with torch.no_grad():
        for layer in sk.sorsa_layers(tuned):
            layer.sorsa_B.add_(0.05 * torch.randn_like(layer.sorsa_B))
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    got = sk.spectral_shift(base, tuned)
    assert sorted(got) == ["0.weight", "2.weight"]
    merged = {n: layer.effective_weight() for n, layer in
              (("0.weight", tuned[0]), ("2.weight", tuned[2]))}
    want = sk.spectral_shift(base.state_dict(), merged)
    for n in got:
        assert got[n] == pytest.approx(want[n], rel=1e-5, abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in tuned.state_dict().items())  # unchanged
    assert not any(layer.merged for layer in sk.sorsa_layers(tuned))


def test_peft_lora_module_is_read_as_its_merged_weight():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(24, 40)
            self.v = nn.Linear(24, 40)

        def forward(self, x):
            return self.q(x) + self.v(x)
    base = Tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    got = sk.spectral_shift(base, pm)
    assert sorted(got) == ["q.weight", "v.weight"]  # PEFT's prefix and base_layer dropped
    merged = copy.deepcopy(pm).merge_and_unload()
    want = sk.spectral_shift(base, merged)
    for n in got:
        assert got[n] == pytest.approx(want[n], rel=1e-5, abs=1e-6)


def test_files_folders_lists_and_names(tmp_path):
    from safetensors.torch import save_file
    base, tuned = _pair()
    save_file(base, str(tmp_path / "base.safetensors"))
    shard = tmp_path / "tuned"
    shard.mkdir()
    keys = sorted(tuned)
    save_file({k: tuned[k] for k in keys[:2]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({k: tuned[k] for k in keys[2:]}, str(shard / "model-00002-of-00002.safetensors"))
    want = sk.spectral_shift(base, tuned)
    got = sk.spectral_shift(str(tmp_path / "base.safetensors"), str(shard))
    _close(got, want)
    both = sk.spectral_shift(base, [tuned, base])
    _close(both[0], want)
    assert all(abs(a) < 1e-6 for a, _ in both[1].values())
    only = sk.spectral_shift(base, tuned, names=["layers.2"])
    assert list(only) == ["layers.2.weight"]
    assert list(sk.spectral_shift(base, tuned, names=r"layers\.[01]\.")) == ["layers.0.weight", "layers.1.weight"]


def test_mismatched_models_are_listed_in_one_clear_error():
    base, tuned = _pair()
    tuned.pop("layers.0.weight")
    tuned["extra.weight"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"lacks 1 weight.*layers\.0\.weight[\s\S]*has 1 weight.*extra\.weight"):
        sk.spectral_shift(base, tuned)
    base2, tuned2 = _pair()
    tuned2["layers.1.weight"] = torch.randn(5, 5)
    tuned2["layers.2.weight"] = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"2 weight\(s\) of another shape: layers\.1\.weight: \(5, 5\).*layers\.2"):
        sk.spectral_shift(base2, tuned2)  # every mismatch in one error, before any SVD
    with pytest.raises(ValueError, match="no 2-D weight of the base matches"):
        sk.spectral_shift(base2, tuned2, names=["nope"])
    with pytest.raises(TypeError, match="a source must be"):
        weights_of(42)
    meta = {k: v.to("meta") for k, v in base.items()}
    with pytest.raises(ValueError, match="meta device"):
        sk.spectral_shift(meta, base)


def test_adapter_checkpoints_and_unsupported_peft_layers_get_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    base, _ = _pair()
    m = sk.apply_sorsa(nn.Sequential(nn.Linear(16, 24)), ["0"], r=2)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "sorsa.safetensors"))
    with pytest.raises(ValueError, match=r"holds adapter factors .*sk\.load_adapter"):
        sk.spectral_shift(str(tmp_path / "sorsa.safetensors"), str(tmp_path / "sorsa.safetensors"))
    peft = pytest.importorskip("peft")
    emb = nn.Module()
    emb.e = nn.Embedding(10, 8)
    emb.q = nn.Linear(8, 8)
    pm = peft.get_peft_model(copy.deepcopy(emb), peft.LoraConfig(r=2, target_modules=["e", "q"]))
    with pytest.raises(ValueError, match=r"is a PEFT .*Embedding layer.*merge_and_unload"):
        sk.spectral_shift(emb, pm)


@pytest.mark.parametrize("variant", ["kasa", "dora"])
def test_peft_variants_are_read_as_the_weight_their_forward_uses(variant):
    """KaSA's diag and DoRA's magnitude are not in get_delta_weight: the weight must be the one the
    layer's forward computes with (checked by running the layer on the identity)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40, bias=False))
    kw = dict(use_dora=True) if variant == "dora" else {}
    if variant == "kasa":  # peft >= 0.21 (the test extra) has KaSA
        kw = dict(kasa_config=peft.KasaConfig())
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        W_forward = layer(torch.eye(24)).T  # the layer's output on the basis vectors: its weight
    got = sk.spectral_shift(base, pm)["0.weight"]
    want = sk.spectral_shift(base, {"0.weight": W_forward})["0.weight"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_chunking_gives_the_same_numbers():
    base, tuned = _pair(shapes=((64, 48),) * 5)
    whole = sk.spectral_shift(base, tuned)
    small = sk.spectral_shift(base, tuned, chunk_bytes=1)  # one matrix at a time
    _close(small, whole, rel=1e-6, abs=1e-7)


def test_base_svd_cache_is_reused_and_keyed_by_the_weights(tmp_path, monkeypatch):
    from sorsa_kernels import analysis
    base, tuned = _pair()
    want = sk.spectral_shift(base, tuned)
    calls = []
    real = analysis._svd
    monkeypatch.setattr(analysis, "_svd", lambda W: calls.append(W.shape[0]) or real(W))
    first = sk.spectral_shift(base, tuned, cache_dir=str(tmp_path))
    n_first = len(calls)
    files = sorted(os.listdir(tmp_path))
    again = sk.spectral_shift(base, tuned, cache_dir=str(tmp_path))
    _close(first, want)
    _close(again, want)
    assert len(calls) - n_first == n_first - len(files)  # the second call decomposes only the tuned chunks
    changed = {k: v.clone() for k, v in base.items()}
    changed["layers.0.weight"][0, 0] += 1.0
    sk.spectral_shift(changed, tuned, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == len(files) + 1  # that chunk's bytes changed: a new entry


def test_cli_analyze_writes_json_and_plot_that_agree_with_the_api(tmp_path):
    from safetensors.torch import save_file
    base, tuned = _pair()
    _, tuned2 = _pair(seed=0, scale=0.1)
    for name, sd in (("base", base), ("t1", tuned), ("t2", tuned2)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    out, png = tmp_path / "shift.json", tmp_path / "shift.png"
    r = subprocess.run([sys.executable, "-m", "sorsa_kernels.cli", "analyze", str(tmp_path / "base.safetensors"),
                        str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors"), "--json", str(out),
                        "--plot", str(png), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    want = sk.spectral_shift(base, [tuned, tuned2])
    assert [c["path"] for c in data["checkpoints"]] == [str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors")]
    for cp, w in zip(data["checkpoints"], want):
        for n, (a, b) in w.items():
            assert cp["layers"][n]["delta_sigma"] == pytest.approx(a) and cp["layers"][n]["delta_d"] == pytest.approx(b)
        assert (cp["mean"]["delta_sigma"], cp["mean"]["delta_d"]) == pytest.approx(mean_shift(w))
    # a larger update moves further
    assert data["checkpoints"][1]["mean"]["delta_sigma"] > data["checkpoints"][0]["mean"]["delta_sigma"]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean ΔΣ" in r.stdout


def test_tracker_and_trainer_callback_record_a_trajectory(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    sk.apply_sorsa(model, ["q_proj", "v_proj"], r=4, alpha=4)
    sk.mark_only_sorsa_trainable(model)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": t, "labels": t.clone()} for t in torch.randint(0, 64, (64, 16), generator=g)]
    cb = sk.SpectralShiftCallback(every=2, names=["q_proj", "v_proj"], json_path=str(tmp_path / "t.json"),
                                  plot=str(tmp_path / "t.png"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=8,
                             learning_rate=5e-2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert cb.tracker.steps == [2, 4, 5]
    means = [mean_shift(r) for r in cb.tracker.results]
    assert means[0][0] > 0 and means[-1][0] >= means[0][0]  # the adapters move away from the base
    logged = [h for h in trainer.state.log_history if "spectral_delta_sigma" in h]
    assert [h["step"] for h in logged] == [2, 4, 5]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert len(saved["checkpoints"]) == 3 and (tmp_path / "t.png").exists()
    assert set(saved["checkpoints"][0]["layers"]) == {"model.layers.0.self_attn.q_proj.weight",
                                                      "model.layers.0.self_attn.v_proj.weight"}
