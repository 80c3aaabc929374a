// CUDA kernels. Same math as the CPU kernels (csrc/shortllm_math.h); same determinism rule: fixed
// blocks write per-block partial sums (fixed shuffle/shared-memory trees, no atomics) and one final
// block sums the partials in order into the float64 accumulator. Nothing syncs with the host.
#include <cuda_runtime.h>

#include "../shortllm_math.h"
#include "launchers.h"

namespace {

using namespace sllm;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kRowsPerBlock = 32;           // cosine rows per block (4 per warp)
constexpr int64_t kElemsPerBlock = int64_t(1) << 16;  // Taylor elements per block

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums v[0..2] over the block in a fixed tree; thread 0 gets the result.
__device__ __forceinline__ void block_sum3(double v[3], double (*sh)[3]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int k = 0; k < 3; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0)
    for (int k = 0; k < 3; ++k) sh[warp][k] = v[k];
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) {
      double t = 0;
      for (int w = 0; w < kWarps; ++w) t += sh[w][k];
      v[k] = t;
    }
  }
}

template <int DT>
__global__ void cosine_kernel(const char* x, int64_t sx, const char* y, int64_t sy, int64_t n, int64_t d,
                              const uint8_t* mask, double* partials) {
  __shared__ double sh[kWarps][3];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int es = dtype_size(DT);
  double loc[3] = {0, 0, 0};  // per-warp sums of cos, ang, count (meaningful on lane 0)
  const int64_t r0 = blockIdx.x * kRowsPerBlock;
  for (int64_t r = r0 + warp; r < r0 + kRowsPerBlock && r < n; r += kWarps) {
    // skip, never weight by the mask: a padded row may hold NaN/Inf, and NaN * 0 = NaN.
    // (warp-uniform: a warp owns the row, so the shuffles below stay convergent)
    if (mask && !mask[r]) continue;
    const void* xr = x + r * sx * es;
    const void* yr = y + r * sy * es;
    double dot = 0, xx = 0, yy = 0;
    for (int64_t i = lane; i < d; i += 32) {
      const double a = load<DT>(xr, i), b = load<DT>(yr, i);
      dot += a * b;
      xx += a * a;
      yy += b * b;
    }
    dot = warp_sum(dot);
    xx = warp_sum(xx);
    yy = warp_sum(yy);
    if (lane == 0) {
      const CosRow cr = cos_from_sums(dot, xx, yy);
      loc[0] += cr.cos;
      loc[1] += cr.ang;
      loc[2] += 1.0;
    }
  }
  // lane 0 of each warp holds its warp's sums; other lanes hold zeros, so the block tree is exact
  block_sum3(loc, sh);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) partials[3 * blockIdx.x + k] = loc[k];
}

template <int DT, bool HAS_G>
__global__ void taylor_kernel(const char* w, const char* g, int64_t n, double* partials) {
  __shared__ double sh[kWarps][3];
  const int es = dtype_size(DT);
  const int64_t off = blockIdx.x * kElemsPerBlock;
  const int64_t cnt = min(kElemsPerBlock, n - off);
  const void* wb = w + off * es;
  const void* gb = HAS_G ? g + off * es : nullptr;
  double v[3] = {0, 0, 0};
  for (int64_t i = threadIdx.x; i < cnt; i += kThreads) {
    const float wv = load<DT>(wb, i);
    if (HAS_G) {
      const TaylorTerms t = taylor_terms(wv, load<DT>(gb, i));
      v[0] += t.wg;
      v[1] += t.abs_wg;
      v[2] += t.abs_w;
    } else {
      v[2] += static_cast<double>(fabsf(wv));
    }
  }
  block_sum3(v, sh);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) partials[3 * blockIdx.x + k] = v[k];
}

// One block: thread t sums slots t, t+256, ... in order, then the fixed block tree; acc += total.
__global__ void reduce_partials(const double* partials, int64_t nslots, double* acc) {
  __shared__ double sh[kWarps][3];
  double v[3] = {0, 0, 0};
  for (int64_t b = threadIdx.x; b < nslots; b += kThreads)
    for (int k = 0; k < 3; ++k) v[k] += partials[3 * b + k];
  block_sum3(v, sh);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) acc[k] += v[k];
}

