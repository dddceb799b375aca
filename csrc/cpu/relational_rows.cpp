// Fused relational / contrastive KD over similarity matrices (K2), never storing the R x C matrices.
//
// Student logits Zs = (beta * q_s) k_s^T, teacher logits Zt = (alpha * q_t) k_t^T, both [R, C]. Per row i
// (softmax over j) and per column j (softmax over i) of the SAME matrices:
//   hard (diagonal target):  l_i = lse_j Zs[i, :] - Zs[i, i + off];  l_j = lse_i Zs[:, j] - Zs[j, j]
//   soft "ce":               l_i = -sum_j pt_ij log ps_ij          (open_clip DistillClipLoss)
//   "kl":                    l_i = sum_j pt_ij (log pt_ij - log ps_ij)   (CLIP-KD DistillKL / CRD)
// and the same over columns. This is reference.relational_rows_loss for the rows (q, k) and the
// columns (k, q) at once: each tile of Zs and Zt is computed once (one fp32 GEMM each) for both
// directions, and the hard and the soft losses can come from the same student tile (the "distill"
// ops: open_clip DistillClipLoss = hard CE + soft CE of one student matrix, CLIP-KD = hard CE + KL).
//
// GEMM count (B x B x D GEMMs, rows and columns both): forward 1 (hard only) or 2 (student + teacher
// tile, for soft, KL and the distill ops); backward 2 recomputes (student + teacher) + 2 gradient
// GEMMs. So DistillClipLoss costs 2 + 4 = 6 where open_clip runs 8 and two separate calls ran 10.
//
// Forward: one sweep over [BR x BC] tiles. Rows and columns each keep an online softmax state
// (running max m, sum s = sum exp(z - m)) for the student, and for the teacher also the weighted sum
// acc = sum exp(zt - mt) * v, v = zs (ce) or zt - zs (kl), rescaled when the max moves; hard targets
// capture the diagonal logit. Per tile: pass 1 takes row and column maxima of both tiles together
// (row by row, vectorised over columns), pass 2 does every exp/sum of rows and columns in the same
// row-by-row sweep (AVX2 fast_exp8 from tiles.h, scalar fast_expf for the ragged tail and non-AVX2 builds;
// GCC leaves fast_expf scalar inside `omp simd` loops). 2 exps per element per direction with a teacher.
// Then ce: l = lse_s - acc / st; kl: l = acc / st - lse_t + lse_s; hard: l = lse_s - diag.
// Saved for backward: only the log-sum-exps (student, teacher) of every row and column, O(R + C).
// Backward: recompute the tiles, G = a_r ps_r - b_r pt_r + a_c ps_c - b_c pt_c - (h_r + h_c) onehot
// with a = g_soft + g_hard, b = g_soft, h = g_hard; then dq = beta G k, dk = beta G^T q,
// dbeta = sum_i q_i . (G k)_i. ce and kl have the same student gradient.
// The teacher gets no gradient (open_clip's teacher never requires grad; the Python op documents it).
//
// Threading: the rows are split into one contiguous chunk per thread (at::parallel_for); each chunk
// runs its own single-threaded GEMMs (at::mm inside a parallel region does not spawn threads) and
// tile passes. Row states and dq rows are owned by one chunk; column states and dk accumulators are
// per chunk and merged at the end (O(threads * C) and O(threads * C * D)).
// Memory beyond inputs and outputs: per thread two [BR, BC] fp32 tiles, two [BR, D] blocks and the
// column state; fp32 copies of bf16 inputs; never O(R * C).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "tiles.h"

