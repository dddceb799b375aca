// MLCD: the negatives' log-sum-exp of the multi-label cluster loss over N class centres, never storing B x N.
//
// Forward (reference.mlcd_shard_stats, the `neg_lse` half): x [B, D], w [N, D] (fp32 or bf16 storage, both
// L2-normalised here), labels [B, K] int64 in [-1, N) (each row's positive centres on this shard, -1 = padding).
//   neg_lse_i = log sum_{j not in P_i} exp(s cos theta_ij)      (-inf when every centre is a positive)
// The positive half (K logits per row) is O(B K D) and stays in PyTorch (ops/mlcd.py).
// Backward, given g_i = d loss / d neg_lse_i:
//   dcos_ij = s g_i P_ij,  P_ij = exp(s cos_ij - neg_lse_i)  for j not in P_i,  0 at the positives,
// then through the normalisations: d a = (d a_hat - a_hat <d a_hat, a_hat>) / ||a||. fp32 throughout.
//
// Loop order: class tiles outer (split between threads), row chunks inner. Every thread normalises its W tile
// once into an fp32 buffer, so bf16 centres are read in their dtype and no N x D fp32 copy exists; the forward
// keeps an online (max, sum) per row and thread and merges them at the end; the backward finishes each W tile's
// gradient before moving on (written once in W's dtype) and keeps a private fp32 B x D accumulator for dX (summed
// over threads at the end). FLOPs: 2 B N D forward, 6 B N D backward (it recomputes the logits). Extra memory:
// per thread T x D + R x T floats (+ B x D in the backward), plus B x D for the normalised x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "tiles.h"

namespace {

constexpr int64_t kTile = 512;  // classes per tile: the tile (T x D fp32) stays in L2 at D <= 512
constexpr int64_t kRows = 128;  // rows per chunk: the R x T logits block is 256 KB

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels) {
  CHECK_CPU(x);
  CHECK_CPU(w);
  CHECK_CPU(labels);
  CHECK_DIM(x, 2);
  CHECK_DIM(w, 2);
  CHECK_DIM(labels, 2);
  CHECK_CONTIGUOUS(x);
  CHECK_CONTIGUOUS(w);
  CHECK_CONTIGUOUS(labels);
  CHECK_FLOAT_OR_BF16(x);
  CHECK_FLOAT_OR_BF16(w);
  CHECK_DTYPE(labels, at::kLong);
  CHECK_SAME_ROWS(x, labels);
  CLIPCID_CHECK(x.size(1) == w.size(1), "x and w must have the same feature size: ", x.size(1), " vs ", w.size(1));
  const int64_t N = w.size(0);
  const int64_t* lp = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    CLIPCID_CHECK(lp[i] >= -1 && lp[i] < N, "labels[", i / labels.size(1), ", ", i % labels.size(1), "] = ", lp[i],
                  " is outside [-1, ", N, ")");
}

// fp32 copy of the rows, normalised, and the inverse norms.
std::pair<at::Tensor, at::Tensor> normalised(const at::Tensor& a) {
  at::Tensor af = a.to(at::kFloat);
  at::Tensor inv = at::linalg_vector_norm(af, 2, {1}, false).reciprocal();
  return {af.mul(inv.unsqueeze(1)), inv};
}

// One row of a logits block: z_j = s L_j in place, the positives (global labels in [c0, c0 + n)) -> -inf.
// Returns whether a logit is NaN (a NaN input must give a NaN lse, and fast_exp8 would drop it).
bool scale_and_mask(float* z, int64_t n, float s, const int64_t* lab, int64_t K, int64_t c0) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    z[j] *= s;
    nan = nan || z[j] != z[j];
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t y = lab[k] - c0;
    if (lab[k] >= 0 && y >= 0 && y < n) z[y] = -INFINITY;
  }
  return nan;
}

clipcid::OnlineLSE row_lse(const float* z, int64_t n) {
  float tmax = -INFINITY;
  for (int64_t j = 0; j < n; ++j) tmax = std::max(tmax, z[j]);
  if (tmax == -INFINITY) return clipcid::lse_empty();
  float sum = 0.0f;
  int64_t j = 0;
#ifdef CLIPCID_HAVE_EXP8
  {
    const __m256 vm = _mm256_set1_ps(tmax);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) acc = _mm256_add_ps(acc, clipcid::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(z + j), vm)));
    sum = clipcid::hsum8(acc);
  }
#endif
  for (; j < n; ++j) sum += clipcid::fast_expf(z[j] - tmax);
  return clipcid::OnlineLSE{tmax, sum};
}

// z_j -> a exp(z_j - l) in place (masked -inf logits give exactly 0).
void row_dcos(float* z, int64_t n, float a, float l) {
  if (a == 0.0f || l == -INFINITY) {
    std::fill(z, z + n, 0.0f);
    return;
  }
  int64_t j = 0;
#ifdef CLIPCID_HAVE_EXP8
  const __m256 va = _mm256_set1_ps(a), vl = _mm256_set1_ps(l);
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(z + j, _mm256_mul_ps(va, clipcid::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(z + j), vl))));
#endif
  for (; j < n; ++j) z[j] = a * clipcid::fast_expf(z[j] - l);
}

