"""SVD init spread over ranks (init_layers / apply_sorsa with distributed=True): 2 CPU ranks over
gloo, each decomposing its share of the chunks; the factors are broadcast, and every rank's model
equals a one-process init bit for bit. Different weights across ranks and a failure on one rank
raise on every rank (no hang, no other rank's SVD)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

# (out, in) of the linears: three shape groups (one also transposed), several chunks each
SHAPES = [(96, 64)] * 5 + [(64, 96)] * 3 + [(80, 80)] * 4 + [(128, 48)] * 2
CHUNK = 2 * 96 * 64 * 4 * 6  # a few matrices per chunk: several chunks per group, owners mixed


def build(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({f"l{i}": nn.Linear(i_, o_) for i, (o_, i_) in enumerate(SHAPES)})


def run_init(model, report=None, distributed=False, seed=0):
    import sorsa_kernels as sk
    sk.apply_sorsa(model, list(model.keys()), r=6, init=None)
    layers = [model[k] for k in model.keys()]
    sk.init.init_layers(layers, "rsvd_always", chunk_bytes=CHUNK, report=report, distributed=distributed, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import sorsa_kernels as sk
        report = []
        sd = run_init(build(), report, distributed=True)
        torch.save({"sd": sd, "report": report}, os.path.join(out_dir, f"rank{rank}.pt"))
        m = sk.apply_sorsa(build(), list(build().keys()), r=6, init="rsvd_always", chunk_bytes=CHUNK, distributed=True)
        torch.save({k: v.detach().clone() for k, v in m.state_dict().items()}, os.path.join(out_dir, f"apply{rank}.pt"))
        # without a seed: seed 0 on every rank
        torch.save(run_init(build(), distributed=True, seed=None), os.path.join(out_dir, f"noseed{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_work_and_equal_one_process_bit_for_bit(tmp_path):
    import sorsa_kernels as sk

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    report = []
    want = run_init(build(), report)
    want_apply = sk.apply_sorsa(build(), list(build().keys()), r=6, init="rsvd_always", chunk_bytes=CHUNK).state_dict()
    owners = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got["sd"]) == set(want)
        for k in want:
            assert torch.equal(got["sd"][k], want[k]), (rank, k)
        got_apply = torch.load(tmp_path / f"apply{rank}.pt")
        for k in want_apply:
            assert torch.equal(got_apply[k], want_apply[k]), (rank, k)
        rep = got["report"]
        assert [(e["shape"], e["count"], e["chunks"]) for e in rep] == [(e["shape"], e["count"], e["chunks"])
                                                                           for e in report]
        owners.append([e["owners"] for e in rep])
        # a rank spends time only on the chunks it owns
        assert all((e["seconds"] > 0) == (rank in e["owners"]) for e in rep)
    assert owners[0] == owners[1]  # every rank made the same plan
    flat = [o for group in owners[0] for o in group]
    assert len(flat) >= 6 and 0.3 <= flat.count(0) / len(flat) <= 0.7  # the chunks are shared out
    a, b = torch.load(tmp_path / "noseed0.pt"), torch.load(tmp_path / "noseed1.pt")
    seeded = torch.load(tmp_path / "rank0.pt")["sd"]
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], seeded[k]) for k in a)  # no seed = seed 0


def _worker_errors(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import sorsa_kernels as sk
        from sorsa_kernels import init as init_mod
        # the same shapes, other values on rank 1 (e.g. per-rank random init before DDP): an error
        with pytest.raises(ValueError, match="the ranks hold different weights"):
            run_init(build(seed=rank), distributed=True)
        # a failure while rank 1 decomposes its share is raised on both ranks
        if rank == 1:
            def boom(*a, **k):
                raise RuntimeError("decomposition failed on rank 1")
            init_mod.svd_factors = boom
        with pytest.raises(RuntimeError, match="decomposition failed on rank 1" if rank else "another rank failed"):
            run_init(build(), distributed=True)
        # the 4-bit path is per layer: refused rather than silently local
        with pytest.raises(ValueError, match="not supported with 4-bit"):
            sk.apply_sorsa(build(), ["l0"], r=2, quantize="nf4", distributed=True)
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def test_different_weights_and_a_failing_rank_raise_everywhere(tmp_path):
    pytest.importorskip("bitsandbytes")
    mp.spawn(_worker_errors, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_distributed_true_without_a_process_group_is_a_clear_error():
    import sorsa_kernels as sk

    m = sk.apply_sorsa(build(), ["l0"], r=2, init=None)
    with pytest.raises(RuntimeError, match="distributed=True. needs an initialised torch.distributed"):
        sk.init.init_layers([m["l0"]], distributed=True)
    with pytest.raises(TypeError, match="distributed must be None or a bool"):
        sk.init.init_layers([m["l0"]], distributed="yes")