namespace {

using clipcid::fast_expf;
#ifdef CLIPCID_HAVE_EXP8
using clipcid::fast_exp8;
#endif

constexpr int64_t kBlockRows = 256;
constexpr int64_t kBlockCols = 256;

// Per-direction online state, one entry per row (or column).
struct State {
  float* ms;    // student running max
  float* ss;    // student running sum
  float* mt;    // teacher running max
  float* st;    // teacher running sum
  float* acc;   // teacher-weighted sum of v
  float* diag;  // hard target: the student logit at the target
};

struct StateBuf {
  at::Tensor t;  // [6, n]
  State s{};
  explicit StateBuf(int64_t n) {
    t = at::empty({6, std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kFloat));
    t[0].fill_(-INFINITY);
    t[1].zero_();
    t[2].fill_(-INFINITY);
    t[3].zero_();
    t[4].zero_();
    t[5].zero_();
    float* p = t.data_ptr<float>();
    const int64_t w = t.size(1);
    s = State{p, p + w, p + 2 * w, p + 3 * w, p + 4 * w, p + 5 * w};
  }
};

inline float vmax(float a, float b) { return a > b ? a : b; }

// Contiguous [n, cols] view on the front of a flat fp32 buffer (no allocation per tile).
inline at::Tensor tile_view(const at::Tensor& flat, int64_t n, int64_t cols) {
  return flat.narrow(0, 0, n * cols).view({n, cols});
}

// ----------------------------------------------------------------------------------------------
// Forward tile: zs / zt are [nr, nc] row-major tiles at rows r0.., columns c0... rs: the global row
// state; cs: this chunk's column state. scratch: 2 * nc + 2 * nr floats.

template <bool SOFT, bool KL, bool DIAG, bool ROWS, bool COLS>
void fwd_tile(const float* zs, const float* zt, int64_t nr, int64_t nc, int64_t r0, int64_t c0, int64_t off,
              const State& rs, const State& cs, float* scratch) {
  float* __restrict cms = scratch;        // new column max (student)
  float* __restrict cmt = scratch + nc;   // new column max (teacher)
  float* __restrict rms = scratch + 2 * nc;  // new row max (student)
  float* __restrict rmt = rms + nr;          // new row max (teacher)
  // pass 1: row and column maxima of both tiles
  if constexpr (COLS) {
    for (int64_t j = 0; j < nc; ++j) cms[j] = cs.ms[c0 + j];
    if constexpr (SOFT)
      for (int64_t j = 0; j < nc; ++j) cmt[j] = cs.mt[c0 + j];
  }
  for (int64_t i = 0; i < nr; ++i) {
    const float* __restrict a = zs + i * nc;
    float mx = -INFINITY;
    if constexpr (COLS) {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < nc; ++j) {
        mx = vmax(mx, a[j]);
        cms[j] = vmax(cms[j], a[j]);
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < nc; ++j) mx = vmax(mx, a[j]);
    }
    if constexpr (ROWS) rms[i] = vmax(rs.ms[r0 + i], mx);
    if constexpr (SOFT) {
      const float* __restrict b = zt + i * nc;
      float mt = -INFINITY;
      if constexpr (COLS) {
#pragma omp simd reduction(max : mt)
        for (int64_t j = 0; j < nc; ++j) {
          mt = vmax(mt, b[j]);
          cmt[j] = vmax(cmt[j], b[j]);
        }
      } else {
#pragma omp simd reduction(max : mt)
        for (int64_t j = 0; j < nc; ++j) mt = vmax(mt, b[j]);
      }
      if constexpr (ROWS) rmt[i] = vmax(rs.mt[r0 + i], mt);
    }
  }
  // columns: rescale the running sums to the new maxima
  float* __restrict css = cs.ss + c0;
  float* __restrict cst = cs.st + c0;
  float* __restrict cacc = cs.acc + c0;
  if constexpr (COLS) {
    float* __restrict cm = cs.ms + c0;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) {
      css[j] *= fast_expf(cm[j] - cms[j]);  // -inf - finite -> 0
      cm[j] = cms[j];
    }
    if constexpr (SOFT) {
      float* __restrict ct = cs.mt + c0;
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) {
        const float f = fast_expf(ct[j] - cmt[j]);
        cst[j] *= f;
        cacc[j] *= f;
        ct[j] = cmt[j];
      }
    }
  }
  // pass 2: every exp and sum, rows and columns in the same sweep
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t r = r0 + i;
    const float* __restrict a = zs + i * nc;
    const float* __restrict b = SOFT ? zt + i * nc : nullptr;
    const float mr = ROWS ? rms[i] : 0.0f;
    const float mtr = (ROWS && SOFT) ? rmt[i] : 0.0f;
    float sr = 0.0f, st = 0.0f, ar = 0.0f;
    int64_t j0 = 0;
#ifdef CLIPCID_HAVE_EXP8
    {
      __m256 vsr = _mm256_setzero_ps(), vst = _mm256_setzero_ps(), var = _mm256_setzero_ps();
      const __m256 vmr = _mm256_set1_ps(mr), vmt = _mm256_set1_ps(mtr);
      for (; j0 + 8 <= nc; j0 += 8) {
        const __m256 z = _mm256_loadu_ps(a + j0);
        if constexpr (ROWS) vsr = _mm256_add_ps(vsr, fast_exp8(_mm256_sub_ps(z, vmr)));
        if constexpr (COLS)
          _mm256_storeu_ps(css + j0, _mm256_add_ps(_mm256_loadu_ps(css + j0),
                                                   fast_exp8(_mm256_sub_ps(z, _mm256_loadu_ps(cms + j0)))));
        if constexpr (SOFT) {
          const __m256 y = _mm256_loadu_ps(b + j0);
          const __m256 v = KL ? _mm256_sub_ps(y, z) : z;
          if constexpr (ROWS) {
            const __m256 e = fast_exp8(_mm256_sub_ps(y, vmt));
            vst = _mm256_add_ps(vst, e);
            var = _mm256_fmadd_ps(e, v, var);
          }
          if constexpr (COLS) {
            const __m256 e = fast_exp8(_mm256_sub_ps(y, _mm256_loadu_ps(cmt + j0)));
            _mm256_storeu_ps(cst + j0, _mm256_add_ps(_mm256_loadu_ps(cst + j0), e));
            _mm256_storeu_ps(cacc + j0, _mm256_fmadd_ps(e, v, _mm256_loadu_ps(cacc + j0)));
          }
        }
      }
      sr = clipcid::hsum8(vsr);
      st = clipcid::hsum8(vst);
      ar = clipcid::hsum8(var);
    }
