"""Grouped Triton kernels for the orthonormal regularizer over *all* adapters at once.

Every adapter is viewed as ``M`` (r × L): ``A`` as is, ``B`` through transposed strides
(``Bᵀ``), so ``G = M·Mᵀ`` is ``A·Aᵀ`` or ``Bᵀ·B`` and the gradient ``E·M`` is written back
through the same strides. A per-matrix table (``META``, int64, cached on the device by the
launcher) holds pointers, sizes, strides and workspace offsets; a work table lists one row
per program. Three launches per (dtype, layout) group, whatever the number of matrices:

1. ``ortho_gram_kernel``: one program per (matrix, r-tile i ≤ r-tile j, split of L): partial
   Gram tiles of the upper triangle only (fp32 accumulation) into separate workspace slots.
2. ``ortho_finalize_kernel``: one program per (matrix, tile i ≤ tile j); sums the splits in a
   fixed order (deterministic), ``E = G − I``, writes the tile and its mirror, and the tile's
   ``Σ E²`` (twice for off-diagonal tiles) into its own slot.
3. ``ortho_grad_kernel``: one program per (matrix, r-tile, L-tile); ``grad (+)= coef_m · E·M``.

``LAYOUT`` is a compile-time memory layout of ``M`` so the L-direction loads vectorise and
pipeline: 0 = unit stride along L (row-major ``A``), 1 = unit stride along r (``Bᵀ`` of a
row-major ``B``), 2 = general strides (anything else). ``I64``: 64-bit offsets, chosen by the
launcher only when an offset can reach 2³¹. ``PREC``: ``tl.dot`` input precision
(bf16/fp16 operands: native products, exact in fp32; fp32 operands: ``tf32x3`` split
products on the GPU). ``UPCAST`` feeds fp32 to ``tl.dot`` under the interpreter (triton#11584).
"""
import triton
import triton.language as tl

# FP contraction per kernel, passed at every launch (why: the linear op's kernels.FP_FUSION). The one
# program it changes is the finalize kernel: its Σ E² takes 16 FFMA with fusion, 16 FMUL + 16 FADD
# without (one rounding per term instead of two); the Gram and gradient programs compile to the
# same SASS either way (AOT count, triton 3.8, sm_80/sm_90).
FP_FUSION = {
    "ortho_gram_kernel": True,
    "ortho_finalize_kernel": True,
    "ortho_grad_kernel": True,
}

# META row (int64, one row per matrix; the launcher's META_FIELDS names the columns in this
# order): the data offset in elements from the launch's BASE pointer (a real pointer argument:
# Triton knows its alignment, which a pointer read from a table would not carry), r, L, the data
# strides (r, L), the workspace offset, the E offset, the split length along L, the number of
# splits, the grad pointer, the grad strides (r, L), and whether to accumulate into the grad.
OFFSET = tl.constexpr(0)
R = tl.constexpr(1)
LEN = tl.constexpr(2)
S_R = tl.constexpr(3)
S_L = tl.constexpr(4)
WS_OFF = tl.constexpr(5)
E_OFF = tl.constexpr(6)
SPLIT_LEN = tl.constexpr(7)
NSPLIT = tl.constexpr(8)
GRAD_PTR = tl.constexpr(9)
G_R = tl.constexpr(10)
G_L = tl.constexpr(11)
ACCUM = tl.constexpr(12)
NF = tl.constexpr(13)
# the launcher builds the rows by these names; each constexpr above is its name's column
META_FIELDS = ("offset", "r", "L", "s_r", "s_l", "ws_off", "e_off", "split_len", "nsplit",
               "grad_ptr", "g_r", "g_l", "accum")
_COLUMNS = (OFFSET, R, LEN, S_R, S_L, WS_OFF, E_OFF, SPLIT_LEN, NSPLIT, GRAD_PTR, G_R, G_L, ACCUM)
if [c.value for c in _COLUMNS] != list(range(len(META_FIELDS))) or NF.value != len(META_FIELDS):
    raise RuntimeError("ortho kernels: META column constants out of order with META_FIELDS")


