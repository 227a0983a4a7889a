"""The fused linear kernels under the interpreter vs float64: the persistent schedule (more tiles than
programs), the rank-r segment in the K loop, split-K shrink, the TMA kernel (host tensor
descriptors run under the interpreter), the documented Philox mask replayed exactly in
numpy, and frozen adapters' gradients not computed."""
import numpy as np
import pytest
import torch

from sorsa_kernels import _device
from sorsa_kernels.ops.linear import launch as L
from sorsa_kernels.ops import sorsa_linear, sorsa_linear_naive

from conftest import KERNEL_DEVICE, assert_tolerance, needs_triton, set_launch_options
from linear_helpers import operands, philox4x32, replay_mask, run, seed_of

pytestmark = [needs_triton, pytest.mark.skipif(not L.triton_interpret(), reason="interpreter schedule")]
NAMES = ["y", "dx", "dA", "dS", "dB", "dbias"]


def check(o, dt, p=0.0, mask=None, seed=11, x_view=None):
    def fused(x, W, A, S, B, b):
        torch.manual_seed(seed)
        return sorsa_linear(x, W, A, S, B, 0.5, b, dropout_p=p, backend="triton")

    naive = lambda x, W, A, S, B, b: sorsa_linear_naive(  # noqa: E731
        x, W, A, S, B, 0.5, b, mask=None if mask is None else mask.reshape(x.shape), dropout_p=p)
    out = run(fused, o, dt, KERNEL_DEVICE, x_view)
    ref, low = run(naive, o, torch.float64), run(naive, o, dt)
    for name, a, lo, r64 in zip(NAMES, out, low, ref):
        assert_tolerance(a, lo, r64, name)


def test_numpy_philox_matches_the_reference_vector():
    # Random123's known-answer test for philox4x32-10, key = 0, counter = 0
    assert philox4x32(0, np.zeros(1, np.uint64), np.zeros(1, np.uint64))[0].tolist() == \
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("M,K", [(9, 23), (3, 40)])
def test_dropout_mask_is_the_documented_philox_stream(M, K):
    """With A = B = I, S = 1, W = 0 the output is drop(x)·1: compare with the numpy replay."""
    p = 0.3
    I = torch.eye(K)
    torch.manual_seed(5)
    y = sorsa_linear(torch.ones(M, K), torch.zeros(K, K), I, torch.ones(K), I, 1.0, dropout_p=p, backend="triton")
    assert torch.equal(y > 0, replay_mask(seed_of(5), M, K, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 16, 33, 128])
