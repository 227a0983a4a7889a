"""Launchers for the SORSA linear Triton kernels: shapes, strides, configs, grids.

Contract with the AOT check (:mod:`sorsa_kernels.aot_check`, through :mod:`.aot`, drives ``linear_fwd``/``linear_bwd`` on
META tensors and captures every Triton launch instead of running it):
  * no data-dependent host reads: the dropout seed is a host int read from a CPU tensor
    (a meta seed reads as 0); nothing else is read back;
  * the SM count comes only from :func:`sorsa_kernels._device.num_sms`, the architecture only
    from :func:`sorsa_kernels._device.device_capability` (the check monkeypatches both);
  * every launch runs under :func:`sorsa_kernels._device.device_guard` (a no-op off CUDA);
  * ``CONFIGS`` lists every config a kernel may launch with (autotuned roles), ``PINNED``
    the fixed configs of the deterministic reductions and ``TMA_CONFIGS`` the sm_90 TMA
    kernel's (chosen by M bucket, host ``TensorDescriptor`` arguments): compile them all.

Kernels and when they run:
  * sm_90, fp16/bf16, main GEMM (forward y, backward dX with or without dropout: the masked
    rank-r term is computed first and masked in registers, see the kernel), operands
    TMA-legal (16-byte aligned, one unit stride): ``sorsa_mm_tma_kernel``, persistent,
    config by M bucket (``TMA_CONFIGS``). Host ``TensorDescriptor`` and descriptor
    ``.load``/``.store`` exist in both Triton 3.6 (the H200 image) and 3.8; warp
    specialisation is not used (its API differs between the two and could not be timed).
  * everything else (sm_80, fp32, the skinny GEMMs, the interpreter):
    ``sorsa_mm_kernel`` (cp.async pointer loads, persistent, rank-r segment inside the K loop).
  * dA, dBᵀ: ``sorsa_tn_kernel`` with a pinned config.

Why these kernels and configs (cost arguments, register and shared-memory counts, what was
counted rather than timed): docs/design.md, "Launcher design log".
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import triton

from ... import _device
from ..._env import triton_interpret
from .kernels import (FP_FUSION, sorsa_gdb_kernel, sorsa_mm_kernel, sorsa_mm_tma_kernel, sorsa_scale_kernel,
                             sorsa_tn_kernel)

from triton.runtime.errors import OutOfResources

from triton.tools.tensor_descriptor import TensorDescriptor  # host descriptors: triton >= 3.4


def _cfg(bm, bn, bk, w, s, **kw):
    names = ("BLOCK_A", "BLOCK_B", "BLOCK_M") if kw.pop("tn", False) else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    d = dict(zip(names, (bm, bn, bk)), **({} if names[0] == "BLOCK_A" else {"GROUP_M": 8}))
    return triton.Config(d, num_warps=w, num_stages=s)


# (role, fp32?) -> configs. Flags each role compiles with are in ROLE_FLAGS.
CONFIGS = {
    ("main", False): [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 32, 4, 4)],
    ("main", True): [_cfg(64, 64, 16, 8, 3)],
    ("main_drop", False): [_cfg(64, 128, 64, 8, 3), _cfg(64, 64, 64, 4, 3)],
    ("main_drop", True): [_cfg(32, 64, 32, 4, 3)],
    ("skinny", False): [_cfg(64, 32, 64, 8, 3), _cfg(64, 64, 64, 4, 3), _cfg(64, 128, 64, 8, 3)],
    ("skinny", True): [_cfg(32, 32, 16, 4, 3)],  # 32×32×32/2 stages spilled 4 B (sm_90, triton 3.9)
    ("tn", False): [_cfg(32, 128, 32, 4, 3, tn=True), _cfg(64, 128, 32, 4, 3, tn=True),
                    _cfg(128, 128, 32, 8, 3, tn=True)],
    # fp32 64×64 at 4 warps spilled 8 B on sm_80 under triton 3.6: 8 warps
    ("tn", True): [_cfg(32, 64, 16, 4, 3, tn=True), _cfg(64, 64, 16, 8, 3, tn=True),
                   _cfg(128, 64, 16, 8, 3, tn=True)],
}
ROLE_FLAGS = {
    "main": dict(HAS_SEG2=True, HAS_BIAS=True, DROP_IN=False, DROP_OUT=False, BIG=False),
    "main_drop": dict(HAS_SEG2=True, HAS_BIAS=False, DROP_IN=False, DROP_OUT=True, BIG=False),
    "skinny": dict(HAS_SEG2=False, HAS_BIAS=False, DROP_IN=True, DROP_OUT=False, BIG=False),
    "tn": dict(DROP_Q=True, BIG=False),
}
# M_BUCKET (next power of two of M) is in the key: the first M seen must not fix the config
# for every later M (a decode step of M=8 and a prefill of M=8192 get their own picks).
_MM_KEY = ["M_BUCKET", "N", "K", "R", "HAS_SEG2", "DROP_IN", "DROP_OUT"]
_TUNED = {key: triton.autotune(cfgs, key=_MM_KEY)(sorsa_mm_kernel)
          for key, cfgs in CONFIGS.items() if key[0] != "tn"}
# dA and dBᵀ are documented deterministic (split-M partials summed in a fixed order): their
# config is pinned, never a timing-dependent autotune pick (which could change BLOCK_M and
# with it the summation order from one process to the next).
# BLOCK_A (the r-extent of a dA/dBᵀ tile) follows r by a fixed rule (:func:`_tn_block_a`): one
# tile row covers r <= 128, so dA's dropout mask over x is generated once, not r/32 times.
PINNED = {"tn": {fp32: {c.kwargs["BLOCK_A"]: c for c in CONFIGS[("tn", fp32)]} for fp32 in (False, True)}}
TN_MAX_BLOCK_A = 128
# sm_90 TMA main GEMM (fp16/bf16, unmasked fused [x|s]·[W|B]ᵀ): one config per M bucket by
# a fixed rule (no autotune: no descriptor re-blocking hook, and the AOT check compiles
# exactly these). 128×256×64 / 8 warps / 3 stages is the persistent-matmul tutorial's
# Hopper bf16 tile (TMA boxes 16 + 32 KB per stage, 144 KB smem, epilogue halves).
TMA_CONFIGS = {
    "large": _cfg(128, 256, 64, 8, 3),   # M >= 1024
    "medium": _cfg(128, 128, 64, 8, 4),  # 128 <= M < 1024
    "small": _cfg(64, 128, 64, 4, 4),    # M < 128 (decode)
}
# (BLOCK_M, BLOCK_N, BLOCK_K) tiles whose flattened variant did not fit in shared memory at launch
# in this process (see _fused_matmul_tma): they take the nested loop from then on.
_FLATTEN_TOO_BIG: set = set()
# The interpreter runs numpy: one small config keeps the tests fast and hits ragged edges.
INTERP_MM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
INTERP_TMA = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)  # BN 32: epilogue halves run too
INTERP_TN = dict(BLOCK_A=16, BLOCK_B=16, BLOCK_M=16)
INTERP_SCALE = dict(BLOCK_M=16, BLOCK_R=16)
SPLIT_M_GRAIN = 64  # every split of M is a multiple of every TN config's BLOCK_M
# One pass over dY for g and dB (``sorsa_gdb_kernel``), pinned like the TN configs (its split-M
# and split-N sums must not depend on a timing): fp32? -> (BLOCK_M, BLOCK_N, warps, stages).
# BLOCK_R = next power of two of r in [16, GDB_MAX_R]; the dB tile (BLOCK_N × BLOCK_R fp32)
# lives in registers for the whole m-slice, so BLOCK_N shrinks as r grows (at most
# GDB_TILE elements: bf16 256×64 spilled 28 B on sm_90 and 180 B on sm_80, 128×64 still 8 B on
# sm_80, AOT check) and r is capped (the cost rule picks r <= 17 at N = 4096 anyway).
GDB_CONFIGS = {False: (64, 256, 8, 3), True: (32, 128, 8, 2)}
GDB_TILE = {False: 256 * 16, True: 64 * 32}  # fp32 64×64 spilled 80 B on sm_80 (triton 3.8)
GDB_MAX_R = 64
INTERP_GDB = dict(BLOCK_M=16, BLOCK_N=16)


@dataclass(frozen=True)
class LaunchOptions:
    """The launchers' design switches, read at launch time; the defaults are what ships (chosen by
    counting registers, shared memory and bytes, not by timing: ``ops.linear.ab`` times each flip).

    Attributes:
        tma_flatten: the unmasked sm_90 TMA GEMM with r <= BLOCK_K runs its persistent loop over
            (tile, k-step) flattened into one software pipeline (False: the nested loop).
        overlap: dA (and the two-pass dB) run on a side stream next to the dX GEMM (False: in line).
        one_pass_dy: force the one-pass (True) or two-pass (False) read of dY for g and dB
            (None: the byte-count rule, :func:`one_pass_dy`).
        reserve_sms: SMs the persistent dX GEMM leaves free while the side stream has work.
        force_tma: run the TMA kernel under the interpreter too (tests; host descriptors run there).
    """
    tma_flatten: bool = True
    overlap: bool = True
    one_pass_dy: Optional[bool] = None
    reserve_sms: int = 0
    force_tma: bool = False


_options = LaunchOptions()
_options_lock = threading.Lock()


def options() -> LaunchOptions:
    """The switches in effect (see :func:`launch_options`)."""
    return _options


@contextlib.contextmanager
def launch_options(**changes) -> Iterator[LaunchOptions]:
    """Change some :class:`LaunchOptions` inside the ``with`` block, restored on exit::

        with launch_options(overlap=False):
            loss = step(batch); loss.backward()

    Process-wide, not per thread (autograd runs a CUDA backward on its own worker thread, which
    must see the forward's options): wrap whole steps, and do not change options from several
    threads at once. A CUDA graph keeps the options in force when it was captured.
    """
    global _options
    unknown = sorted(set(changes) - set(LaunchOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown launch option(s) {unknown}; known: {sorted(LaunchOptions.__dataclass_fields__)}")
    with _options_lock:
        prev, _options = _options, dataclasses.replace(_options, **changes)
        mine = _options
    try:
        yield mine
    finally:
        with _options_lock:
            _options = prev


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (as torch's default matmul), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return triton_interpret() and dtype == torch.bfloat16


def _programs(device: torch.device, reserve_sms: int) -> int:
    """Programs of a persistent grid: one per SM, less ``reserve_sms`` left free for other streams."""
    n = _device.num_sms(device)
    return max(1, n - min(max(reserve_sms, 0), n - 1))


def _max_offset(*ts: torch.Tensor) -> int:
    # largest element offset any index expression of these operands can form
    return max((sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride()) if d > 0) for t in ts), default=0)


def _big(*ts: torch.Tensor, extra: int = 0) -> bool:
    """True when some offset can reach 2^31 elements: the kernel then indexes in int64."""
    return max(_max_offset(*ts), extra) >= 2 ** 31 - 1


def _seed_int(seed: Union[torch.Tensor, int, None]) -> int:
    if seed is None:
        return 0
    if isinstance(seed, torch.Tensor):
        # a CPU tensor (sorsa_linear draws it from torch's CPU generator): no device sync;
        # a meta seed (AOT check, meta forward) has no value and reads as 0.
        return 0 if seed.device.type == "meta" else int(seed.reshape(-1)[0])
    return int(seed)


def _m_bucket(M: int) -> int:
    return triton.next_power_of_2(max(M, 1))


def _drop_args(p: float, ld: int) -> Tuple[int, float, int]:
    # keep iff top 24 bits of the element's Philox word >= thr (p quantised to 2^-24)
    return int(round(p * 2 ** 24)), 1.0 / (1.0 - p), triton.cdiv(max(ld, 1), 4)


def _k_splits(M: int, N: int, K: int, device: torch.device) -> int:
    """Split-K factor of the skinny GEMMs (N = r): enough (M/64 × N/64) tiles × splits to
    fill two waves of SMs, each split at least 256 deep so partials stay cheap."""
    tiles = triton.cdiv(M, 64) * triton.cdiv(N, 64)
    depth = 64 if triton_interpret() else 256  # the interpreter runs the same path on tiny K
    return max(1, min(triton.cdiv(2 * _device.num_sms(device), tiles), K // depth))


def padded_rows(M: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An (M, r) view whose row stride is r rounded up to 16 bytes (a TMA-legal stride);
    the padding columns are never read (descriptors use the logical shape)."""
    step = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return torch.empty((M, triton.cdiv(max(r, 1), step) * step), dtype=dtype, device=device)[:, :r]


def _tma_operand(t: torch.Tensor) -> Optional[bool]:
    """None if ``t`` (2-D) cannot back a descriptor, else True when its *rows* are contiguous
    (stride (ld, 1)), False when its columns are (stride (1, ld))."""
    es = t.element_size()
    if t.data_ptr() % 16 or t.dim() != 2:
        return None
    # the other stride must step past a whole row/column: an expanded view (stride 0) or
    # overlapping rows cannot back a descriptor (TMA needs distinct, 16-byte aligned rows)
    if t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1) and (t.stride(0) * es) % 16 == 0:
        return True
    if t.stride(0) == 1 and t.stride(1) >= max(t.shape[0], 1) and (t.stride(1) * es) % 16 == 0:
        return False
    return None