@triton.jit
def _header(meta):
    """The data header of a META row: (offset, r, L, s_r, s_l)."""
    off = tl.load(meta + OFFSET)
    r = tl.load(meta + R)
    L = tl.load(meta + LEN)
    s_r = tl.load(meta + S_R)
    s_l = tl.load(meta + S_L)
    return off, r, L, s_r, s_l


@triton.jit
def _offsets(rows, cols, s_r, s_l, LAYOUT: tl.constexpr):
    # rows: (X, 1) r-indices, cols: (1, Y) or (Y, 1) L-indices; unit stride made compile-time
    if LAYOUT == 0:
        return rows * s_r + cols
    elif LAYOUT == 1:
        return rows + cols * s_l
    else:
        return rows * s_r + cols * s_l


@triton.jit
def _mult(x, VEC: tl.constexpr):
    # x rebuilt as (x // VEC) * VEC: exact, as the launcher checked x % VEC == 0, and the
    # product carries divisibility VEC into Triton's axis analysis. tl.multiple_of cannot be
    # used here: it tags the op that defines x, and inside a helper x is a block argument of
    # the (later inlined) callee, so the hint was silently dropped (checked in the TTIR).
    return (x // VEC) * VEC


@triton.jit
def _align(off, s_r, s_l, r, L, LAYOUT: tl.constexpr, VEC: tl.constexpr):
    # VEC > 1: the launcher checked that the data offset from BASE, the non-unit stride and
    # the contiguous extent are multiples of VEC (= 16 bytes of elements), so masks are
    # constant over VEC elements and 16-bit loads can vectorise (cp.async needs ≥ 4 bytes).
    if VEC > 1:
        off = _mult(off, VEC)
        if LAYOUT == 0:
            s_r = _mult(s_r, VEC)
            L = _mult(L, VEC)
        elif LAYOUT == 1:
            s_l = _mult(s_l, VEC)
            r = _mult(r, VEC)
    return off, s_r, s_l, r, L


@triton.jit
def ortho_gram_kernel(BASE, META, WORK, WS, DT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, LAYOUT: tl.constexpr, I64: tl.constexpr,
                      VEC: tl.constexpr = 1):
    pid = tl.program_id(0)
    mat = tl.load(WORK + pid * 4)
    ti = tl.load(WORK + pid * 4 + 1)
    tj = tl.load(WORK + pid * 4 + 2)
    split = tl.load(WORK + pid * 4 + 3)
    meta = META + mat * NF
    off, r, L, s_r, s_l = _header(meta)
    ws = WS + tl.load(meta + WS_OFF)
    split_len = tl.load(meta + SPLIT_LEN)
    if not I64:  # every offset < 2³¹ (checked by the launcher): 32-bit index math
        r = r.to(tl.int32)
        L = L.to(tl.int32)
        s_r = s_r.to(tl.int32)
        s_l = s_l.to(tl.int32)
        split_len = split_len.to(tl.int32)
        ti = ti.to(tl.int32)
        tj = tj.to(tl.int32)
        split = split.to(tl.int32)
    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * BLOCK_R + tl.arange(0, BLOCK_R)
    rl = tl.arange(0, BLOCK_L)
    # the launcher rounds split_len up to a multiple of BLOCK_L: every l0 is then provably
    # BLOCK_L-aligned, which (with VEC) lets the loads be 16-byte cp.async copies
    split_len = tl.multiple_of(split_len, BLOCK_L)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    off, s_r, s_l, r, hi = _align(off, s_r, s_l, r, hi, LAYOUT, VEC)
    mp = BASE + off
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for l0 in range(lo, hi, BLOCK_L):
        ll = l0 + rl
        a = tl.load(mp + _offsets(ri[:, None], ll[None, :], s_r, s_l, LAYOUT),
                    mask=(ri[:, None] < r) & (ll[None, :] < hi), other=0.0)
        # rows j loaded directly as the (L, R) operand through transposed offsets (no register
        # transpose), so both operands take the shared-memory pipeline
        b = tl.load(mp + _offsets(rj[None, :], ll[:, None], s_r, s_l, LAYOUT),
                    mask=(rj[None, :] < r) & (ll[:, None] < hi), other=0.0)
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
    meta = META + mat * NF
    r = tl.load(meta + R)
    ws = WS + tl.load(meta + WS_OFF)
    e = E + tl.load(meta + E_OFF)
    nsplit = tl.load(meta + NSPLIT)
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
    nsq = tl.sum(tl.sum(g * g, axis=1), axis=0)
    # E is symmetric: the lower-triangle tile is the mirror of this one. A scalar branch, not
    # `mask & (ti != tj)`: Triton 3.9's interpreter broadcasts a scalar comparison of int64
    # values as an int64 block, which it refuses as a mask.
    if ti != tj:
        tl.store(e + rj[None, :] * r + ri[:, None], g, mask=mask)
        nsq = 2.0 * nsq
    tl.store(NSQ + mat * max_tiles + slot, nsq)


@triton.jit
def ortho_grad_kernel(BASE, META, WORK, E, COEF, DT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
                      LAYOUT: tl.constexpr, I64: tl.constexpr, VEC: tl.constexpr = 1):
    pid = tl.program_id(0)
    mat = tl.load(WORK + pid * 3)
    ti = tl.load(WORK + pid * 3 + 1)
    lj = tl.load(WORK + pid * 3 + 2)
    meta = META + mat * NF
    # the header loads written out, not through _header: inlining the helper here compiles one
    # sm_90 program to 106 instead of 108 registers, and shipped programs are kept as measured
    off = tl.load(meta + OFFSET)
    r = tl.load(meta + R)
    L = tl.load(meta + LEN)
    s_r = tl.load(meta + S_R)
    s_l = tl.load(meta + S_L)
    e = E + tl.load(meta + E_OFF)
    gp = tl.load(meta + GRAD_PTR).to(tl.pointer_type(DT))
    g_r = tl.load(meta + G_R)
    g_l = tl.load(meta + G_L)
    accum = tl.load(meta + ACCUM)
    if not I64:
        r = r.to(tl.int32)
        L = L.to(tl.int32)
        s_r = s_r.to(tl.int32)
        s_l = s_l.to(tl.int32)
        g_r = g_r.to(tl.int32)
        g_l = g_l.to(tl.int32)
        ti = ti.to(tl.int32)
        lj = lj.to(tl.int32)
    off, s_r, s_l, r, L = _align(off, s_r, s_l, r, L, LAYOUT, VEC)
    mp = BASE + off
    coef = tl.load(COEF + mat)
    ri = ti * BLOCK_R + tl.arange(0, BLOCK_R)
    rl = lj * BLOCK_L + tl.arange(0, BLOCK_L)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        kk = k0 + rk
        ek = tl.load(e + ri[:, None] * r + kk[None, :], mask=(ri[:, None] < r) & (kk[None, :] < r), other=0.0)
        mk = tl.load(mp + _offsets(kk[:, None], rl[None, :], s_r, s_l, LAYOUT),
                     mask=(kk[:, None] < r) & (rl[None, :] < L), other=0.0)
        acc = tl.dot(ek, mk.to(tl.float32), acc, input_precision=PREC)
    mask = (ri[:, None] < r) & (rl[None, :] < L)
    # the launcher gives every grad its parameter's strides (else a temporary), so LAYOUT holds
    gptr = gp + _offsets(ri[:, None], rl[None, :], g_r, g_l, LAYOUT)
    out = acc * coef
    if accum != 0:
        out += tl.load(gptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(gptr, out.to(DT), mask=mask)
