"""SVD initialisation of SORSA adapters: ``W = W_r + scale·B·diag(S)·A``.

Methods: ``"svd"`` — exact ``torch.linalg.svd``; ``"rsvd"`` (what :func:`sorsa_kernels.apply_sorsa`
uses by default) — per shape group, the batched randomized SVD (:func:`sorsa_kernels.rsvd`) where a
cost estimate says it is cheaper than the exact SVD, else the exact one (small matrices, or a
rank close to the size), so it is never the slower choice by that estimate; ``"rsvd_always"`` —
the randomized SVD whatever the cost. Either way ``W_r`` is computed from the adapters *as stored*,
so ``W_r + scale·B·diag(S)·A`` reproduces ``W`` to rounding whatever the SVD's accuracy: the model's
function is unchanged at init. TF32 is off during init (:func:`sorsa_kernels._precision.no_tf32`).
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import quant
from ._validate import FLOAT_DTYPES, check_finite, check_rank
from ._precision import no_tf32
from .ops.rsvd import DEFAULT_NITER, default_oversample, rsvd
from .ops.rsvd import check_options as check_rsvd_options

INIT_METHODS = ("svd", "rsvd", "rsvd_always")
#: ``None``: chunk each shape group by the memory free now (see :func:`memory_budget`)
DEFAULT_CHUNK_BYTES: Optional[int] = None
#: fraction of the free device memory (CUDA) or of MemAvailable (CPU) one chunk may use
MEMORY_FRACTION = {"cuda": 0.5, "cpu": 0.25}


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


# ---- which SVD: a cost estimate ----------------------------------------------------------
def svd_cost(m: int, n: int) -> float:
    """Relative cost of an exact thin SVD with vectors of an m×n matrix: R-SVD flops
    6·M·N² + 20·N³ (M ≥ N; Golub & Van Loan), ×2 because half of bidiagonalisation is
    memory-bound BLAS-2. With :func:`rsvd_cost` calibrated on this 2-core CPU (r = 64, measured
    exact / rsvd time: 384² 0.34, 1536×384 0.6, 1024² 4, 2048² 7.6; 2752×1024 r = 128 0.77; the
    model gives 0.6, 0.5, 4.5, 14, 0.9)."""
    M, N = max(m, n), min(m, n)
    return 2.0 * (6.0 * M * N * N + 20.0 * N ** 3)


RSVD_FIXED_COST = 1.5e9  # per-call overhead in svd_cost units, counted per matrix (conservative)


def rsvd_cost(m: int, n: int, r: int, oversample: Optional[int] = None, niter: Optional[int] = None) -> float:
    """Relative cost of :func:`rsvd` in the same units: fp32 GEMMs ``2·m·n·k`` per pass (2·niter + 2
    passes), CholeskyQR with fp64 Gram matrices and many small launches (~40·(m+n)·k² per
    iteration) and the fp64 2k×2k small SVD (~200·(2k)³), plus a fixed ~1.5e9 for its ~100 small
    launches and Python steps (CI's quick bench, 2×256², r = 16: exact 15.7 ms, rsvd 19.9 ms,
    where the flop terms alone said rsvd); the constants are fitted to the measurements in
    :func:`svd_cost`."""
    M, N = max(m, n), min(m, n)
    k = min(r + (default_oversample(r) if oversample is None else oversample), N)
    q = DEFAULT_NITER if niter is None else niter
    gemm = 2.0 * M * N * k * (2 * q + 2)
    orth = 40.0 * (M + N) * k * k * (q + 2)
    small = 200.0 * (2 * k) ** 3
    return gemm + orth + small + RSVD_FIXED_COST


def choose_method(m: int, n: int, r: int, method: str = "rsvd", **svd_kwargs) -> str:
    """The SVD actually used for an m×n group at rank r: ``"svd"`` or ``"rsvd"``."""
    if method == "svd":
        return "svd"
    if method == "rsvd_always" or svd_kwargs.get("tol") is not None:
        return "rsvd"
    cost = rsvd_cost(m, n, r, svd_kwargs.get("oversample"), svd_kwargs.get("niter"))
    return "rsvd" if cost < svd_cost(m, n) else "svd"


# ---- memory: chunk size ------------------------------------------------------------------
def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def memory_budget(device: torch.device) -> int:
    """Bytes one batched call may use: a fraction of the free memory of ``device``
    (``torch.cuda.mem_get_info`` on CUDA, MemAvailable from /proc/meminfo on the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION["cuda"])
    return int(_cpu_available_bytes() * MEMORY_FRACTION["cpu"])


