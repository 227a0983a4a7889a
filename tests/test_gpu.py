"""GPU checks (run by benchmarks/gpu_check.sh): the same comparisons as the interpreter tests
with bigger shapes and the native bf16 tensor-core path. Skipped without a CUDA GPU."""
import pytest
import torch

import sorsa_kernels as sk
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_naive

from conftest import assert_tolerance

# skipped without a GPU, failed under SORSA_KERNELS_REQUIRE_GPU=1, never run under the
# interpreter: tests/conftest.py decides for every `gpu`-marked test
pytestmark = [pytest.mark.gpu]


def _run(fn, ops, dt, dev, p=0.0, seed=None):
    x = ops["x"].to(dev, dt, copy=True).requires_grad_()
    A, S, B = (ops[k].to(dev, dt, copy=True).requires_grad_() for k in "ASB")
    b = ops["b"].to(dev, dt, copy=True).requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = fn(x, ops["W"].to(dev, dt), A, S, B, b)
    y.backward(ops["dy"].to(dev, dt))
    return [y.detach().cpu()] + [t.grad.cpu() for t in (x, A, S, B, b)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,k,n,r", [(1000, 1030, 770, 16), (4096, 1024, 2752, 128), (333, 515, 260, 512), (1, 64, 64, 1)])
def test_gpu_triton_vs_float64(dtype, M, k, n, r):
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ops = dict(x=rn(M, k), W=rn(n, k) / k ** 0.5, A=rn(r, k) / k ** 0.5, S=rn(r).abs() + 0.5, B=rn(n, r) / n ** 0.5,
               b=rn(n), dy=rn(M, n))
    fused = lambda x, W, A, S, B, b: sorsa_linear(x, W, A, S, B, 0.5, b, backend="triton")  # noqa: E731
    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(x, W, A, S, B, 0.5, b)  # noqa: E731
    out = _run(fused, ops, dtype, "cuda")
    low = _run(naive, ops, dtype, "cuda")  # plain torch on the GPU, same precision
    ref = _run(naive, ops, torch.float64, "cpu")
    for name, a, l, r64 in zip(["y", "dx", "dA", "dS", "dB", "dbias"], out, low, ref):
        assert_tolerance(a, l, r64, name)


def test_gpu_auto_uses_triton_and_dropout_is_replayable():
    m = sk.SORSALinear(512, 384, r=32, dropout=0.1, dtype=torch.bfloat16, device="cuda")
    m.sorsa_init()
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(3)
    y1 = m(x)
    torch.manual_seed(3)
    y2 = m(x)
    assert torch.equal(y1, y2)
    y1.float().sum().backward()
    assert torch.isfinite(m.sorsa_A.grad).all()
    from sorsa_kernels import _backend
    assert _backend.resolve("sorsa_linear", "auto", x.device) == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_regularizer_triton_vs_torch(dtype):
    torch.manual_seed(0)
    m = torch.nn.ModuleList()
    for k, n, r in [(1024, 1024, 128)] * 3 + [(1024, 2752, 128), (2752, 1024, 128), (333, 515, 17)]:
        layer = sk.SORSALinear(k, n, r=r, device="cuda", dtype=dtype)
        with torch.no_grad():
            layer.sorsa_A.copy_(torch.linalg.qr(torch.randn(k, r, device="cuda"))[0].T + 0.01 * torch.randn(r, k, device="cuda"))
            layer.sorsa_B.copy_(torch.linalg.qr(torch.randn(n, r, device="cuda"))[0] + 0.01 * torch.randn(n, r, device="cuda"))
        m.append(layer)
    import copy
    m2 = copy.deepcopy(m)
    v = sk.orthonormal_grad_(m, 0.1, 1e-3, backend="triton")
    v2 = sk.orthonormal_grad_(m2, 0.1, 1e-3, backend="torch")
    assert float(v) == pytest.approx(float(v2), rel=1e-3)
    for p, q in zip(m.parameters(), m2.parameters()):
        if q.grad is not None:
            rel = (p.grad.float() - q.grad.float()).abs().max() / q.grad.float().abs().max()
            assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_gpu_rsvd_ext_matches_cpu_build_and_is_accurate():
    from sorsa_kernels import _backend
    if not _backend.ext_status()[1]:
        pytest.fail("the extension was not built with CUDA: gpu_check.sh builds it with SORSA_KERNELS_CUDA=1")
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(8, 1024, 768, generator=g, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(8, 768, 768, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, 769, dtype=torch.float64) ** -0.8
    W = ((U0 * s) @ V0.mT + 0.02 * torch.randn(8, 1024, 768, generator=g, dtype=torch.float64) / 32).float()
    # like with like: the CUDA default iterates in bf16, so the equality check forces fp32 iterations
    Uc, Sc, Vc = sk.rsvd(W, 64, seed=3, backend="ext")
    Ug, Sg, Vg = sk.rsvd(W.cuda(), 64, seed=3, backend="ext", iter_dtype=torch.float32)
    torch.testing.assert_close(Sg.cpu(), Sc, rtol=1e-4, atol=1e-6)  # same Philox sketch on both
    S64 = torch.linalg.svdvals(W.double())[:, :64]
    Ud, Sd, Vd = sk.rsvd(W.cuda(), 64, seed=3)  # the default (bf16 iterations) keeps the accuracy
    assert ((Sd.cpu().double() - S64).abs() / S64).max() < 0.01
    eye = torch.eye(64, device="cuda")
    for U_, V_ in ((Ug, Vg), (Ud, Vd)):
        assert (U_.mT @ U_ - eye).abs().max() < 1e-4 and (V_ @ V_.mT - eye).abs().max() < 1e-4
    # extreme scales on the CUDA path
    _, Sx, _ = sk.rsvd(W.cuda() * 2.0 ** 100, 64, seed=3, iter_dtype=torch.float32)
    torch.testing.assert_close(Sx / 2.0 ** 100, Sg, rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llm", "flat"])
def test_gpu_rsvd_defaults_r128_and_tf32_guard(family):
    """Accuracy at r = 128 with the GPU's defaults, and with TF32 on (HF's
    tf32=True) init still reproduces fp32 weights exactly and restores the setting."""
    from sorsa_kernels.synthetic import exact_sigmas, synthetic_weights
    W = synthetic_weights(4, 4096, 4096, device="cuda", family=family)
    _, S, _ = sk.rsvd(W, 128, seed=0)
    ex = exact_sigmas(W, 128)
    assert ((S.double() - ex).abs() / ex).max().item() <= 0.01
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        lin = torch.nn.Linear(1024, 1024, device="cuda")
        layer = sk.SORSALinear.from_linear(lin, r=64, init="rsvd_always")
        assert torch.backends.cuda.matmul.allow_tf32 is True  # the user's setting is back
        torch.backends.cuda.matmul.allow_tf32 = False  # check in full fp32
        rec = layer.weight + layer.scale * (layer.sorsa_B * layer.sorsa_S) @ layer.sorsa_A
        torch.testing.assert_close(rec, lin.weight, atol=2e-6, rtol=1e-5)
        assert (layer.sorsa_A @ layer.sorsa_A.T - torch.eye(64, device="cuda")).abs().max() < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _probe_mask(M, k, p, seed):
    """The keep-mask the fused op draws for an (M, k) input under torch.manual_seed(seed): with
    W = 0, A = B = I and S = 1 the output is drop(x) itself (fp32, so 1/(1-p) is exact enough)."""
    eye = torch.eye(k, device="cuda")
    torch.manual_seed(seed)
    y = sorsa_linear(torch.ones(M, k, device="cuda"), torch.zeros(k, k, device="cuda"), eye,
                     torch.ones(k, device="cuda"), eye, 1.0, dropout_p=p, backend="triton")
    kept, dropped = (y - 1 / (1 - p)).abs() < 1e-5, y.abs() < 1e-6
    assert bool((kept | dropped).all()), "adapter branch must be 0 or x/(1-p)"
    return kept.cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,k,n,r", [(1000, 1030, 770, 16), (4096, 1024, 2752, 128)])
def test_gpu_dropout_005_gradients_vs_float64_mask_replay(dtype, M, k, n, r):
    p, seed = 0.05, 1234
    mask = _probe_mask(M, k, p, seed)
    assert abs((~mask).double().mean().item() - p) < 0.01
    g = torch.Generator().manual_seed(1)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ops = dict(x=rn(M, k), W=rn(n, k) / k ** 0.5, A=rn(r, k) / k ** 0.5, S=rn(r).abs() + 0.5, B=rn(n, r) / n ** 0.5,
               b=rn(n), dy=rn(M, n))

    def fused(x, W, A, S, B, b):
        torch.manual_seed(seed)
        return sorsa_linear(x, W, A, S, B, 0.5, b, dropout_p=p, backend="triton")

    def naive(x, W, A, S, B, b):
        return sorsa_linear_naive(x, W, A, S, B, 0.5, b, mask=mask.to(x.device), dropout_p=p)
    out = _run(fused, ops, dtype, "cuda")
    low = _run(naive, ops, dtype, "cuda")
    ref = _run(naive, ops, torch.float64, "cpu")
    for name, a, l, r64 in zip(["y", "dx", "dA", "dS", "dB", "dbias"], out, low, ref):
        assert_tolerance(a, l, r64, name)
