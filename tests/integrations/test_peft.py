"""sk.integrations.peft against the installed peft: the fused forward equals PEFT's own LoRA / KaSA
layers (float64 rule, every gradient), dropout replays our mask, PEFT's save/load, adapter
switching and merge keep working, batched PiSSA/KaSA init matches PEFT's, regularizers match."""
import copy
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
try:  # KaSA arrived in peft 0.21 (CI installs 0.21.2); the GPU machine's peft may be older
    from peft.tuners.lora import KasaConfig
except ImportError:  # pragma: no cover
    KasaConfig = None
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

import sorsa_kernels as sk  # noqa: E402
import sorsa_kernels.init as sk_init  # noqa: E402
from sorsa_kernels.integrations import peft as skp  # noqa: E402
from sorsa_kernels.integrations.peft import forward as skf  # noqa: E402
from sorsa_kernels.ops.linear.reference import sorsa_linear_naive
from sorsa_kernels.ops.linear.torch_path import keep_mask as _torch_keep  # noqa: E402
from sorsa_kernels.synthetic import exact_sigmas, max_rel_sigma_err, synthetic_weights  # noqa: E402

from conftest import HAS_TRITON, assert_tolerance  # noqa: E402


needs_kasa = pytest.mark.skipif(KasaConfig is None, reason="this peft has no KaSA (peft >= 0.21)")
KINDS = ["lora", pytest.param("kasa", marks=needs_kasa)]


class Tiny(nn.Module):
    """Two ragged linears (one with bias) and an embedding PEFT wraps in another layer type."""

    def __init__(self, k=24, h=20):
        super().__init__()
        self.emb = nn.Embedding(11, k)
        self.q = nn.Linear(k, h)
        self.v = nn.Linear(h, k, bias=False)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def make(kind="lora", p=0.0, targets=("q", "v"), seed=0, **cfg):
    """A float32 PEFT model with non-trivial adapters (B ≠ 0, KaSA diag random)."""
    torch.manual_seed(seed)
    base = Tiny()
    kasa = KasaConfig(beta=0.3, gamma=0.7) if kind == "kasa" else None
    conf = LoraConfig(r=4, lora_alpha=6, target_modules=list(targets), lora_dropout=p, kasa_config=kasa, **cfg)
    pm = get_peft_model(base, conf)
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n or "lora_diag" in n:
                t.normal_()
    return pm


def run(model, x, dy):
    """Output and the gradients of x and of every trainable parameter."""
    x = x.clone().requires_grad_()
    for t in model.parameters():
        t.grad = None
    y = model(x)
    y.backward(dy.to(y.dtype))
    grads = {n: t.grad for n, t in model.named_parameters() if t.requires_grad}
    return y.detach(), x.grad, grads


def inputs(dtype, shape=(3, 5), k=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, k, generator=g).to(dtype), torch.randn(*shape, k, generator=g)


def assert_fused(model, x):
    """The fused path really ran: PEFT's own lora.Linear.forward is never entered."""
    calls = []
    orig = LoraLinear.forward
    LoraLinear.forward = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        model(x)
    finally:
        LoraLinear.forward = orig
    assert not calls


def compare(out, low, ref):
    (y, dx, g), (yl, dxl, gl), (yr, dxr, gr) = out, low, ref
    assert_tolerance(y, yl, yr, "y")
    assert_tolerance(dx, dxl, dxr, "dx")
    assert g.keys() == gr.keys() and len(g) >= 4
    for n in g:
        assert_tolerance(g[n], gl[n], gr[n], n)


