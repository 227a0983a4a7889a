"""backend="auto" on CUDA: timed fused-vs-torch choice per shape bucket, cached on disk.
Runs on the CPU with an injected fake timer; CUDA device queries are faked. Covers the
memory check before timing and out-of-memory while timing, train vs inference keys,
ranks deciding alone without collectives (2 CPU ranks over gloo), interleaved rounds with median/spread."""
import json
import math
import os

import pytest
import torch

from sorsa_kernels import _autotune, _backend
from sorsa_kernels.ops.linear import autotune as linear_autotune

OP = "sorsa_linear"
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(_autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(_autotune.ENV_AUTOTUNE, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    # tests that fake a CUDA device: the dispatcher forks that device's RNG around timing
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: None)
    # the timing logic is tested alone (fast); the verification has its own tests below
    monkeypatch.setattr(_autotune, "VERIFY", False)
    _autotune.clear()
    prev = _autotune.set_timer(None)
    yield tmp_path
    _autotune.set_timer(prev)
    _autotune.clear()


class FakeTimer:
    """Returns fixed ms per candidate (or the next of a list per call) and records the calls;
    runs nothing unless told to."""

    def __init__(self, ms, run=False):
        self.ms, self.run, self.calls = ms, run, []

    def __call__(self, name, fn):
        self.calls.append(name)
        if self.run:
            fn()
        v = self.ms[name]
        return v.pop(0) if isinstance(v, list) else v


def _case(M=1000, K=64, N=48, r=4, p=0.0, bias=True, dtype=torch.float32, train=None, device="cpu"):
    x = torch.empty(M, K, dtype=dtype, device=device).normal_()
    w, A = torch.empty(N, K, dtype=dtype, device=device).normal_(), torch.empty(r, K, dtype=dtype, device=device)
    b = torch.zeros(N, dtype=dtype, device=device) if bias else None
    return lambda: linear_autotune.linear_case(x, w, A, b, p, train=train)


def _disk(tmp):
    path = tmp / _autotune.CACHE_FILE
    return json.loads(path.read_text())["entries"] if path.exists() else {}


def _needs_triton():
    if "triton" not in _backend.available_backends(OP):
        pytest.skip("triton not installed: no fused candidate")


@pytest.mark.parametrize("fast", ["triton", "torch"])
def test_faster_candidate_is_chosen(fast):
    _needs_triton()
    t = FakeTimer({"triton": 1.0 if fast == "triton" else 3.0, "torch": 2.0})
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, _case()) == fast
    assert t.calls == ["triton", "torch"] * _autotune.ROUNDS, "interleaved rounds"


def test_decision_cached_on_disk_and_reused(isolated):
    _needs_triton()
    t = FakeTimer({"triton": 5.0, "torch": 2.0})
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch"
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch"
    assert len(t.calls) == 2 * _autotune.ROUNDS, "timed once per key"
    (key, entry), = _disk(isolated).items()
    assert entry["choice"] == "torch" and entry["ms"] == {"triton": 5.0, "torch": 2.0}
    assert entry["spread_ms"] == {"triton": 0.0, "torch": 0.0} and entry["unclear"] is False
    assert "FakeGPU H200" in key and "arch=9x0" in key and torch.__version__ in key and "sorsa_kernels" in key
    # a fresh process state reads the file instead of timing again
    _autotune.clear()
    _autotune.set_timer(FakeTimer({}))  # KeyError if it were called
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch"
    rep = _autotune.report()
    assert len(rep) == 1 and rep[0]["choice"] == "torch" and rep[0]["M"] == 1024 and rep[0]["bias"] is True
    assert rep[0]["persisted"] is True


def test_env_var_skips_timing_and_always_fuses(monkeypatch, isolated):
    _needs_triton()
    monkeypatch.setenv(_autotune.ENV_AUTOTUNE, "0")
    t = FakeTimer({"triton": 9.0, "torch": 1.0})
    _autotune.set_timer(t)
    called = []
    assert _backend.choose(OP, "auto", CUDA, lambda: called.append(1)) == "triton"
    assert not t.calls and not called and not (isolated / _autotune.CACHE_FILE).exists()


def test_buckets_separate_shapes():
    _needs_triton()
    t = FakeTimer({"triton": 1.0, "torch": 2.0})
    _autotune.set_timer(t)
    for case in (_case(M=1000), _case(M=1024), _case(M=600)):  # one bucket (1024)
        _backend.choose(OP, "auto", CUDA, case)
    assert len(t.calls) == 2 * _autotune.ROUNDS
    for case in (_case(M=2000), _case(K=80), _case(p=0.1), _case(bias=False), _case(dtype=torch.float16),
                 _case(train=True)):
        _backend.choose(OP, "auto", CUDA, case)
    assert len(t.calls) == 14 * _autotune.ROUNDS, "M bucket, K, dropout, bias, dtype, train: own decisions"
    assert len(_autotune.report()) == 7
    assert [_autotune.bucket(m) for m in (0, 1, 16, 17, 1000, 1024, 1025)] == [16, 16, 16, 32, 1024, 1024, 2048]


