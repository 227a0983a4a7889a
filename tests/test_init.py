"""Model-wide SVD init and its hygiene: one batched call per
shape group, exact-vs-randomized choice by cost, chunking by free memory, adapters that own their
storage, TF32 off inside, clear errors for a non-float weight_dtype and the meta device."""
import io
import sys

import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk
from sorsa_kernels import init as init_mod

D, F = 64, 172  # a 7B model's 4096 / 11008, scaled down by 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(D, F, bias=False), nn.Linear(D, F, bias=False)
        self.down_proj = nn.Linear(F, D, bias=False)

    def forward(self, x):
        x = x + self.o_proj(self.q_proj(x) * self.k_proj(x).sigmoid() + self.v_proj(x))
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[Block() for _ in range(layers)])


def count_calls(monkeypatch):
    calls = []
    orig = init_mod.svd_factors

    def spy(W, r, method="svd", **kw):
        calls.append((tuple(W.shape), method))
        return orig(W, r, method, **kw)
    monkeypatch.setattr(init_mod, "svd_factors", spy)
    return calls


@pytest.mark.parametrize("init", ["rsvd", "rsvd_always", "svd"])
def test_one_call_per_shape_group_on_a_7b_shaped_model(monkeypatch, init):
    """28 matrices of 2 shape groups (D×D; F×D and D×F share one, transposed) → 2 batched calls."""
    model = small_llama()
    x = torch.randn(3, D)
    y0 = model(x)
    calls = count_calls(monkeypatch)
    sk.apply_sorsa(model, TARGETS, r=16, init=init)
    assert sorted(calls) == sorted([((16, D, D), calls[0][1]), ((12, F, D), calls[0][1])]), calls
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)


def test_memory_budget_chunks_a_group_and_default_fits_it(monkeypatch):
    calls = count_calls(monkeypatch)
    per = init_mod.bytes_per_matrix(F, D, 8, torch.float32)
    monkeypatch.setattr(init_mod, "memory_budget", lambda device: 5 * per)  # 5 matrices per call
    sk.apply_sorsa(small_llama(2), ["gate_proj", "up_proj", "down_proj"], r=8)
    assert [c[0][0] for c in calls] == [5, 1]
    assert init_mod.memory_budget.__name__ == "<lambda>"
    monkeypatch.undo()
    budget = init_mod.memory_budget(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0.1 * avail < budget <= 0.5 * avail  # a fraction of MemAvailable


def test_cost_choice_exact_for_small_rsvd_for_large():
    """Never slower than exact by the estimate: small matrices (or r near the size) → exact SVD."""
    assert init_mod.choose_method(384, 384, 64) == "svd"  # MiniLM: exact measured 2.3× faster
    assert init_mod.choose_method(256, 256, 16) == "svd"  # CI quick bench: exact 15.7 ms vs rsvd 19.9 ms
    assert init_mod.choose_method(1024, 1024, 64) == "rsvd"  # measured 4× faster
    assert init_mod.choose_method(1536, 384, 64) == "svd"
    assert init_mod.choose_method(2048, 2048, 64) == "rsvd"
    assert init_mod.choose_method(11008, 4096, 128) == "rsvd"
    assert init_mod.choose_method(4096, 4096, 128) == "rsvd"
    assert init_mod.choose_method(4096, 4096, 2048) == "svd"
    assert init_mod.choose_method(384, 384, 64, "rsvd_always") == "rsvd"
    assert init_mod.choose_method(4096, 4096, 64, "svd") == "svd"


def test_progress_bar_counts_matrices_and_names_group_and_method(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    buf = io.StringIO()
    orig = tqdm_auto.tqdm
    monkeypatch.setattr(tqdm_auto, "tqdm", lambda *a, **k: orig(*a, file=buf, mininterval=0, **k))
    sk.apply_sorsa(small_llama(1), TARGETS, r=8, progress=True)
    out = buf.getvalue()
    assert "7/7" in out and "matrix" in out
    assert "64x64 r=8 ×4 svd" in out and "172x64 r=8 ×3 svd" in out


def test_adapters_own_their_storage():
    """no parameter is a view of one batched tensor; a layer's state_dict holds
    only its own bytes."""
    model = small_llama(2)
    sk.apply_sorsa(model, TARGETS, r=8, init="rsvd_always")
    for layer in sk.sorsa_layers(model):
        for p in (layer.sorsa_A, layer.sorsa_S, layer.sorsa_B, layer.weight):
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    layer = model[0].up_proj
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    own = sum(t.numel() * t.element_size() for t in layer.state_dict().values() if torch.is_tensor(t))
    assert buf.getbuffer().nbytes < own + 64 * 1024


def test_init_runs_without_tf32_and_restores_the_setting(monkeypatch):
    """inside init (exact or randomized) TF32 is off; the user's setting is back after."""
    seen = []
    orig_svd = torch.linalg.svd

    def spy(*a, **k):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision()))
        return orig_svd(*a, **k)
    monkeypatch.setattr(torch.linalg, "svd", spy)
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for method in ("svd", "rsvd_always"):
            sk.apply_sorsa(small_llama(1), ["q_proj"], r=4, init=method)
        assert seen and all(s == (False, False, "highest") for s in seen)
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[2]


