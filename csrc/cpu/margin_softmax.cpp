// K1: cluster-discrimination margin softmax over N class centres, exact, never storing B x N.
//
// Forward (reference.margin_softmax_shard_stats): x [B, D], w [N, D] (fp32 or bf16 storage, both
// L2-normalised here), labels [B] int64 in [-1, N). Logits z_ij = s cos(theta_ij), the target column
// replaced by s psi(cos theta_iy) (tiles.h margin_psi). Returns lse [B] (log-sum-exp over this shard)
// and target [B] (s psi, 0 where labels == -1).
//
// One engine, margin_softmax_fused_grad (below): row chunks of R rows x all N logits, threads owning
// blocks of class tiles. Given per-row weights (g_lse, g_tgt) of d loss / d (lse, target) it returns
// lse, target and the exact gradients in one pass (6 B N D FLOPs):
//   dcos_ij = s g_lse_i P_ij                          (j != y_i)
//   dcos_iy = s psi'(c_iy) (g_lse_i P_iy + g_tgt_i)     (the target column, labels >= 0)
// then through the normalisations: d a = (d a_hat - a_hat <d a_hat, a_hat>) / ||a||. fp32 throughout.
// grad_w accumulates over the row chunks: in the returned grad_w for fp32 W, in an fp32 [N, D] buffer for bf16
// W; where that buffer would pass 256 MB the op takes two passes instead (class tiles outer, every tile's
// gradient complete in an fp32 tile buffer and written once in bf16: 8 B N D FLOPs, O(B D + N) extra memory).
// The two-pass ops autograd needs when the weights are only known after the forward
// (reduction="none", the class-sharded loss) are thin calls of it: margin_softmax_fwd = the pass
// without gradients (2 B N D), margin_softmax_bwd = the full pass with the incoming weights (it
// recomputes lse with the same code, so the saved lse is only checked for its shape; the two-pass engine, below,
// uses it and skips its lse pass).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "row_norms.h"
#include "tiles.h"

namespace {

// Rows [r0, r0 + n) of a [R, D] matrix, normalised into out [n, D] fp32; inverse norms into inv [n].
template <typename T>
void normalise_rows(const T* src, int64_t r0, int64_t n, int64_t D, float* out, float* inv) {
  at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const T* row = src + (r0 + r) * D;
      float* o = out + r * D;
      float ss = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(row[d]);
        o[d] = v;
        ss += v * v;
      }
      const float iv = 1.0f / std::sqrt(ss);
      for (int64_t d = 0; d < D; ++d) o[d] *= iv;
      inv[r] = iv;
    }
  });
}

void normalise_rows_any(const at::Tensor& a, int64_t r0, int64_t n, float* out, float* inv) {
  const int64_t D = a.size(1);
  if (a.scalar_type() == at::kFloat)
    normalise_rows(a.data_ptr<float>(), r0, n, D, out, inv);
  else
    normalise_rows(a.data_ptr<at::BFloat16>(), r0, n, D, out, inv);
}

// grad_a[r] = (g_hat[r] - a_hat[r] <g_hat[r], a_hat[r]>) * inv[r], written in T.
template <typename T>
void unnormalise_grad(const float* g_hat, const float* a_hat, const float* inv, int64_t n, int64_t D, T* out) {
  at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const float* g = g_hat + r * D;
      const float* h = a_hat + r * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += g[d] * h[d];
      T* o = out + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>((g[d] - h[d] * dot) * inv[r]);
    }
  });
}

