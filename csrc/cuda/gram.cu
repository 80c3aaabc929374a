// Gram statistics on the GPU. One thread block owns one 32x32 tile of output columns (i-tile, j-tile) of
// both x^T x and x^T y and walks all rows in order, 32 rows at a time through shared memory (widened to
// float64; a masked row is stored as zeros in x and y, so NaN/Inf in padding never reach a product).
// Each thread keeps 2x2 outputs of each matrix in registers and adds them to the accumulator once at the
// end: no atomics, and every element sums its rows in row order (deterministic).
#include <cuda_runtime.h>

#include "../shortllm_math.h"
#include "gram.h"

namespace {

using namespace sllm;

constexpr int kTile = 32;   // output tile edge and rows per shared-memory step
constexpr int kSub = 2;     // outputs per thread per dimension
constexpr int kEdge = kTile / kSub;  // 16 x 16 threads

template <int DT>
__global__ void gram_kernel(const char* x, int64_t sx, const char* y, int64_t sy, int64_t n, int64_t d,
                            const uint8_t* mask, double* xtx, double* xty) {
  __shared__ double xi[kTile][kTile + 1];
  __shared__ double xj[kTile][kTile + 1];
  __shared__ double yj[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kEdge + tx;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  const int64_t es = dtype_size(DT);
  double a[kSub][kSub] = {}, b[kSub][kSub] = {};
  for (int64_t r0 = 0; r0 < n; r0 += kTile) {
    for (int e = tid; e < kTile * kTile; e += kEdge * kEdge) {
      const int rr = e / kTile, cc = e % kTile;
      const int64_t r = r0 + rr;
      const bool ok = r < n && (mask == nullptr || mask[r]);
      const void* xr = x + r * sx * es;
      const void* yr = y + r * sy * es;
      xi[rr][cc] = ok && i0 + cc < d ? static_cast<double>(load<DT>(xr, i0 + cc)) : 0.0;
      xj[rr][cc] = ok && j0 + cc < d ? static_cast<double>(load<DT>(xr, j0 + cc)) : 0.0;
      yj[rr][cc] = ok && j0 + cc < d ? static_cast<double>(load<DT>(yr, j0 + cc)) : 0.0;
    }
    __syncthreads();
    for (int rr = 0; rr < kTile; ++rr) {
      for (int p = 0; p < kSub; ++p) {
        const double c = xi[rr][ty * kSub + p];
        for (int q = 0; q < kSub; ++q) {
          a[p][q] += c * xj[rr][tx * kSub + q];
          b[p][q] += c * yj[rr][tx * kSub + q];
        }
      }
    }
    __syncthreads();
  }
  for (int p = 0; p < kSub; ++p) {
    const int64_t i = i0 + ty * kSub + p;
    for (int q = 0; q < kSub; ++q) {
      const int64_t j = j0 + tx * kSub + q;
      if (i < d && j < d) {
        xtx[i * d + j] += a[p][q];
        xty[i * d + j] += b[p][q];
      }
    }
  }
}

}  // namespace

namespace sllm_cuda {

int gram_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
               const uint8_t* mask, double* xtx, double* xty, uintptr_t stream) {
  if (n <= 0 || d <= 0) return 0;
  const int64_t tiles = (d + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  const dim3 block(kEdge, kEdge);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  auto xc = static_cast<const char*>(x);
  auto yc = static_cast<const char*>(y);
  if (dtype == kF32)
    gram_kernel<kF32><<<grid, block, 0, st>>>(xc, sx, yc, sy, n, d, mask, xtx, xty);
  else if (dtype == kBF16)
    gram_kernel<kBF16><<<grid, block, 0, st>>>(xc, sx, yc, sy, n, d, mask, xtx, xty);
  else
    gram_kernel<kF16><<<grid, block, 0, st>>>(xc, sx, yc, sy, n, d, mask, xtx, xty);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sllm_cuda
