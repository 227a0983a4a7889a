"""SORSALinear vs sorsa 1.0.1's sorsa.layer.Linear and the float64 reference."""
import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk

from conftest import DTYPES, needs_triton


def pair(ref, k, n, r, alpha, bias, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(n, k) / k ** 0.5
    b = torch.randn(n) if bias else None
    theirs = ref.Linear(k, n, r=r, alpha=alpha, bias=bias)
    ours = sk.SORSALinear(k, n, r=r, alpha=alpha, bias=bias)
    for m in (theirs, ours):
        m.weight.data = W.clone()
        if bias:
            m.bias.data = b.clone()
    return W, theirs, ours


def align_signs(ours, theirs):
    """Singular vectors are defined up to a sign per pair: flip ours to match theirs."""
    s = torch.sign((ours.sorsa_A * theirs.sorsa_A).sum(1))
    s[s == 0] = 1
    ours.sorsa_A.data *= s[:, None]
    ours.sorsa_B.data *= s[None, :]


@pytest.mark.parametrize("k,n,r,alpha,bias", [(24, 16, 1, None, False), (24, 16, 16, 8.0, True), (17, 29, 5, 3.0, True)])
def test_init_matches_reference_and_reconstructs(ref, k, n, r, alpha, bias):
    W, theirs, ours = pair(ref, k, n, r, alpha, bias)
    theirs.sorsa_init()
    ours.sorsa_init()
    align_signs(ours, theirs)
    for name in ("sorsa_A", "sorsa_S", "sorsa_B", "weight"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=2e-5, rtol=1e-4, msg=name)
    rec = ours.weight + ours.scale * (ours.sorsa_B * ours.sorsa_S) @ ours.sorsa_A
    torch.testing.assert_close(rec, W, atol=2e-6, rtol=1e-5)
    # A, B orthonormal right after init
    eye = torch.eye(r)
    torch.testing.assert_close(ours.sorsa_A @ ours.sorsa_A.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sorsa_B.T @ ours.sorsa_B, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_both_ways_same_outputs_and_grads(ref, shape, bias):
    W, theirs, ours = pair(ref, 24, 16, 6, 12.0, bias)
    theirs.sorsa_init()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = ref.Linear(24, 16, r=6, alpha=12.0, bias=bias)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(*shape)
    for m in (theirs, ours, back):
        m.zero_grad()
    ys = [m(x) for m in (theirs, ours, back)]
    dy = torch.randn_like(ys[0])
    for y in ys:
        y.backward(dy)
    torch.testing.assert_close(ys[1], ys[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ys[2], ys[0], atol=1e-5, rtol=1e-5)
    for name in ("sorsa_A", "sorsa_S", "sorsa_B") + (("bias",) if bias else ()):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ours.weight.grad is None and not ours.weight.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_init_does_svd_in_fp32(dtype):
    torch.manual_seed(0)
    W = torch.randn(32, 20, dtype=torch.float64) / 5
    m = sk.SORSALinear(20, 32, r=20, dtype=dtype)  # r = min(in, out)
    m.weight.data = W.to(dtype)
    m.sorsa_init(adapter_dtype=torch.float32)
    assert m.weight.dtype == dtype and m.sorsa_A.dtype == torch.float32
    rec = m.weight.double() + (m.sorsa_B.double() * m.sorsa_S.double()) @ m.sorsa_A.double()
    # r = min(in, out): W_r is only rounding noise, so W is reproduced to fp32 accuracy
    torch.testing.assert_close(rec, W.to(dtype).double(), atol=1e-5, rtol=0)
    S64 = torch.linalg.svdvals(W.to(dtype).double())
    torch.testing.assert_close(m.sorsa_S.double(), S64, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_round_trip_and_merged_forward_is_one_linear(ref):
    W, theirs, ours = pair(ref, 20, 12, 4, 8.0, True)
    theirs.sorsa_init()
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        ours.sorsa_A.add_(0.1 * torch.randn_like(ours.sorsa_A))
        theirs.sorsa_A.copy_(ours.sorsa_A)
    x = torch.randn(7, 20)
    ours.eval()
    y0 = ours(x)
    w0 = ours.weight.clone()
    ours.merge(), theirs._merge(True)
    assert ours.merged
    torch.testing.assert_close(ours.weight, theirs.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(x), torch.nn.functional.linear(x, ours.weight, ours.bias))
    torch.testing.assert_close(ours(x), y0, atol=1e-5, rtol=1e-5)
    ours.merge()  # idempotent
    ours.unmerge()
    assert not ours.merged
    torch.testing.assert_close(ours.weight, w0, atol=1e-6, rtol=0)
    ours.merge_weights = False
    ours.merge()
    assert not ours.merged


def test_dropout_identity_in_eval_and_active_in_train():
    torch.manual_seed(0)
    m = sk.SORSALinear(32, 16, r=8, dropout=0.5)
    m.sorsa_init()
    x = torch.randn(4, 32)
    m.eval()
    torch.testing.assert_close(m(x), x @ (m.weight + (m.sorsa_B * m.sorsa_S) @ m.sorsa_A).T, atol=1e-5, rtol=1e-5)
    m.train()
    assert not torch.allclose(m(x), m.eval()(x))


def test_r0_is_plain_linear_and_from_linear():
    m = sk.SORSALinear(8, 4, r=0, bias=True)
    assert m.weight.requires_grad and not hasattr(m, "sorsa_A")
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias))
    lin = nn.Linear(8, 6)
    w0 = lin.weight.detach().clone()
    s = sk.SORSALinear.from_linear(lin, r=3, alpha=6.0)
    torch.testing.assert_close(s(x), lin(x), atol=1e-5, rtol=1e-5)
    s.merge(); s.unmerge()
    assert torch.equal(lin.weight, w0)  # the wrapped linear is never modified
    assert s.scale == 2.0 and s.r == 3
    z = sk.SORSALinear.from_linear(lin, r=3, init=None)
    assert torch.equal(z.sorsa_A, torch.zeros(3, 8)) and torch.equal(z.weight, lin.weight)


def test_sorsa_init_twice_is_idempotent():
    torch.manual_seed(0)
    m = sk.SORSALinear(12, 10, r=4)
    W = m.weight.detach().clone()
    m.sorsa_init()
    y = m(torch.ones(1, 12))
    m.sorsa_init()
    torch.testing.assert_close(m(torch.ones(1, 12)), y, atol=1e-5, rtol=1e-5)
    rec = m.weight + (m.sorsa_B * m.sorsa_S) @ m.sorsa_A
    torch.testing.assert_close(rec, W, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("into", ["ours", "ref", "ours_merged"])
def test_merged_state_dict_reloads_to_the_same_outputs(ref, into):
    """the state dict holds the unmerged form, so a merged layer's checkpoint
    strict-loads (ours or sorsa 1.0.1's) without applying the adapter twice."""
    W, theirs, ours = pair(ref, 20, 12, 4, 8.0, True)
    ours.sorsa_init()
    with torch.no_grad():
        ours.sorsa_A.add_(0.1 * torch.randn_like(ours.sorsa_A))
    ours.eval()
    x = torch.randn(7, 20)
    y = ours(x)
    ours.merge()
    sd = ours.state_dict()
    assert set(sd) == {"weight", "bias", "sorsa_A", "sorsa_S", "sorsa_B"}
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)  # saving does not change the layer
    if into == "ref":
        fresh = ref.Linear(20, 12, r=4, alpha=8.0, bias=True)
    else:
        fresh = sk.SORSALinear(20, 12, r=4, alpha=8.0, bias=True).eval()
        if into == "ours_merged":
            fresh.sorsa_init()
            fresh.merge()
    fresh.load_state_dict(sd, strict=True)
    assert getattr(fresh, "merged") == (into == "ours_merged")  # a merged layer stays merged
    torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)
    if into != "ref":
        fresh.unmerge()
        torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)