#endif
    for (int64_t j = j0; j < nc; ++j) {
      const float z = a[j];
      if constexpr (ROWS) sr += fast_expf(z - mr);
      if constexpr (COLS) css[j] += fast_expf(z - cms[j]);
      if constexpr (SOFT) {
        const float y = b[j];
        const float v = KL ? y - z : z;
        if constexpr (ROWS) {
          const float e = fast_expf(y - mtr);
          st += e;
          ar += e * v;
        }
        if constexpr (COLS) {
          const float e = fast_expf(y - cmt[j]);
          cst[j] += e;
          cacc[j] += e * v;
        }
      }
    }
    if constexpr (ROWS) {
      rs.ss[r] = rs.ss[r] * fast_expf(rs.ms[r] - mr) + sr;
      rs.ms[r] = mr;
      if constexpr (SOFT) {
        const float f = fast_expf(rs.mt[r] - mtr);
        rs.st[r] = rs.st[r] * f + st;
        rs.acc[r] = rs.acc[r] * f + ar;
        rs.mt[r] = mtr;
      }
    }
    if constexpr (DIAG) {
      // row r targets column r + off; column c targets row c - off (off is 0 whenever columns are asked for)
      const int64_t t = r + off - c0;
      if (t >= 0 && t < nc) {
        if constexpr (ROWS) rs.diag[r] = a[t];
        if constexpr (COLS) cs.diag[r + off] = a[t];
      }
    }
  }
}

// Merge the column state of chunk k into chunk 0's (associative online-softmax merge).
void merge_cols(const State& into, const State& from, int64_t n, bool soft, bool diag) {
  at::parallel_for(0, n, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float m0 = into.ms[j], m1 = from.ms[j];
      const float m = std::max(m0, m1);
      if (m1 != -INFINITY) {
        into.ss[j] = (m0 == -INFINITY ? 0.0f : into.ss[j] * std::exp(m0 - m)) + from.ss[j] * std::exp(m1 - m);
        into.ms[j] = m;
      }
      if (soft && from.mt[j] != -INFINITY) {
        const float t0 = into.mt[j], t1 = from.mt[j];
        const float t = std::max(t0, t1);
        const float f0 = t0 == -INFINITY ? 0.0f : std::exp(t0 - t), f1 = std::exp(t1 - t);
        into.st[j] = into.st[j] * f0 + from.st[j] * f1;
        into.acc[j] = into.acc[j] * f0 + from.acc[j] * f1;
        into.mt[j] = t;
      }
      if (diag) into.diag[j] += from.diag[j];  // exactly one chunk wrote each diagonal entry, the rest are 0
    }
  });
}

// Losses and log-sum-exps of every row (or column) from its final state. soft_loss / hard_loss may be null.
void finish(const State& st, int64_t n, bool soft, bool kl, float* soft_loss, float* hard_loss, float* lse_s,
            float* lse_t) {
  at::parallel_for(0, n, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float ls = st.ms[i] + std::log(st.ss[i]);
      lse_s[i] = ls;
      if (hard_loss) hard_loss[i] = ls - st.diag[i];
      if (!soft) {
        lse_t[i] = 0.0f;
        continue;
      }
      const float lt = st.mt[i] + std::log(st.st[i]);
      lse_t[i] = lt;
      const float mean = st.acc[i] / st.st[i];
      soft_loss[i] = kl ? mean - lt + ls : ls - mean;
    }
  });
}

struct Inputs {
  at::Tensor qs, ks, qt, kt;  // fp32 contiguous
  float beta = 1.0f, alpha = 1.0f;
  bool soft = false;
};

void check_feat(const at::Tensor& x, const char* name) {
  CLIPCID_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  CLIPCID_CHECK(x.dim() == 2, name, " must have 2 dims, got ", x.dim());
  CLIPCID_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
                " must be float32 or bfloat16, got ", x.scalar_type());
}

float scalar_of(const at::Tensor& s, const char* name) {
  CLIPCID_CHECK(s.numel() == 1, name, " must have one element, got ", s.numel());
  return static_cast<float>(s.item<double>());
}

