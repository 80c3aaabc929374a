// pybind11 bindings of the CUDA kernels, compiled by the host compiler and linked with the nvcc
// objects and a static cudart: importing the module needs no CUDA runtime library and no GPU.
// Tensors cross as integers (data_ptr) and the stream as its integer handle: no torch headers.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "gram.h"
#include "launchers.h"

namespace py = pybind11;

template <typename T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

static void check(int code, const char* op) {
  if (code != 0)
    throw std::runtime_error(std::string("shortllm._cuda.") + op + " failed: " + sllm_cuda::error_string(code));
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "shortllm CUDA kernels; called by shortllm.ops._cuda_backend";
  m.def("cosine_slots", &sllm_cuda::cosine_slots, py::arg("n"));
  m.def("taylor_slots", &sllm_cuda::taylor_slots, py::arg("n"));
  m.def("device_count", &sllm_cuda::device_count);
  m.def(
      "cosine_stats",
      [](uintptr_t x, int64_t sx, uintptr_t y, int64_t sy, int64_t n, int64_t d, int dtype, uintptr_t mask,
         uintptr_t acc, uintptr_t partials, uintptr_t stream) {
        check(sllm_cuda::cosine_stats(ptr<const void>(x), sx, ptr<const void>(y), sy, n, d, dtype,
                                      ptr<const uint8_t>(mask), ptr<double>(acc), ptr<double>(partials), stream),
              "cosine_stats");
      },
      py::arg("x"), py::arg("sx"), py::arg("y"), py::arg("sy"), py::arg("n"), py::arg("d"), py::arg("dtype"),
      py::arg("mask"), py::arg("acc"), py::arg("partials"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "taylor_stats",
      [](uintptr_t w, uintptr_t g, int64_t n, int dtype, uintptr_t acc, uintptr_t partials, uintptr_t stream) {
        check(sllm_cuda::taylor_stats(ptr<const void>(w), ptr<const void>(g), n, dtype, ptr<double>(acc),
                                      ptr<double>(partials), stream),
              "taylor_stats");
      },
      py::arg("w"), py::arg("g"), py::arg("n"), py::arg("dtype"), py::arg("acc"), py::arg("partials"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "lse_update",
      [](uintptr_t logits, int64_t rows, int64_t vc, int64_t ld, int64_t v0, uintptr_t targets, float scale,
         float softcap, uintptr_t mx, uintptr_t sm, uintptr_t tgt, uintptr_t stream) {
        check(sllm_cuda::lse_update(ptr<float>(logits), rows, vc, ld, v0, ptr<const int64_t>(targets), scale, softcap,
                                    ptr<float>(mx), ptr<float>(sm), ptr<float>(tgt), stream),
              "lse_update");
      },
      py::arg("logits"), py::arg("rows"), py::arg("vc"), py::arg("ld"), py::arg("v0"), py::arg("targets"),
      py::arg("scale"), py::arg("softcap"), py::arg("m"), py::arg("s"), py::arg("tgt"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "nll_finalize",
      [](uintptr_t mx, uintptr_t sm, uintptr_t tgt, uintptr_t targets, int64_t ignore_index, int64_t n, uintptr_t nll,
         uintptr_t lse, uintptr_t stream) {
        check(sllm_cuda::nll_finalize(ptr<const float>(mx), ptr<const float>(sm), ptr<const float>(tgt),
                                      ptr<const int64_t>(targets), ignore_index, n, ptr<float>(nll), ptr<float>(lse),
                                      stream),
              "nll_finalize");
      },
      py::arg("m"), py::arg("s"), py::arg("tgt"), py::arg("targets"), py::arg("ignore_index"), py::arg("n"),
      py::arg("nll"), py::arg("lse"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "gram_stats",
      [](uintptr_t x, int64_t sx, uintptr_t y, int64_t sy, int64_t n, int64_t d, int dtype, uintptr_t mask,
         uintptr_t xtx, uintptr_t xty, uintptr_t stream) {
        check(sllm_cuda::gram_stats(ptr<const void>(x), sx, ptr<const void>(y), sy, n, d, dtype,
                                    ptr<const uint8_t>(mask), ptr<double>(xtx), ptr<double>(xty), stream),
              "gram_stats");
      },
      py::arg("x"), py::arg("sx"), py::arg("y"), py::arg("sy"), py::arg("n"), py::arg("d"), py::arg("dtype"),
      py::arg("mask"), py::arg("xtx"), py::arg("xty"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.attr("OPS") = py::make_tuple("cosine_stats", "taylor_stats", "lse_update", "nll_finalize", "gram_stats");
}
