// K3: the per-cluster SemDeDup op and spherical nearest-centroid assignment, never forming c×c.
//
//   masked_max_sim_fwd(x [c, D])        M_j = max_{i<j} cos(x_i, x_j), idx_j = argmax (ties → smallest i);
//                                       M_0 = -inf, idx_0 = -1
//   nearest_centroid_fwd(x [n, D], C [K, D])   sim_i = max_k cos(x_i, C_k), idx_i = argmax (ties → smallest k)
//
// Both are one kernel: "for every column vector y_j, the max over the rows a_r of cos(a_r, y_j)", with the mask
// r < j for the dedup op (A = Y = x). Tiling: column blocks of Y × row blocks of A, each block one fp32 GEMM
// (at::mm, MKL) into a tile×tile scratch S = A_blk · Y_blkᵀ, then a vectorised column-max epilogue folding S
// into the running (max, argmax) of the block's columns. For the dedup op only row blocks up to the diagonal are
// visited (the lower triangle; the diagonal block masked), so the work is c²·D FLOPs plus the diagonal blocks.
// Norms are computed once (fp32 storage: fp64 sums of squares); cos = (a·y)·inv_a·inv_y is applied in the
// epilogue, so fp32 inputs are multiplied in place (no normalised copy) and bf16 inputs are widened to fp32
// one panel at a time. Extra memory: O(c + n + threads·tile·(tile + D)) floats.
//
// Parallelism (measured on the 2-core AVX2 box, see benchmarks/bench_dedup.py): each thread owns whole column
// blocks (its columns' running max lives in the thread) and runs single-threaded GEMMs; blocks are handed out
// from an atomic counter, largest first, so a core slowed by another process does not hold up the other.
// When there are fewer column blocks than 2 × threads the blocks run one after another with MKL's own
// threads inside each GEMM instead (at c = 8192 that form was 3x slower than one GEMM per thread).
//
// Forward only: the ops are registered with autograd's "not implemented" fallback, so a backward through
// them raises instead of silently returning no gradient.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "row_norms.h"
#include "tiles.h"

namespace {

constexpr int64_t kDefaultTile = 256;  // 256 and 512 tie at c = 8192; 1024 is 1.5x slower

// Fold rows [0, rb) of the scratch S [rb, cb] (global row index r0 + i, scaled by inv_a) into the running
// column max m / argmax id of columns [jbeg_i, cb). For the masked op on a diagonal block only columns with
// global index > global row index count: jbeg_i = (r0 + i) - j0 + 1.
void fold_block(const float* S, int64_t rb, int64_t cb, int64_t r0, int64_t j0, bool diag, const float* inv_a,
                float* m, int32_t* id) {
  for (int64_t i = 0; i < rb; ++i) {
    const int64_t gi = r0 + i;
    const float s = inv_a[gi];
    const float* row = S + i * cb;
    int64_t j = diag ? std::max<int64_t>(0, gi - j0 + 1) : 0;
#if defined(CLIPCID_HAVE_EXP8)
    const __m256 sv = _mm256_set1_ps(s);
    const __m256i iv = _mm256_set1_epi32(static_cast<int32_t>(gi));
    for (; j + 8 <= cb; j += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + j), sv);
      const __m256 cur = _mm256_loadu_ps(m + j);
      const __m256 gt = _mm256_cmp_ps(v, cur, _CMP_GT_OQ);  // strict: an equal later row never wins
      _mm256_storeu_ps(m + j, _mm256_blendv_ps(cur, v, gt));
      const __m256 ids = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(id + j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(id + j),
                          _mm256_castps_si256(_mm256_blendv_ps(ids, _mm256_castsi256_ps(iv), gt)));
    }
#endif
    for (; j < cb; ++j) {
      const float v = row[j] * s;
      if (v > m[j]) {
        m[j] = v;
        id[j] = static_cast<int32_t>(gi);
      }
    }
  }
}

