"""Adapters as files (save_adapter / load_adapter), disable_adapters, print_trainable_parameters,
target matching."""
import json
import os

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import sorsa_kernels as sk


class Net(nn.Module):
    """Both orientations (out < in, out > in), a GPT-2 Conv1D and an untargeted layer."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(24, 16), "c_attn": Conv1D(24, 40)})
        self.up_proj = nn.Linear(16, 40)
        self.up_proj_2 = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.up_proj_2(self.attn["c_attn"](self.up_proj(self.attn["q_proj"](x))))


TARGETS = ["q_proj", "c_attn", "up_proj"]  # substring rule: also up_proj_2


def base(seed=0):
    torch.manual_seed(seed)
    return Net()


def finetune(m, seed=1, bias=True):
    """Stand-in for training: perturb every adapter (and bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sk.sorsa_layers(m):
            for p in (layer.sorsa_A, layer.sorsa_S, layer.sorsa_B):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            if bias and layer.bias is not None:
                layer.bias.add_(0.1)
    return m


def sorsa_named(m):
    return {n: l for n, l in m.named_modules() if isinstance(l, sk.SORSALinear)}


def test_save_load_round_trip_is_bit_exact_from_base_model(tmp_path):
    m = sk.apply_sorsa(base(), TARGETS, r=4, alpha=8.0, dropout=0.05)
    finetune(m)
    sk.save_adapter(m, tmp_path)
    assert set(os.listdir(tmp_path)) == {"adapter_model.safetensors", "sorsa_config.json"}
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert not any(k.endswith(".weight") for k in keys)  # W_r is never saved
    assert "attn.q_proj.sorsa_A0" in keys and "attn.q_proj.bias" in keys
    cfg = json.loads((tmp_path / "sorsa_config.json").read_text())
    assert cfg["r"] == 4 and cfg["alpha"] == 8.0 and cfg["dropout"] == 0.05
    assert cfg["init"] == {"method": "rsvd", "seed": 0} and cfg["library_version"] == sk.__version__
    assert sorted(cfg["target_modules"]) == ["attn.c_attn", "attn.q_proj", "up_proj", "up_proj_2"]
    assert cfg["layers"]["attn.c_attn"]["kind"] == "conv1d"

    m2 = sk.load_adapter(base(), tmp_path)  # prepared from the config
    ours, theirs = sorsa_named(m), sorsa_named(m2)
    assert ours.keys() == theirs.keys()
    assert isinstance(theirs["attn.c_attn"], sk.SORSAConv1D)
    for n in ours:
        for p in ("weight", "bias", "sorsa_A", "sorsa_S", "sorsa_B"):
            a, b = getattr(ours[n], p), getattr(theirs[n], p)
            assert (a is None and b is None) or torch.equal(a, b), f"{n}.{p}"  # W_r recomputed bit-exactly
        assert theirs[n].scale == ours[n].scale and theirs[n].dropout == 0.05
    x = torch.randn(3, 24)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


@pytest.mark.parametrize("prep", ["same_seed", "other_seed", "init_none", "merged"])
def test_load_into_prepared_model(tmp_path, prep):
    m = finetune(sk.apply_sorsa(base(), TARGETS, r=4, alpha=8.0))
    sk.save_adapter(m, tmp_path)
    kw = {"init": None} if prep == "init_none" else {"seed": 7} if prep == "other_seed" else {}
    m2 = sk.apply_sorsa(base(), TARGETS, r=4, alpha=8.0, **kw)
    if prep == "merged":
        sk.merge_sorsa(m2)
    sk.load_adapter(m2, tmp_path)
    assert all(l.merged == (prep == "merged") for l in sk.sorsa_layers(m2))
    x = torch.randn(3, 24)
    m.eval(), m2.eval()
    if prep in ("same_seed", "init_none"):
        for n, l in sorsa_named(m).items():
            assert torch.equal(l.weight, sorsa_named(m2)[n].weight), n
        assert torch.equal(m(x), m2(x))
    else:  # base weight recovered from the other init: exact to rounding
        torch.testing.assert_close(m2(x), m(x), atol=1e-5, rtol=1e-5)


def test_load_mismatches_listed_and_nothing_applied(tmp_path):
    m = finetune(sk.apply_sorsa(base(), TARGETS, r=4, alpha=8.0))
    sk.save_adapter(m, tmp_path)
    # another alpha: a plain load_state_dict would pass strictly and be off
    m2 = sk.apply_sorsa(base(), TARGETS, r=4, alpha=4.0)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)4 mismatch.*alpha = 4.0 in the model, 8.0 in the adapter") as e:
        sk.load_adapter(m2, tmp_path)
    assert str(e.value).count("alpha =") == 4  # every layer listed
    assert all(torch.equal(before[k], v) for k, v in m2.state_dict().items())
    # other rank + a missing module + a SORSA layer the adapter lacks, all in one message
    m3 = base()
    m3.attn["q_proj"] = nn.Linear(24, 12)
    del m3.up_proj_2
    m3.extra = sk.SORSALinear(4, 4, r=2)
    types = {n: type(mod) for n, mod in m3.named_modules()}
    with pytest.raises(ValueError) as e:
        sk.load_adapter(m3, tmp_path)
    msg = str(e.value)
    assert "attn.q_proj: weight shape (12, 24)" in msg and "up_proj_2: no such module" in msg
    assert "SORSA layers ['extra']" in msg
    assert {n: type(mod) for n, mod in m3.named_modules()} == types  # nothing converted
    with pytest.raises(FileNotFoundError, match="sorsa_config.json"):
        sk.load_adapter(base(), tmp_path / "nope")


