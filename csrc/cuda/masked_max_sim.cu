// K3 on the GPU: per-cluster masked max cosine (SemDeDup) and nearest centroid, never forming c×c.
// One thread block per column block of BN columns of Y; it loops over the row blocks of A (for the masked op
// only rows before the block's last column), staging BM×BK and BN×BK tiles in shared memory (widened to fp32),
// each thread accumulating a TM×TN micro-tile of S = A·Yᵀ in fp32. After each row block the thread folds its
// micro-tile (scaled by the rows' inverse norms, masked to row < column for the dedup op) into a running
// (max, argmax) per column; a shared-memory pass merges the 16 row groups at the end (ties → smallest row).
// Offsets are int64 (row × D passes 2^31 for 10M × 512). No torch header: compiles in seconds with nvcc.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>


namespace {

constexpr int kBM = 64;  // rows of A per tile
constexpr int kBN = 64;  // columns (rows of Y) per thread block
constexpr int kBK = 16;  // slice of D per shared-memory stage
constexpr int kTM = 4;   // micro-tile rows per thread
constexpr int kTN = 4;   // micro-tile columns per thread
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kGroups = kBM / kTM;                   // 16 row groups merged at the end

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// inv[r] = 1 / ||x_r|| (fp32 storage, fp32 sums): one warp per row.
template <typename T>
__global__ void inv_norm_kernel(const T* __restrict__ x, float* __restrict__ inv, int64_t rows, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * D;
  float ss = 0.0f;
  for (int64_t k = lane; k < D; k += 32) {
    const float v = to_f32(xr[k]);
    ss = fmaf(v, v, ss);
  }
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_down_sync(0xffffffffu, ss, off);
  if (lane == 0) inv[row] = rsqrtf(ss);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    max_sim_kernel(const T* __restrict__ a, const T* __restrict__ y, const float* __restrict__ inv_a,
                   const float* __restrict__ inv_y, int64_t m_rows, int64_t n, int64_t D, int masked,
                   float* __restrict__ out_m, int64_t* __restrict__ out_idx) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Ys[kBK][kBN + 4];
  __shared__ float red_m[kGroups][kBN];
  __shared__ int64_t red_i[kGroups][kBN];

  const int tid = threadIdx.x;
  const int tx = tid % (kBN / kTN);  // column group: columns tx + 16 q
  const int ty = tid / (kBN / kTN);  // row group: rows ty + 16 p
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBN;

  float best[kTN];
  int64_t bidx[kTN];
#pragma unroll
  for (int q = 0; q < kTN; ++q) {
    best[q] = -INFINITY;
    bidx[q] = -1;
  }
  const int64_t j_last = (j0 + kBN < n ? j0 + kBN : n) - 1;
  const int64_t r_end = masked ? (j_last < m_rows ? j_last : m_rows) : m_rows;

  for (int64_t r0 = 0; r0 < r_end; r0 += kBM) {
    float acc[kTM][kTN];
#pragma unroll
    for (int p = 0; p < kTM; ++p)
#pragma unroll
      for (int q = 0; q < kTN; ++q) acc[p][q] = 0.0f;

    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      // 64 × 16 elements of each operand, 4 per thread, consecutive threads along D (coalesced).
#pragma unroll
      for (int l = 0; l < (kBM * kBK) / kThreads; ++l) {
        const int e = tid + l * kThreads;
        const int row = e / kBK, kk = e % kBK;
        const int64_t gk = k0 + kk;
        const int64_t ga = r0 + row, gy = j0 + row;
        As[kk][row] = (ga < m_rows && gk < D) ? to_f32(a[ga * D + gk]) : 0.0f;
        Ys[kk][row] = (gy < n && gk < D) ? to_f32(y[gy * D + gk]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        float av[kTM], yv[kTN];
#pragma unroll
        for (int p = 0; p < kTM; ++p) av[p] = As[kk][ty + kGroups * p];
#pragma unroll
        for (int q = 0; q < kTN; ++q) yv[q] = Ys[kk][tx + (kBN / kTN) * q];
#pragma unroll
        for (int p = 0; p < kTM; ++p)
#pragma unroll
          for (int q = 0; q < kTN; ++q) acc[p][q] = fmaf(av[p], yv[q], acc[p][q]);
      }
      __syncthreads();
    }
    // Fold: rows in increasing order with a strict >, so the smallest row wins a tie inside the thread.
#pragma unroll
    for (int p = 0; p < kTM; ++p) {
      const int64_t gi = r0 + ty + kGroups * p;
      if (gi >= r_end) continue;
      const float s = inv_a[gi];
#pragma unroll
      for (int q = 0; q < kTN; ++q) {
        const int64_t gj = j0 + tx + (kBN / kTN) * q;
        const float v = acc[p][q] * s;
        if ((!masked || gi < gj) && v > best[q]) {
          best[q] = v;
          bidx[q] = gi;
        }
      }
    }
  }
  // Merge the row groups: max value, ties → smaller row index.
#pragma unroll
  for (int q = 0; q < kTN; ++q) {
    red_m[ty][tx + (kBN / kTN) * q] = best[q];
    red_i[ty][tx + (kBN / kTN) * q] = bidx[q];
  }
  __syncthreads();
  if (tid < kBN) {
    const int64_t gj = j0 + tid;
    if (gj < n) {
      float bm = -INFINITY;
      int64_t bi = -1;
      for (int g = 0; g < kGroups; ++g) {
        const float v = red_m[g][tid];
        const int64_t i = red_i[g][tid];
        if (i >= 0 && (v > bm || (v == bm && (bi < 0 || i < bi)))) {
          bm = v;
          bi = i;
        }
      }
      out_m[gj] = bi < 0 ? -INFINITY : bm * inv_y[gj];
      out_idx[gj] = bi;
    }
  }
}

template <typename T>
cudaError_t launch(const void* a, const void* y, int64_t m_rows, int64_t n, int64_t D, int masked, float* inv_a,
                   float* inv_y, float* out_m, int64_t* out_idx, cudaStream_t stream) {
  const T* at = static_cast<const T*>(a);
  const T* yt = static_cast<const T*>(y);
  constexpr int kNormThreads = 256;
  constexpr int kRowsPerNormBlock = kNormThreads / 32;
  inv_norm_kernel<T><<<static_cast<unsigned int>((m_rows + kRowsPerNormBlock - 1) / kRowsPerNormBlock),
                       kNormThreads, 0, stream>>>(at, inv_a, m_rows, D);
  if (!masked)
    inv_norm_kernel<T><<<static_cast<unsigned int>((n + kRowsPerNormBlock - 1) / kRowsPerNormBlock), kNormThreads,
                         0, stream>>>(yt, inv_y, n, D);
  const float* iy = masked ? inv_a : inv_y;
  max_sim_kernel<T><<<static_cast<unsigned int>((n + kBN - 1) / kBN), kThreads, 0, stream>>>(
      at, yt, inv_a, iy, m_rows, n, D, masked, out_m, out_idx);
  return cudaGetLastError();
}

}  // namespace

// a [m_rows, D] (rows maximised over), y [n, D] (one output per row), both fp32 (is_bf16 = 0) or bf16,
// contiguous. masked = 1: a == y and only rows i < j count (SemDeDup). inv_a [m_rows] and inv_y [n] are
// scratch (inv_y unused when masked). Writes out_m [n] (fp32) and out_idx [n].
extern "C" cudaError_t clipcid_max_sim_cuda(const void* a, const void* y, int64_t m_rows, int64_t n, int64_t D,
                                            int is_bf16, int masked, float* inv_a, float* inv_y, float* out_m,
                                            int64_t* out_idx, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (is_bf16) return launch<__nv_bfloat16>(a, y, m_rows, n, D, masked, inv_a, inv_y, out_m, out_idx, stream);
  return launch<float>(a, y, m_rows, n, D, masked, inv_a, inv_y, out_m, out_idx, stream);
}
