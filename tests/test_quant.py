"""QSORSA: the 4-bit residual (sk.apply_sorsa(quantize=...), SORSALinear4bit, ops.sorsa_linear_4bit).

Errors against QLoRA on real pretrained weights (examples/assets/tiny_base), forward and every
gradient against a float64 reference on the dequantized residual (both backends), bytes, files,
checkpoints, a 4-bit base model, a short training run."""
import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")

import sorsa_kernels as sk  # noqa: E402
from sorsa_kernels import quant  # noqa: E402
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_4bit, sorsa_linear_4bit_naive  # noqa: E402
from sorsa_kernels.ops import linear4bit as op4  # noqa: E402

from conftest import FLOOR, HAS_TRITON, KERNEL_DEVICE, assert_tolerance  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "assets", "tiny_base")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4_manual(W: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """NF4 round trip written out (float64): blocks along the flattened matrix, absmax scaling,
    nearest code value; no double quantization. Independent of bitsandbytes' kernels."""
    code = quant.require_bnb().functional.get_4bit_type("nf4", device="cpu").to(torch.float64)
    flat = W.double().reshape(-1)
    pad = (-flat.numel()) % blocksize
    b = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
    am = b.abs().amax(1, keepdim=True)
    idx = ((b / am)[..., None] - code).abs().argmin(-1)
    return (code[idx] * am).reshape(-1)[:flat.numel()].reshape(W.shape)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(TINY, dtype=torch.float32)


# -- storage -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(80, 96), (96, 80), (33, 688), (70, 45), (64, 64)])
def test_dequantize_is_true_nf4_for_every_shape(shape):
    """(80, 96) and 688 columns are where bitsandbytes 0.50.2's CPU kernel dequantizes wrongly;
    ours equals the written-out NF4 for every shape (no double quant: exact)."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    D = quant.dequantize(quant.quantize(W, "nf4", 64, double_quant=False))
    assert torch.allclose(D.double(), nf4_manual(W), rtol=1e-6, atol=1e-7)
    assert rel(D, W) < 0.1  # NF4 on Gaussian data: ~0.09


def test_bytes_of_a_4bit_layer():
    lin = nn.Linear(512, 384)
    layer = sk.SORSALinear4bit.from_sorsa(sk.SORSALinear.from_linear(lin, 16, init="svd"))
    w_bytes = quant.nbytes(layer.weight)
    assert w_bytes <= 0.16 * lin.weight.numel() * 4  # ≤ 0.16× fp32, ≤ 0.32× bf16
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad


# -- error vs QLoRA on real pretrained weights ------------------------------------------------------
def test_error_below_qlora_on_every_real_weight():
    """Every one of the tiny base's 28 projection weights: ‖W − (deq(W_r) + W_p)‖ < ‖W − deq(W)‖ (QLoRA,
    same NF4 blocksize 64, double quant), r = 16; quant_iters=2 never worse than the exact init."""
    model = tiny_llama()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS}
    assert len(originals) == 28
    q0 = sk.apply_sorsa(copy.deepcopy(model), TARGETS, r=16, quantize="nf4", match="peft", init="svd")
    q2 = sk.apply_sorsa(copy.deepcopy(model), TARGETS, r=16, quantize="nf4", match="peft", init="svd",
                        quant_iters=2)
    mods0, mods2 = dict(q0.named_modules()), dict(q2.named_modules())
    ratios = []
    for name, W in originals.items():
        qlora = rel(quant.dequantize(quant.quantize(W, "nf4", 64, True)), W)
        e0 = rel(mods0[name].effective_weight(), W)
        e2 = rel(mods2[name].effective_weight(), W)
        assert isinstance(mods0[name], sk.SORSALinear4bit)
        assert e0 < qlora, f"{name}: {e0:.4f} >= QLoRA {qlora:.4f}"
        assert e2 <= e0 + 1e-7, f"{name}: quant_iters=2 gave {e2:.4f} > {e0:.4f}"
        ratios.append(e0 / qlora)
    assert max(ratios) < 1.0


# -- the op: forward and gradients vs float64 on the dequantized residual --------------------------
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
SHAPES = [((1,), 16, 16, 1), ((37,), 45, 29, 5), ((2, 13), 96, 80, 17), ((20,), 40, 48, 40)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M_shape,k,n,r", SHAPES)
def test_op_matches_float64_reference(backend, dtype, M_shape, k, n, r):
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(k * n + r)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = quant.quantize((rn(n, k) / k ** 0.5).to(dev, dtype), "nf4", 64, True)
    o = dict(x=rn(*M_shape, k), A=rn(r, k) / k ** 0.5, S=rn(r).abs() + 0.5, B=rn(n, r) / n ** 0.5, b=rn(n),
             dy=rn(*M_shape, n))

    def run(fn, dt, device):
        x = o["x"].to(device, dt, copy=True)
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() if x.dim() > 1 else x.requires_grad_()
        ts = [x] + [o[kk].to(device, dt, copy=True).requires_grad_() for kk in ("A", "S", "B", "b")]
        y = fn(*ts)
        y.backward(o["dy"].to(device, dt))
        return [y.detach().cpu()] + [t.grad.cpu() for t in ts]

    fused = run(lambda x, A, S, B, b: sorsa_linear_4bit(x, q, A, S, B, 0.5, b, backend=backend), dtype, dev)
    lowp = run(lambda x, A, S, B, b: sorsa_linear_4bit_naive(x, q, A, S, B, 0.5, b), dtype, dev)
    ref = run(lambda x, A, S, B, b: sorsa_linear_4bit_naive(x, q.to("cpu") if dev != "cpu" else q, A, S, B, 0.5, b),
              torch.float64, "cpu")
    for name, a, lo, r64 in zip(["y", "dx", "dA", "dS", "dB", "dbias"], fused, lowp, ref):
        assert_tolerance(a, lo, r64, name, floor=FLOOR[dtype] * (4 if dtype == torch.bfloat16 else 1))


def test_op_equals_the_linear_op_on_the_dequantized_weight_with_dropout():
    """Same seed → the same dropout mask: outputs and gradients equal sorsa_linear's on deq(W_r);
    only A, S, B (and bias, x) get gradients, the 4-bit weight none."""
    torch.manual_seed(0)
    q = quant.quantize(torch.randn(40, 72), "nf4", 64, True)
    x = torch.randn(3, 5, 72, requires_grad=True)
    A, S, B = torch.randn(6, 72, requires_grad=True), torch.rand(6, requires_grad=True), torch.randn(40, 6, requires_grad=True)
    outs = []
    for fn in (lambda: sorsa_linear_4bit(x, q, A, S, B, 2.0, dropout_p=0.3, backend="torch"),
               lambda: sorsa_linear(x, quant.dequantize(q), A, S, B, 2.0, dropout_p=0.3, backend="torch")):
        torch.manual_seed(7)
        y = fn()
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad.clone() for t in (x, A, S, B)])
        for t in (x, A, S, B):
            t.grad = None
    for a, b in zip(*outs):  # the same GEMMs, summed in another order (fp32)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert q.grad is None
    with torch.no_grad():  # eval: no dropout, deterministic
        y1 = sorsa_linear_4bit(x, q, A, S, B, 2.0, dropout_p=0.3, training=False)
        y2 = sorsa_linear_4bit(x, q, A, S, B, 2.0, dropout_p=0.3, training=False)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("x_shape", [(1, 128), (1, 1, 128), (2, 3, 128), (32, 128)])
def test_decode_rows_through_bitsandbytes(monkeypatch, x_shape):
    """The no-grad route of <= DECODE_M rows (bitsandbytes' GEMV / small-M gemm_4bit on CUDA)
    computes the same as the main path; checked here by enabling it on the CPU for a shape
    bitsandbytes' CPU kernels get right."""
    q = quant.quantize(torch.randn(48, 128), "nf4", 64, True)
    A, S, B = torch.randn(4, 128), torch.rand(4), torch.randn(48, 4)
    x = torch.randn(*x_shape)
    want = sorsa_linear_4bit_naive(x.double(), q, A.double(), S.double(), B.double(), 0.5)
    monkeypatch.setattr(op4, "GEMV_DEVICES", ("cuda", "cpu"))
    calls, real = [], bnb.matmul_4bit

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)
    monkeypatch.setattr(bnb, "matmul_4bit", spy)
    with torch.no_grad():
        got = sorsa_linear_4bit(x, q, A, S, B, 0.5)
    assert calls and got.shape == (*x_shape[:-1], 48)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_bad_input_names_the_argument():
    q = quant.quantize(torch.randn(8, 16))
    A, S, B = torch.randn(2, 16), torch.rand(2), torch.randn(8, 2)
    with pytest.raises(TypeError, match="weight must be a quantized bitsandbytes Params4bit"):
        sorsa_linear_4bit(torch.randn(3, 16), torch.randn(8, 16), A, S, B)
    with pytest.raises(ValueError, match="x must have last dimension in_features=16"):
        sorsa_linear_4bit(torch.randn(3, 15), q, A, S, B)
    with pytest.raises(ValueError, match="B must have shape"):
        sorsa_linear_4bit(torch.randn(3, 16), q, A, S, torch.randn(9, 2))
    with pytest.raises(ValueError, match="quantize must be one of"):
        sk.apply_sorsa(nn.Sequential(nn.Linear(16, 8)), ["0"], r=2, quantize="int8")
    with pytest.raises(ValueError, match="quant_blocksize must be one of"):
        sk.apply_sorsa(nn.Sequential(nn.Linear(16, 8)), ["0"], r=2, quantize="nf4", quant_blocksize=63)
    with pytest.raises(ValueError, match="quant_iters must be an int >= 0"):
        sk.apply_sorsa(nn.Sequential(nn.Linear(16, 8)), ["0"], r=2, quantize="nf4", quant_iters=-1)
    with pytest.raises(ValueError, match="merge_weights must be False"):
        sk.SORSALinear4bit(16, 8, r=2, merge_weights=True)