def test_default_init_seed_is_explicit_not_global_rng():
    torch.manual_seed(123)
    a = sk.apply_sorsa(base(), ["q_proj"], r=4)
    torch.manual_seed(456)
    b = sk.apply_sorsa(base(), ["q_proj"], r=4)
    la, lb = a.attn["q_proj"], b.attn["q_proj"]
    assert torch.equal(la.sorsa_A, lb.sorsa_A) and torch.equal(la.weight, lb.weight)
    assert la.init_config == {"method": "rsvd", "seed": 0}


def test_disable_adapters_runs_the_original_model():
    torch.manual_seed(0)
    x = torch.randn(3, 24)
    y_base = base()(x)
    m = finetune(sk.apply_sorsa(base(), TARGETS, r=4, alpha=8.0), bias=False).eval()  # biases are not adapters
    y_ft = m(x)
    assert (y_ft - y_base).abs().max() > 1e-2
    with sk.disable_adapters(m):
        torch.testing.assert_close(m(x), y_base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), y_ft)  # restored
    sk.merge_sorsa(m)
    with sk.disable_adapters(m):
        torch.testing.assert_close(m(x), y_base, atol=1e-5, rtol=1e-5)
    assert all(l.merged for l in sk.sorsa_layers(m))
    torch.testing.assert_close(m(x), y_ft, atol=1e-5, rtol=1e-5)
    # zeroing S is the residual model, not the original one
    with torch.no_grad():
        for l in sk.sorsa_layers(m):
            l.unmerge(), l.sorsa_S.zero_()
    assert (m(x) - y_base).abs().max() > 1e-2
    # a layer whose W_r came from a state dict of another model has no known initial adapter
    m2 = sk.apply_sorsa(base(seed=3), TARGETS, r=4, alpha=8.0)
    m2.load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="initial adapter of .* is unknown"):
        with sk.disable_adapters(m2):
            pass
    with pytest.raises(ValueError, match="initial adapter of .* is unknown"):
        sk.save_adapter(m2, "/nonexistent")


def test_print_trainable_parameters(capsys):
    m = sk.mark_only_sorsa_trainable(sk.apply_sorsa(base(), ["q_proj"], r=4))
    t, total = sk.print_trainable_parameters(m)
    assert t == 4 * (24 + 1 + 16)
    assert total == sum(p.numel() for p in m.parameters())
    out = capsys.readouterr().out
    assert out.strip() == f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}"