def test_init_under_the_new_fp32_precision_api():
    """torch ≥ 2.9's per-backend ``fp32_precision`` (set by the caller) makes the legacy TF32 flags
    unreadable; init then uses the new API: IEEE fp32 inside, the caller's values restored."""
    import subprocess
    import sys
    code = """
import torch, torch.nn as nn
import sorsa_kernels as sk
from sorsa_kernels import _precision
torch.backends.cuda.matmul.fp32_precision = "tf32"
torch.backends.cudnn.conv.fp32_precision = "tf32"
seen = []
orig = torch.linalg.svd
def spy(*a, **k):
    seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision))
    return orig(*a, **k)
torch.linalg.svd = spy
m = sk.apply_sorsa(nn.Sequential(nn.Linear(16, 12)), ["0"], r=2, init="svd")
assert seen and all(s == ("ieee", "ieee") for s in seen), seen
assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_non_float_weight_dtype_is_rejected_before_any_change():
    """sorsa_init(weight_dtype=torch.int32) → TypeError, layer untouched."""
    lin = nn.Linear(12, 10)
    layer = sk.SORSALinear.from_linear(lin, r=3, init="svd")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (torch.int32, torch.bool, "float32"):
        with pytest.raises(TypeError, match="weight_dtype must be None or a floating dtype"):
            layer.sorsa_init(weight_dtype=bad)
    with pytest.raises(TypeError, match="adapter_dtype must be None or a floating dtype"):
        sk.init_layers([layer], adapter_dtype=torch.int64)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_init_on_the_meta_device_says_to_pass_init_none():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="meta device.*init=None"):
        sk.init_layers([sk.SORSALinear.from_linear(net[0], r=2, init=None)])
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 8))
    sk.apply_sorsa(net, ["0"], r=2, init=None)  # what the message asks for works
    assert net[0].sorsa_A.is_meta


def test_rsvd_kwargs_with_exact_choice_and_bad_chunk_bytes():
    model = small_llama(1)
    x = torch.randn(2, D)
    y0 = model(x)
    sk.apply_sorsa(model, TARGETS, r=4, oversample=8, niter=2)  # exact chosen here: kwargs unused, no error
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_bytes must be None or an int >= 1"):
        sk.init_layers(list(sk.sorsa_layers(model)), chunk_bytes=0)
    with pytest.raises(ValueError, match="method must be one of"):
        sk.init_layers(list(sk.sorsa_layers(model)), method="qr")


@pytest.mark.parametrize("shape,r", [((37, 23), 1), ((23, 37), 5), ((3, 64, 48), 48), ((2, 40, 97), 7)])
def test_svd_bottom_equals_the_last_r_of_a_float64_svd(shape, r):
    """The r minor triplets (KaSA, MiLoRA) from the float64 Gram matrix: σ and the dropped part
    U·diag(S)·Vh as the float64 SVD's last r, orthonormal vectors, tall, wide, batched, r = 1 and
    r = min(m, n); float32 in, float32 out."""
    from sorsa_kernels.init import svd_bottom

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    U, S, Vh = svd_bottom(W, r)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.shape == (*shape[:-1], r) and S.shape == (*shape[:-2], r) and Vh.shape == (*shape[:-2], r, shape[-1])
    U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), S0[..., -r:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(((U * S[..., None, :]) @ Vh).double(),
                               (U0[..., -r:] * S0[..., None, -r:]) @ Vh0[..., -r:, :], rtol=0, atol=1e-5)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(U.double().mT @ U.double(), eye.expand(*shape[:-2], r, r), rtol=0, atol=1e-5)
    torch.testing.assert_close(Vh.double() @ Vh.double().mT, eye.expand(*shape[:-2], r, r), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, min\(m, n\)\]"):
        svd_bottom(W, min(shape[-2:]) + 1)
    with pytest.raises(ValueError, match="weight"):
        svd_bottom(W.clone().fill_(float("nan")), r)


def test_init_report_per_shape_group():
    """report=[] gets one entry per shape group: method, count, chunks, rsvd's iterations (and its
    error estimate with tol), time."""
    torch.manual_seed(0)
    layers = [sk.SORSALinear.from_linear(nn.Linear(48, 40), 4, init=None) for _ in range(3)]
    layers += [sk.SORSALinear.from_linear(nn.Linear(24, 64), 2, init=None) for _ in range(2)]
    report = []
    init_mod.init_layers(layers, "rsvd_always", report=report, chunk_bytes=1, seed=0)
    assert [(e["shape"], e["r"], e["count"], e["method"], e["chunks"]) for e in report] == [
        ((48, 40), 4, 3, "rsvd", 3), ((64, 24), 2, 2, "rsvd", 2)]
    # default: tol = 1 %, one estimate per chunk (these small matrices fill the basis: exact)
    assert all(len(e["iterations"]) == e["chunks"] and e["seconds"] >= 0 and len(e["error_estimate"]) == e["chunks"]
               and all(x <= 0.01 for x in e["error_estimate"]) for e in report)
    report.clear()
    init_mod.init_layers(layers, "rsvd_always", report=report, chunk_bytes=1, seed=0, niter=1)
    # niter alone: at most that many (fewer once the basis fills the smaller dimension), no estimate
    assert all(len(e["iterations"]) == e["chunks"] and all(i <= 1 for i in e["iterations"])
               and e["error_estimate"] == [] for e in report)
    assert report[0]["iterations"] == [1] * 3  # 48×40, blocks of 32: one iteration to fill the 40 columns
    report.clear()
    init_mod.init_layers(layers[:1], "rsvd_always", report=report, tol=0.05, seed=0)
    assert report[0]["method"] == "rsvd" and len(report[0]["error_estimate"]) == 1
    report.clear()
    init_mod.init_layers(layers[:1], "svd", report=report)
    assert report[0]["method"] == "svd" and report[0]["iterations"] == []
    with pytest.raises(TypeError, match="report must be None or a list"):
        init_mod.init_layers(layers[:1], report={})
    with pytest.raises(TypeError, match="pass report=\\[\\] instead"):
        init_mod.init_layers(layers[:1], info={})


def test_svd_bottom_rank_deficient_and_tiny_singular_values():
    """Zero and tiny σ (below √eps·σ_max, where the Gram's eigenvectors mix): U and Vh stay
    orthonormal, S descending and within ~1.5e-8·σ_max of the truth, tall and wide."""
    from sorsa_kernels.init import svd_bottom

    g = torch.Generator().manual_seed(0)
    for m, n in ((60, 40), (40, 60)):
        k = min(m, n)
        U0 = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
        V0 = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
        s = torch.logspace(0, -9, k, dtype=torch.float64)
        s[-5:] = 0  # rank-deficient
        W = ((U0 * s) @ V0.T).float()
        U, S, Vh = svd_bottom(W, 10)
        eye = torch.eye(10, dtype=torch.float64)
        torch.testing.assert_close(U.double().T @ U.double(), eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(Vh.double() @ Vh.double().T, eye, rtol=0, atol=1e-5)
        assert torch.all(S[:-1] >= S[1:])
        exact = torch.linalg.svdvals(W.double())[-10:]
        assert (S.double() - exact).abs().max() < 1e-7


def test_init_layers_takes_a_generator_with_progress_and_apply_sorsa_reports():
    """sk.sorsa_layers(model) is a generator: init_layers counts it for the progress bar; apply_sorsa
    passes report=[] through (info= is refused with a pointer to it)."""
    model = small_llama(1)
    sk.apply_sorsa(model, ["q_proj", "v_proj"], r=4, init=None)
    init_mod.init_layers(sk.sorsa_layers(model), "rsvd_always", progress=True, seed=0)
    assert all(float(m.sorsa_S.detach().abs().sum()) > 0 for m in sk.sorsa_layers(model))
    report = []
    sk.apply_sorsa(small_llama(1), ["q_proj", "v_proj"], r=4, report=report)
    assert report and all("method" in e and "iterations" in e for e in report)
    with pytest.raises(TypeError, match="pass report=\\[\\] instead"):
        sk.apply_sorsa(small_llama(1), ["q_proj"], r=4, info={})


def test_init_chunks_capped_by_weight_elements(monkeypatch):
    """Whatever the memory budget, a chunk holds at most CHUNK_ELEMENTS weight elements, so a
    large model's shape groups are several chunks that distributed init can share over ranks."""
    torch.manual_seed(0)
    layers = [sk.SORSALinear.from_linear(nn.Linear(48, 40), 4, init=None) for _ in range(5)]
    monkeypatch.setattr(init_mod, "CHUNK_ELEMENTS", 2 * 48 * 40)
    report = []
    init_mod.init_layers(layers, "rsvd_always", report=report, seed=0)
    assert [(e["count"], e["chunks"]) for e in report] == [(5, 3)]
    monkeypatch.setattr(init_mod, "CHUNK_ELEMENTS", 1)  # below one matrix: one per chunk
    report.clear()
    init_mod.init_layers(layers, "rsvd_always", report=report, seed=0)
    assert [(e["count"], e["chunks"]) for e in report] == [(5, 5)]
