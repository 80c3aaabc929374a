// Host-side launchers of the CUDA kernels (defined in kernels.cu, compiled by nvcc). The binding
// (bindings.cpp, compiled by the host compiler) sees only these plain declarations: raw pointers,
// element strides, dtype codes and the CUDA stream as an integer handle. Each returns a cudaError_t
// code (0 = success) so the binding can raise without including CUDA headers.
#pragma once
#include <stdint.h>

namespace sllm_cuda {

// partials: device buffer of at least 3 * cosine_slots(n) doubles (scratch).
int64_t cosine_slots(int64_t n);
int cosine_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
                 const uint8_t* mask, double* acc, double* partials, uintptr_t stream);

int64_t taylor_slots(int64_t n);
int taylor_stats(const void* w, const void* g, int64_t n, int dtype, double* acc, double* partials, uintptr_t stream);

int lse_update(float* logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, const int64_t* targets, float scale,
               float softcap, float* m, float* s, float* tgt, uintptr_t stream);
int nll_finalize(const float* m, const float* s, const float* tgt, const int64_t* targets, int64_t ignore_index,
                 int64_t n, float* nll, float* lse, uintptr_t stream);

const char* error_string(int code);
int device_count();

}  // namespace sllm_cuda
