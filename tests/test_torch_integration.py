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
    op = torch.ops.sorsa_kernels.linear_fwd_dropout if p > 0 else torch.ops.sorsa_kernels.linear_fwd
    torch.library.opcheck(op.default, op_args(backend, p=p, bias=bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_linear_bwd(backend, dropout):
    x, W, A, S, B, b, scale, p, seed, be = op_args(backend, p=0.2 if dropout else 0.0)
    fwd, bwd = ((torch.ops.sorsa_kernels.linear_fwd_dropout, torch.ops.sorsa_kernels.linear_bwd_dropout) if dropout
                else (torch.ops.sorsa_kernels.linear_fwd, torch.ops.sorsa_kernels.linear_bwd))
    y, xa = fwd(x, W, A, S, B, b, scale, p, seed, be)
    dy = torch.randn_like(y)
    for need_dx in (True, False):
        torch.library.opcheck(bwd.default,
                              (dy, x.detach(), W, A.detach(), S.detach(), B.detach(), xa.detach(), scale, p, seed, be, need_dx))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_only_dropout_graphs_carry_the_cuda_graph_unsafe_tag(dropout):
    """With dropout the op reads its seed on the host at launch: a CUDA graph would replay the
    captured step's mask forever. In the compiled forward and backward graphs those calls are ops
    tagged cudagraph_unsafe (Inductor splits the graph around them); without dropout no op of
    ours carries the tag, so reduce-overhead graphs keep the whole layer."""
    from torch._functorch.aot_autograd import aot_module_simplified
    unsafe = torch.Tag.cudagraph_unsafe
    seen = []

    def record(gm, example_inputs):
        from functorch.compile import make_boxed_func
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and "sorsa_kernels" in str(n.target)]
        seen.extend(n.target for n in calls)
        if not dropout:  # no seed: no host tensor in the graph that would keep it out of CUDA graphs
            assert all(n.args[8 if "fwd" in str(n.target) else 9] is None for n in calls)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)
    torch.manual_seed(0)
    m = sk.apply_sorsa(Net(), ["up", "down"], r=4, dropout=dropout)
    torch.compile(m, fullgraph=True, backend=backend)(torch.randn(2, 5, 16)).sum().backward()
    names = {str(t).split(".")[-2] for t in seen}
    if dropout:
        assert names == {"linear_fwd_dropout", "linear_bwd_dropout"}
        assert all(unsafe in t.tags for t in seen)
    else:
        assert names == {"linear_fwd", "linear_bwd"}
        assert not any(unsafe in t.tags for t in seen)


def test_compiled_dropout_draws_a_fresh_mask_every_call():
    """The seed is drawn inside the compiled graph on every call, not baked in at trace time."""
    torch.manual_seed(0)
    m = sk.apply_sorsa(Net(), ["up", "down"], r=4, dropout=0.5)
    with torch.no_grad():
        for mod in (m.up, m.down):
            mod.sorsa_S.mul_(100.0)  # make the adapter term dominate, so masks show in y
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16)
    ys = [f(x) for _ in range(3)]
    assert not torch.equal(ys[0], ys[1]) and not torch.equal(ys[1], ys[2])


def test_every_custom_op_is_opchecked():
    """A new custom op must come with a torch.library.opcheck test: some test file names the op
    and calls opcheck."""
    import glob
    import os
    import re
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sorsa_kernels::")}
    assert {"linear_fwd", "linear_bwd", "linear_fwd_dropout", "linear_bwd_dropout"} <= ops
    root = os.path.dirname(os.path.abspath(__file__))
    sources = [open(f).read() for f in glob.glob(os.path.join(root, "**", "test_*.py"), recursive=True)]
    sources = [s for s in sources if "torch.library.opcheck(" in s]
    missing = [op for op in sorted(ops) if not any(re.search(rf"sorsa_kernels\.{op}\b", s) for s in sources)]
    assert not missing, f"custom ops without an opcheck test: {missing}"


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
