// Host-side launch: picks the CPU or CUDA launcher for a params struct by the device of
// `tensor`. On CUDA it sets the device guard and launches on the current stream (every kernel
// launch is checked where it happens, in launch_kernel).
#pragma once
#include <ATen/ATen.h>

#include "fvdm/kernels.h"

#ifdef FVDM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define FVDM_LAUNCH(NAME, PARAMS, TENSOR)                                              \
  do {                                                                                 \
    if ((TENSOR).is_cuda()) {                                                          \
      const c10::cuda::CUDAGuard fvdm_guard((TENSOR).device());                        \
      ::fvdm::cuda::NAME((PARAMS), at::cuda::getCurrentCUDAStream().stream());         \
    } else {                                                                           \
      ::fvdm::cpu::NAME(PARAMS);                                                       \
    }                                                                                  \
  } while (0)
#elif defined(FVDM_CUDA_EMULATION)
// Test-only build (csrc/emu/): CPU tensors go to the CUDA launchers, run by the emulation.
#define FVDM_LAUNCH(NAME, PARAMS, TENSOR) ::fvdm::cuda::NAME((PARAMS), nullptr)
#else
#define FVDM_LAUNCH(NAME, PARAMS, TENSOR) ::fvdm::cpu::NAME(PARAMS)
#endif

// Registers the same host function for every backend this build has.
#ifdef FVDM_WITH_CUDA
#define FVDM_REGISTER_BACKENDS(REGISTER_FN)                   \
  TORCH_LIBRARY_IMPL(fvdm, CPU, m) { REGISTER_FN(m); }        \
  TORCH_LIBRARY_IMPL(fvdm, CUDA, m) { REGISTER_FN(m); }
#elif defined(FVDM_CUDA_EMULATION)
#define FVDM_REGISTER_BACKENDS(REGISTER_FN) \
  TORCH_LIBRARY_IMPL(fvdm_cuda_emu, CPU, m) { REGISTER_FN(m); }
#elif defined(FVDM_AVX512_EMULATION)
// Test-only build of the CPU kernels on the AVX-512 emulation (csrc/kernels/cpu/simd.h).
#define FVDM_LIBRARY_IMPL_NS(ns, REGISTER_FN) \
  TORCH_LIBRARY_IMPL(ns, CPU, m) { REGISTER_FN(m); }
#define FVDM_REGISTER_BACKENDS(REGISTER_FN) FVDM_LIBRARY_IMPL_NS(FVDM_AVX512_EMU_NS, REGISTER_FN)
#else
#define FVDM_REGISTER_BACKENDS(REGISTER_FN) \
  TORCH_LIBRARY_IMPL(fvdm, CPU, m) { REGISTER_FN(m); }
#endif
