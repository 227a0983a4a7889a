"""Triton kernels for the SORSA linear forward and backward.

These kernels cover every GEMM of the op:

* ``sorsa_mm_kernel`` (persistent: a grid of at most #SMs programs walks the output tiles in
  grouped order): ``C = drop_in(X1)·W1ᵀ + drop_out(X2·W2ᵀ) + bias``. The rank-r segment is
  its own short loop after the main K loop, accumulating into the same fp32 tile (or, with an
  output mask, into a second one that is masked and added). It was the tail of the main loop
  through a scalar switch of base pointers and strides; Triton then could not software-pipeline
  the loop at all (sm_90 128×128×64: synchronous loads, no cp.async, 32 KB smem), so inputs that
  cannot use TMA ran at an estimated half of cuBLAS. Two loops pipeline each (AOT counts in
  BENCHMARKS.md). Forward ``y``, the shrink ``x·Aᵀ`` (split-K partials), ``dY·B`` and
  ``dX = dY·W_r + drop(gs·A)`` are all instances (operands are addressed by strides, so
  transposed views cost nothing).
* ``sorsa_tn_kernel``: ``C[s] = P[m_s]ᵀ·drop(Q[m_s])`` over a slice ``m_s`` of the long
  M dimension (split-M, partials summed afterwards in a fixed order → deterministic):
  ``dA``, and ``dB`` for large r, whose outputs are too small to fill the GPU otherwise.
* ``sorsa_gdb_kernel``: for small r, ``g = dY·B`` and ``dB = dYᵀ·s`` in one pass over dY.

Dropout masks are never stored. Element (m, k) of x belongs to Philox counter
``m·cdiv(in_features, 4) + k // 4`` and takes word ``k % 4`` of that call's four 32-bit
outputs (``tl.randint4x``: one Philox per 4 elements); it is kept iff its top 24 bits are
``>= round(p·2^24)``. The mask is regenerated identically wherever it is needed (forward
shrink, dX epilogue, dA); ``seed`` is a host integer drawn per call from torch's CPU
generator (no device sync; independent masks across layers and steps).
``BIG`` (decided by the launcher from shapes and strides) switches every index to int64.
``UPCAST`` feeds fp32 to ``tl.dot`` (the interpreter's bf16 dot is wrong, triton#11584);
on the GPU the native low-precision dot is used.
"""
import triton
import triton.language as tl

# Floating-point contraction (``a·b + c`` as one FMA, one rounding) per kernel, passed at every
# launch as ``enable_fp_fusion``: Triton's default flips from on (<= 3.9) to off (3.10), which
# must not change our programs behind our back. On for all, chosen by counting (AOT, triton 3.8,
# sm_80/sm_90, bf16 + fp32): with it off every linear program's SASS is identical (the fp32
# ``ieee`` dot emits explicit FFMAs either way, tensor-core dots are unaffected, the epilogues have
# no contractible a·b + c), so "on" keeps today's programs and costs nothing; where it does contract
# (the regularizer's kernels) one rounding instead of two can only shrink the error the tolerance rule bounds.
# Arguments of the main (long) loop's operands: when the specialisation proves them 16-divisible,
# the AOT check requires that loop's loads to be pipelined (cp.async/TMA); when it cannot (a row
# stride of 4097), synchronous loads are unavoidable and only reported.
PIPELINE_OPERANDS = {
    "sorsa_mm_kernel": ("X1", "W1", "s_x1m", "s_x1k", "s_w1n", "s_w1k"),
    "sorsa_tn_kernel": ("P", "Q", "s_pm", "s_pa", "s_qm", "s_qb"),
    "sorsa_gdb_kernel": ("DY", "SX", "s_ym", "s_yn", "s_sm", "s_sr"),
}
# Programs allowed under the AOT check's shared-memory headroom because their launcher catches
# OutOfResources and relaunches without the named constexpr (kernel -> constexpr that is then off).
SMEM_FALLBACK = {"sorsa_mm_tma_kernel": "FLATTEN"}
FP_FUSION = {
    "sorsa_mm_kernel": True,
    "sorsa_tn_kernel": True,
    "sorsa_gdb_kernel": True,
    "sorsa_mm_tma_kernel": True,
    "sorsa_scale_kernel": True,
}


