"""The fused linear at scale and at the edges: 64-bit offsets, empty batches, device guard, autotune
keys, no host sync for the dropout seed, clear errors and meta-device forward."""
import os

import numpy as np
import pytest
import torch

from sorsa_kernels import _device
from sorsa_kernels.ops.linear import launch as L
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_naive

from conftest import HAS_TRITON, needs_triton

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
TWO31 = 2 ** 31


@pytest.fixture
def sparse_map(tmp_path):
    """A float32 memory map of 2^31 + 2^16 elements over a sparse file: nothing is allocated
    until written, so a view can address elements past 2^31 without 8 GB of RAM."""
    n = TWO31 + 2 ** 16
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(n * 4)
    t = torch.from_file(str(path), shared=True, size=n, dtype=torch.float32)
    yield t
    del t
    os.remove(path)


def test_big_offset_decision_uses_shapes_and_strides():
    small = torch.empty(64, 32)
    assert not L._big(small)
    # a 3-row view whose last row starts past element 2^31 needs int64 though it is tiny
    assert L._big(torch.empty_strided((3, 4), (2 ** 30 + 7, 1), device="meta"))
    assert L._big(small, extra=TWO31)  # the dropout index m·in_features + k


@needs_triton
@pytest.mark.skipif(not L.triton_interpret(), reason="memory-map test runs under the interpreter")
def test_int64_offsets_read_and_write_past_2_31(sparse_map):
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 3, 20, 12, 5
    rs = TWO31 // 2 + 1001  # row stride: row 2 starts past element 2^31
    x_view = sparse_map.as_strided((M, K), (rs, 1), 17)
    xv = torch.randn(M, K, generator=g)
    x_view.copy_(xv)
    W, A, B = torch.randn(N, K, generator=g), torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    # the forward reads x from the right place ...
    y = sorsa_linear(x_view, W, A, torch.ones(r), B, 0.5, backend="triton")
    torch.testing.assert_close(y, sorsa_linear_naive(xv, W, A, torch.ones(r), B, 0.5), atol=1e-4, rtol=1e-4)
    # ... and the GEMM writes y / dX rows past 2^31 where they belong (dX = dY·W, out strided)
    out = sparse_map.as_strided((M, K), (rs, 1), 69)
    dy = torch.randn(M, N, generator=g)
    L.fused_matmul(dy, W.t(), out)
    torch.testing.assert_close(out.clone(), dy @ W, atol=1e-4, rtol=1e-4)
    assert sparse_map[69 + 2 * rs + K].item() == 0.0  # nothing written past the row
    # dA (split-M TN reduction) reads the far rows of x too
    gs = torch.randn(M, r, generator=g)
    torch.testing.assert_close(L.tn_matmul(gs, x_view), gs.t() @ xv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("lead", [(0,), (0, 3), (2, 0)])
def test_empty_batch(backend, p, lead):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 8, generator=g).requires_grad_()
    A, S, B = (torch.randn(*s, generator=g).requires_grad_() for s in ((3, 8), (3,), (6, 3)))
    b = torch.randn(6, generator=g).requires_grad_()
    y = sorsa_linear(x, torch.randn(6, 8, generator=g), A, S, B, 0.5, b, dropout_p=p, backend=backend)
    assert y.shape == (*lead, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (A, S, B, b):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_device_guard_is_noop_off_cuda_and_selects_the_cuda_device():
    import contextlib
    assert isinstance(_device.device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(_device.device_guard(torch.device("meta")), contextlib.nullcontext)
    guard = _device.device_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@needs_triton
@pytest.mark.skipif(not L.triton_interpret(), reason="counts interpreter launches")
def test_every_launch_runs_under_the_device_guard(monkeypatch):
    entered, launches = [], []
    real_guard = _device.device_guard

    class Guard:
        def __init__(self, dev):
            self.dev, self.inner = dev, real_guard(dev)

        def __enter__(self):
            entered.append(self.dev)
            return self.inner.__enter__()

        def __exit__(self, *a):
            entered.append(None)
            return self.inner.__exit__(*a)

    class Kernel:  # records whether the guard is open at each launch
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def go(*a, **kw):
                launches.append(len(entered) % 2 == 1 and entered[-1] is not None)
                return self.k[grid](*a, **kw)
            return go

    monkeypatch.setattr(_device, "device_guard", Guard)
    monkeypatch.setattr(L, "sorsa_mm_kernel", Kernel(L.sorsa_mm_kernel))
    monkeypatch.setattr(L, "sorsa_tn_kernel", Kernel(L.sorsa_tn_kernel))
    x = torch.randn(5, 8, requires_grad=True)
    A = torch.randn(2, 8, requires_grad=True)
    y = sorsa_linear(x, torch.randn(4, 8), A, torch.ones(2), torch.randn(4, 2), dropout_p=0.1, backend="triton")
    y.sum().backward()
    assert len(launches) == 5 and all(launches)  # fwd: shrink, main; bwd: g, dX, dA (B frozen: no dB)
    assert set(d for d in entered if d is not None) == {torch.device("cpu")}


@pytest.mark.parametrize("name", ["weight", "A", "S", "B", "bias"])
def test_operands_on_another_device_raise(name):
    ops = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), A=torch.randn(2, 8), S=torch.randn(2),
               B=torch.randn(6, 2), bias=torch.randn(6))
    ops[name] = ops[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} must be on the same device as x"):
        sorsa_linear(ops["x"], ops["weight"], ops["A"], ops["S"], ops["B"], bias=ops["bias"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not HAS_TRITON or L.triton_interpret(),
                    reason="needs two CUDA GPUs and native Triton (a layer on cuda:1 while cuda:0 is current)")
def test_two_gpus_launch_on_the_tensors_device():
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    ops = [torch.randn(*s, generator=g) for s in ((64, 96), (80, 96), (8, 96), (8,), (80, 8))]
    dev = torch.device("cuda", 1)
    x, W, A, S, B = (t.to(dev).requires_grad_(i in (0, 2)) for i, t in enumerate(ops))
    s1 = torch.cuda.Stream(dev)
    with torch.cuda.stream(s1):  # the layer's device has its own current stream
        y = sorsa_linear(x, W, A, S, B, 0.5, dropout_p=0.0, backend="triton")
        y.sum().backward()
    torch.cuda.synchronize(dev)
    ref = sorsa_linear_naive(*(t.double() for t in ops), 0.5)
    torch.testing.assert_close(y.double().cpu(), ref, atol=1e-3, rtol=1e-3)
    assert x.grad.device == dev and A.grad.device == dev
    with pytest.raises(ValueError, match="weight must be on the same device as x"):
        sorsa_linear(x, W.to("cuda:0"), A, S, B, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or L.triton_interpret(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_per_step_with_dropout(backend):
    g = torch.Generator().manual_seed(0)
    ops = [torch.randn(*s, generator=g).cuda() for s in ((64, 96), (80, 96), (8, 96), (8,), (80, 8))]
    x, W, A, S, B = ops
    A.requires_grad_()
    sorsa_linear(x, W, A, S, B, dropout_p=0.1, backend=backend).sum().backward()  # warm-up/compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = sorsa_linear(x, W, A, S, B, dropout_p=0.1, backend=backend)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_dropout_seed_is_a_cpu_tensor_and_fresh_per_call(monkeypatch):
    """The seed is drawn on the host (no device read to turn it into an int) and differs
    between calls, so masks differ between layers and steps."""
    import sorsa_kernels.ops.linear.torch_path as tp
    seen = []
    real = tp.keep_mask

    def spy(x2, p, seed):
        seen.append(seed)
        return real(x2, p, seed)

    monkeypatch.setattr(tp, "keep_mask", spy)
    x, W, A, S, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.ones(2), torch.randn(6, 2)
    # fp32: the eager path; bf16: the custom op (the seed reaches both the same way)
    for dt in (torch.float32, torch.bfloat16):
        seen.clear()
        args = [t.to(dt) for t in (x, W, A, S, B)]
        sorsa_linear(*args, dropout_p=0.2)
        sorsa_linear(*args, dropout_p=0.2)
        assert seen and all(s.device.type == "cpu" for s in seen)
        assert int(seen[0]) != int(seen[-1])


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_meta_forward_like_nn_linear(p):
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    y = sorsa_linear(m(2, 5, 8), m(6, 8), m(3, 8), m(3), m(6, 3), 0.5, m(6), dropout_p=p)
    assert y.device.type == "meta" and y.shape == (2, 5, 6)
    assert torch.nn.functional.linear(m(2, 5, 8), m(6, 8)).shape == y.shape


def test_numpy_x_names_x():
    W, A, S, B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(2), torch.randn(6, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got numpy.ndarray"):
        sorsa_linear(np.zeros((4, 8), dtype=np.float32), W, A, S, B)


@needs_triton
def test_autotune_key_buckets_m_and_reductions_are_pinned(monkeypatch):
    """Launchers run on meta tensors (the AOT check's contract); the captured autotune key
    differs between M = 8 and M = 8192, and dA/dBᵀ launch with a pinned config."""
    calls = []

    class Tuned:
        def __init__(self, role):
            self.role = role

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("tuned", self.role, a[11]))

    class Pinned:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("pinned", kw["BLOCK_A"], kw["BLOCK_M"], kw["num_warps"]))

    class Glue:  # the partials-sum/scale kernel: meta tensors have no data, record only
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("glue",))

    monkeypatch.setattr(L, "triton_interpret", lambda: False)
    monkeypatch.setattr(_device, "num_sms", lambda dev: 132)
    monkeypatch.setattr(L, "_TUNED", {k: Tuned(k[0]) for k in L._TUNED})
    monkeypatch.setattr(L, "sorsa_tn_kernel", Pinned())
    monkeypatch.setattr(L, "sorsa_scale_kernel", Glue())

    class Gdb:  # one pass over dY for g and dB (r = 16): a pinned config too
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(("gdb", kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_R"], kw["num_warps"]))

    monkeypatch.setattr(L, "sorsa_gdb_kernel", Gdb())
    m = lambda *s, dt=torch.bfloat16: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    for M in (8, 8192):
        y, xa = L.linear_fwd(m(M, 64), m(48, 64), m(16, 64), m(16), m(48, 16), None, 1.0, 0.05, torch.tensor([3]))
        L.linear_bwd(m(M, 48), m(M, 64), m(48, 64), m(16, 64), m(16), m(48, 16), xa, 1.0, 0.05,
                     torch.tensor([3]), True)
    buckets = {c[2] for c in calls if c[0] == "tuned"}
    assert buckets == {8, 8192}
    pinned = {c[1:] for c in calls if c[0] == "pinned"}
    assert len(pinned) == 1
    assert {c[1:] for c in calls if c[0] == "gdb"} == {(64, 256, 16, 8)}  # both M: the same config


def test_tuned_kernels_key_on_m_bucket():
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    for key, tuned in L._TUNED.items():
        assert "M_BUCKET" in tuned.keys, key


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r,block_a", [(1, 32), (16, 32), (33, 64), (128, 128), (200, 128)])
def test_tn_tile_covers_r_so_the_dropout_mask_is_made_once(monkeypatch, dt, r, block_a):
    """Review item 6: dA = gsᵀ·drop(x) regenerates x's Philox mask once per r-tile; the pinned
    tile's r-extent follows r (next power of two, 32..128), so r <= 128 takes one tile row."""
    launches = []

    class Pinned:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, kw))

    monkeypatch.setattr(L, "triton_interpret", lambda: False)
    monkeypatch.setattr(_device, "num_sms", lambda dev: 132)
    monkeypatch.setattr(L, "sorsa_tn_kernel", Pinned())
    m = lambda *s: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
    L.tn_matmul(m(8192, r), m(8192, 4096), seed=torch.tensor([3]), p=0.05, drop_q=True, drop_ld=4096)
    (grid, kw), = launches
    assert kw["BLOCK_A"] == block_a and grid[0] == -(-r // block_a)
    cfg = L.PINNED["tn"][dt == torch.float32][block_a]  # one of the pinned, AOT-compiled configs
    assert (kw["BLOCK_B"], kw["BLOCK_M"], kw["num_warps"]) == (cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_M"],
                                                              cfg.num_warps)
