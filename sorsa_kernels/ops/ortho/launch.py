"""Launcher for the grouped orthonormal-regularizer kernels (see :mod:`.kernels`).

Host work per step is a few C-level list comparisons: the per-matrix table (``META``) and the
work tables live on the device in a :class:`TritonPlan`, cached by the parameters and rebuilt
only when one's data pointer, shape or ``requires_grad`` changes (see :func:`_sig`). The grad
columns of ``META`` are re-uploaded (one non-blocking copy) only when the grads' pointers or
strides change; grads that are None come from one fresh allocation per group and step (carved
into views by one ``unbind`` per run of equal shapes), so the caching allocator tracks their
stream use like any tensor's. No host sync: values come back as device tensors.

Matrices are grouped by (dtype, layout, 64-bit offsets); one launch of each kernel per group.
One fixed config per kernel rather than autotuning: the launch mixes many shapes, and the
work is a stream over every adapter (bandwidth-bound at r ≤ 128), so a tile that keeps the
loads wide and spill-free is what matters; the AOT check compiles these for sm_80/sm_90.
  gram      64×64 Gram tile (upper triangle only), L step 64, 4 warps, 3 stages (cp.async)
            (fp32: L step 32, 8 warps; general strides: 8 warps, fp32 L step 16)
  finalize  64×64 tile, 8 warps
  grad      64 rows × 128 L-columns, K step 32, 8 warps, 3 stages (fp32: 64 columns, K step 16)
fp32 adapters use ``tf32x3`` split products (≈ fp32 accuracy, see tests/ops/test_ortho.py's
emulation) on the GPU; bf16/fp16 products are exact in fp32 accumulators.
"""
from __future__ import annotations

import functools
import operator
from itertools import repeat
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ... import _device
from ..._env import triton_interpret
from .kernels import FP_FUSION, META_FIELDS, ortho_finalize_kernel, ortho_grad_kernel, ortho_gram_kernel

GRAD_COLS = slice(META_FIELDS.index("grad_ptr"), META_FIELDS.index("accum") + 1)  # rewritten when grads move
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
INT32_LIMIT = 2 ** 31


def configs(dtype: torch.dtype, layout: int = 0, i64: bool = False, vec: int = 1):
    """(gram, finalize, grad) as (constexpr dict, num_warps, num_stages) for a param dtype.

    The constexpr dicts carry every compile-time flag the launch passes (precision, layout,
    64-bit offsets), so an ahead-of-time compile of these dicts is the program that runs."""
    interp = triton_interpret()
    f32 = dtype == torch.float32
    prec = "ieee" if interp else ("tf32x3" if f32 else "tf32")
    flags = dict(LAYOUT=layout, I64=i64, VEC=vec)
    if interp:
        return ((dict(BLOCK_R=16, BLOCK_L=16, PREC=prec, **flags), 1, 1), (dict(BLOCK_R=16), 1, 1),
                (dict(BLOCK_R=16, BLOCK_L=16, BLOCK_K=16, PREC=prec, **flags), 1, 1))
    # fp32 (tf32x3: three products per step) spilled on sm_80 at 4 warps / K step 32; the
    # general-stride layout (scalar loads) sat at 253 registers on 4 warps (bf16, triton 3.6) and
    # spilled 8 B at L step 32 (fp32, sm_80, triton 3.8); the finalize sat at 255 on 4 warps
    gram_l = (16 if layout == 2 else 32) if f32 else 64
    return ((dict(BLOCK_R=64, BLOCK_L=gram_l, PREC=prec, **flags), 8 if f32 or layout == 2 else 4, 3),
            (dict(BLOCK_R=64), 8, 1),
            (dict(BLOCK_R=64, BLOCK_L=64 if f32 else 128, BLOCK_K=16 if f32 else 32, PREC=prec, **flags), 8, 3))


# Aim for a few hundred thousand elements of L·r per gram program; at most 16 splits.
SPLIT_TARGET = 2048


