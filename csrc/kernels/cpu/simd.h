// The one place the CPU kernels get their SIMD intrinsics from, and the paths they take:
//   FVDM_AVX512F     AVX-512 Foundation (exp/log, transposes, softmax, reductions, streaming)
//   FVDM_AVX512      F + BW + VL: fp32/bf16/fp16 rows in registers (convert.h)
//   FVDM_AVX512BF16  bf16 narrowing by the one AVX512-BF16 instruction
// from the compiler's target (-march=native), or, in the test-only AVX-512 emulation build
// (FVDM_AVX512_EMULATION, cmake/FvdmAvx512Emulation.cmake), from csrc/emu/avx512_emu.h on any
// x86-64 CPU, so that CI runs these paths on hosts without AVX-512.
#pragma once

#if defined(FVDM_AVX512_EMULATION)
#include "avx512_emu.h"
#define FVDM_AVX512F 1
#define FVDM_AVX512 1
#if FVDM_AVX512_EMULATION_BF16
#define FVDM_AVX512BF16 1
#endif
#else
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define FVDM_AVX512F 1
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define FVDM_AVX512 1
#endif
#if defined(__AVX512BF16__)
#define FVDM_AVX512BF16 1
#endif
#endif
#endif
