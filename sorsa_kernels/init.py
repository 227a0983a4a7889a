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

import contextlib
import os
import time
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import quant
from ._dtensor import check_layout, gather_to, is_dtensor, scatter_from_, write_rows_
from ._validate import FLOAT_DTYPES, check_finite, check_rank
from ._zero3 import comm_device, full_shape, gathered, is_partitioned
from ._precision import no_tf32
from .ops.rsvd import DEFAULT_NITER, MAX_TOL_ITERS, default_oversample, rsvd
from .ops.rsvd import check_options as check_rsvd_options

INIT_METHODS = ("svd", "rsvd", "rsvd_always")
#: ``None``: chunk each shape group by the memory free now (see :func:`memory_budget`)
DEFAULT_CHUNK_BYTES: Optional[int] = None
#: fraction of the free device memory (CUDA) or of MemAvailable (CPU) one chunk may use
MEMORY_FRACTION = {"cuda": 0.5, "cpu": 0.25}
#: at most this many weight elements per batched call, whatever the memory allows (8 × 4096²): a
#: large model's shape group is then several chunks, which ``distributed`` init shares over the
#: ranks (a 7B model's 128 attention projections: 16 chunks; 11008×4096: 2 per chunk). The same
#: cap applies on one process, so a distributed init still equals it bit for bit; small matrices
#: still batch widely (32 of 2048², 227 of 768²)
CHUNK_ELEMENTS = 8 * 4096 * 4096


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
    """Relative cost of :func:`rsvd` in the same units (block Krylov, ``q`` iterations of blocks of
    ``b`` columns, basis width ``d = (q + 1)·b``): fp32 GEMMs ``2·m·n·b`` per pass (2·q + 2 passes),
    CholeskyQR with fp64 Gram matrices (~40·(m+n)·b² per iteration), the basis'
    re-orthogonalisation and Gram updates (~2·(m+n)·d·b per iteration), the d×d eigenvalue checks
    and final ``eigh`` (~60·d³), plus a fixed ~1.5e9 for its small launches and Python steps. A
    default (tol) call is costed at ``DEFAULT_NITER`` iterations, what LLM-like matrices need."""
    M, N = max(m, n), min(m, n)
    b = min(r + (default_oversample(r) if oversample is None else oversample), N)
    q = DEFAULT_NITER if niter is None else niter
    d = min((q + 1) * b, N)
    gemm = 2.0 * M * N * b * (2 * q + 2)
    orth = 40.0 * (M + N) * b * b * (q + 2) + 2.0 * (M + N) * d * b * q
    small = 60.0 * d ** 3
    return gemm + orth + small + RSVD_FIXED_COST


def choose_method(m: int, n: int, r: int, method: str = "rsvd", **svd_kwargs) -> str:
    """The SVD actually used for an m×n group at rank r: ``"svd"`` or ``"rsvd"``."""
    if method == "svd":
        return "svd"
    if method == "rsvd_always":
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


def bytes_per_matrix(m: int, n: int, r: int, weight_dtype: torch.dtype, oversample: Optional[int] = None,
                     niter: Optional[int] = None) -> int:
    """Peak working memory of one m×n matrix in a batched init call: its effective weight in the
    working precision (fp32, fp64 for fp64 weights), the stacked batch, rsvd's normalised copy and
    bf16 iteration copy, the weight itself, and rsvd's Krylov basis at its widest (``niter + 1``
    blocks, ``MAX_TOL_ITERS + 1`` with the default tol, at most min(m, n) columns: the basis and
    its W·Z products, their fp64 copy for the Gram update, and ~6 fp64 d×d matrices: the Gram
    matrix, the eigen-solver's copies and vectors)."""
    b = min(r + (default_oversample(r) if oversample is None else oversample), m, n)
    d = min(((MAX_TOL_ITERS if niter is None else niter) + 1) * b, m, n)
    elt = torch.empty((), dtype=weight_dtype).element_size()
    w = 8 if weight_dtype == torch.float64 else 4
    return m * n * (3 * w + 2 + elt) + (m + n) * d * w + max(m, n) * d * 8 + 6 * 8 * d * d


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
    A, S_, B = _round_adapters(U, S, Vh, adapter_dtype or weight_dtype)
    work = _work_dtype(W)
    with no_tf32():
        W_r = W.to(work) - scale * (B.to(work) * S_.to(work)[..., None, :]) @ A.to(work)
    return W_r.to(weight_dtype).contiguous(), A, S_, B


