"""Launcher for the grouped orthonormal-regularizer kernels (see ortho_kernels.py).

One fixed config per kernel rather than autotuning: the launch mixes many shapes, and the
work is a stream over every adapter (bandwidth-bound at r ≤ 128), so a tile that keeps the
loads wide and spill-free is what matters; the AOT check compiles these for sm_80/sm_90.
  gram      64×64 Gram tile, L step 64, 4 warps, 3 stages (fp32 params: L step 32)
  finalize  64×64 tile, 4 warps
  grad      64 rows × 128 L-columns, K step 32, 8 warps (4 spill a few bytes), 3 stages
            (fp32 params: 64 columns)
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from .ortho_kernels import ortho_finalize_kernel, ortho_grad_kernel, ortho_gram_kernel

META_FIELDS = ("ptr", "grad_ptr", "r", "L", "s_r", "s_l", "g_r", "g_l", "ws_off", "accum", "e_off",
               "split_len", "nsplit")
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def configs(dtype: torch.dtype):
    """(gram, finalize, grad) as (constexpr dict, num_warps, num_stages) for a param dtype."""
    if triton_interpret():
        return (dict(BLOCK_R=16, BLOCK_L=16), 1, 1), (dict(BLOCK_R=16), 1, 1), (dict(BLOCK_R=16, BLOCK_L=16, BLOCK_K=16), 1, 1)
    f32 = dtype == torch.float32
    return ((dict(BLOCK_R=64, BLOCK_L=32 if f32 else 64), 4, 3), (dict(BLOCK_R=64), 4, 1),
            (dict(BLOCK_R=64, BLOCK_L=64 if f32 else 128, BLOCK_K=32), 8, 3))


# Aim for a few hundred thousand elements of L·r per gram program; at most 16 splits.
SPLIT_TARGET = 2048


@functools.lru_cache(maxsize=64)
def _plan(shapes: Tuple[Tuple[int, int, bool], ...], br: int, bl_gram: int, bl_grad: int, device: torch.device):
    """Work tables and offsets for matrices of (r, L, needs_grad); cached per model structure."""
    w1, w2, w3, rows = [], [], [], []
    ws_off = e_off = 0
    max_tiles = 1
    for m, (r, L, needs_grad) in enumerate(shapes):
        nt = triton.cdiv(r, br)
        nsplit = max(1, min(16, triton.cdiv(L, SPLIT_TARGET)))
        split_len = triton.cdiv(triton.cdiv(L, nsplit), bl_gram) * bl_gram
        nsplit = triton.cdiv(L, split_len)
        max_tiles = max(max_tiles, nt * nt)
        for ti in range(nt):
            for tj in range(nt):
                w2.append((m, ti, tj, ti * nt + tj))
                w1.extend((m, ti, tj, s) for s in range(nsplit))
            if needs_grad:
                w3.extend((m, ti, lj) for lj in range(triton.cdiv(L, bl_grad)))
        rows.append((ws_off, e_off, split_len, nsplit))
        ws_off += nsplit * r * r
        e_off += r * r
    t = lambda x, w: torch.tensor(x, dtype=torch.int64).reshape(-1, w).to(device)  # noqa: E731
    return t(w1, 4), t(w2, 4), (t(w3, 3) if w3 else None), rows, ws_off, e_off, max_tiles


def ortho_triton_(mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool, coef: float) -> torch.Tensor:
    """Per-matrix regularizer values (fp32, shape (n,)); adds ``coef ·`` their gradient into ``.grad``
    of every matrix that requires grad (created where None). O(1) launches per dtype."""
    device = mats[0].device
    vals = torch.empty(len(mats), dtype=torch.float32, device=device)
    by_dtype = {}
    for i, m in enumerate(mats):
        if m.dtype not in TL_DTYPE:
            raise TypeError(f"adapter {i} must be float16, bfloat16 or float32, got {m.dtype}")
        if m.device != device:
            raise ValueError(f"all adapters must be on one device ({device}), adapter {i} is on {m.device}")
        by_dtype.setdefault(m.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        (gram_c, gw, gs), (fin_c, fw, fs), (grad_c, dw, ds) = configs(dtype)
        group = [mats[i] for i in idx]
        shapes, meta = [], []
        for i, m in zip(idx, group):
            b = is_b[i]
            r, L = (m.shape[1], m.shape[0]) if b else (m.shape[0], m.shape[1])
            shapes.append((r, L, bool(m.requires_grad)))
        w1, w2, w3, rows, ws_size, e_size, max_tiles = _plan(
            tuple(shapes), gram_c["BLOCK_R"], gram_c["BLOCK_L"], grad_c["BLOCK_L"], device)
        for i, m, (ws_off, e_off, split_len, nsplit), (r, L, needs) in zip(idx, group, rows, shapes):
            g, accum = m.grad, 1
            if needs and g is None:
                g = m.grad = torch.empty_like(m)
                accum = 0
            if needs and g.dtype != m.dtype:
                raise TypeError(f"adapter {i}'s .grad must have its dtype {m.dtype}, got {g.dtype}")
            st = m.stride()[::-1] if is_b[i] else m.stride()
            gst = (g.stride()[::-1] if is_b[i] else g.stride()) if needs else (0, 0)
            meta.append((m.data_ptr(), g.data_ptr() if needs else 0, r, L, st[0], st[1], gst[0], gst[1],
                         ws_off, accum, e_off, split_len, nsplit))
        meta_t = torch.tensor(meta, dtype=torch.int64).to(device)
        ws = torch.empty(ws_size, dtype=torch.float32, device=device)
        E = torch.empty(e_size, dtype=torch.float32, device=device)
        nsq = torch.zeros((len(group), max_tiles), dtype=torch.float32, device=device)
        dt = TL_DTYPE[dtype]
        interp = triton_interpret()
        f32 = dtype == torch.float32
        gram_prec = "ieee" if f32 or interp else "tf32"  # bf16/fp16 operands: native dot, exact products
        ortho_gram_kernel[(w1.shape[0],)](meta_t, w1, ws, DT=dt, UPCAST=interp and dtype == torch.bfloat16,
                                          PREC=gram_prec, num_warps=gw, num_stages=gs, **gram_c)
        ortho_finalize_kernel[(w2.shape[0],)](meta_t, w2, ws, E, nsq, max_tiles, num_warps=fw, num_stages=fs, **fin_c)
        norms = nsq.sum(1).sqrt()
        if squared:
            v, c = norms * norms, torch.full_like(norms, 4.0 * coef)
        else:
            v = norms
            c = torch.where(norms > 0, (2.0 * coef) / torch.where(norms > 0, norms, torch.ones_like(norms)),
                            torch.zeros_like(norms))
        vals[torch.tensor(idx, device=device)] = v
        if w3 is not None:
            ortho_grad_kernel[(w3.shape[0],)](meta_t, w3, E, c.contiguous(), DT=dt,
                                              PREC="ieee" if f32 or interp else "tf32",
                                              num_warps=dw, num_stages=ds, **grad_c)
    return vals
