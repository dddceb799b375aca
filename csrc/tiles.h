// Shared tile math: plain inline functions usable from the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda). No torch header here, so .cu files can include it cheaply.
#pragma once
#include <math.h>
#include <stdint.h>

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

}  // namespace clipcid