def test_dropout_grads_vs_float64_mask_replay(dtype, r):
    """Forward and every gradient (the mask regenerated in the dX epilogue and in dA) against
    float64 with the exact mask; M=40 rows over N=40 give 9 tiles for 4 persistent programs."""
    M, K, N, p = (40, 36, 40, 0.25) if r < 100 else (10, 20, 24, 0.25)
    o = operands((M,), K, N, r)
    check(o, dtype, p=p, mask=replay_mask(seed_of(11), M, K, p).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_persistent_split_k_ragged_noncontiguous(dtype, monkeypatch):
    """Column-major x, ragged sizes, split-K shrink (K=130: 2 partials) and more tiles than
    persistent programs; the K-split really happens."""
    splits = []
    real = L._k_splits
    monkeypatch.setattr(L, "_k_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    o = operands((40,), 130, 45, 16)
    check(o, dtype, x_view=lambda x: x.t().contiguous().t())
    assert max(splits) >= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M_shape,k,n,r", [((1,), 16, 24, 1), ((37,), 40, 48, 33), ((3, 7), 24, 56, 16)])
def test_tma_kernel_vs_float64(dtype, M_shape, k, n, r, monkeypatch):
    """The sm_90 TMA kernel (host descriptors, epilogue halves, [s|B] tail) runs under the
    interpreter too: y and dX go through it, padding columns of s/gs are never read (the
    launcher's buffers start as NaN)."""
    calls = []
    real_tma, real_empty = L._fused_matmul_tma, torch.empty
    set_launch_options(monkeypatch, force_tma=True)
    monkeypatch.setattr(L, "_fused_matmul_tma", lambda *a: calls.append(1) or real_tma(*a))
    monkeypatch.setattr(L.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    check(operands(M_shape, k, n, r), dtype)
    assert len(calls) == 2  # forward y and backward dX


def test_frozen_adapters_skip_their_gradient_kernels(monkeypatch):
    launches = []
    real_tn, real_gdb = L.tn_matmul, L.g_and_db
    monkeypatch.setattr(L, "tn_matmul", lambda *a, **kw: launches.append(("tn", kw.get("drop_q", False)))
                        or real_tn(*a, **kw))
    monkeypatch.setattr(L, "g_and_db", lambda *a: launches.append(("gdb",)) or real_gdb(*a))
    o = operands((12,), 20, 16, 4, bias=False)
    x, W = o["x"].float(), o["W"].float()
    A, S, B = (o[k].float() for k in "ASB")
    B.requires_grad_()
    sorsa_linear(x, W, A, S, B, 1.0, dropout_p=0.1, backend="triton").sum().backward()
    assert launches == [("gdb",)]  # dB with g in one pass over dY; dA (the masked TN over x) skipped
    assert A.grad is None and B.grad is not None
    launches.clear()
    A.requires_grad_()
    B.requires_grad_(False)
    B.grad = None
    sorsa_linear(x, W, A, S, B, 1.0, backend="triton").sum().backward()
    assert launches == [("tn", False)] and B.grad is None and A.grad is not None


def _forward_ops(monkeypatch, x, W, A, S, B, p=0.0):
    """Kernel launches and the torch compute ops *between* them in one ``linear_fwd``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    launches, ops, inside = [], [], [False]
    real_run = InterpretedFunction.run

    def run(self, *a, **kw):  # the interpreter's own tensor traffic is not glue
        launches.append(self.fn.__name__)
        inside[0] = True
        try:
            return real_run(self, *a, **kw)
        finally:
            inside[0] = False

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(InterpretedFunction, "run", run)
    seed = torch.tensor([7])
    with Record():
        L.linear_fwd(x, W, A, S, B, None, 0.5, p, seed)
    compute = [o for o in ops if o not in ("empty", "empty_strided", "slice", "select", "view", "t",
                                           "unsqueeze", "_local_scalar_dense", "alias", "detach")]
    return launches, compute


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_glue_is_one_small_launch(monkeypatch, p):
    """Review item 3: between the split-K shrink and the main GEMM only ``sorsa_scale_kernel``
    runs (partials sum, ·S·scale, cast into the padded buffer); an aligned B of x's dtype is
    used in place (no re-pad per call), on the TMA path too."""
    set_launch_options(monkeypatch, force_tma=True)
    o = operands((40,), 136, 24, 16)  # K=136: 2 split-K partials, TMA-legal rows; r=16: B rows 32 B
    x, W, A, S, B = (o[k].to(torch.bfloat16) for k in ("x", "W", "A", "S", "B"))
    launches, compute = _forward_ops(monkeypatch, x, W, A, S, B, p)
    assert launches == ["sorsa_mm_kernel", "sorsa_scale_kernel", "sorsa_mm_tma_kernel"]
    assert compute == []
    # odd r (10-byte rows): B is padded once per call with a single fused copy, nothing else
    o = operands((40,), 136, 24, 5)
    launches, compute = _forward_ops(monkeypatch, *(o[k].to(torch.bfloat16) for k in ("x", "W", "A", "S", "B")))
    assert compute == ["copy_"] and len(launches) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,k,n,r", [(37, 40, 48, 33), (20, 24, 56, 16)])
def test_tma_kernel_with_dropout_vs_mask_replay(dtype, M, k, n, r, monkeypatch):
    """Review item 5: dX with dropout stays on the TMA kernel (rank-r term first, masked in
    registers by the documented Philox stream, main K loop on top); checked against float64
    with the mask replayed in numpy."""
    calls = []
    real_tma = L._fused_matmul_tma
    set_launch_options(monkeypatch, force_tma=True)
    monkeypatch.setattr(L, "_fused_matmul_tma", lambda *a: calls.append(a[8]) or real_tma(*a))
    p = 0.25
    check(operands((M,), k, n, r), dtype, p=p, mask=replay_mask(seed_of(11), M, k, p).double())
    assert calls == [False, True]  # forward y unmasked, backward dX masked, both TMA


def test_masked_dx_with_int64_philox_counters_takes_the_pointer_kernel(monkeypatch):
    """The TMA kernel's mask uses int32 counters (int64 spills there): when row·cdiv(K,4) can
    pass 2^31 the masked dX GEMM goes to the pointer kernel, which indexes in int64 (BIG)."""
    launches = []

    class Record:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append(("ptr", kw["BIG"]))

    set_launch_options(monkeypatch, force_tma=True)
    monkeypatch.setattr(L, "_fused_matmul_tma", lambda *a: launches.append(("tma", a[8])))
    monkeypatch.setattr(L, "sorsa_mm_kernel", Record())
    m = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    for M in (1024, 2 ** 21 + 64):  # K = 4096: counters up to M·1024
        L.fused_matmul(m(M, 64), m(64, 4096).t(), m(M, 4096), x2=m(M, 16), w2=m(16, 4096).t(), seed=3, p=0.1,
             drop_out=True, drop_ld=4096)
    assert launches == [("tma", True), ("ptr", True)]


# --- one pass over dY for g and dB; dA/dB next to dX on a side stream -----------
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 16, 33])
def test_backward_one_and_two_passes_over_dy_vs_float64(one_pass, dtype, r, monkeypatch):
    """Both backward schedules against float64 with every launcher buffer poisoned (NaN): ragged
    M = 70 (2 m-slices under the interpreter), N = 40 (3 n-blocks: 3 partials of g), dropout p = 0.2
    replayed exactly, column-major B (strided operand)."""
    set_launch_options(monkeypatch, one_pass_dy=one_pass)
    real_empty, real_gdb = torch.empty, L.g_and_db
    monkeypatch.setattr(L.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan"))
                        if kw.get("dtype", torch.float32).is_floating_point else real_empty(*a, **kw))
    shapes = []
    monkeypatch.setattr(L, "g_and_db", lambda *a: (lambda gb: shapes.append((gb[0].shape, gb[1].shape)) or gb)(real_gdb(*a)))
    M, K, N, p = 70, 24, 40, 0.2
    o = operands((M,), K, N, r)
    o["B"] = o["B"].t().contiguous().t()
    check(o, dtype, p=p, mask=replay_mask(seed_of(11), M, K, p).double())
    if one_pass:
        assert shapes == [((3, M, r), (2, N, r))]  # split-N partials of g, split-M partials of dB
    else:
        assert shapes == []


def test_one_pass_rule_counts_bytes(monkeypatch):
    """The documented cost rule at the issue's shape on an H200 (132 SMs): bf16 N = 4096 reads dY
    once for r <= 17 and twice for r = 128; r above GDB_MAX_R never takes the one-pass kernel."""
    monkeypatch.setattr(_device, "num_sms", lambda device: 132)
    monkeypatch.setattr(L, "triton_interpret", lambda: False)  # the GPU's split-K depth
    dev = torch.device("cpu")
    picks = {r: L.one_pass_dy(8192, 4096, r, torch.bfloat16, dev) for r in (1, 16, 17, 18, 32, 64, 128)}
    assert picks == {1: True, 16: True, 17: True, 18: False, 32: False, 64: False, 128: False}
    assert L.one_pass_dy(8192, 64, 64, torch.bfloat16, dev)  # one n-block: no extra partials
    assert not L.one_pass_dy(8192, 64, 65, torch.bfloat16, dev)  # dB tile would not fit registers
    assert [L._gdb_block_n(r, False) for r in (1, 16, 17, 33, 64)] == [256, 256, 128, 64, 64]
    assert not L.one_pass_dy(0, 4096, 16, torch.bfloat16, dev)
    set_launch_options(monkeypatch, one_pass_dy=True)
    assert not L.one_pass_dy(64, 64, 128, torch.float32, dev)  # forcing never exceeds the cap


def test_backward_launch_sequence(monkeypatch):
    """Small r: g and dB in one gdb launch, then the scale kernel, dX and dA (dY is read by two
    kernels); large r: the split-K g shrink and a separate dB pass (dY read three times)."""
    from triton.runtime.interpreter import InterpretedFunction
    launches = []
    real_run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **kw: launches.append(self.fn.__name__) or real_run(self, *a, **kw))
    for r, want in ((8, ["sorsa_scale_kernel", "sorsa_gdb_kernel", "sorsa_scale_kernel", "sorsa_mm_kernel",
                         "sorsa_tn_kernel"]),
                    (70, ["sorsa_scale_kernel", "sorsa_mm_kernel", "sorsa_scale_kernel", "sorsa_mm_kernel",
                          "sorsa_tn_kernel", "sorsa_tn_kernel"])):
        o = operands((20,), 16, 24, r)
        x, W, A, S, B, dy = (o[k].float() for k in ("x", "W", "A", "S", "B", "dy"))
        y, xa = L.linear_fwd(x, W, A, S, B, None, 0.5, 0.0, None)
        launches.clear()
        L.linear_bwd(dy, x, W, A, S, B, xa, 0.5, 0.0, None, True)
        assert launches == want, r


def _fake_cuda_streams(monkeypatch, events, current):
    class FakeStream:
        def __init__(self, name, device_index=0):
            self.name, self.device_index = name, device_index

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    class StreamCtx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            current.append(self.s.name)

        def __exit__(self, *exc):
            current.pop()

    main = FakeStream("main")
    monkeypatch.setattr(L, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", StreamCtx)


def test_side_stream_forks_and_joins(monkeypatch):
    """The fork/join of :func:`side_stream` with CUDA's stream API faked (no GPU here): the fork
    is recorded on entry, ``run()`` makes the side stream current, the join happens on exit (also
    when the body raises), tensors kept from the side are recorded on the current stream; the
    side stream is made once per device."""
    events, current = [], ["main"]
    _fake_cuda_streams(monkeypatch, events, current)

    class FakeTensor:
        def record_stream(self, s):
            events.append(f"record on {s.name}")

    dev = torch.device("cuda", 0)
    for _ in range(2):
        events.clear()
        with L.side_stream(dev) as side:
            events.append(f"main work on {current[-1]}")
            with side.run():
                events.append(f"side work on {current[-1]}")
                t = side.keep(FakeTensor())
                side.keep(None)
        assert isinstance(t, FakeTensor)
        assert events == ["side waits main", "main work on main", "side work on side", "main waits side",
                          "record on main"]
    assert list(L._SIDE_STREAMS) == [0]
    events.clear()
    with pytest.raises(RuntimeError):
        with L.side_stream(dev) as side:
            raise RuntimeError("out of memory")
    assert events == ["side waits main", "main waits side"]
    # in line while capturing a CUDA graph, with overlap off, and off CUDA
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    events.clear()
    with L.side_stream(dev) as side:
        with side.run():
            assert side.keep(3) == 3
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    set_launch_options(monkeypatch, overlap=False)
    with L.side_stream(dev):
        pass
    with L.side_stream(torch.device("cpu")):
        pass
    assert events == []


@pytest.mark.parametrize("r", [8, 70])  # dB from the one-pass kernel; dB as a second pass on the side
def test_backward_forks_before_dx_so_da_db_overlap_it(monkeypatch, r):
    """The side stream must fork *before* the dX GEMM is queued, or dA/dB wait for
    dX. The real linear_bwd with CUDA streams faked: fork < dX (current stream) < dA/dB (side) < join."""
    events, current = [], ["main"]
    _fake_cuda_streams(monkeypatch, events, current)
    real_side, real_mm, real_tn = L.side_stream, L.fused_matmul, L.tn_matmul
    monkeypatch.setattr(L, "side_stream", lambda device: real_side(torch.device("cuda", 0)))
    monkeypatch.setattr(L, "fused_matmul", lambda *a, **kw: events.append(f"{'dX' if 'x2' in kw else 'shrink'} on "
                                                                f"{current[-1]}") or real_mm(*a, **kw))
    monkeypatch.setattr(L, "tn_matmul", lambda *a, **kw: events.append(f"tn on {current[-1]}") or real_tn(*a, **kw))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: events.append("record"), raising=False)
    o = operands((20,), 16, 24, r)
    x, W, A, S, B, dy = (o[k].float() for k in ("x", "W", "A", "S", "B", "dy"))
    y, xa = L.linear_fwd(x, W, A, S, B, None, 0.5, 0.0, None)
    events.clear()
    L.linear_bwd(dy, x, W, A, S, B, xa, 0.5, 0.0, None, True)
    fork, dx, join = events.index("side waits main"), events.index("dX on main"), events.index("main waits side")
    tns = [i for i, e in enumerate(events) if e.startswith("tn")]
    assert fork < dx < min(tns) and max(tns) < join
    assert all(events[i] == "tn on side" for i in tns) and len(tns) == (1 if r == 8 else 2)
    assert events[join + 1:] == ["record", "record"]


@pytest.mark.parametrize("tma", [False, True])
def test_strided_bias_and_s_are_read_by_their_strides(tma, monkeypatch):
    """bias = b2[::2] and S = S2[:, 0] are strided views; the kernels read vectors with unit
    stride, so the launcher must hand them contiguous copies (it read every other element)."""
    set_launch_options(monkeypatch, force_tma=tma)
    o = operands((37,), 40, 48, 5, seed=11)
    dt = torch.float16 if tma else torch.float32

    def go(backend, dtype, strided):
        x = o["x"].to(dtype).requires_grad_()
        A, B = (o[k].to(dtype).requires_grad_() for k in "AB")
        if strided:  # b2[::2] == b, S2[:, 0] == S, both non-contiguous leaves
            b2 = torch.stack([o["b"], -3 * o["b"]], 1).reshape(-1).to(dtype).requires_grad_()
            S2 = torch.stack([o["S"], 7 * o["S"] + 1], 1).to(dtype).requires_grad_()
            b, S = b2[::2], S2[:, 0]
            assert not b.is_contiguous() and not S.is_contiguous()
        else:
            b, S = (o[k].to(dtype).requires_grad_() for k in "bS")
        y = sorsa_linear(x, o["W"].to(dtype), A, S, B, 0.7, b, backend=backend)
        gx, gA, gS, gB, gb = torch.autograd.grad(y, (x, A, S, B, b), o["dy"].to(dtype))
        return [y.detach(), gx, gA, gS, gB, gb]

    ref = go("torch", torch.float64, False)
    lowp = go("torch", dt, False)
    got = go("triton", dt, True)
    for name, g, lp, r in zip(NAMES, got, lowp, ref):
        assert_tolerance(g, lp, r, name)


def test_expanded_or_overlapping_operands_never_back_a_tma_descriptor():
    base = torch.zeros(64, dtype=torch.float16)
    assert L._tma_operand(base.view(1, 64).expand(8, 64)) is None       # row stride 0 (expanded x)
    assert L._tma_operand(base.view(64, 1).expand(64, 8)) is None       # column stride 0
    over = torch.as_strided(torch.zeros(200, dtype=torch.float16), (8, 64), (16, 1))
    assert L._tma_operand(over) is None                                 # rows overlap
    assert L._tma_operand(torch.zeros(8, 64, dtype=torch.float16)) is True
    assert L._tma_operand(torch.zeros(64, 8, dtype=torch.float16).t()) is False


def test_flattened_tma_out_of_shared_memory_relaunches_nested_once(monkeypatch):
    """The flattened TMA variant leaves 3 KB of sm_90's shared memory (AOT): if a Triton update
    pushes it over, the launch raises OutOfResources before running; the launcher relaunches the
    nested loop (same result) and keeps doing so for that tile in this process."""
    from triton.runtime.errors import OutOfResources
    set_launch_options(monkeypatch, force_tma=True)
    monkeypatch.setattr(L, "_FLATTEN_TOO_BIG", set())
    real = L.sorsa_mm_tma_kernel
    flats = []

    class TooBigWhenFlat:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                flats.append(kw["FLATTEN"])
                if kw["FLATTEN"]:
                    raise OutOfResources(229416 + 8192, 232448, "shared memory")
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(L, "sorsa_mm_tma_kernel", TooBigWhenFlat())
    o = operands((40,), 32, 48, 4, seed=5)
    ref = run(lambda *a: sorsa_linear(*a[:5], 0.5, a[5], backend="torch"), o, torch.float64)
    lowp = run(lambda *a: sorsa_linear(*a[:5], 0.5, a[5], backend="torch"), o, torch.float16)
    with torch.no_grad():
        for _ in range(2):
            y = sorsa_linear(*(o[k].to(torch.float16) for k in ("x", "W", "A", "S", "B")), 0.5,
                             o["b"].to(torch.float16), backend="triton")
            assert_tolerance(y, lowp[0], ref[0], "y")
    assert flats == [True, False, False], flats  # one failed flattened launch, then nested only
    assert L._FLATTEN_TOO_BIG == {(16, 32, 16)}