def test_forced_backend_and_cpu_bypass_the_dispatcher():
    t = FakeTimer({})
    _autotune.set_timer(t)
    boom = lambda: (_ for _ in ()).throw(AssertionError("case built"))  # noqa: E731
    assert _backend.choose(OP, "torch", CUDA, boom) == "torch"
    if "triton" in _backend.available_backends(OP):
        assert _backend.choose(OP, "triton", CUDA, boom) == "triton"
    assert _backend.choose(OP, "auto", torch.device("cpu"), boom) == "torch"
    assert not t.calls and _autotune.report() == []


def test_failing_candidate_falls_back_to_torch():
    """The fused candidate raises while being set up (e.g. out of memory, a compile error): torch
    is chosen and the error recorded; the torch candidate's real fwd+bwd thunk runs."""
    _needs_triton()
    fields, bench, *_ = _case(M=40, K=24, N=16, r=3, p=0.1, train=True)()

    def flaky(name):
        if name == "triton":
            raise RuntimeError("fused launch failed")
        return bench(name)
    t = FakeTimer({"triton": 0.1, "torch": 2.0}, run=True)
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, lambda: (fields, flaky)) == "torch"
    (entry,) = _autotune.report()
    assert entry["errors"] == {"triton": "RuntimeError: fused launch failed"} and entry["ms"] == {"torch": 2.0}
    assert entry["persisted"] is True, "a deterministic failure (not out of memory) is remembered"


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_timing_works_when_the_call_comes_without_grad(ctx):
    """A training key decided during a no-grad call (e.g. a validation step run first) must not
    make the fwd+bwd timing fail (and cache a wrong choice)."""
    _needs_triton()
    fields, bench, *_ = _case(M=40, K=24, N=16, r=3, train=True)()
    _autotune.set_timer(FakeTimer({"triton": 1.0, "torch": 2.0}, run=True))
    runs = lambda name: bench("torch")  # noqa: E731  (the fused thunk cannot run on CPU tensors)
    with ctx():
        assert _backend.choose(OP, "auto", CUDA, lambda: (fields, runs)) == "triton"
    assert _autotune.report()[0]["errors"] == {}


def test_nan_timing_is_never_chosen_and_ties_fuse():
    _needs_triton()
    _autotune.set_timer(FakeTimer({"triton": math.nan, "torch": 2.0}))
    assert _backend.choose(OP, "auto", CUDA, _case(M=100)) == "torch"
    _autotune.set_timer(FakeTimer({"triton": 2.0, "torch": 2.0}))
    assert _backend.choose(OP, "auto", CUDA, _case(M=5000)) == "triton"


def test_no_timing_while_tracing(monkeypatch):
    _needs_triton()
    t = FakeTimer({"triton": 9.0, "torch": 1.0})
    _autotune.set_timer(t)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "triton"
    assert not t.calls and _autotune.report() == []


def test_sorsa_linear_compiles_fullgraph_on_cpu():
    from sorsa_kernels.ops.linear import sorsa_linear
    x, w, A, S, B = torch.randn(8, 6), torch.randn(5, 6), torch.randn(2, 6), torch.rand(2), torch.randn(5, 2)
    f = torch.compile(lambda *a: sorsa_linear(*a, backend="auto"), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w, A, S, B), sorsa_linear(x, w, A, S, B, backend="torch"))


def test_describe_says_triton_cannot_run_without_gpu():
    d = _backend.describe()
    assert d[OP]["cpu"] == "torch"
    if not torch.cuda.is_available() and not _backend.triton_interpret() and _backend.triton_status()[0]:
        ok, why = _backend.triton_runtime_status()
        assert not ok and "no CUDA GPU" in why
        assert d[OP]["cuda"] == "no CUDA device visible" and "cannot run" in d[OP]["triton"]


def test_choose_traces_under_fullgraph_compile_for_a_cuda_device():
    # decide() once took a threading lock before checking is_compiling, which dynamo
    # cannot trace; a real fullgraph trace through choose() for a CUDA device must not break.
    _needs_triton()
    t = FakeTimer({"triton": 9.0, "torch": 1.0})
    _autotune.set_timer(t)

    def f(x):
        impl = _backend.choose(OP, "auto", CUDA, _case())
        return x + (1.0 if impl == "triton" else 2.0)

    out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(3))
    assert out.tolist() == [1.0, 1.0, 1.0] and not t.calls


