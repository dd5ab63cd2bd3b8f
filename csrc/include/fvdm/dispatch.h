// The one dtype switch of every launcher, CPU and CUDA: binds `scalar_t` (storage type) and
// `opmath_t` (float for fp32/bf16/fp16, double for fp64). fp64 is a case of the CPU kernels
// only: the host layer rejects it on CUDA, so the CUDA kernels (and their CPU emulation) are
// not instantiated for it.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define FVDM_DISPATCH_CASE(ENUM, ...)                                \
  AT_DISPATCH_CASE(ENUM, [&] {                                       \
    using opmath_t [[maybe_unused]] = at::opmath_type<scalar_t>;     \
    return __VA_ARGS__();                                            \
  })

#if defined(__CUDACC__) || defined(FVDM_CUDA_EMULATION)
#define FVDM_DISPATCH_FP64_CASE(...)
#else
#define FVDM_DISPATCH_FP64_CASE(...) FVDM_DISPATCH_CASE(at::kDouble, __VA_ARGS__)
#endif

#define FVDM_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                               \
  AT_DISPATCH_SWITCH(DTYPE, NAME, FVDM_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                     \
                                      FVDM_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                  \
                                          FVDM_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)          \
                                              FVDM_DISPATCH_FP64_CASE(__VA_ARGS__))