def _round_adapters(U, S, Vh, adapter_dtype):
    """``(A, S, B)`` = ``(Vh, S, U)`` rounded to ``adapter_dtype``, each owning its storage."""
    return tuple(t.to(adapter_dtype).clone(memory_format=torch.contiguous_format) for t in (Vh, S, U))


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
    into chunks where the group does not fit in ``chunk_bytes`` (default: a fraction of the
    memory free now, :func:`memory_budget`) or holds more than ``CHUNK_ELEMENTS`` weight elements
    (8 × 4096²: so that large groups spread over ranks). Everything is validated before any layer changes.
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
    ``chunk_bytes`` (ranks take the smallest chunk size any of them can hold; ``seed`` defaults to
    0, as everywhere in init). ``report``'s ``iterations`` and ``error_estimate`` then cover this rank's
    chunks; the progress bar runs on rank 0.

    DeepSpeed ZeRO-3 weights (partitioned by ``deepspeed.zero.Init``, or transformers'
    ``from_pretrained`` under a ZeRO-3 config; every rank must call, with the same layers): always
    shared out as with ``distributed=True``. The chunks go in rounds of one per rank: each weight
    is gathered (``deepspeed.zero.GatheredParameters``, an all-gather: every rank briefly holds
    that one weight) and kept by its chunk's owner only; the owners decompose at once. Once all
    succeeded, each chunk's factors are broadcast and its owner writes ``W_r`` (a second gather,
    ``modifier_rank=owner``): no layer changes if any rank fails. A rank holds at most one chunk of
    full weights and one gathered weight; the initial adapter buffers are full on every rank. The
    result equals a one-process init of the same weights bit for bit (same ``seed``,
    ``chunk_bytes`` and BLAS thread count). ``weight_dtype`` / ``adapter_dtype`` must be None (DeepSpeed owns the dtypes).

    FSDP2-sharded weights (DTensor parameters sharded on dim 0 over a 1-D mesh of all ranks, as
    ``fully_shard`` leaves them; the layers made by :func:`sorsa_kernels.apply_sorsa` with
    ``init=None`` before ``fully_shard``, their base weights loaded after; every rank must call):
    always shared out as with ``distributed=True``. Each weight is gathered on its chunk's owner
    only (``torch.distributed.gather`` of the shards: no other rank ever holds it whole), the owners
    decompose at once, and once all succeeded each chunk's factors are broadcast, its owner gathers
    the weight again and scatters ``W_r``'s shards, and every rank writes its shards of A, S, B (in
    the parameters' own dtypes: ``weight_dtype`` / ``adapter_dtype`` must be None). A layer never
    initialised decomposes its base weight alone (its adapters' values are unknown after
    ``to_empty``); one initialised before re-decomposes ``W_r + scale·B·diag(S)·A``. Equal bit for bit
    to a one-process init of the same weights with ``adapter_dtype`` = the adapters' dtype.
    Adapters left on the meta device next to a real weight (a model built on the meta device,
    :func:`sorsa_kernels.apply_sorsa` with ``init=None``, then its base weights loaded with
    ``load_state_dict(..., assign=True)``) are first made zeros, so the base weight is decomposed:
    such layers may be initialised one at a time as their weights arrive.
    """
    layers = list(layers)  # sk.sorsa_layers(model) is a generator: counted (progress) and walked twice
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
        if svd_kwargs.get("seed") is None:  # explicit, as apply_sorsa's: never the global RNG
            svd_kwargs = {**svd_kwargs, "seed": 0}
    groups: Dict[tuple, list] = defaultdict(list)
    zero = sharded = None
    for layer in layers:
        if layer.r == 0:
            raise ValueError("sorsa_init needs r >= 1; a layer has r = 0 (no adapters)")
        if quant.is_params4bit(layer.weight):
            raise TypeError("init_layers: a 4-bit SORSA layer cannot be re-decomposed (its W_r lost the quantization "
                            "error); initialise from the full-precision base with sk.apply_sorsa(..., quantize=...)")
        if layer.weight.is_meta:
            raise ValueError("cannot initialise SORSA adapters on the meta device (the weights hold no values): "
                             "pass init=None (apply_sorsa) and initialise after loading real weights")
        if is_dtensor(layer.weight):
            check_layout(_zero_params(layer), "init_layers")
        elif _fsdp_unsharded(layer):
            raise ValueError("init_layers: an FSDP2 layer's parameters are unsharded (after a forward with "
                             "reshard_after_forward=False, or between forward and backward); an init now would be "
                             "lost at the next reshard: call model.reshard() first")
        if sharded is not None and is_dtensor(layer.weight) != sharded:
            raise ValueError("init_layers: some weights are sharded DTensors and some are not; pass layers of one model")
        sharded = is_dtensor(layer.weight)
        if zero is not None and is_partitioned(layer.weight) != zero:
            raise ValueError("init_layers: some weights are DeepSpeed ZeRO-3 partitions and some are not; "
                             "pass layers of one model")
        zero = is_partitioned(layer.weight)
        out_f, in_f = full_shape(layer.weight)
        groups[(max(out_f, in_f), min(out_f, in_f), layer.r, layer.weight.dtype, layer.weight.device)].append(layer)
    if zero and (weight_dtype is not None or adapter_dtype is not None):
        raise ValueError(f"init_layers: weight_dtype and adapter_dtype must be None for DeepSpeed ZeRO-3 weights "
                         f"(DeepSpeed owns the parameters' dtypes), got {weight_dtype}, {adapter_dtype}")
    if sharded and (weight_dtype is not None or adapter_dtype is not None):
        raise ValueError(f"init_layers: weight_dtype and adapter_dtype must be None for sharded (DTensor) weights "
                         f"(their shards keep the parameters' dtypes), got {weight_dtype}, {adapter_dtype}")
    dist_ = _distributed(distributed, layers, bool(zero), bool(sharded)) if groups else None
    for layer in layers:
        _materialise_meta_adapters(layer)
    # the plan: (group key, method, chunk of layers) in one order on every rank
    sizes = []
    for (m, n, r, dtype, device), members in groups.items():
        budget = memory_budget(device) if chunk_bytes is None else chunk_bytes
        sizes.append(min(max(1, budget // bytes_per_matrix(m, n, r, dtype, svd_kwargs.get("oversample"),
                                                                 svd_kwargs.get("niter"))),
                          max(1, CHUNK_ELEMENTS // (m * n))))
    if dist_ is not None:
        sizes = _agree_on_chunks(dist_, groups, sizes, bool(zero), bool(sharded))
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

    def decompose(key, chosen, chunk, Ws=None):
        m, n, r, dtype, device = key
        t0 = time.perf_counter()
        if Ws is None:
            Ws = [layer.init_weight() for layer in chunk]
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

    def install(i, U, S, Vh):
        key, chosen, chunk = plan[i]
        for j, layer in enumerate(chunk):
            if sharded:
                _install_sharded(layer, owners[i], *_oriented(layer, U[j], Vh[j]), S[j])
                continue
            # ZeRO-3: W_r and the adapters leave with the owner's values (a no-op context otherwise)
            with gathered(_zero_params(layer) if zero else (), modifier_rank=owners[i]):
                Ui, Vhi = _oriented(layer, U[j], Vh[j])
                if zero and owners[i] != rank:  # the owner's W_r arrives on leaving the context
                    parts = (layer.w.detach(), *_round_adapters(Ui, S[j], Vhi, adapter_dtype or layer.weight.dtype))
                else:
                    parts = adapters_from_factors(layer.init_weight(), Ui, S[j], Vhi, layer.scale,
                                                  weight_dtype or layer.weight.dtype, adapter_dtype)
                layer.set_decomposition(*parts)
        if bar is not None:
            bar.set_postfix_str(f"{key[0]}x{key[1]} r={key[2]} ×{entries[key]['count']} {chosen}")
            bar.update(len(chunk))

    paused = contextlib.ExitStack()
    if zero:  # inside a zero.Init block its constructors would make the SVD's float tensors the model's dtype
        from .integrations.deepspeed_init import paused_zero_init

        paused.enter_context(paused_zero_init())
    try:
        # a rank first decomposes its own chunks (all ranks at once), then every chunk's factors are
        # broadcast from its owner (one collective per chunk) and applied everywhere, in plan order
        mine, failure = {}, None
        if zero or sharded:
            mine = _decompose_rounds(dist_, plan, owners, decompose,
                                     _zero_effective_weight if zero else _sharded_effective_weight)
        elif dist_ is not None:
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
            install(i, U, S, Vh)
    finally:
        paused.close()
        if bar is not None:
            bar.close()
    if report is not None:
        report.extend(entries.values())


def _own_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed(distributed: Optional[bool], layers, zero: bool = False, sharded: bool = False):
    """``torch.distributed`` when the init is split over ranks (``distributed=True``, or ZeRO-3 or
    sharded DTensor weights, which every rank must gather together anyway), else None."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None or a bool, got {distributed!r}")
    if sharded:  # check_layout: an initialised group, a mesh of all its ranks
        import torch.distributed as dist

        return dist
    if zero:
        from .integrations.deepspeed_init import check_partitioned_over_world

        check_partitioned_over_world([p for layer in layers for p in _zero_params(layer)], "init_layers")
        import torch.distributed as dist

        return dist
    if not distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise RuntimeError("init_layers(distributed=True) needs an initialised torch.distributed process group "
                           "with more than one rank")
    if dist.get_backend() == "nccl":
        devs = {layer.weight.device for layer in layers}
        if any(d.type != "cuda" or d.index != torch.cuda.current_device() for d in devs):
            raise ValueError(f"init_layers(distributed=True) over NCCL needs every weight on this rank's current "
                             f"CUDA device (torch.cuda.set_device(local_rank) first), got {sorted(map(str, devs))}")
    return dist


