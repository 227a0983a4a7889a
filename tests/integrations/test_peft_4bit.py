"""sk.integrations.peft.accelerate on QLoRA: PEFT LoRA layers over bitsandbytes 4-bit (NF4) base
layers run the base product on the dequantized 4-bit weight and the adapter through the op
(sorsa_kernels.ops.linear4bit.sorsa_linear_4bit); output and every gradient equal PEFT's own
forward (float32, and the float64 rule against a float twin holding the dequantized weights).

PEFT (0.21) limits on 4-bit layers, tested as found: ``lora.Linear4bit`` silently ignores
``kasa_config`` (no ``lora_diag``: the layer is plain LoRA, served as such); PiSSA init refuses a
4-bit base (``TypeError``; PEFT's workflow initialises on the float model and quantises the
residual, tested below); KaSA on a plain ``lora.Linear`` over a 4-bit base fails in PEFT's init."""
import copy

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

try:
    from peft.tuners.lora import KasaConfig
except ImportError:  # pragma: no cover - peft < 0.21
    KasaConfig = None

from sorsa_kernels.integrations import peft as skp  # noqa: E402
from sorsa_kernels.integrations.peft import forward as skf  # noqa: E402
from sorsa_kernels.quant import dequantize  # noqa: E402

from conftest import HAS_TRITON, assert_tolerance  # noqa: E402

if skf.LoraLinear4bit is None:  # pragma: no cover
    pytest.skip("this peft / bitsandbytes has no lora.Linear4bit", allow_module_level=True)
LoraLinear4bit = skf.LoraLinear4bit

K, H, R = 72, 40, 3  # ragged: in 72 -> out 40 (bias) -> out 72 (no bias), rank 3
NAMES = ["base_model.model.q", "base_model.model.v"]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
# PEFT's wrapper: lora.Linear4bit when the model says it is loaded in 4 bit (transformers'
# BitsAndBytesConfig), else a plain lora.Linear around the Linear4bit
WRAPPERS = ["lora.Linear4bit", "lora.Linear"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(K, H)
        self.v = nn.Linear(H, K, bias=False)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def to_4bit(lin: nn.Linear) -> nn.Module:
    """An NF4 bitsandbytes Linear4bit holding ``lin``'s weights (quantized by the move to the CPU)."""
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4")
    m.load_state_dict(lin.state_dict())
    return m.to("cpu")


def base_4bit(seed=0, wrapper="lora.Linear4bit", weights=None) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    if weights is not None:
        model.load_state_dict(weights)
    model.q, model.v = to_4bit(model.q), to_4bit(model.v)
    if wrapper == "lora.Linear4bit":
        model.is_loaded_in_4bit = True  # what transformers sets; PEFT dispatches to its bnb layer on it
    return model


def make(wrapper="lora.Linear4bit", p=0.0, seed=0, **cfg) -> nn.Module:
    """A QLoRA PEFT model with non-trivial adapters (B ≠ 0, KaSA diag random where there is one)."""
    pm = get_peft_model(base_4bit(seed, wrapper), LoraConfig(r=R, lora_alpha=5, target_modules=["q", "v"],
                                                             lora_dropout=p, **cfg))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n or "lora_diag" in n:
                t.normal_()
    want = LoraLinear4bit if wrapper == "lora.Linear4bit" else LoraLinear
    assert all(type(pm.get_submodule(n)) is want for n in NAMES)
    return pm


def float_twin(pm) -> nn.Module:
    """The same PEFT model on nn.Linear bases holding the dequantized weights (exact in fp32/fp64)."""
    base = Tiny()
    for n in ("q", "v"):
        b4 = pm.base_model.model.get_submodule(n).base_layer
        lin = getattr(base, n)
        lin.weight.data = dequantize(b4.weight, torch.float32)
        if b4.bias is not None:
            lin.bias.data = b4.bias.data.float().clone()
    conf = copy.deepcopy(pm.peft_config["default"])
    if not any("lora_diag" in n for n in pm.state_dict()):  # PEFT ignored kasa_config on the 4-bit layers
        conf.kasa_config = None
    twin = get_peft_model(base, conf)
    lora = {n: t for n, t in pm.state_dict().items() if "lora_" in n}
    missing, unexpected = twin.load_state_dict(lora, strict=False)
    assert not unexpected and not [m for m in missing if "lora_" in m]
    return twin


def run(model, x, dy):
    """Output and the gradients of x and of every trainable parameter."""
    x = x.clone().requires_grad_()
    for t in model.parameters():
        t.grad = None
    y = model(x)
    y.backward(dy.to(y.dtype))
    grads = {n: t.grad for n, t in model.named_parameters() if t.requires_grad}
    return y.detach(), x.grad, grads


def inputs(shape=(3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, K, generator=g), torch.randn(*shape, K, generator=g)


class Fused:
    """Counts the 4-bit op's calls and PEFT's own forwards while active."""

    def __init__(self, monkeypatch):
        self.op = self.peft = 0
        op = skf.sorsa_linear_4bit

        def counted(*a, **k):
            self.op += 1
            return op(*a, **k)

        monkeypatch.setattr(skf, "sorsa_linear_4bit", counted)  # forward.py calls it through its global
        for cls in (LoraLinear4bit, LoraLinear):
            fwd = cls.forward
            monkeypatch.setattr(cls, "forward", lambda self, *a, _f=fwd, **k: setattr(
                counter, "peft", counter.peft + 1) or _f(self, *a, **k))
        counter = self


def compare(out, peft32, ref64):
    (y, dx, g), (yl, dxl, gl), (yr, dxr, gr) = out, peft32, ref64
    # PEFT's own QLoRA forward in float32, closely ...
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, yl.abs().max().item()))
    torch.testing.assert_close(y, yl, **tol)
    # ... and both against float64 (flash-attention's rule, as tests/integrations/test_peft.py)
    assert_tolerance(y, yl, yr, "y")
    assert_tolerance(dx, dxl, dxr, "dx")
    assert g.keys() == gl.keys() == gr.keys() and len(g) >= 4
    for n in g:
        assert_tolerance(g[n], gl[n], gr[n], n)


