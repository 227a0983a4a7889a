"""`sorsa-kernels check`: each case in its own subprocess, so a wrong kernel is a `mismatch` row
and a crashing one a `crashed` row while the other rows still come back; without a GPU it says so
within seconds. The harness is exercised on the CPU under the Triton interpreter with a fused
result made wrong on purpose and a case that aborts its process."""
import json
import os
import subprocess
import sys
import time

import torch

from sorsa_kernels import check as C
from sorsa_kernels.ops.linear.check import philox_keep_mask

from conftest import needs_triton
from linear_helpers import replay_mask


def _run(args, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-m", "sorsa_kernels.cli", "check", *args], capture_output=True,
                          text=True, timeout=600, env=e)


def test_without_a_gpu_it_says_so_within_seconds():
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a GPU is visible")
    t0 = time.time()
    r = _run([], TRITON_INTERPRET="0")
    assert r.returncode == 2 and "no CUDA GPU is visible" in r.stderr, r.stderr
    assert time.time() - t0 < 60


@needs_triton
def test_wrong_and_crashing_kernels_get_their_rows_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "check.json"
    wrong, crash = C.cases(True)[0].name, C.cases(True)[2].name
    r = _run(["--interpret", "--json", str(out), "--timeout", "300"], TRITON_INTERPRET="1",
             **{C.ENV_FAULT: f"wrong:{wrong},crash:{crash}"})
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {row["case"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows[wrong]["status"] == "mismatch" and rows[wrong]["ratios"]["y"] > 1, rows[wrong]
    assert all(v <= 1 for k, v in rows[wrong]["ratios"].items() if k != "y")  # only y was made wrong
    assert rows[crash]["status"] == "crashed" and rows[crash]["returncode"] != 0, rows[crash]
    ok = rows[C.cases(True)[1].name]  # the dropout case, vs float64 with the replayed mask
    assert ok["status"] == "ok" and ok["fused_ms"] > 0 and ok["torch_ms"] > 0, ok
    n = len(C.cases(True))  # all but the wrong and the crashing one (the rsvd case: ok, or skipped)
    assert f"sorsa-kernels check: {n - 2}/{n} ok" in r.stdout, r.stdout


def test_a_case_that_cannot_run_here_is_skipped_not_crashed(tmp_path):
    """The rsvd case without the extension: its op module raises the harness's Skipped, which the
    child (run as ``python -m``) must catch as the same class: a "skipped" row, exit status 0."""
    out = tmp_path / "check.json"
    r = _run(["--interpret", "--only", "rsvd", "--json", str(out)], TRITON_INTERPRET="1",
             SORSA_KERNELS_NO_EXT="1")
    rows = json.loads(out.read_text())["rows"]
    assert [row["status"] for row in rows] == ["skipped"], rows
    assert "extension is not loaded" in rows[0]["error"] and r.returncode == 0, r.stdout + r.stderr


def test_packaged_mask_reference_matches_the_independent_one():
    for seed, M, K, p in ((0, 5, 7, 0.5), (2 ** 31 - 2, 33, 40, 0.1), (123456789, 8, 4, 0.9)):
        assert torch.equal(philox_keep_mask(seed, M, K, p), replay_mask(seed, M, K, p))
