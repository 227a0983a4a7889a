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

// ---- Cholesky G = Rᵀ·R in place (k×k, row-major, leading dim ld): the upper triangle becomes R,
// the strict lower triangle is zeroed. Returns 0, or 1 + the failing column for a non-positive pivot.
SK_HD int cholesky_upper(double* G, int k, int ld) {
  for (int j = 0; j < k; ++j) {
    double d = G[j * ld + j];
    for (int p = 0; p < j; ++p) d -= G[p * ld + j] * G[p * ld + j];
    if (!(d > 0.0)) return j + 1;
    d = std::sqrt(d);
    G[j * ld + j] = d;
    for (int i = j + 1; i < k; ++i) {
      double s = G[j * ld + i];
      for (int p = 0; p < j; ++p) s -= G[p * ld + j] * G[p * ld + i];
      G[j * ld + i] = s / d;
    }
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

// ---- Full one-sided Jacobi SVD of a k×k matrix, serially, in place. Column-major storage
// (column j at A + j·k) so the rotations stream over contiguous memory. On return the columns
// of A are U_j·σ_j, V (column-major) holds the right vectors, S the σ_j (unsorted).
// Returns the number of sweeps used.
SK_HD int jacobi_svd_colmajor(double* A, double* V, double* S, int k, int max_sweeps, double eps) {
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < k; ++i) V[j * k + i] = (i == j) ? 1.0 : 0.0;
  int sweep = 0;
  for (; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < k - 1; ++p) {
      double* ap = A + p * k;
      for (int q = p + 1; q < k; ++q) {
        double* aq = A + q * k;
        double a = 0, b = 0, g = 0;
        for (int i = 0; i < k; ++i) {
          a += ap[i] * ap[i]; b += aq[i] * aq[i]; g += ap[i] * aq[i];
        }
        double c, s;
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
    double n = 0;
    for (int i = 0; i < k; ++i) n += A[j * k + i] * A[j * k + i];
    S[j] = std::sqrt(n);
  }
  return sweep;
}

}  // namespace sorsa_core