def test_4bit_options_without_quantize_and_qlora_names_are_refused():
    """The 4-bit options do nothing without quantize: an error, not a silent full-precision model;
    QLoRA's / bitsandbytes' keyword names say which of ours was meant."""
    for kw in (dict(quant_iters=2), dict(quant_blocksize=128), dict(double_quant=False)):
        with pytest.raises(ValueError, match="take effect only with quantize='nf4' or 'fp4'"):
            sk.apply_sorsa(nn.Sequential(nn.Linear(16, 8)), ["0"], r=2, **kw)
    for kw, meant in (("load_in_4bit", "quantize='nf4'"), ("bnb_4bit_quant_type", "quantize"),
                      ("quant_type", "quantize"), ("bnb_4bit_use_double_quant", "double_quant")):
        with pytest.raises(TypeError, match=f"{kw}' \\(did you mean \"{meant}\"|{kw}' \\(did you mean '{meant}'"):
            sk.apply_sorsa(nn.Sequential(nn.Linear(16, 8)), ["0"], r=2, **{kw: True})


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r'pip install "sorsa-kernels\[quant\]"'):
        sk.apply_sorsa(nn.Sequential(nn.Linear(16, 8)), ["0"], r=2, quantize="nf4")


# -- the layer in a model ----------------------------------------------------------------------------
def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(72, 96), nn.GELU(), nn.Linear(96, 40))