void unnormalise_grad_any(const float* g_hat, const float* a_hat, const float* inv, int64_t n, int64_t D,
                          at::Tensor& out, int64_t r0) {
  if (out.scalar_type() == at::kFloat)
    unnormalise_grad(g_hat, a_hat, inv, n, D, out.data_ptr<float>() + r0 * D);
  else
    unnormalise_grad(g_hat, a_hat, inv, n, D, out.data_ptr<at::BFloat16>() + r0 * D);
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels) {
  CHECK_CPU(x);
  CHECK_CPU(w);
  CHECK_CPU(labels);
  CHECK_DIM(x, 2);
  CHECK_DIM(w, 2);
  CHECK_DIM(labels, 1);
  CHECK_CONTIGUOUS(x);
  CHECK_CONTIGUOUS(w);
  CHECK_FLOAT_OR_BF16(x);
  CHECK_FLOAT_OR_BF16(w);
  CHECK_DTYPE(labels, at::kLong);
  CHECK_SAME_ROWS(x, labels);
  CLIPCID_CHECK(x.size(1) == w.size(1), "x and w must have the same feature size: ", x.size(1), " vs ", w.size(1));
  const int64_t N = w.size(0);
  auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i)
    CLIPCID_CHECK(lp[i] >= -1 && lp[i] < N, "labels[", i, "] = ", lp[i], " is outside [-1, ", N, ")");
}

// ---------------------------------------------------------------------------------------------
// Single pass: margin_softmax_fused_grad. When the per-row gradient weights (g_lse, g_tgt) are known
// at forward time (a loss reduced with "mean" / "sum": g_lse = c_i, g_tgt = -c_i, c_i = 1 / B_valid or
// 1 on rows with a target), the gradients are computed in the forward itself and autograd only scales
// them by the scalar grad_output. Row-chunk outer loop: for R rows all N logits are kept (an R x N fp32
// buffer, tile-major [N / T][R][T]); pass A (one GEMM per tile of T classes, then the per-row online LSE
// while the tile is in cache) finishes each row's lse; pass B turns each tile in place into
// e_ij = dcos_ij / ||w_j|| and feeds it to two GEMMs: dX_hat_chunk += E_tile W_tile and
// G_tile += E_tile^T X_hat_chunk. W is never normalised into a copy: cos = (x_hat . w_j) / ||w_j||, and
// with E = dcos / ||w|| the norms cancel: grad_w_j = G_j - w_hat_j <G_j, w_hat_j>. For fp32 W the fp32
// accumulator G is the returned grad_w itself (finished in place). FLOPs: 2 B N D (logits) +
// 2 B N D (dX) + 2 B N D (dW) = 6 B N D. Extra memory: R N (<= 384 MB up to N = 3M) + B D + N floats
// (+ an fp32 [N, D] accumulator and one fp32 W tile per thread when W is bf16).

// z_j = s L_j iw_j in place on one row of a tile; the target column (local index y, or -1) becomes tgt.
// Returns the row's (max, sum exp) over the tile; (NaN, NaN) when a logit is NaN (a NaN centre or embedding), so
// that the row's lse, and the loss, are NaN: max_ps and fast_exp would otherwise drop it, and a NaN input would
// give a finite loss (with NaN gradients) that a training loop watching its loss value could not see.
clipcid::OnlineLSE fused_scale_row(float* row, const float* iw, int64_t n, float s, int64_t y, float tgt) {
  float tmax = -INFINITY;
  bool nan = tgt != tgt;
  int64_t j = 0;
#ifdef CLIPCID_HAVE_EXP8
  {
    const __m256 vs = _mm256_set1_ps(s);
    __m256 vm = _mm256_set1_ps(-INFINITY);
    __m256 vnan = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(iw + j)), vs);
      _mm256_storeu_ps(row + j, v);
      vm = _mm256_max_ps(vm, v);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    for (float v : lanes) tmax = std::max(tmax, v);
    nan = nan || _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; j < n; ++j) {
    row[j] = row[j] * iw[j] * s;
    tmax = std::max(tmax, row[j]);
    nan = nan || row[j] != row[j];
  }
  if (nan) return clipcid::OnlineLSE{NAN, NAN};
  if (y >= 0) {
    const float old = row[y];
    row[y] = tgt;
    if (old == tmax) {  // the margin may lower the row max: recompute it
      tmax = -INFINITY;
      for (int64_t k = 0; k < n; ++k) tmax = std::max(tmax, row[k]);
    } else {
      tmax = std::max(tmax, tgt);
    }
  }
  float sum = 0.0f;
  j = 0;