def _comm_device(dist, device: torch.device) -> torch.device:
    """Where a collective's tensors live (see :func:`_zero3.comm_device`: gloo on the CPU,
    DeepSpeed's accelerator when deepspeed is imported, else CUDA under NCCL)."""
    return comm_device(dist)


def _agree_on_chunks(dist, groups, sizes, zero: bool = False, sharded: bool = False):
    """Every rank must hold the same weights (a rank gets the factors another decomposed) and cut
    the same chunks (the rsvd sketch depends on the batch): compare shapes and a float64
    fingerprint (sum, sum of squares) of every weight across ranks, and take the smallest chunk
    size of each group (free memory differs). ZeRO-3 and sharded weights are one copy by
    construction: their DeepSpeed ids, or the layers' shapes and scales, are compared instead (the
    same layers, in the same order, on every rank)."""
    mine = []
    for k, v in groups.items():
        prints = []
        for layer in v:
            if zero:
                prints.append(layer.weight.ds_id)
                continue
            if sharded:
                prints.append((tuple(layer.weight.shape), layer.scale, getattr(layer, "_fresh", False)))
                continue
            W = layer.init_weight().to(torch.float64)
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


def _zero_params(layer) -> list:
    """The layer's parameters an init reads or writes (the bias is neither)."""
    return [layer.weight, layer.sorsa_A, layer.sorsa_S, layer.sorsa_B]