# ---------------------------------------------------------------- forward / gradients vs PEFT

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16+fp32"])
def test_matches_peft_layer(kind, dtype):
    pm = make(kind, use_rslora=(dtype == torch.float32))
    ref64 = copy.deepcopy(pm).double()
    if dtype == "bf16+fp32":  # PEFT's default for a bf16 base: fp32 adapters
        dtype = torch.bfloat16
        low = copy.deepcopy(pm).to(dtype)
        for n, t in low.named_parameters():
            if "lora_" in n:
                t.data = t.data.float()
    else:
        low = copy.deepcopy(pm).to(dtype)
    fast = copy.deepcopy(low)
    rep = skp.accelerate(fast, backend="torch")
    assert sorted(rep.accelerated) == ["base_model.model.q", "base_model.model.v"] and not rep.skipped
    x, dy = inputs(dtype)
    out = run(fast, x, dy)
    assert out[0].dtype == dtype
    compare(out, run(low, x, dy), run(ref64, x.double(), dy.double()))
    assert_fused(fast, x)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_replays_our_mask(kind):
    """With p > 0 masks cannot be shared with PEFT's nn.Dropout: our layer is compared with a
    float64 replay of the mask our op drew (same RNG state), and with PEFT itself in eval."""
    p = 0.3
    pm = make(kind, p=p, targets=("q",))
    fast = copy.deepcopy(pm)
    skp.accelerate(fast, backend="torch")
    fast.train()
    layer = fast.base_model.model.q
    x, dy = inputs(torch.float32, k=24)
    dyq = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(5))

    def ours(x):
        torch.manual_seed(123)
        return layer(x)

    def replay(dt):
        torch.manual_seed(123)
        seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64)
        keep = _torch_keep(x.reshape(-1, 24), p, seed).reshape(x.shape)
        W, b = layer.base_layer.weight, layer.base_layer.bias
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        S = layer.lora_diag["default"] if kind == "kasa" else torch.ones(4)
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, A, S, B)]
        y = sorsa_linear_naive(leaves[0], W.to(dt), leaves[1], leaves[2], leaves[3], layer.scaling["default"],
                               b.to(dt), mask=keep, dropout_p=p)
        y.backward(dyq.to(dt))
        return [y.detach()] + [t.grad for t in leaves]

    xl = x.clone().requires_grad_()
    y = ours(xl)
    y.backward(dyq)
    got = [y.detach(), xl.grad, layer.lora_A["default"].weight.grad,
           layer.lora_diag["default"].grad if kind == "kasa" else None, layer.lora_B["default"].weight.grad]
    ref, low = replay(torch.float64), replay(torch.float32)
    for name, a, l, r in zip(["y", "dx", "dA", "dS", "dB"], got, low, ref):
        if a is not None:
            assert_tolerance(a, l, r, name)
    # the mask was applied (differs from the no-dropout output) ...
    fast.eval()
    y_eval = layer(x)
    assert (y.detach() - y_eval).abs().max() > 1e-3
    # ... and in eval both paths skip dropout: equal to PEFT's layer
    pm.eval()
    assert_tolerance(y_eval, pm.base_model.model.q(x), pm.base_model.model.q.double()(x.double()), "eval")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_forced_triton(kind):
    """backend='triton' (the Triton interpreter on CPU under the test suite) serves PEFT's layers."""
    pm = make(kind)
    fast = copy.deepcopy(pm)
    skp.accelerate(fast, backend="triton")
    x, dy = inputs(torch.float32, shape=(7,))
    compare(run(fast, x, dy), run(pm, x, dy), run(copy.deepcopy(pm).double(), x.double(), dy.double()))
    assert_fused(fast, x)


# ---------------------------------------------------------------- PEFT machinery intact

@pytest.mark.parametrize("kind", KINDS)
def test_train_save_load_through_peft(kind, tmp_path):
    pm = make(kind, p=0.1)
    plain_keys = set(pm.state_dict())
    skp.accelerate(pm, backend="torch")
    assert set(pm.state_dict()) == plain_keys
    opt = torch.optim.SGD([t for t in pm.parameters() if t.requires_grad], lr=1e-3)
    x, dy = inputs(torch.float32)
    pm.train()
    for _ in range(2):
        opt.zero_grad()
        (pm(x) * dy).sum().backward()
        opt.step()
    pm.eval()
    y = pm(x).detach()
    pm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Tiny(), tmp_path)  # same base weights (seed 0)
    assert type(loaded.base_model.model.q) is LoraLinear
    tol = dict(rtol=0, atol=1e-6 * y.abs().max().item())  # fp32 rounding; PEFT re-truncates KaSA's base
    torch.testing.assert_close(loaded(x), y, **tol)
    skp.accelerate(loaded)
    torch.testing.assert_close(loaded(x), y, **tol)


def test_adapter_switching_disable_merge():
    pm = make()
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=3, target_modules=["q"], init_lora_weights=False))
    ref = copy.deepcopy(pm)
    skp.accelerate(pm, backend="torch")
    x, _ = inputs(torch.float32)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    for name in ("other", "default"):
        pm.set_adapter(name)
        ref.set_adapter(name)
        close(pm(x), ref(x))
    with pm.disable_adapter(), ref.disable_adapter():
        close(pm(x), ref(x))
    # two active adapters: PEFT's path, same result
    pm.base_model.set_adapter(["default", "other"])
    ref.base_model.set_adapter(["default", "other"])
    close(pm(x), ref(x))
    pm.set_adapter("default")
    ref.set_adapter("default")
    y = ref(x)
    pm.merge_adapter()
    close(pm(x), y)
    pm.unmerge_adapter()
    close(pm(x), y)
    merged = pm.merge_and_unload()
    assert type(merged.q) is nn.Linear
    close(merged(x), y)