// hard: whether hard diagonal targets are used (always without a teacher; with one for the distill ops).
Inputs prepare(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& scale_s,
               const std::optional<at::Tensor>& q_t, const std::optional<at::Tensor>& k_t,
               const std::optional<at::Tensor>& scale_t, int64_t off, bool rows, bool cols, bool hard) {
  check_feat(q_s, "q_s");
  check_feat(k_s, "k_s");
  CLIPCID_CHECK(q_s.size(1) == k_s.size(1), "q_s and k_s must have the same feature dim: ", q_s.size(1), " vs ",
                k_s.size(1));
  Inputs in;
  in.qs = q_s.detach().to(at::kFloat).contiguous();
  in.ks = k_s.detach().to(at::kFloat).contiguous();
  in.beta = scalar_of(scale_s, "scale_s");
  in.soft = q_t.has_value();
  CLIPCID_CHECK(q_t.has_value() == k_t.has_value() && k_t.has_value() == scale_t.has_value(),
                "q_t, k_t and scale_t must be given together");
  if (in.soft) {
    check_feat(*q_t, "q_t");
    check_feat(*k_t, "k_t");
    CLIPCID_CHECK(q_t->size(0) == q_s.size(0) && k_t->size(0) == k_s.size(0), "teacher rows must match student rows");
    CLIPCID_CHECK(q_t->size(1) == k_t->size(1), "q_t and k_t must have the same feature dim");
    in.qt = q_t->detach().to(at::kFloat).contiguous();
    in.kt = k_t->detach().to(at::kFloat).contiguous();
    in.alpha = scalar_of(*scale_t, "scale_t");
  }
  if (hard) {
    const int64_t R = q_s.size(0), C = k_s.size(0);
    CLIPCID_CHECK(!rows || (off >= 0 && off + R <= C), "hard targets need 0 <= target_offset and ",
                  "target_offset + rows <= cols, got offset ", off, " for ", R, " x ", C);
    CLIPCID_CHECK(!cols || (off == 0 && R == C), "hard column targets need a square matrix and target_offset 0");
  }
  return in;
}

int64_t pick(int64_t requested, int64_t dflt) { return requested > 0 ? requested : dflt; }

// Per-chunk tile buffers: scaled row blocks and the two logit tiles. (scale * q) k^T is the reference's
// order of operations, so the row block is scaled once per row block.
struct Tiler {
  const Inputs& in;
  at::Tensor qblk, tblk, zs_flat, zt_flat;
  int64_t br, bc;
  Tiler(const Inputs& in_, int64_t br_, int64_t bc_) : in(in_), br(br_), bc(bc_) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    qblk = at::empty({br, in.qs.size(1)}, f);
    zs_flat = at::empty({br * bc}, f);
    if (in.soft) {
      tblk = at::empty({br, in.qt.size(1)}, f);
      zt_flat = at::empty({br * bc}, f);
    }
  }
  void set_rows(int64_t r0, int64_t nr) {
    at::Tensor q = qblk.narrow(0, 0, nr);
    at::mul_out(q, in.qs.narrow(0, r0, nr), in.beta);
    if (in.soft) {
      at::Tensor t = tblk.narrow(0, 0, nr);
      at::mul_out(t, in.qt.narrow(0, r0, nr), in.alpha);
    }
  }
  void tiles(int64_t nr, int64_t c0, int64_t nc, at::Tensor& zs, at::Tensor& zt) {
    zs = tile_view(zs_flat, nr, nc);
    at::mm_out(zs, qblk.narrow(0, 0, nr), in.ks.narrow(0, c0, nc).t());
    if (in.soft) {
      zt = tile_view(zt_flat, nr, nc);
      at::mm_out(zt, tblk.narrow(0, 0, nr), in.kt.narrow(0, c0, nc).t());
    }
  }
};

// Rows split into `nch` contiguous chunks of whole row blocks, one per thread.
struct Chunks {
  int64_t nb, nch;
  Chunks(int64_t R, int64_t br) {
    nb = (R + br - 1) / br;
    nch = std::max<int64_t>(1, std::min<int64_t>(nb, at::get_num_threads()));
  }
  int64_t begin(int64_t c) const { return c * nb / nch; }
  int64_t end(int64_t c) const { return (c + 1) * nb / nch; }
};

struct FwdOut {
  at::Tensor soft_r, soft_c, hard_r, hard_c, stats_r, stats_c;
};

template <bool SOFT, bool KL, bool DIAG, bool ROWS, bool COLS>
void fwd_run(const Inputs& in, int64_t R, int64_t C, int64_t off, int64_t br, int64_t bc, const State& rs,
             std::vector<StateBuf>& cbufs, const Chunks& ch) {
  at::parallel_for(0, ch.nch, 1, [&](int64_t k0, int64_t k1) {
    // worker threads do not inherit the caller's dispatch state: the inputs are detached and grad mode is off
    at::NoGradGuard no_grad;
    for (int64_t k = k0; k < k1; ++k) {
      Tiler T(in, br, bc);
      std::vector<float> scratch(2 * bc + 2 * br);
      const State cs = cbufs[k].s;
      for (int64_t blk = ch.begin(k); blk < ch.end(k); ++blk) {
        const int64_t r0 = blk * br, nr = std::min(br, R - r0);
        T.set_rows(r0, nr);
        for (int64_t c0 = 0; c0 < C; c0 += bc) {
          const int64_t nc = std::min(bc, C - c0);
          at::Tensor zs, zt;
          T.tiles(nr, c0, nc, zs, zt);
          fwd_tile<SOFT, KL, DIAG, ROWS, COLS>(zs.data_ptr<float>(), SOFT ? zt.data_ptr<float>() : nullptr, nr, nc,
                                               r0, c0, off, rs, cs, scratch.data());
        }
      }
    }
  });
}

