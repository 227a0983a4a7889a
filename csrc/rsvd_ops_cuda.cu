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

// One thread per matrix: the k×k Cholesky is O(k³/3) ≈ 1 Mflop at k = 144.
__global__ void cholesky_kernel(double* G, int* info, int64_t batch, int k) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < batch) info[i] = sorsa_core::cholesky_upper(G + i * k * k, k, k);
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
  cholesky_kernel<<<(b + 63) / 64, 64, 0, stream>>>(G.data_ptr<double>(), info.data_ptr<int>(), b, (int)G.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return info;
}

// One block per matrix, column-major storage (coalesced column reads); for each pair (p, q)
// the block reduces the three Gram entries and applies the rotation (sorsa_core::
// jacobi_rotation / rotate_pair, the CPU build's code) to the rows in parallel.
__global__ void jacobi_kernel(double* A, double* V, double* S, int k, int max_sweeps) {
  const int64_t m = blockIdx.x;
  double* a = A + m * k * k;
  double* v = V + m * k * k;
  __shared__ double red[3][32];
  __shared__ int rotated;
  __shared__ double cs[2];
  for (int i = threadIdx.x; i < k * k; i += blockDim.x) v[i] = (i / k == i % k) ? 1.0 : 0.0;  // symmetric: layout-free
  __syncthreads();
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    if (threadIdx.x == 0) rotated = 0;
    __syncthreads();
    for (int p = 0; p < k - 1; ++p) {
      for (int q = p + 1; q < k; ++q) {
        double sa = 0, sb = 0, sg = 0;
        for (int i = threadIdx.x; i < k; i += blockDim.x) {
          double xp = a[p * k + i], xq = a[q * k + i];
          sa += xp * xp; sb += xq * xq; sg += xp * xq;
        }
        for (int off = 16; off > 0; off >>= 1) {
          sa += __shfl_down_sync(0xffffffff, sa, off);
          sb += __shfl_down_sync(0xffffffff, sb, off);
          sg += __shfl_down_sync(0xffffffff, sg, off);
        }
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) { red[0][warp] = sa; red[1][warp] = sb; red[2][warp] = sg; }
        __syncthreads();
        if (threadIdx.x == 0) {
          double ta = 0, tb = 0, tg = 0;
          for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) { ta += red[0][w]; tb += red[1][w]; tg += red[2][w]; }
          double c = 1.0, s = 0.0;
          if (sorsa_core::jacobi_rotation(ta, tb, tg, 1e-15, &c, &s)) rotated = 1;
          cs[0] = c; cs[1] = s;
        }
        __syncthreads();
        const double c = cs[0], s = cs[1];
        if (s != 0.0) {
          for (int i = threadIdx.x; i < k; i += blockDim.x) {
            sorsa_core::rotate_pair(&a[p * k + i], &a[q * k + i], c, s);
            sorsa_core::rotate_pair(&v[p * k + i], &v[q * k + i], c, s);
          }
        }
        __syncthreads();
      }
    }
    if (!rotated) break;
    __syncthreads();
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    double n = 0;
    for (int i = 0; i < k; ++i) n += a[j * k + i] * a[j * k + i];
    S[m * k + j] = sqrt(n);
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
  jacobi_kernel<<<b, 128, 0, stream>>>(At.data_ptr<double>(), Vt.data_ptr<double>(), S.data_ptr<double>(), (int)k,
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
