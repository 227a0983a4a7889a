"""examples/train_tiny_llama.py runs end to end on the CPU (Trainer, SORSA and PEFT KaSA +
accelerate): the loss falls, adapters are saved, and the exported LoRA loaded by the real peft
onto the original base reproduces the fine-tuned model."""
import importlib.util
import os

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_tiny_llama.py")


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_llama", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_llama_sorsa_and_kasa(tmp_path):
    ex = load_example()
    results = ex.main(["--method", "both", "--steps", "20", "--out", str(tmp_path)])
    assert [r["method"] for r in results] == ["sorsa", "kasa"]
    for r in results:
        assert r["last_loss"] < r["first_loss"] - 0.05, r
        assert r["export_max_abs_diff"] < 1e-4, r
        assert os.path.isfile(tmp_path / r["method"] / "lora" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "sorsa" / "adapter" / "sorsa_config.json")
    assert os.path.isfile(tmp_path / "kasa" / "adapter" / "adapter_config.json")
    assert results[1]["accelerated"] == 14  # 7 projections × 2 layers on the fused op


def test_readme_peft_section_runs(tmp_path, monkeypatch):
    import re

    import torch

    text = open(os.path.join(os.path.dirname(EXAMPLE), "..", "docs", "usage.md")).read()  # moved from README.md
    section = text[text.index("### Using with PEFT"):]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(block, "docs/usage.md#using-with-peft", "exec"), ns)
    assert len(ns["report"].accelerated) == 2 and not ns["report"].skipped
    model, again, x = ns["model"], ns["again"], ns["x"]
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert (again(x) - y).abs().max() < 1e-5 * max(1.0, y.abs().max().item())
