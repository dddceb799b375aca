// The Python module: build facts only. Ops register themselves next to their implementation
// (TORCH_LIBRARY_FRAGMENT(clipcid_fast_C, ...) in csrc/cpu/*.cpp and csrc/cuda/*.cpp).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#ifndef CLIPCID_CUDA_STATUS
#define CLIPCID_CUDA_STATUS "skipped: built without CMake"
#endif

PYBIND11_MODULE(_C, m) {
  m.def("build_info", []() {
    pybind11::dict d;
    d["openmp"] = at::get_parallel_info();
    d["cuda"] = CLIPCID_CUDA_STATUS;
#ifdef CLIPCID_WITH_CUDA
    d["cuda_built"] = true;
#else
    d["cuda_built"] = false;
#endif
    return d;
  });
}
