// CUDA implementations of the rsvd building blocks (see rsvd_ops.cpp for the schemas).
// Each kernel runs the same per-matrix code as the CPU build (rsvd_core.h); the Jacobi
// kernel parallelises the row loops of each rotation over a thread block.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "rsvd_core.h"

namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for this op, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
__global__ void philox_normal_kernel(T* out, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = static_cast<T>(sorsa_core::normal(seed, static_cast<uint64_t>(i)));
}

void philox_normal_cuda(at::Tensor out, int64_t seed) {
  check_cuda(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "out must be float32 or float64, got ", out.scalar_type());
  const at::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_cuda", [&] {
    philox_normal_kernel<scalar_t><<<blocks, threads, 0, stream>>>(out.data_ptr<scalar_t>(), n, static_cast<uint64_t>(seed));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One block per matrix: the right-looking Cholesky of rsvd_core.h with its row scaling and
// trailing update spread over the block's threads (two barriers per column).
__global__ void cholesky_kernel(double* G, int* info, int k) {
  double* g = G + blockIdx.x * (int64_t)k * k;
  __shared__ int ok;
  for (int j = 0; j < k; ++j) {
    if (threadIdx.x == 0) ok = sorsa_core::chol_pivot(g, k, j) ? 1 : 0;
    __syncthreads();
    if (!ok) {
      if (threadIdx.x == 0) info[blockIdx.x] = j + 1;
      return;  // block-uniform: every thread read the same `ok`
    }
    for (int i = j + 1 + threadIdx.x; i < k; i += blockDim.x) sorsa_core::chol_scale_row(g, k, j, i);
    __syncthreads();
    const int w = k - j - 1;  // trailing (i, l) with j < i ≤ l < k, flattened over the square
    for (int e = threadIdx.x; e < w * w; e += blockDim.x) {
      const int i = j + 1 + e / w, l = j + 1 + e % w;
      if (l >= i) sorsa_core::chol_update(g, k, j, i, l);
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < k * k; e += blockDim.x)
    if (e / k > e % k) g[e] = 0.0;
  if (threadIdx.x == 0) info[blockIdx.x] = 0;
}

at::Tensor cholesky_upper_cuda(at::Tensor G) {
  check_cuda(G, "G");
  TORCH_CHECK(G.dim() == 3 && G.size(1) == G.size(2) && G.scalar_type() == at::kDouble,
              "G must be float64 of shape (batch, k, k), got ", G.scalar_type(), " ", G.sizes());
  const at::cuda::CUDAGuard guard(G.device());
  const int64_t b = G.size(0);
  auto info = at::zeros({b}, G.options().dtype(at::kInt));
  if (b == 0) return info;
  auto stream = at::cuda::getCurrentCUDAStream();
  cholesky_kernel<<<b, 256, 0, stream>>>(G.data_ptr<double>(), info.data_ptr<int>(), (int)G.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return info;
}

// One block per matrix, column-major storage. Each round-robin step (sorsa_core::
// round_robin_pair, the schedule the CPU build runs serially) has k/2 disjoint column pairs:
// one warp per pair reduces its Gram entries with shuffles, computes the rotation
// (sorsa_core::jacobi_rotation) and applies it to its two columns of A and V; one block-wide
// barrier per step instead of one per pair.
__global__ void jacobi_kernel(double* A, double* V, double* S, int k, int max_sweeps) {
  const int64_t m = blockIdx.x;
  double* a = A + m * (int64_t)k * k;
  double* v = V + m * (int64_t)k * k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int n = k + (k & 1);
  __shared__ int rotated;
  for (int i = threadIdx.x; i < k * k; i += blockDim.x) v[i] = (i / k == i % k) ? 1.0 : 0.0;
  __syncthreads();
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int t = 0; t < n - 1; ++t) {
      for (int pi = warp; pi < n / 2; pi += nwarps) {
        int p, q;
        sorsa_core::round_robin_pair(n, t, pi, &p, &q);
        if (p >= k || q >= k) continue;  // warp-uniform
        double* ap = a + (int64_t)p * k;
        double* aq = a + (int64_t)q * k;
        double sa = 0, sb = 0, sg = 0;
        for (int i = lane; i < k; i += 32) {
          double xp = ap[i], xq = aq[i];
          sa += xp * xp; sb += xq * xq; sg += xp * xq;
        }
        for (int off = 16; off > 0; off >>= 1) {
          sa += __shfl_xor_sync(0xffffffff, sa, off);
          sb += __shfl_xor_sync(0xffffffff, sb, off);
          sg += __shfl_xor_sync(0xffffffff, sg, off);
        }
        // butterfly sums may differ in the last bit across lanes: take lane 0's so every lane
        // makes the same decision and applies the same rotation
        sa = __shfl_sync(0xffffffff, sa, 0);
        sb = __shfl_sync(0xffffffff, sb, 0);
        sg = __shfl_sync(0xffffffff, sg, 0);
        double c, s;
        if (!sorsa_core::jacobi_rotation(sa, sb, sg, 1e-15, &c, &s)) continue;
        if (lane == 0) rotated = 1;
        double* vp = v + (int64_t)p * k;
        double* vq = v + (int64_t)q * k;
        for (int i = lane; i < k; i += 32) {
          sorsa_core::rotate_pair(&ap[i], &aq[i], c, s);
          sorsa_core::rotate_pair(&vp[i], &vq[i], c, s);
        }
      }
      __syncthreads();
    }
    const int any = rotated;
    __syncthreads();  // everyone has read `rotated` before thread 0 resets it
    if (!any) break;
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    double nrm = 0;
    for (int i = 0; i < k; ++i) nrm += a[(int64_t)j * k + i] * a[(int64_t)j * k + i];
    S[m * k + j] = sqrt(nrm);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cuda(const at::Tensor& R, int64_t max_sweeps) {
  check_cuda(R, "R");
  TORCH_CHECK(R.dim() == 3 && R.size(1) == R.size(2) && R.scalar_type() == at::kDouble,
              "R must be float64 of shape (batch, k, k), got ", R.scalar_type(), " ", R.sizes());
  TORCH_CHECK(max_sweeps >= 1, "max_sweeps must be >= 1, got ", max_sweeps);
  const at::cuda::CUDAGuard guard(R.device());
  const int64_t b = R.size(0), k = R.size(1);
  auto At = R.mT().contiguous();  // column-major R
  auto Vt = at::empty_like(R);
  auto S = at::empty({b, k}, R.options());
  if (b == 0) return {At, S, Vt};
  auto stream = at::cuda::getCurrentCUDAStream();
  jacobi_kernel<<<b, 256, 0, stream>>>(At.data_ptr<double>(), Vt.data_ptr<double>(), S.data_ptr<double>(), (int)k,
                                       (int)max_sweeps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {At.mT().contiguous(), S, Vt.mT().contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(sorsa_kernels, CUDA, m) {
  m.impl("philox_normal_", &philox_normal_cuda);
  m.impl("cholesky_upper_", &cholesky_upper_cuda);
  m.impl("jacobi_svd", &jacobi_svd_cuda);
}
