// CPU kernel entry points (raw pointers, element strides, dtype codes from shortllm_math.h).
#pragma once
#include <stdint.h>

namespace sllm {

// acc[0..2] += [sum cos, sum arccos(cos)/pi, count] over rows r < n with mask[r] (all rows if mask null).
// sx, sy: row strides in elements; the inner dimension is contiguous.
void cosine_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
                  const uint8_t* mask, double* acc, int nthreads);

// Fused spans: for every i < k, acc[i * sacc + 0..2] += what cosine_stats(xs[i], y, ...) adds (bit-identical),
// reading y once per row and summing |y|^2 once per row. xs[i]: [n, d] of y's dtype, row stride sxs[i]
// elements. k > kMaxSpanInputs is processed in groups of kMaxSpanInputs.
constexpr int kMaxSpanInputs = 16;
void cosine_span_stats(const void* const* xs, const int64_t* sxs, int k, const void* y, int64_t sy, int64_t n,
                       int64_t d, int dtype, const uint8_t* mask, double* acc, int64_t sacc, int nthreads);

// acc[0..2] += [sum w*g, sum |w*g|, sum |w|] over n contiguous elements (g may be null).
void taylor_stats(const void* w, const void* g, int64_t n, int dtype, double* acc, int nthreads);

// One vocabulary chunk of the LM-head cross-entropy: logits [rows, vc] (row stride ld, float32,
// overwritten with the transformed logits) for vocabulary ids v0..v0+vc; updates the online
// log-sum-exp state (m, s) and captures the target logit when the target falls in this chunk.
void lse_update(float* logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, const int64_t* targets,
                float scale, float softcap, float* m, float* s, float* tgt, int nthreads);

void nll_finalize_rows(const float* m, const float* s, const float* tgt, const int64_t* targets, int64_t ignore_index,
                       int64_t n, float* nll, float* lse);

}  // namespace sllm
