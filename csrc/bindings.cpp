// The pybind11 module fvdm._C. Importing it loads this library, whose static initialisers
// register the fvdm:: operators; the module itself only reports how it was built.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Which backends have a kernel for each fvdm operator, read from the dispatcher itself.
std::map<std::string, std::vector<std::string>> kernels() {
  std::map<std::string, std::vector<std::string>> out;
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const auto& name : dispatcher.getAllOpNames()) {
    if (name.name.rfind("fvdm::", 0) != 0) continue;
    auto handle = dispatcher.findOp(name);
    if (!handle) continue;
    std::vector<std::string> backends;
    for (auto key : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
      if (handle->hasKernelForDispatchKey(key)) backends.emplace_back(key == c10::DispatchKey::CPU ? "cpu" : "cuda");
    }
    out[name.name.substr(6)] = backends;
  }
  return out;
}

py::dict build_info() {
  py::dict d;
  d["version"] = FVDM_VERSION;
  d["torch_version"] = FVDM_TORCH_VERSION;
#ifdef FVDM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(FVDM_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
#endif
#ifdef FVDM_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#if defined(__AVX512F__)
  d["cpu_simd"] = "avx512";
#elif defined(__AVX2__)
  d["cpu_simd"] = "avx2";
#else
  d["cpu_simd"] = "baseline";
#endif
  d["parallel"] = at::get_parallel_info();
  d["kernels"] = kernels();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fvdm compiled core: registers the fvdm:: operators with torch";
  m.def("build_info", &build_info, "How this extension was built and which kernels it has.");
}