// Rows [r0, r0 + rows) of x as an fp32 matrix: a view for fp32 storage, widened into buf for bf16.
template <typename T>
at::Tensor panel(const at::Tensor& x, const T* xp, int64_t r0, int64_t rows, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    (void)xp;
    (void)buf;
    return x.narrow(0, r0, rows);
  } else {
    const T* src = xp + r0 * D;
    for (int64_t k = 0; k < rows * D; ++k) buf[k] = static_cast<float>(src[k]);
    return at::from_blob(buf, {rows, D}, at::TensorOptions().dtype(at::kFloat));
  }
}

struct Scratch {
  int64_t rtile;
  std::vector<float> s, a, y, m;
  std::vector<int32_t> id;
  explicit Scratch(int64_t tile, int64_t rtile_, int64_t D, bool widen)
      : rtile(rtile_), s(rtile_ * tile), a(widen ? rtile_ * D : 0), y(widen ? tile * D : 0), m(tile), id(tile) {}
};

// Row blocks are rtile rows, shortened so that none straddles the diagonal start j0 (masked op).
inline int64_t rb_step(int64_t r0, int64_t j0, int64_t rtile, bool masked) {
  return (masked && r0 < j0) ? std::min(rtile, j0 - r0) : rtile;
}

// One column block [j0, j0 + cb) of Y against the row blocks of A (all of A, or rows < j0 + cb when masked).
template <typename T>
void column_block(const at::Tensor& a, const T* ap, const float* inv_a, int64_t m_rows, const at::Tensor& y,
                  const T* yp, const float* inv_y, int64_t j0, int64_t cb, int64_t D, int64_t tile, bool masked,
                  Scratch& sc, float* out_m, int64_t* out_id) {
  std::fill(sc.m.begin(), sc.m.begin() + cb, -std::numeric_limits<float>::infinity());
  std::fill(sc.id.begin(), sc.id.begin() + cb, -1);
  const at::Tensor yb = panel<T>(y, yp, j0, cb, D, sc.y.data());
  const int64_t r_end = masked ? std::min(m_rows, j0 + cb - 1) : m_rows;  // last column needs rows < j0+cb-1
  const int64_t rtile = sc.rtile;
  for (int64_t r0 = 0; r0 < r_end; r0 += rb_step(r0, j0, rtile, masked)) {
    const int64_t rb = std::min(rb_step(r0, j0, rtile, masked), r_end - r0);
    const at::Tensor ab = panel<T>(a, ap, r0, rb, D, sc.a.data());
    at::Tensor S = at::from_blob(sc.s.data(), {rb, cb}, at::TensorOptions().dtype(at::kFloat));
    at::mm_out(S, ab, yb.t());
    fold_block(sc.s.data(), rb, cb, r0, j0, masked && r0 + rb > j0, inv_a, sc.m.data(), sc.id.data());
  }
  for (int64_t j = 0; j < cb; ++j) {
    out_m[j0 + j] = sc.m[j] * inv_y[j0 + j];
    out_id[j0 + j] = sc.id[j];
  }
}

template <typename T>
void max_sim(const at::Tensor& a, const at::Tensor& y, bool masked, int64_t tile, float* out_m, int64_t* out_id) {
  const int64_t m_rows = a.size(0), n = y.size(0), D = y.size(1);
  const T* ap = a.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  std::vector<float> inv_a_buf(m_rows), inv_y_buf(masked ? 0 : n);
  clipcid::row_inv_norms<double>(ap, m_rows, D, inv_a_buf.data());
  if (!masked) clipcid::row_inv_norms<double>(yp, n, D, inv_y_buf.data());
  const float* inv_a = inv_a_buf.data();
  const float* inv_y = masked ? inv_a : inv_y_buf.data();
  constexpr bool widen = !std::is_same_v<T, float>;
  const int64_t rtile = tile;  // taller row blocks (2-8 × tile) measured no faster
  // A row block never exceeds a column block: for the masked op rows stop at the diagonal.
  const int64_t nblocks = (n + tile - 1) / tile;
  const int64_t threads = at::get_num_threads();
  if (nblocks < 2 * threads || threads == 1) {  // few blocks: MKL's threads inside each GEMM
    Scratch sc(tile, rtile, D, widen);
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t j0 = b * tile;
      column_block<T>(a, ap, inv_a, m_rows, y, yp, inv_y, j0, std::min(tile, n - j0), D, tile, masked, sc, out_m,
                      out_id);
    }
    return;
  }
  // Each thread owns whole column blocks; the largest (last, for the triangle) are handed out first.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Scratch sc(tile, rtile, D, widen);
      for (int64_t k = next.fetch_add(1); k < nblocks; k = next.fetch_add(1)) {
        const int64_t b = masked ? nblocks - 1 - k : k;
        const int64_t j0 = b * tile;
        column_block<T>(a, ap, inv_a, m_rows, y, yp, inv_y, j0, std::min(tile, n - j0), D, tile, masked, sc, out_m,
                        out_id);
      }
    }
  });
}

