"""torch.library registration: opcheck, torch.compile without graph breaks, autocast."""
import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk
from sorsa_kernels.ops import sorsa_linear

from conftest import HAS_TRITON


def op_args(backend, dtype=torch.float32, p=0.0, bias=True, M=9, k=20, n=12, r=3):
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (rn(M, k).requires_grad_(), rn(n, k), rn(r, k).requires_grad_(), rn(r).requires_grad_(),
            rn(n, r).requires_grad_(), rn(n).requires_grad_() if bias else None, 0.5, p,
            torch.tensor([1234], dtype=torch.int64), backend)


BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.3, False)])
def test_opcheck_linear_fwd(backend, p, bias):
    torch.library.opcheck(torch.ops.sorsa_kernels.linear_fwd.default, op_args(backend, p=p, bias=bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_linear_bwd(backend):
    x, W, A, S, B, b, scale, p, seed, be = op_args(backend, p=0.2)
    y, xa = torch.ops.sorsa_kernels.linear_fwd(x, W, A, S, B, b, scale, p, seed, be)
    dy = torch.randn_like(y)
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.sorsa_kernels.linear_bwd.default,
                              (dy, x.detach(), W, A.detach(), S.detach(), B.detach(), xa.detach(), scale, p, seed, be, need_dx))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_fullgraph_no_graph_break(dropout):
    torch.manual_seed(0)
    m = sk.apply_sorsa(Net(), ["up", "down"], r=4, dropout=dropout)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert m.up.sorsa_A.grad is not None and m.down.sorsa_B.grad is not None
    if dropout == 0.0:
        torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
    m.eval()
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), atol=1e-5, rtol=1e-5)


def test_autocast_bf16_like_nn_linear():
    torch.manual_seed(0)
    m = sk.SORSALinear.from_linear(nn.Linear(16, 8), r=4)
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yl = m(x), lin(x)
    assert y.dtype == yl.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.sorsa_A.grad.dtype == torch.float32  # grads keep the parameter dtype
    torch.testing.assert_close(y.float(), m.eval()(x), atol=0.1, rtol=0.05)
