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
    // skip, never weight by the mask: a padded row may hold NaN/Inf, and NaN * 0 = NaN.
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

// ---- Fused spans: one y against k inputs x_0..x_{k-1} (cosine_span_stats) ----
// Per pair the arithmetic is exactly row_sums<DT>'s: the same 16 lanes, kFlush runs, scalar tail, lane
// tree and bf16 range fallback, so every pair's sums, row cosines, block slots and totals are
// bit-identical to cosine_stats(x_i, y). What changes is the schedule: a row of y is read from memory
// once (a bf16/fp16 row is widened once into a float32 row buffer, exactly) and stays in L1 while the
// x rows stream past it, kSpanGroup inputs per sweep, |y|^2 summed during the first sweep only.
// Accumulators are kept as 8-lane halves (lane j of the 16 is lane j % 8 of half j / 8: the same
// additions) so they live in registers: a 16-lane double vector would be kept in memory, and a sweep
// over several inputs would then wait on store-to-load round trips instead of on memory.
typedef float vf8 __attribute__((vector_size(4 * kLanes / 2)));
typedef double vd8 __attribute__((vector_size(8 * kLanes / 2)));

constexpr int kSpanGroup = 4;  // x rows per sweep over a y row (v4: 16-22 of the 32 zmm registers)

SLLM_INLINE vd8 widen_half(vf v, int half) {
  vf8 h;
  memcpy(&h, reinterpret_cast<const char*>(&v) + half * sizeof h, sizeof h);
  return __builtin_convertvector(h, vd8);
}

// elements i .. i+15 of a row as two widened halves (float32 rows: two direct 8-float loads)
template <int DT>
SLLM_INLINE void load_halves(const void* p, int64_t i, vd8& lo, vd8& hi) {
  if constexpr (DT == kF32) {
    const vd w = widen(vload<DT>(p, i));
    memcpy(&lo, &w, sizeof lo);
    memcpy(&hi, reinterpret_cast<const char*>(&w) + sizeof lo, sizeof hi);
  } else {
    const vf v = vload<DT>(p, i);
    lo = widen_half(v, 0);
    hi = widen_half(v, 1);
  }
}

SLLM_INLINE void spill_halves(const vd8 (&v)[2], double* out) {
  memcpy(out, &v[0], sizeof v[0]);
  memcpy(out + kLanes / 2, &v[1], sizeof v[1]);
}

// The end of a group row: the vector halves spilled into double lanes, the last d % kLanes elements added
// in double, lanes summed in a fixed order (shared by the fp32 and the bf16/fp16 paths below).
template <int DT, int G, bool WITH_Y>
SLLM_INLINE void finish_group(const vd8 (&ad)[G][2], const vd8 (&ax)[G][2], const vd8 (&ay)[2],
                              const void* const* xr, const float* y, int64_t i, int64_t d, double* dot, double* xx,
                              double* yy) {
  for (int g = 0; g < G; ++g) {
    double ld[kLanes], lx[kLanes];
    spill_halves(ad[g], ld);
    spill_halves(ax[g], lx);
    for (int j = 0; i + j < d; ++j) {
      const double a = load<DT>(xr[g], i + j), b = y[i + j];
      ld[j] += a * b;
      lx[j] += a * a;
    }
    dot[g] = lane_sum(ld);
    xx[g] = lane_sum(lx);
  }
  if (WITH_Y) {
    double ly[kLanes];
    spill_halves(ay, ly);
    for (int j = 0; i + j < d; ++j) {
      const double b = y[i + j];
      ly[j] += b * b;
    }
    *yy = lane_sum(ly);
  }
}

// float32 inputs (and the bf16 range fallback): double lanes, as row_sums_f64. y: float32 row.
template <int DT, int G, bool WITH_Y>
SLLM_INLINE void group_sums_f64(const void* const* xr, const float* y, int64_t d, double* dot, double* xx,
                                double* yy) {
  vd8 ad[G][2] = {}, ax[G][2] = {}, ay[2] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    vd8 b0, b1;
    load_halves<kF32>(y, i, b0, b1);
    if (WITH_Y) {
      ay[0] += b0 * b0;
      ay[1] += b1 * b1;
    }
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      vd8 a0, a1;
      load_halves<DT>(xr[g], i, a0, a1);
      ad[g][0] += a0 * b0;
      ad[g][1] += a1 * b1;
      ax[g][0] += a0 * a0;
      ax[g][1] += a1 * a1;
    }
  }
  finish_group<DT, G, WITH_Y>(ad, ax, ay, xr, y, i, d, dot, xx, yy);
}

