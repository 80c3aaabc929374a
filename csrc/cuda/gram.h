// Host-side launcher of the CUDA Gram kernel (gram.cu, compiled by nvcc); plain declarations for the
// binding, like launchers.h. Returns a cudaError_t code (0 = success).
#pragma once
#include <stdint.h>

namespace sllm_cuda {

// xtx += x^T x, xty += x^T y over rows with mask[r] (all when null); float64 [d, d] contiguous on the device.
int gram_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
               const uint8_t* mask, double* xtx, double* xty, uintptr_t stream);

}  // namespace sllm_cuda
