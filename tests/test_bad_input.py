"""Every bad input gets a clear exception naming the argument."""
import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk
from sorsa_kernels.ops import sorsa_linear


def ops_args(k=8, n=6, r=3, dtype=torch.float32):
    return (torch.randn(4, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(r, k, dtype=dtype),
            torch.randn(r, dtype=dtype), torch.randn(n, r, dtype=dtype))


def test_layer_rank_and_dropout():
    with pytest.raises(ValueError, match=r"r must be >= 0, got -1"):
        sk.SORSALinear(8, 6, r=-1)
    with pytest.raises(ValueError, match=r"r must be <= min\(in_features, out_features\) = 6, got 7"):
        sk.SORSALinear(8, 6, r=7)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        sk.SORSALinear(8, 6, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        sk.SORSALinear(0, 6)
    with pytest.raises(ValueError, match="sorsa_init needs r >= 1"):
        sk.SORSALinear(8, 6, r=0).sorsa_init()


def test_apply_sorsa_rejects_r0_at_apply_time():
    """r=0 used to convert the layers and fail only later, in save_adapter."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"r must be >= 1 for apply_sorsa .*got 0"):
        sk.apply_sorsa(m, ["0", "2"], r=0)
    assert not list(sk.sorsa_layers(m))  # nothing converted


def test_sorsa_linear_exported_and_sorsa_layers_yields_modules():
    from sorsa_kernels.ops import sorsa_linear
    assert sk.sorsa_linear is sorsa_linear and "sorsa_linear" in sk.__all__
    m = sk.apply_sorsa(torch.nn.Sequential(torch.nn.Linear(8, 6)), ["0"], r=2)
    assert [type(l) for l in sk.sorsa_layers(m)] == [sk.SORSALinear]


def test_init_errors():
    m = sk.SORSALinear(8, 6, r=2)
    m.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        m.sorsa_init()
    m = sk.SORSALinear(8, 6, r=2)
    m.weight.data[1, 1] = float("inf")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        m.sorsa_init()
    with pytest.raises(ValueError, match="method must be one of"):
        sk.SORSALinear(8, 6, r=2).sorsa_init(method="qr")
    with pytest.raises(TypeError, match="takes no extra arguments"):
        sk.SORSALinear(8, 6, r=2).sorsa_init(niter=3)
    with pytest.raises(TypeError, match="linear.weight must be a floating tensor"):
        lin = nn.Linear(4, 4)
        lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
        sk.SORSALinear.from_linear(lin, r=2)


def test_op_shape_errors():
    x, W, A, S, B = ops_args()
    with pytest.raises(ValueError, match=r"x must have last dimension in_features=8"):
        sorsa_linear(torch.randn(4, 7), W, A, S, B)
    with pytest.raises(ValueError, match=r"S must have shape \(3,\)"):
        sorsa_linear(x, W, A, torch.randn(4), B)
    with pytest.raises(ValueError, match=r"B must have shape \(6, 3\)"):
        sorsa_linear(x, W, A, S, torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"A must have shape \(3, 8\)"):
        sorsa_linear(x, W, torch.randn(3, 9), S, B)
    with pytest.raises(ValueError, match=r"A must be 2-D \(r, in_features\) with r >= 1"):
        sorsa_linear(x, W, torch.randn(0, 8), torch.randn(0), torch.randn(6, 0))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        sorsa_linear(x, W, A, S, B, bias=torch.randn(5))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        sorsa_linear(x, W, A, S, B, dropout_p=-0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        sorsa_linear(x, W, A, S, B, dropout_p=1.5, training=False)
    with pytest.raises(ValueError, match="scale must be finite"):
        sorsa_linear(x, W, A, S, B, scale=float("nan"))


def test_op_dtype_and_device_errors():
    x, W, A, S, B = ops_args()
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        sorsa_linear(x.int(), W, A, S, B)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        sorsa_linear(x, W.double(), A, S, B)
    with pytest.raises(TypeError, match="adapters A, S, B must have x's dtype torch.float32 or float32"):
        sorsa_linear(x, W, A.half(), S.half(), B.half())
    with pytest.raises(TypeError, match="A, S and B must share one dtype"):
        sorsa_linear(x, W, A, S.double(), B)
    with pytest.raises(ValueError, match="A must be on the same device as x"):
        sorsa_linear(x, W, A.to("meta"), S, B)
    with pytest.raises(ValueError, match="backend must be one of"):
        sorsa_linear(x, W, A, S, B, backend="cuda")


def test_unknown_backend_for_regularizer():
    m = sk.SORSALinear(8, 6, r=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.orthonormal_grad_(m, 1.0, 1.0, backend="fast")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_alpha_not_finite(alpha):
    with pytest.raises(ValueError, match="alpha must be finite"):
        sk.SORSALinear(8, 6, r=2, alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be finite"):
        sk.SORSALinear.from_linear(nn.Linear(8, 6), r=2, alpha=alpha)
    m = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="alpha must be finite"):
        sk.apply_sorsa(m, ["0"], r=2, alpha=alpha)
    assert type(m[0]) is nn.Linear
    with pytest.raises(TypeError, match="alpha must be a real number or None"):
        sk.SORSALinear(8, 6, r=2, alpha="8")


def test_alpha_zero_warns_once():
    with pytest.warns(UserWarning, match="alpha = 0 makes scale = 0") as rec:
        sk.apply_sorsa(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8)), ["0", "1"], r=2, alpha=0.0)
    assert len([w for w in rec if "alpha = 0" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="alpha = 0"):
        sk.SORSALinear(8, 6, r=2, alpha=0)


def test_bad_load_and_export_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="written by sk.save_adapter"):
        sk.load_adapter(nn.Linear(4, 4), str(tmp_path))
    with pytest.raises(ValueError, match="no SORSA layer"):
        sk.save_adapter(nn.Sequential(nn.Linear(4, 4)), str(tmp_path))
