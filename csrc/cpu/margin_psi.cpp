// Elementwise combined margin psi(c) and d psi/dc from tiles.h, exposed so the one definition the
// kernels use is tested against the reference's combined_margin.
#include <ATen/Parallel.h>

#include "checks.h"
#include "tiles.h"

namespace {

std::tuple<at::Tensor, at::Tensor> margin_psi(const at::Tensor& cos, double m1, double m2, double m3) {
  CHECK_CPU(cos);
  CHECK_DTYPE(cos, at::kFloat);
  auto c = cos.contiguous();
  auto psi = at::empty_like(c), dpsi = at::empty_like(c);
  const clipcid::Margin p = clipcid::make_margin(m1, m2, m3);
  const float* cp = c.data_ptr<float>();
  float* pp = psi.data_ptr<float>();
  float* dp = dpsi.data_ptr<float>();
  at::parallel_for(0, c.numel(), 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) pp[i] = clipcid::margin_psi(cp[i], p, &dp[i]);
  });
  return {psi, dpsi};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, m) {
  m.def("margin_psi(Tensor cos, float m1, float m2, float m3) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clipcid_fast_C, CPU, m) { m.impl("margin_psi", &margin_psi); }