def bytes_per_matrix(m: int, n: int, r: int, weight_dtype: torch.dtype) -> int:
    """Peak working memory of one m×n matrix in a batched init call: its fp32 effective weight,
    the stacked batch, rsvd's normalised fp32 copy and bf16 iteration copy, the weight itself,
    and the fp64 bases (2k columns) on both sides."""
    k = min(r + default_oversample(r), m, n)
    elt = torch.empty((), dtype=weight_dtype).element_size()
    return m * n * (3 * 4 + 2 + elt) + 8 * (m + n) * 2 * k * 3


# ---- per-matrix pieces ---------------------------------------------------------------------
def svd_factors(W: torch.Tensor, r: int, method: str = "svd", **svd_kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` singular triplets ``(U (…,m,r), S (…,r), Vh (…,r,n))`` of ``W`` (batched over
    leading dims) in float32 (float64 for float64 ``W``), whatever ``W``'s storage dtype.
    ``method``: see the module doc ("rsvd" picks exact or randomized by cost)."""
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    if method == "svd" and svd_kwargs:
        raise TypeError(f"method='svd' takes no extra arguments, got {sorted(svd_kwargs)}")
    with no_tf32():
        if choose_method(W.shape[-2], W.shape[-1], r, method, **svd_kwargs) == "rsvd":
            return rsvd(W, r, **svd_kwargs)
        check_finite("weight", W)  # rsvd checks its own input: each path checks exactly once
        U, S, Vh = torch.linalg.svd(W.to(_work_dtype(W)), full_matrices=False)
        return U[..., :r], S[..., :r], Vh[..., :r, :]


@torch.no_grad()
def svd_bottom(W: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` *smallest* singular triplets of ``W`` (``(…, m, n)``, batched): ``U (…, m, r)``,
    ``S (…, r)``, ``Vh (…, r, n)`` in the order of the last ``r`` of ``torch.linalg.svd``
    (descending), float32 (float64 for float64 ``W``). For minor-component adapters (KaSA's base
    truncation, MiLoRA): one batched float64 Gram matrix of the smaller side and its ``eigh``
    instead of a full SVD per weight.

    Accuracy: the minor subspace is the float64 Gram matrix's, so ``W − U·diag(S)·Vh`` (what KaSA
    keeps) is accurate to ~1e-8 relative on LLM-like weights, where PEFT's float32 SVD gives ~2e-6
    (``tests/integrations/test_peft.py``). The Gram squares the condition number: ``S`` is accurate
    to about √eps₆₄·σ_max ≈ 1.5e-8·σ_max absolute (smaller σ only to that level, and their vectors
    only as a subspace). ``U`` and ``Vh`` are orthonormal (zero σ included). Cost on the CPU: faster
    than a float32 SVD per weight at 1024–2048 (BENCHMARKS.md); on GPUs it rests on float64 ``eigh``."""
    if W.dim() < 2:
        raise ValueError(f"W must have at least 2 dimensions (..., m, n), got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
        raise ValueError(f"r must be an int in [1, min(m, n)] = [1, {min(m, n)}], got {r!r}")
    check_finite("weight", W)
    tall = m >= n
    A = (W if tall else W.mT).to(torch.float64)
    _, V = torch.linalg.eigh(A.mT @ A)  # ascending eigenvalues σ²
    Vd = V[..., :r].flip(-1)  # the r smallest, largest first
    # P = A·V_d = U_d·diag(S_d); its small SVD re-orthonormalises both sides and sorts S (below
    # ~√eps·σ_max the Gram's eigenvectors mix, and a zero σ leaves a null column in P)
    Up, S, Vph = torch.linalg.svd(A @ Vd, full_matrices=False)
    V = Vd @ Vph.mT
    U, Vh = (Up, V.mT) if tall else (V, Up.mT)
    work = _work_dtype(W)
    return U.to(work), S.to(work), Vh.to(work)


def adapters_from_factors(W, U, S, Vh, scale: float, weight_dtype=None, adapter_dtype=None):
    """``(W_r, A, S, B)`` with ``B = U``, ``A = Vh`` rounded to ``adapter_dtype`` and ``W_r`` computed
    from the rounded adapters in the working precision, then rounded to ``weight_dtype``. Each
    result owns its storage (a slice of a batched result is copied), so saving one layer never
    writes a whole batch."""
    weight_dtype = weight_dtype or W.dtype
    adapter_dtype = adapter_dtype or weight_dtype
    A, S_, B = (t.to(adapter_dtype).clone(memory_format=torch.contiguous_format) for t in (Vh, S, U))
    work = _work_dtype(W)
    with no_tf32():
        W_r = W.to(work) - scale * (B.to(work) * S_.to(work)[..., None, :]) @ A.to(work)
    return W_r.to(weight_dtype).contiguous(), A, S_, B


@torch.no_grad()
def sorsa_decompose(
    W: torch.Tensor,
    r: int,
    scale: float,
    weight_dtype: Optional[torch.dtype] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    method: str = "svd",
    **svd_kwargs,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``W`` (out×in, or a batch ``(…, out, in)``) into ``(W_r, A, S, B)`` with
    ``B = U[:, :r]``, ``S = Σ[:r]``, ``A = Vᵀ[:r]`` and ``W_r = W − scale·B·diag(S)·A``.

    The SVD runs in float32 (float64 for float64 weights) even for bf16/fp16 weights."""
    out_f, in_f = W.shape[-2:]
    check_rank(r, in_f, out_f)
    if r == 0:
        raise ValueError("r must be >= 1 to initialise SORSA adapters, got 0")
    _check_dtype("weight_dtype", weight_dtype)
    _check_dtype("adapter_dtype", adapter_dtype)
    U, S, Vh = svd_factors(W, r, method, **svd_kwargs)
    return adapters_from_factors(W, U, S, Vh, scale, weight_dtype, adapter_dtype)