def test_compiled_graph_takes_the_decision_an_eager_call_cached(isolated):
    """Under torch.compile nothing is timed: fields decided by eager calls (torch, here) are a
    constant of the graph, also when the decision comes from another process's file; fields
    never timed take the fused path and record nothing; buckets that disagree fuse."""
    _needs_triton()
    t = FakeTimer({"triton": 9.0, "torch": 1.0})
    _autotune.set_timer(t)
    seen, other_m, unseen = _case(M=1000), _case(M=5000), _case(M=1000, N=40)
    assert _backend.choose(OP, "auto", CUDA, seen) == "torch"  # eager: timed, persisted
    calls = len(t.calls)

    def graph(case):
        def f(x):
            impl = _backend.choose(OP, "auto", CUDA, case)
            return x + (1.0 if impl == "triton" else 2.0)
        torch._dynamo.reset()
        return torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).tolist()
    assert graph(seen) == [2.0, 2.0]
    assert graph(other_m) == [2.0, 2.0]  # the row count is left open under a trace
    _autotune.clear()  # a new process: the decision is read from disk
    assert graph(seen) == [2.0, 2.0]
    assert graph(unseen) == [1.0, 1.0]
    assert len(t.calls) == calls and len(_autotune.report()) == 1
    _autotune.set_timer(FakeTimer({"triton": 1.0, "torch": 9.0}))
    assert _backend.choose(OP, "auto", CUDA, other_m) == "triton"  # another bucket decides otherwise
    assert graph(seen) == [1.0, 1.0]  # buckets disagree: fused


def test_dynamic_row_count_compiles_once_and_takes_the_cached_choice(isolated):
    """With dynamic shapes the row count is symbolic: no bucket is read from it (that would add
    a guard and a recompile per bucket, or fail on older torch), the graph compiles once for
    every M above the decode rule and carries the cached choice."""
    _needs_triton()
    _autotune.set_timer(FakeTimer({"triton": 9.0, "torch": 1.0}))
    # parameters, as in a model: dynamo keeps their shapes static under dynamic=True
    w, A = torch.nn.Parameter(torch.randn(48, 64)), torch.nn.Parameter(torch.randn(4, 64))
    assert _backend.choose(OP, "auto", CUDA, lambda: linear_autotune.linear_case(
        torch.randn(1000, 64), w, A, None, 0.0, train=True)) == "torch"
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        impl = _backend.choose(OP, "auto", CUDA, lambda: linear_autotune.linear_case(x, w, A, None, 0.0, train=True))
        return x.sum() + (1.0 if impl == "triton" else 2.0)
    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=True, backend=count)
    for M in (100, 1000, 3000):
        x = torch.zeros(M, 64)
        assert g(x).item() == 2.0
    assert len(graphs) == 1


def test_timing_runs_on_the_tensors_device(monkeypatch):
    # do_bench's events/sync act on the current device; a layer on cuda:1 must be
    # timed with cuda:1 current.
    _needs_triton()
    entered = []

    class FakeDeviceGuard:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(str(self.dev))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    _autotune.set_timer(lambda name, fn: seen.append(list(entered)) or {"triton": 1.0, "torch": 2.0}[name])
    assert _backend.choose(OP, "auto", torch.device("cuda", 1), _case()) == "triton"
    assert seen == [["cuda:1"]] * (2 * _autotune.ROUNDS)


# ---------------------------------------------------------------- device memory
GIB = 1 << 30


def test_bench_that_does_not_fit_is_not_timed_and_stays_in_memory(monkeypatch, isolated):
    """A 128k-vocab lm_head at M = 16k (bf16, training) needs GiBs for a second set of x, dy, y,
    dx: with 20 GiB free it is not timed, the fused path runs, and the decision is not written
    to disk (not even when another key is persisted later)."""
    _needs_triton()
    monkeypatch.setattr(_autotune, "free_bytes", lambda dev: 20 * GIB)
    t = FakeTimer({"triton": 5.0, "torch": 1.0})
    _autotune.set_timer(t)
    big = _case(M=16384, K=4096, N=128256, r=16, dtype=torch.bfloat16, train=True, device="meta")
    fields, _, need, *_ = big()
    assert need > 12 * GIB
    assert _backend.choose(OP, "auto", CUDA, big) == "triton" and not t.calls
    (entry,) = _autotune.report()
    assert entry["reason"].startswith(f"not timed: needs {need / 2 ** 20:.0f} MiB, 20480 MiB free")
    assert entry["persisted"] is False and not _disk(isolated)
    assert _backend.choose(OP, "auto", CUDA, big) == "triton" and not t.calls, "remembered in this process"
    # a small key fits and is timed; saving it must not write the big key's volatile decision
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch" and len(t.calls) == 2 * _autotune.ROUNDS
    assert [e["M"] for e in _disk(isolated).values()] == [1024]
    # the next process decides the big key again
    _autotune.clear()
    monkeypatch.setattr(_autotune, "free_bytes", lambda dev: 80 * GIB)
    assert _backend.choose(OP, "auto", CUDA, big) == "torch"


def test_bench_bytes_cover_the_big_tensors():
    """The estimate counts x, w, y and (training) dy, dx in the real dtype plus the torch path's
    (M, N) / (M, K) intermediates; dropout adds the mask's copies; inference needs less."""
    M, K, N, r = 4096, 1024, 8192, 16
    est = lambda dt, p, train: linear_autotune.linear_bench_bytes(M, K, N, r, dt, torch.float32, True, p, train)  # noqa: E731
    for dt, e in ((torch.bfloat16, 2), (torch.float32, 4)):
        floor = (M * K + N * K + 2 * M * N + M * K) * e  # x, w, y, dy, dx
        assert est(dt, 0.0, True) >= floor + M * N * e  # + addmm's second output
        assert est(dt, 0.0, False) >= (M * K + N * K + 2 * M * N) * e
        assert est(dt, 0.0, False) < est(dt, 0.0, True) < est(dt, 0.1, True)
    assert est(torch.float32, 0.0, True) > est(torch.bfloat16, 0.0, True)


