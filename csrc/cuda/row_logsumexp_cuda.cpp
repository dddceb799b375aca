// Torch-facing glue for csrc/cuda/row_logsumexp.cu (compiled with the host compiler).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "checks.h"

extern "C" cudaError_t clipcid_row_logsumexp_cuda(const float* x, float* out, int64_t rows, int64_t cols,
                                                  cudaStream_t stream);

namespace {

at::Tensor row_logsumexp_fwd_cuda(const at::Tensor& x) {
  CLIPCID_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  CHECK_DIM(x, 2);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({x.size(0)}, xf.options());
  auto err = clipcid_row_logsumexp_cuda(xf.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                                        c10::cuda::getCurrentCUDAStream().stream());
  CLIPCID_CHECK(err == cudaSuccess, "row_logsumexp CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(clipcid_fast_C, CUDA, m) { m.impl("row_logsumexp_fwd", &row_logsumexp_fwd_cuda); }