def test_module_api_only_adapters_train_regularizer_and_eval():
    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, alpha=8, dropout=0.1, quantize="nf4")
    layer = m[0]
    assert isinstance(layer, sk.SORSALinear4bit) and layer.scale == 2.0 and not layer.merge_weights
    x = torch.randn(5, 72)
    y = m(x)
    (y.square().mean() + sk.ortho_loss(m)).backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == ("sorsa_" in n or n.endswith("bias")), n
    assert m[0].weight.grad is None
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    sk.merge_sorsa(m)  # merge_weights=False: a no-op, as in the reference
    assert not m[0].merged
    with pytest.raises(RuntimeError, match="cannot re-decompose"):
        m[0].sorsa_init()


def test_save_load_adapter_rebuilds_the_quantized_residual_bit_for_bit(tmp_path):
    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, quantize="nf4", quant_iters=1)
    with torch.no_grad():
        for p in sk.sorsa_parameters(m):
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    sk.save_adapter(m, str(tmp_path / "a"))
    fresh = sk.load_adapter(small_model(), str(tmp_path / "a"))
    x = torch.randn(6, 72)
    for i in (0, 2):
        assert isinstance(fresh[i], sk.SORSALinear4bit)
        assert torch.equal(fresh[i].weight.data, m[i].weight.data)
        assert fresh[i].quant_config() == m[i].quant_config()
    m.eval(), fresh.eval()
    assert torch.equal(fresh(x), m(x))
    with pytest.raises(ValueError, match="base weight differs"):
        sk.load_adapter(small_model(seed=1), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="4-bit residual in the adapter"):
        sk.load_adapter(sk.apply_sorsa(small_model(), ["0", "2"], r=4), str(tmp_path / "a"))


