"""GPU checks of the fused linear kernels (benchmarks/gpu_check.sh): the sm_90 TMA kernel really
runs for aligned bf16 shapes, and dropout p = 0.05 gradients match float64 with the exact
Philox mask replayed in numpy."""
import pytest
import torch

from sorsa_kernels.ops.linear import launch as L
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_naive

from conftest import HAS_TRITON, assert_tolerance, set_launch_options
from linear_helpers import operands, replay_mask, run, seed_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]
NAMES = ["y", "dx", "dA", "dS", "dB", "dbias"]


@pytest.mark.parametrize("M,k,n,r", [(1000, 1024, 768, 16), (333, 512, 256, 128), (77, 136, 200, 33)])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_gpu_bf16_vs_float64_with_mask_replay(M, k, n, r, p, monkeypatch):
    calls = []
    real = L._fused_matmul_tma
    monkeypatch.setattr(L, "_fused_matmul_tma", lambda *a: calls.append(1) or real(*a))
    o = operands((M,), k, n, r)
    mask = replay_mask(seed_of(3), M, k, p).double() if p > 0 else None

    def fused(x, W, A, S, B, b):
        torch.manual_seed(3)
        return sorsa_linear(x, W, A, S, B, 0.5, b, dropout_p=p, backend="triton")

    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(  # noqa: E731
        x, W, A, S, B, 0.5, b, mask=None if mask is None else mask.to(x.device), dropout_p=p)
    out = run(fused, o, torch.bfloat16, "cuda")
    ref, low = run(naive, o, torch.float64), run(naive, o, torch.bfloat16)
    for name, a, lo, r64 in zip(NAMES, out, low, ref):
        assert_tolerance(a, lo, r64, name)
    if torch.cuda.get_device_capability()[0] >= 9:
        # forward y and dX (the dropout-masked dX too: rank-r term masked in the TMA kernel)
        assert len(calls) == 2


@pytest.mark.parametrize("r", [16, 128])  # one pass over dY (dA on the side stream); two passes (dA, dB there)
def test_gpu_side_stream_backward_is_bitwise_the_in_line_one(r, monkeypatch):
    o = operands((1000,), 1024, 768, r)

    def fused(x, W, A, S, B, b):
        return sorsa_linear(x, W, A, S, B, 0.5, b, dropout_p=0.05, backend="triton")

    def once():
        torch.manual_seed(3)
        return run(fused, o, torch.bfloat16, "cuda")

    set_launch_options(monkeypatch, overlap=False)
    in_line = once()
    set_launch_options(monkeypatch, overlap=True)
    overlapped = once()
    assert torch.cuda.current_device() in L._SIDE_STREAMS
    user = torch.cuda.Stream()  # forked from and joined into a user's stream, not the default one
    with torch.cuda.stream(user):
        on_user = once()
    torch.cuda.synchronize()
    for name, a, b, c in zip(NAMES, in_line, overlapped, on_user):
        assert torch.equal(a, b) and torch.equal(a, c), name