# ---------------------------------------------------------------- forward / gradients vs PEFT

@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_peft_qlora(backend, wrapper, monkeypatch):
    pm = make(wrapper, use_rslora=(backend == "torch"))
    ref64 = float_twin(pm).double()
    fast = copy.deepcopy(pm)
    rep = skp.accelerate(fast, backend=backend)
    assert rep.accelerated == NAMES and rep.fused == NAMES and not rep.skipped and not rep.peft_path
    want = skf.AcceleratedLoraLinear4bit if wrapper == "lora.Linear4bit" else skp.AcceleratedLoraLinear
    assert all(type(fast.get_submodule(n)) is want for n in NAMES)
    x, dy = inputs(shape=(7,) if backend == "triton" else (3, 5))
    fused = Fused(monkeypatch)
    out = run(fast, x, dy)
    assert (fused.op, fused.peft) == (2, 0)  # both layers through the 4-bit op, PEFT's forward never entered
    compare(out, run(pm, x, dy), run(ref64, x.double(), dy.double()))
    # bitsandbytes' first-call state set as its own forward would
    for n in NAMES:
        b, bp = fast.get_submodule(n).base_layer, pm.get_submodule(n).base_layer
        assert b.compute_type_is_set and b.compute_dtype == bp.compute_dtype == torch.float32


@pytest.mark.parametrize("adapters", ["fp32", "bf16"])
def test_bf16_input(adapters, monkeypatch):
    """QLoRA's usual setting: bf16 activations, PEFT's default fp32 adapters (or bf16 ones), an fp32
    bias: bitsandbytes computes in bf16 (its first call sets compute_dtype) and recasts the bias to
    bf16 in place; served from the first call, leaving the state PEFT's forward leaves."""
    pm = make()
    if adapters == "bf16":
        for n, t in pm.named_parameters():
            if "lora_" in n:
                t.data = t.data.bfloat16()
    ref64 = float_twin(pm).double()
    fast = copy.deepcopy(pm)
    skp.accelerate(fast, backend="torch")
    x, dy = inputs()
    fused = Fused(monkeypatch)
    out = run(fast, x.bfloat16(), dy)
    assert (fused.op, fused.peft) == (2, 0) and out[0].dtype == torch.bfloat16
    low = run(pm, x.bfloat16(), dy)
    (y, dx, g), (yl, dxl, gl), (yr, dxr, gr) = out, low, run(ref64, x.double(), dy.double())
    assert_tolerance(y, yl, yr, "y")
    assert_tolerance(dx, dxl, dxr, "dx")
    for n in gl:
        assert g[n].dtype == gl[n].dtype
        assert_tolerance(g[n], gl[n], gr[n], n)
    for n in NAMES:
        b, bp = fast.get_submodule(n).base_layer, pm.get_submodule(n).base_layer
        assert b.compute_dtype == bp.compute_dtype == torch.bfloat16
        assert getattr(b.bias, "dtype", None) == getattr(bp.bias, "dtype", None)
    assert fast.base_model.model.q.base_layer.bias.dtype == torch.bfloat16