template <bool SOFT, bool KL, bool DIAG>
void fwd_dispatch_dir(bool rows, bool cols, const Inputs& in, int64_t R, int64_t C, int64_t off, int64_t br,
                      int64_t bc, const State& rs, std::vector<StateBuf>& cbufs, const Chunks& ch) {
  if (rows && cols)
    fwd_run<SOFT, KL, DIAG, true, true>(in, R, C, off, br, bc, rs, cbufs, ch);
  else if (rows)
    fwd_run<SOFT, KL, DIAG, true, false>(in, R, C, off, br, bc, rs, cbufs, ch);
  else
    fwd_run<SOFT, KL, DIAG, false, true>(in, R, C, off, br, bc, rs, cbufs, ch);
}

// The forward engine. hard: capture diagonal targets (always without a teacher).
FwdOut fwd_engine(const Inputs& in, int64_t R, int64_t C, bool kl, bool hard, int64_t off, bool rows, bool cols,
                  int64_t block_rows, int64_t block_cols) {
  const int64_t nR = rows ? R : 0, nC = cols ? C : 0;
  auto f = at::TensorOptions().dtype(at::kFloat);
  FwdOut o;
  o.soft_r = at::empty({in.soft ? nR : 0}, f);
  o.soft_c = at::empty({in.soft ? nC : 0}, f);
  o.hard_r = at::empty({hard ? nR : 0}, f);
  o.hard_c = at::empty({hard ? nC : 0}, f);
  o.stats_r = at::empty({2, nR}, f);
  o.stats_c = at::empty({2, nC}, f);
  if (R == 0 || C == 0 || (!rows && !cols)) return o;
  const int64_t br = pick(block_rows, kBlockRows), bc = pick(block_cols, kBlockCols);
  const Chunks ch(R, br);
  StateBuf rs(nR);
  std::vector<StateBuf> cbufs;
  cbufs.reserve(ch.nch);
  for (int64_t k = 0; k < ch.nch; ++k) cbufs.emplace_back(nC);
  if (!in.soft)
    fwd_dispatch_dir<false, false, true>(rows, cols, in, R, C, off, br, bc, rs.s, cbufs, ch);
  else if (kl && hard)
    fwd_dispatch_dir<true, true, true>(rows, cols, in, R, C, off, br, bc, rs.s, cbufs, ch);
  else if (kl)
    fwd_dispatch_dir<true, true, false>(rows, cols, in, R, C, off, br, bc, rs.s, cbufs, ch);
  else if (hard)
    fwd_dispatch_dir<true, false, true>(rows, cols, in, R, C, off, br, bc, rs.s, cbufs, ch);
  else
    fwd_dispatch_dir<true, false, false>(rows, cols, in, R, C, off, br, bc, rs.s, cbufs, ch);
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  if (rows)
    finish(rs.s, R, in.soft, kl, ptr(o.soft_r), ptr(o.hard_r), o.stats_r.data_ptr<float>(),
           o.stats_r.data_ptr<float>() + R);
  if (cols) {
    for (int64_t k = 1; k < ch.nch; ++k) merge_cols(cbufs[0].s, cbufs[k].s, C, in.soft, hard);
    finish(cbufs[0].s, C, in.soft, kl, ptr(o.soft_c), ptr(o.hard_c), o.stats_c.data_ptr<float>(),
           o.stats_c.data_ptr<float>() + C);
  }
  return o;
}

// ----------------------------------------------------------------------------------------------
// Backward. Per-row (and per-column) coefficients of G: a (on p_s), b (on p_t), h (on the one-hot).

struct Coef {
  const float *ar = nullptr, *br = nullptr, *hr = nullptr, *lsr = nullptr, *ltr = nullptr;
  const float *ac = nullptr, *bc = nullptr, *hc = nullptr, *lsc = nullptr, *ltc = nullptr;
};