def _materialise_meta_adapters(layer) -> None:
    """Adapters still on the meta device next to a real weight become zeros on its device (so the
    effective weight is the base weight); a no-op otherwise."""
    if layer.weight.is_meta:
        return
    for name in ("sorsa_A", "sorsa_S", "sorsa_B"):
        p = getattr(layer, name)
        if p.is_meta:
            setattr(layer, name, torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=layer.weight.device),
                                                    requires_grad=p.requires_grad))


def _fsdp_unsharded(layer) -> bool:
    """Whether ``layer`` is an FSDP2 module whose parameters are currently unsharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch builds without distributed
        return False
    return isinstance(layer, FSDPModule) and not is_dtensor(layer.weight)


def _decompose_rounds(dist, plan, owners, decompose, fetch) -> dict:
    """ZeRO-3 / sharded weights: the factors of this rank's chunks, decomposed in rounds of one
    chunk per rank. Every rank takes part in fetching the round's weights one at a time, in plan
    order (``fetch(layer, owner)``: a collective, the whole effective weight on the owner only,
    None elsewhere); the owners then decompose at once, and a failure anywhere is raised on every
    rank before any layer changes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    queues = [[i for i, o in enumerate(owners) if o == w] for w in range(world)]
    device = plan[0][0][4]
    mine = {}
    for k in range(max(map(len, queues))):
        batch = sorted(q[k] for q in queues if k < len(q))
        Ws = []
        for i in batch:
            for layer in plan[i][2]:
                W = fetch(layer, owners[i])
                if owners[i] == rank:
                    Ws.append(W)
        failure = None
        try:
            for i in batch:
                if owners[i] == rank:  # one chunk of this rank per round
                    mine[i] = decompose(*plan[i], Ws=Ws)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
        del Ws
        _raise_if_any_failed(dist, failure, device)
    return mine