#ifdef CLIPCID_HAVE_EXP8
  {
    const __m256 vm = _mm256_set1_ps(tmax);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8)
      acc = _mm256_add_ps(acc, clipcid::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm)));
    sum = clipcid::hsum8(acc);
  }
#endif
  for (; j < n; ++j) sum += clipcid::fast_expf(row[j] - tmax);
  return clipcid::OnlineLSE{tmax, sum};
}

// e_j = a exp(z_j - l) iw_j in place (a = s g_lse); the target column (local y, or -1) becomes ey.
void fused_dcos_row(float* row, const float* iw, int64_t n, float a, float l, int64_t y, float ey) {
  if (a == 0.0f) {
    std::fill(row, row + n, 0.0f);
  } else {
    int64_t j = 0;
#ifdef CLIPCID_HAVE_EXP8
    const __m256 va = _mm256_set1_ps(a), vl = _mm256_set1_ps(l);
    for (; j + 8 <= n; j += 8) {
      const __m256 p = clipcid::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vl));
      _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_mul_ps(p, va), _mm256_loadu_ps(iw + j)));
    }
#endif
    for (; j < n; ++j) row[j] = a * clipcid::fast_expf(row[j] - l) * iw[j];
  }
  if (y >= 0) row[y] = ey;
}

// The raw dot products L_j of one row of a tile -> z_j = s L_j iw_j -> e_j = a exp(z_j - l) iw_j, in place (pass 2
// of the two-pass engine, the row's lse l already known; z as fused_scale_row makes it); the target column
// (local y, or -1) becomes ey.
void fused_scaled_dcos_row(float* row, const float* iw, int64_t n, float s, float a, float l, int64_t y, float ey) {
  if (a == 0.0f) {
    std::fill(row, row + n, 0.0f);
  } else {
    int64_t j = 0;
#ifdef CLIPCID_HAVE_EXP8
    const __m256 vs = _mm256_set1_ps(s), va = _mm256_set1_ps(a), vl = _mm256_set1_ps(l);
    for (; j + 8 <= n; j += 8) {
      const __m256 vw = _mm256_loadu_ps(iw + j);
      const __m256 z = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), vw), vs);
      const __m256 p = clipcid::fast_exp8(_mm256_sub_ps(z, vl));
      _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_mul_ps(p, va), vw));
    }
#endif
    for (; j < n; ++j) {
      const float z = row[j] * iw[j] * s;
      row[j] = a * clipcid::fast_expf(z - l) * iw[j];
    }
  }
  if (y >= 0) row[y] = ey;
}

// grad_w_j = G_j - w_hat_j <G_j, w_hat_j> for n rows (G fp32 [n, D], w the raw rows, iw their inverse norms),
// written in Out; one rounding to Out at the end.
template <typename W, typename Out>
void finish_w_rows(const float* gp, const W* wp, const float* iw, int64_t n, int64_t D, Out* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float* g = gp + j * D;
    const W* h = wp + j * D;
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += g[d] * static_cast<float>(h[d]);
    dot *= iw[j] * iw[j];
    Out* o = out + j * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Out>(g[d] - static_cast<float>(h[d]) * dot);
  }
}

void finish_w_rows_any(const float* gp, const at::Tensor& w, const float* iw, int64_t j0, int64_t n, at::Tensor& gw) {
  const int64_t D = w.size(1);
  if (w.scalar_type() == at::kFloat)
    finish_w_rows(gp, w.data_ptr<float>() + j0 * D, iw + j0, n, D, gw.data_ptr<float>() + j0 * D);
  else
    finish_w_rows(gp, w.data_ptr<at::BFloat16>() + j0 * D, iw + j0, n, D, gw.data_ptr<at::BFloat16>() + j0 * D);
}

