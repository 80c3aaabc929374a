// Gram statistics for seam healing (see gram.h). Output rows are cut into chunks of 32, handed out
// dynamically; a chunk walks all valid rows in tiles of kTile, widened to float64 into the thread's own
// buffers, and adds each tile into its rows: no two threads write one element, and each element adds its
// rows in row order, so the sums do not depend on the number of threads. Four output rows per pass reuse each loaded
// row of the tile four times (the inner loop over j is contiguous and vectorised per ISA clone).
#include "gram.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "../shortllm_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SHORTLLM_NO_CLONES)
#define SLLM_GRAM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SLLM_GRAM_CLONES
#endif

namespace sllm {
namespace {

constexpr int64_t kTile = 64;    // valid rows widened per step
constexpr int64_t kRowsOut = 4;  // output rows one task updates per pass over the tile
constexpr int64_t kTasksPerChunk = 8;  // tasks (32 output rows) per unit of dynamic scheduling

template <int DT>
void widen_rows(const char* src, int64_t stride_bytes, const int64_t* rows, int64_t cnt, int64_t d, double* dst) {
  for (int64_t t = 0; t < cnt; ++t) {
    const void* row = src + rows[t] * stride_bytes;
    double* out = dst + t * d;
    for (int64_t j = 0; j < d; ++j) out[j] = static_cast<double>(load<DT>(row, j));
  }
}

void widen(int dt, const void* src, int64_t stride, const int64_t* rows, int64_t cnt, int64_t d, double* dst) {
  const char* p = static_cast<const char*>(src);
  const int64_t sb = stride * dtype_size(dt);
  if (dt == kF32) widen_rows<kF32>(p, sb, rows, cnt, d, dst);
  else if (dt == kBF16) widen_rows<kBF16>(p, sb, rows, cnt, d, dst);
  else widen_rows<kF16>(p, sb, rows, cnt, d, dst);
}

// out rows i0 .. i0+m-1 (m <= 4) of xtx and xty += the tile's contribution
SLLM_GRAM_CLONES void tile_update(const double* xt, const double* yt, int64_t cnt, int64_t d, int64_t i0, int64_t m,
                                  double* xtx, double* xty) {
  if (m == kRowsOut) {
    double* a0 = xtx + (i0 + 0) * d; double* b0 = xty + (i0 + 0) * d;
    double* a1 = xtx + (i0 + 1) * d; double* b1 = xty + (i0 + 1) * d;
    double* a2 = xtx + (i0 + 2) * d; double* b2 = xty + (i0 + 2) * d;
    double* a3 = xtx + (i0 + 3) * d; double* b3 = xty + (i0 + 3) * d;
    for (int64_t t = 0; t < cnt; ++t) {
      const double* xr = xt + t * d;
      const double* yr = yt + t * d;
      const double c0 = xr[i0], c1 = xr[i0 + 1], c2 = xr[i0 + 2], c3 = xr[i0 + 3];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const double xv = xr[j], yv = yr[j];
        a0[j] += c0 * xv; b0[j] += c0 * yv;
        a1[j] += c1 * xv; b1[j] += c1 * yv;
        a2[j] += c2 * xv; b2[j] += c2 * yv;
        a3[j] += c3 * xv; b3[j] += c3 * yv;
      }
    }
    return;
  }
  for (int64_t k = 0; k < m; ++k) {
    double* a = xtx + (i0 + k) * d;
    double* b = xty + (i0 + k) * d;
    for (int64_t t = 0; t < cnt; ++t) {
      const double* xr = xt + t * d;
      const double* yr = yt + t * d;
      const double c = xr[i0 + k];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        a[j] += c * xr[j];
        b[j] += c * yr[j];
      }
    }
  }
}

}  // namespace

void gram_stats(const void* x, int64_t sx, const void* y, int64_t sy, int64_t n, int64_t d, int dtype,
                const uint8_t* mask, double* xtx, double* xty, int nthreads) {
  if (n <= 0 || d <= 0) return;
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r)
    if (mask == nullptr || mask[r]) rows.push_back(r);
  const int64_t nv = static_cast<int64_t>(rows.size());
  if (nv == 0) return;
  const int64_t tasks = (d + kRowsOut - 1) / kRowsOut;
  const int64_t chunks = (tasks + kTasksPerChunk - 1) / kTasksPerChunk;
  const int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
  {
    // private tiles: a chunk widens every row it needs itself (d / 32 times the O(n d) widening in all, against
    // O(n d^2) products), so threads never wait on each other until the end, and a descheduled thread on a
    // shared machine holds up only the chunk it is working on
    std::vector<double> xt(static_cast<size_t>(kTile * d)), yt(static_cast<size_t>(kTile * d));
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t task_end = std::min(tasks, (c + 1) * kTasksPerChunk);
      for (int64_t t0 = 0; t0 < nv; t0 += kTile) {
        const int64_t cnt = std::min(kTile, nv - t0);
        widen(dtype, x, sx, rows.data() + t0, cnt, d, xt.data());
        widen(dtype, y, sy, rows.data() + t0, cnt, d, yt.data());
        for (int64_t task = c * kTasksPerChunk; task < task_end; ++task) {
          const int64_t i0 = task * kRowsOut;
          tile_update(xt.data(), yt.data(), cnt, d, i0, std::min(kRowsOut, d - i0), xtx, xty);
        }
      }
    }
  }
}

}  // namespace sllm