// bf16/fp16 inputs: exact float32 products in runs of kFlush, flushed into double lanes, as row_sums_mixed.
template <int DT, int G, bool WITH_Y>
SLLM_INLINE void group_sums_mixed(const void* const* xr, const float* y, int64_t d, double* dot, double* xx,
                                  double* yy) {
  vd8 ad[G][2] = {}, ax[G][2] = {}, ay[2] = {};
  int64_t i = 0;
  while (i + kLanes <= d) {
    vf fd[G] = {}, fx[G] = {}, fy = {0};
    const int64_t steps = std::min<int64_t>(kFlush, (d - i) / kLanes);
    for (int64_t s = 0; s < steps; ++s, i += kLanes) {
      const vf b = vload<kF32>(y, i);
      if (WITH_Y) fy += b * b;
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const vf a = vload<DT>(xr[g], i);
        fd[g] += a * b;
        fx[g] += a * a;
      }
    }
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g)
      for (int h = 0; h < 2; ++h) {
        ad[g][h] += widen_half(fd[g], h);
        ax[g][h] += widen_half(fx[g], h);
      }
    if (WITH_Y)
      for (int h = 0; h < 2; ++h) ay[h] += widen_half(fy, h);
  }
  finish_group<DT, G, WITH_Y>(ad, ax, ay, xr, y, i, d, dot, xx, yy);
}

template <int DT, int G, bool WITH_Y>
SLLM_INLINE void group_sums(const void* const* xr, const float* y, int64_t d, double* dot, double* xx, double* yy) {
  if constexpr (DT == kF32)
    group_sums_f64<DT, G, WITH_Y>(xr, y, d, dot, xx, yy);
  else
    group_sums_mixed<DT, G, WITH_Y>(xr, y, d, dot, xx, yy);
}

// One sweep of g <= kSpanGroup inputs (a runtime count: the last group of k may be short).
template <int DT, bool WITH_Y>
SLLM_INLINE void sweep(int g, const void* const* xr, const float* y, int64_t d, double* dot, double* xx, double* yy) {
  switch (g) {
    case 1: return group_sums<DT, 1, WITH_Y>(xr, y, d, dot, xx, yy);
    case 2: return group_sums<DT, 2, WITH_Y>(xr, y, d, dot, xx, yy);
    case 3: return group_sums<DT, 3, WITH_Y>(xr, y, d, dot, xx, yy);
    default: return group_sums<DT, kSpanGroup, WITH_Y>(xr, y, d, dot, xx, yy);
  }
}
static_assert(kSpanGroup == 4, "sweep() dispatches group sizes 1..4");

struct SpanArgs {
  const void* const* xs;  // k row-major inputs
  const int64_t* sxs;     // their row strides (elements)
  int k;
  const char* y;
  int64_t sy;
  int64_t d;
  const uint8_t* mask;
};

