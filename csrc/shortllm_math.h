// Math shared by the CPU (C++/OpenMP) and CUDA kernels: element loads, per-row cosine finalisation,
// Taylor element terms and the online log-sum-exp update. Everything here is __host__ __device__ so the
// CPU tests exercise exactly the arithmetic the CUDA kernels run.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define SLLM_HD __host__ __device__ __forceinline__
#else
#define SLLM_HD inline __attribute__((always_inline))
#endif

namespace sllm {

// dtype codes passed from Python (shortllm/ops/_cpu_backend.py and _cuda_backend.py use the same table)
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr double kInvPi = 0.318309886183790671537767526745028724;

SLLM_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SLLM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bfloat16 is the upper half of a float32: exact widening.
SLLM_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact for normals, subnormals, inf and NaN. Branch-free (a select) so it
// vectorises on CPU; the classic exponent-rebias construction: normals are rebiased by a multiply
// by 2^-112, subnormals are built as (magic float with the mantissa bits) - magic.
SLLM_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * bits_f32(0x7800000u);  // 2^-112
  const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  // bitwise select instead of ?: so compilers if-convert and vectorise it
  const uint32_t sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  const uint32_t mag = (f32_bits(denormalized) & sub) | (f32_bits(normalized) & ~sub);
  return bits_f32(sign | mag);
}

template <int DT>
SLLM_HD float load(const void* p, int64_t i) {
  if (DT == kF32) return static_cast<const float*>(p)[i];
  if (DT == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

SLLM_HD int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

// Per-row cosine from the row sums (SPEC: a zero vector gives cos = 1). The clamp keeps NaN (as the
// PyTorch reference does) so a NaN input row shows up in the sums instead of vanishing.
struct CosRow {
  double cos;
  double ang;
};

SLLM_HD CosRow cos_from_sums(double dot, double xx, double yy) {
  const double denom = sqrt(xx) * sqrt(yy);
  double c = denom == 0.0 ? 1.0 : dot / denom;  // NaN/Inf denominators must propagate
  c = c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c);
  return CosRow{c, acos(c) * kInvPi};
}

// Taylor terms of one element: the product is formed in float32 (both operands already widened
// from bf16/fp16, never multiplied in half precision) and widened to double for accumulation.
struct TaylorTerms {
  double wg;
  double abs_wg;
  double abs_w;
};

SLLM_HD TaylorTerms taylor_terms(float w, float g) {
  const float p = w * g;
  return TaylorTerms{static_cast<double>(p), static_cast<double>(fabsf(p)), static_cast<double>(fabsf(w))};
}

// Logit transform of the LM-head cross-entropy: scale, then Gemma-style tanh soft-capping.
SLLM_HD float cap_logit(float z, float scale, float softcap) {
  z *= scale;
  return softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
}

// Online log-sum-exp state (running max m, running sum s of exp(z - m)) merged with a chunk's
// (cm, cs). Associative up to rounding; callers merge in a fixed order for determinism.
SLLM_HD void lse_merge(float& m, float& s, float cm, float cs) {
  if (cm == -INFINITY) return;
  if (cm > m) {
    s = s * expf(m - cm) + cs;
    m = cm;
  } else {
    s = s + cs * expf(cm - m);
  }
}

SLLM_HD void nll_finalize(float m, float s, float tgt, bool valid, float* nll, float* lse) {
  const float l = m + logf(s);
  *lse = l;
  *nll = valid ? l - tgt : 0.0f;
}

}  // namespace sllm
