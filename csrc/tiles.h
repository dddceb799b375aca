// Shared tile math: plain inline functions usable from the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda). No torch header here, so .cu files can include it cheaply.
#pragma once
#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define CLIPCID_HD __host__ __device__ __forceinline__
#else
#define CLIPCID_HD inline
#endif

namespace clipcid {

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp. State (m, s) stands for log(s) + m with s = sum exp(x - m); m = -inf means
// "no element yet". Rescaling by exp(m_old - m_new) <= 1 never overflows, and each tile costs one
// exp per element plus one per tile, as in flash attention's running softmax.
struct OnlineLSE {
  float m;
  float s;
};

CLIPCID_HD OnlineLSE lse_empty() { return OnlineLSE{-INFINITY, 0.0f}; }

// Merge two partial states (associative; used across tiles, threads and ranks).
CLIPCID_HD OnlineLSE lse_merge(OnlineLSE a, OnlineLSE b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  if (a.m >= b.m) return OnlineLSE{a.m, a.s + b.s * expf(b.m - a.m)};
  return OnlineLSE{b.m, b.s + a.s * expf(a.m - b.m)};
}

// Fold a tile of n values (any n >= 0) into the state: one max pass, then one exp pass.
CLIPCID_HD OnlineLSE lse_push_tile(OnlineLSE st, const float* x, int64_t n) {
  float tmax = -INFINITY;
  for (int64_t i = 0; i < n; ++i) tmax = fmaxf(tmax, x[i]);
  if (tmax == -INFINITY) return st;
  float ts = 0.0f;
  for (int64_t i = 0; i < n; ++i) ts += expf(x[i] - tmax);
  return lse_merge(st, OnlineLSE{tmax, ts});
}

CLIPCID_HD float lse_value(OnlineLSE st) { return st.m == -INFINITY ? -INFINITY : st.m + logf(st.s); }

// ---------------------------------------------------------------------------------------------
// Combined angular margin on the target logit, psi(c) with c = cos(theta):
//   psi = cos(m1*theta + m2) - m3                  while m1*theta + m2 <= pi
//   psi = c - m3 - mm                              past it (insightface's ArcFace fallback,
//         mm = m2*sin(m2) + cos(m2) + cos(theta*),  theta* = (pi - m2)/m1; for m1 = 1 this is
//         exactly insightface's m*sin(m), and for m1 != 1 it keeps psi decreasing)
// m1 = 1, m2 = 0 is the CosFace / plain path: psi = c - m3, no arccos at all (so a zero margin is
// plain softmax exactly). On the arccos path c is clamped to [-1 + eps, 1 - eps] first: d theta/dc =
// -1/sin(theta) is unbounded at theta = 0 and pi, and fp32 dot products of unit vectors can land
// just outside [-1, 1]. The clamp's derivative is 0 outside the interval, as torch.clamp's.
constexpr float kAcosEps = 1e-6f;
constexpr float kPi = 3.14159265358979323846f;

struct Margin {
  float m1, m2, m3;
  float fallback_shift;  // mm above
  bool plain;
};

inline Margin make_margin(double m1, double m2, double m3) {
  const double pi = 3.14159265358979323846;
  Margin p;
  p.m1 = static_cast<float>(m1);
  p.m2 = static_cast<float>(m2);
  p.m3 = static_cast<float>(m3);
  p.plain = (m1 == 1.0 && m2 == 0.0);
  p.fallback_shift = static_cast<float>(m2 * sin(m2) + cos(m2) + cos((pi - m2) / m1));
  return p;
}

// Returns psi(c) and writes d psi / d c.
CLIPCID_HD float margin_psi(float c, const Margin& p, float* dpsi_dc) {
  if (p.plain) {
    *dpsi_dc = 1.0f;
    return c - p.m3;
  }
  const float lo = -1.0f + kAcosEps, hi = 1.0f - kAcosEps;
  const bool inside = (c >= lo) && (c <= hi);
  const float cc = fminf(fmaxf(c, lo), hi);
  const float theta = acosf(cc);
  const float t = p.m1 * theta + p.m2;
  if (t > kPi) {
    *dpsi_dc = 1.0f;
    return c - p.m3 - p.fallback_shift;
  }
  const float sin_theta = sqrtf(fmaxf(1.0f - cc * cc, 0.0f));
  *dpsi_dc = inside ? p.m1 * sinf(t) / sin_theta : 0.0f;
  return cosf(t) - p.m3;
}

// ---------------------------------------------------------------------------------------------
// exp for the tile loops: Cephes' expf (range reduction x = n ln2 + r with ln2 split in two, degree-5
// polynomial for e^r on |r| <= ln2/2), about 1 ulp. Branch-free plain arithmetic, so `#pragma omp
// simd` loops vectorise it (libm's expf does not vectorise without -ffast-math). Inputs below about
// -87.7 (n = -127, e^x under the smallest normal float) give exactly 0, so -inf -> 0 as the online
// softmax needs; above 88.7 it saturates.
// NaN is not propagated (the kernels only see finite logits minus finite maxima).
CLIPCID_HD float fast_expf(float x) {
  x = x < -88.0f ? -88.0f : x;
  x = x > 88.72283f ? 88.72283f : x;
  // n = round(x / ln2) with the 1.5 * 2^23 trick (exact for |x / ln2| < 2^22, no call to rintf)
  const float shifter = 12582912.0f;
  const float nf = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  // 2^n through the exponent bits; n = -127 (x < -87.7) gives the bit pattern of 0.
  const int32_t n = static_cast<int32_t>(nf);
  union {
    int32_t i;
    float f;
  } two_n;
  two_n.i = (n + 127) << 23;
  return er * two_n.f;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
// fast_expf on 8 lanes (AVX2 + FMA intrinsics), the same Cephes polynomial and the same results up to FMA
// rounding. GCC does not vectorise fast_expf inside `omp simd` loops under the default -ftrapping-math (its
// clamps stay branches), so the CPU tile loops call this explicitly. Clamps: x <= -88 (and -inf, NaN) -> 0,
// x >= 88.72 saturates (finite).
#define CLIPCID_HAVE_EXP8 1
inline __m256 fast_exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.0f));  // NaN and -inf -> -88 (max_ps returns the 2nd operand on NaN)
  x = _mm256_min_ps(x, _mm256_set1_ps(88.72283f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 nf = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter), shifter);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(nf, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 er = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_cvttps_epi32(nf);  // nf is integral
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(er, two_n);
}

// Sum of the 8 lanes.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace clipcid
