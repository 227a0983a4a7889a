"""calc_ortho / orthonormal_grad_ vs sorsa 1.0.1's calc_ortho and its autograd."""
import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk

from conftest import HAS_TRITON, KERNEL_DEVICE, assert_tolerance

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def adapters_model(shapes, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    m = nn.ModuleList()
    for (k, n, r) in shapes:
        l = sk.SORSALinear(k, n, r=r, dtype=dtype, device=device)
        with torch.no_grad():  # perturbed orthonormal adapters: a non-trivial regularizer
            l.sorsa_A.copy_((torch.linalg.qr(torch.randn(k, r))[0].T + 0.05 * torch.randn(r, k)).to(device))
            l.sorsa_B.copy_((torch.linalg.qr(torch.randn(n, r))[0] + 0.05 * torch.randn(n, r)).to(device))
            l.sorsa_S.copy_(torch.rand(r).to(device))
        m.append(l)
    return m


SHAPES = [[(16, 12, 4)], [(16, 12, 4), (9, 30, 7)],
          [(16, 12, 4), (16, 12, 4), (9, 30, 7), (33, 5, 1), (8, 8, 8), (70, 40, 37)]]


@pytest.mark.parametrize("shapes", SHAPES)
def test_value_equals_reference(ref, shapes):
    m = adapters_model(shapes)
    torch.testing.assert_close(sk.calc_ortho(m), ref.calc_ortho(m), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("squared", [False, True])
def test_grad_equals_autograd_of_reference(ref, shapes, squared, backend):
    m = adapters_model(shapes)
    gamma, lr = 0.3, 2e-3
    if squared:
        vals = [torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0]) if "sorsa_A" in n else p.T @ p - torch.eye(p.shape[1])) ** 2
                for n, p in m.named_parameters() if "sorsa_A" in n or "sorsa_B" in n]
        reg = torch.stack(vals).mean()
    else:
        reg = ref.calc_ortho(m)
    (gamma / lr * reg).backward()
    expect = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    if backend == "triton":
        m = m.to(KERNEL_DEVICE)
    val = sk.orthonormal_grad_(m, gamma, lr, squared=squared, backend=backend)
    assert val == pytest.approx(reg.item(), rel=1e-6)
    for n, p in m.named_parameters():
        if n in expect and ("sorsa_A" in n or "sorsa_B" in n):
            tol = 1e-6 if backend == "torch" else 1e-5  # the torch path is held to 1e-6, the fused one to 1e-5
            torch.testing.assert_close(p.grad.cpu(), expect[n], rtol=tol, atol=tol * expect[n].abs().max().item(), msg=n)
        elif "sorsa_S" in n:
            assert p.grad is None


def test_accumulates_onto_existing_grads_and_skips_frozen(backend):
    m = adapters_model(SHAPES[1])
    base = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        p.grad = base[n].clone()
    m[1].sorsa_B.requires_grad_(False)
    m[1].sorsa_B.grad = None
    ref_m = adapters_model(SHAPES[1])
    sk.orthonormal_grad_(ref_m, 1.0, 1.0, backend="torch")
    sk.orthonormal_grad_(m, 1.0, 1.0, backend=backend)
    torch.testing.assert_close(m[0].sorsa_A.grad, base["0.sorsa_A"] + ref_m[0].sorsa_A.grad)
    torch.testing.assert_close(m[1].sorsa_A.grad, base["1.sorsa_A"] + ref_m[1].sorsa_A.grad)
    assert m[1].sorsa_B.grad is None


def test_exactly_orthonormal_gives_zero_grad_no_nan(backend):
    m = nn.ModuleList([sk.SORSALinear(8, 8, r=8)])
    with torch.no_grad():
        m[0].sorsa_A.copy_(torch.eye(8))
        m[0].sorsa_B.copy_(torch.eye(8))
    assert sk.orthonormal_grad_(m, 1.0, 1e-3, backend=backend) == 0.0
    assert torch.equal(m[0].sorsa_A.grad, torch.zeros(8, 8)) and torch.equal(m[0].sorsa_B.grad, torch.zeros(8, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_tolerance_rule(ref, backend, dtype):
    """vs the float64 autograd of the reference formula; the baseline is the reference run in
    the params' own precision (its Gram is rounded to bf16/fp16, ours stays fp32)."""
    m = adapters_model(SHAPES[2], dtype=dtype)
    m64 = adapters_model(SHAPES[2], dtype=torch.float64)
    for p, q in zip(m.parameters(), m64.parameters()):
        q.data = p.data.double()
    low = adapters_model(SHAPES[2], dtype=dtype)
    for p, q in zip(m.parameters(), low.parameters()):
        q.data = p.data.clone()
    reg64 = sum(torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0], dtype=p.dtype) if "sorsa_A" in n
                                         else p.T @ p - torch.eye(p.shape[1], dtype=p.dtype))
                for n, p in m64.named_parameters() if "sorsa_A" in n or "sorsa_B" in n) / 12
    (2.0 * reg64).backward()
    (2.0 * ref.calc_ortho(low)).backward()
    if backend == "triton":
        m = m.to(KERNEL_DEVICE)
    val = sk.orthonormal_grad_(m, 0.5, 0.25, backend=backend)
    assert val == pytest.approx(reg64.item(), rel=1e-2)
    for (n, p), q, l in zip(m.named_parameters(), m64.parameters(), low.parameters()):
        if "sorsa_A" in n or "sorsa_B" in n:
            assert p.grad.dtype == dtype
            assert_tolerance(p.grad.cpu(), l.grad, q.grad, n)