def _check_dtype(name: str, dtype) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be None or a floating dtype (float16, bfloat16, float32, float64), got {dtype!r}")


# ---- many layers ---------------------------------------------------------------------------
@torch.no_grad()
def init_layers(
    layers: Sequence,
    method: str = "rsvd",
    weight_dtype: Optional[torch.dtype] = None,
    adapter_dtype: Optional[torch.dtype] = None,
    *,
    chunk_bytes: Optional[int] = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    report: Optional[list] = None,
    distributed: bool = False,
    **svd_kwargs,
) -> None:
    """Initialise many SORSA layers at once.

    Layers are grouped by (shape up to transposition, rank, dtype, device) — an out×in and an
    in×out weight share a batch, one of them transposed — and each group is decomposed in one
    batched call (:func:`svd_factors`; the SVD is chosen per group, see the module doc), split
    into chunks only where the group does not fit in ``chunk_bytes`` (default: a fraction of the
    memory free now, :func:`memory_budget`). Everything is validated before any layer changes.
    ``progress`` shows a tqdm bar counting matrices, with the shape group and the chosen method.
    ``report``: a list that receives one dict per shape group — ``shape`` (m, n; m ≥ n), ``r``,
    ``count``, ``dtype``, ``method`` ("svd" | "rsvd"), ``chunks``, ``iterations`` (rsvd's, per
    chunk), ``error_estimate`` (rsvd's, per chunk, where ``tol`` is given), ``seconds`` (this
    process's decomposition time for the group, after a device sync) and ``owners`` (the rank that
    decomposed each chunk).

    ``distributed=True`` (opt-in; every rank must call it, with the same layers and weights — DDP,
    a model built or loaded the same way on every rank — and, over NCCL, the weights on the rank's
    current CUDA device): the chunks are shared out (largest first to the least loaded rank, by the
    cost model), each rank decomposes its share, and each chunk's factors are broadcast from its
    owner (one collective per chunk). Weights are compared across ranks first (shapes and a
    float64 fingerprint: an error, not another rank's SVD, if they differ); a failure on one rank
    is raised on all. The result equals a one-process init bit for bit, given the same ``seed`` and
    ``chunk_bytes`` (ranks take the smallest chunk size any of them can hold; without a seed rank
    0's draw is shared). Sharded (DTensor) weights are refused. ``report``'s ``iterations`` and
    ``error_estimate`` then cover this rank's chunks; the progress bar runs on rank 0.
    """
    if report is not None and not isinstance(report, list):
        raise TypeError(f"report must be None or a list, got {type(report).__name__}")
    if "info" in svd_kwargs:
        raise TypeError("init_layers takes no 'info' argument (rsvd's per-call facts): pass report=[] instead")
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes must be None or an int >= 1, got {chunk_bytes!r}")
    _check_dtype("weight_dtype", weight_dtype)
    _check_dtype("adapter_dtype", adapter_dtype)
    if method != "svd":
        check_rsvd_options(**svd_kwargs)  # even where a group then takes the exact SVD
    groups: Dict[tuple, list] = defaultdict(list)
    for layer in layers:
        if layer.r == 0:
            raise ValueError("sorsa_init needs r >= 1; a layer has r = 0 (no adapters)")
        if quant.is_params4bit(layer.weight):
            raise TypeError("init_layers: a 4-bit SORSA layer cannot be re-decomposed (its W_r lost the quantization "
                            "error); initialise from the full-precision base with sk.apply_sorsa(..., quantize=...)")
        if layer.weight.is_meta:
            raise ValueError("cannot initialise SORSA adapters on the meta device (the weights hold no values): "
                             "pass init=None (apply_sorsa) and initialise after loading real weights")
        out_f, in_f = layer.weight.shape
        groups[(max(out_f, in_f), min(out_f, in_f), layer.r, layer.weight.dtype, layer.weight.device)].append(layer)
    dist_ = _distributed(distributed, layers) if groups else None
    # the plan: (group key, method, chunk of layers) in one order on every rank
    sizes = []
    for (m, n, r, dtype, device), members in groups.items():
        budget = memory_budget(device) if chunk_bytes is None else chunk_bytes
        sizes.append(max(1, budget // bytes_per_matrix(m, n, r, dtype)))
    if dist_ is not None:
        sizes = _agree_on_chunks(dist_, groups, sizes)
        if svd_kwargs.get("seed") is None and method != "svd":  # one sketch seed for all ranks
            svd_kwargs = {**svd_kwargs, "seed": _broadcast_seed(dist_, next(iter(groups))[4])}
    plan = []
    for (key, members), per_chunk in zip(groups.items(), sizes):
        chosen = choose_method(key[0], key[1], key[2], method, **svd_kwargs)
        plan += [(key, chosen, members[c:c + per_chunk]) for c in range(0, len(members), per_chunk)]
    rank = _own_rank()
    owners = [rank] * len(plan)
    if dist_ is not None:
        owners = _balance([len(ch) * (rsvd_cost(k[0], k[1], k[2], svd_kwargs.get("oversample"), svd_kwargs.get("niter"))
                                      if how == "rsvd" else svd_cost(k[0], k[1])) for k, how, ch in plan],
                          dist_.get_world_size())
    entries: Dict[tuple, dict] = {}
    for (key, chosen, chunk), owner in zip(plan, owners):
        m, n, r, dtype, device = key
        e = entries.setdefault(key, {"shape": (m, n), "r": r, "count": 0, "dtype": str(dtype).replace("torch.", ""),
                                     "method": chosen, "chunks": 0, "iterations": [], "error_estimate": [],
                                     "seconds": 0.0, "owners": []})
        e["count"] += len(chunk)
        e["chunks"] += 1
        e["owners"].append(owner)
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(layers), desc="SORSA init", unit="matrix")
        except ImportError:
            bar = None

    def decompose(key, chosen, chunk):
        m, n, r, dtype, device = key
        t0 = time.perf_counter()
        Ws = [layer.effective_weight() for layer in chunk]
        # orient every matrix as m×n, m ≥ n
        stack = torch.stack([W.mT if W.shape[0] < W.shape[1] else W for W in Ws])
        del Ws
        info: dict = {}
        extra = {"info": info} if chosen == "rsvd" and report is not None else {}
        kwargs = svd_kwargs if chosen == "rsvd" else {}
        out = svd_factors(stack, r, "rsvd_always" if chosen == "rsvd" else "svd", **kwargs, **extra)
        del stack
        e = entries[key]
        if "iterations" in info:
            e["iterations"].append(info["iterations"])
        if "error_estimate" in info and info["error_estimate"] == info["error_estimate"]:  # not NaN: tol mode
            e["error_estimate"].append(info["error_estimate"])
        if report is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        e["seconds"] += time.perf_counter() - t0
        return out

    try:
        # a rank first decomposes its own chunks (all ranks at once), then every chunk's factors are
        # broadcast from its owner (one collective per chunk) and applied everywhere, in plan order
        mine, failure = {}, None
        if dist_ is not None:
            try:
                mine = {i: decompose(*plan[i]) for i in range(len(plan)) if owners[i] == rank}
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                failure = e
            _raise_if_any_failed(dist_, failure, next(iter(groups))[4])
        for i, (key, chosen, chunk) in enumerate(plan):
            m, n, r, dtype, device = key
            if dist_ is None:
                U, S, Vh = decompose(key, chosen, chunk)
            else:
                U, S, Vh = _broadcast_factors(dist_, mine.pop(i, None), owners[i], (len(chunk), m, n, r),
                                              _work_dtype(chunk[0].weight), device)
            for j, layer in enumerate(chunk):
                W = layer.effective_weight()
                Ui, Vhi = (Vh[j].mT, U[j].mT) if W.shape[0] < W.shape[1] else (U[j], Vh[j])
                layer.set_decomposition(*adapters_from_factors(
                    W, Ui, S[j], Vhi, layer.scale, weight_dtype or layer.weight.dtype, adapter_dtype))
            if bar is not None:
                bar.set_postfix_str(f"{m}x{n} r={r} ×{entries[key]['count']} {chosen}")
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if report is not None:
        report.extend(entries.values())


def _own_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed(distributed: Optional[bool], layers):
    """``torch.distributed`` when the init is split over ranks (``distributed=True``), else None."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None or a bool, got {distributed!r}")
    if not distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise RuntimeError("init_layers(distributed=True) needs an initialised torch.distributed process group "
                           "with more than one rank")
    if any(type(layer.weight.data) is not torch.Tensor for layer in layers):
        raise ValueError("init_layers(distributed=True) splits the work of replicated weights (DDP, or a model "
                         "built the same way on every rank); some weights are sharded tensors (DTensor)")
    if dist.get_backend() == "nccl":
        devs = {layer.weight.device for layer in layers}
        if any(d.type != "cuda" or d.index != torch.cuda.current_device() for d in devs):
            raise ValueError(f"init_layers(distributed=True) over NCCL needs every weight on this rank's current "
                             f"CUDA device (torch.cuda.set_device(local_rank) first), got {sorted(map(str, devs))}")
    return dist


def _comm_device(dist, device: torch.device) -> torch.device:
    """Where a collective's tensors live: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _agree_on_chunks(dist, groups, sizes):
    """Every rank must hold the same weights (a rank gets the factors another decomposed) and cut
    the same chunks (the rsvd sketch depends on the batch): compare shapes and a float64
    fingerprint (sum, sum of squares) of every weight across ranks, and take the smallest chunk
    size of each group (free memory differs)."""
    mine = []
    for k, v in groups.items():
        prints = []
        for layer in v:
            W = layer.effective_weight().to(torch.float64)
            prints.append((W.sum().item(), (W * W).sum().item()))
        mine.append((k[0], k[1], k[2], str(k[3]), k[4].type, prints))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        raise ValueError("init_layers(distributed=True): the ranks hold different weights (shapes or values); "
                         "every rank must pass the same model's layers with the same weights (DDP), else "
                         "initialise with distributed=False")
    t = torch.tensor(sizes, dtype=torch.int64, device=_comm_device(dist, next(iter(groups))[4]))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.tolist()


def _broadcast_seed(dist, device) -> int:
    """One rsvd seed for all ranks (rank 0's draw from its global generator)."""
    t = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64).to(_comm_device(dist, device))
    dist.broadcast(t, src=0)
    return int(t.item())


def _raise_if_any_failed(dist, failure: Optional[BaseException], device) -> None:
    """After the ranks' own decompositions: raise on every rank if any failed (its peers would
    otherwise wait in the broadcast until the process group's timeout)."""
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=_comm_device(dist, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if int(flag.item()):
        raise RuntimeError("init_layers(distributed=True): another rank failed while decomposing its share "
                           "(see its error)")


def _balance(costs, world: int):
    """Owner rank of each chunk: largest first to the least loaded rank (deterministic)."""
    load, owners = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world), key=lambda w: (load[w], w))
        owners[i] = owner
        load[owner] += costs[i]
    return owners


def _broadcast_factors(dist, factors, owner: int, dims, work, device):
    """``(U, S, Vh)`` of a chunk, broadcast from ``owner`` (NCCL: on the device; gloo: on the CPU)."""
    b, m, n, r = dims
    comm = _comm_device(dist, device)
    if factors is None:
        factors = (torch.empty(b, m, r, dtype=work, device=comm), torch.empty(b, r, dtype=work, device=comm),
                   torch.empty(b, r, n, dtype=work, device=comm))
    out = []
    for t in factors:
        t = t.to(comm).contiguous()
        dist.broadcast(t, src=owner)
        out.append(t.to(device))
    return out
