import json

import sorsa_kernels as sk
from sorsa_kernels import bench, cli


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sorsa-kernels" in out and "torch" in out and "backends:" in out


def test_bench_quick_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "linear_cases", lambda device, quick: [(64, 48, 40, 8)])
    path = tmp_path / "r.json"
    assert cli.main(["bench", "--quick", "--ops", "linear_fwd", "linear_fwdbwd", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sorsa-1.0.1" in out and "ours[torch]" in out
    data = json.loads(path.read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"ours[torch]", "sorsa-1.0.1", "dense F.linear"} <= impls
    assert all(r["ms"] > 0 for r in data["results"])


def test_bench_all_ops_table_json_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "linear_cases", lambda device, quick: [(32, 24, 20, 4)])
    monkeypatch.setattr(bench, "adapter_shapes", lambda device, quick: (1, [(24, 20), (20, 36)], 4))
    monkeypatch.setattr(bench, "init_cases", lambda device, quick: [(2, 40, 30, 5)])
    path = tmp_path / "all.json"
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    ops = {r["op"] for r in data["results"]}
    assert ops == {"linear_fwd", "linear_fwdbwd", "ortho_step", "init"}
    assert "bandwidth floor" in out and "svd_lowrank" in out and "/floor" in out
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "all.png").stat().st_size > 1000
    except ImportError:
        assert "plot: skipped" in out
    import pytest
    with pytest.raises(ValueError, match="ops must be among"):
        bench.run(["nope"])


def test_reference_forward_matches_layer():
    import torch
    m = sk.SORSALinear(12, 10, r=3, alpha=6.0)
    m.sorsa_init()
    x = torch.randn(5, 12)
    torch.testing.assert_close(bench.reference_forward(x, m.weight, m.sorsa_A, m.sorsa_S, m.sorsa_B, m.scale), m(x),
                               atol=1e-5, rtol=1e-5)


def test_gpu_check_script_dry_run():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_check.sh"), "--dry-run"],
                         env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run OK" in out.stdout


def test_summary_table_ratios():
    rs = [bench.Result("linear_fwd", "c", "ours[torch]", 2.0), bench.Result("linear_fwd", "c", "sorsa-1.0.1", 5.0),
          bench.Result("linear_fwd", "c", "dense F.linear", 1.0)]
    line = bench.summary_table(rs).splitlines()[-1]
    assert "2.50x" in line and "2.00x" in line
