"""`sorsa-kernels` CLI and the bench package: info, version, usage errors, the verdict
and details tables, flags for noise and impossible results, JSON written per case, errors
recorded while the other ops still run, the plot, and gpu_check.sh's dry run / no-GPU failure."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import sorsa_kernels as sk
from sorsa_kernels import bench, cli
from sorsa_kernels.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = torch.device("cpu")


def _tiny_cases(device, mode="default", dtype=None, ops=None, model=None):
    ops = list(bench.op_texts()) if ops is None else ops
    dt = dtype or torch.float32
    out = []
    for op in ("linear_fwd", "linear_bwd", "linear_fwdbwd"):
        out += [bench.Case(op, dt, dict(M=32, K=24, N=20, r=4, p=p)) for p in (0.0, 0.05)]
    out.append(bench.Case("ortho_step", dt, dict(layers=1, d=24, h=36, r=4)))
    out.append(bench.Case("init", dt, dict(count=2, m=40, n=30, r=5)))
    if model:
        out.append(bench.Case("init", dt, dict(model=model)))
    return [c for c in out if c.op in ops]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "cases", _tiny_cases)
    monkeypatch.setattr(bench, "plan", lambda device, mode: {"rounds": 3, "min_sample_ms": 1.0})


def test_info_says_what_runs_here(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sorsa-kernels" in out and "threads" in out and "what runs" in out
    if not torch.cuda.is_available():  # never claim Triton runs without a GPU
        assert "triton usable: True" not in out
        assert "Triton kernels: will not run" in out or "only when forced" in out
        assert "auto runs: torch" in out
    # rsvd's "auto" is torch (LAPACK) on the CPU; info must not claim the extension runs there
    rsvd_line = next(l for l in out.splitlines() if l.strip().startswith("rsvd "))
    assert "auto runs: torch on cpu" in rsvd_line, rsvd_line


def test_version_help_and_unknown_op(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and sk.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "--full" in out and "--quick" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--ops", "foo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "foo" in err and all(op in err for op in bench.op_texts())
    assert "Traceback" not in err


def test_bench_tables_json_plot(tiny, tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["bench", "--no-progress", "--model", "tiny", "--json", str(path)]) == 0
    cap = capsys.readouterr()
    out = cap.out
    # header: versions, threads, the CPU notice and the legend; verdict before details
    assert f"torch {torch.__version__}" in out and "threads" in out and "triton" in out
    assert "These are CPU numbers" in out and "need an NVIDIA GPU" in out and "Legend" in out
    assert out.index("Verdict") < out.index("Details")
    verdict = out[out.index("Verdict"):out.index("Details")]
    for text in ("linear forward", "linear backward", "linear fwd+bwd", "regularizer step", "SVD init"):
        assert text in verdict
    assert "× faster than sorsa 1.0.1" in verdict and "× floor speed" in verdict and "IQR" in verdict
    assert "× faster than PEFT LoRA" in verdict
    # the legend fits 100 columns; the header says what is installed, truthfully
    legend = out[out.index("Legend"):out.index("Verdict")].strip().splitlines()
    assert len(legend) > 1 and max(map(len, legend)) <= 100
    assert f"peft {__import__('peft').__version__}" in out
    # rows named for what they are; the installed reference layer is used when present
    ref_name = bench.REF_LAYER if bench.load_reference_layer() is not None else bench.REF_FORMULA
    assert ref_name in out and "floor: dense F.linear" in out and "floor: copy of the same bytes" in out
    assert "max σ err" in out and "auto→torch" in out
    # rows streamed (stderr) as they complete, before the final tables
    assert "linear_fwd" in cap.err and "ours[auto:torch]" in cap.err
    data = json.loads(path.read_text())
    ops = {r["op"] for r in data["results"]}
    assert ops == set(bench.op_texts())
    assert data["header"]["threads"] == torch.get_num_threads()
    ours = [r for r in data["results"] if r["role"] == "ours"]
    assert all(r["ms"] > 0 and r["error"] is None for r in ours), ours
    assert all(r["vs_ref"] and r["vs_ref"][0] > 0 for r in ours)
    # PEFT's own LoRA and KaSA layers are timed beside ours in every linear case
    linear = {r["case"] for r in data["results"] if r["op"].startswith("linear")}
    for kind, role in (("PEFT LoRA (lora.Linear)", "peft"), ("PEFT KaSA (lora.Linear + KaSA)", "other")):
        rows = [r for r in data["results"] if r["impl"] == kind]
        assert {r["case"] for r in rows} == linear and all(r["role"] == role and r["ms"] > 0 for r in rows)
    assert all(r["vs_peft"] and r["vs_peft"][0] > 0 for r in ours if r["op"].startswith("linear"))
    model = [r for r in ours if "tiny" in r["case"]]
    assert model and model[0]["extra"]["sigma_err"] < 0.01 and model[0]["extra"]["matrices"] == 14
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "r.png").stat().st_size > 1000
    except ImportError:
        assert "pip install matplotlib" in out


def test_error_in_one_op_is_recorded_and_the_rest_run(tiny, tmp_path, monkeypatch, capsys):
    from sorsa_kernels.ops.ortho import bench as ortho_bench

    def boom(case, device):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(ortho_bench, "build", boom)
    path = tmp_path / "e.json"
    seen = []
    real = report.write_json

    def spy(p, head, results):  # the JSON is rewritten after every case
        seen.append(len(results))
        real(p, head, results)
    monkeypatch.setattr(bench, "write_json", spy)
    assert cli.main(["bench", "--no-progress", "--ops", "linear_fwd", "ortho_step", "init", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["results"]
    assert any(r["op"] == "ortho_step" and "simulated failure" in r["error"] for r in rows)
    assert {r["op"] for r in rows if r["error"] is None} == {"linear_fwd", "init"}
    assert rows[-1]["op"] == "init"  # init runs last
    assert len(seen) >= 4 and seen == sorted(seen)
    assert "simulated failure" in capsys.readouterr().out


def test_time_budget_skips_and_records(tiny):
    rs = bench.run(["linear_fwd"], device=CPU, progress=False, max_seconds=0.0, stream=open(os.devnull, "w"))
    assert rs and all("time budget" in r.error for r in rs)


def test_flags_noise_and_impossible_results():
    roles = {"ours": "ours", "ref": "ref", "floor": "floor"}
    s = {"ours": [1.0, 1.0, 1.0], "ref": [3.0, 3.1, 2.9], "floor": [2.0, 2.0, 2.0]}  # ours "faster than the floor"
    rows = report.results_for_case("linear_fwd", "c", roles, s, {}, {})
    ours = rows[0]
    assert ours.vs_ref[0] == pytest.approx(3.0) and ours.vs_floor[0] == pytest.approx(2.0)
    assert any("faster than the floor" in f for f in ours.flags)
    noisy = report.results_for_case("linear_fwd", "c", roles, {"ours": [1.0, 2.0, 4.0], "ref": [3.0, 3.0, 3.0],
                                                               "floor": [0.5, 0.5, 0.5]}, {}, {})[0]
    assert any(f.startswith("~") for f in noisy.flags)
    fwd = report.Result("linear_fwd", "c", "ours", "ours", 5.0, 4.9, 5.1)
    fb = report.Result("linear_fwdbwd", "c", "ours", "ours", 3.0, 2.9, 3.1)
    report.cross_check([fwd, fb])
    assert any("slower than fwd+bwd" in f for f in fwd.flags) and fwd.flags == fb.flags
    assert "!" in report.format_row(fwd)


def test_drift_is_flagged_even_with_a_small_spread():
    roles = {"ours": "ours", "ref": "ref"}
    # two steady halves at different levels (a load change): IQR small per half, ratio 1.6 → 1.0
    s = {"ours": [1.0] * 8, "ref": [1.6, 1.6, 1.61, 1.6, 1.0, 1.0, 1.01, 1.0]}
    ours = report.results_for_case("linear_fwd", "c", roles, s, {}, {})[0]
    assert any(f.startswith("≈") for f in ours.flags), ours.flags
    assert "≈ drifted" in report.verdict_table([ours])
    steady = {"ours": [1.0] * 8, "ref": [1.6, 1.62, 1.58, 1.6, 1.61, 1.59, 1.6, 1.6]}
    assert not report.results_for_case("linear_fwd", "c", roles, steady, {}, {})[0].flags


def test_a_busy_machine_makes_the_verdict_inconclusive():
    roles = {"ours": "ours", "ref": "ref"}
    noisy = report.results_for_case("linear_fwd", "c", roles, {"ours": [1.0, 2.0, 4.0], "ref": [3.0] * 3}, {}, {})
    assert "INCONCLUSIVE" in report.busy_warning(noisy)
    calm = report.results_for_case("linear_fwd", "c", roles, {"ours": [1.0] * 3, "ref": [3.0] * 3}, {}, {})
    assert report.busy_warning(calm) is None


def test_header_says_what_is_installed(monkeypatch):
    h = bench.header(CPU, "quick")
    monkeypatch.setitem(h, "peft", "not installed")
    monkeypatch.setitem(h, "sorsa", "not installed")
    text = bench.header_text(h)
    assert "peft is not installed (pip install peft)" in text and "sorsa here: not installed" in text
    assert "transformers 5" not in text


def test_on_a_terminal_rows_are_not_printed_twice(tiny, monkeypatch, capsys):
    monkeypatch.setattr(bench, "isatty", lambda f: True)
    assert cli.main(["bench", "--no-progress", "--ops", "linear_fwd", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "Verdict" in out and "Details" not in out and "printed as it completed" in out
    assert out.count("ours[auto:torch]") == 0  # the rows went to the terminal once, live (stderr)


def test_reference_rows_match_the_layer():
    m = sk.SORSALinear(12, 10, r=3, alpha=6.0)
    m.sorsa_init()
    x = torch.randn(5, 12)
    from sorsa_kernels.ops.linear.bench import reference_forward
    torch.testing.assert_close(reference_forward(x, m.weight, m.sorsa_A, m.sorsa_S, m.sorsa_B, m.scale), m(x),
                               atol=1e-5, rtol=1e-5)
    b = bench.build(bench.Case("linear_fwd", torch.float32, dict(M=8, K=12, N=10, r=3, p=0.0)), CPU)
    outs = {n: f() for n, f in b.impls.items() if not n.startswith("floor")}
    ref = next(v for n, v in outs.items() if n.startswith("sorsa"))
    torch.testing.assert_close(outs["ours[auto:torch]"], ref, atol=1e-5, rtol=1e-5)


def test_cases_one_source_and_modes():
    for mode in bench.MODES:
        cs = bench.cases(CPU, mode)
        assert {c.op for c in cs} == set(bench.op_texts()) and cs[-1].op == "init"
    gpu = bench.cases(torch.device("cuda"), "default")
    assert any(c.params.get("tag") == "LoRAFusion" for c in gpu)
    assert {c.params["p"] for c in gpu if c.op.startswith("linear")} == {0.0, 0.05}
    assert any(c.params.get("compile") for c in gpu)
    assert {c.dtype for c in gpu if c.op == "ortho_step"} == {torch.bfloat16, torch.float32}
    m = bench.cases(torch.device("cuda"), "default", ops=["init"], model="llama2-7b")
    assert [c.params for c in m] == [{"model": "llama2-7b"}]
    with pytest.raises(ValueError, match="ops must be among"):
        bench.cases(CPU, ops=["nope"])


def test_llama_model_layout():
    from sorsa_kernels.ops.rsvd.bench import model_layers
    layers, samples, groups = model_layers("tiny", CPU, torch.float32)
    d, h, nl, r = bench.models()["llama2-7b"]
    assert 7 * nl == 224 and sum(c for c, _, _ in groups) == 7 * bench.models()["tiny"][2] == len(layers)


def _gpu_check(*args, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), *args],
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})),
                          capture_output=True, text=True, timeout=300)


def test_gpu_check_script_dry_run():
    out = _gpu_check("--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run OK" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure")
def test_gpu_check_without_gpu_fails_fast_and_says_why(tmp_path):
    t0 = time.time()
    out = _gpu_check(env={"OUT": str(tmp_path / "out")})
    assert out.returncode != 0
    assert time.time() - t0 < 60
    assert "no visible CUDA GPU" in out.stdout + out.stderr


def test_progress_without_a_tty_prints_plain_lines_not_carriage_returns(tiny, monkeypatch):
    """`sorsa-kernels bench > log 2>&1`: tqdm's \\r redraws littered the log. Without a TTY the
    bar is replaced by one plain line per case, plus a heartbeat line within a long case."""
    import io
    err = io.StringIO()  # not a TTY
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(bench, "HEARTBEAT_S", 0.0)  # every sample is "long": heartbeats show
    rs = bench.run(["linear_fwd", "init"], device=CPU, progress=True)
    log = err.getvalue()
    n = len(bench.cases(CPU, "default", None, ["linear_fwd", "init"]))
    assert rs and "\r" not in log
    assert f"[1/{n}] linear_fwd:" in log and f"[{n}/{n}] init:" in log and "  ... linear_fwd" in log
    assert "ours[auto:torch]" in log  # the result rows still stream