// The single pass keeps an fp32 [N, D] accumulator for bf16 W (for fp32 W it is the returned grad_w itself);
// above this many elements (256 MB) bf16 W takes the two-pass engine instead, whose extra memory is O(B D + N).
constexpr int64_t kMaxBf16AccumElems = int64_t{64} << 20;

// lse_known (may be undefined): the lse of these inputs, from the forward (margin_softmax_bwd). The two-pass
// engine then skips its first pass (the returned target is then 0); the single pass recomputes lse anyway.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_grad_impl(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& grad_lse,
    const at::Tensor& grad_target, double scale, double m1, double m2, double m3, bool need_x, bool need_w,
    int64_t rows, int64_t tile, int64_t passes, const at::Tensor& lse_known) {
  check_inputs(x, w, labels);
  CLIPCID_CHECK(passes >= 0 && passes <= 2, "passes must be 0 (auto), 1 or 2, got ", passes);
  const int64_t B = x.size(0), D = x.size(1), N = w.size(0);
  CLIPCID_CHECK(grad_lse.numel() == B && grad_target.numel() == B, "grad_lse and grad_target must have B = ", B,
                " elements");
  const auto f32 = x.options().dtype(at::kFloat);
  const bool w32 = w.scalar_type() == at::kFloat;
  auto lse = at::empty({B}, f32);
  auto tgt = at::zeros({B}, f32);
  auto gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  auto gw = need_w ? (w32 ? at::zeros_like(w) : at::empty_like(w)) : at::empty({0}, w.options());
  if (B == 0) {
    if (need_w) gw.zero_();
    return {lse, tgt, gx, gw};
  }
  if (N == 0) {
    lse.fill_(-INFINITY);
    if (need_x) gx.zero_();
    return {lse, tgt, gx, gw};
  }
  auto gl = grad_lse.to(at::kFloat).contiguous();
  auto gt = grad_target.to(at::kFloat).contiguous();
  auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  const float* glp = gl.data_ptr<float>();
  const float* gtp = gt.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const clipcid::Margin mg = clipcid::make_margin(m1, m2, m3);

  auto xh = at::empty({B, D}, f32);
  auto ix = at::empty({B}, f32);
  normalise_rows_any(x, 0, B, xh.data_ptr<float>(), ix.data_ptr<float>());
  // W as the GEMM operand, unnormalised (fp32 W: no copy), and its inverse row norms.
  // Detached: the GEMMs run in worker threads, which do not inherit the caller's below-autograd state.
  // fp32 W is the GEMM operand as it is; bf16 W is widened one tile at a time into a per-thread buffer
  // (never a full fp32 copy: W is read in bf16, half the traffic).
  const at::Tensor wd = w.detach();
  auto iwt = at::empty({N}, f32);
  float* iw = iwt.data_ptr<float>();
  if (w32)
    clipcid::row_inv_norms<float>(wd.data_ptr<float>(), N, D, iw);
  else
    clipcid::row_inv_norms<float>(wd.data_ptr<at::BFloat16>(), N, D, iw);
  at::Tensor dxh = need_x ? at::empty({B, D}, f32) : at::Tensor();
  const int64_t T = std::min(tile > 0 ? tile : std::clamp<int64_t>((int64_t{1} << 17) / D, 64, 2048), N);
  const int64_t nt = (N + T - 1) / T;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nt));
  auto wtb = w32 ? at::Tensor() : at::empty({P, T, D}, f32);
  auto w_tile = [&](int64_t p, int64_t t0, int64_t n) -> at::Tensor {
    if (w32) return wd.narrow(0, t0, n);
    auto o = wtb[p].narrow(0, 0, n);
    o.copy_(wd.narrow(0, t0, n));
    return o;
  };
  auto tiles_of = [&](int64_t p) { return std::make_pair(p * nt / P, (p + 1) * nt / P); };
  float* lo = lse.data_ptr<float>();
  float* to = tgt.data_ptr<float>();

  if (need_w && (passes == 2 || (passes == 0 && !w32 && N * D > kMaxBf16AccumElems))) {
    // Two passes, class tiles outer: no [N, D] accumulator. Each thread owns a block of class tiles and goes
    // over all B rows per tile, in row blocks of RB rows ([RB, T] logits, 1 MB at T = 256). Pass 1: logits,
    // target psi and a per-thread online LSE per row (as pass A below); skipped when the lse is known (the
    // backward of the two-op form). Pass 2, with every row's lse known: the same GEMMs again (so bitwise the
    // same logits, and the same target psi), E = dcos / ||w|| in place, the thread's dX_hat partial
    // += E W_tile and the tile's G (+)= E^T X_hat_block over the row blocks. A tile's G is then complete, in
    // an fp32 [T, D] tile buffer (exact fp32 accumulation over every row), and is finished through the
    // normalisation and written once in W's dtype. 8 B N D FLOPs (the logits twice; 6 with the lse known)
    // against the single pass's 6, for O(B D + N) extra memory instead of 4 N D bytes for bf16 W (2 GB at
    // N = 1M, D = 512); W is widened once per pass (the single pass widens it twice per row chunk) and no
    // [N, D] accumulator is re-read and re-written per row chunk.
    const int64_t RB = std::min<int64_t>(B, std::max<int64_t>((int64_t{1} << 18) / T, 1));
    auto slots = at::empty({P, RB * T}, f32);
    auto gtb = at::empty({P, T, D}, f32);
    auto dxp = need_x ? at::zeros({P, B, D}, f32) : at::Tensor();
    std::vector<clipcid::OnlineLSE> st(lse_known.defined() ? 0 : P * B, clipcid::lse_empty());
    auto logits = [&](int64_t p, const at::Tensor& wt, int64_t b0, int64_t rb, int64_t n) {
      auto lt = slots[p].narrow(0, 0, rb * n).view({rb, n});
      at::mm_out(lt, xh.narrow(0, b0, rb), wt.t());
      return lt;
    };
    if (lse_known.defined()) {
      lse.copy_(lse_known);
    } else {
      at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // see pass A below
        for (int64_t p = p0; p < p1; ++p) {
          clipcid::OnlineLSE* sp = st.data() + p * B;
          const auto [k0, k1] = tiles_of(p);
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t t0 = k * T, n = std::min(T, N - t0);
            const at::Tensor wt = w_tile(p, t0, n);
            for (int64_t b0 = 0; b0 < B; b0 += RB) {
              const int64_t rb = std::min(RB, B - b0);
              float* L = logits(p, wt, b0, rb, n).data_ptr<float>();
              for (int64_t i = 0; i < rb; ++i) {
                const int64_t gi = b0 + i;
                float* row = L + i * n;
                const int64_t y = lp[gi] - t0;
                const bool has = (y >= 0 && y < n);
                float t = 0.0f;
                if (has) {  // a row's target lives in exactly one tile: one thread writes it
                  float d;
                  t = s * clipcid::margin_psi(row[y] * iw[t0 + y], mg, &d);
                  to[gi] = t;
                }
                sp[gi] = clipcid::lse_merge(sp[gi], fused_scale_row(row, iw + t0, n, s, has ? y : -1, t));
              }
            }
          }
        }
      });
      for (int64_t i = 0; i < B; ++i) {
        clipcid::OnlineLSE a = st[i];
        for (int64_t p = 1; p < P; ++p) a = clipcid::lse_merge(a, st[p * B + i]);
        lo[i] = clipcid::lse_value(a);
      }
    }
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t p = p0; p < p1; ++p) {
        const auto [k0, k1] = tiles_of(p);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t t0 = k * T, n = std::min(T, N - t0);
          const at::Tensor wt = w_tile(p, t0, n);
          auto Gt = gtb[p].narrow(0, 0, n);
          for (int64_t b0 = 0; b0 < B; b0 += RB) {
            const int64_t rb = std::min(RB, B - b0);
            auto lt = logits(p, wt, b0, rb, n);
            float* L = lt.data_ptr<float>();
            for (int64_t i = 0; i < rb; ++i) {
              const int64_t gi = b0 + i;
              const int64_t y = lp[gi] - t0;
              const bool has = (y >= 0 && y < n);
              const float l = lo[gi], g = glp[gi];
              float ey = 0.0f;
              if (has) {  // the target psi from the raw dot product, as pass 1 made it
                float d;
                const float t = s * clipcid::margin_psi(L[i * n + y] * iw[t0 + y], mg, &d);
                ey = s * d * (g * clipcid::fast_expf(t - l) + gtp[gi]) * iw[t0 + y];
              }
              fused_scaled_dcos_row(L + i * n, iw + t0, n, s, s * g, l, has ? y : -1, ey);
            }
            auto xb = xh.narrow(0, b0, rb);
            if (need_x) dxp[p].narrow(0, b0, rb).addmm_(lt, wt);
            if (b0 == 0)
              at::mm_out(Gt, lt.t(), xb);
            else
              Gt.addmm_(lt.t(), xb);
          }
          finish_w_rows_any(Gt.data_ptr<float>(), wd, iw, t0, n, gw);
        }
      }
    });
    if (need_x) {
      dxh.copy_(dxp[0]);
      for (int64_t p = 1; p < P; ++p) dxh.add_(dxp[p]);
      unnormalise_grad_any(dxh.data_ptr<float>(), xh.data_ptr<float>(), ix.data_ptr<float>(), B, D, gx, 0);
    }
    return {lse, tgt, gx, gw};
  }

  at::Tensor G = need_w ? (w32 ? gw : at::zeros({N, D}, f32)) : at::Tensor();

  // Rows per chunk R: every chunk re-reads W twice and reads + writes the [N, D] accumulator once, so
  // fewer, larger chunks cut memory traffic; the R x N fp32 buffer is capped at 384 MB and R at 128
  // (R = 94 at N = 1M, 128 up to N = 768k; R >= 32, so above N = 3M the buffer is 32 N floats), then
  // balanced so the last chunk is not a sliver.
  // Classes per tile T: a W tile and its accumulator rows (T x D fp32 each, 512 KB at D = 512) share a
  // 1 MB L2 (T = 256 measured best at N = 1M against 128, 512 and 1024).
  // Without gradients (the two-pass forward) no logits outlive their tile: one tile slot per thread and
  // up to 64 MB of rows per chunk (all of them at B = 1024: W read once).
  const bool keep = need_x || need_w;
  if (rows <= 0 && !keep) {
    const int64_t slots = std::max<int64_t>(at::get_num_threads(), 1) * T;
    rows = std::max<int64_t>((int64_t{16} << 20) / slots, 128);
  }
  if (rows <= 0) {
    const int64_t rmax = std::clamp<int64_t>((int64_t{96} << 20) / N, 32, 128);
    const int64_t chunks = (B + rmax - 1) / rmax;
    rows = (B + chunks - 1) / chunks;
  }
  const int64_t R = std::min(rows, B);
  // Threads own contiguous blocks of tiles (class sharding inside the process, like ranks): each
  // thread runs single-threaded GEMMs on its own W tiles and accumulator rows (no races on grad_w),
  // keeps per-row partial LSE states (merged in a fixed order, so results do not depend on timing)
  // and its own dX_hat partial (summed after pass B).
  auto buf = at::empty({R * (keep ? nt : P) * T}, f32);
  std::vector<clipcid::OnlineLSE> st(P * R);
  std::vector<float> tg(R), dps(R);
  auto dxp = need_x ? at::empty({P, R, D}, f32) : at::Tensor();

  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    auto xc = xh.narrow(0, r0, r);
    std::fill(st.begin(), st.end(), clipcid::lse_empty());
    std::fill(tg.begin(), tg.end(), 0.0f);
    std::fill(dps.begin(), dps.end(), 0.0f);
    // pass A: logits, per-thread online LSE (a row's target column lives in exactly one tile)
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      // Worker threads do not inherit the caller's thread-local state (grad mode, inference mode): below
      // autograd and ADInplaceOrView the in-place GEMMs into scratch made on the calling thread are plain
      // kernels (no graph, no version-counter bump on inference tensors).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t p = p0; p < p1; ++p) {
        clipcid::OnlineLSE* sp = st.data() + p * R;
        const auto [k0, k1] = tiles_of(p);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t t0 = k * T, n = std::min(T, N - t0);
          auto lt = buf.narrow(0, (keep ? k : p) * R * T, r * n).view({r, n});
          at::mm_out(lt, xc, w_tile(p, t0, n).t());
          float* L = lt.data_ptr<float>();
          for (int64_t i = 0; i < r; ++i) {
            float* row = L + i * n;
            const int64_t y = lp[r0 + i] - t0;
            const bool has = (y >= 0 && y < n);
            float t = 0.0f;
            if (has) {
              float d;
              t = s * clipcid::margin_psi(row[y] * iw[t0 + y], mg, &d);
              tg[i] = t;
              dps[i] = d;
            }
            sp[i] = clipcid::lse_merge(sp[i], fused_scale_row(row, iw + t0, n, s, has ? y : -1, t));
          }
        }
      }
    });
    for (int64_t i = 0; i < r; ++i) {
      clipcid::OnlineLSE a = st[i];
      for (int64_t p = 1; p < P; ++p) a = clipcid::lse_merge(a, st[p * R + i]);
      lo[r0 + i] = clipcid::lse_value(a);
      to[r0 + i] = tg[i];
    }
    if (!(need_x || need_w)) continue;
    // pass B: dcos / ||w|| in place, then dX_hat partial += E W_tile and G_tile += E^T X_hat_chunk
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      // Worker threads do not inherit the caller's thread-local state (grad mode, inference mode): below
      // autograd and ADInplaceOrView the in-place GEMMs into scratch made on the calling thread are plain
      // kernels (no graph, no version-counter bump on inference tensors).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t p = p0; p < p1; ++p) {
        at::Tensor dxl;
        if (need_x) {
          dxl = dxp[p].narrow(0, 0, r);
          dxl.zero_();
        }
        const auto [k0, k1] = tiles_of(p);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t t0 = k * T, n = std::min(T, N - t0);
          auto lt = buf.narrow(0, k * R * T, r * n).view({r, n});
          float* L = lt.data_ptr<float>();
          for (int64_t i = 0; i < r; ++i) {
            const int64_t gi = r0 + i;
            const int64_t y = lp[gi] - t0;
            const bool has = (y >= 0 && y < n);
            const float l = lo[gi], g = glp[gi];
            float ey = 0.0f;
            if (has) ey = s * dps[i] * (g * clipcid::fast_expf(tg[i] - l) + gtp[gi]) * iw[t0 + y];
            fused_dcos_row(L + i * n, iw + t0, n, s * g, l, has ? y : -1, ey);
          }
          if (need_x) dxl.addmm_(lt, w_tile(p, t0, n));
          if (need_w) G.narrow(0, t0, n).addmm_(lt.t(), xc);
        }
      }
    });
    if (need_x) {
      auto dxc = dxh.narrow(0, r0, r);
      dxc.copy_(dxp[0].narrow(0, 0, r));
      for (int64_t p = 1; p < P; ++p) dxc.add_(dxp[p].narrow(0, 0, r));
    }
  }
  if (need_x) unnormalise_grad_any(dxh.data_ptr<float>(), xh.data_ptr<float>(), ix.data_ptr<float>(), B, D, gx, 0);
  if (need_w) {
    // grad_w_j = G_j - w_hat_j <G_j, w_hat_j>   (in place when G is grad_w)
    const float* gp = G.data_ptr<float>();
    at::parallel_for(0, N, 256, [&](int64_t a, int64_t b) { finish_w_rows_any(gp + a * D, wd, iw, a, b - a, gw); });
  }
  return {lse, tgt, gx, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_softmax_fused_grad(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& grad_lse,
    const at::Tensor& grad_target, double scale, double m1, double m2, double m3, bool need_x, bool need_w,
    int64_t rows, int64_t tile, int64_t passes) {
  return fused_grad_impl(x, w, labels, grad_lse, grad_target, scale, m1, m2, m3, need_x, need_w, rows, tile, passes,
                         at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_fwd(const at::Tensor& x, const at::Tensor& w,
                                                      const at::Tensor& labels, double scale, double m1, double m2,
                                                      double m3, int64_t tile) {
  const auto z = at::zeros({x.size(0)}, x.options().dtype(at::kFloat));
  auto r = margin_softmax_fused_grad(x, w, labels, z, z, scale, m1, m2, m3, false, false, 0, tile, 0);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> margin_softmax_bwd(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                      const at::Tensor& x, const at::Tensor& w,
                                                      const at::Tensor& labels, const at::Tensor& lse, double scale,
                                                      double m1, double m2, double m3, bool need_x, bool need_w,
                                                      int64_t tile) {
  CHECK_DTYPE(lse, at::kFloat);
  CLIPCID_CHECK(lse.numel() == x.size(0), "lse must have B = ", x.size(0), " elements");
  auto r = fused_grad_impl(x, w, labels, grad_lse, grad_target, scale, m1, m2, m3, need_x, need_w, 0, tile, 0,
                           lse.reshape({-1}).contiguous());
  return {std::get<2>(r), std::get<3>(r)};
}

// The single pass's backward: gx *= g and gw *= g in place for the scalar grad_output g, nothing when g == 1.
// g is a CPU tensor (the single pass is CPU-only) and is read here, in the kernel: no value read through the
// dispatcher (a Python `bool(g == 1)` was one every step). Either gradient may be empty. A scaled gradient's
// version is bumped, as Python's mul_ did: a later backward through the same graph then raises instead of
// scaling the gradient autograd already holds.
void margin_softmax_scale_(at::Tensor gx, at::Tensor gw, const at::Tensor& g) {
  CHECK_CPU(g);
  CLIPCID_CHECK(g.numel() == 1, "g must have one element, got ", g.numel());
  const auto gf = g.to(at::kFloat).contiguous();
  const float v = *gf.data_ptr<float>();
  if (v == 1.0f) return;
  for (at::Tensor* t : {&gx, &gw}) {
    if (!t->numel()) continue;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // a plain kernel on autograd-free scratch
      t->mul_(v);
    }
    torch::autograd::impl::bump_version(*t);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, m) {
  m.def(
      "margin_softmax_fwd(Tensor x, Tensor w, Tensor labels, float scale, float m1, float m2, float m3, "
      "int tile=0) -> (Tensor, Tensor)");
  m.def(
      "margin_softmax_bwd(Tensor grad_lse, Tensor grad_target, Tensor x, Tensor w, Tensor labels, Tensor lse, "
      "float scale, float m1, float m2, float m3, bool need_x, bool need_w, int tile=0) -> (Tensor, Tensor)");
  m.def(
      "margin_softmax_fused_grad(Tensor x, Tensor w, Tensor labels, Tensor grad_lse, Tensor grad_target, "
      "float scale, float m1, float m2, float m3, bool need_x, bool need_w, int rows=0, int tile=0, int passes=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("margin_softmax_scale_(Tensor(a!) gx, Tensor(b!) gw, Tensor g) -> ()");
}

TORCH_LIBRARY_IMPL(clipcid_fast_C, CPU, m) {
  m.impl("margin_softmax_fwd", &margin_softmax_fwd);
  m.impl("margin_softmax_bwd", &margin_softmax_bwd);
  m.impl("margin_softmax_fused_grad", &margin_softmax_fused_grad);
  m.impl("margin_softmax_scale_", &margin_softmax_scale_);
}
