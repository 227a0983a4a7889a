"""Triton backend of sk.ops.sorsa_linear vs the float64 naive reference (interpreter on CPU,
native on GPU), forward and every gradient, under the tolerance rule."""
import pytest
import torch

from sorsa_kernels.ops.linear import launch as linear_launch
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_naive

from conftest import DTYPES, KERNEL_DEVICE, assert_tolerance, needs_triton

pytestmark = needs_triton
DEV = KERNEL_DEVICE


def operands(M_shape, k, n, r, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=rn(*M_shape, k), W=rn(n, k) / k ** 0.5, A=rn(r, k) / k ** 0.5, S=rn(r).abs() + 0.5,
                B=rn(n, r) / n ** 0.5, b=rn(n) if bias else None, dy=rn(*M_shape, n))


def run(fn, o, dt, device="cpu", adapter_dt=None):
    """fn's output and grads (x, A, S, B, bias) with operands cast to dt (adapters to adapter_dt)."""
    ad = adapter_dt or dt
    x = o["x"].to(device, dt, copy=True).requires_grad_()
    A, S, B = (o[k].to(device, ad, copy=True).requires_grad_() for k in "ASB")
    b = None if o["b"] is None else o["b"].to(device, dt, copy=True).requires_grad_()
    y = fn(x, o["W"].to(device, dt), A, S, B, b)
    y.backward(o["dy"].to(device, dt))
    ts = [x, A, S, B] + ([b] if b is not None else [])
    return [y.detach().cpu()] + [t.grad.cpu() for t in ts]


NAMES = ["y", "dx", "dA", "dS", "dB", "dbias"]
SHAPES = [((1,), 16, 16, 1), ((37,), 45, 29, 5), ((2, 13), 33, 70, 17), ((20,), 40, 48, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M_shape,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_triton_vs_float64(dtype, M_shape, k, n, r, bias):
    o = operands(M_shape, k, n, r, bias)
    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(x, W, A, S, B, 0.7, b)  # noqa: E731
    fused = lambda x, W, A, S, B, b: sorsa_linear(x, W, A, S, B, 0.7, b, backend="triton")  # noqa: E731
    out = run(fused, o, dtype, DEV)
    ref = run(naive, o, torch.float64)
    low = run(naive, o, dtype)
    assert out[0].dtype == dtype
    for name, a, l, r64 in zip(NAMES, out, low, ref):
        assert_tolerance(a, l, r64, name)


def test_fp32_adapters_over_bf16_base():
    o = operands((9,), 24, 20, 6, True)
    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(x, W, A.to(x.dtype), S.to(x.dtype), B.to(x.dtype), 1.0, b)  # noqa: E731
    fused = lambda x, W, A, S, B, b: sorsa_linear(x, W, A, S, B, 1.0, b, backend="triton")  # noqa: E731
    out = run(fused, o, torch.bfloat16, DEV, adapter_dt=torch.float32)
    low = run(naive, o, torch.bfloat16, adapter_dt=torch.float32)
    ref = run(naive, o, torch.float64)
    assert [t.dtype for t in out[2:5]] == [torch.float32] * 3
    for name, a, l, r64 in zip(NAMES, out, low, ref):
        assert_tolerance(a, l, r64, name, floor=2e-2)


def test_noncontiguous_x_and_frozen_weight():
    o = operands((11,), 18, 14, 3, False)
    xt = o["x"].t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    W = o["W"].float().to(DEV)
    x = xt.float().to(DEV).requires_grad_()
    y = sorsa_linear(x, W, o["A"].float().to(DEV), o["S"].float().to(DEV), o["B"].float().to(DEV), 1.0, backend="triton")
    y.backward(o["dy"].float().to(DEV))
    assert W.grad is None
    ref_x = o["x"].clone().requires_grad_()
    y64 = sorsa_linear_naive(ref_x, o["W"], o["A"], o["S"], o["B"], 1.0)
    y64.backward(o["dy"])
    torch.testing.assert_close(y.double().cpu(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), ref_x.grad, atol=1e-5, rtol=1e-5)


def probe_mask(M, k, p, seed, dtype=torch.float32):
    """The keep-mask the op draws for an (M, k) input under torch.manual_seed(seed): with
    A = B = I and S = 1 the adapter branch is drop(x) itself."""
    I = torch.eye(k, dtype=dtype, device=DEV)
    x = torch.ones(M, k, dtype=dtype, device=DEV)
    torch.manual_seed(seed)
    y = sorsa_linear(x, torch.zeros(k, k, dtype=dtype, device=DEV), I, torch.ones(k, dtype=dtype, device=DEV), I,
                     1.0, dropout_p=p, backend="triton")
    kept, dropped = (y - 1 / (1 - p)).abs() < 1e-5, y.abs() < 1e-6
    assert bool((kept | dropped).all()), "adapter branch must be 0 or x/(1-p)"
    return kept.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_same_in_forward_and_backward(dtype):
    M, k, n, r, p = 19, 24, 13, 4, 0.3
    mask = probe_mask(M, k, p, seed=123)
    o = operands((M,), k, n, r, True)

    def fused(x, W, A, S, B, b):
        torch.manual_seed(123)
        return sorsa_linear(x, W, A, S, B, 0.5, b, dropout_p=p, backend="triton")

    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(x, W, A, S, B, 0.5, b, mask=mask.to(x.device), dropout_p=p)  # noqa: E731
    out = run(fused, o, dtype, DEV)
    ref = run(naive, o, torch.float64)
    low = run(naive, o, dtype)
    for name, a, l, r64 in zip(NAMES, out, low, ref):
        assert_tolerance(a, l, r64, name)


def test_dropout_statistics_and_p0_and_eval():
    mask = probe_mask(64, 48, 0.25, seed=7)
    assert abs((~mask).double().mean().item() - 0.25) < 0.03
    # rows and columns are not correlated copies of each other
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    assert not torch.equal(mask, probe_mask(64, 48, 0.25, seed=8))
    o = operands((10,), 16, 12, 4, True)
    args = lambda: [o[k].float().to(DEV) for k in ("x", "W", "A", "S", "B")]  # noqa: E731
    y0 = sorsa_linear(*args(), 1.0, o["b"].float().to(DEV), dropout_p=0.0, backend="triton")
    y_eval = sorsa_linear(*args(), 1.0, o["b"].float().to(DEV), dropout_p=0.6, training=False, backend="triton")
    assert torch.equal(y0, y_eval)


def test_outputs_fully_written(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an unwritten element would leak."""
    real_empty = torch.empty

    def poisoned(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(linear_launch.torch, "empty", poisoned)
    o = operands((23,), 37, 41, 7, True)
    fused = lambda x, W, A, S, B, b: sorsa_linear(x, W, A, S, B, 1.0, b, backend="triton")  # noqa: E731
    out = run(fused, o, torch.float32, DEV)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    # and a NaN in the input does propagate (NaN never passes silently)
    o["x"][3, 5] = float("nan")
    out = run(fused, o, torch.float32, DEV)
    assert torch.isnan(out[0][3]).all()


def test_triton_bad_input():
    x = torch.randn(4, 8)
    W, A, S, B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(2), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        sorsa_linear(x, W, A, S, B, dropout_p=1.0, backend="triton")
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        sorsa_linear(x.half(), W, A.half(), S.half(), B.half(), backend="triton")
    with pytest.raises(ValueError, match=r"A must be 2-D \(r, in_features\) with r >= 1"):
        sorsa_linear(x, W, torch.randn(0, 8), torch.randn(0), torch.randn(6, 0), backend="triton")