@pytest.mark.parametrize("p,train", [(0.0, True), (0.1, True), (0.0, False), (0.1, False)])
def test_bench_bytes_match_the_torch_candidates_measured_peak(p, train):
    """The estimate against the allocator's running peak while the real torch thunk (the
    candidate with the larger intermediates) runs twice on the CPU, inputs included: never
    below it, and not so far above that a bench that fits would be skipped."""
    from torch.profiler import ProfilerActivity, profile
    dt, (M, K, N, r) = torch.float32, (512, 384, 1024, 8)
    fields, bench, need, *_ = _case(M=M, K=K, N=N, r=r, p=p, train=train)()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        thunk = bench("torch")
        thunk()
        thunk()
        del thunk
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    est = need - (32 << 20)  # without the workspace allowance
    assert live == 0, "the bench frees everything it allocated"
    assert peak <= est + 64 <= 1.3 * peak, (peak, est)  # 64 B: the dropout seed and such scalars


@pytest.mark.parametrize("on_cuda", [True, False])
def test_out_of_memory_while_timing_empties_cache_and_is_not_persisted(monkeypatch, isolated, on_cuda):
    _needs_triton()
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(_autotune, "free_bytes", lambda dev: None)  # cannot say: time anyway
    if on_cuda:  # a visible GPU: the device guard is entered, the allocator's cache emptied
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device", lambda dev: __import__("contextlib").nullcontext())

    def timer(name, fn):
        if name == "triton":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return 2.0
    _autotune.set_timer(timer)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch"
    (entry,) = _autotune.report()
    assert entry["errors"]["triton"].startswith("OutOfMemoryError: CUDA out of memory")
    assert entry["persisted"] is False and not _disk(isolated)
    assert emptied == ([1] if on_cuda else []), "empty_cache once, and only on CUDA"
    _autotune.clear()  # the next process times it again
    _autotune.set_timer(FakeTimer({"triton": 1.0, "torch": 2.0}))
    assert _backend.choose(OP, "auto", CUDA, _case()) == "triton"


def test_both_candidates_out_of_memory_takes_the_leaner_fused_path(isolated):
    _needs_triton()

    def timer(name, fn):
        raise torch.OutOfMemoryError("CUDA out of memory")
    _autotune.set_timer(timer)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "triton"
    assert _autotune.report()[0]["persisted"] is False and not _disk(isolated)


# ---------------------------------------------------------------- train vs inference
def test_train_and_inference_keys_are_separate_and_inference_times_forward_only(monkeypatch):
    _needs_triton()
    backwards = []
    real_backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: backwards.append(1) or real_backward(*a, **k))
    got = {}
    for train, ms in ((True, {"triton": 3.0, "torch": 1.0}), (False, {"triton": 1.0, "torch": 3.0})):
        fields, bench, *_ = _case(M=40, K=24, N=16, r=3, p=0.1, train=train)()
        backwards.clear()
        _autotune.set_timer(FakeTimer(ms, run=True))
        # the fused thunk cannot run on CPU tensors: both candidates run the torch thunk
        got[train] = _backend.choose(OP, "auto", CUDA, lambda: (fields, lambda name: bench("torch")))
        assert len(backwards) == (2 * _autotune.ROUNDS if train else 0), "fwd+bwd only for training keys"
    assert got == {True: "torch", False: "triton"}, "an inference call does not reuse the training decision"
    rep = _autotune.report()
    assert sorted(e["train"] for e in rep) == [False, True] and len({e["key"] for e in rep}) == 2


def test_inference_thunk_runs_without_a_graph():
    fields, bench, *_ = _case(M=40, K=24, N=16, r=3, train=False)()
    seen = []
    real = torch.Tensor.backward
    thunk = bench("torch")
    torch.Tensor.backward = lambda *a, **k: seen.append(1)  # noqa: E731
    try:
        with torch.enable_grad():
            thunk()
    finally:
        torch.Tensor.backward = real
    assert not seen and fields["train"] is False


