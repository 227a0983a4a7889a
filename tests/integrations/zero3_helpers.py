"""What the DeepSpeed tests share: 2 CPU ranks over gloo (``torch.multiprocessing.spawn``) and
DeepSpeed configs. Only add functions here; other test files import the existing ones."""
import os
import socket
from typing import Any, Callable, Dict

import torch
import torch.multiprocessing as mp

# the CPU accelerator, chosen before deepspeed is first imported (in this process and the ranks)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    # a forked child's first parallel region hangs when the parent already ran libgomp's thread
    # pool (any earlier torch op in the test process); one thread per rank also fits 2 cores
    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator, set_accelerator
    if get_accelerator().device_name() != "cpu":  # the parent picked another accelerator before us
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
        set_accelerator(CPU_Accelerator())
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` CPU ranks with DeepSpeed's distributed set up
    (gloo; env:// rendezvous on a free local port); a failure on any rank raises here. The ranks
    are forked (a spawned rank re-imports torch, deepspeed and transformers: ~25 s on 2 cores), so
    the calling process must not have initialised torch.distributed itself."""
    mp.start_processes(_rank_main, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="fork")


def ds_config(stage: int, micro_batch: int = 4, grad_accum: int = 1, world: int = 2, **extra) -> Dict[str, Any]:
    """A DeepSpeed config for ZeRO ``stage`` in fp32 without gradient clipping; ``extra`` is
    merged in at the top level ("auto" batch sizes leave them to transformers' Trainer)."""
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": "auto" if "auto" in (micro_batch, grad_accum) else micro_batch * grad_accum * world,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)
    return cfg