int64_t pick_tile(int64_t tile) {
  CLIPCID_CHECK(tile >= 0, "tile must be >= 0 (0 = default), got ", tile);
  return tile == 0 ? kDefaultTile : tile;
}

void check_rows(const at::Tensor& x, const char* name) {
  CLIPCID_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  CLIPCID_CHECK(x.dim() == 2, name, " must have 2 dims, got ", x.dim());
  CLIPCID_CHECK(x.is_contiguous(), name, " must be contiguous");
  CLIPCID_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
                " must be float32 or bfloat16, got ", x.scalar_type());
  CLIPCID_CHECK(x.size(0) < std::numeric_limits<int32_t>::max(), name, " has too many rows: ", x.size(0));
}

std::tuple<at::Tensor, at::Tensor> masked_max_sim_fwd(const at::Tensor& x, int64_t tile) {
  check_rows(x, "x");
  const int64_t t = pick_tile(tile);
  const int64_t c = x.size(0);
  auto M = at::empty({c}, x.options().dtype(at::kFloat));
  auto idx = at::empty({c}, x.options().dtype(at::kLong));
  if (c == 0) return {M, idx};
  if (x.scalar_type() == at::kFloat)
    max_sim<float>(x, x, true, t, M.data_ptr<float>(), idx.data_ptr<int64_t>());
  else
    max_sim<at::BFloat16>(x, x, true, t, M.data_ptr<float>(), idx.data_ptr<int64_t>());
  return {M, idx};
}

std::tuple<at::Tensor, at::Tensor> nearest_centroid_fwd(const at::Tensor& x, const at::Tensor& centroids,
                                                        int64_t tile) {
  check_rows(x, "x");
  check_rows(centroids, "centroids");
  CHECK_DTYPE(centroids, x.scalar_type());
  CLIPCID_CHECK(centroids.size(1) == x.size(1), "centroids must have D = ", x.size(1), " columns, got ",
                centroids.size(1));
  CLIPCID_CHECK(centroids.size(0) > 0, "centroids must have at least one row");
  const int64_t t = pick_tile(tile);
  const int64_t n = x.size(0);
  auto sim = at::empty({n}, x.options().dtype(at::kFloat));
  auto idx = at::empty({n}, x.options().dtype(at::kLong));
  if (n == 0) return {sim, idx};
  if (x.scalar_type() == at::kFloat)
    max_sim<float>(centroids, x, false, t, sim.data_ptr<float>(), idx.data_ptr<int64_t>());
  else
    max_sim<at::BFloat16>(centroids, x, false, t, sim.data_ptr<float>(), idx.data_ptr<int64_t>());
  return {sim, idx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, m) {
  m.def("masked_max_sim_fwd(Tensor x, int tile=0) -> (Tensor, Tensor)");
  m.def("nearest_centroid_fwd(Tensor x, Tensor centroids, int tile=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clipcid_fast_C, CPU, m) {
  m.impl("masked_max_sim_fwd", &masked_max_sim_fwd);
  m.impl("nearest_centroid_fwd", &nearest_centroid_fwd);
}

// Forward-only: a backward through these ops raises "derivative ... not implemented".
TORCH_LIBRARY_IMPL(clipcid_fast_C, Autograd, m) {
  m.impl("masked_max_sim_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("nearest_centroid_fwd", torch::autograd::autogradNotImplementedFallback());
}
