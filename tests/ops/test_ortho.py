"""Regularizer fast path and its scale/hygiene items: sk.ortho_loss vs the
reference's autograd in float64, PEFT-style inputs, no host sync, the cached device tables,
64-bit offsets, gamma validation, tf32x3 accuracy (emulated)."""
import math
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn

import sorsa_kernels as sk
from sorsa_kernels.ops.ortho.bench import ortho_bench_case
from sorsa_kernels.regularizer import PEFT_NAMES

from conftest import HAS_TRITON, KERNEL_DEVICE, needs_triton

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def mats_model(shapes, dtype=torch.float64, seed=0, names=("sorsa_A", "sorsa_B")):
    """Modules holding A-like (r × in) and B-like (out × r) near-orthonormal matrices."""
    g = torch.Generator().manual_seed(seed)
    m = nn.ModuleList()
    for k, n, r in shapes:
        mod = nn.Module()
        A = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))[0].T + 0.05 * torch.randn(r, k, generator=g, dtype=torch.float64)
        B = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0] + 0.05 * torch.randn(n, r, generator=g, dtype=torch.float64)
        setattr(mod, names[0], nn.Parameter(A.to(dtype)))
        setattr(mod, names[1], nn.Parameter(B.to(dtype)))
        m.append(mod)
    return m


SHAPES = [(16, 12, 4), (16, 12, 4), (9, 30, 7), (33, 5, 1), (70, 40, 37)]


def ref64(m, names=("sorsa_A", "sorsa_B"), squared=False):
    """sorsa 1.0.1's calc_ortho formula in float64, through autograd (a clone of ``m``)."""
    vals = []
    for n, p in m.named_parameters():
        if names[0] in n:
            e = p @ p.T - torch.eye(p.shape[0], dtype=p.dtype)
        elif names[1] in n:
            e = p.T @ p - torch.eye(p.shape[1], dtype=p.dtype)
        else:
            continue
        v = torch.linalg.matrix_norm(e)
        vals.append(v * v if squared else v)
    return torch.stack(vals).mean()


def cast_copy(m, dtype, device="cpu"):
    c = mats_model(SHAPES)  # same structure
    c.load_state_dict(m.state_dict())
    return c.to(device=device, dtype=dtype)


@pytest.mark.parametrize("squared", [False, True])
def test_ortho_loss_value_and_grad_vs_reference_float64(ref, backend_name, squared):
    m64 = mats_model(SHAPES)
    expect = ref64(m64, squared=squared)
    expect.backward()
    if not squared:  # the literal reference module agrees with the float64 formula
        torch.testing.assert_close(ref.calc_ortho(cast_copy(m64, torch.float64)), expect.detach())
    m = cast_copy(m64, torch.float32, KERNEL_DEVICE if backend_name == "triton" else "cpu")
    loss = sk.ortho_loss(m, squared=squared, backend=backend_name)
    assert loss.dim() == 0 and loss.requires_grad
    (3.0 * loss).backward()
    assert float(loss.detach()) == pytest.approx(expect.item(), rel=1e-5)
    for (n, p), q in zip(m.named_parameters(), m64.parameters()):
        torch.testing.assert_close(p.grad.cpu().double(), 3.0 * q.grad, rtol=1e-5, atol=1e-5 * q.grad.abs().max().item(), msg=n)


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


def test_ortho_loss_float64_exact_and_composes_with_task_loss():
    """float64 params: the torch path matches the reference to rounding; autograd adds
    the regularizer's gradient to the task gradient (and across accumulation steps)."""
    m = mats_model(SHAPES)
    m2 = mats_model(SHAPES)
    x = torch.randn(5, 16, dtype=torch.float64)
    for _ in range(2):  # gradient accumulation
        task = (x @ m[0].sorsa_A.T).square().sum()
        (task + 0.7 * sk.ortho_loss(m)).backward()
        task2 = (x @ m2[0].sorsa_A.T).square().sum()
        (task2 + 0.7 * ref64(m2)).backward()
    for p, q in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="found no adapters"):
        sk.ortho_loss(nn.Linear(2, 2))