// G tile in place over the zs tile.
template <bool SOFT, bool HARD, bool ROWS, bool COLS>
void grad_tile(float* zs, const float* zt, int64_t nr, int64_t nc, int64_t r0, int64_t c0, int64_t off,
               const Coef& k) {
  const float* __restrict acc_ = COLS ? k.ac + c0 : nullptr;
  const float* __restrict bcc = (COLS && SOFT) ? k.bc + c0 : nullptr;
  const float* __restrict lscc = COLS ? k.lsc + c0 : nullptr;
  const float* __restrict ltcc = (COLS && SOFT) ? k.ltc + c0 : nullptr;
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t r = r0 + i;
    float* __restrict a = zs + i * nc;
    const float* __restrict b = SOFT ? zt + i * nc : nullptr;
    const float a_r = ROWS ? k.ar[r] : 0.0f, ls_r = ROWS ? k.lsr[r] : 0.0f;
    const float b_r = (ROWS && SOFT) ? k.br[r] : 0.0f, lt_r = (ROWS && SOFT) ? k.ltr[r] : 0.0f;
    int64_t j0 = 0;
#ifdef CLIPCID_HAVE_EXP8
    {
      const __m256 va = _mm256_set1_ps(a_r), vls = _mm256_set1_ps(ls_r);
      const __m256 vb = _mm256_set1_ps(b_r), vlt = _mm256_set1_ps(lt_r);
      for (; j0 + 8 <= nc; j0 += 8) {
        const __m256 z = _mm256_loadu_ps(a + j0);
        __m256 g = _mm256_setzero_ps();
        if constexpr (ROWS) {
          g = _mm256_mul_ps(va, fast_exp8(_mm256_sub_ps(z, vls)));
          if constexpr (SOFT) g = _mm256_fnmadd_ps(vb, fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(b + j0), vlt)), g);
        }
        if constexpr (COLS) {
          g = _mm256_fmadd_ps(_mm256_loadu_ps(acc_ + j0), fast_exp8(_mm256_sub_ps(z, _mm256_loadu_ps(lscc + j0))), g);
          if constexpr (SOFT)
            g = _mm256_fnmadd_ps(_mm256_loadu_ps(bcc + j0),
                                 fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(b + j0), _mm256_loadu_ps(ltcc + j0))), g);
        }
        _mm256_storeu_ps(a + j0, g);
      }
    }
#endif
    for (int64_t j = j0; j < nc; ++j) {
      const float z = a[j];
      float g = 0.0f;
      if constexpr (ROWS) {
        g += a_r * fast_expf(z - ls_r);
        if constexpr (SOFT) g -= b_r * fast_expf(b[j] - lt_r);
      }
      if constexpr (COLS) {
        g += acc_[j] * fast_expf(z - lscc[j]);
        if constexpr (SOFT) g -= bcc[j] * fast_expf(b[j] - ltcc[j]);
      }
      a[j] = g;
    }
    if constexpr (HARD) {
      // minus the hard weights at the target logit of row r (and of column r + off == r when COLS)
      const int64_t t = r + off - c0;
      if (t >= 0 && t < nc) {
        if constexpr (ROWS) a[t] -= k.hr[r];
        if constexpr (COLS) a[t] -= k.hc[r + off];
      }
    }
  }
}

template <bool SOFT, bool HARD, bool ROWS, bool COLS>
void bwd_run(const Inputs& in, int64_t R, int64_t C, int64_t off, int64_t br, int64_t bc, const Coef& k,
             at::Tensor& gq, std::vector<at::Tensor>& gks, const Chunks& ch) {
  at::parallel_for(0, ch.nch, 1, [&](int64_t k0, int64_t k1) {
    at::NoGradGuard no_grad;
    for (int64_t c = k0; c < k1; ++c) {
      Tiler T(in, br, bc);
      at::Tensor& gk = gks[c];
      for (int64_t blk = ch.begin(c); blk < ch.end(c); ++blk) {
        const int64_t r0 = blk * br, nr = std::min(br, R - r0);
        T.set_rows(r0, nr);
        at::Tensor gq_blk = gq.narrow(0, r0, nr);
        const at::Tensor q_blk = in.qs.narrow(0, r0, nr);
        for (int64_t c0 = 0; c0 < C; c0 += bc) {
          const int64_t nc = std::min(bc, C - c0);
          at::Tensor zs, zt;
          T.tiles(nr, c0, nc, zs, zt);
          grad_tile<SOFT, HARD, ROWS, COLS>(zs.data_ptr<float>(), SOFT ? zt.data_ptr<float>() : nullptr, nr, nc, r0,
                                            c0, off, k);
          // zs now holds G: (G k) for the rows, (G^T q) for the columns; beta is applied once at the end
          gq_blk.addmm_(zs, in.ks.narrow(0, c0, nc));
          at::Tensor gk_blk = gk.narrow(0, c0, nc);
          gk_blk.addmm_(zs.t(), q_blk);
        }
      }
    }
  });
}

template <bool SOFT, bool HARD>
void bwd_dispatch_dir(bool rows, bool cols, const Inputs& in, int64_t R, int64_t C, int64_t off, int64_t br,
                      int64_t bc, const Coef& k, at::Tensor& gq, std::vector<at::Tensor>& gks, const Chunks& ch) {
  if (rows && cols)
    bwd_run<SOFT, HARD, true, true>(in, R, C, off, br, bc, k, gq, gks, ch);
  else if (rows)
    bwd_run<SOFT, HARD, true, false>(in, R, C, off, br, bc, k, gq, gks, ch);
  else
    bwd_run<SOFT, HARD, false, true>(in, R, C, off, br, bc, k, gq, gks, ch);
}