def _zero_effective_weight(layer, owner: int) -> Optional[torch.Tensor]:
    """ZeRO-3: the layer's effective weight on ``owner`` (every rank gathers: DeepSpeed's gather
    is an all-gather; only the owner keeps a copy)."""
    with gathered(_zero_params(layer)):
        if owner != _own_rank():
            return None
        W = layer.init_weight()
        # a view of the gathered data (merged layer) would not outlive the context
        same = W.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
        return W.clone() if same else W


def _sharded_effective_weight(layer, owner: int) -> Optional[torch.Tensor]:
    """Sharded (DTensor) layer: its effective weight (out×in) on ``owner`` only, gathered from the
    shards; the base weight alone while the adapters were never set (see
    :meth:`SORSALinear.init_weight`: after ``to_empty`` their values are garbage), else
    ``W + scale·B·diag(S)·A`` as :meth:`SORSALinear.effective_weight` computes it."""
    device = layer.weight.data.to_local().device
    W = gather_to(layer.weight, owner, device)
    with_adapters = layer.r > 0 and not layer.merged and not getattr(layer, "_fresh", False)
    adapters = [gather_to(p, owner, device) for p in (layer.sorsa_A, layer.sorsa_S, layer.sorsa_B)] \
        if with_adapters else None
    if W is None:
        return None
    W = W.T if layer.fan_in_fan_out else W
    if not with_adapters:
        return W
    d = layer._delta(*adapters)
    return W.to(d.dtype) + d


def _oriented(layer, U: torch.Tensor, Vh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A chunk's factors are of its m ≥ n orientation: (U, Vh) of the layer's out×in weight."""
    return (Vh.mT, U.mT) if layer.w.shape[0] < layer.w.shape[1] else (U, Vh)


def _install_sharded(layer, owner: int, U: torch.Tensor, Vh: torch.Tensor, S: torch.Tensor) -> None:
    """Sharded layer: the owner gathers the effective weight again and scatters ``W_r``'s shards;
    every rank writes its shards of A, S, B from the (broadcast, identical) factors rounded to the
    adapters' dtype, and records the whole initial adapter."""
    import torch.distributed as dist

    W, failure = _sharded_effective_weight(layer, owner), None
    W_r = None
    try:
        if W is not None:
            W_r, A, S_, B = adapters_from_factors(W, U, S, Vh, layer.scale, layer.weight.dtype, layer.sorsa_A.dtype)
            del W
            W_r = W_r.T if layer.fan_in_fan_out else W_r
        else:
            A, S_, B = _round_adapters(U, S, Vh, layer.sorsa_A.dtype)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on the owner: raised on every rank, not a hang
        failure = e
    _raise_if_any_failed(dist, failure, U.device)
    scatter_from_(layer.weight, W_r, owner)
    for p, full in zip((layer.sorsa_A, layer.sorsa_S, layer.sorsa_B), (A, S_, B)):
        write_rows_(p, full)
    layer._record_initial(A, S_, B)
    layer.merged = False


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
