"""SVD init where weights are not whole tensors of one process.

Meta device: a model built on ``torch.device("meta")`` takes ``apply_sorsa(..., init=None)``; once
its base weights are loaded (``assign=True``, all at once or one layer at a time) ``init_layers``
decomposes them, equal bit for bit to initialising the real model; ``init=`` on meta weights is a
clear error. FSDP2 (2 CPU ranks over gloo): ``apply_sorsa`` runs before ``fully_shard`` (then the
sharded model computes what one process does), and on DTensor weights it is a clear error; with
``init=None`` before ``fully_shard``, ``init_layers`` on the sharded layers gathers each weight on
its owner only and equals a one-process init bit for bit (ragged shards, re-initialisation)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import sorsa_kernels as sk

DIMS = [48, 64, 48, 64, 40]
R = 4


def build():
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(a, b, bias=i % 2 == 0) for i, (a, b) in enumerate(zip(DIMS, DIMS[1:]))))


def targets():
    return [str(i) for i in range(len(DIMS) - 1)]


def x():
    return torch.randn(5, DIMS[0], generator=torch.Generator().manual_seed(1))


def test_meta_model_initialised_after_loading_equals_a_real_init():
    want = sk.apply_sorsa(build(), targets(), r=R, init="rsvd", seed=3)
    base = build().state_dict()
    for per_layer in (False, True):
        with torch.device("meta"):
            model = build()
        with pytest.raises(ValueError, match="meta device, so it cannot be decomposed: pass init=None"):
            sk.apply_sorsa(model, targets(), r=R, init="rsvd")
        sk.apply_sorsa(model, targets(), r=R, init=None)
        assert model[0].sorsa_A.is_meta
        if per_layer:  # as a loader that materialises one layer at a time
            for name, layer in model.named_children():
                own = {k.split(".", 1)[1]: v for k, v in base.items() if k.split(".", 1)[0] == name}
                layer.load_state_dict(own, strict=False, assign=True)
                sk.init_layers([layer], "rsvd", seed=3)
        else:
            model.load_state_dict(base, strict=False, assign=True)
            sk.init_layers(list(sk.sorsa_layers(model)), "rsvd", seed=3)
        got = model.state_dict()
        assert set(got) == set(want.state_dict())
        for k, v in want.state_dict().items():
            assert torch.equal(got[k], v), (per_layer, k)
        for a, b in zip(sk.sorsa_layers(model), sk.sorsa_layers(want)):
            assert all(torch.equal(s, t) for s, t in zip(a.initial_adapter(), b.initial_adapter()))
        torch.testing.assert_close(model(x()), build()(x()), rtol=1e-5, atol=1e-6)  # the function is the base's
    # a layer whose weight is still meta: a clear error, nothing changed
    with torch.device("meta"):
        unloaded = sk.apply_sorsa(build(), targets(), r=R, init=None)
    with pytest.raises(ValueError, match="cannot initialise SORSA adapters on the meta device"):
        sk.init_layers(list(sk.sorsa_layers(unloaded)), "rsvd", seed=3)
    assert unloaded[0].sorsa_A.is_meta


def _worker(rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (world,))
        # supported: apply_sorsa (the SVDs shared over the ranks), then fully_shard
        model = sk.apply_sorsa(build(), targets(), r=R, init="rsvd", seed=3, distributed=True)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model[0].sorsa_A, DTensor) and isinstance(model[0].weight, DTensor)
        out = model(x()).detach()
        # refused: the other order
        late = build()
        for layer in late:
            fully_shard(layer, mesh=mesh)
        fully_shard(late, mesh=mesh)
        for init in ("rsvd", None):
            with pytest.raises(ValueError, match="apply_sorsa must run before fully_shard"):
                sk.apply_sorsa(late, targets(), r=R, init=init)
        assert not any(isinstance(m, sk.SORSALinear) for m in late.modules())  # unchanged
        torch.save(out, os.path.join(out_dir, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_apply_before_fully_shard_and_clear_errors_after(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = sk.apply_sorsa(build(), targets(), r=R, init="rsvd", seed=3)(x()).detach()
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"out{rank}.pt"), want, rtol=1e-6, atol=1e-7)


ODD = [37, 50, 50, 29, 64]  # ragged over 2 ranks: 25 + 25 rows, 15 + 14, 32 + 32; r = 3: 2 + 1


def build_odd():
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(ODD, ODD[1:])))


def odd_targets():
    return [str(i) for i in range(len(ODD) - 1)]


def _sharded_worker(rank, world, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = sk.apply_sorsa(build_odd(), odd_targets(), r=3, init=None)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model[0].weight, DTensor) and isinstance(model[0].sorsa_S, DTensor)
        for layer in model:  # what to_empty leaves: the never-set adapters' values are garbage
            for p in (layer.sorsa_A, layer.sorsa_S, layer.sorsa_B):
                p.data.to_local().fill_(float("nan"))

        def full_state():
            return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items()}

        # no rank but the owner ever holds a whole weight: no all-gather during the init
        seen = []
        spies = [(dist, "all_gather"), (dist, "all_gather_into_tensor"), (DTensor, "full_tensor")]
        origs = [getattr(o, n) for o, n in spies]
        for (o, n), f in zip(spies, origs):
            setattr(o, n, lambda *a, _n=n, _f=f, **k: (seen.append(_n), _f(*a, **k))[1])
        report = []
        try:
            sk.init_layers(list(sk.sorsa_layers(model)), "rsvd", seed=3, report=report)
        finally:
            for (o, n), f in zip(spies, origs):
                setattr(o, n, f)
        assert seen == [], seen
        first, out = full_state(), model(torch.randn(6, ODD[0], generator=torch.Generator().manual_seed(1))).detach()
        sk.init_layers(list(sk.sorsa_layers(model)), "rsvd", seed=5)  # re-decomposes W_r + B·S·A
        second = full_state()
        initial = [tuple(t.clone() for t in layer.initial_adapter()) for layer in sk.sorsa_layers(model)]
        with pytest.raises(ValueError, match="must be None for sharded"):
            sk.init_layers(list(sk.sorsa_layers(model)), "rsvd", weight_dtype=torch.bfloat16)
        if rank == 0:
            torch.save({"first": first, "second": second, "out": out, "initial": initial,
                        "owners": sorted({o for e in report for o in e["owners"]})},
                       os.path.join(out_dir, "sharded.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_init_on_the_owner_only_equals_one_process(tmp_path):
    """apply_sorsa(init=None), fully_shard, then init_layers on the DTensor layers: each weight is
    gathered on its owner only, W_r and A, S, B come back as shards, and every tensor equals a
    one-process init_layers of the same weights bit for bit, also when re-initialised."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "sharded.pt")
    assert got["owners"] == [0, 1]  # both ranks decomposed a share
    want = sk.apply_sorsa(build_odd(), odd_targets(), r=3, init=None)
    sk.init_layers(list(sk.sorsa_layers(want)), "rsvd", seed=3)
    assert set(got["first"]) == set(want.state_dict())
    for k, v in want.state_dict().items():
        assert torch.equal(got["first"][k], v), k
    x6 = torch.randn(6, ODD[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got["out"], want(x6).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(want(x6), build_odd()(x6), rtol=1e-5, atol=1e-6)  # the base's function
    sk.init_layers(list(sk.sorsa_layers(want)), "rsvd", seed=5)
    for k, v in want.state_dict().items():
        assert torch.equal(got["second"][k], v), k
    for mine, ref in zip(got["initial"], (layer.initial_adapter() for layer in sk.sorsa_layers(want))):
        assert all(torch.equal(a, b) for a, b in zip(mine, ref))


def test_to_empty_garbage_adapters_are_ignored_until_set():
    """A layer made with init=None never had its adapters set: after to_empty they hold garbage,
    and init_layers decomposes the base weight alone (before: NaN errors or silently wrong
    factors); once initialised, a second init re-decomposes W_r + B·S·A as before."""
    want = sk.apply_sorsa(build(), targets(), r=R, init="rsvd", seed=3)
    with torch.device("meta"):
        model = sk.apply_sorsa(build(), targets(), r=R, init=None)
    model.to_empty(device="cpu")
    for layer in sk.sorsa_layers(model):
        for p in (layer.sorsa_A, layer.sorsa_S, layer.sorsa_B):
            p.data.fill_(float("nan"))
    model.load_state_dict(build().state_dict(), strict=False)
    sk.init_layers(list(sk.sorsa_layers(model)), "rsvd", seed=3)
    for k, v in want.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    sk.init_layers(list(sk.sorsa_layers(model)), "rsvd", seed=4)
    sk.init_layers(list(sk.sorsa_layers(want)), "rsvd", seed=4)
    for k, v in want.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
