// Batched randomized-SVD building blocks as torch ops (CPU implementations + schemas).
// The CUDA implementations (rsvd_ops_cuda.cu, built where nvcc is present) register under
// the same names, and both call the per-matrix math in rsvd_core.h.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "rsvd_core.h"

namespace {

void check_batched_square(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(1) == t.size(2), name, " must have shape (batch, k, k), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kDouble, name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// out (any shape, float32/float64, contiguous): element i = sorsa_core::normal(seed, i).
void philox_normal_cpu(at::Tensor out, int64_t seed) {
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "out must be float32 or float64, got ", out.scalar_type());
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_cpu", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) p[i] = static_cast<scalar_t>(sorsa_core::normal(static_cast<uint64_t>(seed), i));
    });
  });
}

// G (batch, k, k) float64: in place Gᵢ = Rᵢᵀ·Rᵢ, upper R. Returns int32 info per matrix (0 = ok).
at::Tensor cholesky_upper_cpu(at::Tensor G) {
  check_batched_square(G, "G");
  const int64_t b = G.size(0), k = G.size(1);
  auto info = at::zeros({b}, G.options().dtype(at::kInt));
  double* g = G.data_ptr<double>();
  int* inf = info.data_ptr<int>();
  at::parallel_for(0, b, 1, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) inf[i] = sorsa_core::cholesky_upper(g + i * k * k, static_cast<int>(k), static_cast<int>(k));
  });
  return info;
}

// R (batch, k, k) float64 -> (A = R·V with orthogonal columns, S = column norms, V orthonormal).
// The core works column-major: Rᵀ, contiguous, is R in column-major order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& R, int64_t max_sweeps) {
  check_batched_square(R, "R");
  TORCH_CHECK(max_sweeps >= 1, "max_sweeps must be >= 1, got ", max_sweeps);
  const int64_t b = R.size(0), k = R.size(1);
  auto At = R.mT().contiguous();
  auto Vt = at::empty_like(R);
  auto S = at::empty({b, k}, R.options());
  double *a = At.data_ptr<double>(), *v = Vt.data_ptr<double>(), *s = S.data_ptr<double>();
  at::parallel_for(0, b, 1, [&](int64_t st, int64_t e) {
    for (int64_t i = st; i < e; ++i)
      sorsa_core::jacobi_svd_colmajor(a + i * k * k, v + i * k * k, s + i * k, static_cast<int>(k),
                                      static_cast<int>(max_sweeps), 1e-15);
  });
  return {At.mT().contiguous(), S, Vt.mT().contiguous()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sorsa_kernels, m) {
  m.def("philox_normal_(Tensor(a!) out, int seed) -> ()");
  m.def("cholesky_upper_(Tensor(a!) G) -> Tensor");
  m.def("jacobi_svd(Tensor R, int max_sweeps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sorsa_kernels, CPU, m) {
  m.impl("philox_normal_", &philox_normal_cpu);
  m.impl("cholesky_upper_", &cholesky_upper_cpu);
  m.impl("jacobi_svd", &jacobi_svd_cpu);
}

extern "C" {
// A Python module with no functions: importing it runs the registrations above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
}

#ifdef SORSA_WITH_CUDA
extern "C" int sorsa_cuda_built() { return 1; }
#endif
