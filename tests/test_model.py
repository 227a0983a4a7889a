"""apply_sorsa / merge / parameter helpers on small multi-layer models."""
import copy

import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_proj_norm = nn.LayerNorm(d)  # name contains "q_proj" but is not a Linear

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.o_proj(a @ self.v_proj(self.q_proj_norm(x)))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attn = Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        self.up_proj = nn.Linear(d, h)  # "up_proj" also appears as a substring below
        self.up_proj_2 = nn.Linear(h, d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x) + self.up_proj_2(self.up_proj(x))


def model(d=16, h=24, n=2):
    torch.manual_seed(0)
    return nn.Sequential(*[Block(d, h) for _ in range(n)], nn.Linear(d, 5))


def test_apply_sorsa_replaces_by_substring_and_keeps_output():
    m = model()
    x = torch.randn(2, 3, 16)
    y0 = m(x)
    out = sk.apply_sorsa(m, ["q_proj", "v_proj", "up_proj", "mlp"], r=4, alpha=8.0)
    assert out is m
    names = {n for n, mod in m.named_modules() if isinstance(mod, sk.SORSALinear)}
    expect = {f"{i}.{s}" for i in range(2) for s in
              ("attn.q_proj", "attn.v_proj", "up_proj", "up_proj_2", "mlp.0", "mlp.2")}
    assert names == expect
    assert isinstance(m[0].attn.q_proj_norm, nn.LayerNorm) and isinstance(m[0].attn.k_proj, nn.Linear)
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)  # init leaves the model's function unchanged
    sk.mark_only_sorsa_trainable(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("sorsa_" in n for n in trainable)
    assert len(sk.sorsa_parameters(m)) == 3 * len(expect)


def test_shared_linear_replaced_once_everywhere():
    lin = nn.Linear(8, 8)
    m = nn.ModuleDict({"enc": nn.ModuleDict({"proj": lin}), "dec": nn.ModuleDict({"proj": lin})})
    sk.apply_sorsa(m, "proj", r=2)
    assert m["enc"]["proj"] is m["dec"]["proj"]
    assert isinstance(m["enc"]["proj"], sk.SORSALinear)


def test_train_step_with_regularizer_then_merge():
    m = model()
    sk.apply_sorsa(m, ["proj", "mlp"], r=4, dropout=0.1)
    sk.mark_only_sorsa_trainable(m)
    opt = torch.optim.AdamW(sk.sorsa_parameters(m), lr=1e-2)
    x, tgt = torch.randn(4, 16), torch.randn(4, 5)
    m.train()
    loss = torch.nn.functional.mse_loss(m(x), tgt)
    loss.backward()
    reg = sk.orthonormal_grad_(m, gamma=0.1, lr=1e-2)
    assert reg is not None and reg < 1e-4  # orthonormal right after init
    opt.step()
    m.eval()
    y = m(x)
    sk.merge_sorsa(m)
    assert all(l.merged for l in sk.sorsa_layers(m))
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    sk.unmerge_sorsa(m)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_whole_model():
    m = model()
    sk.apply_sorsa(m, ["q_proj", "mlp"], r=3)
    m2 = sk.apply_sorsa(model(), ["q_proj", "mlp"], r=3, init=None)
    m2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 16)
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.parametrize("match", ["substring", "peft"])
def test_a_typo_in_one_target_is_an_error_not_a_silent_partial_conversion(match):
    m = model()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"entries \['v_prj'\] match no module .*the others do") as e:
        sk.apply_sorsa(m, ["q_proj", "v_prj"], r=2, match=match)
    assert "did you mean 'v_prj' → 'v_proj'?" in str(e.value)  # short names, the closest one
    assert not list(sk.sorsa_layers(m)) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_peft_argument_names_get_a_suggestion():
    for kw, ours in (("lora_alpha", "'alpha'"), ("rank", "'r'"), ("lora_dropout", "'dropout'")):
        with pytest.raises(TypeError, match=f"'{kw}' \\(did you mean {ours}\\?\\)"):
            sk.apply_sorsa(model(), ["q_proj"], r=2, **{kw: 8})


def test_no_match_is_an_error():
    with pytest.raises(ValueError, match="target_modules.*matched no nn.Linear"):
        sk.apply_sorsa(model(), ["nonexistent"], r=2)
    with pytest.raises(ValueError, match="target_modules"):
        sk.apply_sorsa(model(), [], r=2)
    with pytest.raises(TypeError, match="target_modules"):
        sk.apply_sorsa(model(), [3], r=2)


def test_apply_sorsa_rsvd_default_groups_both_orientations_in_chunks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64, bias=False))
    x = torch.randn(3, 40)
    y0 = m(x)
    Ws = [m[i].weight.detach().clone() for i in (0, 2, 4)]
    sk.apply_sorsa(m, ["0", "2", "4"], r=8, alpha=16.0, seed=5, progress=True, chunk_bytes=1)  # chunks of one layer
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)  # W_r exact whatever the SVD's accuracy
    for i, W in zip((0, 2, 4), Ws):
        layer = m[i]
        S64 = torch.linalg.svdvals(W.double())[:8]
        assert ((layer.sorsa_S.double() - S64).abs() / S64).max() < 0.01
        eye = torch.eye(8)
        torch.testing.assert_close(layer.sorsa_A @ layer.sorsa_A.T, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.sorsa_B.T @ layer.sorsa_B, eye, atol=1e-5, rtol=0)
        rec = layer.weight + layer.scale * (layer.sorsa_B * layer.sorsa_S) @ layer.sorsa_A
        torch.testing.assert_close(rec, W, atol=1e-5, rtol=1e-5)


def test_batched_svd_init_equals_per_layer_exact_svd():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 30), nn.Linear(30, 20))
    ref = [sk.SORSALinear.from_linear(m[i], r=5, init="svd") for i in range(3)]
    sk.apply_sorsa(m, ["0", "1", "2"], r=5, init="svd")
    for layer, r in zip(m, ref):
        torch.testing.assert_close(layer.sorsa_S, r.sorsa_S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((layer.sorsa_B * layer.sorsa_S) @ layer.sorsa_A, (r.sorsa_B * r.sorsa_S) @ r.sorsa_A,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.weight, r.weight, atol=1e-5, rtol=1e-5)


def test_layer_rsvd_init_and_bad_kwargs():
    torch.manual_seed(2)
    layer = sk.SORSALinear(48, 36, r=6)
    W = layer.weight.detach().clone()
    layer.sorsa_init(method="rsvd", seed=0, oversample=8, niter=3)
    rec = layer.weight + (layer.sorsa_B * layer.sorsa_S) @ layer.sorsa_A
    torch.testing.assert_close(rec, W, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="oversample must be an int >= 0"):
        layer.sorsa_init(method="rsvd", oversample=-2)
    with pytest.raises(TypeError, match="init=None takes no SVD arguments"):
        sk.apply_sorsa(model(), ["q_proj"], r=2, init=None, niter=2)


def six_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12),
                         nn.Linear(12, 3), nn.Linear(3, 12))


def snapshot(m):
    return ([(n, type(mod), mod) for n, mod in m.named_modules()],
            [(n, p, p.detach().clone()) for n, p in m.named_parameters()])


def assert_unchanged(m, snap):
    mods, params = snap
    assert [(n, type(mod), mod) for n, mod in m.named_modules()] == mods
    assert [(n, p) for n, p in m.named_parameters()] == [(n, p) for n, p, _ in params]  # same objects
    for n, p, v in params:
        if not p.is_meta:
            torch.testing.assert_close(p.detach(), v, rtol=0, atol=0, equal_nan=True, msg=n)
    assert not list(sk.sorsa_layers(m))


@pytest.mark.parametrize("fault", ["nan_weight", "rank_too_large", "int_weight", "meta_weight", "unknown_kw",
                                   "bad_init", "bad_svd_value"])
def test_apply_sorsa_is_atomic(fault):
    """a failure on the 5th target leaves the model exactly as it was."""
    m = six_linears()
    r, kw = 4, {}
    if fault == "nan_weight":
        m[4].weight.data[0, 0] = float("nan")
    elif fault == "rank_too_large":
        pass  # m[4] is 12 -> 3: r = 4 > 3
    elif fault == "int_weight":
        m[4].weight = nn.Parameter(torch.ones(3, 12, dtype=torch.int32), requires_grad=False)
    elif fault == "meta_weight":
        m[4].to("meta")
    elif fault == "unknown_kw":
        kw = {"n_iter": 3}
    elif fault == "bad_init":
        kw = {"init": "qr"}
    elif fault == "bad_svd_value":
        kw = {"oversample": -2}  # only rsvd itself rejects this, mid-init: rolled back
    if fault != "rank_too_large":
        r = 2
    snap = snapshot(m)
    msg = {"nan_weight": r"4.weight contains NaN", "rank_too_large": r"4: r must be <= .* = 3, got 4",
           "int_weight": r"4.weight must be a floating tensor", "meta_weight": r"meta device.*pass init=None",
           "unknown_kw": r"unknown: \['n_iter'\]", "bad_init": r"init must be one of",
           "bad_svd_value": r"oversample must be an int >= 0"}[fault]
    with pytest.raises((ValueError, TypeError), match=msg):
        sk.apply_sorsa(m, ["0", "1", "2", "3", "4", "5"], r=r, **kw)
    assert_unchanged(m, snap)
    if fault in ("unknown_kw", "bad_init", "bad_svd_value"):  # a retry converts every layer
        sk.apply_sorsa(m, ["0", "1", "2", "3", "4", "5"], r=2)
        assert len(list(sk.sorsa_layers(m))) == 6
        assert all(l.sorsa_S.abs().min() > 0 for l in sk.sorsa_layers(m))


def test_apply_sorsa_twice_says_already_converted():
    m = sk.apply_sorsa(model(), ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"already SORSA layers \(\['0.attn.q_proj', '1.attn.q_proj'\]"):
        sk.apply_sorsa(m, ["q_proj"], r=2)


def test_gpt2_conv1d_targets_are_converted():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    y0 = gpt(ids).logits
    base_keys = {k: v.shape for k, v in gpt.state_dict().items()}
    sk.apply_sorsa(gpt, ["c_attn", "c_proj"], r=4, alpha=8.0)
    names = {n for n, mod in gpt.named_modules() if isinstance(mod, sk.SORSAConv1D)}
    assert names == {f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    torch.testing.assert_close(gpt(ids).logits, y0, atol=1e-5, rtol=1e-5)
    shapes = {k: v.shape for k, v in gpt.state_dict().items() if "sorsa_" not in k}
    assert shapes == base_keys  # the base layout (Conv1D in×out) is unchanged
    sk.mark_only_sorsa_trainable(gpt)
    gpt.train()
    gpt(ids).logits.sum().backward()
    assert all(l.sorsa_S.grad is not None for l in sk.sorsa_layers(gpt))


def test_merged_model_state_dict_strict_loads_to_the_same_outputs():
    m = sk.apply_sorsa(model(), ["q_proj", "mlp"], r=3)
    with torch.no_grad():
        for l in sk.sorsa_layers(m):
            l.sorsa_A.add_(0.1)
    m.eval()
    x = torch.randn(2, 16)
    y = m(x)
    sk.merge_sorsa(m)
    m2 = sk.apply_sorsa(model(), ["q_proj", "mlp"], r=3, init=None).eval()
    m2.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(m2(x), y, atol=1e-5, rtol=1e-5)


def test_matched_non_linear_modules_are_named_in_a_warning():
    m = nn.ModuleDict({"emb_proj": nn.Embedding(10, 8), "out_proj": nn.Linear(8, 8), "proj_norm": nn.LayerNorm(8)})
    with pytest.warns(UserWarning, match=r"skipped: \['emb_proj \(Embedding\)'\]"):
        sk.apply_sorsa(m, ["proj"], r=2)
    assert isinstance(m["out_proj"], sk.SORSALinear) and isinstance(m["emb_proj"], nn.Embedding)


def test_layers_swapped_into_an_eval_model_stay_in_eval_mode(tmp_path):
    """apply_sorsa / load_adapter on a model in eval mode (from_pretrained's default) must not
    leave dropout on: two forwards agree and match the base model's output at init."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    want = base(x)
    m = sk.apply_sorsa(copy.deepcopy(base), ["0", "2"], r=4, dropout=0.5)
    assert not any(layer.training for layer in sk.sorsa_layers(m))
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
    sk.save_adapter(m, str(tmp_path / "a"))
    m2 = sk.load_adapter(copy.deepcopy(base), str(tmp_path / "a"))
    assert not any(layer.training for layer in sk.sorsa_layers(m2))
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    m.train()
    assert all(layer.training for layer in sk.sorsa_layers(m))  # .train() still reaches them


def test_zero3_partitioned_layers_refuse_merge_and_count_whole_parameters(capsys):
    """A DeepSpeed ZeRO-3 partition (``ds_id``/``ds_numel`` set, empty local data) cannot be merged
    into (the adapter would be dropped silently): a clear error; and it counts as its whole size."""
    model = sk.apply_sorsa(nn.Sequential(nn.Linear(16, 12)), ["0"], r=2, init="svd")
    layer = model[0]
    assert layer.merge_weights
    full = {n: p.numel() for n, p in layer.named_parameters()}
    for p in layer.parameters():  # what ZeRO-3 leaves outside the forward
        p.ds_id, p.ds_numel, p.ds_shape = 1, p.numel(), p.shape
        p.data = torch.empty(0, dtype=p.dtype)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 partitions"):
        sk.merge_sorsa(model)
    assert not layer.merged
    trainable, total = sk.print_trainable_parameters(model)
    assert total == sum(full.values()) and "all params: 0" not in capsys.readouterr().out
