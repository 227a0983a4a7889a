"""sk.ops.sorsa_linear (torch backend) vs the float64 naive reference."""
import pytest
import torch

import sorsa_kernels as sk
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_naive

from conftest import DTYPES, assert_tolerance


def make(M_shape, k, n, r, dtype, bias, seed=0, adapter_dtype=None):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rn(*M_shape, k)
    W = rn(n, k) / k ** 0.5
    A, S, B = rn(r, k) / k ** 0.5, rn(r).abs() + 0.5, rn(n, r) / n ** 0.5
    b = rn(n) if bias else None
    ad = adapter_dtype or dtype
    return x, W, A, S, B, b, dtype, ad


def grads_of(fn, x, W, A, S, B, b, dy):
    ts = [t.detach().clone().requires_grad_() for t in (x, A, S, B)]
    bb = None if b is None else b.detach().clone().requires_grad_()
    y = fn(ts[0], W, *ts[1:], bb)
    y.backward(dy)
    return y.detach(), [t.grad for t in ts] + ([bb.grad] if bb is not None else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M_shape,k,n,r", [((7,), 19, 13, 1), ((2, 5), 33, 21, 13), ((1,), 16, 24, 16), ((9,), 12, 40, 12)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eager", [True, False], ids=["eager-fp32-cpu", "custom-op"])
def test_forward_backward_vs_float64(dtype, M_shape, k, n, r, bias, eager, monkeypatch):
    monkeypatch.setattr(sk.ops.linear.op, "_EAGER", eager)
    x, W, A, S, B, b, dt, _ = make(M_shape, k, n, r, dtype, bias)
    dy = torch.randn(*M_shape, n, dtype=torch.float64)
    low = lambda t: None if t is None else t.to(dt)  # noqa: E731
    ours = lambda x, W, A, S, B, b: sorsa_linear(x, W, A, S, B, 0.75, b, backend="torch")  # noqa: E731
    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(x, W, A, S, B, 0.75, b)  # noqa: E731
    y, g = grads_of(ours, low(x), low(W), low(A), low(S), low(B), low(b), low(dy))
    y64, g64 = grads_of(naive, x, W, A, S, B, b, dy)
    ylp, glp = grads_of(naive, low(x), low(W), low(A), low(S), low(B), low(b), low(dy))
    assert y.dtype == dt
    assert_tolerance(y, ylp, y64, "y")
    for name, a, l, r64 in zip(["dx", "dA", "dS", "dB", "dbias"], g, glp, g64):
        assert a.dtype == dt
        assert_tolerance(a, l, r64, name)


def test_fp32_adapters_with_bf16_base():
    x, W, A, S, B, b, _, _ = make((6,), 20, 10, 4, torch.bfloat16, True)
    Af, Sf, Bf = (t.float().requires_grad_() for t in (A, S, B))
    y = sorsa_linear(x.bfloat16(), W.bfloat16(), Af, Sf, Bf, 1.0, b.bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert Af.grad.dtype == torch.float32 and Bf.grad.dtype == torch.float32
    y64 = sorsa_linear_naive(x.bfloat16().double(), W.bfloat16().double(), A, S, B, 1.0, b.bfloat16().double())
    assert (y.double() - y64).abs().max() < 0.05 * y64.abs().max()


def test_weight_gets_no_grad_and_noncontiguous_x():
    x, W, A, S, B, b, _, _ = make((8,), 16, 12, 3, torch.float32, False)
    xt = torch.randn(16, 8, dtype=torch.float64).t()  # non-contiguous (8, 16)
    assert not xt.is_contiguous()
    Wp = W.float()
    y = sorsa_linear(xt.float(), Wp, A.float().requires_grad_(), S.float(), B.float(), 1.0)
    y.sum().backward()
    assert Wp.grad is None
    torch.testing.assert_close(y.double(), sorsa_linear_naive(xt, W, A, S, B, 1.0), atol=1e-4, rtol=1e-4)


def test_dropout_train_and_eval():
    x, W, A, S, B, _, _, _ = make((64,), 32, 16, 8, torch.float64, False)
    torch.manual_seed(0)
    y_eval = sorsa_linear(x, W, A, S, B, 1.0, dropout_p=0.5, training=False)
    torch.testing.assert_close(y_eval, sorsa_linear_naive(x, W, A, S, B, 1.0), rtol=0, atol=1e-12)
    y_p0 = sorsa_linear(x, W, A, S, B, 1.0, dropout_p=0.0, training=True)
    assert torch.equal(y_p0, sorsa_linear(x, W, A, S, B, 1.0, training=False))
    y_tr = sorsa_linear(x, W, A, S, B, 1.0, dropout_p=0.5, training=True)
    assert not torch.allclose(y_tr, y_eval)
    # With A = B = I and S = 1 the adapter branch is drop(x) itself: each element is either
    # 0 or x / (1 - p), the base path is untouched, and about p of them are dropped.
    k = 32
    x = torch.randn(256, k, dtype=torch.float64)
    I = torch.eye(k, dtype=torch.float64)
    W = torch.randn(k, k, dtype=torch.float64)
    branch = sorsa_linear(x, W, I, torch.ones(k, dtype=torch.float64), I, 1.0, dropout_p=0.25) - x @ W.t()
    kept = (branch - x / 0.75).abs() < 1e-9
    dropped = branch.abs() < 1e-9
    assert bool((kept | dropped).all())
    assert abs(dropped.double().mean().item() - 0.25) < 0.03


def test_autocast_bf16_like_linear():
    x, W, A, S, B, b, _, _ = make((5,), 16, 8, 4, torch.float32, True)
    x, W, A, S, B, b = (t.float() for t in (x, W, A, S, B, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sorsa_linear(x, W, A, S, B, 1.0, b)
        ylin = torch.nn.functional.linear(x, W, b)
    assert y.dtype == ylin.dtype == torch.bfloat16


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_cpu_path_equals_the_custom_op(p, monkeypatch):
    """fp32 CPU calls run plain autograd ops (no per-call custom-op cost); they must give exactly
    the op's output and gradients: dx, dW (W unfrozen), dA, dS, dB, dbias, the same dropout mask."""
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(2, 7, 19, generator=g), torch.randn(13, 19, generator=g)
    A, S, B, b = torch.randn(5, 19, generator=g), torch.rand(5, generator=g), torch.randn(13, 5, generator=g), \
        torch.randn(13, generator=g)
    dy = torch.randn(2, 7, 13, generator=g)

    def run(eager):
        monkeypatch.setattr(sk.ops.linear.op, "_EAGER", eager)
        ts = [t.clone().requires_grad_() for t in (x, W, A, S, B, b)]
        torch.manual_seed(11)  # the dropout seed is drawn from the global generator
        y = sorsa_linear(ts[0], ts[1], ts[2], ts[3], ts[4], 0.7, ts[5], dropout_p=p, backend="torch")
        y.backward(dy)
        return [y.detach()] + [t.grad for t in ts]
    for name, a, c in zip(["y", "dx", "dW", "dA", "dS", "dB", "dbias"], run(True), run(False)):
        assert a.dtype == c.dtype, name
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)
