// The one dtype switch used by every launcher: binds `scalar_t` (storage type) and
// `opmath_t` (float for fp32/bf16/fp16, double for fp64).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define FVDM_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                 \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, NAME, [&] {      \
    using opmath_t = at::opmath_type<scalar_t>;                                     \
    return __VA_ARGS__();                                                           \
  })