@triton.jit
def _keep4(seed, rows, c0, ld4, thr, BN: tl.constexpr):
    """Keep-mask of the (rows × [c0, c0+BN)) tile of x; ``c0`` and ``BN`` are multiples of 4.

    rows: (BM, 1) row indices (int64 when offsets are big). One ``randint4x`` call per group
    of 4 columns; output word ``j`` goes to column ``4·group + j`` (join/reshape interleave).
    """
    g = c0 // 4 + tl.arange(0, BN // 4)
    off = rows * ld4 + g[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, off)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BN))
    return (r >> 8).to(tl.int32) >= thr


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row tiles share W tiles in L2
    width = GROUP_M * num_n
    group = tile // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % width) % gsize, (tile % width) // gsize


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def sorsa_mm_kernel(
    X1, W1, X2, W2, BIAS, C, seed,
    M, N, K, R, M_BUCKET, k_per_split,
    s_x1m, s_x1k, s_w1n, s_w1k,
    s_x2m, s_x2r, s_w2n, s_w2r,
    s_cs, s_cm, s_cn,
    thr, inv_keep, drop_ld4,
    HAS_SEG2: tl.constexpr, HAS_BIAS: tl.constexpr, DROP_IN: tl.constexpr, DROP_OUT: tl.constexpr,
    BIG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)  # split-K slice (the skinny shrink only; 0 otherwise)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_steps = tl.cdiv(k_hi - k_lo, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    c_split = C + split.to(tl.int64) * s_cs
    for tile in tl.range(pid, num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if BIG:  # some offset can reach 2^31 elements: index arithmetic in int64
            rm = rm.to(tl.int64)
            rn = rn.to(tl.int64)
        m_ok = rm[:, None] < M
        n_ok = rn[None, :] < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, k_steps):  # main K loop: fixed operands, software-pipelined (cp.async)
            kk = k_lo + step * BLOCK_K + rk
            if BIG:
                kk = kk.to(tl.int64)
            k_ok = kk < k_hi
            a = tl.load(X1 + rm[:, None] * s_x1m + kk[None, :] * s_x1k, mask=m_ok & k_ok[None, :], other=0.0)
            if DROP_IN:
                keep = _keep4(seed, rm[:, None], k_lo + step * BLOCK_K, drop_ld4, thr, BLOCK_K)
                a = tl.where(keep, a.to(tl.float32) * inv_keep, 0.0).to(a.dtype)
            b = tl.load(W1 + rn[None, :] * s_w1n + kk[:, None] * s_w1k, mask=n_ok & k_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)

        if HAS_SEG2:
            # rank-r segment, its own loop (pipelined too). With an output mask (dX's masked
            # term) it needs its own accumulator; otherwise it adds straight into acc.
            if DROP_OUT:
                acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:
                acc2 = acc
            for r0 in range(0, R, BLOCK_K):
                kk = r0 + rk
                a = tl.load(X2 + rm[:, None] * s_x2m + kk[None, :] * s_x2r, mask=m_ok & (kk[None, :] < R), other=0.0)
                b = tl.load(W2 + rn[None, :] * s_w2n + kk[:, None] * s_w2r, mask=n_ok & (kk[:, None] < R), other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc2 = tl.dot(a, b, acc2, input_precision=PREC)
            if DROP_OUT:
                keep = _keep4(seed, rm[:, None], pid_n * BLOCK_N, drop_ld4, thr, BLOCK_N)
                acc += tl.where(keep, acc2 * inv_keep, 0.0)
            else:
                acc = acc2

        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_split + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(C.dtype.element_ty), mask=m_ok & n_ok)