def test_sorsa_linear_tells_the_dispatcher_whether_a_backward_follows(monkeypatch):
    """train = grad enabled and any of x, weight, A, S, B (bias) requires grad."""
    from sorsa_kernels.ops import linear as L
    seen = []

    def spy(op, backend, device, case=None, dtype=None):
        seen.append(case()[0]["train"])
        return "torch"
    monkeypatch.setattr(_backend, "choose", spy)
    M = linear_autotune.DECODE_M + 1  # above the decode rule, which decides without a case
    x, w, A, S, B = torch.randn(M, 6), torch.randn(4, 6), torch.randn(2, 6), torch.rand(2), torch.randn(4, 2)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    L.sorsa_linear(x, w, grad(A), grad(S), grad(B))
    with torch.no_grad():
        L.sorsa_linear(x, w, grad(A), grad(S), grad(B))
    with torch.inference_mode():
        L.sorsa_linear(x, w, A, S, B)
    L.sorsa_linear(x, w, A, S, B)  # nothing trains
    L.sorsa_linear(x, w, A, grad(S), B)  # only S trains
    L.sorsa_linear(x, w, A, S, grad(B))  # only B trains
    L.sorsa_linear(grad(x), w, A, S, B)  # a later layer: x carries a graph
    assert seen == [True, False, False, False, True, True, True]


# ---------------------------------------------------------------- noise
def test_noisy_winner_is_unclear_fuses_and_is_not_persisted(isolated):
    """One fast torch sample (1.0 among 3.0, 3.0) decided everything before; the medians 2.0 vs
    3.0 differ by less than torch's spread (2.0): unclear, the fused path, not on disk."""
    _needs_triton()
    t = FakeTimer({"triton": [2.0, 2.1, 2.0], "torch": [1.0, 3.0, 3.0]})
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "triton"
    assert t.calls == ["triton", "torch"] * 3
    (entry,) = _autotune.report()
    assert entry["unclear"] is True and entry["ms"] == {"triton": 2.0, "torch": 3.0}
    assert entry["spread_ms"] == pytest.approx({"triton": 0.1, "torch": 2.0})
    assert entry["persisted"] is False and not _disk(isolated)


def test_clear_winner_is_persisted_with_median_and_spread(isolated):
    _needs_triton()
    _autotune.set_timer(FakeTimer({"triton": [2.0, 2.2, 2.1], "torch": [1.2, 1.0, 1.1]}))
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch"
    (entry,) = _disk(isolated).values()
    assert entry["unclear"] is False and entry["ms"] == {"triton": 2.1, "torch": 1.1}
    assert entry["spread_ms"] == pytest.approx({"triton": 0.2, "torch": 0.2})


def test_candidate_failing_in_a_later_round_is_never_chosen():
    _needs_triton()

    class Flaky(FakeTimer):
        def __call__(self, name, fn):
            if name == "torch" and self.calls.count("torch") == 1:
                self.calls.append(name)
                raise RuntimeError("sporadic")
            return super().__call__(name, fn)
    t = Flaky({"triton": 5.0, "torch": 1.0})
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "triton"
    assert t.calls == ["triton", "torch", "triton", "torch", "triton"], "a failed candidate is not timed again"


# ---------------------------------------------------------------- distributed ranks
def _rank_worker(rank, world, init_file, out_dir):
    from datetime import timedelta

    import torch.distributed as dist
    os.environ[_autotune.ENV_CACHE_DIR] = os.path.join(out_dir, f"cache{rank}")  # per-rank disks
    os.environ.pop(_autotune.ENV_AUTOTUNE, None)
    torch.cuda.get_device_name = lambda *a: "FakeGPU H200"
    torch.cuda.get_device_capability = lambda *a: (9, 0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        def no_collective(*a, **k):
            raise AssertionError("the dispatcher issued a collective")
        for name in ("broadcast_object_list", "broadcast", "all_gather_object", "all_reduce", "barrier"):
            setattr(dist, name, no_collective)
        # rank 1's timing prefers the other candidate, and its rows fall in another M bucket
        # (per-rank dynamic padding): a collective here would pair mismatched keys or hang
        t = FakeTimer({"triton": 1.0, "torch": 2.0} if rank == 0 else {"triton": 2.0, "torch": 1.0})
        _autotune.set_timer(t)
        M = 1000 if rank == 0 else 3000
        first = _backend.choose(OP, "auto", CUDA, _case(M=M))
        again = _backend.choose(OP, "auto", CUDA, _case(M=M))
        res = dict(choices=[first, again], timed=len(t.calls))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_ranks_decide_alone_without_collectives_two_gloo_ranks(tmp_path):
    """No collective inside a layer call (it would hang when ranks reach different keys): each
    rank times and caches its own choice, even with different M buckets per rank."""
    _needs_triton()
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["choices"] == ["triton"] * 2 and r1["choices"] == ["torch"] * 2
    assert r0["timed"] == r1["timed"] == 2 * _autotune.ROUNDS  # timed once, then cached


# ---------------------------------------------------------------- sorsa-kernels info
def test_info_prints_the_decisions(monkeypatch, isolated, capsys):
    _needs_triton()
    from sorsa_kernels import cli
    # an entry as an older version wrote it (no spread, no train) must still print
    old = {"op": OP, "choice": "torch", "ms": {"triton": 3.0, "torch": 2.0}, "errors": {}, "M": 64, "K": 8,
           "N": 8, "r": 2, "dtype": "float16", "adapter_dtype": "float32", "dropout": False, "bias": False}
    (isolated / _autotune.CACHE_FILE).write_text(json.dumps({"version": 1, "entries": {"old-key": old}}))
    _autotune.set_timer(FakeTimer({"triton": 1.0, "torch": 2.0}))
    _backend.choose(OP, "auto", CUDA, _case(train=True))
    _autotune.set_timer(FakeTimer({"triton": [2.0, 2.1, 2.0], "torch": [1.0, 3.0, 3.0]}))
    _backend.choose(OP, "auto", CUDA, _case(M=5000))
    monkeypatch.setattr(_autotune, "free_bytes", lambda dev: 2 * GIB)
    _backend.choose(OP, "auto", CUDA, _case(M=16384, K=4096, N=128256, dtype=torch.bfloat16, device="meta"))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(OP + " M=")]
    assert len(lines) == 4 and f"timed once per shape; {_autotune.cache_path()}): 4" in out
    timed, = (ln for ln in lines if "M=1024" in ln)
    assert "dtype=float32" in timed and "train=True" in timed and "-> triton (triton 1±0 ms, torch 2±0 ms)" in timed
    noisy, = (ln for ln in lines if "M=8192" in ln)
    assert "-> triton" in noisy and "unclear" in noisy and "this process only" in noisy and "±2" in noisy
    big, = (ln for ln in lines if "M=16384" in ln)
    assert "-> triton; not timed: needs" in big and "MiB free" in big
    legacy, = (ln for ln in lines if "M=64" in ln)
    assert legacy.endswith("-> torch (triton 3 ms, torch 2 ms)")


# --- timing inside the user's call leaves no trace in it --------------------------------------
_CASE = {}


def _timed_choice(p=0.1):
    """choose() for a fresh training key whose thunks really run (torch candidate for both: the
    fused thunk cannot run on CPU tensors), with dropout: each run draws a seed from the CPU RNG.
    The case's own tensors are made once, outside the caller's RNG stream."""
    if p not in _CASE:
        with torch.random.fork_rng():
            _CASE[p] = _case(M=40, K=24, N=16, r=3, p=p, train=True)()
    fields, bench, *_ = _CASE[p]
    _autotune.set_timer(FakeTimer({"triton": 1.0, "torch": 2.0}, run=True))
    return _backend.choose(OP, "auto", CUDA, lambda: (fields, lambda name: bench("torch")))


def test_timing_does_not_move_the_rng():
    """manual_seed(3); y1 = m(x); manual_seed(3); y2 = m(x) must agree on the first call of a
    shape too: the bench's dropout seeds come from the forked generator."""
    _needs_triton()
    with torch.random.fork_rng():
        _CASE.setdefault(0.1, _case(M=40, K=24, N=16, r=3, p=0.1, train=True)())
    torch.manual_seed(3)
    assert _timed_choice() == "triton"
    after_timing = torch.randint(0, 2 ** 31 - 1, (4,))
    torch.manual_seed(3)
    assert torch.equal(torch.randint(0, 2 ** 31 - 1, (4,)), after_timing)


def _step_with_choice(x):
    """A layer-like function: the choice (timed on its first call), then a dropout seed drawn
    from the CPU generator and used for the mask, as sorsa_linear does."""
    _timed_choice()
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    _step_with_choice.seeds.append(seed)
    g = torch.Generator().manual_seed(seed)
    return (x * (torch.rand(x.shape, generator=g) > 0.5)).sum()


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recompute_draws_the_forward_seed_and_timing_runs(reentrant):
    """Reentrant checkpointing restores the RNG before the recompute, which finds the key cached
    and skips the timing: the seed drawn there must equal the forward's (else another mask and a
    silently wrong gradient). Non-reentrant checkpointing's saved-tensor hooks must not reach the
    bench (they raised CheckpointError in both candidates, and torch was cached for the process)."""
    _needs_triton()
    from torch.utils.checkpoint import checkpoint
    _step_with_choice.seeds = []
    x = torch.randn(6, 5, requires_grad=True)
    torch.manual_seed(0)
    checkpoint(_step_with_choice, x, use_reentrant=reentrant).backward()
    assert len(_step_with_choice.seeds) == 2 and _step_with_choice.seeds[0] == _step_with_choice.seeds[1]
    (entry,) = _autotune.report()
    assert entry["errors"] == {} and entry["choice"] == "triton", entry
    # the gradient is the one of the mask the forward used
    g = torch.Generator().manual_seed(_step_with_choice.seeds[0])
    assert torch.equal(x.grad, (torch.rand(x.shape, generator=g) > 0.5).to(x.dtype))


def test_no_timing_while_a_cuda_graph_is_captured(monkeypatch, isolated):
    _needs_triton()
    t = FakeTimer({"triton": 5.0, "torch": 1.0})
    _autotune.set_timer(t)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "triton"
    assert t.calls == [] and _autotune.report() == [] and _disk(isolated) == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _backend.choose(OP, "auto", CUDA, _case()) == "torch"  # timed by the next eager call
    assert len(t.calls) == 2 * _autotune.ROUNDS