def test_training_after_merge_warns_once_per_merge():
    m = sk.SORSALinear.from_linear(nn.Linear(10, 8), r=2)
    m.merge()
    x = torch.randn(3, 10)
    with pytest.warns(UserWarning, match="merged, so its adapters get no gradient"):
        m(x).sum().backward()
    assert m.sorsa_A.grad is None  # the silent failure the warning is about
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once
        m.eval()(x)  # inference: no warning
        with torch.no_grad():
            m.train()(x)
    m.unmerge(), m.merge()
    with pytest.warns(UserWarning, match="no gradient"):
        m.train()(x)


def test_conv1d_layer_keeps_layout_and_function():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(12, 20)  # nx = 20 inputs, nf = 12 outputs, weight (20, 12)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 5, 20)
    y0 = conv(x)
    m = sk.SORSAConv1D.from_conv1d(conv, r=4, alpha=8.0)
    assert m.weight.shape == (20, 12) and m.sorsa_A.shape == (4, 20) and m.sorsa_B.shape == (12, 4)
    assert (m.in_features, m.out_features) == (20, 12)
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)
    # W_r in Conv1D layout: x·W_r + scale·x·(B·S·A)ᵀ reproduces the original weight
    rec = m.weight + m.scale * ((m.sorsa_B * m.sorsa_S) @ m.sorsa_A).T
    torch.testing.assert_close(rec, conv.weight, atol=1e-6, rtol=1e-5)
    m(x).sum().backward()
    assert m.sorsa_A.grad is not None and m.weight.grad is None
    m.eval().merge()
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)
    sd = m.state_dict()
    assert sd["weight"].shape == (20, 12)
    torch.testing.assert_close(sd["weight"], m.residual_weight().T)  # unmerged form, Conv1D layout
    with pytest.raises(TypeError, match="must be a transformers Conv1D"):
        sk.SORSAConv1D.from_linear(nn.Linear(4, 4), r=1)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        sk.SORSALinear.from_linear(conv, r=1)



