"""Batched randomized SVD: the top-``rank`` singular triplets of a stack of matrices.

Algorithm: a randomized block Krylov method (Musco & Musco 2015) in Golub–Kahan form with
one-sided re-orthogonalisation (Simon & Zha 2000), stopped by an accuracy target. With ``A`` = W or
Wᵀ so that its rows are the smaller dimension ``N``, blocks of ``b = rank + oversample`` columns:
``Z_0 = orth(Ω)``; each block ``Q_t = orth(A·Z_t)`` made orthogonal to the basis ``Q_all`` by block
classical Gram–Schmidt twice, then ``Y_t = Aᵀ·Q_t`` and ``Z_{t+1} = orth(Y_t)``, so ``span(Q_all)``
is the block Krylov space ``A·K_t(AᵀA, Ω)``. Only ``Q`` is re-orthogonalised: ``Z`` just picks the
next directions, and ``A·Z`` is projected against ``Q`` anyway. The products ``Y`` are kept (fp64),
so the Rayleigh–Ritz values over the basis — ``σ(Q_allᵀ·A)``, square roots of the eigenvalues of the
growing fp64 Gram matrix ``H = Y_allᵀ·Y_all`` — cost no pass over A: a convergence check is one
small eigenvalue problem (and one host sync). The result is exactly what the last check measured:
``U = Q_all·v``, ``σ``, ``V = orth(Y_all·v)`` from H's top eigenpairs (exact once the basis spans
N; for fp64 work the σ and V come from an SVD of ``Y_all·v``, which keeps small σ relatively
accurate). A new block is orthonormalised eigen-based first (SVQB: ``eigh`` of its fp64 Gram
matrix after the first projection): its directions at the rounding level of the block (numerically
in the basis' span — an exhausted Krylov space —, dependent — a rank below the block width —, or
zero) are replaced by Gaussian ones, then projected again and finished by CholeskyQR (a Gram
matrix in the working dtype suffices: the block is orthonormal to ~eps/τ by then),
so ``U`` and ``V`` are orthonormal whatever W is. ``Z`` is CholeskyQR with the shifted
CholeskyQR3 fallback (Fukaya et al. 2020) and Gaussian refill of null columns. The GEMMs are torch's (cuBLAS/MKL); the Gaussian sketch and
the batched k×k Cholesky are the building blocks below, from the C++/CUDA extension (``"ext"``,
per-matrix code shared between the CPU and CUDA builds) or plain torch (``"torch"``); the d×d
eigenproblems (checks, Rayleigh–Ritz) are torch's either way.

Why block Krylov: subspace iteration (each iterate replacing the last) forgets what the earlier
iterates had found. On 16 LLM-like 2048² matrices at r = 64, blocks of 64 columns, max relative σ
error by iterations: 3: 3.9 %, 4: 1.8 %, 5: 0.89 %, 6: 0.33 %, 7: 0.12 %, where subspace iteration
(oversample 32, Rayleigh–Ritz on the last two iterates) needed 8 iterations of 96 columns for
0.30 %. Blocks of ``rank`` columns converge as fast per GEMM pass as wider ones at r = 16–128
(blocks of 96 / 128 needed a wider basis for the same error here), so the default adds no
oversampling above ``MIN_BLOCK`` columns (BENCHMARKS.md has the cases and the iterations chosen).
Why this form: the previous block Krylov version kept ``W·Z`` products and returned one half step
past the values it checked; its checks lagged what it returned (estimate 2× the returned error,
one iteration more) and it re-orthogonalised both sides: 7 iterations and 5.1 s on that stack
against 6 and ~3 s here (BENCHMARKS.md).

Stopping: the Ritz values grow monotonically towards the true σ as the basis grows (nested
subspaces), so the remaining error is the sum of the changes still to come; the estimate is the
last relative change or its geometric tail, whichever is larger (:class:`_Estimate`), of the values
that are returned. ``tol = 0.01`` by default; ``niter`` alone runs a fixed number of iterations with
no host sync in the loop. PEFT's fast-PiSSA setting (``torch.svd_lowrank``, q = r, 2 iterations)
is ~13 % off on LLM-like matrices.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

from ... import _backend
from ..._env import ext_status
from ..._precision import no_tf32
from ..._validate import check_finite, check_float

OP = "rsvd"
DEFAULT_TOL = 0.01
DEFAULT_OVERSAMPLE = 0
#: iterations the init's cost and memory models assume for a default (tol) call: what 2048² and
#: 4096² LLM-like matrices at r = 64 / 128 needed (BENCHMARKS.md)
DEFAULT_NITER = 6
#: the iteration cap with tol (and so the widest basis the init's memory model allows for)
MAX_TOL_ITERS = 16
#: devices where a host check of a tensor is free (no device to wait for): there the loop skips
#: work that ``torch.where`` would discard (a shifted Cholesky, a Gaussian refill) instead of doing
#: it sync-free as on CUDA. Same results either way (tests run both)
HOST_CHECK_DEVICES = ("cpu",)

# The extension's implementation is declared even when _C did not load: a forced backend="ext"
# then reports why. "auto" takes torch on both device types: on the CPU LAPACK's small k×k steps
# were measured faster than the extension's; on CUDA it is not measured (the extension's Cholesky
# is one 256-thread block per matrix in global memory, launched twice per iteration, ~70 launches
# per rsvd, against cuSOLVER's batched kernels through torch), until a GPU run times both
# (gpu_check's init bench does, per backend). backend="ext" still forces the extension.
SPEC = _backend.register(_backend.OpSpec(
    name=OP, doc="batched randomized SVD: top-r singular triplets of a stack of matrices (init)",
    impls={"ext": None}, auto_order={"cpu": (), "cuda": ()},
    check="sorsa_kernels.ops.rsvd.check", bench="sorsa_kernels.ops.rsvd.bench"))
if ext_status()[0]:
    @torch.library.register_fake("sorsa_kernels::jacobi_svd")
    def _(R, max_sweeps):
        return torch.empty_like(R), R.new_empty(R.shape[:2]), torch.empty_like(R)

    @torch.library.register_fake("sorsa_kernels::cholesky_upper_")
    def _(G):
        return G.new_empty(G.shape[0], dtype=torch.int32)

    @torch.library.register_fake("sorsa_kernels::philox_normal_")
    def _(out, seed):
        return None


# ---- building blocks, one pair of implementations per backend --------------------------------
def _normal_ext(shape, seed: int, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    torch.ops.sorsa_kernels.philox_normal_(out, seed)
    return out


def _normal_torch(shape, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype, device=device)


def _chol_ext(G: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    R = G.contiguous().clone()
    info = torch.ops.sorsa_kernels.cholesky_upper_(R)
    return R, info


def _chol_torch(G: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    L, info = torch.linalg.cholesky_ex(G)
    return L.mT.contiguous(), info


_BLOCKS = {"ext": (_normal_ext, _chol_ext), "torch": (_normal_torch, _chol_torch)}


# ---- algorithm -----------------------------------------------------------------------------
class _Run:
    def __init__(self, backend: str, seed: int):
        self.normal, self.chol = _BLOCKS[backend]
        self.seed = seed
        self.draws = 0
        self.failed = torch.zeros((), dtype=torch.bool)

    def gaussian(self, shape, dtype, device) -> torch.Tensor:
        # each draw of one run gets its own Philox stream
        self.draws += 1
        return self.normal(shape, (self.seed * 1_000_003 + self.draws) % (2 ** 62), dtype, device)

    def chol_shifted(self, G: torch.Tensor, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Upper Cholesky factor of each G; matrices that are not numerically PD get the shift
        of shifted CholeskyQR3 (at least the smallest normal number, so a zero G works).
        Returns (R, shift per matrix: RᵀR = G + shift·I, 0 where none was needed).
        On CUDA both factorisations run for every matrix and ``torch.where`` picks one: no host sync
        (the k×k Cholesky is ~1/800 of a pass's GEMM work at k = 192, n = 4096); on the CPU, where a
        host check is free, the shifted one runs only when some matrix needs it. A failed shifted
        one is recorded in ``self.failed`` and raised once per call."""
        R, info = self.chol(G)
        bad = info != 0
        if G.device.type in HOST_CHECK_DEVICES and not bool(bad.any()):
            return R, G.new_zeros(G.shape[0])
        k = G.shape[-1]
        fro2 = G.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖Y‖_F² = trace(YᵀY)
        s = 11.0 * (rows * k + k * (k + 1)) * torch.finfo(torch.float64).eps * fro2
        s = s.clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(k, dtype=G.dtype, device=G.device)
        Rs, info2 = self.chol(G + s[:, None, None] * eye)
        self.failed = self.failed | (bad & (info2 != 0)).any()
        return torch.where(bad[:, None, None], Rs, R), torch.where(bad, s, torch.zeros_like(s))

    def cholqr(self, Y: torch.Tensor, gram64: bool = True, G: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One CholeskyQR pass: R from the Gram matrix (accumulated in fp64 when ``gram64``; ``G``
        if the caller has it), Q = Y·R⁻¹ as a GEMM in Y's dtype (R⁻¹ is k×k, formed in fp64)."""
        if G is None:
            Yg = Y.to(torch.float64) if gram64 else Y
            G = (Yg.mT @ Yg).to(torch.float64)
        R, _ = self.chol_shifted(G, Y.shape[1])
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
        Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
        return Y @ Rinv.to(Y.dtype), R

    def orth(self, Y: torch.Tensor, passes: int = 3, Y64: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Basis of each Y's columns (in Y's dtype) and R (fp64) with Y = Q·R; null columns (by
        the norms on the fp64 Gram matrix's diagonal) are refilled with Gaussian ones first
        (``torch.where``: no host sync; on the CPU the Gaussian is drawn, and the Gram matrix
        formed again, only when some column is null). ``Y64``: Y in fp64, if the caller has it.
        The first pass forms its Gram in fp64 (Y may be ill-conditioned), later ones, on a nearly
        orthonormal Q, in Y's dtype. ``passes=3`` is shifted CholeskyQR3 (orthonormal to rounding
        even when the first pass needed the shift); ``passes=1``-``2`` give a well-conditioned
        basis where the caller re-orthonormalises anyway."""
        Yg = Y.to(torch.float64) if Y64 is None else Y64
        G = Yg.mT @ Yg
        nrm2 = G.diagonal(dim1=-2, dim2=-1)
        null = nrm2 <= 1e-26 * nrm2.amax(1, keepdim=True).clamp_min(1e-300)  # norm <= 1e-13 x the largest
        if Y.device.type in HOST_CHECK_DEVICES and not bool(null.any()):
            self.draws += 1  # the draw's stream is skipped, not reused: later draws keep their seeds
        else:
            Y = torch.where(null[:, None, :], self.gaussian(Y.shape, Y.dtype, Y.device), Y)
            G = None
        Q, R = self.cholqr(Y, G=G)
        for _ in range(passes - 1):
            Q, R2 = self.cholqr(Q, gram64=Y.dtype == torch.float64)
            R = R2 @ R
        return Q, R

    def extend(self, X: torch.Tensor, QaT: Optional[torch.Tensor]) -> torch.Tensor:
        """An orthonormal block spanning X's new directions, orthogonal to the basis (the rows of
        ``QaT``; None: empty): block classical Gram–Schmidt twice, the first orthonormalisation
        eigen-based (SVQB, Stathopoulos & Wu 2002). Directions of X whose norm after the first
        projection is at X's rounding level (at most ``τ = 10·eps·√N`` times its largest column:
        numerically in the basis' span — an exhausted Krylov space —, dependent on the block's
        other columns — a rank below the block width —, or zero) are replaced with Gaussian ones,
        so the block is orthonormal and new whatever W is (``torch.where``: no host sync; on the
        CPU the Gaussian is drawn only when some direction is replaced)."""
        N = X.shape[-2]
        # the largest squared column norm, before the projection (in X's dtype: W is normalised
        # to max-abs within 2^±32, far from under/overflow)
        big = torch.linalg.vector_norm(X, dim=1).amax(1).to(torch.float64).square()
        if QaT is not None:
            X = X - QaT.mT @ (QaT @ X)
        X64 = X.to(torch.float64)
        lam, V = torch.linalg.eigh(X64.mT @ X64)
        tau = 10 * torch.finfo(X.dtype).eps * math.sqrt(N)
        keep = lam > (tau * tau) * big[:, None]
        Xr = (X @ V.to(X.dtype)) * torch.where(keep, lam, 1.0).rsqrt().to(X.dtype)[:, None, :]
        if X.device.type in HOST_CHECK_DEVICES and bool(keep.all()):
            self.draws += 1  # the draw's stream is skipped, not reused: later draws keep their seeds
        else:
            g = self.gaussian(X.shape, X.dtype, X.device) / math.sqrt(N)
            Xr = torch.where(keep[:, None, :], Xr, g)
        if QaT is not None:
            Xr = Xr - QaT.mT @ (QaT @ Xr)
        # Xr is orthonormal to ~eps/τ (the rotation's rounding on its smallest kept direction):
        # a Gram matrix in X's dtype suffices
        Q, R = self.cholqr(Xr, gram64=X.dtype == torch.float64)
        # Xr is well conditioned unless Gaussian refills fill the last few dimensions (a nearly
        # square random block in the basis' complement: κ ~ its size) or R says otherwise: then
        # CholQR's Q = Xr·R⁻¹ is orthonormal only to ~eps·κ and the basis' components it amplified
        # must go: one more projection and pass (where needed)
        d = 0 if QaT is None else QaT.shape[-2]
        dg = R.diagonal(dim1=-2, dim2=-1).abs()
        need = (dg.amax(1) > 64 * dg.amin(1)) | (N - d < 4 * X.shape[-1])
        if X.device.type not in HOST_CHECK_DEVICES or bool(need.any()):
            Q2 = Q if QaT is None else Q - QaT.mT @ (QaT @ Q)
            Q = torch.where(need[:, None, None], self.cholqr(Q2, gram64=X.dtype == torch.float64)[0], Q)
        return Q


def _check_args(W, rank, oversample, niter, tol, seed, backend):
    check_float("W", W)
    if W.dim() < 2:
        raise ValueError(f"W must have at least 2 dimensions (..., m, n), got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= min(m, n)):
        raise ValueError(f"rank must be an int in [1, min(m, n)] = [1, {min(m, n)}], got {rank!r}")
    oversample = default_oversample(rank) if oversample is None else oversample
    check_options(oversample, niter, tol, seed)
    check_finite("W", W)
    return oversample


def check_options(oversample=None, niter=None, tol=None, seed=None, **_ignored) -> None:
    """Value checks of rsvd's options (None = default). Init calls it up front, so a bad option
    fails even for shape groups where the exact SVD is chosen and the options go unused."""
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0):
        raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be an int >= 0, got {niter!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


#: smallest Krylov block: below it the per-iteration overheads (orthonormalisation, checks)
#: outweigh the GEMMs
MIN_BLOCK = 32


def default_oversample(rank: int) -> int:
    """Extra columns per block: none from ``MIN_BLOCK`` up (a block Krylov basis converges on the
    top ``rank`` σ with blocks of ``rank`` columns: measured at r = 64 / 128 on 2048² / 4096² /
    11008×4096 LLM-like and flatter spectra, BENCHMARKS.md), up to ``MIN_BLOCK`` below it."""
    return max(DEFAULT_OVERSAMPLE, MIN_BLOCK - rank)


#: max-abs exponents (|w| < 2^e) within ±this need no normalisation: every fp32 product, norm and
#: Gram entry of such a matrix is far from under/overflow
SAFE_EXPONENT = 32


def _pow2_normalise(Wb: torch.Tensor, owned: bool, force: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where some matrix's max-abs exponent e is beyond ±``SAFE_EXPONENT``, divide each matrix by
    2^e (exact: powers of 2 only change the exponent), so the fp32 work sees entries in [0.5, 1)
    whatever the scale: no column norm or Gram entry under/overflows for entries near 2^±100.
    Two factors, each within the dtype's range, because 2^e itself may not be representable (fp32
    subnormal inputs). Otherwise W is used as it is (no copy of the stack; every step is relative
    to the matrix's scale, so the result is the normalised matrix's, scaled, to rounding).
    Returns (W', e) with W = 2^e·W' (e = 0 where W is not normalised)."""
    # max |w| from two reductions: no |W| temporary (measured 5x faster on a 16 x 2048^2 stack)
    _, e = torch.frexp(torch.maximum(Wb.amax((1, 2)), -Wb.amin((1, 2))))  # 0 for an all-zero matrix
    if not force and bool((e.abs() <= SAFE_EXPONENT).all()):  # one host sync per call
        return Wb, torch.zeros_like(e)
    e1 = torch.div(e, 2, rounding_mode="floor")
    one = torch.ones((), dtype=Wb.dtype, device=Wb.device)
    out = Wb if owned else Wb.clone()
    for part in (e1, e - e1):
        out.mul_(torch.ldexp(one, -part.to(Wb.dtype))[:, None, None])
    return out, e


