"""The design-switch A/B (``python -m sorsa_kernels.bench.ab``, run by gpu_check.sh): each variant
really runs with its switch flipped, the shipped defaults come back afterwards, and the rows carry
ratios against the default of the same round."""
import json
import subprocess
import sys

import pytest
import torch

from sorsa_kernels.bench import ab
from sorsa_kernels.kernels import linear_launch as L

from conftest import needs_triton

pytestmark = needs_triton


def test_ab_flips_one_switch_per_variant_and_restores_defaults(monkeypatch):
    seen = []
    real = L.one_pass_dy
    monkeypatch.setattr(L, "one_pass_dy", lambda *a: seen.append((L.TMA_FLATTEN, L.OVERLAP, L.ONE_PASS_DY))
                        or real(*a))
    rows = ab.run_ab(torch.device("cpu"), rounds=2, min_sample_ms=1.0)
    assert [r["variant"] for r in rows] == ["default", "TMA_FLATTEN=False", "OVERLAP=False", "ONE_PASS_DY=False"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert set(seen) == {(True, True, None), (False, True, None), (True, False, None), (True, True, False)}
    assert (L.TMA_FLATTEN, L.OVERLAP, L.ONE_PASS_DY) == (True, True, None)
    assert "ONE_PASS_DY=False" in ab.table(rows)


def test_ab_cli_writes_json(tmp_path):
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, "-m", "sorsa_kernels.bench.ab", "--rounds", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "design switch A/B" in r.stdout
    assert len(json.loads(out.read_text())["rows"]) == 4


def test_ab_cli_without_gpu_or_interpreter_says_why():
    r = subprocess.run([sys.executable, "-m", "sorsa_kernels.bench.ab"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the A/B runs there")
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr
