"""orthonormal_grad_ and ortho_loss on FSDP2 (``fully_shard``) models: 2 CPU ranks over gloo.

Adapters are DTensor shards; ``B`` (out × r, FSDP2's default Shard(0)) contributes an r × r
partial Gram, all-reduced; ``A`` (r × in, sharded along r) is all-gathered (see
sorsa_kernels/regularizer.py). Gradients are checked against the single-process result.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

SHAPES = [(16, 12, 4), (9, 30, 7), (33, 5, 3), (10, 10, 1)]  # (in, out, r); odd sizes: uneven shards


class Adapter(nn.Module):
    def __init__(self, k, n, r, g):
        super().__init__()
        self.sorsa_A = nn.Parameter(torch.linalg.qr(torch.randn(k, r, generator=g))[0].T.contiguous() + 0.05 * torch.randn(r, k, generator=g))
        self.sorsa_B = nn.Parameter(torch.linalg.qr(torch.randn(n, r, generator=g))[0].contiguous() + 0.05 * torch.randn(n, r, generator=g))

    def forward(self, x):
        return (x @ self.sorsa_A.T @ self.sorsa_B.T).square().mean()


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(Adapter(k, n, r, g) for k, n, r in SHAPES)

    def forward(self, xs):
        return sum(layer(x) for layer, x in zip(self.layers, xs))


def build(seed=0):
    return Net(seed)


def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, k, generator=g) for k, _, _ in SHAPES]


def _worker(rank, world, init_file, out_dir):
    import sorsa_kernels as sk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        ref = build()
        model = build()
        for mod in model.layers:
            fully_shard(mod, mesh=mesh)
        fully_shard(model, mesh=mesh)
        B0 = model.layers[0].sorsa_B
        assert isinstance(B0, DTensor) and B0.placements == (Shard(0),)
        gamma, lr = 0.3, 0.01
        # task loss first (FSDP reduce-scatters its grads; same data on both ranks), then the
        # regularizer in place, as sorsa 1.0.1
        model(inputs()).backward()
        ref(inputs()).backward()
        model.layers[1].sorsa_A.grad = None  # a missing grad is created as a DTensor shard
        ref.layers[1].sorsa_A.grad = None
        import sorsa_kernels.regularizer as R
        calls = []
        real = R._allreduce
        R._allreduce = lambda group, flat: (calls.append(flat.numel()), real(group, flat))
        v = sk.orthonormal_grad_(model, gamma, lr)
        R._allreduce = real
        # one all-reduce per step, of the B matrices' r × r partial Grams only (no gathering of B)
        assert calls == [sum(r * r for _, _, r in SHAPES)], calls
        vr = sk.orthonormal_grad_(ref, gamma, lr, backend="torch")
        torch.testing.assert_close(v, vr, rtol=1e-6, atol=0)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert isinstance(p.grad, DTensor), n
            gf = p.grad.full_tensor()
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-5, msg=n)
        # differentiable: loss + ortho_loss, through autograd, adds onto the same grads
        loss = sk.ortho_loss(model)
        (2.0 * loss).backward()
        lr_ = sk.ortho_loss(ref)
        (2.0 * lr_).backward()
        torch.testing.assert_close(loss.detach(), lr_.detach(), rtol=1e-6, atol=0)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            gf = p.grad.full_tensor()
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-5, msg=n)
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_cpu_ranks_gloo(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