@pytest.mark.skipif(KasaConfig is None, reason="this peft has no KaSA (peft >= 0.21)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_kasa_config_on_4bit(backend):
    """PEFT's lora.Linear4bit resolves no KaSA variant (0.21: kasa_config is ignored, no lora_diag):
    the layer is served as the plain LoRA PEFT runs. Should PEFT add KaSA there, lora_diag is S."""
    try:
        pm = make(kasa_config=KasaConfig(beta=0.3, gamma=0.7))
    except (ValueError, TypeError) as e:  # pragma: no cover - a PEFT that refuses it
        pytest.skip(f"peft refuses KaSA on 4-bit layers: {e}")
    layer = pm.base_model.model.q
    kasa = bool(getattr(layer, "lora_diag", {}))
    assert kasa == isinstance(layer.lora_variant.get("default"), skf.KasaLinearVariant)
    fast = copy.deepcopy(pm)
    rep = skp.accelerate(fast, backend=backend)
    assert rep.fused == NAMES and not rep.skipped
    x, dy = inputs(shape=(6,))
    compare(run(fast, x, dy), run(pm, x, dy), run(float_twin(pm).double(), x.double(), dy.double()))


def test_pissa_qlora_workflow():
    """PEFT refuses PiSSA init on a 4-bit base; its QLoRA recipe initialises PiSSA on the float model
    and quantises the residual. That adapter on the 4-bit residual is served and equals PEFT."""
    torch.manual_seed(0)
    conf = LoraConfig(r=R, lora_alpha=R, target_modules=["q", "v"], init_lora_weights="pissa")
    with pytest.raises(TypeError, match="PiSSA"):
        get_peft_model(base_4bit(), copy.deepcopy(conf))
    pissa = get_peft_model(Tiny(), conf)
    residual = {n: getattr(pissa.base_model.model, n).base_layer.state_dict() for n in ("q", "v")}
    weights = {f"{n}.{k}": t for n, sd in residual.items() for k, t in sd.items()}
    pm = get_peft_model(base_4bit(weights=weights), LoraConfig(r=R, lora_alpha=R, target_modules=["q", "v"]))
    adapter = {n: t for n, t in pissa.state_dict().items() if "lora_" in n}
    assert len(adapter) == 4 and not pm.load_state_dict(adapter, strict=False).unexpected_keys
    fast = copy.deepcopy(pm)
    assert skp.accelerate(fast, backend="torch").fused == NAMES
    x, dy = inputs()
    compare(run(fast, x, dy), run(pm, x, dy), run(float_twin(pm).double(), x.double(), dy.double()))
    # the 4-bit residual plus the PiSSA adapter stays near the float model it came from (NF4's error
    # on two small random layers: ~12% of the output's max here)
    y, y_float = fast(x), pissa(x)
    assert (y - y_float).abs().max() < 0.25 * y_float.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(backend, monkeypatch):
    """p > 0: masks cannot be shared with PEFT's nn.Dropout. In training it runs the op with a mask
    (differs from eval, finite gradients of every shape); in eval it equals PEFT's forward."""
    pm = make(p=0.3)
    fast = copy.deepcopy(pm)
    skp.accelerate(fast, backend=backend)
    x, dy = inputs(shape=(2, 4))
    fast.train()
    fused = Fused(monkeypatch)
    y, dx, g = run(fast, x, dy)
    assert (fused.op, fused.peft) == (2, 0)
    assert y.shape == (2, 4, K) and dx.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(dx).all()
    params = dict(fast.named_parameters())
    assert len(g) == 4 and all(t.shape == params[n].shape and torch.isfinite(t).all() for n, t in g.items())
    fast.eval()
    pm.eval()
    y_eval, *_ = run(fast, x, dy)
    assert (y - y_eval).abs().max() > 1e-3  # a mask was applied in training
    compare((y_eval, *run(fast, x, dy)[1:]), run(pm, x, dy), run(float_twin(pm).double().eval(), x.double(),
                                                                   dy.double()))


# ---------------------------------------------------------------- per-call fallbacks, PEFT machinery

def test_per_call_fallbacks_equal_peft(monkeypatch):
    """Calls the op cannot serve as bitsandbytes / PEFT would take PEFT's forward, same result:
    autocast (bitsandbytes computes outside it), a compute_dtype other than the input's, merged or
    disabled adapters. A single-row no-grad call (decoding) is served and equals PEFT."""
    pm = make()
    fast = copy.deepcopy(pm)
    skp.accelerate(fast, backend="torch")
    x, _ = inputs()
    fused = Fused(monkeypatch)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    with torch.no_grad():
        close(fast(x), pm(x))  # first call: compute_dtype becomes float32 in both
        assert (fused.op, fused.peft) == (2, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = fast(x), pm(x)
        assert y.dtype == y_ref.dtype == torch.float32
        close(y, y_ref)
        assert (fused.op, fused.peft) == (2, 6)
        xb = x.bfloat16()  # bitsandbytes keeps computing in float32 (set on the first call), PEFT casts
        torch.testing.assert_close(fast(xb), pm(xb))
        assert (fused.op, fused.peft) == (2, 10)
        # decoding: bitsandbytes' GEMV + the adapter GEMVs. PEFT's reference stays in train mode (no
        # dropout here): in eval without grad, bitsandbytes' own forward repacks the weight for
        # AVX512-BF16 CPUs, which asserts out_features % 32 == 0 (40 here)
        fast.eval()
        row = x[0, :1]
        close(fast(row), pm(row))
        assert (fused.op, fused.peft) == (4, 12)
        fast.train()
        with fast.disable_adapter(), pm.disable_adapter():
            close(fast(x), pm(x))
        assert fused.op == 4
    with pytest.warns(UserWarning, match="4-bit"):  # PEFT's merge re-quantizes W + ΔW
        fast.merge_adapter()
        pm.merge_adapter()
    op = fused.op
    close(fast(x), pm(x))
    assert fused.op == op
    with pytest.warns(UserWarning, match="4-bit"):
        fast.unmerge_adapter()
        pm.unmerge_adapter()
    close(fast(x), pm(x))
    assert fused.op == op + 2


def test_report_unaccelerate_and_skips():
    """The report counts the 4-bit layers (fused with a forced backend, PEFT's forward under 'auto'
    on the CPU); a 4-bit DoRA adapter is skipped; unaccelerate gives PEFT's lora.Linear4bit back."""
    pm = make()
    ref = copy.deepcopy(pm)
    rep = skp.accelerate(pm)  # auto on the CPU: taken over, PEFT's own forward
    assert rep.accelerated == NAMES and not rep.fused and sorted(rep.peft_path) == NAMES
    assert all(w.startswith("cpu, backend='auto': ") for w in rep.peft_path.values())
    assert str(rep).startswith("2 PEFT LoRA layers taken over: 0 run the fused op, 2 PEFT's own forward")
    rep = skp.accelerate(pm, backend="torch")  # idempotent, re-targets the backend
    assert rep.accelerated == rep.fused == NAMES
    q = pm.base_model.model.q
    assert type(q) is skf.AcceleratedLoraLinear4bit and isinstance(q, LoraLinear4bit)
    assert repr(q) == repr(ref.base_model.model.q) and repr(q).startswith("lora.Linear4bit(")
    assert [s.module_type for s in pm.get_layer_status()] == [s.module_type for s in ref.get_layer_status()]
    assert set(pm.state_dict()) == set(ref.state_dict())
    x, _ = inputs()
    y = pm(x).detach()
    skp.unaccelerate(pm)
    assert all(type(pm.get_submodule(n)) is LoraLinear4bit for n in NAMES)
    assert "_sk_backend" not in vars(q)
    torch.testing.assert_close(pm(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)  # PEFT's forward again
    # DoRA on a 4-bit base: PEFT's variant, left on PEFT's path
    dora = make(use_dora=True)
    with pytest.warns(UserWarning, match="left on PEFT's path"):
        rep = skp.accelerate(dora, backend="torch")
    assert not rep.accelerated and sorted(rep.skipped) == NAMES
    assert all("DoraLinearVariant" in why for why in rep.skipped.values())
    assert all(type(dora.get_submodule(n)) is LoraLinear4bit for n in NAMES)
    assert skf.servable_reason(make().base_model.model.q, "default") is None


def test_mixed_4bit_and_float_layers(monkeypatch):
    """One model, a 4-bit q and a float v: both served, each by its op, equal to PEFT."""
    torch.manual_seed(0)
    model = Tiny()
    model.q = to_4bit(model.q)
    model.is_loaded_in_4bit = True
    pm = get_peft_model(model, LoraConfig(r=R, target_modules=["q", "v"], init_lora_weights=False))
    fast = copy.deepcopy(pm)
    rep = skp.accelerate(fast, backend="torch")
    assert rep.fused == NAMES
    assert type(fast.base_model.model.q) is skf.AcceleratedLoraLinear4bit
    assert type(fast.base_model.model.v) is skp.AcceleratedLoraLinear
    x, dy = inputs()
    fused = Fused(monkeypatch)
    out = run(fast, x, dy)
    assert (fused.op, fused.peft) == (1, 0)
    ref = run(pm, x, dy)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(out[2][n], ref[2][n], rtol=1e-5, atol=1e-5)


def test_training_steps_match_peft():
    """A few SGD steps through the accelerated QLoRA model track PEFT's own (same updates)."""
    pm = make()
    fast = copy.deepcopy(pm)
    skp.accelerate(fast, backend="torch")
    x, dy = inputs()
    for model in (pm, fast):
        opt = torch.optim.SGD([t for t in model.parameters() if t.requires_grad], lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            (model(x) * dy).sum().backward()
            opt.step()
    sd, sd_ref = fast.state_dict(), pm.state_dict()
    for n in sd_ref:
        if "lora_" in n:
            torch.testing.assert_close(sd[n], sd_ref[n], rtol=1e-4, atol=1e-5)