def test_load_adapter_warns_when_the_rebuilt_residual_differs(tmp_path):
    """The adapter records a fingerprint of the packed residual; a rebuild that differs (as a
    residual quantized on another device type may) warns instead of passing silently."""
    import json

    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, quantize="nf4")
    sk.save_adapter(m, str(tmp_path / "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.load_adapter(small_model(), str(tmp_path / "a"))  # same device: the same bytes, no warning
    cfg_path = tmp_path / "a" / "sorsa_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layers"]["2"]["packed_fingerprint"]["sum"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"rebuilt for \['2'\] differs from the one saved"):
        sk.load_adapter(small_model(), str(tmp_path / "a"))


def test_quant_state_on_another_device_is_a_clear_error():
    q = quant.quantize(torch.randn(8, 16))
    q.quant_state.absmax = q.quant_state.absmax.to("meta")
    with pytest.raises(ValueError, match="its quant_state tensors are not"):
        sorsa_linear_4bit(torch.randn(3, 16), q, torch.randn(2, 16), torch.rand(2), torch.randn(8, 2))


def test_dequantize_to_a_narrower_dtype_equals_rounding_the_fp32_result():
    """Straight to bf16/fp16 (one temporary) gives the bytes of fp32-then-cast; widening rounds
    through the stored dtype first."""
    for dq in (False, True):
        q = quant.quantize(3 * torch.randn(33, 688), "nf4", 64, dq)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(quant.dequantize(q, dt), quant.dequantize(q).to(dt))
    qb = quant.quantize(torch.randn(7, 96).bfloat16())
    assert torch.equal(quant.dequantize(qb, torch.float32), quant.dequantize(qb).float())


def test_state_dict_round_trip_and_bnb_layout():
    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, quantize="fp4", double_quant=False)
    sd = m.state_dict()
    assert "0.weight.absmax" in sd and "0.weight.quant_state.bitsandbytes__fp4" in sd
    other = sk.apply_sorsa(small_model(seed=3), ["0", "2"], r=4, quantize="fp4", double_quant=False)
    other.load_state_dict(sd)
    x = torch.randn(4, 72)
    m.eval(), other.eval()
    assert torch.equal(other(x), m(x))
    assert other[0].initial_adapter() is None  # W_r from elsewhere: the initial adapter is unknown
    assert torch.equal(other[0].weight.data, m[0].weight.data)