def _rl(m: torch.Tensor, b: bool) -> Tuple[int, int, int, int]:
    """(r, L, stride along r, stride along L) of M = A or Bᵀ."""
    if b:
        return m.shape[1], m.shape[0], m.stride(1), m.stride(0)
    return m.shape[0], m.shape[1], m.stride(0), m.stride(1)


def _layout(s_r: int, s_l: int, r: int, L: int) -> int:
    if s_l == 1 or L == 1:
        return 0
    if s_r == 1 or r == 1:
        return 1
    return 2


def _vec(m: torch.Tensor, layout: int, r: int, L: int, s_r: int, s_l: int) -> int:
    """Elements per 16 bytes when the alignment hints hold (see kernels._align), else 1."""
    v = 16 // m.element_size()
    if layout == 2 or m.data_ptr() % 16:
        return 1
    stride, extent = (s_r, L) if layout == 0 else (s_l, r)
    return v if (stride % v == 0 or stride == 1) and extent % v == 0 else 1


def _max_offset(r: int, L: int, s_r: int, s_l: int) -> int:
    return (r - 1) * abs(s_r) + (L - 1) * abs(s_l)


def _upload(rows: List[Tuple[int, ...]], device: torch.device) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Group:
    """One launch group: matrices of one dtype, layout and offset width."""

    def __init__(self, idx: List[int], mats: Sequence[torch.Tensor], is_b: Sequence[bool], dtype, layout, i64, vec,
                 device):
        self.idx, self.dtype, self.layout, self.i64, self.vec = idx, dtype, layout, i64, vec
        self.cfg = configs(dtype, layout, i64, vec)
        self.tl_dtype = TL_DTYPE[dtype]
        self.upcast = triton_interpret() and dtype == torch.bfloat16
        (gram_c, _, _), (fin_c, _, _), (grad_c, _, _) = self.cfg
        br, bl_gram, bl_grad = gram_c["BLOCK_R"], gram_c["BLOCK_L"], grad_c["BLOCK_L"]
        w1, w2, w3, rows = [], [], [], []
        ws_off = e_off = 0
        self.max_tiles = 1
        self.needs = [bool(mats[i].requires_grad) for i in idx]
        base_ptr = mats[idx[0]].data_ptr()
        for m, i in enumerate(idx):
            r, L, s_r, s_l = _rl(mats[i], is_b[i])
            nt = triton.cdiv(r, br)
            nsplit = max(1, min(16, triton.cdiv(L, SPLIT_TARGET)))
            split_len = triton.cdiv(triton.cdiv(L, nsplit), bl_gram) * bl_gram
            nsplit = triton.cdiv(L, split_len)
            self.max_tiles = max(self.max_tiles, nt * nt)
            for ti in range(nt):
                for tj in range(ti, nt):  # upper triangle: the finalize mirrors it
                    w2.append((m, ti, tj, ti * nt + tj))
                    w1.extend((m, ti, tj, s) for s in range(nsplit))
                if self.needs[m]:
                    w3.extend((m, ti, lj) for lj in range(triton.cdiv(L, bl_grad)))
            # element offset from the group's first matrix (its pointer is the launch's BASE);
            # same-dtype tensors are element-aligned, so the byte difference divides exactly
            rows.append(((mats[i].data_ptr() - base_ptr) // mats[i].element_size(), r, L, s_r, s_l, ws_off, e_off,
                         split_len, nsplit, 0, 0, 0, 0))
            ws_off += nsplit * r * r
            e_off += r * r
        self.meta = _upload(rows, device)
        t = lambda x, w: _upload(x, device).reshape(-1, w)  # noqa: E731
        self.w1, self.w2 = t(w1, 4), t(w2, 4)
        self.w3 = t(w3, 3) if w3 else None
        self.ws_size, self.e_size = ws_off, e_off
        self.vidx = _upload([(i,) for i in idx], device).reshape(-1)
        self.grad_key = None
        # new grads: where each one sits in the group's flat buffer, and the runs of equal
        # (shape, strides) that one view + unbind carves at once
        self.need = [i for i, nd in zip(idx, self.needs) if nd]
        self.need_pos = {i: k for k, i in enumerate(self.need)}
        self.carve_rows: List[Tuple[int, int, int, int]] = [None] * len(self.need)  # (offset, g_r, g_l, accum=0)
        self.runs: List[Tuple[int, int, torch.Size, bool]] = []  # (offset, count, shape, column-major)
        spec = []
        for k, i in enumerate(self.need):
            shape = mats[i].shape
            st = _grad_strides(mats[i], is_b[i], layout)
            spec.append((tuple(shape), st != (shape[1], 1), k, st, is_b[i]))
        spec.sort()  # equal (shape, layout) adjacent: one run each, whatever the parameter order
        off = 0
        for shape, col, k, st, b in spec:
            self.carve_rows[k] = (off, *((st[1], st[0]) if b else st), 0)  # _rl's (r, L) strides of M = A or Bᵀ
            if self.runs and self.runs[-1][2] == shape and self.runs[-1][3] == col:
                o, n, sh, c = self.runs[-1]
                self.runs[-1] = (o, n + 1, sh, c)
            else:
                self.runs.append((off, 1, shape, col))
            off += shape[0] * shape[1]
        # carve() makes views in sorted order; this puts them back in self.need order
        inv = [0] * len(spec)
        for pos, item in enumerate(spec):
            inv[item[2]] = pos
        self.unsort = operator.itemgetter(*inv) if len(inv) > 1 else (lambda v: tuple(v))
        self.total = off

    def carve(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """A fresh flat buffer (the caching allocator tracks it as any tensor) and every needed
        matrix's new grad as a view of it, in ``self.need`` order: one ``unbind`` per run."""
        buf = torch.empty(self.total, dtype=self.dtype, device=self.meta.device)
        views: List[torch.Tensor] = []
        for off, k, (n0, n1), col in self.runs:
            blk = buf.narrow(0, off, k * n0 * n1)
            views.extend(blk.view(k, n1, n0).transpose(1, 2).unbind(0) if col else blk.view(k, n0, n1).unbind(0))
        return buf, list(self.unsort(views))


_DATA_PTR = torch.Tensor.data_ptr
_SHAPE = torch.Tensor.shape.__get__
_REQ = torch.Tensor.requires_grad.__get__
_GRAD = torch.Tensor.grad.__get__
_STRIDE = torch.Tensor.stride


def _sig(mats: Sequence[torch.Tensor]) -> tuple:
    """What a plan depends on, read in three C-level passes (≈ 0.1 ms for 448 matrices on the
    CPU build machine). Strides and dtype are not read: a tensor keeps them for a given data
    pointer and shape unless it is re-pointed (``.data =``) to a reinterpreting view of its own
    memory (``as_strided``, a same-size dtype ``view``), which is not supported."""
    return list(map(_DATA_PTR, mats)), list(map(_SHAPE, mats)), list(map(_REQ, mats))


class TritonPlan:
    """Device tables for one list of adapters; valid while :func:`_sig` of the list is unchanged."""

    def __init__(self, mats: Sequence[torch.Tensor], is_b: Sequence[bool]):
        self.device = mats[0].device
        self.sig = _sig(mats)
        self.is_b = list(is_b)
        by: Dict[tuple, List[int]] = {}
        for i, m in enumerate(mats):
            if m.dtype not in TL_DTYPE:
                raise TypeError(f"adapter {i} must be float16, bfloat16 or float32, got {m.dtype}")
            if m.device != self.device:
                raise ValueError(f"all adapters must be on one device ({self.device}), adapter {i} is on {m.device}")
            r, L, s_r, s_l = _rl(m, is_b[i])
            # 64-bit offsets only when the data (or a grad with the same strides) can reach 2³¹
            i64 = _max_offset(r, L, s_r, s_l) >= INT32_LIMIT or r * L >= INT32_LIMIT
            lay = _layout(s_r, s_l, r, L)
            by.setdefault((m.dtype, lay, i64, _vec(m, lay, r, L, s_r, s_l)), []).append(i)
        self.groups = [_Group(idx, mats, is_b, dt, lay, i64, vec, self.device)
                       for (dt, lay, i64, vec), idx in by.items()]

    def matches(self, mats, is_b) -> bool:
        return self.is_b == list(is_b) and _sig(mats) == self.sig


def _grad_strides(p: torch.Tensor, b: bool, layout: int) -> Tuple[int, int]:
    """Dense strides for a new grad of ``p`` whose unit stride is where the group's compile-time
    layout expects it (p's own strides need not be dense: strided views, memory maps)."""
    n0, n1 = p.shape
    row_major, col_major = (n1, 1), (1, n0)
    if layout == 0:  # unit stride along L: A row-major, B column-major
        return col_major if b else row_major
    if layout == 1:
        return row_major if b else col_major
    return row_major


def _fits_layout(g: torch.Tensor, b: bool, layout: int) -> bool:
    r, L, s_r, s_l = _rl(g, b)
    return layout == 2 or (s_l == 1 or L == 1 if layout == 0 else s_r == 1 or r == 1)


_PLANS: Dict[tuple, TritonPlan] = {}


def get_plan(mats: Sequence[torch.Tensor], is_b: Sequence[bool]) -> TritonPlan:
    """The cached plan for these parameters (rebuilt when any data pointer, shape or
    requires_grad changes, or the list holds other parameter objects)."""
    ck = tuple(map(id, mats))
    plan = _PLANS.get(ck)
    if plan is None or not plan.matches(mats, is_b):
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[ck] = TritonPlan(mats, is_b)
    return plan


def _on_adapters_device(fn):
    """Launch on the adapters' device, whichever device is current (a model on cuda:1)."""
    @functools.wraps(fn)
    def run(mats, *args, **kwargs):
        with _device.device_guard(mats[0].device):
            return fn(mats, *args, **kwargs)
    return run


@_on_adapters_device
def ortho_triton_forward(mats: Sequence[torch.Tensor], is_b: Sequence[bool]):
    """Per-matrix ``‖E‖_F`` (fp32 device tensor, shape (n,)) and the state the gradient needs."""
    plan = get_plan(mats, is_b)
    norms = torch.empty(len(mats), dtype=torch.float32, device=plan.device)
    Es = []
    for g in plan.groups:
        (gram_c, gw, gs), (fin_c, fw, fs), _ = g.cfg
        ws = torch.empty(g.ws_size, dtype=torch.float32, device=plan.device)
        E = torch.empty(g.e_size, dtype=torch.float32, device=plan.device)
        nsq = torch.zeros((len(g.idx), g.max_tiles), dtype=torch.float32, device=plan.device)
        ortho_gram_kernel[(g.w1.shape[0],)](mats[g.idx[0]], g.meta, g.w1, ws, DT=g.tl_dtype, UPCAST=g.upcast,
                                            num_warps=gw, num_stages=gs,
                                            enable_fp_fusion=FP_FUSION["ortho_gram_kernel"], **gram_c)
        ortho_finalize_kernel[(g.w2.shape[0],)](g.meta, g.w2, ws, E, nsq, g.max_tiles,
                                                num_warps=fw, num_stages=fs,
                                                enable_fp_fusion=FP_FUSION["ortho_finalize_kernel"], **fin_c)
        norms.index_copy_(0, g.vidx, nsq.sum(1).sqrt())
        Es.append(E)
    return norms, (plan, Es)


def _grad_rows(mats, plan: TritonPlan, g: _Group, have: Dict[int, torch.Tensor], out, fixups):
    """General case (some grads exist, some are None or off-layout): META grad columns for
    every matrix of ``g``, with new grads carved where needed (recorded in ``out``/``fixups``)."""
    fresh = [i for i in g.need if have.get(i) is None or not _fits_layout(have[i], plan.is_b[i], g.layout)]
    carved = {}
    if fresh:
        _, views = g.carve()
        carved = {i: views[g.need_pos[i]] for i in fresh}
    rows = []
    for m, i in enumerate(g.idx):
        if not g.needs[m]:
            rows.append((0, 0, 0, 0))
            continue
        gr = carved.get(i, have.get(i))
        if gr.dtype != mats[i].dtype:
            raise TypeError(f"adapter {i}'s .grad must have its dtype {mats[i].dtype}, got {gr.dtype}")
        _, _, gs_r, gs_l = _rl(gr, plan.is_b[i])
        rows.append((gr.data_ptr(), gs_r, gs_l, 0 if i in carved else 1))
        if i in carved:
            if have.get(i) is None:
                out[i] = gr
            else:
                fixups.append((have[i], gr))
    return rows


@_on_adapters_device
def ortho_triton_backward(mats: Sequence[torch.Tensor], state, coef: torch.Tensor,
                          inplace: bool) -> Optional[List[Optional[torch.Tensor]]]:
    """``coef[m] · E_m·M_m`` for every matrix that requires grad: added into ``.grad`` when
    ``inplace`` (created where None), else returned as new tensors (None where no grad).

    Steady state costs one pass over the grads: all None (``set_to_none``, or ``inplace=False``)
    → one carve, table unchanged while the allocator returns the same address; all present
    with the pointers and strides of the last step → nothing to rebuild."""
    plan, Es = state
    out: List[Optional[torch.Tensor]] = [None] * len(mats)
    fixups = []
    for g, E in zip(plan.groups, Es):
        if g.w3 is None:
            continue
        _, _, (grad_c, dw, ds) = g.cfg
        grads = [mats[i] for i in g.need]
        grads = list(map(_GRAD, grads)) if inplace else [None] * len(grads)
        rows = None
        n_none = sum(map(operator.is_, grads, repeat(None)))  # identity: list.count would call Tensor.__eq__
        if n_none == len(grads):  # every grad new: carved from one fresh buffer
            buf, views = g.carve()
            key = ("carved", buf.data_ptr())
            if key != g.grad_key:
                base, es, k = buf.data_ptr(), buf.element_size(), 0
                rows = []
                for nd in g.needs:  # a matrix without grad keeps a null row: it has no grad program
                    if nd:
                        o, g_r, g_l, acc = g.carve_rows[k]
                        rows.append((base + o * es, g_r, g_l, acc))
                        k += 1
                    else:
                        rows.append((0, 0, 0, 0))
            for i, v in zip(g.need, views):
                out[i] = v
        else:
            key = None
            if n_none == 0:  # the usual step after backward(): same grads as last time?
                key = ("grads", list(map(_DATA_PTR, grads)), list(map(_STRIDE, grads)))
            if key is None or key != g.grad_key:
                have = dict(zip(g.need, grads))
                rows = _grad_rows(mats, plan, g, have, out, fixups)
                if key is not None and any(r[3] == 0 for r in rows):
                    key = None  # off-layout grads go through temporaries: never a steady state
        if rows is not None:  # grads moved: re-upload the four grad columns (no sync)
            g.meta[:, GRAD_COLS].copy_(_upload(rows, plan.device))
        g.grad_key = key
        ortho_grad_kernel[(g.w3.shape[0],)](mats[g.idx[0]], g.meta, g.w3, E, coef[g.vidx].contiguous(),
                                            DT=g.tl_dtype, num_warps=dw, num_stages=ds,
                                            enable_fp_fusion=FP_FUSION["ortho_grad_kernel"], **grad_c)
    for gr, tmp in fixups:
        gr.add_(tmp)
    if inplace:
        for i, gr in enumerate(out):
            if gr is not None:
                mats[i].grad = gr
        return None
    return out
