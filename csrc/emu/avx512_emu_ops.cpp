// What the AVX-512 emulation build of the CPU kernels is, for the tests to assert: the SIMD
// paths it compiled (csrc/kernels/cpu/simd.h) and its bf16 narrowing.
#include <torch/library.h>

#include <string>

#include "../kernels/cpu/simd.h"

#if !defined(FVDM_AVX512) || !defined(FVDM_AVX512F)
#error "the AVX-512 emulation must compile the kernels' AVX-512 paths"
#endif

namespace {
std::string cpu_simd() {
#if defined(FVDM_AVX512BF16)
  return "avx512-emulated+bf16";
#else
  return "avx512-emulated";
#endif
}
}  // namespace

#define FVDM_FRAGMENT_NS(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
FVDM_FRAGMENT_NS(FVDM_AVX512_EMU_NS, m) { m.def("cpu_simd() -> str", &cpu_simd); }