// g_soft_* / g_hard_*: undefined tensors when absent. Returns (d q_s, d k_s, d scale_s).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_engine(const Inputs& in, const at::Tensor& q_s,
                                                          const at::Tensor& k_s, const at::Tensor& scale_s,
                                                          const at::Tensor& g_soft_r, const at::Tensor& g_soft_c,
                                                          const at::Tensor& g_hard_r, const at::Tensor& g_hard_c,
                                                          const at::Tensor& stats_rows, const at::Tensor& stats_cols,
                                                          int64_t off, bool rows, bool cols, bool hard,
                                                          int64_t block_rows, int64_t block_cols) {
  const int64_t R = q_s.size(0), C = k_s.size(0);
  const int64_t nR = rows ? R : 0, nC = cols ? C : 0;
  const bool soft = in.soft;
  CLIPCID_CHECK(g_soft_r.defined() == soft && g_soft_c.defined() == soft && g_hard_r.defined() == hard &&
                    g_hard_c.defined() == hard,
                "internal: soft gradients go with a teacher, hard gradients with hard targets");
  CLIPCID_CHECK(stats_rows.numel() == 2 * nR && stats_cols.numel() == 2 * nC, "stats have the wrong size");
  auto f = at::TensorOptions().dtype(at::kFloat);
  for (const at::Tensor* g : {&g_soft_r, &g_hard_r})
    if (g->defined())
      CLIPCID_CHECK(g->numel() == nR, "row gradients must have ", nR, " elements, got ", g->numel());
  for (const at::Tensor* g : {&g_soft_c, &g_hard_c})
    if (g->defined())
      CLIPCID_CHECK(g->numel() == nC, "column gradients must have ", nC, " elements, got ", g->numel());
  // fp32 inputs: accumulate straight into the returned gradients (no extra copy)
  at::Tensor gq = at::zeros({R, q_s.size(1)}, f), gk = at::zeros({C, k_s.size(1)}, f);
  if (R > 0 && C > 0 && (rows || cols)) {
    auto fl = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat).contiguous() : t; };
    const at::Tensor gsr = fl(g_soft_r), gsc = fl(g_soft_c), ghr = fl(g_hard_r), ghc = fl(g_hard_c);
    // a = g_soft + g_hard on p_s, b = g_soft on p_t, h = g_hard on the one-hot
    const at::Tensor ar = soft && hard ? gsr + ghr : (soft ? gsr : ghr);
    const at::Tensor ac = soft && hard ? gsc + ghc : (soft ? gsc : ghc);
    const at::Tensor sr = stats_rows.to(at::kFloat).contiguous(), sc = stats_cols.to(at::kFloat).contiguous();
    auto p = [](const at::Tensor& t) -> const float* { return t.defined() ? t.data_ptr<float>() : nullptr; };
    Coef k;
    k.ar = p(ar);
    k.br = p(gsr);
    k.hr = p(ghr);
    k.lsr = p(sr);
    k.ltr = p(sr) + nR;
    k.ac = p(ac);
    k.bc = p(gsc);
    k.hc = p(ghc);
    k.lsc = p(sc);
    k.ltc = p(sc) + nC;
    const int64_t br = pick(block_rows, kBlockRows), bc = pick(block_cols, kBlockCols);
    const Chunks ch(R, br);
    std::vector<at::Tensor> gks{gk};
    for (int64_t c = 1; c < ch.nch; ++c) gks.push_back(at::zeros({C, k_s.size(1)}, f));
    if (soft && hard)
      bwd_dispatch_dir<true, true>(rows, cols, in, R, C, off, br, bc, k, gq, gks, ch);
    else if (soft)
      bwd_dispatch_dir<true, false>(rows, cols, in, R, C, off, br, bc, k, gq, gks, ch);
    else
      bwd_dispatch_dir<false, true>(rows, cols, in, R, C, off, br, bc, k, gq, gks, ch);
    for (int64_t c = 1; c < ch.nch; ++c) gk.add_(gks[c]);
  }
  // dbeta = sum G o (q k^T) = sum_i q_i . (G k)_i, from the unscaled accumulators
  at::Tensor gscale = at::dot(in.qs.reshape(-1), gq.reshape(-1)).reshape(scale_s.sizes()).to(scale_s.scalar_type());
  gq.mul_(in.beta);
  gk.mul_(in.beta);
  return {gq.to(q_s.scalar_type()), gk.to(k_s.scalar_type()), gscale};
}

// ----------------------------------------------------------------------------------------------
// Ops

