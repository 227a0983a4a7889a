"""calc_ortho / orthonormal_grad_ vs sorsa 1.0.1's calc_ortho and its autograd."""
import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk


def adapters_model(shapes, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.ModuleList()
    for (k, n, r) in shapes:
        l = sk.SORSALinear(k, n, r=r, dtype=dtype)
        with torch.no_grad():  # perturbed orthonormal adapters: a non-trivial regularizer
            l.sorsa_A.copy_(torch.linalg.qr(torch.randn(k, r))[0].T + 0.05 * torch.randn(r, k))
            l.sorsa_B.copy_(torch.linalg.qr(torch.randn(n, r))[0] + 0.05 * torch.randn(n, r))
            l.sorsa_S.copy_(torch.rand(r))
        m.append(l)
    return m


SHAPES = [[(16, 12, 4)], [(16, 12, 4), (9, 30, 7)], [(16, 12, 4), (16, 12, 4), (9, 30, 7), (33, 5, 1), (8, 8, 8)]]


@pytest.mark.parametrize("shapes", SHAPES)
def test_value_equals_reference(ref, shapes):
    m = adapters_model(shapes)
    torch.testing.assert_close(sk.calc_ortho(m), ref.calc_ortho(m), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("squared", [False, True])
def test_grad_equals_autograd_of_reference(ref, shapes, squared):
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
    val = sk.orthonormal_grad_(m, gamma, lr, squared=squared)
    assert val == pytest.approx(reg.item(), rel=1e-6)
    for n, p in m.named_parameters():
        if n in expect and ("sorsa_A" in n or "sorsa_B" in n):
            torch.testing.assert_close(p.grad, expect[n], rtol=1e-6, atol=1e-6 * expect[n].abs().max().item(), msg=n)
        elif "sorsa_S" in n:
            assert p.grad is None


def test_accumulates_onto_existing_grads_and_skips_frozen():
    m = adapters_model(SHAPES[1])
    base = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        p.grad = base[n].clone()
    m[1].sorsa_B.requires_grad_(False)
    m[1].sorsa_B.grad = None
    ref_m = adapters_model(SHAPES[1])
    sk.orthonormal_grad_(ref_m, 1.0, 1.0)
    sk.orthonormal_grad_(m, 1.0, 1.0)
    torch.testing.assert_close(m[0].sorsa_A.grad, base["0.sorsa_A"] + ref_m[0].sorsa_A.grad)
    assert m[1].sorsa_B.grad is None


def test_exactly_orthonormal_gives_zero_grad_no_nan():
    m = nn.ModuleList([sk.SORSALinear(8, 8, r=8)])
    with torch.no_grad():
        m[0].sorsa_A.copy_(torch.eye(8))
        m[0].sorsa_B.copy_(torch.eye(8))
    assert sk.orthonormal_grad_(m, 1.0, 1e-3) == 0.0
    assert torch.equal(m[0].sorsa_A.grad, torch.zeros(8, 8)) and torch.equal(m[0].sorsa_B.grad, torch.zeros(8, 8))


def test_bf16_params_fp32_math():
    m = adapters_model(SHAPES[1], dtype=torch.bfloat16)
    m32 = adapters_model(SHAPES[1])
    for p, q in zip(m.parameters(), m32.parameters()):
        q.data = p.data.float()
    sk.orthonormal_grad_(m, 0.5, 1.0)
    sk.orthonormal_grad_(m32, 0.5, 1.0)
    for p, q in zip(m.parameters(), m32.parameters()):
        if q.grad is not None:
            assert p.grad.dtype == torch.bfloat16
            torch.testing.assert_close(p.grad.float(), q.grad, rtol=1e-2, atol=1e-2)


def test_no_adapters_and_params_iterable():
    assert sk.calc_ortho(nn.Linear(3, 3)) is None
    assert sk.orthonormal_grad_(nn.Linear(3, 3), 1.0, 1.0) is None
    m = adapters_model(SHAPES[0])
    assert sk.orthonormal_grad_(list(m.named_parameters()), 1.0, 1.0) == pytest.approx(sk.calc_ortho(m).item(), rel=1e-6)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sk.orthonormal_grad_(m, 1.0, 0.0)
    with pytest.raises(TypeError, match="model_or_params"):
        sk.orthonormal_grad_([torch.zeros(2)], 1.0, 1.0)
