// CPU Gram-statistics kernel (healing): raw pointers, element strides, dtype codes from shortllm_math.h.
#pragma once
#include <stdint.h>

namespace sllm {

// xtx[i * d + j] += sum_r x[r, i] * x[r, j] and xty[i * d + j] += sum_r x[r, i] * y[r, j] over rows r < n with
// mask[r] (all rows if mask is null). Products and sums in float64 (a product of two widened fp32/bf16/fp16
// values is exact); sx, sy: row strides in elements, inner dimension contiguous; xtx, xty: contiguous [d, d].
// Bit-identical for any thread count: each output element sums its rows in row order.
void gram_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
                const uint8_t* mask, double* xtx, double* xty, int nthreads);

}  // namespace sllm
