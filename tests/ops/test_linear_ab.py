"""The design-switch A/B (``python -m sorsa_kernels.ops.linear.ab``, run by gpu_check.sh): each variant
really runs with its switch flipped, the shipped defaults come back afterwards, and the rows carry
ratios against the default of the same round."""
import json
import subprocess
import sys

import pytest
import torch

from sorsa_kernels.ops.linear import ab
from sorsa_kernels.ops.linear import launch as L

from conftest import needs_triton

pytestmark = needs_triton


def test_ab_flips_one_switch_per_variant_and_restores_defaults(monkeypatch):
    seen = []
    real = L.one_pass_dy
    now = lambda: (L.options().tma_flatten, L.options().overlap, L.options().one_pass_dy)  # noqa: E731
    monkeypatch.setattr(L, "one_pass_dy", lambda *a: seen.append(now()) or real(*a))
    rows = ab.run_ab(torch.device("cpu"), rounds=2, min_sample_ms=1.0)
    assert [r["variant"] for r in rows] == ["default", "tma_flatten=False", "overlap=False", "one_pass_dy=False"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert set(seen) == {(True, True, None), (False, True, None), (True, False, None), (True, True, False)}
    assert now() == (True, True, None) and L.options() == L.LaunchOptions()
    assert "one_pass_dy=False" in ab.table(rows)


def test_launch_options_are_frozen_scoped_and_checked():
    import dataclasses
    import pytest
    with pytest.raises(dataclasses.FrozenInstanceError):
        L.options().overlap = False
    with L.launch_options(overlap=False, reserve_sms=8) as o:
        assert o is L.options() and (o.overlap, o.reserve_sms, o.tma_flatten) == (False, 8, True)
        with L.launch_options(overlap=True):
            assert L.options().overlap and L.options().reserve_sms == 8
        assert not L.options().overlap
    assert L.options() == L.LaunchOptions()
    with pytest.raises(TypeError, match="unknown launch option"):
        with L.launch_options(Overlap=False):
            pass


def test_ab_cli_writes_json(tmp_path):
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, "-m", "sorsa_kernels.ops.linear.ab", "--rounds", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "design switch A/B" in r.stdout
    assert len(json.loads(out.read_text())["rows"]) == 4


def test_ab_cli_without_gpu_or_interpreter_says_why():
    r = subprocess.run([sys.executable, "-m", "sorsa_kernels.ops.linear.ab"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the A/B runs there")
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr
