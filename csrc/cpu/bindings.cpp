// pybind11 bindings of the CPU kernels. Tensors cross as integers (data_ptr), never as torch objects:
// no torch headers, no torch at build time, no ABI coupling with the installed torch.
#include <pybind11/pybind11.h>

#include <vector>

#include "gram.h"
#include "kernels.h"

namespace py = pybind11;

template <typename T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "shortllm CPU kernels (OpenMP); called by shortllm.ops._cpu_backend";
  m.def(
      "cosine_stats",
      [](uintptr_t x, int64_t sx, uintptr_t y, int64_t sy, int64_t n, int64_t d, int dtype, uintptr_t mask,
         uintptr_t acc, int nthreads) {
        sllm::cosine_stats(ptr<const void>(x), sx, ptr<const void>(y), sy, n, d, dtype, ptr<const uint8_t>(mask),
                           ptr<double>(acc), nthreads);
      },
      py::arg("x"), py::arg("sx"), py::arg("y"), py::arg("sy"), py::arg("n"), py::arg("d"), py::arg("dtype"),
      py::arg("mask"), py::arg("acc"), py::arg("nthreads") = 0, py::call_guard<py::gil_scoped_release>());
  m.def(
      "cosine_span_stats",
      // table: int64 [2k] = k data pointers, then the k row strides (elements)
      [](uintptr_t table, int k, uintptr_t y, int64_t sy, int64_t n, int64_t d, int dtype, uintptr_t mask,
         uintptr_t acc, int64_t sacc, int nthreads) {
        const int64_t* tab = ptr<const int64_t>(table);
        std::vector<const void*> xs(k);
        for (int i = 0; i < k; ++i) xs[i] = ptr<const void>(static_cast<uintptr_t>(tab[i]));
        sllm::cosine_span_stats(xs.data(), tab + k, k, ptr<const void>(y), sy, n, d, dtype, ptr<const uint8_t>(mask),
                                ptr<double>(acc), sacc, nthreads);
      },
      py::arg("table"), py::arg("k"), py::arg("y"), py::arg("sy"), py::arg("n"), py::arg("d"), py::arg("dtype"),
      py::arg("mask"), py::arg("acc"), py::arg("sacc"), py::arg("nthreads") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "taylor_stats",
      [](uintptr_t w, uintptr_t g, int64_t n, int dtype, uintptr_t acc, int nthreads) {
        sllm::taylor_stats(ptr<const void>(w), ptr<const void>(g), n, dtype, ptr<double>(acc), nthreads);
      },
      py::arg("w"), py::arg("g"), py::arg("n"), py::arg("dtype"), py::arg("acc"), py::arg("nthreads") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "lse_update",
      [](uintptr_t logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, uintptr_t targets, float scale,
         float softcap, uintptr_t mx, uintptr_t sm, uintptr_t tgt, int nthreads) {
        sllm::lse_update(ptr<float>(logits), rows, vc, ld, v0, ptr<const int64_t>(targets), scale, softcap,
                         ptr<float>(mx), ptr<float>(sm), ptr<float>(tgt), nthreads);
      },
      py::arg("logits"), py::arg("rows"), py::arg("vc"), py::arg("ld"), py::arg("v0"), py::arg("targets"),
      py::arg("scale"), py::arg("softcap"), py::arg("m"), py::arg("s"), py::arg("tgt"), py::arg("nthreads") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "nll_finalize",
      [](uintptr_t mx, uintptr_t sm, uintptr_t tgt, uintptr_t targets, int64_t ignore_index, int64_t n, uintptr_t nll,
         uintptr_t lse) {
        sllm::nll_finalize_rows(ptr<const float>(mx), ptr<const float>(sm), ptr<const float>(tgt),
                                ptr<const int64_t>(targets), ignore_index, n, ptr<float>(nll), ptr<float>(lse));
      },
      py::arg("m"), py::arg("s"), py::arg("tgt"), py::arg("targets"), py::arg("ignore_index"), py::arg("n"),
      py::arg("nll"), py::arg("lse"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "gram_stats",
      [](uintptr_t x, int64_t sx, uintptr_t y, int64_t sy, int64_t n, int64_t d, int dtype, uintptr_t mask,
         uintptr_t xtx, uintptr_t xty, int nthreads) {
        sllm::gram_stats(ptr<const void>(x), sx, ptr<const void>(y), sy, n, d, dtype, ptr<const uint8_t>(mask),
                         ptr<double>(xtx), ptr<double>(xty), nthreads);
      },
      py::arg("x"), py::arg("sx"), py::arg("y"), py::arg("sy"), py::arg("n"), py::arg("d"), py::arg("dtype"),
      py::arg("mask"), py::arg("xtx"), py::arg("xty"), py::arg("nthreads") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.attr("OPS") = py::make_tuple("cosine_stats", "cosine_span_stats", "taylor_stats", "lse_update", "nll_finalize",
                                  "gram_stats");
}