def test_report_skips_unservable_and_unaccelerate():
    torch.manual_seed(0)
    pm = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["q", "v", "emb"], use_dora=False))
    pm.add_adapter("dora", LoraConfig(r=2, target_modules=["v"], use_dora=True))
    with pytest.warns(UserWarning, match="left on PEFT's path") as rec:
        rep = skp.accelerate(pm)
    assert len(rec) == 1
    assert "base_model.model.emb" in rep.skipped and "not a plain lora.Linear" in rep.skipped["base_model.model.emb"]
    assert "DoraLinearVariant" in rep.skipped["base_model.model.v"]
    assert set(rep.accelerated) == {"base_model.model.q", "base_model.model.v"}  # v's 'default' is servable
    assert type(pm.base_model.model.emb) is not skp.AcceleratedLoraLinear
    x = torch.randn(4, 24)
    pm.set_adapter("dora")
    with torch.no_grad():
        y = pm(x)
    skp.unaccelerate(pm)
    assert type(pm.base_model.model.q) is LoraLinear
    torch.testing.assert_close(pm(x), y)
    with pytest.raises(ValueError, match="backend"):
        skp.accelerate(pm, backend="ext")  # the linear op has no extension backend
    meta = make()
    meta.to("meta")
    with pytest.raises(RuntimeError, match="triton"):  # forced, cannot run on meta: fails at the call
        skp.accelerate(meta, backend="triton", warn=False)
    assert type(meta.base_model.model.q) is LoraLinear  # nothing changed
    with pytest.raises(TypeError, match="model"):
        skp.accelerate("not a model")


def test_inference_mode_call_then_training():
    """A fused call under torch.inference_mode() leaves nothing behind that a later training call
    saves for backward (plain LoRA's constant S is made per call, not cached)."""
    pm = make()
    ref = copy.deepcopy(pm)
    skp.accelerate(pm, backend="torch")
    x, dy = inputs(torch.float32)
    with torch.inference_mode():
        assert pm(x).is_inference()
    out = run(pm, x, dy)  # same r, dtype and device as the inference call
    compare(out, run(ref, x, dy), run(copy.deepcopy(ref).double(), x.double(), dy.double()))
    assert_fused(pm, x)


def test_peft_sees_its_own_class_names():
    """repr, get_layer_status() and get_model_status() read PEFT's class name (module_type
    'lora.Linear'), as without accelerate; type() and pickle still see the accelerated class."""
    import pickle

    pm = make()
    ref = copy.deepcopy(pm)
    skp.accelerate(pm, backend="torch")
    q = pm.base_model.model.q
    assert type(q) is skp.AcceleratedLoraLinear
    assert repr(q) == repr(ref.base_model.model.q) and repr(q).startswith("lora.Linear(")
    status = pm.get_layer_status()
    assert [s.module_type for s in status] == ["lora.Linear", "lora.Linear"]
    assert status == ref.get_layer_status()
    assert pm.get_model_status() == ref.get_model_status()
    back = pickle.loads(pickle.dumps(pm))
    assert type(back.base_model.model.q) is skp.AcceleratedLoraLinear
    x, _ = inputs(torch.float32)
    torch.testing.assert_close(back(x), pm(x), rtol=0, atol=0)


def test_auto_runs_peft_forward_where_it_is_faster(monkeypatch):
    """backend='auto' on the CPU (no fused kernel there): every call takes PEFT's own forward
    (bit-identical to PEFT, dropout included) and the report says so; 'torch' forces the op."""
    pm = make(p=0.1)
    ref = copy.deepcopy(pm)
    names = ["base_model.model.q", "base_model.model.v"]
    rep = skp.accelerate(pm)
    assert sorted(rep.accelerated) == names and not rep.fused and not rep.skipped
    assert sorted(rep.peft_path) == names and all(w.startswith("cpu, backend='auto': ") for w in rep.peft_path.values())
    assert "0 run the fused op, 2 PEFT's own forward" in str(rep)
    ops = []
    real = skf.sorsa_linear
    monkeypatch.setattr(skf, "sorsa_linear", lambda *a, **k: ops.append(1) or real(*a, **k))
    x, dy = inputs(torch.float32)
    pm.train(), ref.train()
    torch.manual_seed(7)
    ours = run(pm, x, dy)
    torch.manual_seed(7)
    theirs = run(ref, x, dy)
    assert not ops
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for n in theirs[2]:
        torch.testing.assert_close(ours[2][n], theirs[2][n], rtol=0, atol=0)
    rep = skp.accelerate(pm, backend="torch")
    assert sorted(rep.fused) == names and not rep.peft_path
    pm(x)
    assert len(ops) == 2
    # the rule per device: forced backends always run the op; 'auto' where the op is fused
    assert skf.fused_here("torch", torch.device("cpu"), torch.float32)
    assert not skf.fused_here("auto", torch.device("meta"), torch.float32)
    monkeypatch.setattr(skf._backend, "resolve", lambda op, b, dev, dt=None: "triton")
    assert skf.fused_here("auto", torch.device("cuda"), torch.float32)
    assert not skf.fused_here("auto", torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------- batched SVD init

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_fast_pissa_matches_peft_and_batches(monkeypatch, init):
    """Both PiSSA spellings are served by the batched rsvd; compared with PEFT's exact "pissa"."""
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 48))
    conf = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2"], init_lora_weights=init)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2"],
                                                         init_lora_weights="pissa"))
    calls = []
    real = sk_init.rsvd
    monkeypatch.setattr(sk_init, "rsvd", lambda W, r, **kw: calls.append(tuple(W.shape)) or real(W, r, **kw))
    with skp.fast_svd_init(method="rsvd_always", seed=0, niter=12):
        ours = get_peft_model(copy.deepcopy(base), copy.deepcopy(conf))
    assert sorted(calls) == [(1, 48, 32), (2, 32, 32)]  # one call per shape group
    x = torch.randn(5, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    for i in range(3):
        lo, lr_ = ours.base_model.model[i], ref.base_model.model[i]
        BA = lambda m: m.lora_B["default"].weight @ m.lora_A["default"].weight  # noqa: E731
        torch.testing.assert_close(BA(lo), BA(lr_), rtol=0, atol=1e-4)
        torch.testing.assert_close(lo.base_layer.weight, lr_.base_layer.weight, rtol=0, atol=1e-4)
    # PEFT's machinery is restored after the block
    assert peft.tuners.lora.LoraLayer.pissa_init.__name__ == "pissa_init"
    assert peft.tuners.lora.LoraLayer.pissa_init.__qualname__.startswith("LoraLayer")


@needs_kasa
def test_fast_kasa_truncation_matches_peft():
    torch.manual_seed(4)
    base = Tiny()
    conf = LoraConfig(r=4, target_modules=["q", "v"], kasa_config=KasaConfig())
    ref = get_peft_model(copy.deepcopy(base), copy.deepcopy(conf))
    with skp.fast_svd_init():
        ours = get_peft_model(copy.deepcopy(base), copy.deepcopy(conf))
    for name in ("q", "v"):
        torch.testing.assert_close(getattr(ours.base_model.model, name).base_layer.weight,
                                   getattr(ref.base_model.model, name).base_layer.weight, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="KaSA requires"), skp.fast_svd_init():
        get_peft_model(Tiny(), LoraConfig(r=20, target_modules=["q"], kasa_config=KasaConfig()))
    with pytest.raises(ValueError, match="method"), skp.fast_svd_init(method="qr"):
        pass


@needs_kasa
@pytest.mark.parametrize("method", ["rsvd", "svd"])
def test_fast_kasa_on_real_weights_equals_peft_and_is_closer_to_float64(method):
    """KaSA's base truncation on the tiny pretrained Llama's 28 real weights: equal to PEFT's within
    float32 rounding; the default path (minor triplets from the float64 Gram matrix) is closer to a
    float64 truncation than PEFT's float32 SVD is."""
    transformers = pytest.importorskip("transformers")
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "examples", "assets", "tiny_base")
    base = transformers.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    conf = LoraConfig(r=8, target_modules=targets, kasa_config=KasaConfig())
    ref = get_peft_model(copy.deepcopy(base), copy.deepcopy(conf))
    with skp.fast_svd_init(method=method):
        ours = get_peft_model(copy.deepcopy(base), copy.deepcopy(conf))
    ref_mods, n = dict(ref.named_modules()), 0
    for name, mod in ours.named_modules():
        if not hasattr(mod, "lora_diag") or not hasattr(mod, "base_layer"):
            continue
        n += 1
        W = dict(base.named_modules())[name.replace("base_model.model.", "", 1)].weight.double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        keep = min(W.shape) - 8
        want = (U[:, :keep] * S[:keep]) @ Vh[:keep]
        got, peft_w = mod.base_layer.weight.double(), ref_mods[name].base_layer.weight.double()
        torch.testing.assert_close(got, peft_w, rtol=0, atol=2e-5 * W.abs().max().item())
        if method == "rsvd":
            assert (got - want).norm() < 0.5 * (peft_w - want).norm(), name
    assert n == 28


def test_fast_pissa_more_accurate_than_pissa_niter():
    """σ error of the top-r components PiSSA moves into the adapter: our rsvd defaults vs PEFT's
    fast PiSSA (``pissa_niter_4``: torch.svd_lowrank, q = r, no oversampling)."""
    W = synthetic_weights(2, 256, 256, seed=0)
    r = 16
    exact = exact_sigmas(W, r)
    _, S_ours, _ = sk.rsvd(W, r, seed=0)
    S_peft = torch.stack([torch.svd_lowrank(w, r, niter=4)[1] for w in W])
    err_ours, err_peft = max_rel_sigma_err(S_ours, exact), max_rel_sigma_err(S_peft, exact)
    assert err_ours < 0.02 and err_ours < err_peft / 3, (err_ours, err_peft)


# ---------------------------------------------------------------- regularizers

@needs_kasa
def test_kasa_loss_equals_peft():
    pm = make("kasa")
    ours = skp.kasa_loss(pm)
    ours.backward()
    g_ours = {n: t.grad.clone() for n, t in pm.named_parameters() if t.grad is not None}
    pm.zero_grad()
    theirs = pm.base_model._get_kasa_loss()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert len(g_ours) == 6
    for n, t in pm.named_parameters():
        if t.grad is not None:
            torch.testing.assert_close(g_ours[n], t.grad, rtol=1e-4, atol=1e-6)
    assert skp.kasa_loss(make("lora")) == 0.0


def test_sorsa_ortho_on_peft_params():
    pm = make("lora")
    mats = [(m.lora_A["default"].weight, False) for m in (pm.base_model.model.q, pm.base_model.model.v)]
    mats += [(m.lora_B["default"].weight, True) for m in (pm.base_model.model.q, pm.base_model.model.v)]
    ref = sum(torch.linalg.norm((M.t() @ M if isb else M @ M.t()) - torch.eye(4)) for M, isb in mats) / 4
    val = skp.lora_ortho_loss(pm)
    torch.testing.assert_close(val, ref, rtol=1e-5, atol=1e-6)
    val.backward()
    g = {id(M): M.grad.clone() for M, _ in mats}
    pm.zero_grad(set_to_none=True)
    out = skp.lora_orthonormal_grad_(pm, gamma=0.2, lr=0.1)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    for M, _ in mats:
        torch.testing.assert_close(M.grad, 2.0 * g[id(M)], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no PEFT LoRA factors"):
        skp.lora_ortho_loss(Tiny())


@pytest.mark.parametrize("init", [KINDS[1], "pissa", "olora", "lora"])
def test_export_plain_lora_on_original_base(init, tmp_path):
    """KaSA / PiSSA / LoRA adapters exported as a plain LoRA that the real peft loads onto the
    original, unmodified base and that reproduces the fine-tuned outputs."""
    torch.manual_seed(0)
    base = Tiny()
    original = copy.deepcopy(base)
    kw = {"kasa": dict(kasa_config=KasaConfig()), "lora": {}}.get(init, dict(init_lora_weights=init))
    pm = make(init if init == "kasa" else "lora", **({} if init == "kasa" else kw))
    if init != "kasa":
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=["q", "v"], **kw))
        with torch.no_grad():
            for n, t in pm.named_parameters():
                if "lora_B" in n:
                    t.add_(torch.randn_like(t))
    skp.accelerate(pm)
    ranks = skp.export_plain_lora(pm, tmp_path, original)
    assert set(ranks.values()) == ({4} if init == "lora" else {8})
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    x = torch.randn(6, 24)
    y = pm(x)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=2e-5 * y.abs().max().item())
    with pytest.raises(ValueError, match="original"):
        skp.export_plain_lora(pm, tmp_path, {})


