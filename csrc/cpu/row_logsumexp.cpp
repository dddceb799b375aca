// Row-wise log-sum-exp over a [R, C] matrix, streaming the columns in tiles through the shared
// online-LSE state of tiles.h. fp32 or bf16 storage, fp32 accumulation.
#include <ATen/Parallel.h>

#include <vector>

#include "checks.h"
#include "tiles.h"

namespace {

constexpr int64_t kTile = 256;

template <typename T>
void lse_rows(const T* x, float* out, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    float buf[kTile];
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * cols;
      clipcid::OnlineLSE st = clipcid::lse_empty();
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t n = std::min(kTile, cols - c0);
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[c0 + i]);
        st = clipcid::lse_push_tile(st, buf, n);
      }
      out[r] = clipcid::lse_value(st);
    }
  });
}

at::Tensor row_logsumexp_fwd(const at::Tensor& x) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOAT_OR_BF16(x);
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat)
    lse_rows(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1));
  else
    lse_rows(x.data_ptr<at::BFloat16>(), out.data_ptr<float>(), x.size(0), x.size(1));
  return out;
}

// d lse_r / d x_rc = softmax_rc; grad_x = g_r * exp(x_rc - lse_r), in x's dtype.
template <typename T>
void lse_rows_bwd(const T* x, const float* lse, const float* g, T* gx, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float l = lse[r], gr = g[r];
      for (int64_t c = 0; c < cols; ++c)
        gx[r * cols + c] = static_cast<T>(gr * expf(static_cast<float>(x[r * cols + c]) - l));
    }
  });
}

at::Tensor row_logsumexp_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_FLOAT_OR_BF16(x);
  CHECK_DTYPE(lse, at::kFloat);
  auto g = grad.to(at::kFloat).contiguous();
  CHECK_SAME_ROWS(x, g);
  auto gx = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    lse_rows_bwd(x.data_ptr<float>(), lse.data_ptr<float>(), g.data_ptr<float>(), gx.data_ptr<float>(), x.size(0),
                 x.size(1));
  else
    lse_rows_bwd(x.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), g.data_ptr<float>(),
                 gx.data_ptr<at::BFloat16>(), x.size(0), x.size(1));
  return gx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, m) {
  m.def("row_logsumexp_fwd(Tensor x) -> Tensor");
  m.def("row_logsumexp_bwd(Tensor grad, Tensor x, Tensor lse) -> Tensor");
}

TORCH_LIBRARY_IMPL(clipcid_fast_C, CPU, m) {
  m.impl("row_logsumexp_fwd", &row_logsumexp_fwd);
  m.impl("row_logsumexp_bwd", &row_logsumexp_bwd);
}
