"""examples/spectral_figure.py (the paper's ΔΣ/ΔD figure in miniature) runs end to end on the CPU in
its quick mode, and the base it fine-tunes, examples/assets/tiny_base/, is the model that
examples/pretrain_tiny_base.py documents."""
import copy
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import sorsa_kernels as sk  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    ex = load("spectral_figure")
    out = tmp_path_factory.mktemp("spectral")
    results = ex.main(["--quick", "--out", str(out), "--plot", str(out / "figure.png")])
    return ex, out, results


def test_every_method_writes_the_cli_schema_and_moves_from_the_origin(quick_run):
    ex, out, results = quick_run
    assert [r["method"] for r in results] == list(ex.METHODS)
    names = sorted(ex.target_weight_names(ex.load_base()))
    assert len(names) == 28  # 7 projections × 4 layers
    for r in results:
        with open(r["json"]) as f:
            run = json.load(f)
        assert r["json"] == str(out / f"{r['method']}.json")
        assert set(run) == {"base", "checkpoints"}
        cps = run["checkpoints"]
        assert [c["path"] for c in cps] == [f"step {s}" for s in range(13)], r["method"]
        for c in cps:
            assert set(c) == {"path", "layers", "mean"} and sorted(c["layers"]) == names
            ds = [v["delta_sigma"] for v in c["layers"].values()]
            dd = [v["delta_d"] for v in c["layers"].values()]
            assert c["mean"]["delta_sigma"] == pytest.approx(sum(ds) / len(ds), rel=1e-9, abs=1e-12)
            assert c["mean"]["delta_d"] == pytest.approx(sum(dd) / len(dd), rel=1e-9, abs=1e-12)
        first, last = cps[0], cps[-1]
        # at step 0 every method computes the base's weights (up to the rounding of its init)
        assert max(v["delta_sigma"] for v in first["layers"].values()) < 1e-5, r["method"]
        assert max(abs(v["delta_d"]) for v in first["layers"].values()) < 1e-4, r["method"]
        assert last["mean"]["delta_sigma"] > 1e-4 and last["mean"]["delta_d"] > 1e-4, (r["method"], last["mean"])
        assert (r["delta_sigma"], r["delta_d"]) == (last["mean"]["delta_sigma"], last["mean"]["delta_d"])
        assert all(torch.isfinite(torch.tensor([r["prose_loss"], r["code_loss"], r["prose_loss_before"]])))


def test_the_figure_has_one_panel_per_method(quick_run):
    import matplotlib.image

    _, out, results = quick_run
    png = out / "figure.png"
    assert results[0]["plot"] == str(png)
    img = matplotlib.image.imread(str(png))
    # plot_shift: 5 × 4 inches per panel at 120 dpi
    assert img.shape[:2] == (480, 600 * len(results))
    assert img[..., :3].std() > 0.05  # drawn on, not a blank canvas


@pytest.mark.parametrize("share", [True, False])
def test_plot_shift_shares_axes_only_when_asked(tmp_path, monkeypatch, share):
    from matplotlib.figure import Figure

    from sorsa_kernels import analysis

    drawn, save = [], Figure.savefig

    def spy(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    small = analysis.trajectory_json("b", ["step 1"], [{"w": (0.001, 0.002)}])
    large = analysis.trajectory_json("b", ["step 1"], [{"w": (0.5, 0.8)}])
    analysis.plot_shift([small, large], str(tmp_path / "p.png"), share_axes=share)
    a, b = drawn[0].axes[:2]
    assert (a.get_xlim() == b.get_xlim() and a.get_ylim() == b.get_ylim()) is share
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["sorsa", "pissa"])
def test_recorded_numbers_agree_with_spectral_shift(quick_run, method):
    """The tracker's last record (the adapted model read as it computes, the base from the shipped
    folder with its SVD cached) against spectral_shift of the merged model and a freshly loaded
    base, and against the float64 formulas; within the float32 SVD's documented accuracy."""
    from sorsa_kernels.analysis import spectral_shift_naive

    ex, _, results = quick_run
    r = next(r for r in results if r["method"] == method)
    with open(r["json"]) as f:
        recorded = json.load(f)["checkpoints"][-1]["layers"]
    tuned = copy.deepcopy(r["model"])
    merged = sk.merge_and_unload(tuned) if method == "sorsa" else tuned.merge_and_unload()
    base = ex.load_base()
    direct = sk.spectral_shift(base, merged, names=ex.TARGETS)
    assert sorted(direct) == sorted(recorded)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    for i, name in enumerate(sorted(direct)):
        want = [direct[name]] + ([spectral_shift_naive(base_sd[name], merged_sd[name])] if i % 7 == 0 else [])
        for ds, dd in want:
            assert recorded[name]["delta_sigma"] == pytest.approx(ds, rel=1e-3, abs=1e-6), name
            assert recorded[name]["delta_d"] == pytest.approx(dd, abs=1e-4), name


def test_full_fine_tuning_changes_only_the_target_layers(quick_run):
    ex, _, results = quick_run
    tuned = dict(next(r for r in results if r["method"] == "ft")["model"].named_parameters())
    base = dict(ex.load_base().named_parameters())
    targets = set(ex.target_weight_names(ex.load_base()))
    assert set(tuned) == set(base)
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed == targets


def test_bad_arguments_are_refused():
    ex = load("spectral_figure")
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        ex.main(["--steps", "0"])
    with pytest.raises(ValueError, match="--lr must be > 0"):
        ex.main(["--lr", "-1"])
    with pytest.raises(ValueError, match="method must be one of"):
        ex.prepare("dora", None, 8)


def test_shipped_base_is_the_documented_pretrained_model():
    pre = load("pretrain_tiny_base")
    folder = os.path.join(EXAMPLES, "assets", "tiny_base")
    with open(os.path.join(folder, "pretrain.json")) as f:
        info = json.load(f)
    assert pre.sha256_of(os.path.join(folder, "model.safetensors")) == pre.SHIPPED_SHA256 == info["model_sha256"]
    model = load("spectral_figure").load_base(folder)
    cfg, want = model.config, pre.tiny_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(want, key), key
    assert sum(p.numel() for p in model.parameters()) == 824_448
    files = pre.corpus_files()
    _, held, corpus_sha = pre.load_corpus(files)
    loss = pre.heldout_loss(model, held)
    if corpus_sha == info["corpus_sha256"]:  # the Python whose standard library it was trained on
        assert loss == pytest.approx(info["heldout_loss"], abs=2e-3)
    else:  # another Python's standard library: still Python code, far below an untrained model's ln 256
        assert loss < info["heldout_loss"] + 0.5
    assert info["heldout_loss_init"] > 5.0
