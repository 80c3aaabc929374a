// CPU kernels (OpenMP). Determinism: work is cut into fixed-size blocks independent of the thread
// count; each block reduces into its own slot with a fixed lane tree and the slots are summed in
// order, so results are bit-identical run to run and for any number of threads. Blocks are handed
// out dynamically: on a shared machine a descheduled thread does not hold the others up.
// ISA: the hot loops are compiled several times (target_clones) and picked at load time by the CPU's
// features — never -march=native, so one wheel runs everywhere.
#include "kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../shortllm_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SHORTLLM_NO_CLONES)
#define SLLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SLLM_CLONES
#endif

// Everything the cloned entry points call is force-inlined so its loops are compiled (and
// vectorised) for each clone's ISA rather than once for the baseline.
#define SLLM_INLINE inline __attribute__((always_inline))

namespace sllm {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kRowBlock = 32;           // rows per cosine block (a slot of the reduction tree)
constexpr int64_t kElemBlock = int64_t(1) << 16;  // elements per Taylor block

// Fixed pairwise tree over the lanes.
SLLM_INLINE double lane_sum(double* a) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  return a[0];
}

// Lane-parallel arithmetic with GCC/Clang vector extensions: 16 lanes whatever the ISA (the compiler
// maps them to one zmm, two ymm or four xmm registers per clone), so every clone computes the same
// lane sums — bit-identical across ISAs as well as across threads.
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef double vd __attribute__((vector_size(8 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

SLLM_INLINE vf as_vf(vu u) {
  vf f;
  memcpy(&f, &u, sizeof f);
  return f;
}

SLLM_INLINE vu as_vu(vf f) {
  vu u;
  memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float, lane-parallel and exact (the same values as f16_to_f32 of shortllm_math.h,
// which the tests compare through the scalar tail): exponent+mantissa moved into float position and
// rebiased by a multiply by 2^112 (half subnormals become float normals), inf/NaN patched, sign or'ed.
SLLM_INLINE vf f16_to_f32_v(vh h) {
  const vu w = __builtin_convertvector(h, vu);
  const vu em = (w & 0x7fffu) << 13;
  const vf scaled = as_vf(em) * bits_f32(0x77800000u);  // 2^112
  const vu special = (vu)((w & 0x7c00u) == 0x7c00u);     // inf / NaN lanes
  const vu mag = (as_vu(scaled) & ~special) | ((em | 0x7f800000u) & special);
  return as_vf(((w & 0x8000u) << 16) | mag);
}

template <int DT>
SLLM_INLINE vf vload(const void* p, int64_t i) {
  vf f;
  if constexpr (DT == kF32) {
    memcpy(&f, static_cast<const float*>(p) + i, sizeof f);
  } else if constexpr (DT == kBF16) {
    vh h;
    memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
    memcpy(&f, &u, sizeof f);
  } else {
    vh h;
    memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
    f = f16_to_f32_v(h);
  }
  return f;
}

SLLM_INLINE vd widen(vf v) { return __builtin_convertvector(v, vd); }

SLLM_INLINE vf vabs(vf v) {
  vu u;
  memcpy(&u, &v, sizeof u);
  u &= 0x7fffffffu;
  memcpy(&v, &u, sizeof v);
  return v;
}

SLLM_INLINE void spill(vd v, double* out) { memcpy(out, &v, sizeof v); }

// Row sums x.y, |x|^2, |y|^2 with exact products. float32 rows: widened to double (a product of
// two floats is exact in double). bf16/fp16 rows: the product of two 8- or 11-bit mantissas is exact
// in float32, so products and short runs of sums are float32 (twice the SIMD width) and every
// kFlush steps the lanes are flushed into double lanes.
constexpr int kFlush = 8;  // float32 steps per lane before flushing into the double lanes

template <int DT>
SLLM_INLINE void row_tail(const void* x, const void* y, int64_t i, int64_t d, double* dot, double* xx, double* yy) {
  for (int j = 0; i + j < d; ++j) {
    const double a = load<DT>(x, i + j), b = load<DT>(y, i + j);
    dot[j] += a * b;
    xx[j] += a * a;
    yy[j] += b * b;
  }
}

template <int DT>
SLLM_INLINE void row_sums_f64(const void* x, const void* y, int64_t d, double out[3]) {
  vd dot = {0}, xx = {0}, yy = {0};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    const vd a = widen(vload<DT>(x, i)), b = widen(vload<DT>(y, i));
    dot += a * b;
    xx += a * a;
    yy += b * b;
  }
  double ld[kLanes], lx[kLanes], ly[kLanes];
  spill(dot, ld);
  spill(xx, lx);
  spill(yy, ly);
  row_tail<DT>(x, y, i, d, ld, lx, ly);
  out[0] = lane_sum(ld);
  out[1] = lane_sum(lx);
  out[2] = lane_sum(ly);
}

template <int DT>
SLLM_INLINE void row_sums_mixed(const void* x, const void* y, int64_t d, double out[3]) {
  vd dot = {0}, xx = {0}, yy = {0};
  int64_t i = 0;
  while (i + kLanes <= d) {
    vf fd = {0}, fx = {0}, fy = {0};
    const int64_t steps = std::min<int64_t>(kFlush, (d - i) / kLanes);
    for (int64_t k = 0; k < steps; ++k, i += kLanes) {
      const vf a = vload<DT>(x, i), b = vload<DT>(y, i);
      fd += a * b;
      fx += a * a;
      fy += b * b;
    }
    dot += widen(fd);
    xx += widen(fx);
    yy += widen(fy);
  }
  double ld[kLanes], lx[kLanes], ly[kLanes];
  spill(dot, ld);
  spill(xx, lx);
  spill(yy, ly);
  row_tail<DT>(x, y, i, d, ld, lx, ly);
  out[0] = lane_sum(ld);
  out[1] = lane_sum(lx);
  out[2] = lane_sum(ly);
}

// bf16 shares float32's exponent range, so float32 squares can overflow (|v| > 1.8e19) or underflow
// (|v| < 1e-19); such rows (detected from the sums) are redone in double. fp16 squares always fit.
constexpr double kTiny = 7.888609052210118e-31;  // 2^-100

template <int DT>
SLLM_INLINE void row_sums(const void* x, const void* y, int64_t d, double out[3]) {
  if (DT == kF32) return row_sums_f64<DT>(x, y, d, out);
  row_sums_mixed<DT>(x, y, d, out);
  if (DT == kBF16) {
    // (zero rows take the slow path too: rare, and an all-underflowed row looks like a zero row)
    const bool bad = !(out[1] >= kTiny && out[2] >= kTiny && out[1] <= 1e300 && out[2] <= 1e300);
    if (bad) row_sums_f64<DT>(x, y, d, out);
  }
}

template <int DT>
SLLM_INLINE void cos_block(const char* x, int64_t sx, const char* y, int64_t sy, int64_t r0, int64_t r1, int64_t d,
                      const uint8_t* mask, double out[3]) {
  const int es = dtype_size(DT);
  double c = 0, a = 0, n = 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (mask && !mask[r]) continue;
    double s[3];
    row_sums<DT>(x + r * sx * es, y + r * sy * es, d, s);
    const CosRow cr = cos_from_sums(s[0], s[1], s[2]);
    c += cr.cos;
    a += cr.ang;
    n += 1.0;
  }
  out[0] = c;
  out[1] = a;
  out[2] = n;
}

#define SLLM_COS_VARIANT(NAME, DT)                                                                       \
  SLLM_CLONES void NAME(const char* x, int64_t sx, const char* y, int64_t sy, int64_t r0, int64_t r1,  \
                        int64_t d, const uint8_t* mask, double out[3]) {                                \
    cos_block<DT>(x, sx, y, sy, r0, r1, d, mask, out);                                                  \
  }
SLLM_COS_VARIANT(cos_block_f32, kF32)
SLLM_COS_VARIANT(cos_block_bf16, kBF16)
SLLM_COS_VARIANT(cos_block_f16, kF16)

// Products in float32 (operands widened first, never multiplied in half precision); each lane sums
// kFlush products in float32, then flushes into double lanes (a short float32 run keeps the SIMD
// width; the long sums, which need it, are double).
template <int DT, bool HAS_G>
SLLM_INLINE void taylor_block(const void* w, const void* g, int64_t n, double out[3]) {
  vd s = {0}, sa = {0}, m = {0};
  int64_t i = 0;
  while (i + kLanes <= n) {
    vf fs = {0}, fsa = {0}, fm = {0};
    const int64_t steps = std::min<int64_t>(kFlush, (n - i) / kLanes);
    for (int64_t k = 0; k < steps; ++k, i += kLanes) {
      const vf wv = vload<DT>(w, i);
      fm += vabs(wv);
      if (HAS_G) {
        const vf p = wv * vload<DT>(g, i);
        fs += p;
        fsa += vabs(p);
      }
    }
    s += widen(fs);
    sa += widen(fsa);
    m += widen(fm);
  }
  double ls[kLanes], lsa[kLanes], lm[kLanes];
  spill(s, ls);
  spill(sa, lsa);
  spill(m, lm);
  for (int j = 0; i + j < n; ++j) {
    const float wv = load<DT>(w, i + j);
    if (HAS_G) {
      const TaylorTerms t = taylor_terms(wv, load<DT>(g, i + j));
      ls[j] += t.wg;
      lsa[j] += t.abs_wg;
      lm[j] += t.abs_w;
    } else {
      lm[j] += static_cast<double>(fabsf(wv));
    }
  }
  out[0] = lane_sum(ls);
  out[1] = lane_sum(lsa);
  out[2] = lane_sum(lm);
}

#define SLLM_TAYLOR_VARIANT(NAME, DT)                                                       \
  SLLM_CLONES void NAME(const char* w, const char* g, int64_t n, double out[3]) {          \
    if (g) taylor_block<DT, true>(w, g, n, out); else taylor_block<DT, false>(w, g, n, out); \
  }
SLLM_TAYLOR_VARIANT(taylor_block_f32, kF32)
SLLM_TAYLOR_VARIANT(taylor_block_bf16, kBF16)
SLLM_TAYLOR_VARIANT(taylor_block_f16, kF16)

int threads_for(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

void sum_slots(const std::vector<double>& slots, int64_t nslots, double* acc) {
  double t[3] = {0, 0, 0};
  for (int64_t b = 0; b < nslots; ++b)
    for (int k = 0; k < 3; ++k) t[k] += slots[3 * b + k];
  for (int k = 0; k < 3; ++k) acc[k] += t[k];
}

}  // namespace

void cosine_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
                  const uint8_t* mask, double* acc, int nthreads) {
  if (n <= 0) return;
  auto fn = dtype == kF32 ? cos_block_f32 : (dtype == kBF16 ? cos_block_bf16 : cos_block_f16);
  const int64_t nb = (n + kRowBlock - 1) / kRowBlock;
  std::vector<double> slots(3 * nb);
  const char* xc = static_cast<const char*>(x);
  const char* yc = static_cast<const char*>(y);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(nthreads)) if (nb > 1)
  for (int64_t b = 0; b < nb; ++b)
    fn(xc, sx, yc, sy, b * kRowBlock, std::min(n, (b + 1) * kRowBlock), d, mask, &slots[3 * b]);
  sum_slots(slots, nb, acc);
}

void taylor_stats(const void* w, const void* g, int64_t n, int dtype, double* acc, int nthreads) {
  if (n <= 0) return;
  auto fn = dtype == kF32 ? taylor_block_f32 : (dtype == kBF16 ? taylor_block_bf16 : taylor_block_f16);
  const int64_t nb = (n + kElemBlock - 1) / kElemBlock;
  std::vector<double> slots(3 * nb);
  const int es = dtype_size(dtype);
  const char* wc = static_cast<const char*>(w);
  const char* gc = static_cast<const char*>(g);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(nthreads)) if (nb > 1)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t off = b * kElemBlock;
    fn(wc + off * es, gc ? gc + off * es : nullptr, std::min(kElemBlock, n - off), &slots[3 * b]);
  }
  sum_slots(slots, nb, acc);
}

void lse_update(float* logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, const int64_t* targets,
                float scale, float softcap, float* m, float* s, float* tgt, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads)) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    float* z = logits + r * ld;
    // pass 1: transform in place (the chunk buffer is scratch) and take the chunk max
    float cm = -INFINITY;
    for (int64_t j = 0; j < vc; ++j) {
      z[j] = cap_logit(z[j], scale, softcap);
      cm = std::max(cm, z[j]);
    }
    // pass 2: sum of exp relative to the chunk max, in a fixed order
    double cs = 0.0;
    for (int64_t j = 0; j < vc; ++j) cs += static_cast<double>(expf(z[j] - cm));
    lse_merge(m[r], s[r], cm, static_cast<float>(cs));
    const int64_t t = targets[r] - v0;
    if (t >= 0 && t < vc) tgt[r] = z[t];
  }
}

void nll_finalize_rows(const float* m, const float* s, const float* tgt, const int64_t* targets, int64_t ignore_index,
                       int64_t n, float* nll, float* lse) {
  for (int64_t r = 0; r < n; ++r) nll_finalize(m[r], s[r], tgt[r], targets[r] != ignore_index, nll + r, lse + r);
}

}  // namespace sllm