def test_4bit_base_model_is_accepted():
    """A model whose linears are bitsandbytes Linear4bit (as BitsAndBytesConfig(load_in_4bit=True)
    builds): dequantized, decomposed, the residual re-quantized with the base's settings."""
    base = small_model()
    q = nn.Sequential()
    for i, mod in enumerate(base):
        if isinstance(mod, nn.Linear):
            l4 = bnb.nn.Linear4bit(mod.in_features, mod.out_features, quant_type="nf4")
            l4.load_state_dict(mod.state_dict())
            mod = l4.to("cpu")  # quantizes
        q.add_module(str(i), mod)
    deq = {i: quant.dequantize(q[i].weight) for i in (0, 2)}
    x = torch.randn(3, 72)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, deq[0], q[0].bias)),
                                     deq[2], q[2].bias)
    with pytest.raises(ValueError, match="4-bit bases keep their own blocksize"):
        sk.apply_sorsa(q, ["0", "2"], r=4, quant_blocksize=128)
    with pytest.warns(UserWarning, match=r"2 target\(s\) are bitsandbytes 4-bit layers .* quantized again"):
        sk.apply_sorsa(q, ["0", "2"], r=4)
    for i in (0, 2):
        assert isinstance(q[i], sk.SORSALinear4bit) and q[i].quant_type == "nf4"
        assert rel(q[i].effective_weight(), deq[i]) < 0.1  # W_r re-quantized: a second, smaller rounding
    q.eval()
    with torch.no_grad():
        assert rel(q(x), ref) < 0.2


def test_adapter_from_a_full_precision_base_onto_a_4bit_base_says_why(tmp_path):
    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4)
    sk.save_adapter(m, str(tmp_path / "a"))
    q = small_model()
    for i in (0, 2):
        l4 = bnb.nn.Linear4bit(q[i].in_features, q[i].out_features, quant_type="nf4")
        l4.load_state_dict(q[i].state_dict())
        q[i] = l4.to("cpu")
    with pytest.raises(ValueError, match="is a bitsandbytes 4-bit layer, the adapter was trained on a full-precision"):
        sk.load_adapter(q, str(tmp_path / "a"))


def test_pickle_dtype_conversion_and_parameter_count():
    """torch.save(model) keeps the 4-bit weight a Params4bit; model.to(bf16) makes W_r dequantize
    to bf16 (and merge to bf16); 4-bit weights count as the weights they pack, as in PEFT."""
    import io

    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, quantize="nf4").eval()
    x = torch.randn(3, 72)
    with torch.no_grad():
        y = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert quant.is_params4bit(back[0].weight)
    with torch.no_grad():
        assert torch.equal(back(x), y)
    trainable, total = sk.print_trainable_parameters(m)
    assert total == 72 * 96 + 96 * 40 + 96 + 40 + trainable - 96 - 40
    db = copy.deepcopy(m).double()  # bitsandbytes dequantizes to 16/32-bit only: W_r stays fp32, cast per call
    assert db[0].weight_dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(db(x.double()).float(), y, rtol=1e-5, atol=1e-5)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    assert bf[0].weight_dtype == torch.bfloat16 and bf[0].w.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(bf(x.bfloat16()).float(), y, rtol=0.05, atol=0.05)
    with pytest.warns(UserWarning, match="dequantized merged weights"):
        sk.merge_and_unload(bf)
    assert bf[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_one_graph_without_breaks(backend, p):
    """The op goes through the linear op's custom ops (fakes, dropout's cudagraph_unsafe tag), not
    its launchers: one graph, fullgraph forward and backward, on both backends."""
    torch._dynamo.reset()
    q = quant.quantize(torch.randn(40, 96))
    args = [torch.randn(5, 96), torch.randn(3, 96), torch.rand(3), torch.randn(40, 3)]
    args = [a.to(KERNEL_DEVICE if backend == "triton" else "cpu").requires_grad_() for a in args]
    q = q.to(args[0].device)
    f = lambda x, A, S, B: sorsa_linear_4bit(x, q, A, S, B, 0.5, dropout_p=p, backend=backend)  # noqa: E731
    ex = torch._dynamo.explain(f)(*args)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    y.sum().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)