def test_forward_on_the_meta_device():
    """shape inference on meta works as for nn.Linear (layer, merged, converted model)."""
    m = sk.SORSALinear(16, 8, r=4, bias=True, device="meta")
    y = m(torch.empty(3, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (3, 5, 8)
    m.merge()
    assert m.eval()(torch.empty(2, 16, device="meta")).shape == (2, 8)
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    sk.apply_sorsa(net, ["0", "2"], r=2, init=None)
    assert net(torch.empty(7, 16, device="meta")).shape == (7, 4)


@needs_triton
def test_conv1d_layer_fused_path_reads_the_transposed_weight():
    """SORSAConv1D hands the op a transposed view of its in×out weight: the Triton path (strided,
    no copy) matches the torch path, forward and gradients."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(12, 20)
    outs = []
    for backend in ("torch", "triton"):
        m = sk.SORSAConv1D.from_conv1d(conv, r=4, alpha=8.0, backend=backend)
        x = torch.randn(2, 5, 20, requires_grad=True)
        x.data = torch.arange(200, dtype=torch.float32).reshape(2, 5, 20).sin()
        y = m(x)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad, m.sorsa_A.grad, m.sorsa_S.grad, m.sorsa_B.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 8)])
def test_output_is_not_a_view_and_takes_in_place_ops(shape):
    """Like nn.Linear, the output owns its autograd history (FSDP2 warns on view outputs, and an
    in-place op on them broke its backward): h += x gives the gradients of h = h + x."""
    torch.manual_seed(0)
    layer = sk.SORSALinear.from_linear(nn.Linear(8, 8), 2, init="svd")
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y._base is None
    y += x
    y.square().sum().backward()
    g = [x.grad.clone(), layer.sorsa_A.grad.clone()]
    x.grad = None
    layer.zero_grad()
    (layer(x) + x).square().sum().backward()
    torch.testing.assert_close(x.grad, g[0])
    torch.testing.assert_close(layer.sorsa_A.grad, g[1])
