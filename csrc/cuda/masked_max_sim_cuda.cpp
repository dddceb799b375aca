// Torch-facing glue for csrc/cuda/masked_max_sim.cu (compiled with the host compiler). The schemas and the
// autograd "not implemented" registration live in csrc/cpu/masked_max_sim.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "checks.h"

extern "C" cudaError_t clipcid_max_sim_cuda(const void* a, const void* y, int64_t m_rows, int64_t n, int64_t D,
                                            int is_bf16, int masked, float* inv_a, float* inv_y, float* out_m,
                                            int64_t* out_idx, cudaStream_t stream);

namespace {

at::Tensor prep(const at::Tensor& x, const char* name) {
  CLIPCID_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  CLIPCID_CHECK(x.dim() == 2, name, " must have 2 dims, got ", x.dim());
  if (x.scalar_type() == at::kBFloat16) return x.contiguous();
  return x.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& a, const at::Tensor& y, bool masked) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t n = y.size(0);
  auto out_m = at::empty({n}, y.options().dtype(at::kFloat));
  auto out_idx = at::empty({n}, y.options().dtype(at::kLong));
  auto inv_a = at::empty({a.size(0)}, y.options().dtype(at::kFloat));
  auto inv_y = at::empty({masked ? 0 : n}, y.options().dtype(at::kFloat));
  auto err = clipcid_max_sim_cuda(a.data_ptr(), y.data_ptr(), a.size(0), n, y.size(1),
                                  y.scalar_type() == at::kBFloat16 ? 1 : 0, masked ? 1 : 0, inv_a.data_ptr<float>(),
                                  inv_y.data_ptr<float>(), out_m.data_ptr<float>(), out_idx.data_ptr<int64_t>(),
                                  c10::cuda::getCurrentCUDAStream().stream());
  CLIPCID_CHECK(err == cudaSuccess, "max_sim CUDA launch failed: ", cudaGetErrorString(err));
  return {out_m, out_idx};
}

std::tuple<at::Tensor, at::Tensor> masked_max_sim_fwd_cuda(const at::Tensor& x, int64_t tile) {
  (void)tile;  // the CUDA kernel has fixed 64 × 64 tiles
  auto xc = prep(x, "x");
  return run(xc, xc, true);
}

std::tuple<at::Tensor, at::Tensor> nearest_centroid_fwd_cuda(const at::Tensor& x, const at::Tensor& centroids,
                                                             int64_t tile) {
  (void)tile;
  auto xc = prep(x, "x");
  auto cc = prep(centroids, "centroids").to(xc.scalar_type());
  CLIPCID_CHECK(cc.size(1) == xc.size(1), "centroids must have D = ", xc.size(1), " columns, got ", cc.size(1));
  CLIPCID_CHECK(cc.size(0) > 0, "centroids must have at least one row");
  return run(cc, xc, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(clipcid_fast_C, CUDA, m) {
  m.impl("masked_max_sim_fwd", &masked_max_sim_fwd_cuda);
  m.impl("nearest_centroid_fwd", &nearest_centroid_fwd_cuda);
}
