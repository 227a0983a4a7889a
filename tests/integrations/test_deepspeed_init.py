"""SVD init of a model built under DeepSpeed ZeRO-3 (``deepspeed.zero.Init``: every weight
partitioned at construction): ``sk.apply_sorsa`` on 2 CPU ranks over gloo must give, bit for bit,
the model one plain process initialises (residual weights, adapters, initial adapters), with every
new parameter partitioned as DeepSpeed expects, the SVDs shared between the ranks, and a
``deepspeed.initialize`` + training step equal to the plain one. A non-finite weight on one rank's
share fails on both ranks with the model unchanged (and a retry then works); ``apply_sorsa`` after ``deepspeed.initialize``
is refused."""
import contextlib
import os

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from zero3_helpers import ds_config, spawn  # noqa: E402

# every parameter truly partitioned (tiny test layers would otherwise be kept whole), torch's AdamW
CONFIG = ds_config(3, micro_batch=4, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0},
                   zero_allow_untested_optimizer=True)

DIMS = [64, 96, 64, 96, 80, 80, 80, 48, 128, 48]  # a chain: shape groups, transposed members, several chunks
R, LR, SEED = 6, 0.05, 3
TARGETS = ["chain", "head"]


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (GPT-2; weight in×out), which sorsa_kernels recognises by its name
    and ``nf`` / ``nx``: defined here so the test does not import transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf) * 0.01)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).reshape(*x.shape[:-1], self.nf)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.chain = nn.ModuleList(nn.Linear(a, b, bias=i % 2 == 0) for i, (a, b) in enumerate(zip(DIMS, DIMS[1:])))
        self.head = Conv1D(40, DIMS[-1])
        self.spare = nn.Linear(40, 8)  # not a target: converted late to test the refusal after initialize

    def forward(self, x):
        for lin in self.chain:
            x = torch.tanh(lin(x))
        return self.spare(self.head(x))


def build():
    torch.manual_seed(0)
    return Net()


def chunk_bytes():
    from sorsa_kernels.init import bytes_per_matrix
    return 2 * bytes_per_matrix(96, 64, R, torch.float32)  # two of the largest per chunk: several chunks


def batch():
    return torch.randn(4, DIMS[0], generator=torch.Generator().manual_seed(1))


def initial_adapters(model):
    return {f"{n}.{k}": getattr(m, k).clone() for n, m in model.named_modules() if hasattr(m, "sorsa_A0")
            for k in ("sorsa_A0", "sorsa_S0", "sorsa_B0")}


def _one_thread():
    # first thing in a rank: 2 ranks share 2 cores, and a rank forked from a parent whose OpenMP pool
    # has run (any earlier CPU test) hangs in its first parallel region unless it stays single-threaded
    torch.set_num_threads(1)