@triton.jit(do_not_specialize=["seed"])
def sorsa_tn_kernel(
    P, Q, C, seed,
    M, DA, DB, m_per_split,
    s_pm, s_pa, s_qm, s_qb, s_cs, s_ca, s_cb,
    thr, inv_keep, drop_ld4,
    DROP_Q: tl.constexpr, BIG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    split = tl.program_id(2)
    ra = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rm0 = tl.arange(0, BLOCK_M)
    m_lo = split * m_per_split
    if BIG:
        ra = ra.to(tl.int64)
        rb = rb.to(tl.int64)
        rm0 = rm0.to(tl.int64)
        m_lo = m_lo.to(tl.int64)
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + rm0
        mm = rm < m_hi
        pt = tl.load(P + rm[None, :] * s_pm + ra[:, None] * s_pa, mask=mm[None, :] & (ra[:, None] < DA), other=0.0)
        q = tl.load(Q + rm[:, None] * s_qm + rb[None, :] * s_qb, mask=mm[:, None] & (rb[None, :] < DB), other=0.0)
        if DROP_Q:
            keep = _keep4(seed, rm[:, None], pid_b * BLOCK_B, drop_ld4, thr, BLOCK_B)
            q = tl.where(keep, q.to(tl.float32) * inv_keep, 0.0).to(q.dtype)
        if UPCAST:
            pt = pt.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(pt, q, acc, input_precision=PREC)
    c = C + split.to(tl.int64) * s_cs + ra[:, None] * s_ca + rb[None, :] * s_cb
    tl.store(c, acc, mask=(ra[:, None] < DA) & (rb[None, :] < DB))


@triton.jit
def sorsa_gdb_kernel(
    DY, BW, SX, G, DB,
    M, N, R, m_per_split,
    s_ym, s_yn, s_bn, s_br, s_sm, s_sr,
    s_gs, s_gm, s_gr, s_ds, s_dn, s_dr,
    BIG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over dY for both skinny products of the backward (small r, see the launcher):

    ``G[pid_n]  = dY[:, n-block]·B[n-block]``       split-N partials of ``g = dY·B`` (M, R)
    ``DB[split] = dY[m-slice, n-block]ᵀ·s[m-slice]`` split-M partials of ``dB = dYᵀ·s`` (N, R)

    Program (n-block, m-slice) keeps its B rows and its dB tile in registers and walks its
    m-slice once: each dY tile feeds both dots, so dY is read from HBM once instead of twice.
    Both partial sets are summed afterwards in index order (deterministic).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rm0 = tl.arange(0, BLOCK_M)
    m_lo = split * m_per_split
    if BIG:
        rn = rn.to(tl.int64)
        rm0 = rm0.to(tl.int64)
        m_lo = m_lo.to(tl.int64)
    m_hi = tl.minimum(m_lo + m_per_split, M)
    n_ok = rn < N
    r_ok = rr < R
    b = tl.load(BW + rn[:, None] * s_bn + rr[None, :] * s_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    g_part = G + pid_n.to(tl.int64) * s_gs
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + rm0
        m_ok = rm < m_hi
        dy = tl.load(DY + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        sx = tl.load(SX + rm[:, None] * s_sm + rr[None, :] * s_sr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            sx = sx.to(tl.float32)
        g = tl.dot(dy, b, input_precision=PREC)
        tl.store(g_part + rm[:, None] * s_gm + rr[None, :] * s_gr, g, mask=m_ok[:, None] & r_ok[None, :])
        db = tl.dot(tl.trans(dy), sx, db, input_precision=PREC)
    tl.store(DB + split.to(tl.int64) * s_ds + rn[:, None] * s_dn + rr[None, :] * s_dr, db,
             mask=n_ok[:, None] & r_ok[None, :])


@triton.jit
def _tma_rank_r(acc, s_desc, b_desc, off_m, off_n, r_steps, B_T: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_K: tl.constexpr, ONE_STEP: tl.constexpr):
    # acc += S[off_m:, :R]·B[off_n:, :R]ᵀ, boxes zero-filled past R. ONE_STEP (R <= BLOCK_K, the
    # flattened kernel): straight-line code, so the K loop stays the tile loop's only inner loop.
    if ONE_STEP:
        acc = _tma_step(acc, s_desc, b_desc, off_m, off_n, 0, B_T, UPCAST)
    else:
        for step in range(0, r_steps):
            acc = _tma_step(acc, s_desc, b_desc, off_m, off_n, step * BLOCK_K, B_T, UPCAST)
    return acc


@triton.jit
def _tma_step(acc, a_desc, b_desc, off_m, off_n, k, B_T: tl.constexpr, UPCAST: tl.constexpr):
    # acc += A[off_m:, k:]·B[off_n:, k:]ᵀ for one BLOCK_K step (B stored (K, N) when B_T)
    a = a_desc.load([off_m, k])
    if B_T:
        b = b_desc.load([k, off_n])
    else:
        b = b_desc.load([off_n, k]).T
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["M_BUCKET", "seed"])
def sorsa_mm_tma_kernel(
    x_desc, w_desc, s_desc, b_desc, BIAS, c_desc,
    M, N, K, R, M_BUCKET, seed, thr, inv_keep, drop_ld4,
    HAS_BIAS: tl.constexpr, W_T: tl.constexpr, B_T: tl.constexpr, UPCAST: tl.constexpr,
    EPI_SUB: tl.constexpr, DROP_OUT: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Hopper main GEMM ``C = [X | S]·[W | B]ᵀ + bias`` through host tensor descriptors (TMA).

    Same schedule as ``sorsa_mm_kernel`` without masks (TMA zero-fills out-of-bounds boxes and
    clips stores): persistent grouped tiles; the rank-r segment runs as ``cdiv(R, BLOCK_K)``
    extra steps right after the multi-buffered K loop (see the comment there for why not
    inside it), its ``[S | B]`` boxes read from a row stride padded once to 16 bytes. ``W_T``/``B_T``:
    the right operand is stored (K, N) (``dX = dY·W_r``) instead of (N, K). ``EPI_SUB`` stores
    the tile as two (BLOCK_M, BLOCK_N/2) halves (smaller epilogue staging buffer).
    ``DROP_OUT`` (dX with dropout, ``dX = dY·W_r + drop(gs·A)``): the rank-r steps run *first*,
    the output tile's Philox mask is applied to that partial sum in registers, and the main K
    loop then accumulates on top of it: the mask never needs a second (BLOCK_M, BLOCK_N) fp32
    accumulator live across the main loop (the 128×256 tile already holds 128 fp32 per thread).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    k_steps = tl.cdiv(K, BLOCK_K)
    r_steps = tl.cdiv(R, BLOCK_K)
    # FLATTEN (launcher: no output mask and R <= BLOCK_K): one software-pipelined loop over
    # (tile, k-step), the persistent-matmul tutorial's Hopper setting: the next tile's first
    # TMA loads are in flight while this tile's rank-r step and epilogue run, instead of a
    # pipeline drain and refill per tile (TTGIR checked: one scf.for, wgmma wait pendings=1).
    for tile in tl.range(pid, num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if DROP_OUT:
            acc = _tma_rank_r(acc, s_desc, b_desc, off_m, off_n, r_steps, B_T, UPCAST, BLOCK_K, FLATTEN)
            # int32 counters: the launcher sends masks whose counter can pass 2^31 to the
            # pointer kernel (int64 rows here spill 120 B at 255 registers, AOT check)
            rows = off_m + tl.arange(0, BLOCK_M)
            keep = _keep4(seed, rows[:, None], off_n, drop_ld4, thr, BLOCK_N)
            acc = tl.where(keep, acc * inv_keep, 0.0)
        for step in range(0, k_steps):  # pipelined (TMA multi-buffered) main loop
            acc = _tma_step(acc, x_desc, w_desc, off_m, off_n, step * BLOCK_K, W_T, UPCAST)
        # Rank-r tail (1 step for r <= BLOCK_K). A descriptor switch inside the loop above
        # compiles to an scf.if around the TMA loads and the pipeliner then single-buffers
        # the whole loop (checked: 80 KB instead of 176 KB smem at 128×256×64/3 stages).
        if not DROP_OUT:
            acc = _tma_rank_r(acc, s_desc, b_desc, off_m, off_n, r_steps, B_T, UPCAST, BLOCK_K, FLATTEN)
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c = acc.to(c_desc.dtype)
        if EPI_SUB:
            c0, c1 = tl.split(tl.permute(tl.reshape(c, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            c_desc.store([off_m, off_n], c0)
            c_desc.store([off_m, off_n + BLOCK_N // 2], c1)
        else:
            c_desc.store([off_m, off_n], c)


@triton.jit
def sorsa_scale_kernel(
    PART, S, OUT, XA, splits, M, R, scale,
    s_ps, s_pm, s_pr, s_om, s_or, s_xm, s_xr,
    WRITE_XA: tl.constexpr, BIG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``xa = Σ_s PART[s]`` (split-K partials, summed in index order → deterministic) and
    ``OUT = (xa·S·scale)`` cast to OUT's dtype, in one pass: the glue between the skinny GEMM
    and the GEMM that consumes the scaled rank-r operand (``s`` in the forward, ``gs`` in the
    backward). ``WRITE_XA``: also store the fp32 sum (not needed when ``splits == 1``)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if BIG:
        rm = rm.to(tl.int64)
    ok = (rm[:, None] < M) & (rr[None, :] < R)
    p = PART + rm[:, None] * s_pm + rr[None, :] * s_pr
    acc = tl.load(p, mask=ok, other=0.0)
    for _ in range(1, splits):
        p += s_ps  # 64-bit pointer steps: no int32 product of split index and stride
        acc += tl.load(p, mask=ok, other=0.0)
    if WRITE_XA:
        tl.store(XA + rm[:, None] * s_xm + rr[None, :] * s_xr, acc, mask=ok)
    sv = tl.load(S + rr, mask=rr < R, other=0.0).to(tl.float32) * scale
    tl.store(OUT + rm[:, None] * s_om + rr[None, :] * s_or, (acc * sv[None, :]).to(OUT.dtype.element_ty), mask=ok)