def test_ortho_loss_peft_names_explicit_lists_and_frozen():
    m = mats_model(SHAPES, names=("lora_A", "lora_B"))
    expect = ref64(m, names=PEFT_NAMES)
    v1 = sk.ortho_loss(m, names=PEFT_NAMES)
    A = [p for n, p in m.named_parameters() if "lora_A" in n]
    B = [p for n, p in m.named_parameters() if "lora_B" in n]
    v2 = sk.ortho_loss(a=A, b=B)
    v3 = sk.ortho_loss(list(m.named_parameters()), names=PEFT_NAMES)
    for v in (v1, v2, v3):
        torch.testing.assert_close(v, expect, rtol=1e-12, atol=0)
    B[0].requires_grad_(False)  # frozen: counts in the mean, gets no gradient
    sk.ortho_loss(a=A, b=B).backward()
    assert B[0].grad is None and A[0].grad is not None
    with pytest.raises(ValueError, match=r"b\[0\] must be a 2-D"):
        sk.ortho_loss(b=[torch.zeros(3)])
    with pytest.raises(TypeError, match="names must be a pair"):
        sk.ortho_loss(m, names="lora")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gamma_nan_inf_rejected_everywhere(bad):
    m = mats_model(SHAPES[:1], dtype=torch.float32)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        sk.orthonormal_grad_(m, bad, 1e-3)
    assert all(p.grad is None for p in m.parameters())  # nothing poisoned
    with pytest.raises(ValueError, match="lr must be a finite number"):
        sk.orthonormal_grad_(m, 0.1, bad)
    net = nn.Sequential(nn.Linear(8, 8))
    net[0] = sk.SORSALinear(8, 8, r=2)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        sk.SORSARegularizer(net, bad, 1e-3)
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        sk.SORSACallback(bad)


def test_mixed_shapes_dtypes_poisoned_and_none_grads(backend_name):
    """bf16/fp16/fp32 adapters, some .grad None, some holding values (kept, added to), a
    frozen one; poisoned (NaN) new buffers must be fully overwritten."""
    dev = KERNEL_DEVICE if backend_name == "triton" else "cpu"
    m = mats_model(SHAPES, dtype=torch.float32)
    m[1].to(torch.bfloat16)
    m[2].to(torch.float16)
    m = m.to(dev)
    base = {}
    for i, (n, p) in enumerate(m.named_parameters()):
        if i % 2:
            p.grad = torch.randn_like(p)
            base[n] = p.grad.clone()
    m[4].sorsa_B.requires_grad_(False)
    m[4].sorsa_B.grad = None
    expect = {}
    for n, p in m.named_parameters():  # per matrix: float64 autograd of (gamma/lr)/N · reg_m
        q = p.detach().cpu().double().requires_grad_()
        e = q @ q.T - torch.eye(q.shape[0], dtype=q.dtype) if "sorsa_A" in n else q.T @ q - torch.eye(q.shape[1], dtype=q.dtype)
        (torch.linalg.matrix_norm(e) * (0.3 / 0.1) / 10).backward()
        expect[n] = q.grad
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    from sorsa_kernels.ops.ortho import launch as ortho_launch
    from unittest import mock
    with mock.patch.object(ortho_launch.torch, "empty", poisoned):
        sk.orthonormal_grad_(m, 0.3, 0.1, backend=backend_name)
    for n, p in m.named_parameters():
        if n == "4.sorsa_B":
            assert p.grad is None
            continue
        assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[p.dtype]
        got = p.grad.cpu().double() - base.get(n, torch.zeros(())).double()
        torch.testing.assert_close(got, expect[n], rtol=tol, atol=tol * (1 + base.get(n, torch.zeros(1)).abs().max().item()), msg=n)


def test_no_host_sync(backend_name, monkeypatch):
    """Neither orthonormal_grad_ nor ortho_loss (forward + backward) reads a tensor's value
    on the host: item/float/bool/int/tolist raise while they run."""
    dev = KERNEL_DEVICE if backend_name == "triton" else "cpu"
    m = mats_model(SHAPES, dtype=torch.float32).to(dev)
    # warm the plan caches (building them may read tables; the steady state must not)
    sk.orthonormal_grad_(m, 0.1, 1e-3, backend=backend_name)
    m.zero_grad(set_to_none=True)

    def boom(*a, **k):
        raise AssertionError("host sync")
    if backend_name == "triton" and dev == "cpu":
        pytest.skip("the Triton interpreter reads every tensor on the host by design")
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    v = sk.orthonormal_grad_(m, 0.1, 1e-3, backend=backend_name)
    loss = sk.ortho_loss(m, backend=backend_name)
    loss.backward()
    monkeypatch.undo()
    assert isinstance(v, torch.Tensor) and v.dim() == 0 and math.isfinite(float(v))


@needs_triton
def test_triton_table_cached_and_invalidated():
    from sorsa_kernels.ops.ortho import launch as ortho_launch
    m = mats_model(SHAPES, dtype=torch.float32).to(KERNEL_DEVICE)
    params = [p for p in m.parameters()]
    sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    plan = ortho_launch.get_plan(params, [False, True] * 5)
    uploads = []
    real_upload = ortho_launch._upload
    m.zero_grad(set_to_none=False)  # grads kept (zeroed in place): same pointers from now on
    sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    with mock.patch.object(ortho_launch, "_upload", lambda rows, dev: uploads.append(1) or real_upload(rows, dev)):
        m.zero_grad(set_to_none=False)
        sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
        assert ortho_launch.get_plan(params, [False, True] * 5) is plan  # unchanged parameters: no rebuild
        assert uploads == []  # grads at the same pointers: no re-upload

    def per_matrix_work(*a, **k):
        raise AssertionError("per-matrix Python work in a steady-state step")
    # steady state, grads kept or set to None: the hit path reads the grads in C-level passes
    # and never walks the matrices in Python (the table rows are precomputed)
    with mock.patch.object(ortho_launch, "_rl", per_matrix_work), \
            mock.patch.object(ortho_launch, "_grad_rows", per_matrix_work):
        sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
        m.zero_grad(set_to_none=True)
        sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
        m.zero_grad(set_to_none=True)
        sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    # new grads come from a fresh allocation every step: a carved grad someone still holds
    # is never overwritten (and the allocator tracks the buffer's stream use as any tensor's)
    m.zero_grad(set_to_none=True)
    sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    kept = m[0].sorsa_A.grad
    kept_val = kept.clone()
    m.zero_grad(set_to_none=True)
    sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    assert torch.equal(kept, kept_val) and m[0].sorsa_A.grad.data_ptr() != kept.data_ptr()
    # narrowed in place (same pointer, new shape: e.g. rank pruning through .data): rebuilt
    with torch.no_grad():
        m[1].sorsa_A.data = m[1].sorsa_A.data[:2]
    m.zero_grad(set_to_none=True)
    v = sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    assert ortho_launch.get_plan(params, [False, True] * 5) is not plan
    def torch_reference(v):  # the same (narrowed) adapters through the torch backend
        ref = mats_model(SHAPES, dtype=torch.float32)
        ref[1].sorsa_A = nn.Parameter(ref[1].sorsa_A.data[:2].clone())
        ref.load_state_dict({k: t.cpu() for k, t in m.state_dict().items()})
        vr = sk.orthonormal_grad_(ref, 1.0, 1.0, backend="torch")
        assert float(v) == pytest.approx(float(vr), rel=1e-5)
        return ref

    torch_reference(v)
    plan = ortho_launch.get_plan(params, [False, True] * 5)
    # parameters replaced (new storage; new Parameter object): rebuilt, and the math follows
    with torch.no_grad():
        m[2].sorsa_A.data = 2 * m[2].sorsa_A.data.clone()
    m[3].sorsa_B = nn.Parameter(m[3].sorsa_B.detach().t().contiguous().t())  # column-major now
    params = [p for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    v = sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    assert ortho_launch.get_plan(params, [False, True] * 5) is not plan
    ref = torch_reference(v)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-5, atol=1e-6)
    # grads moved between steps (fresh tensors with other strides): results still right
    for p, q in zip(m.parameters(), ref.parameters()):
        p.grad = torch.ones_like(p).t().contiguous().t() if p.shape[0] != p.shape[1] else torch.ones_like(p)
        q.grad = torch.ones_like(q)
    sk.orthonormal_grad_(m, 1.0, 1.0, backend="triton")
    sk.orthonormal_grad_(ref, 1.0, 1.0, backend="torch")
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="sparse memory map: interpreter only")
def test_triton_64bit_offsets_on_sparse_memmap(tmp_path):
    """An adapter whose rows sit past element 2³¹ (a strided view over a sparse memory map:
    no 8 GB allocated): the launcher switches to 64-bit offsets and the math is right."""
    from sorsa_kernels.ops.ortho import launch as ortho_launch
    r, L, stride = 3, 40, 2 ** 30 + 64
    n = (r - 1) * stride + L
    path = str(tmp_path / "big.bin")
    with open(path, "wb") as f:
        f.truncate(n * 4)
    base = torch.from_file(path, shared=True, size=n, dtype=torch.float32)
    A_view = base.as_strided((r, L), (stride, 1))
    g = torch.Generator().manual_seed(0)
    vals = torch.linalg.qr(torch.randn(L, r, generator=g))[0].T + 0.1 * torch.randn(r, L, generator=g)
    with torch.no_grad():
        A_view.copy_(vals)
    B = torch.linalg.qr(torch.randn(30, r, generator=g))[0] + 0.1 * torch.randn(30, r, generator=g)
    A = nn.Parameter(A_view)
    Bp = nn.Parameter(B.clone())
    plan = ortho_launch.TritonPlan([A, Bp], [False, True])
    assert [gr.i64 for gr in plan.groups if gr.idx == [0]] == [True]
    assert [gr.i64 for gr in plan.groups if gr.idx == [1]] == [False]
    v = sk.orthonormal_grad_([("sorsa_A", A), ("sorsa_B", Bp)], 1.0, 1.0, backend="triton")
    Ac, Bc = nn.Parameter(vals.clone()), nn.Parameter(B.clone())
    vr = sk.orthonormal_grad_([("sorsa_A", Ac), ("sorsa_B", Bc)], 1.0, 1.0, backend="torch")
    assert float(v) == pytest.approx(float(vr), rel=1e-5)
    torch.testing.assert_close(A.grad, Ac.grad, rtol=1e-5, atol=1e-6)
    del A, A_view, base
    os.remove(path)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to tf32 (10-bit mantissa, nearest, ties away: cvt.rna.tf32.f32)."""
    i = x.view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Triton's tf32x3: a_hi·b_hi + a_hi·b_lo + a_lo·b_hi, tf32 products, fp32 accumulation
    (products of tf32 numbers are exact in fp64, summed and rounded to fp32)."""
    ah, bh = _tf32(a), _tf32(b)
    al, bl = _tf32(a - ah), _tf32(b - bh)
    return (ah.double() @ bl.double() + al.double() @ bh.double() + ah.double() @ bh.double()).float()


@pytest.mark.parametrize("r,L", [(128, 4096), (16, 1376)])
def test_tf32x3_accuracy_holds_for_fp32_adapters(r, L):
    """The fp32 path's split products, emulated: gradient within 1e-5 relative of float64
    (the ≤ 1e-5 bar of the fused regularizer), as good as true fp32 products to a small factor."""
    g = torch.Generator().manual_seed(r)
    A = (torch.linalg.qr(torch.randn(L, r, generator=g, dtype=torch.float64))[0].T
         + 0.01 * torch.randn(r, L, generator=g, dtype=torch.float64)).float()
    A64 = A.double()
    E64 = A64 @ A64.T - torch.eye(r, dtype=torch.float64)
    G64 = E64 @ A64 / torch.linalg.matrix_norm(E64)
    E = _mm_tf32x3(A, A.T) - torch.eye(r)
    G = _mm_tf32x3(E, A) / torch.linalg.matrix_norm(E)
    Ef = A @ A.T - torch.eye(r)
    Gf = (Ef @ A) / torch.linalg.matrix_norm(Ef)
    err = ((G.double() - G64).abs().max() / G64.abs().max()).item()
    err_fp32 = ((Gf.double() - G64).abs().max() / G64.abs().max()).item()
    assert err <= 1e-5, err
    assert err <= 4 * err_fp32 + 1e-7, (err, err_fp32)


def test_bench_case_builds_the_goal_shape_and_its_callables_agree():
    c = ortho_bench_case(layers=1, d=32, h=48, r=4)
    assert len(c["params"]) == 14 and c["nbytes"] > 0
    c["reference"]()
    want = [p.grad.clone() for p in c["params"]]
    c["ours[torch]"]()
    for p, w in zip(c["params"], want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    full = ortho_bench_case(layers=32, d=8, h=8, r=2)  # the goal's count: 32 × 7 layers × (A, B)
    assert len(full["params"]) == 448


@needs_triton
def test_regularizer_kernels_launch_on_the_adapters_device(monkeypatch):
    """Both phases open a device guard for the adapters' device around their launches, so a
    model on cuda:1 is not launched on the current device (cuda:0)."""
    from sorsa_kernels import _device
    from sorsa_kernels.ops.ortho import launch as O
    entered, real = [], _device.device_guard

    def guard(dev):
        entered.append(dev)
        return real(dev)
    monkeypatch.setattr(_device, "device_guard", guard)
    m = mats_model([(20, 12, 6)], dtype=torch.float32)
    mats = [p.detach().to(KERNEL_DEVICE).requires_grad_() for p in m.parameters()]
    norms, state = O.ortho_triton_forward(mats, [False, True])
    O.ortho_triton_backward(mats, state, torch.ones_like(norms), inplace=False)
    assert entered == [mats[0].device] * 2