def _tma_capable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the main GEMM of ``dtype`` on ``device`` may take the TMA kernel (layouts aside)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if triton_interpret():
        return options().force_tma
    return _device.device_capability(device)[0] >= 9


def _use_tma(x1, w1, x2, w2, out) -> bool:
    if x2 is None or not _tma_capable(x1.dtype, x1.device):
        return False
    return (_tma_operand(x1) is True and _tma_operand(x2) is True and _tma_operand(out) is True
            and _tma_operand(w1) is not None and _tma_operand(w2) is not None)


def _tma_config(M: int) -> dict:
    cfg = TMA_CONFIGS["large" if M >= 1024 else "medium" if M >= 128 else "small"]
    return cfg.all_kwargs()


def _fused_matmul_tma(x1, w1, x2, w2, bias, out, seed: int = 0, p: float = 0.0, drop_out: bool = False,
            drop_ld: int = 0, reserve_sms: int = 0) -> torch.Tensor:
    """Launch ``sorsa_mm_tma_kernel``: ``out = x1·w1ᵀ + drop_out(x2·w2ᵀ) + bias`` (see ``fused_matmul``)."""
    M, K = x1.shape
    N, R = w1.shape[0], x2.shape[1]
    cfg = INTERP_TMA if triton_interpret() else _tma_config(M)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    epi_sub = BN >= 32
    w_t = not _tma_operand(w1)   # w1 (N, K) with contiguous columns: a (K, N) row-major tensor
    b_t = not _tma_operand(w2)

    def desc(t, block, transposed=False):
        t = t.t() if transposed else t
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block)

    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    launch = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    descs = (desc(x1, [BM, BK]),
             desc(w1, [BK, BN], True) if w_t else desc(w1, [BN, BK]),
             desc(x2, [BM, BK]),
             desc(w2, [BK, BN], True) if b_t else desc(w2, [BN, BK]),
             bias if bias is not None else out,
             desc(out, [BM, BN // 2 if epi_sub else BN]))
    grid = (min(_programs(x1.device, reserve_sms), triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    flatten = options().tma_flatten and not drop_out and R <= BK and (BM, BN, BK) not in _FLATTEN_TOO_BIG

    def run(flat: bool):
        sorsa_mm_tma_kernel[grid](*descs, M, N, K, R, _m_bucket(M), seed, *_drop_args(p, drop_ld),
                                  HAS_BIAS=bias is not None, W_T=w_t, B_T=b_t, UPCAST=_upcast(x1.dtype),
                                  EPI_SUB=epi_sub, DROP_OUT=drop_out, FLATTEN=flat,
                                  enable_fp_fusion=FP_FUSION["sorsa_mm_tma_kernel"], **meta, **launch)

    with _device.device_guard(x1.device):
        try:
            run(flatten)
        except OutOfResources:
            # The flattened loop uses 229,416 of sm_90's 232,448 B of shared memory (AOT): a Triton
            # that adds scratch space fails it at launch (nothing ran). The nested loop (181 KB)
            # computes the same tile; remembered for the process so the failure is paid once.
            if not flatten:
                raise
            _FLATTEN_TOO_BIG.add((BM, BN, BK))
            run(False)
    return out


def fused_matmul(
    x1: torch.Tensor, w1: torch.Tensor, out: torch.Tensor, *,
    x2: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None, seed: Union[int, torch.Tensor, None] = None,
    p: float = 0.0, drop_in: bool = False, drop_out: bool = False, drop_ld: int = 0,
    k_splits: int = 1, reserve_sms: int = 0,
) -> torch.Tensor:
    """``out = drop_in(x1)·w1ᵀ + drop_out(x2·w2ᵀ) + bias``; x1 (M,K), w1 (N,K), x2 (M,R), w2 (N,R).

    With ``k_splits > 1`` (only without ``x2``/``bias``) ``out`` is a (k_splits, M, N) fp32
    buffer of split-K partials, summed by the caller in a fixed order.
    """
    M, K = x1.shape
    N = w1.shape[0]
    has2 = x2 is not None
    bias = None if bias is None else bias.contiguous()  # both kernels read it with unit stride
    # every split would add the rank-r term and the bias again
    assert k_splits == 1 or (x2 is None and bias is None), "split-K partials take no x2 or bias"
    R = x2.shape[1] if has2 else 0
    x2_, w2_ = (x2, w2) if has2 else (x1, w1)
    if M == 0 or N == 0:
        return out
    # a mask whose Philox counter needs int64 (x with >= 2^33 elements) takes the pointer kernel
    if (k_splits == 1 and _use_tma(x1, w1, x2, w2, out) and not drop_in
            and not (drop_out and _big(extra=M * drop_ld))):
        return _fused_matmul_tma(x1, w1, x2, w2, bias, out, _seed_int(seed), p, drop_out, drop_ld, reserve_sms)
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    k_per = triton.cdiv(triton.cdiv(K, k_splits), 64) * 64  # a multiple of every BLOCK_K
    splits = triton.cdiv(K, k_per)
    assert splits == out3.shape[0], "out must hold one partial per K split"
    big = _big(x1, w1, x2_, w2_, out3, extra=M * drop_ld if (drop_in or drop_out) else 0)
    thr, inv_keep, ld4 = _drop_args(p, drop_ld)
    args = (x1, w1, x2_, w2_, bias if bias is not None else out3, out3, _seed_int(seed),
            M, N, K, R, _m_bucket(M), k_per,
            x1.stride(0), x1.stride(1), w1.stride(0), w1.stride(1),
            x2_.stride(0), x2_.stride(1), w2_.stride(0), w2_.stride(1),
            out3.stride(0), out3.stride(1), out3.stride(2),
            thr, inv_keep, ld4)
    flags = dict(HAS_SEG2=has2, HAS_BIAS=bias is not None, DROP_IN=drop_in, DROP_OUT=drop_out,
                 BIG=big, UPCAST=_upcast(x1.dtype), PREC=_prec(x1.dtype),
                 enable_fp_fusion=FP_FUSION["sorsa_mm_kernel"])
    progs = _programs(x1.device, reserve_sms)  # persistent: at most one program per SM

    def grid(meta):
        return (min(progs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])), splits)

    with _device.device_guard(x1.device):
        if triton_interpret():
            sorsa_mm_kernel[grid(INTERP_MM)](*args, **flags, **INTERP_MM)
        else:
            role = ("main_drop" if drop_out else "main") if has2 else "skinny"
            _TUNED[(role, x1.dtype == torch.float32)][grid](*args, **flags)
    return out


def _tn_block_a(DA: int, cap: int = TN_MAX_BLOCK_A) -> int:
    """r-extent of the pinned dA/dBᵀ tile: next power of two of r in [32, cap] (a shape rule,
    never a timing, so the split-M summation order is the same in every process)."""
    return max(32, min(triton.next_power_of_2(max(DA, 1)), cap))


def tn_matmul(p_mat: torch.Tensor, q: torch.Tensor, *, seed: Optional[torch.Tensor] = None,
       p: float = 0.0, drop_q: bool = False, drop_ld: int = 0) -> torch.Tensor:
    """fp32 ``p_matᵀ·drop(q)``: p_mat (M, DA), q (M, DB) → (DA, DB); split over M, summed in order."""
    M, DA = p_mat.shape
    DB = q.shape[1]
    if M == 0:  # an expert with no tokens: the sum over an empty M is zero
        return torch.zeros((DA, DB), dtype=torch.float32, device=q.device)
    interp = triton_interpret()
    if interp or M <= SPLIT_M_GRAIN:
        splits = 1
    else:
        tiles = triton.cdiv(DA, _tn_block_a(DA)) * triton.cdiv(DB, 128)
        splits = max(1, min(triton.cdiv(M, 4 * SPLIT_M_GRAIN), (2 * _device.num_sms(q.device)) // tiles))
    m_per = triton.cdiv(triton.cdiv(M, splits), SPLIT_M_GRAIN) * SPLIT_M_GRAIN
    splits = triton.cdiv(M, m_per)
    part = torch.empty((splits, DA, DB), dtype=torch.float32, device=q.device)
    big = _big(p_mat, q, part, extra=M * drop_ld if drop_q else 0)
    args = (p_mat, q, part, _seed_int(seed),
            M, DA, DB, m_per,
            p_mat.stride(0), p_mat.stride(1), q.stride(0), q.stride(1),
            part.stride(0), part.stride(1), part.stride(2),
            *_drop_args(p, drop_ld))
    flags = dict(DROP_Q=drop_q, BIG=big, UPCAST=_upcast(q.dtype), PREC=_prec(q.dtype),
                 enable_fp_fusion=FP_FUSION["sorsa_tn_kernel"])
    cfg = INTERP_TN if interp else PINNED["tn"][q.dtype == torch.float32][_tn_block_a(DA)].all_kwargs()
    meta = {k: cfg[k] for k in ("BLOCK_A", "BLOCK_B", "BLOCK_M")}
    launch = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    grid = (triton.cdiv(DA, meta["BLOCK_A"]), triton.cdiv(DB, meta["BLOCK_B"]), splits)
    with _device.device_guard(q.device):
        sorsa_tn_kernel[grid](*args, **flags, **meta, **launch)
    return part[0] if splits == 1 else part.sum(0)


def one_pass_dy(M: int, N: int, R: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the backward reads dY once for both ``g = dY·B`` and ``dB = dYᵀ·s``.

    Cost rule (HBM bytes, counted, not timed): one pass saves a read of dY (M·N·e bytes) but
    writes and re-reads split-N partials of g (fp32, one (M, r) slice per BLOCK_N columns)
    where the two-pass shrink writes ``_k_splits`` of them: extra 8·(N/BLOCK_N − splits)·M·r
    bytes. Taken when that extra is at most half the saved read (a 2× margin: the partials
    are written from every program at once). bf16, N = 4096 (BLOCK_N = 256 for r <= 16, 128 up
    to r = 32): r <= 17, so r = 16 reads dY once and r = 128 keeps the two passes (the partials would cost more than
    dY itself).
    """
    if R > GDB_MAX_R or M == 0 or N == 0:
        return False
    if options().one_pass_dy is not None:
        return options().one_pass_dy
    n_blocks = triton.cdiv(N, _gdb_block_n(R, dtype == torch.float32))
    extra = 16 * max(0, n_blocks - _k_splits(M, R, N, device)) * R  # per row, 2× margin included
    return extra <= N * torch.empty((), dtype=dtype).element_size()


def _gdb_block_n(R: int, fp32: bool) -> int:
    return min(GDB_CONFIGS[fp32][1], GDB_TILE[fp32] // max(16, triton.next_power_of_2(R)))


def g_and_db(dy: torch.Tensor, Bd: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``dy`` (M, N): fp32 split-N partials of ``dy·Bd`` (n_blocks, M, r) and
    split-M partials of ``dyᵀ·s`` (splits, N, r); ``Bd`` (N, r), ``s`` (M, r) in dy's dtype."""
    M, N = dy.shape
    R = Bd.shape[1]
    interp = triton_interpret()
    fp32 = dy.dtype == torch.float32
    bm, _, warps, stages = GDB_CONFIGS[fp32]
    meta = dict(INTERP_GDB) if interp else dict(BLOCK_M=bm, BLOCK_N=_gdb_block_n(R, fp32))
    meta["BLOCK_R"] = max(16, triton.next_power_of_2(R))
    launch = {} if interp else dict(num_warps=warps, num_stages=stages)
    n_blocks = triton.cdiv(N, meta["BLOCK_N"])
    grain = meta["BLOCK_M"]
    # split M until n_blocks × splits fills two waves, each split >= 4 m-tiles deep
    splits = max(1, min(triton.cdiv(2 * _device.num_sms(dy.device), n_blocks), triton.cdiv(M, 4 * grain)))
    m_per = triton.cdiv(triton.cdiv(M, splits), grain) * grain
    splits = triton.cdiv(M, m_per)
    g_part = torch.empty((n_blocks, M, R), dtype=torch.float32, device=dy.device)
    db_part = torch.empty((splits, N, R), dtype=torch.float32, device=dy.device)
    big = _big(dy, Bd, s, g_part, db_part)
    with _device.device_guard(dy.device):
        sorsa_gdb_kernel[(n_blocks, splits)](
            dy, Bd, s, g_part, db_part, M, N, R, m_per,
            dy.stride(0), dy.stride(1), Bd.stride(0), Bd.stride(1), s.stride(0), s.stride(1),
            g_part.stride(0), g_part.stride(1), g_part.stride(2),
            db_part.stride(0), db_part.stride(1), db_part.stride(2),
            BIG=big, UPCAST=_upcast(dy.dtype), PREC=_prec(dy.dtype),
            enable_fp_fusion=FP_FUSION["sorsa_gdb_kernel"], **meta, **launch)
    return g_part, db_part


_SIDE_STREAMS: Dict[int, "torch.cuda.Stream"] = {}


class _Side:
    """Handle yielded by :func:`side_stream`: ``run()`` makes the side stream current for the
    launches inside it; ``keep(t)`` marks a tensor made there that is used after the join."""

    def __init__(self, stream=None):
        self.stream, self.made = stream, []

    def run(self):
        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def keep(self, t):
        if self.stream is not None:
            self.made.append(t)
        return t


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[_Side]:
    """Fork a per-device side stream from the current stream on entry, join it back on exit.

    The fork is recorded at entry, *before* the body queues its current-stream work, so the side
    work (inside ``side.run()``) depends only on what was queued before the ``with``: the
    backward enters after ``gs`` is ready, queues the dX GEMM on the current stream, then dA/dB
    on the side stream, and the two run concurrently (their CTAs take the SMs the persistent
    GEMM's last wave leaves idle). Tensors made on the side stream and used afterwards go
    through ``side.keep(t)``: they are recorded on the current stream, so the caching allocator
    does not hand their memory to the side stream again before the current stream is done.

    In line (no side stream) for non-CUDA devices, with ``overlap=False`` (:class:`LaunchOptions`), and while a CUDA
    graph is being captured (no cross-stream allocator bookkeeping inside a capture). The join
    also runs when the body raises.
    """
    if device.type != "cuda" or not options().overlap:
        yield _Side()
        return
    with torch.cuda.device(device):  # the capture that matters is on the tensors' device
        capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        yield _Side()
        return
    main = torch.cuda.current_stream(device)
    stream = _SIDE_STREAMS.get(main.device_index)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(main.device_index, torch.cuda.Stream(device=device))
    side = _Side(stream)
    stream.wait_stream(main)  # fork: the side work reads what is queued so far (dy, gs, x, s)
    try:
        yield side
    finally:
        main.wait_stream(stream)  # join
        for t in side.made:
            if t is not None:
                t.record_stream(main)


def _shrink_partials(x: torch.Tensor, w: torch.Tensor, **drop) -> torch.Tensor:
    """fp32 split-K partials (splits, M, r) of ``drop(x)·wᵀ`` for a thin w (r rows)."""
    M, K = x.shape
    if M == 0 or K == 0:  # no rows, or an empty sum: one zero partial
        return torch.zeros((1, M, w.shape[0]), dtype=torch.float32, device=x.device)
    splits = _k_splits(M, w.shape[0], K, x.device)
    k_per = triton.cdiv(triton.cdiv(K, splits), 64) * 64
    splits = triton.cdiv(K, k_per)
    part = torch.empty((splits, M, w.shape[0]), dtype=torch.float32, device=x.device)
    fused_matmul(x, w, part, k_splits=splits, **drop)
    return part


SCALE_BLOCK = dict(BLOCK_M=64, BLOCK_R=32, num_warps=4)  # a bandwidth-trivial M·r pass


def reduce_scale(part: torch.Tensor, S: torch.Tensor, scale: float,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``xa = Σ_s part[s]`` (fp32, fixed order) and ``s = xa·S·scale`` in ``dtype``
    with a 16-byte row stride (:func:`padded_rows`, TMA-legal). Replaces the sum, the two
    multiplies and the cast-copy that used to follow every skinny GEMM."""
    splits, M, R = part.shape
    S = S.contiguous()  # read with unit stride by the kernel (S[:, 0] of a matrix is a strided view)
    out = padded_rows(M, R, dtype, part.device)
    xa = part[0] if splits == 1 else torch.empty((M, R), dtype=torch.float32, device=part.device)
    if M == 0 or R == 0:
        return xa, out
    cfg = INTERP_SCALE if triton_interpret() else SCALE_BLOCK
    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_R")}
    launch = {k: cfg[k] for k in ("num_warps",) if k in cfg}
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"]))
    with _device.device_guard(part.device):
        sorsa_scale_kernel[grid](part, S, out, xa, splits, M, R, float(scale),
                                 part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
                                 xa.stride(0), xa.stride(1), WRITE_XA=splits > 1, BIG=_big(part, out),
                                 enable_fp_fusion=FP_FUSION["sorsa_scale_kernel"], **meta, **launch)
    return xa, out


def _rank_weight(B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B as the main GEMM's ``[s | B]`` operand: B itself when it already has ``dtype`` and a
    layout the chosen kernel reads (any strides for the pointer kernel, TMA-legal for sm_90);
    otherwise one fused cast + pad copy to a 16-byte row stride (fp32 master adapters, odd r)."""
    if B.dtype == dtype and (not _tma_capable(dtype, B.device) or _tma_operand(B) is not None):
        return B
    Bp = padded_rows(B.shape[0], B.shape[1], dtype, B.device)
    Bp.copy_(B)
    return Bp


def linear_fwd(x, weight, A, S, B, bias, scale: float, p: float, seed) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: shrink partials of ``drop(x)·Aᵀ``, one small launch that sums them (``xa``,
    fp32, saved for the backward) and writes ``s = xa·S·scale`` into a TMA-legal buffer, then
    ``[x | s]·[W_r | B]ᵀ + bias`` as one GEMM: three launches when the adapters already have
    x's dtype (one more to cast/pad B otherwise)."""
    M, K = x.shape
    dt = x.dtype
    seed = _seed_int(seed)
    xa, s = reduce_scale(_shrink_partials(x, A.to(dt), seed=seed, p=p, drop_in=p > 0, drop_ld=K), S, scale, dt)
    y = torch.empty((M, weight.shape[0]), dtype=dt, device=x.device)
    fused_matmul(x, weight, y, x2=s, w2=_rank_weight(B, dt), bias=None if bias is None else bias.to(dt))
    return y, xa


def linear_bwd(dy, x, weight, A, S, B, xa, scale: float, p: float, seed, need_dx: bool,
               need_dA: bool = True, need_dB: bool = True):
    """Backward: ``g = dY·B`` (with ``dB = dYᵀ·s`` in the same pass over dY for small r, see
    :func:`one_pass_dy`); dX = dY·W_r + drop(gs·A) in one GEMM on the current stream; dA (and
    dB when it needs its own pass over dY) split over M on a side stream next to it
    (:func:`side_stream`).

    A gradient that is not needed (frozen adapter, ``needs_input_grad``) is not computed:
    it comes back as ``None`` (dS is a by-product of g and always returned).
    """
    M, K = x.shape
    N, R = dy.shape[1], A.shape[0]
    dt = x.dtype
    seed = _seed_int(seed)
    Bd = B.to(dt)
    # s = xa·S·scale in dt, re-made from the saved fp32 xa by the one-launch scale kernel
    s = reduce_scale(xa.unsqueeze(0), S, scale, dt)[1] if need_dB else None
    db_part = None
    if need_dB and one_pass_dy(M, N, R, dt, dy.device):
        g_part, db_part = g_and_db(dy, Bd, s)
    else:
        g_part = _shrink_partials(dy, Bd.t())
    g, gs = reduce_scale(g_part, S, scale, dt)
    dS = (g * xa).sum(0) * scale
    dx = dA = dB = None
    with side_stream(dy.device) as side:  # forked here: before dX is queued
        if need_dx:
            side_work = side.stream is not None and (need_dA or (need_dB and db_part is None))
            dx = fused_matmul(dy, weight.t(), torch.empty_like(x, memory_format=torch.contiguous_format),
                    x2=gs, w2=A.to(dt).t(), seed=seed, p=p, drop_out=p > 0, drop_ld=K,
                    reserve_sms=options().reserve_sms if side_work else 0)
        with side.run():  # dA (and dB when it needs its own pass over dY) next to the dX GEMM
            if need_dA:
                dA = side.keep(tn_matmul(gs, x, seed=seed, p=p, drop_q=p > 0, drop_ld=K).to(A.dtype))
            if need_dB:
                dB = db_part.sum(0) if db_part is not None else tn_matmul(s, dy).t()
                dB = side.keep(dB.to(B.dtype).contiguous())
    return dx, dA, dS.to(S.dtype), dB