void check_kind(std::string_view kind) {
  CLIPCID_CHECK(kind == "ce" || kind == "kl", "kind must be 'ce' or 'kl', got ", kind);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relational_rows_fwd(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& scale_s, const std::optional<at::Tensor>& q_t,
    const std::optional<at::Tensor>& k_t, const std::optional<at::Tensor>& scale_t, std::string_view kind,
    int64_t target_offset, bool rows, bool cols, int64_t block_rows, int64_t block_cols) {
  check_kind(kind);
  const bool kl = kind == "kl";
  CLIPCID_CHECK(!(kl && !q_t.has_value()), "a hard diagonal target (no teacher) needs kind='ce'");
  const bool hard = !q_t.has_value();
  Inputs in = prepare(q_s, k_s, scale_s, q_t, k_t, scale_t, target_offset, rows, cols, hard);
  FwdOut o = fwd_engine(in, q_s.size(0), k_s.size(0), kl, hard, target_offset, rows, cols, block_rows, block_cols);
  if (hard) return {o.hard_r, o.hard_c, o.stats_r, o.stats_c};
  return {o.soft_r, o.soft_c, o.stats_r, o.stats_c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relational_rows_bwd(
    const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& q_s, const at::Tensor& k_s,
    const at::Tensor& scale_s, const std::optional<at::Tensor>& q_t, const std::optional<at::Tensor>& k_t,
    const std::optional<at::Tensor>& scale_t, const at::Tensor& stats_rows, const at::Tensor& stats_cols,
    int64_t target_offset, bool rows, bool cols, int64_t block_rows, int64_t block_cols) {
  const bool hard = !q_t.has_value();
  Inputs in = prepare(q_s, k_s, scale_s, q_t, k_t, scale_t, target_offset, rows, cols, hard);
  const at::Tensor none;
  if (hard)
    return bwd_engine(in, q_s, k_s, scale_s, none, none, grad_rows, grad_cols, stats_rows, stats_cols,
                      target_offset, rows, cols, true, block_rows, block_cols);
  return bwd_engine(in, q_s, k_s, scale_s, grad_rows, grad_cols, none, none, stats_rows, stats_cols, target_offset,
                    rows, cols, false, block_rows, block_cols);
}

// Distill: the hard diagonal loss AND the soft loss (ce or kl) against the teacher, rows and columns, from the
// same student tiles. Returns (hard_rows, hard_cols, soft_rows, soft_cols, stats_rows, stats_cols).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relational_distill_fwd(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& scale_s, const at::Tensor& q_t,
    const at::Tensor& k_t, const at::Tensor& scale_t, std::string_view kind, int64_t block_rows, int64_t block_cols) {
  check_kind(kind);
  Inputs in = prepare(q_s, k_s, scale_s, q_t, k_t, scale_t, 0, true, true, true);
  FwdOut o = fwd_engine(in, q_s.size(0), k_s.size(0), kind == "kl", true, 0, true, true, block_rows, block_cols);
  return {o.hard_r, o.hard_c, o.soft_r, o.soft_c, o.stats_r, o.stats_c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relational_distill_bwd(
    const at::Tensor& g_hard_rows, const at::Tensor& g_hard_cols, const at::Tensor& g_soft_rows,
    const at::Tensor& g_soft_cols, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& scale_s,
    const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& scale_t, const at::Tensor& stats_rows,
    const at::Tensor& stats_cols, int64_t block_rows, int64_t block_cols) {
  Inputs in = prepare(q_s, k_s, scale_s, q_t, k_t, scale_t, 0, true, true, true);
  return bwd_engine(in, q_s, k_s, scale_s, g_soft_rows, g_soft_cols, g_hard_rows, g_hard_cols, stats_rows,
                    stats_cols, 0, true, true, true, block_rows, block_cols);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, m) {
  m.def(
      "relational_rows_fwd(Tensor q_s, Tensor k_s, Tensor scale_s, Tensor? q_t, Tensor? k_t, Tensor? scale_t, "
      "str kind, int target_offset, bool rows, bool cols, int block_rows=0, int block_cols=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "relational_rows_bwd(Tensor grad_rows, Tensor grad_cols, Tensor q_s, Tensor k_s, Tensor scale_s, "
      "Tensor? q_t, Tensor? k_t, Tensor? scale_t, Tensor stats_rows, Tensor stats_cols, int target_offset, "
      "bool rows, bool cols, int block_rows=0, int block_cols=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "relational_distill_fwd(Tensor q_s, Tensor k_s, Tensor scale_s, Tensor q_t, Tensor k_t, Tensor scale_t, "
      "str kind, int block_rows=0, int block_cols=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "relational_distill_bwd(Tensor g_hard_rows, Tensor g_hard_cols, Tensor g_soft_rows, Tensor g_soft_cols, "
      "Tensor q_s, Tensor k_s, Tensor scale_s, Tensor q_t, Tensor k_t, Tensor scale_t, Tensor stats_rows, "
      "Tensor stats_cols, int block_rows=0, int block_cols=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clipcid_fast_C, CPU, m) {
  m.impl("relational_rows_fwd", &relational_rows_fwd);
  m.impl("relational_rows_bwd", &relational_rows_bwd);
  m.impl("relational_distill_fwd", &relational_distill_fwd);
  m.impl("relational_distill_bwd", &relational_distill_bwd);
}
