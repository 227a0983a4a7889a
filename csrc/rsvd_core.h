// Per-matrix math of the batched randomized SVD, shared by the CPU build (g++) and the CUDA
// build (nvcc): every function here is plain arithmetic on one matrix, so the CPU tests run
// exactly the code the GPU runs. Row-major storage, double precision for the small k×k steps.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace sorsa_core {

// ---- Philox4x32-10 (Salmon et al. 2011): counter-based, so element i of a sketch depends only
// on (seed, i) and CPU and GPU draw identical Gaussian sketches.
struct U4 { uint32_t x, y, z, w; };

SK_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

SK_HD U4 philox4x32(U4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo(0xD2511F53u, c.x, &hi0);
    uint32_t lo1 = mulhilo(0xCD9E8D57u, c.z, &hi1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// (0, 1]: never 0, so log() below is finite.
SK_HD double u32_to_unit(uint32_t a, uint32_t b) {
  uint64_t v = (static_cast<uint64_t>(a) << 21) ^ static_cast<uint64_t>(b >> 11);
  v &= (1ull << 53) - 1;
  return (static_cast<double>(v) + 1.0) * (1.0 / 9007199254740992.0);
}

// Standard normal number `index` of the stream `seed` (Box–Muller on one Philox block).
SK_HD double normal(uint64_t seed, uint64_t index) {
  U4 c{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0x5D5E5D5Eu, 0u};
  U4 r = philox4x32(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  double u1 = u32_to_unit(r.x, r.y), u2 = u32_to_unit(r.z, r.w);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// ---- Cholesky G = Rᵀ·R in place (k×k, row-major, leading dim ld), right-looking, written as
// steps the CUDA kernel runs in parallel: for column j, chol_pivot (one thread), chol_scale_row
// (each i > j independent), chol_update (each (i, l), j < i ≤ l, independent).
// The upper triangle becomes R; cholesky_upper zeroes the strict lower triangle.

// Returns false for a non-positive (or NaN) pivot.
SK_HD bool chol_pivot(double* G, int ld, int j) {
  double d = G[j * ld + j];
  if (!(d > 0.0)) return false;
  G[j * ld + j] = std::sqrt(d);
  return true;
}

SK_HD void chol_scale_row(double* G, int ld, int j, int i) { G[j * ld + i] /= G[j * ld + j]; }

SK_HD void chol_update(double* G, int ld, int j, int i, int l) { G[i * ld + l] -= G[j * ld + i] * G[j * ld + l]; }

// Serial driver (the CPU build). Returns 0, or 1 + the failing column.
SK_HD int cholesky_upper(double* G, int k, int ld) {
  for (int j = 0; j < k; ++j) {
    if (!chol_pivot(G, ld, j)) return j + 1;
    for (int i = j + 1; i < k; ++i) chol_scale_row(G, ld, j, i);
    for (int i = j + 1; i < k; ++i)
      for (int l = i; l < k; ++l) chol_update(G, ld, j, i, l);
  }
  for (int i = 1; i < k; ++i)
    for (int j = 0; j < i; ++j) G[i * ld + j] = 0.0;
  return 0;
}

// ---- One-sided Jacobi rotation for columns p, q with Gram entries a = ‖x_p‖², b = ‖x_q‖²,
// g = x_p·x_q: (c, s) that make the two columns orthogonal. Returns false when already
// orthogonal to working precision (|g| <= eps·sqrt(a·b)).
SK_HD bool jacobi_rotation(double a, double b, double g, double eps, double* c, double* s) {
  if (!(std::fabs(g) > eps * std::sqrt(a * b))) return false;
  double zeta = (b - a) / (2.0 * g);
  double t = (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1.0 + zeta * zeta));
  *c = 1.0 / std::sqrt(1.0 + t * t);
  *s = *c * t;
  return true;
}

SK_HD void rotate_pair(double* x, double* y, double c, double s) {
  double xp = *x, yq = *y;
  *x = c * xp - s * yq;
  *y = s * xp + c * yq;
}

// ---- Round-robin (circle method) pair schedule for parallel Jacobi: with n = k rounded up to
// even, step t ∈ [0, n-1) holds the n/2 disjoint pairs i ∈ [0, n/2); over the n-1 steps every
// pair of columns meets exactly once. Index k (odd k only) is a dummy: skip pairs containing it.
SK_HD void round_robin_pair(int n, int t, int i, int* p, int* q) {
  if (i == 0) {
    *p = t;
    *q = n - 1;
  } else {
    *p = (t + i) % (n - 1);
    *q = (t - i + (n - 1)) % (n - 1);
  }
}

// Gram entries of columns p, q (column-major, length k).
SK_HD void pair_gram(const double* ap, const double* aq, int k, double* a, double* b, double* g) {
  double sa = 0, sb = 0, sg = 0;
  for (int i = 0; i < k; ++i) {
    sa += ap[i] * ap[i]; sb += aq[i] * aq[i]; sg += ap[i] * aq[i];
  }
  *a = sa; *b = sb; *g = sg;
}

// ---- One-sided Jacobi SVD of a k×k matrix, serially, in place, in the round-robin order the
// CUDA kernel runs in parallel (so this CPU build checks the GPU's schedule and convergence).
// Column-major storage (column j at A + j·k). On return the columns of A are U_j·σ_j, V
// (column-major) holds the right vectors, S the σ_j (unsorted). Returns the sweeps used.
SK_HD int jacobi_svd_colmajor(double* A, double* V, double* S, int k, int max_sweeps, double eps) {
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < k; ++i) V[j * k + i] = (i == j) ? 1.0 : 0.0;
  const int n = k + (k & 1);
  int sweep = 0;
  for (; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int t = 0; t < n - 1; ++t) {
      for (int pi = 0; pi < n / 2; ++pi) {
        int p, q;
        round_robin_pair(n, t, pi, &p, &q);
        if (p >= k || q >= k) continue;
        double* ap = A + p * k;
        double* aq = A + q * k;
        double a, b, g, c, s;
        pair_gram(ap, aq, k, &a, &b, &g);
        if (!jacobi_rotation(a, b, g, eps, &c, &s)) continue;
        rotated = true;
        double* vp = V + p * k;
        double* vq = V + q * k;
        for (int i = 0; i < k; ++i) rotate_pair(&ap[i], &aq[i], c, s);
        for (int i = 0; i < k; ++i) rotate_pair(&vp[i], &vq[i], c, s);
      }
    }
    if (!rotated) break;
  }
  for (int j = 0; j < k; ++j) {
    double nrm = 0;
    for (int i = 0; i < k; ++i) nrm += A[j * k + i] * A[j * k + i];
    S[j] = std::sqrt(nrm);
  }
  return sweep;
}

}  // namespace sorsa_core