def test_mixed_dtypes_and_noncontiguous(backend):
    m = adapters_model(SHAPES[1])
    m[1].half()
    with torch.no_grad():  # column-major storage for one adapter
        m[0].sorsa_B.data = m[0].sorsa_B.data.t().contiguous().t()
    assert not m[0].sorsa_B.is_contiguous()
    ref_m = adapters_model(SHAPES[1])
    ref_m[1].half()
    v = sk.orthonormal_grad_(m, 1.0, 1.0, backend=backend)
    v_ref = sk.orthonormal_grad_(ref_m, 1.0, 1.0, backend="torch")
    assert float(v) == pytest.approx(float(v_ref), rel=1e-3)
    torch.testing.assert_close(m[0].sorsa_B.grad, ref_m[0].sorsa_B.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m[1].sorsa_A.grad.float(), ref_m[1].sorsa_A.grad.float(), rtol=1e-2, atol=1e-3)


def test_training_loop_keeps_adapters_orthonormal(backend):
    """A short training loop: with the regularizer ‖AAᵀ−I‖ stays small; without it, it drifts."""
    def train(gamma):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
        sk.apply_sorsa(net, ["0", "2"], r=8)
        sk.mark_only_sorsa_trainable(net)
        lr = 0.05
        opt = torch.optim.SGD(sk.sorsa_parameters(net), lr=lr)
        x, y = torch.randn(64, 32), torch.randn(64, 16)
        for _ in range(30):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            if gamma:
                sk.orthonormal_grad_(net, gamma, lr, backend=backend)
            opt.step()
        return sk.calc_ortho(net).item()
    free, regularized = train(0.0), train(5e-3)
    assert regularized < 0.5 * free and regularized < 0.05, (free, regularized)


def test_no_adapters_and_params_iterable():
    assert sk.calc_ortho(nn.Linear(3, 3)) is None
    with pytest.warns(UserWarning, match="found no adapters"):
        assert sk.orthonormal_grad_(nn.Linear(3, 3), 1.0, 1.0) is None
    for bad in (-1.0, -1e-9):
        with pytest.raises(ValueError, match="gamma must be >= 0"):
            sk.orthonormal_grad_(nn.Linear(3, 3), bad, 1.0)
        with pytest.raises(ValueError, match="gamma must be >= 0"):
            sk.SORSARegularizer(adapters_model(SHAPES[0]), gamma=bad, lr=1.0)
    m = adapters_model(SHAPES[0])
    assert sk.orthonormal_grad_(list(m.named_parameters()), 1.0, 1.0) == pytest.approx(sk.calc_ortho(m).item(), rel=1e-6)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sk.orthonormal_grad_(m, 1.0, 0.0)
    with pytest.raises(TypeError, match="model_or_params"):
        sk.orthonormal_grad_([torch.zeros(2)], 1.0, 1.0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (pip install triton)")
def test_triton_buffers_fully_written(monkeypatch):
    """Workspaces and new .grad tensors start as NaN: an unwritten element would leak."""
    from sorsa_kernels.ops.ortho import launch as ortho_launch
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(ortho_launch.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(ortho_launch.torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))
    m = adapters_model(SHAPES[2]).to(KERNEL_DEVICE)
    ref_m = adapters_model(SHAPES[2])
    v = sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    assert float(v) == pytest.approx(float(sk.orthonormal_grad_(ref_m, 1.0, 1.0, backend="torch")), rel=1e-5)
    for p, q in zip(m.parameters(), ref_m.parameters()):
        if q.grad is not None:
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-5, atol=1e-6)


def test_float64_adapters_never_reach_the_fused_regularizer():
    """The Triton regularizer handles fp16/bf16/fp32: auto runs torch for float64 adapters (on any
    device), a forced triton says why instead of failing inside the launcher."""
    import pytest as _pt
    from sorsa_kernels import _backend
    from sorsa_kernels.ops.ortho import OP
    from sorsa_kernels.regularizer import ortho_loss
    if "triton" not in _backend.available_backends(OP):
        _pt.skip("triton not installed")
    assert _backend.resolve(OP, "auto", torch.device("cuda"), torch.float64) == "torch"
    A = [torch.randn(3, 20, dtype=torch.float64, requires_grad=True)]
    with _pt.raises(RuntimeError, match="with float64 inputs"):
        ortho_loss(a=A, b=[], backend="triton")
    torch.testing.assert_close(ortho_loss(a=A, b=[]), ortho_loss(a=A, b=[], backend="torch"))