// One warp per row of the logits chunk.
__global__ void lse_kernel(float* logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, const int64_t* targets,
                           float scale, float softcap, float* m, float* s, float* tgt) {
  const int lane = threadIdx.x & 31;
  const int64_t r = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (r >= rows) return;
  float* z = logits + r * ld;
  float lm = -INFINITY, ls = 0.0f;
  for (int64_t j = lane; j < vc; j += 32) {
    const float v = cap_logit(z[j], scale, softcap);
    z[j] = v;
    lse_merge(lm, ls, v, 1.0f);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_down_sync(0xffffffffu, lm, o);
    const float os = __shfl_down_sync(0xffffffffu, ls, o);
    lse_merge(lm, ls, om, os);
  }
  if (lane == 0) {
    float rm = m[r], rs = s[r];
    lse_merge(rm, rs, lm, ls);
    m[r] = rm;
    s[r] = rs;
    const int64_t t = targets[r] - v0;
    if (t >= 0 && t < vc) tgt[r] = z[t];
  }
}

__global__ void finalize_kernel(const float* m, const float* s, const float* tgt, const int64_t* targets,
                                int64_t ignore_index, int64_t n, float* nll, float* lse) {
  const int64_t r = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (r < n) nll_finalize(m[r], s[r], tgt[r], targets[r] != ignore_index, nll + r, lse + r);
}

cudaStream_t as_stream(uintptr_t h) { return reinterpret_cast<cudaStream_t>(h); }

}  // namespace

namespace sllm_cuda {

int64_t cosine_slots(int64_t n) { return (n + kRowsPerBlock - 1) / kRowsPerBlock; }
int64_t taylor_slots(int64_t n) { return (n + kElemsPerBlock - 1) / kElemsPerBlock; }

int cosine_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
                 const uint8_t* mask, double* acc, double* partials, uintptr_t stream) {
  if (n <= 0) return 0;
  const int64_t nb = cosine_slots(n);
  cudaStream_t st = as_stream(stream);
  auto xc = static_cast<const char*>(x);
  auto yc = static_cast<const char*>(y);
  if (dtype == kF32)
    cosine_kernel<kF32><<<nb, kThreads, 0, st>>>(xc, sx, yc, sy, n, d, mask, partials);
  else if (dtype == kBF16)
    cosine_kernel<kBF16><<<nb, kThreads, 0, st>>>(xc, sx, yc, sy, n, d, mask, partials);
  else
    cosine_kernel<kF16><<<nb, kThreads, 0, st>>>(xc, sx, yc, sy, n, d, mask, partials);
  reduce_partials<<<1, kThreads, 0, st>>>(partials, nb, acc);
  return static_cast<int>(cudaGetLastError());
}

int taylor_stats(const void* w, const void* g, int64_t n, int dtype, double* acc, double* partials, uintptr_t stream) {
  if (n <= 0) return 0;
  const int64_t nb = taylor_slots(n);
  cudaStream_t st = as_stream(stream);
  auto wc = static_cast<const char*>(w);
  auto gc = static_cast<const char*>(g);
#define SLLM_LAUNCH_TAYLOR(DT)                                                      \
  if (gc) taylor_kernel<DT, true><<<nb, kThreads, 0, st>>>(wc, gc, n, partials);    \
  else taylor_kernel<DT, false><<<nb, kThreads, 0, st>>>(wc, gc, n, partials);
  if (dtype == kF32) {
    SLLM_LAUNCH_TAYLOR(kF32)
  } else if (dtype == kBF16) {
    SLLM_LAUNCH_TAYLOR(kBF16)
  } else {
    SLLM_LAUNCH_TAYLOR(kF16)
  }
#undef SLLM_LAUNCH_TAYLOR
  reduce_partials<<<1, kThreads, 0, st>>>(partials, nb, acc);
  return static_cast<int>(cudaGetLastError());
}

int lse_update(float* logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, const int64_t* targets, float scale,
               float softcap, float* m, float* s, float* tgt, uintptr_t stream) {
  if (rows <= 0) return 0;
  const int64_t nb = (rows + kWarps - 1) / kWarps;
  lse_kernel<<<nb, kThreads, 0, as_stream(stream)>>>(logits, rows, vc, ld, v0, targets, scale, softcap, m, s, tgt);
  return static_cast<int>(cudaGetLastError());
}

int nll_finalize(const float* m, const float* s, const float* tgt, const int64_t* targets, int64_t ignore_index,
                 int64_t n, float* nll, float* lse, uintptr_t stream) {
  if (n <= 0) return 0;
  const int64_t nb = (n + kThreads - 1) / kThreads;
  finalize_kernel<<<nb, kThreads, 0, as_stream(stream)>>>(m, s, tgt, targets, ignore_index, n, nll, lse);
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
  int c = 0;
  return cudaGetDeviceCount(&c) == cudaSuccess ? c : 0;
}

}  // namespace sllm_cuda