def test_target_matching_substring_default_and_peft_rule():
    names = lambda m: sorted(sorsa_named(m))  # noqa: E731
    # sorsa 1.0.1's substring rule (default, the drop-in promise): "up_proj" also hits up_proj_2
    assert names(sk.apply_sorsa(base(), ["up_proj"], r=2, init=None)) == ["up_proj", "up_proj_2"]
    # PEFT's rule: exact names or suffixes at a "." boundary
    assert names(sk.apply_sorsa(base(), ["up_proj"], r=2, init=None, match="peft")) == ["up_proj"]
    assert names(sk.apply_sorsa(base(), ["q_proj", "attn.c_attn"], r=2, init=None, match="peft")) == \
        ["attn.c_attn", "attn.q_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        sk.apply_sorsa(base(), ["proj"], r=2, init=None, match="peft")  # not a '.' boundary
    # a single str is a regex over the whole name
    assert names(sk.apply_sorsa(base(), r"up_proj(_\d)?", r=2, init=None, match="peft")) == ["up_proj", "up_proj_2"]
    assert names(sk.apply_sorsa(base(), r"attn\..*", r=2, init=None, match="peft")) == ["attn.c_attn", "attn.q_proj"]
    with pytest.raises(ValueError, match="match must be one of"):
        sk.apply_sorsa(base(), ["q_proj"], r=2, match="glob")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        sk.apply_sorsa(base(), "(", r=2, match="peft")


def test_readme_adapter_example_runs(tmp_path, monkeypatch, capsys):
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "usage.md")).read()  # moved there from README.md
    section = text[text.index("### Adapters as files"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(block, "docs/usage.md", "exec"), ns)
    assert (tmp_path / "out" / "lora" / "adapter_config.json").is_file()
    assert all(type(m) is not sk.SORSALinear for m in ns["plain"].modules())
    assert len(list(sk.sorsa_layers(ns["again"]))) == 2
    assert "trainable params" in capsys.readouterr().out


def test_round_trip_bf16_base_fp32_adapters_is_bit_exact(tmp_path):
    def bf16_base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 40)).to(torch.bfloat16)
    m = bf16_base()
    m[0] = sk.SORSALinear.from_linear(m[0], r=4, alpha=8.0, init=None)
    m[0].sorsa_init(adapter_dtype=torch.float32, method="rsvd", seed=3, niter=2)
    m[1] = sk.SORSALinear.from_linear(m[1], r=2, init="svd")
    finetune(m)
    sk.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "sorsa_config.json").read_text())
    assert cfg["r"] is None and cfg["layers"]["0"]["init"] == {"method": "rsvd", "seed": 3, "niter": 2}
    assert cfg["layers"]["0"]["adapter_dtype"] == "float32" and cfg["layers"]["1"]["adapter_dtype"] == "bfloat16"
    m2 = sk.load_adapter(bf16_base(), tmp_path)
    for a, b in zip(m, m2):
        assert b.sorsa_A.dtype == a.sorsa_A.dtype and b.weight.dtype == torch.bfloat16
        assert torch.equal(a.weight, b.weight) and torch.equal(a.sorsa_S, b.sorsa_S)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    assert torch.equal(m.eval()(x), m2.eval()(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_onto_other_base_weights_is_refused(tmp_path, dtype):
    """Same architecture, other base weights: W_r would subtract a principal part that is not the
    new base's, a quietly wrong model. The saved base fingerprint catches it for every layer."""
    m = finetune(sk.apply_sorsa(base().to(dtype), TARGETS, r=4, alpha=8.0))
    sk.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "sorsa_config.json").read_text())
    assert set(cfg["layers"]["up_proj"]["base_fingerprint"]) == {"numel", "sum", "sumsq", "proj"}
    for other in (base(123).to(dtype), sk.apply_sorsa(base(123).to(dtype), TARGETS, r=4, alpha=8.0)):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="base weight differs") as e:
            sk.load_adapter(other, tmp_path)
        assert str(e.value).count("base weight differs") == 4  # every layer listed
        assert other.state_dict().keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
        sk.load_adapter(other, tmp_path, check_base=False)  # the user's explicit choice
    # a base with one layer's weight permuted (same statistics but order) is caught too
    perm = base().to(dtype)
    with torch.no_grad():
        perm.up_proj.weight.copy_(perm.up_proj.weight.flip(0))
    with pytest.raises(ValueError, match=r"(?s)1 mismatch.*up_proj: base weight differs"):
        sk.load_adapter(perm, tmp_path)
    # the right base loads, from the plain model and from one prepared with another seed, merged
    sk.load_adapter(base().to(dtype), tmp_path)
    sk.load_adapter(sk.merge_sorsa(sk.apply_sorsa(base().to(dtype), TARGETS, r=4, alpha=8.0, seed=9)), tmp_path)
    with pytest.raises(TypeError, match="check_base must be a bool"):
        sk.load_adapter(base(), tmp_path, check_base="no")


def test_adapter_without_fingerprint_loads_with_a_warning(tmp_path):
    m = finetune(sk.apply_sorsa(base(), TARGETS, r=4, alpha=8.0))
    sk.save_adapter(m, tmp_path)
    p = tmp_path / "sorsa_config.json"
    cfg = json.loads(p.read_text())
    for spec in cfg["layers"].values():
        del spec["base_fingerprint"]
    p.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no base-weight fingerprint"):
        m2 = sk.load_adapter(base(), tmp_path)
    x = torch.randn(3, 24)
    assert torch.equal(m.eval()(x), m2.eval()(x))


def test_files_written_through_a_training_wrapper_load_into_the_plain_model(tmp_path):
    """save_adapter(engine) / (DDP(model)): the wrapper's ``module.`` prefix is not written (a
    DeepSpeed engine or DDP is unwrapped), so the file loads into the model it wrapped."""
    torch.manual_seed(0)
    model = sk.apply_sorsa(nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8)), ["0", "1"], r=2, init="svd")
    with torch.no_grad():
        model[0].sorsa_S.add_(0.1)
    Engine = type("DeepSpeedEngine", (nn.Module,), {})  # what deepspeed.initialize returns, by name
    engine = Engine()
    engine.module = model
    sk.save_adapter(engine, str(tmp_path / "a"))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
    assert sk.load_adapter(plain, str(tmp_path / "a")) is plain
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain(x), model(x))
    wrapped = Engine()
    torch.manual_seed(0)
    wrapped.module = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
    assert sk.load_adapter(wrapped, str(tmp_path / "a")) is wrapped
    torch.testing.assert_close(wrapped.module(x), model(x))
