"""Deployment: export_lora read by the real peft package, merge_and_unload (issues 9 and 13)."""
import json

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import sorsa_kernels as sk

peft = pytest.importorskip("peft", reason="peft comes with the [test] extra")


class LinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.up_proj, self.down_proj = nn.Linear(24, 16), nn.Linear(16, 40), nn.Linear(40, 24, bias=False)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.up_proj(self.q_proj(x))))


class GPT2ish(nn.Module):
    """GPT-2's layout: transformers Conv1D, weight stored in×out."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(48, 24), Conv1D(24, 48)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_attn(x)))


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls()


def finetune(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sk.sorsa_layers(m):
            for p in (layer.sorsa_A, layer.sorsa_S, layer.sorsa_B):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def assert_fp32_rounding(got, want, what):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{what}: error {err:.3g}"


@pytest.mark.parametrize("cls,targets,ranks", [
    (LinNet, ["q_proj", "up_proj", "down_proj"], (4, 4)),
    (LinNet, ["q_proj", "up_proj", "down_proj"], (4, 2)),  # two ranks: PEFT rank_pattern
    (GPT2ish, ["c_attn", "c_proj"], (3, 3)),
])
def test_export_delta_lora_loads_in_peft_on_original_base(tmp_path, cls, targets, ranks):
    x = torch.randn(5, 24)
    m = make(cls)
    sk.apply_sorsa(m, targets[:1], r=ranks[0], alpha=2.0 * ranks[0])
    sk.apply_sorsa(m, targets[1:], r=ranks[1], alpha=8.0)
    sk.save_adapter(m, tmp_path / "init")  # right after init
    finetune(m)
    y = m(x)
    assert (y - make(cls)(x)).abs().max() > 1e-2  # the fine-tune changed the function
    sk.export_lora(m, tmp_path / "lora", initial_adapter=str(tmp_path / "init"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 * min(ranks) and cfg["lora_alpha"] == cfg["r"]
    assert cfg["fan_in_fan_out"] == (cls is GPT2ish)
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert keys[f"base_model.model.{targets[0]}.lora_A.weight"].shape[0] == 2 * ranks[0]
    assert keys[f"base_model.model.{targets[-1]}.lora_B.weight"].shape[1] == 2 * ranks[1]
    pm = peft.PeftModel.from_pretrained(make(cls), str(tmp_path / "lora")).eval()
    assert_fp32_rounding(pm(x), y, "peft on the original base")
    # the layers' own initial adapter gives the same export
    sk.export_lora(m, tmp_path / "lora2")
    again = load_file(tmp_path / "lora2" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in keys.items())


def test_export_residual_lora_on_residual_base(tmp_path):
    x = torch.randn(5, 24)
    m = finetune(sk.apply_sorsa(make(GPT2ish), ["c_attn", "c_proj"], r=3, alpha=6.0))
    sk.export_lora(m, tmp_path, kind="residual")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 3
    from safetensors.torch import load_file
    base = make(GPT2ish)
    missing, unexpected = base.load_state_dict(load_file(tmp_path / "residual_weights.safetensors"), strict=False)
    assert not unexpected and sorted(missing) == ["c_attn.bias", "c_proj.bias"]  # weights only, base layout
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert_fp32_rounding(pm(x), m(x), "residual LoRA on the W_r base")
    # on the original base it is wrong: that is what kind="delta" is for
    wrong = peft.PeftModel.from_pretrained(make(GPT2ish), str(tmp_path)).eval()
    assert (wrong(x) - m(x)).abs().max() > 1e-2


def test_export_errors(tmp_path):
    m = finetune(sk.apply_sorsa(make(LinNet), ["q_proj"], r=2))
    with pytest.raises(ValueError, match="kind must be one of"):
        sk.export_lora(m, tmp_path, kind="full")
    other = sk.apply_sorsa(make(LinNet), ["up_proj"], r=2)
    sk.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="q_proj: not in"):
        sk.export_lora(m, tmp_path / "x", initial_adapter=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="no SORSA layer"):
        sk.export_lora(make(LinNet), tmp_path / "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unload_gives_plain_modules(dtype):
    x = torch.randn(5, 24)
    for cls, targets, plain in ((LinNet, ["proj"], nn.Linear), (GPT2ish, ["c_"], Conv1D)):
        m = make(cls).to(dtype)
        finetune(sk.apply_sorsa(m, targets, r=3, alpha=6.0))
        y = m(x.to(dtype))
        merged_ref = {n: l.effective_weight().to(dtype) for n, l in m.named_modules() if isinstance(l, sk.SORSALinear)}
        out = sk.merge_and_unload(m)
        assert out is m and not list(sk.sorsa_layers(m))
        for n, ref_w in merged_ref.items():
            mod = m.get_submodule(n)
            assert type(mod) is plain and mod.weight.dtype == dtype
            assert torch.equal(mod.weight.T if plain is Conv1D else mod.weight, ref_w), n
        torch.testing.assert_close(m(x.to(dtype)), y, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
        assert all(not k.startswith("sorsa") and "sorsa_" not in k for k in m.state_dict())
        assert set(m.state_dict()) == set(make(cls).state_dict())  # loads as the base model