@contextlib.contextmanager
def one_thread():
    """The one-process reference on one thread too: a GEMM's rounding depends on the thread count,
    and "bit for bit" compares the same arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def plain_run():
    """One process: init, then one AdamW step on the adapters."""
    import sorsa_kernels as sk
    model = sk.apply_sorsa(build(), TARGETS, r=R, init="rsvd", chunk_bytes=chunk_bytes(), seed=SEED)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    init0 = initial_adapters(model)
    sk.mark_only_sorsa_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = model(batch()).square().mean()
    loss.backward()
    opt.step()
    return init, init0, loss.detach(), model.state_dict()


def _worker(rank, world, out_dir):
    _one_thread()
    import deepspeed
    import sorsa_kernels as sk
    from sorsa_kernels import init as init_mod
    from sorsa_kernels._zero3 import gathered_state_dict, is_partitioned

    # bf16 weights (zero.Init creates them in bf16): W_r and the adapters stay bf16; apply_sorsa
    # inside the zero.Init block (its patches are paused while SORSA layers are built)
    with deepspeed.zero.Init(config_dict_or_path={**CONFIG, "bf16": {"enabled": True}}):
        half = build()
        base16 = gathered_state_dict(half)
        sk.apply_sorsa(half, TARGETS, r=R, init="rsvd", chunk_bytes=chunk_bytes(), seed=SEED)
    assert half.chain[0].weight.dtype == torch.bfloat16
    assert all(is_partitioned(p) and p.numel() == 0 for p in half.parameters())
    init16 = gathered_state_dict(half)
    # init=None: the layers are built (weights kept, zero adapters partitioned), nothing decomposed
    with deepspeed.zero.Init(config_dict_or_path=CONFIG):
        shell = build()
    sk.apply_sorsa(shell, TARGETS, r=R, init=None)
    assert all(is_partitioned(p) and p.numel() == 0 for p in shell.parameters())
    shell = gathered_state_dict(shell)
    with deepspeed.zero.Init(config_dict_or_path=CONFIG):
        model = build()
    assert all(is_partitioned(p) and p.numel() == 0 for p in model.parameters())
    base = gathered_state_dict(model)
    # first a non-finite weight in one rank's share: both ranks raise, no module or weight changes
    bad = model.chain[4].weight
    with deepspeed.zero.GatheredParameters([bad], modifier_rank=0):
        if rank == 0:
            good = bad.data[0, 0].item()
            bad.data[0, 0] = float("nan")
    with pytest.raises((ValueError, RuntimeError), match="NaN or Inf|another rank failed") as failed:
        sk.apply_sorsa(model, TARGETS, r=R, init="rsvd", chunk_bytes=chunk_bytes(), seed=SEED)
    after_failure = gathered_state_dict(model)
    types = [type(m).__name__ for m in model.modules()]
    assert all(p.requires_grad for p in model.parameters())  # the shared ZeRO-3 weights' flags are restored
    with deepspeed.zero.GatheredParameters([bad], modifier_rank=0):
        if rank == 0:
            bad.data[0, 0] = good
    decomposed = []  # matrices this rank decomposed
    real = init_mod.svd_factors
    init_mod.svd_factors = lambda W, *a, **k: (decomposed.append(W.shape[0]), real(W, *a, **k))[1]
    try:
        sk.apply_sorsa(model, TARGETS, r=R, init="rsvd", chunk_bytes=chunk_bytes(), seed=SEED)
    finally:
        init_mod.svd_factors = real
    for name, layer in sk.layer.named_sorsa_layers(model):
        for pname in ("weight", "sorsa_A", "sorsa_S", "sorsa_B"):
            p = getattr(layer, pname)
            # partitioned as DeepSpeed does at construction: empty locally, half of it on each rank
            assert is_partitioned(p) and p.numel() == 0, (name, pname)
            assert p.ds_tensor.numel() == -(-p.ds_numel // world), (name, pname)
        assert not layer.weight.requires_grad
    with pytest.raises(ValueError, match="weight_dtype and adapter_dtype must be None"):  # before any collective
        sk.init_layers(list(sk.sorsa_layers(model)), "svd", weight_dtype=torch.float64)
    init = gathered_state_dict(model)
    init0 = initial_adapters(model)
    sk.mark_only_sorsa_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=CONFIG)
    loss = engine(batch()).square().mean()
    engine.backward(loss)
    engine.step()
    stepped = gathered_state_dict(engine.module)
    with pytest.raises(ValueError, match="before deepspeed.initialize"):
        sk.apply_sorsa(engine.module, ["spare"], r=2, init=None)
    torch.save({"shell": shell, "base16": base16, "init16": init16, "base": base, "error": str(failed.value),
                "after_failure": after_failure, "types": types, "init": init, "init0": init0, "loss": loss.detach(),
                "stepped": stepped, "decomposed": sum(decomposed)}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_zero3_init_equals_one_process_and_trains(tmp_path):
    import sorsa_kernels as sk

    spawn(_worker, str(tmp_path))
    with one_thread():
        init, init0, loss, stepped = plain_run()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    want_base = build().state_dict()
    assert set(r0["base"]) == set(want_base) and all(torch.equal(r0["base"][k], want_base[k]) for k in want_base)
    shell = r0["shell"]
    assert all(torch.equal(shell[k], want_base[k]) for k in want_base)
    assert set(shell) - set(want_base) and all(not shell[k].any() for k in set(shell) - set(want_base))
    # a failure: the owner of the bad weight names the cause, the other rank says another rank failed,
    # and nothing changed (modules, weights)
    assert sorted("NaN or Inf" in r["error"] for r in (r0, r1)) == [False, True], (r0["error"], r1["error"])
    assert "SORSA" not in " ".join(r0["types"])
    assert set(r0["after_failure"]) == set(want_base)
    for k, v in r0["after_failure"].items():
        want = want_base[k].clone()
        if k == "chain.4.weight":
            want[0, 0] = float("nan")
        torch.testing.assert_close(v, want, rtol=0, atol=0, equal_nan=True, msg=k)
    # the init: residual weights and adapters bit for bit
    assert set(r0["init"]) == set(init)
    for k in init:
        assert torch.equal(r0["init"][k], init[k]), k
    for r in (r0, r1):  # the initial adapters are whole on every rank
        assert set(r["init0"]) == set(init0) and all(torch.equal(r["init0"][k], init0[k]) for k in init0)
    # the SVDs are shared: each rank decomposed some of the matrices, together all of them once
    total = len(DIMS) - 1 + 1
    assert r0["decomposed"] > 0 and r1["decomposed"] > 0 and r0["decomposed"] + r1["decomposed"] == total
    # bf16: the same init of the same (gathered) bf16 weights in one process
    half = build().to(torch.bfloat16)
    half.load_state_dict(r0["base16"])
    with one_thread():
        want16 = sk.apply_sorsa(half, TARGETS, r=R, init="rsvd", chunk_bytes=chunk_bytes(), seed=SEED).state_dict()
    assert set(r0["init16"]) == set(want16)
    for k in want16:
        assert want16[k].dtype == torch.bfloat16 and torch.equal(r0["init16"][k], want16[k]), k
    # deepspeed.initialize + one step (both ranks the same batch, so the mean of their grads is the grad)
    torch.testing.assert_close(r0["loss"], loss, rtol=1e-6, atol=0)
    for k in stepped:
        torch.testing.assert_close(r0["stepped"][k], stepped[k], rtol=1e-5, atol=1e-7, msg=k)


HF_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _worker_hf(rank, world, folder, out_dir):
    _one_thread()
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    import sorsa_kernels as sk
    from sorsa_kernels._zero3 import gathered_state_dict, is_partitioned

    keep = HfDeepSpeedConfig(CONFIG)  # noqa: F841 - while it lives, from_pretrained builds under zero.Init
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert is_partitioned(model.model.layers[0].self_attn.q_proj.weight)
    sk.apply_sorsa(model, HF_TARGETS, r=4, init="rsvd", seed=SEED)
    torch.save(gathered_state_dict(model), os.path.join(out_dir, f"hf{rank}.pt"))


def test_zero3_from_pretrained_then_apply_sorsa_equals_one_process(tmp_path):
    """transformers' from_pretrained with a ZeRO-3 config (weights partitioned as they load), then
    apply_sorsa: the same model as loading and initialising in one process."""
    import sorsa_kernels as sk
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    spawn(_worker_hf, str(tmp_path / "tiny"), str(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32)
    with one_thread():
        want = sk.apply_sorsa(plain, HF_TARGETS, r=4, init="rsvd", seed=SEED).state_dict()
    got = torch.load(tmp_path / "hf0.pt")
    assert set(got) == set(want) and any("sorsa_A" in k for k in want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


class _Accelerator:
    """A stand-in for DeepSpeed's accelerator of a device whose backend is neither gloo nor NCCL."""

    def current_device_name(self):
        return "meta"


class _Reached(Exception):
    pass


def test_collectives_use_deepspeeds_accelerator_device(monkeypatch):
    """Under an HCCL-like backend the small tensors of the ranks' agreements live on DeepSpeed's
    accelerator device (not the CPU: such backends take only their device's tensors); gloo keeps
    the CPU; without deepspeed imported the choice is by backend name alone."""
    import sys

    import deepspeed.accelerator
    import torch.distributed as dist

    import sorsa_kernels._zero3 as Z
    from sorsa_kernels.init import _comm_device

    seen = []

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise _Reached  # a meta tensor has no value to read back

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _Accelerator())
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "hccl")
    assert _comm_device(dist, torch.device("cpu")) == torch.device("meta")
    with pytest.raises(_Reached):
        Z.agree(True, "a check")
    assert seen == [torch.device("meta")]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _comm_device(dist, torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "hccl")
    monkeypatch.delitem(sys.modules, "deepspeed")
    assert _comm_device(dist, torch.device("cpu")) == torch.device("cpu")