def test_gpt2_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D (weight in × out, PEFT's fan_in_fan_out=True) runs on the fused op through a
    transposed view of the weight; forward and gradients match PEFT's layer."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(20, 24), nn.Tanh(), Conv1D(24, 20))
    pristine = copy.deepcopy(base)  # get_peft_model wraps base's layers in place
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n:
                t.normal_()
    fast = copy.deepcopy(pm)
    rep = skp.accelerate(fast, backend="torch")
    assert len(rep.accelerated) == 2 and not rep.skipped
    x, dy = inputs(torch.float32, k=24)
    compare(run(fast, x, dy), run(pm, x, dy), run(copy.deepcopy(pm).double(), x.double(), dy.double()))
    assert_fused(fast, x)
    # PiSSA on Conv1D (weight transposed for the SVD) through the batched init
    conf = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], fan_in_fan_out=True, init_lora_weights="pissa")
    ref = get_peft_model(copy.deepcopy(pristine), copy.deepcopy(conf))
    with skp.fast_svd_init(method="svd"):
        ours = get_peft_model(copy.deepcopy(pristine), copy.deepcopy(conf))
    for i in ("0", "2"):
        lo, lr_ = ours.base_model.model[int(i)], ref.base_model.model[int(i)]
        assert type(lo.base_layer) is Conv1D
        torch.testing.assert_close(lo.base_layer.weight, lr_.base_layer.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    """The accelerated layers trace without graph breaks (per-call checks are plain Python on
    module state); in eval the compiled model equals the eager one, in training (dropout on) it
    compiles with fullgraph too."""
    pm = make(kind, p=0.1)
    skp.accelerate(pm, backend="torch")
    pm.eval()
    x, dy = inputs(torch.float32)
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    y_eager, dx_eager, g_eager = run(pm, x, dy)
    y, dx, g = run(compiled, x, dy)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(dx, dx_eager)
    for n in g_eager:
        torch.testing.assert_close(g["_orig_mod." + n], g_eager[n])
    pm.train()
    y_train = torch.compile(pm, backend="aot_eager", fullgraph=True)(x)
    assert torch.isfinite(y_train).all() and (y_train - y_eager).abs().max() > 1e-4  # a mask was applied


def test_bad_inputs_name_the_argument(tmp_path):
    from sorsa_kernels.integrations.peft.forward import KasaLinearVariant
    truncate = KasaLinearVariant.__dict__.get("_truncate_base_weight")
    with pytest.raises(RuntimeError, match="boom"), skp.fast_svd_init():
        raise RuntimeError("boom")
    assert KasaLinearVariant.__dict__.get("_truncate_base_weight") is truncate  # restored on error
    with pytest.raises(TypeError, match="PeftModel"):
        skp.kasa_loss(Tiny())
    pm = make()
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        skp.export_plain_lora(pm, tmp_path, Tiny().state_dict())
    with pytest.raises(ValueError, match="no lora.Linear layer holds adapter 'nope'"):
        skp.export_plain_lora(make(), tmp_path, Tiny(), adapter_name="nope")


class Wide(nn.Module):
    def __init__(self, k=1030, h=770):
        super().__init__()
        self.q = nn.Linear(k, h)
        self.v = nn.Linear(h, k, bias=False)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapters", ["bf16", "fp32"])
def test_gpu_peft_bf16(kind, adapters):
    """On CUDA, accelerate's default backend is the Triton kernels: a bf16 PEFT model (bf16 or
    PEFT's default fp32 adapters) against PEFT in bf16 and float64, forward and every gradient."""
    torch.manual_seed(0)
    conf = LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"],
                      kasa_config=KasaConfig() if kind == "kasa" else None)
    pm = get_peft_model(Wide(), conf).cuda()
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n or "lora_diag" in n:
                t.normal_(std=0.05)
    ref64 = copy.deepcopy(pm).double()
    low = copy.deepcopy(pm).to(torch.bfloat16)
    if adapters == "fp32":
        for n, t in low.named_parameters():
            if "lora_" in n:
                t.data = t.data.float()
    fast = copy.deepcopy(low)
    skp.accelerate(fast)
    assert sk._backend.resolve("sorsa_linear", "auto", torch.device("cuda")) == "triton"
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 333, 1030, device="cuda", generator=g)
    dy = torch.randn(4, 333, 1030, device="cuda", generator=g)
    compare(run(fast, x.bfloat16(), dy), run(low, x.bfloat16(), dy), run(ref64, x.double(), dy.double()))
    assert_fused(fast, x.bfloat16())