// (d a_hat - a_hat <d a_hat, a_hat>) * inv, in dtype.
at::Tensor through_norm(const at::Tensor& g_hat, const at::Tensor& a_hat, const at::Tensor& inv, at::ScalarType dt) {
  at::Tensor dot = (g_hat * a_hat).sum(1, true);
  return ((g_hat - a_hat * dot) * inv.unsqueeze(1)).to(dt);
}

at::Tensor mlcd_neg_lse_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, double scale) {
  check_inputs(x, w, labels);
  const int64_t B = x.size(0), N = w.size(0), K = labels.size(1);
  const float s = static_cast<float>(scale);
  auto [xh, ix] = normalised(x);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int nthreads = at::get_num_threads();
  std::vector<clipcid::OnlineLSE> state(static_cast<size_t>(nthreads) * B, clipcid::lse_empty());
  std::vector<char> nan(static_cast<size_t>(nthreads) * B, 0);
  const int64_t ntiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    clipcid::OnlineLSE* st = state.data() + static_cast<size_t>(tid) * B;
    char* bad = nan.data() + static_cast<size_t>(tid) * B;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kTile, n = std::min(kTile, N - c0);
      at::Tensor wh = normalised(w.narrow(0, c0, n)).first;
      for (int64_t r0 = 0; r0 < B; r0 += kRows) {
        const int64_t R = std::min(kRows, B - r0);
        at::Tensor z = at::mm(xh.narrow(0, r0, R), wh.t()).contiguous();
        float* zp = z.data_ptr<float>();
        for (int64_t r = 0; r < R; ++r) {
          float* row = zp + r * n;
          if (scale_and_mask(row, n, s, lab + (r0 + r) * K, K, c0)) bad[r0 + r] = 1;
          st[r0 + r] = clipcid::lse_merge(st[r0 + r], row_lse(row, n));
        }
      }
    }
  });
  at::Tensor lse = at::empty({B}, x.options().dtype(at::kFloat));
  float* out = lse.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    clipcid::OnlineLSE acc = clipcid::lse_empty();
    bool is_nan = false;
    for (int th = 0; th < nthreads; ++th) {
      acc = clipcid::lse_merge(acc, state[static_cast<size_t>(th) * B + i]);
      is_nan = is_nan || nan[static_cast<size_t>(th) * B + i];
    }
    out[i] = is_nan ? NAN : clipcid::lse_value(acc);
  }
  return lse;
}

std::tuple<at::Tensor, at::Tensor> mlcd_neg_lse_bwd(const at::Tensor& grad_lse, const at::Tensor& x,
                                                     const at::Tensor& w, const at::Tensor& labels,
                                                     const at::Tensor& lse, double scale, bool need_x, bool need_w) {
  check_inputs(x, w, labels);
  CHECK_CONTIGUOUS(grad_lse);
  CHECK_CONTIGUOUS(lse);
  CHECK_DTYPE(grad_lse, at::kFloat);
  CHECK_DTYPE(lse, at::kFloat);
  CHECK_SAME_ROWS(x, grad_lse);
  CHECK_SAME_ROWS(x, lse);
  const int64_t B = x.size(0), N = w.size(0), D = x.size(1), K = labels.size(1);
  const float s = static_cast<float>(scale);
  auto [xh, ix] = normalised(x);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* g = grad_lse.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  at::Tensor gw = need_w ? at::empty_like(w) : w.new_empty({0});
  const int nthreads = at::get_num_threads();
  // one fp32 dX_hat accumulator per thread (the threads split the classes, so every one touches every row)
  at::Tensor dxh = at::zeros({need_x ? nthreads : 0, B, D}, x.options().dtype(at::kFloat));
  const int64_t ntiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kTile, n = std::min(kTile, N - c0);
      auto [wh, iw] = normalised(w.narrow(0, c0, n));
      at::Tensor gwh = need_w ? at::zeros({n, D}, wh.options()) : at::Tensor();
      for (int64_t r0 = 0; r0 < B; r0 += kRows) {
        const int64_t R = std::min(kRows, B - r0);
        at::Tensor xc = xh.narrow(0, r0, R);
        at::Tensor z = at::mm(xc, wh.t()).contiguous();
        float* zp = z.data_ptr<float>();
        for (int64_t r = 0; r < R; ++r) {
          float* row = zp + r * n;
          scale_and_mask(row, n, s, lab + (r0 + r) * K, K, c0);
          row_dcos(row, n, s * g[r0 + r], l[r0 + r]);
        }
        if (need_x) dxh[tid].narrow(0, r0, R).addmm_(z, wh);
        if (need_w) gwh.addmm_(z.t(), xc);
      }
      if (need_w) gw.narrow(0, c0, n).copy_(through_norm(gwh, wh, iw, w.scalar_type()));
    }
  });
  at::Tensor gx = need_x ? through_norm(dxh.sum(0), xh, ix, x.scalar_type()) : x.new_empty({0});
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, m) {
  m.def("mlcd_neg_lse_fwd(Tensor x, Tensor w, Tensor labels, float scale) -> Tensor");
  m.def(
      "mlcd_neg_lse_bwd(Tensor grad_lse, Tensor x, Tensor w, Tensor labels, Tensor lse, float scale, bool need_x, "
      "bool need_w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clipcid_fast_C, CPU, m) {
  m.impl("mlcd_neg_lse_fwd", &mlcd_neg_lse_fwd);
  m.impl("mlcd_neg_lse_bwd", &mlcd_neg_lse_bwd);
}