@pytest.mark.parametrize("M", [1, 8, linear_autotune.DECODE_M])
def test_decode_sized_rows_go_to_torch_by_rule_untimed(M, isolated):
    _needs_triton()
    t = FakeTimer({"triton": 0.1, "torch": 9.0})
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, _case(M=M)) == "torch"
    assert t.calls == [] and _autotune.report() == [] and _disk(isolated) == {}
    assert _backend.choose(OP, "auto", CUDA, _case(M=linear_autotune.DECODE_M + 1)) == "triton"  # timed above it
    assert _backend.choose(OP, "triton", CUDA, _case(M=M)) == "triton"  # a forced backend is obeyed


def test_selective_checkpoint_region_is_not_timed_and_grads_stay_right(isolated, monkeypatch):
    """Selective activation checkpointing is a torch dispatch mode that counts the op's calls: a
    bench run inside it shifted the recompute's cached outputs (dA off by 1e3). Inside any
    dispatch mode nothing is timed or recorded; the next plain call times the key."""
    _needs_triton()
    import functools
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    LIN, MM = torch.ops.sorsa_kernels.linear_fwd.default, torch.ops.aten.mm.default
    import sorsa_kernels.ops.linear.op as lin_op
    monkeypatch.setattr(lin_op, "_EAGER", False)  # the op itself, as on CUDA

    def policy(ctx, op, *a, **k):
        return CheckpointPolicy.MUST_SAVE if op in (LIN, MM) else CheckpointPolicy.PREFER_RECOMPUTE
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    W = torch.randn(48, 32, generator=g)
    A, S, B = (torch.randn(*s, generator=g, requires_grad=True) for s in ((4, 32), (4,), (48, 4)))
    t = FakeTimer({"triton": 2.0, "torch": 1.0}, run=True)
    _autotune.set_timer(t)

    def layer(x):
        # what sorsa_linear does on CUDA with backend="auto": choose() (timing on a miss), then the op
        _backend.choose(OP, "auto", CUDA, lambda: linear_autotune.linear_case(x, W, A, None, 0.0, train=True))
        from sorsa_kernels.ops import sorsa_linear
        return sorsa_linear(x, W, A, S, B, 0.5, backend="torch").relu().mm(torch.ones(48, 8)).square().sum()

    def grads(ckpt):
        for v in (x, A, S, B):
            v.grad = None
        ctx = functools.partial(create_selective_checkpoint_contexts, policy)
        (checkpoint(layer, x, use_reentrant=False, context_fn=ctx) if ckpt else layer(x)).backward()
        return [v.grad.clone() for v in (x, A, S, B)]
    with torch.random.fork_rng():
        sac = grads(True)                     # first call of the key, inside the SAC region
    assert t.calls == [] and _autotune.report() == []
    ref = grads(False)                        # plain eager: now it is timed
    assert len(t.calls) == 2 * _autotune.ROUNDS
    for a, b in zip(sac, ref):
        torch.testing.assert_close(a, b)


def test_torch_func_transform_call_is_not_timed():
    """torch.func.grad forbids saved-tensor hooks: timing (which shadows them) must not run there."""
    _needs_triton()
    t = FakeTimer({"triton": 2.0, "torch": 1.0})
    _autotune.set_timer(t)
    case = _case(M=40, K=24, N=16, r=3, train=True)

    def f(x):
        _backend.choose(OP, "auto", CUDA, case)
        return (x * 2).sum()
    torch.func.grad(f)(torch.randn(3))
    assert t.calls == [] and _autotune.report() == []


@pytest.mark.parametrize("view,layout", [
    (lambda b: b[:, :64].contiguous(), "rows16"),
    (lambda b: b.reshape(-1)[8:8 + 40 * 64].view(40, 64), "rows16"),    # offset by 16 bytes: still aligned
    (lambda b: b.reshape(-1)[1:1 + 40 * 64].view(40, 64), "rows"),      # offset view: unaligned start
    (lambda b: b[:, :64].t().contiguous().t(), "cols"),                  # column-major
    (lambda b: b[:, ::2], "strided"),
])
def test_x_layout_is_in_the_key_and_the_bench_copies_it(view, layout):
    """The fused path takes TMA/cp.async only for aligned row-major x; an offset view or a
    column-major x runs another program, so it is its own key and is timed on an x laid out
    the same way (it was timed on a contiguous x)."""
    _needs_triton()
    x = view(torch.randn(40, 128))
    assert x.shape == (40, 64) and linear_autotune.x_layout(x) == layout
    w, A = torch.randn(48, 64), torch.randn(4, 64)
    fields, bench, *_ = linear_autotune.linear_case(x, w, A, None, 0.0, train=False)
    assert fields["x_layout"] == layout
    thunk = bench("torch")
    cells = [c.cell_contents for c in thunk.__closure__]
    inputs, = (c for c in cells if isinstance(c, linear_autotune._LinearInputs))
    assert inputs.x.shape == (40, 64) and linear_autotune.x_layout(inputs.x) == layout
    keys = {_autotune.make_key(OP, dict(fields, x_layout=v), CUDA) for v in ("rows16", "rows", "cols", "strided")}
    assert len(keys) == 4


# --- verify while timing ------------------------------------------------------------------------
def test_fused_result_made_wrong_is_caught_before_timing_picks_torch_and_warns_once(isolated, monkeypatch):
    monkeypatch.setattr(_autotune, "VERIFY", True)
    """A fused candidate that computes a wrong y (one element off by 1) must never be chosen, however
    fast: the first timing of a key compares both candidates with a high-precision reference by the
    tolerance rule; a mismatch picks torch, is persisted, and warns once with what to report."""
    _needs_triton()
    from sorsa_kernels.ops.linear import op as OL
    real_fwd, real_bwd = OL._KERNELS["triton"]

    def wrong_fwd(*a):
        y, xa = real_fwd(*a)
        y = y.clone()
        y.view(-1)[7] += 1.0
        return y, xa
    monkeypatch.setitem(OL._KERNELS, "triton", (wrong_fwd, real_bwd))
    t = FakeTimer({"triton": 0.1, "torch": 9.0})
    _autotune.set_timer(t)
    with pytest.warns(RuntimeWarning, match=r"disagreed with the torch path.*y: max error.*torch .*triton .*M=64"):
        assert _backend.choose(OP, "auto", CUDA, _case(M=40, K=24, N=16, r=3, train=True)) == "torch"
    assert t.calls == [], "nothing is timed once the fused result is wrong"
    (key, entry), = _disk(isolated).items()
    assert entry["choice"] == "torch" and entry["errors"]["triton"].startswith("mismatch: y")
    _autotune.clear()  # a new process reads the decision from disk: no second warning, no timing
    import warnings as W
    with W.catch_warnings():
        W.simplefilter("error")
        assert _backend.choose(OP, "auto", CUDA, _case(M=40, K=24, N=16, r=3, train=True)) == "torch"


@pytest.mark.parametrize("train", [True, False])
def test_correct_fused_result_passes_verification_and_is_timed(train, monkeypatch):
    _needs_triton()
    monkeypatch.setattr(_autotune, "VERIFY", True)
    t = FakeTimer({"triton": 1.0, "torch": 2.0})
    _autotune.set_timer(t)
    assert _backend.choose(OP, "auto", CUDA, _case(M=40, K=24, N=16, r=3, p=0.1, train=train)) == "triton"
    assert len(t.calls) == 2 * _autotune.ROUNDS and _autotune.report()[0]["errors"] == {}


def test_fused_launch_error_during_verification_picks_torch(isolated, monkeypatch):
    monkeypatch.setattr(_autotune, "VERIFY", True)
    _needs_triton()
    from sorsa_kernels.ops.linear import op as OL

    def boom(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setitem(OL._KERNELS, "triton", (boom, OL._KERNELS["triton"][1]))
    _autotune.set_timer(FakeTimer({"triton": 0.1, "torch": 9.0}))
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        assert _backend.choose(OP, "auto", CUDA, _case(M=48, K=24, N=16, r=3, train=False)) == "torch"


def test_float64_never_reaches_the_fused_linear():
    """The fused kernels handle fp16/bf16/fp32; float64 gave garbage under the interpreter (caught
    by the verification above). auto runs torch for it, a forced backend says why."""
    _needs_triton()
    assert _backend.resolve(OP, "auto", CUDA, torch.float64) == "torch"
    assert _backend.resolve(OP, "auto", CUDA, torch.float32) == "triton"
    from sorsa_kernels.ops import sorsa_linear
    x, w, A, S, B = (torch.randn(*s, dtype=torch.float64) for s in ((5, 6), (4, 6), (2, 6), (2,), (4, 2)))
    with pytest.raises(RuntimeError, match="backend='triton' is not available for sorsa_linear with float64 inputs"):
        sorsa_linear(x, w, A, S, B, backend="triton")
    torch.testing.assert_close(sorsa_linear(x, w, A, S, B), sorsa_linear(x, w, A, S, B, backend="torch"))


def test_verification_sees_a_small_error_in_the_base_gemm(isolated, monkeypatch):
    """The verification's adapters are scaled as trained ones are, so the rank-r term does not
    hide an error in x·W_rᵀ (one 16-wide slice of K dropped at 10 %: caught)."""
    _needs_triton()
    monkeypatch.setattr(_autotune, "VERIFY", True)
    from sorsa_kernels.ops.linear import op as OL
    real_fwd, real_bwd = OL._KERNELS["triton"]

    def drops_a_k_slice(x, w, *rest):
        y, xa = real_fwd(x, w, *rest)
        return y - 0.1 * (x[:, :16] @ w[:, :16].t()), xa
    monkeypatch.setitem(OL._KERNELS, "triton", (drops_a_k_slice, real_bwd))
    _autotune.set_timer(FakeTimer({"triton": 0.1, "torch": 9.0}))
    with pytest.warns(RuntimeWarning, match="y: max error"):
        assert _backend.choose(OP, "auto", CUDA, _case(M=40, K=64, N=16, r=3, train=False)) == "torch"