@torch.no_grad()
def rsvd(
    W: torch.Tensor,
    rank: int,
    *,
    oversample: Optional[int] = None,
    niter: Optional[int] = None,
    tol: Optional[float] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
    iter_dtype: Optional[torch.dtype] = None,
    info: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``W`` (``(..., m, n)``, batched over leading dims).

    Args:
        rank: number of triplets (1 ≤ rank ≤ min(m, n)).
        oversample: extra columns per Krylov block (block size ``rank + oversample``; default
            :func:`default_oversample`).
        niter: iterations, each adding one block to the Krylov basis (2 GEMM passes; the first
            block costs 2 more).
            Alone: that many (fewer once the basis spans min(m, n): the result is then exact), no
            convergence check and no host sync in the loop. With
            ``tol``: the cap (default 16).
        tol: iterate until the estimated worst relative error of the top-``rank`` singular values
            is ≤ tol (one host sync per iteration for the check), or warn at the cap. Default
            ``0.01`` when ``niter`` is not given. The estimate is the last relative change of the
            returned values or its geometric tail, whichever is larger (see :class:`_Estimate`);
            measured at or above the true error on every case in BENCHMARKS.md.
        seed: sketch seed; the result is deterministic for a given seed, backend and batch: the
            Gaussian sketch is drawn for the whole batch, and the batch iterates until its worst
            matrix meets ``tol``, so one matrix's bits depend on the batch it is in (the init's
            chunks; fixed for a given memory budget) (default: drawn from torch's global
            generator).
        backend: "auto" | "ext" (C++/CUDA extension) | "torch" for the sketch and the small
            b×b steps (the GEMMs and the basis' d×d eigenproblems are torch's either way). "auto"
            is torch on both device types (see ``SPEC``: LAPACK measured faster than the
            extension on the CPU; on CUDA not measured yet).
        iter_dtype: dtype of the ``A·Z`` GEMMs that grow the basis (default: bfloat16 for float32
            work on CUDA, where tensor cores make them ~10× faster; else the working precision).
            Rounding there only perturbs the next block's directions; the ``Aᵀ·Q`` products that the
            Rayleigh–Ritz step and the checks read always run in the working precision.
        info: if a dict is given, it receives ``iterations``, ``basis`` (the Krylov basis width)
            and ``error_estimate`` (the estimated max relative σ error; NaN without ``tol``).

    Scale-equivariant: a stack with max-abs entries beyond 2^±32 is divided, matrix by matrix, by a
    power of 2 near its max-abs entry before any fp32 work and σ is scaled back, so ``rsvd(c·W)`` is
    ``c·rsvd(W)`` to rounding for any finite c.
    TF32 is off inside (see :func:`no_tf32`). No host sync in the iteration loop with ``niter``
    alone.

    Returns:
        ``U (..., m, rank)``, ``S (..., rank)`` descending, ``Vh (..., rank, n)``; float32
        (float64 when W is float64).
    """
    oversample = _check_args(W, rank, oversample, niter, tol, seed, backend)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info must be None or a dict (it receives iterations, basis, error_estimate), "
                        f"got {type(info).__name__}")
    if tol is None and niter is None:
        tol = DEFAULT_TOL
    with no_tf32():
        return _rsvd(W, rank, oversample, niter, tol, seed, backend, iter_dtype, info)


def _rsvd(W, rank, oversample, niter, tol, seed, backend, iter_dtype, info=None):
    run = _Run(_backend.resolve(OP, backend, W.device),
               int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if seed is None else seed)
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    *lead, m, n = W.shape
    Wb = W.reshape(-1, m, n)
    fast = W.device.type == "cuda" and work == torch.float32
    it_dt = iter_dtype or (torch.bfloat16 if fast else work)
    if it_dt not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"iter_dtype must be a floating dtype, got {it_dt}")
    owned = Wb.dtype != work
    Wb = Wb.to(work)
    if Wb.stride(-1) != 1 and Wb.stride(-2) != 1:  # no BLAS layout: one copy, not one per GEMM
        Wb, owned = Wb.contiguous(), True
    # fp16 products have fp16's exponent range: always normalised then
    Wb, expo = _pow2_normalise(Wb, owned=owned, force=it_dt == torch.float16)
    # the orthonormal basis Q lives in the smaller dimension N: its re-orthogonalisation is cheapest
    # there, and once it fills it the result is exact
    flip = m > n
    A = Wb.mT if flip else Wb  # (nb, N, M), N <= M
    nb, N, M = A.shape
    # bf16 A·Z products only where they pay (CUDA tensor cores) and for fp32 work: they only choose
    # the basis' next directions; the Aᵀ·Q products, which Rayleigh–Ritz and the checks read, stay in
    # `work`
    # Off CUDA, low-precision products are emulated: operands rounded to it_dt, the product
    # formed in the working precision and rounded to it_dt, as a tensor-core GEMM does (up to
    # summation order); CPU bf16 GEMMs would be ~10x slower than fp32 ones for no gain.
    emulate = it_dt != work and W.device.type != "cuda"
    Ai = A if it_dt == work else (A.to(it_dt).to(work) if emulate else A.to(it_dt))

    def grow_mm(Z: torch.Tensor) -> torch.Tensor:  # A·Z in the iteration dtype
        if it_dt == work:
            return Ai @ Z
        if emulate:
            return (Ai @ Z.to(it_dt).to(work)).to(it_dt).to(work)
        return (Ai @ Z.to(it_dt)).to(work)

    b = min(rank + oversample, N)
    cap = (MAX_TOL_ITERS if niter is None else niter) if tol is not None else niter
    # the basis, its products Aᵀ·Q (fp64: what the Gram matrix and V read) and their Gram matrix,
    # allocated once at their widest and filled block by block (no regrowth, no copy). Stored
    # transposed, a block per row band: a block's write touches only its own pages (row-major
    # (N, dmax) buffers had the first block fault in most of every row's pages: ~2x the page faults)
    dmax = min(N, (cap + 1) * b)
    QallT = torch.empty(nb, dmax, N, dtype=work, device=W.device)
    YallT = torch.empty(nb, dmax, M, dtype=torch.float64, device=W.device)
    H = torch.empty(nb, dmax, dmax, dtype=torch.float64, device=W.device)
    d = 0
    Z = run.orth(run.gaussian((nb, M, b), work, W.device), passes=1)[0]
    est, prev, eig = float("nan"), _Estimate(), None
    converged = tol is None
    done = 0
    while True:
        # next block of the basis: A·Z made orthonormal and orthogonal to the basis (Gaussian
        # directions where it adds nothing new: see _Run.extend)
        Q = run.extend(grow_mm(Z)[..., :min(b, N - d)], QallT[:, :d] if d else None)
        w = Q.shape[-1]
        QallT[:, d:d + w] = Q.mT
        Yt = Q.mT @ A  # (Aᵀ·Q)ᵀ: the Rayleigh–Ritz products, in the working precision
        YallT[:, d:d + w] = Yt
        C = YallT[:, :d + w] @ YallT[:, d:d + w].mT  # the new block column of the Gram matrix
        H[:, :d + w, d:d + w] = C
        H[:, d:d + w, :d] = C[:, :d].mT
        d += w
        eig = None  # an earlier check's eigenpairs are of a smaller basis
        if d >= N:  # the basis spans the whole space: Rayleigh–Ritz is exact
            converged, est = True, (0.0 if tol is not None else est)
            break
        if tol is not None:
            # a check predicted to pass also forms the eigenvectors, which the result then reuses
            want = prev.predicted() <= tol
            eig = torch.linalg.eigh(H[:, :d, :d]) if want else None
            est = prev.update(eig[0] if want else torch.linalg.eigvalsh(H[:, :d, :d]), rank)
            if est <= tol:
                converged = True
                break
        if done >= cap:
            break
        done += 1
        # the next block's directions: a well-conditioned basis of Aᵀ·Q_last (A·Z_next is
        # re-orthogonalised against the basis, so Z itself need not be orthogonal to earlier Z)
        Z, _ = run.orth(Yt.mT, passes=1, Y64=YallT[:, d - w:d].mT)
    if not converged:
        warnings.warn(f"rsvd: tol={tol} not reached within {cap} iterations (estimated error {est:.3g}); "
                      "returning the last Rayleigh–Ritz result", RuntimeWarning, stacklevel=3)
    if info is not None:
        info.update(iterations=done, error_estimate=est, basis=d)
    # Rayleigh–Ritz on span(Q): σ(Qᵀ·A) from the eigenpairs of its Gram matrix H = Yᵀ·Y (one d×d
    # fp64 eigh, reused from the last check when it formed them); U = Q·v, V = Y·v / σ
    lam, vec = eig if eig is not None else torch.linalg.eigh(H[:, :d, :d])  # ascending
    if work == torch.float64:
        # √λ has absolute error ~eps·σ_max²/σ: for fp64 work the SVD of Y·v (top b eigenvectors:
        # an orthogonal rotation of the basis, the same σ) keeps small σ relatively accurate
        k = min(d, b)
        Uy, S, Vhy = torch.linalg.svd(YallT[:, :d].mT @ vec[..., -k:], full_matrices=False)
        S, V = S[:, :rank], Uy[..., :rank]
        Vg = vec[..., -k:] @ Vhy[:, :rank].mT
    else:
        S = lam[:, -rank:].flip(-1).clamp_min(0).sqrt()
        Vg = vec[..., -rank:].flip(-1)
        # = Aᵀ·U·Σ⁻¹ up to column scaling; orth keeps it orthonormal for σ ≈ 0
        V, _ = run.orth((YallT[:, :d].mT @ Vg).to(work))
    U = QallT[:, :d].mT @ Vg.to(work)
    if flip:
        U, V = V, U
    if bool(run.failed):  # the call's one host sync (besides one per convergence check)
        raise RuntimeError("rsvd: shifted Cholesky failed; the input has non-finite values or overflows")
    S = torch.ldexp(S, expo[:, None].to(torch.float64)).to(work)  # undo the 2^-e scaling
    shape = lambda t, *tail: t.reshape(*lead, *tail)  # noqa: E731
    return shape(U, m, rank), shape(S, rank), shape(V.mT, rank, n)


#: relative changes of σ below this fraction of σ_max are rounding, not convergence (the products
#: are fp32: a σ this small has no correct digit to converge to)
CHECK_FLOOR = 1e-5


class _Estimate:
    """The convergence checks' state. The Ritz values σ(Qᵀ·A) grow monotonically towards the true
    σ as the basis grows (nested subspaces), so the remaining error is the sum of the changes
    still to come. With ``c`` the largest relative change of the top-``rank`` values over the last
    block and ``ρ`` its ratio to the one before, the estimate is ``max(c, c·ρ/(1−ρ))`` (the
    geometric tail, and at least the last change); inf until two changes are known. One host
    sync per check."""

    def __init__(self):
        self.sigma = self.change = self.rho = None
        self.est = float("inf")

    def predicted(self) -> float:
        """The next check's estimate if the changes keep shrinking at the last ratio."""
        return self.est * self.rho if self.rho is not None else float("inf")

    def update(self, lam: torch.Tensor, rank: int) -> float:
        cur = lam[:, -rank:].flip(-1).clamp_min(0).sqrt()  # eigenvalues ascending
        if self.sigma is not None:
            floor = CHECK_FLOOR * cur[:, :1]
            c = ((cur - self.sigma).abs() / torch.maximum(cur, floor).clamp_min(torch.finfo(cur.dtype).tiny)).amax().item()
            if self.change is not None:
                self.rho = min(c / self.change, 0.95) if self.change > 0 else 0.0
                self.est = max(c, c * self.rho / (1 - self.rho))
            self.change = c
        self.sigma = cur
        return self.est


def rsvd_naive(W: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: exact float64 SVD truncated to ``rank`` (for tests and accuracy reports)."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]
