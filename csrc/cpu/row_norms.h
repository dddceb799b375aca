// Inverse L2 norms of the rows of a [rows, D] matrix (fp32 or bf16 storage), shared by the CPU kernels.
// Acc is the accumulator type: float in K1 (fp32 throughout), double in K3's masked max similarity (as that
// kernel has always accumulated); each kernel keeps its numerics bit for bit.
#pragma once
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace clipcid {

template <typename Acc, typename T>
void row_inv_norms(const T* x, int64_t rows, int64_t D, float* inv) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * D;
      Acc ss = 0;
      for (int64_t k = 0; k < D; ++k) {
        const Acc v = static_cast<Acc>(static_cast<float>(row[k]));
        ss += v * v;
      }
      inv[r] = static_cast<float>(Acc(1) / std::sqrt(ss));
    }
  });
}

}  // namespace clipcid