// Rows r0..r1 of every pair into out[3 * i + 0..2] (i < k <= kMaxSpanInputs), in cos_block's order.
template <int DT>
SLLM_INLINE void span_block(const SpanArgs& a, int64_t r0, int64_t r1, double* out) {
  const int es = dtype_size(DT);
  const int64_t d = a.d;
  const int k = a.k;
  double c[kMaxSpanInputs] = {0}, ang[kMaxSpanInputs] = {0}, cnt = 0;
  double dot[kMaxSpanInputs], xx[kMaxSpanInputs];
  const void* xr[kMaxSpanInputs];
  std::vector<float> buf(DT == kF32 ? 0 : d);
  for (int64_t r = r0; r < r1; ++r) {
    // skip, never weight by the mask: a padded row may hold NaN/Inf, and NaN * 0 = NaN.
    if (a.mask && !a.mask[r]) continue;
    const void* yr = a.y + r * a.sy * es;
    const float* yf;
    if constexpr (DT == kF32) {
      yf = static_cast<const float*>(yr);
    } else {
      int64_t i = 0;
      for (; i + kLanes <= d; i += kLanes) {
        const vf v = vload<DT>(yr, i);
        memcpy(buf.data() + i, &v, sizeof v);
      }
      for (; i < d; ++i) buf[i] = load<DT>(yr, i);
      yf = buf.data();
    }
    for (int i = 0; i < k; ++i) xr[i] = static_cast<const char*>(a.xs[i]) + r * a.sxs[i] * es;
    double yy = 0;
    for (int g0 = 0; g0 < k; g0 += kSpanGroup) {
      const int g = std::min(kSpanGroup, k - g0);
      if (g0 == 0)
        sweep<DT, true>(g, xr, yf, d, dot, xx, &yy);
      else
        sweep<DT, false>(g, xr + g0, yf, d, dot + g0, xx + g0, nullptr);
    }
    double yy64 = 0;
    bool have64 = false;
    for (int i = 0; i < k; ++i) {
      double y2 = yy;
      // row_sums' bf16 range fallback, pair by pair: redo the pair (and |y|^2) in double lanes
      if (DT == kBF16 && !(xx[i] >= kTiny && yy >= kTiny && xx[i] <= 1e300 && yy <= 1e300)) {
        if (!have64) {
          group_sums_f64<DT, 1, true>(xr + i, yf, d, dot + i, xx + i, &yy64);
          have64 = true;
        } else {
          group_sums_f64<DT, 1, false>(xr + i, yf, d, dot + i, xx + i, nullptr);
        }
        y2 = yy64;
      }
      const CosRow cr = cos_from_sums(dot[i], xx[i], y2);
      c[i] += cr.cos;
      ang[i] += cr.ang;
    }
    cnt += 1.0;
  }
  for (int i = 0; i < k; ++i) {
    out[3 * i + 0] = c[i];
    out[3 * i + 1] = ang[i];
    out[3 * i + 2] = cnt;
  }
}

#define SLLM_SPAN_VARIANT(NAME, DT)                                                   \
  SLLM_CLONES void NAME(const SpanArgs& a, int64_t r0, int64_t r1, double* out) {   \
    span_block<DT>(a, r0, r1, out);                                                 \
  }
SLLM_SPAN_VARIANT(span_block_f32, kF32)
SLLM_SPAN_VARIANT(span_block_bf16, kBF16)
SLLM_SPAN_VARIANT(span_block_f16, kF16)

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

void cosine_span_stats(const void* const* xs, const int64_t* sxs, int k, const void* y, int64_t sy, int64_t n,
                       int64_t d, int dtype, const uint8_t* mask, double* acc, int64_t sacc, int nthreads) {
  if (n <= 0 || k <= 0) return;
  if (k > kMaxSpanInputs) {  // groups of kMaxSpanInputs (y is then read once per group)
    for (int i0 = 0; i0 < k; i0 += kMaxSpanInputs)
      cosine_span_stats(xs + i0, sxs + i0, std::min(kMaxSpanInputs, k - i0), y, sy, n, d, dtype, mask,
                        acc + i0 * sacc, sacc, nthreads);
    return;
  }
  auto fn = dtype == kF32 ? span_block_f32 : (dtype == kBF16 ? span_block_bf16 : span_block_f16);
  const SpanArgs a{xs, sxs, k, static_cast<const char*>(y), sy, d, mask};
  // the same row blocks as cosine_stats: slot (b, i) holds block b of pair i
  const int64_t nb = (n + kRowBlock - 1) / kRowBlock;
  std::vector<double> slots(3 * k * nb);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(nthreads)) if (nb > 1)
  for (int64_t b = 0; b < nb; ++b) fn(a, b * kRowBlock, std::min(n, (b + 1) * kRowBlock), &slots[3 * k * b]);
  // per pair, sum_slots' order: the blocks in order from zero, then one add into acc
  for (int i = 0; i < k; ++i) {
    double t[3] = {0, 0, 0};
    for (int64_t b = 0; b < nb; ++b)
      for (int c = 0; c < 3; ++c) t[c] += slots[3 * (k * b + i) + c];
    for (int c = 0; c < 3; ++c) acc[i * sacc + c] += t[c];
  }
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
