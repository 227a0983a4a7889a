"""Grouped Triton kernels for the orthonormal regularizer over *all* adapters at once.

Every adapter is viewed as ``M`` (r × L): ``A`` as is, ``B`` through transposed strides
(``Bᵀ``), so ``G = M·Mᵀ`` is ``A·Aᵀ`` or ``Bᵀ·B`` and the gradient ``E·M`` is written back
through the same strides. A per-matrix table (``META``, int64) holds the data and grad
pointers, sizes, strides and workspace offsets; a work table lists one row per program.
Three launches per dtype, whatever the number of matrices:

1. ``ortho_gram_kernel``: one program per (matrix, r-tile i, r-tile j, split of L); partial
   Gram tiles (fp32 accumulation) go to separate workspace slots.
2. ``ortho_finalize_kernel``: one program per (matrix, tile i, tile j); sums the splits in a
   fixed order (deterministic), ``E = G − I``, and the tile's ``Σ E²`` into its own slot.
3. ``ortho_grad_kernel``: one program per (matrix, r-tile, L-tile); ``grad (+)= coef_m · E·M``.

bf16/fp16 Gram products are exact in fp32 (native dot, fp32 accumulation); fp32 params use
true fp32 products. ``UPCAST`` feeds fp32 to ``tl.dot`` under the interpreter (triton#11584).
"""
import triton
import triton.language as tl

# META row (int64, 13 columns; see ortho_launch.META_FIELDS): 0 data ptr, 1 grad ptr, 2 r, 3 L,
# 4-5 data strides (r, L), 6-7 grad strides, 8 workspace offset, 9 accumulate into grad?,
# 10 E offset, 11 split length along L, 12 number of splits.


@triton.jit
def ortho_gram_kernel(META, WORK, WS, DT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)
    mat = tl.load(WORK + pid * 4)
    ti = tl.load(WORK + pid * 4 + 1)
    tj = tl.load(WORK + pid * 4 + 2)
    split = tl.load(WORK + pid * 4 + 3)
    meta = META + mat * 13
    mp = tl.load(meta + 0).to(tl.pointer_type(DT))
    r = tl.load(meta + 2)
    L = tl.load(meta + 3)
    s_r = tl.load(meta + 4)
    s_l = tl.load(meta + 5)
    ws = WS + tl.load(meta + 8)
    split_len = tl.load(meta + 11)
    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    rl = tl.arange(0, BLOCK_L)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for l0 in range(lo, hi, BLOCK_L):
        ll = l0 + rl
        a = tl.load(mp + ri[:, None] * s_r + ll[None, :] * s_l, mask=(ri[:, None] < r) & (ll[None, :] < hi), other=0.0)
        b = tl.load(mp + rj[None, :] * s_r + ll[:, None] * s_l, mask=(rj[None, :] < r) & (ll[:, None] < hi), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    out = ws + split * r * r + ri[:, None] * r + rj[None, :]
    tl.store(out, acc, mask=(ri[:, None] < r) & (rj[None, :] < r))


@triton.jit
def ortho_finalize_kernel(META, WORK, WS, E, NSQ, max_tiles, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    mat = tl.load(WORK + pid * 4)
    ti = tl.load(WORK + pid * 4 + 1)
    tj = tl.load(WORK + pid * 4 + 2)
    slot = tl.load(WORK + pid * 4 + 3)
    meta = META + mat * 13
    r = tl.load(meta + 2)
    ws = WS + tl.load(meta + 8)
    e = E + tl.load(meta + 10)
    nsplit = tl.load(meta + 12)
    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (ri[:, None] < r) & (rj[None, :] < r)
    idx = ri[:, None] * r + rj[None, :]
    g = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for s in range(0, nsplit):
        g += tl.load(ws + s * r * r + idx, mask=mask, other=0.0)
    g = tl.where(ri[:, None] == rj[None, :], g - 1.0, g)
    g = tl.where(mask, g, 0.0)
    tl.store(e + idx, g, mask=mask)
    tl.store(NSQ + mat * max_tiles + slot, tl.sum(tl.sum(g * g, axis=1), axis=0))


@triton.jit
def ortho_grad_kernel(META, WORK, E, COEF, DT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    mat = tl.load(WORK + pid * 3)
    ti = tl.load(WORK + pid * 3 + 1)
    lj = tl.load(WORK + pid * 3 + 2)
    meta = META + mat * 13
    mp = tl.load(meta + 0).to(tl.pointer_type(DT))
    gp = tl.load(meta + 1).to(tl.pointer_type(DT))
    r = tl.load(meta + 2)
    L = tl.load(meta + 3)
    s_r = tl.load(meta + 4)
    s_l = tl.load(meta + 5)
    g_r = tl.load(meta + 6)
    g_l = tl.load(meta + 7)
    accum = tl.load(meta + 9)
    e = E + tl.load(meta + 10)
    coef = tl.load(COEF + mat)
    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rl = lj * BLOCK_L + tl.arange(0, BLOCK_L)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        kk = k0 + rk
        ek = tl.load(e + ri[:, None] * r + kk[None, :], mask=(ri[:, None] < r) & (kk[None, :] < r), other=0.0)
        mk = tl.load(mp + kk[:, None] * s_r + rl[None, :] * s_l, mask=(kk[:, None] < r) & (rl[None, :] < L), other=0.0)
        acc = tl.dot(ek, mk.to(tl.float32), acc, input_precision=PREC)
    mask = (ri[:, None] < r) & (rl[None, :] < L)
    gptr = gp + ri[:, None] * g_r + rl[None, :] * g_l
    out = acc * coef
    if accum != 0:
        out += tl.load(gptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(gptr, out.to(DT), mask=mask)
