"""Triton kernels for the SORSA linear forward and backward.

Two kernels cover every GEMM of the op:

* ``sorsa_mm_kernel``:  ``C = drop_in(X1)·W1ᵀ + drop_out(X2·W2ᵀ) + bias`` — the second,
  rank-r segment extends the main K loop (LoRAFusion's ``[x | s]·[W_r | B]ᵀ``), so the
  adapter never costs a second pass over C. Forward ``y``, the shrink ``x·Aᵀ``, ``dY·B``
  and ``dX = dY·W_r + drop(gs·A)`` are all instances (operands are addressed by strides,
  so transposed views cost nothing).
* ``sorsa_tn_kernel``: ``C[s] = P[m_s]ᵀ·drop(Q[m_s])`` over a slice ``m_s`` of the long
  M dimension (split-M, partials summed afterwards in a fixed order → deterministic):
  ``dB`` and ``dA``, whose outputs are too small to fill the GPU otherwise.

Dropout masks are never stored: element (m, k) of x is kept iff
``philox(seed, m·in_features + k) >= p``, regenerated identically wherever it is needed;
``seed`` is a host integer (drawn from torch's CPU generator per call: no device sync).
``BIG`` (decided by the launcher from shapes and strides) switches every index to int64.
``UPCAST`` feeds fp32 to ``tl.dot`` (the interpreter's bf16 dot is wrong, triton#11584);
on the GPU the native low-precision dot is used.
"""
import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, cols, ld, p, BIG: tl.constexpr):
    # rows: (BM, 1), cols: (1, BN) index tensors of the logical x (M × in_features).
    # rows/cols are already int64 when BIG (the launcher's decision), so the product is too.
    return tl.rand(seed, rows * ld + cols) >= p


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def sorsa_mm_kernel(
    X1, W1, X2, W2, BIAS, C, seed,
    M, N, K, R, M_BUCKET,
    s_x1m, s_x1k, s_w1n, s_w1k,
    s_x2m, s_x2r, s_w2n, s_w2r,
    s_cm, s_cn,
    p, inv_keep, drop_ld,
    HAS_SEG2: tl.constexpr, HAS_BIAS: tl.constexpr, DROP_IN: tl.constexpr, DROP_OUT: tl.constexpr,
    BIG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share W tiles in L2
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if BIG:  # some offset can reach 2^31 elements: index arithmetic in int64
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
        rk = rk.to(tl.int64)
    m_ok = rm[:, None] < M
    n_ok = rn[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(X1 + rm[:, None] * s_x1m + kk[None, :] * s_x1k, mask=m_ok & (kk[None, :] < K), other=0.0)
        if DROP_IN:
            keep = _keep(seed, rm[:, None], kk[None, :], drop_ld, p, BIG)
            a = tl.where(keep, a.to(tl.float32) * inv_keep, 0.0).to(a.dtype)
        b = tl.load(W1 + rn[None, :] * s_w1n + kk[:, None] * s_w1k, mask=n_ok & (kk[:, None] < K), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)

    if HAS_SEG2:
        # Without an output mask the rank-r segment accumulates straight into acc: a second
        # 128×128 fp32 accumulator would spill.
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
            keep = _keep(seed, rm[:, None], rn[None, :], drop_ld, p, BIG)
            acc += tl.where(keep, acc2 * inv_keep, 0.0)
        else:
            acc = acc2

    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(C.dtype.element_ty), mask=m_ok & n_ok)


@triton.jit(do_not_specialize=["seed"])
def sorsa_tn_kernel(
    P, Q, C, seed,
    M, DA, DB, m_per_split,
    s_pm, s_pa, s_qm, s_qb, s_cs, s_ca, s_cb,
    p, inv_keep, drop_ld,
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
            keep = _keep(seed, rm[:, None], rb[None, :], drop_ld, p, BIG)
            q = tl.where(keep, q.to(tl.float32) * inv_keep, 0.0).to(q.dtype)
        if UPCAST:
            pt = pt.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(pt, q, acc, input_precision=PREC)
    c = C + split.to(tl.int64) * s_cs + ra[:, None] * s_ca + rb[None, :] * s_cb
    tl.store(c, acc, mask=(ra[:, None] < DA) & (rb[None, :] < DB))