def test_torch_compile_forward_and_gradients():
    """inductor traces the per-pass dequantize (a 2-D call: bitsandbytes' CPU kernel and its fake
    must agree on the rank) and gives eager's outputs and gradients."""
    torch._dynamo.reset()
    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, quantize="nf4")
    x = torch.randn(3, 72)
    y = m(x)
    y.square().sum().backward()
    want = [p.grad.clone() for p in sk.sorsa_parameters(m)]
    m.zero_grad()
    yc = torch.compile(m)(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    for p, g in zip(sk.sorsa_parameters(m), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_and_export(tmp_path):
    m = sk.apply_sorsa(small_model(), ["0", "2"], r=4, quantize="nf4")
    eff = m[0].effective_weight()
    x = torch.randn(3, 72)
    m.eval()
    y = m(x)
    sk.export_lora(copy.deepcopy(m), str(tmp_path / "lora"))  # the rank-2r delta needs no W_r
    with pytest.warns(UserWarning, match="dequantized merged weights"):
        sk.merge_and_unload(m)
    assert type(m[0]) is nn.Linear and torch.equal(m[0].weight, eff)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_training_run_lowers_the_loss_on_the_real_model():
    """The tiny pretrained Llama with a 4-bit residual, AdamW + the regularizer (SORSARegularizer),
    30 steps on a fixed prose batch: the loss falls, and the regularizer keeps the adapters closer
    to orthonormal than the same run without it."""
    text = ("The quick brown fox jumps over the lazy dog. " * 8).encode()
    ids = torch.tensor([list(text[:128])])
    result = {}
    for gamma in (0.0, 4e-3):
        torch.manual_seed(0)
        model = tiny_llama()
        sk.apply_sorsa(model, TARGETS, r=8, alpha=8, quantize="nf4", match="peft")
        sk.mark_only_sorsa_trainable(model)
        opt = torch.optim.AdamW(sk.sorsa_parameters(model), lr=3e-3)
        reg = sk.SORSARegularizer(model, gamma=gamma, lr=opt)
        losses = []
        for _ in range(30):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            reg.step()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], losses
        with torch.no_grad():
            result[gamma] = float(sk.calc_ortho(model))
    assert result[4e-3] < 0.5 * result[0.0], result


def test_transformers_checkpoints_of_a_4bit_model(tmp_path):
    """save_pretrained: "full" keeps the packed residual (a resume is bit-exact), "merged" writes
    dequantized merged weights that the stock from_pretrained loads as the tuned model."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    model = sk.apply_sorsa(tiny_llama(), TARGETS, r=4, quantize="nf4", match="peft")
    with torch.no_grad():
        for p in sk.sorsa_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.tensor([list(b"def f(x):\n    return x")])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "full"))
    resumed = sk.apply_sorsa(tiny_llama(), TARGETS, r=4, quantize="nf4", match="peft").eval()
    missing, unexpected = resumed.load_state_dict(load_file(str(tmp_path / "full" / "model.safetensors")), strict=False)
    assert not unexpected and not [k for k in missing if "sorsa" in k or "proj" in k]
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=ids).logits, want)
    # the "full" form's weights are W_r: the stock loader stops with a message instead of loading them
    with pytest.raises(Exception, match="4-bit \\(QSORSA\\) training checkpoint"):
        transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "full"))
    model.save_pretrained(str(tmp_path / "merged"), sorsa_format="merged")
    plain = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert not any(isinstance(m, sk.SORSALinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
