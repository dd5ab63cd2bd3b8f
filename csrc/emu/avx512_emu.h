// Test-only: the AVX-512 intrinsics the CPU kernels use (csrc/kernels/cpu/), for a CPU without
// AVX-512. Included by csrc/kernels/cpu/simd.h instead of <immintrin.h> when the kernels are
// built as the AVX-512 emulation (FVDM_AVX512_EMULATION, cmake/FvdmAvx512Emulation.cmake).
//
// Most intrinsics come from SIMDe (portable implementations under their Intel names). What SIMDe
// 0.8.2 lacks, or implements with other semantics than the hardware in its portable mode, is
// defined here lane by lane after Intel's Intrinsics Guide / SDM pseudocode:
//  - fused multiply-add: SIMDe computes a*b+c with two roundings; the kernels' results (and the
//    adaLN constant-row bug) depend on the single rounding;
//  - masked loads and stores touch only the active lanes, as the hardware suppresses faults on
//    the others: a row's tail must not read or write past the row (AddressSanitizer sees it);
//  - streaming stores require 64-byte alignment (the hardware raises #GP): checked, then stored;
//  - horizontal reductions in GCC's order (the intrinsics are sequences GCC defines, not
//    instructions): halves 512 -> 256 -> 128, then lanes {0,1} + {2,3}, then 0 + 1;
//  - getexp/getmant/scalef/roundscale without flushing subnormals (MXCSR.DAZ is off);
//  - fp16 and bf16 narrowing with the instructions' rounding and NaN rules.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT 0x00
#endif
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC 0x08
#endif
// _mm512_getmant_ps's interval and sign controls (immintrin.h's enums).
enum { _MM_MANT_NORM_1_2 = 0, _MM_MANT_NORM_p5_2 = 1, _MM_MANT_NORM_p5_1 = 2, _MM_MANT_NORM_p75_1p5 = 3 };
enum { _MM_MANT_SIGN_src = 0, _MM_MANT_SIGN_zero = 1, _MM_MANT_SIGN_nan = 2 };

namespace fvdm::avx512_emu {

struct F32x16 {
  float v[16];
};
struct F64x8 {
  double v[8];
};
struct U32x16 {
  uint32_t v[16];
};
struct U16x16 {
  uint16_t v[16];
};

// Vector <-> lanes: the same 64 (or 32) bytes seen as an array.
inline F32x16 lanes(simde__m512 a) { return std::bit_cast<F32x16>(a); }
inline F64x8 lanes(simde__m512d a) { return std::bit_cast<F64x8>(a); }
inline simde__m512 vec(const F32x16& a) { return std::bit_cast<simde__m512>(a); }
inline U32x16 lanes_u32(simde__m512 a) { return std::bit_cast<U32x16>(a); }
inline simde__m256i vec(const U16x16& a) { return std::bit_cast<simde__m256i>(a); }
inline U16x16 lanes_u16(simde__m256i a) { return std::bit_cast<U16x16>(a); }
inline uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }
inline float from_bits(uint32_t u) { return std::bit_cast<float>(u); }
inline float quiet(float a) { return from_bits(bits(a) | 0x00400000u); }

// ---- fused multiply-add: one rounding (VFMADD*PS / VFNMADD*PS)
inline simde__m512 fmadd_ps(simde__m512 a, simde__m512 b, simde__m512 c) {
  F32x16 x = lanes(a), y = lanes(b), z = lanes(c), r;
  for (int i = 0; i < 16; ++i) r.v[i] = std::fma(x.v[i], y.v[i], z.v[i]);
  return vec(r);
}
inline simde__m512 fnmadd_ps(simde__m512 a, simde__m512 b, simde__m512 c) {  // -(a*b) + c
  F32x16 x = lanes(a), y = lanes(b), z = lanes(c), r;
  for (int i = 0; i < 16; ++i) r.v[i] = std::fma(-x.v[i], y.v[i], z.v[i]);
  return vec(r);
}

// ---- masked loads and stores: inactive lanes are neither read nor written
inline simde__m512 maskz_loadu_ps(simde__mmask16 k, const void* p) {
  F32x16 r{};
  const auto* s = static_cast<const float*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) r.v[i] = s[i];
  return vec(r);
}
inline void mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 a) {
  const F32x16 x = lanes(a);
  auto* d = static_cast<float*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) d[i] = x.v[i];
}
inline simde__m256i maskz_loadu_epi16(simde__mmask16 k, const void* p) {
  U16x16 r{};
  const auto* s = static_cast<const uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) r.v[i] = s[i];
  return vec(r);
}
inline void mask_storeu_epi16(void* p, simde__mmask16 k, simde__m256i a) {
  const U16x16 x = lanes_u16(a);
  auto* d = static_cast<uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) d[i] = x.v[i];
}

// ---- streaming stores (VMOVNTPS / VMOVNTDQ): a plain store, after the alignment check
inline void check_aligned64(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) & 63) {
    std::fprintf(stderr, "avx512 emulation: %s to %p, not 64-byte aligned (#GP on the hardware)\n", what, p);
    std::abort();
  }
}
inline void stream_ps(void* p, simde__m512 a) {
  check_aligned64(p, "_mm512_stream_ps");
  std::memcpy(p, &a, 64);
}
inline void stream_si512(void* p, simde__m512i a) {
  check_aligned64(p, "_mm512_stream_si512");
  std::memcpy(p, &a, 64);
}

// ---- reductions, in GCC's order (avx512fintrin.h's __MM512_REDUCE_OP): t8 = (a[8+i] + a[i]),
// t4 = t8[4+i] + t8[i], t2 = t4[i] + t4[2+i], result t2[0] + t2[1]
inline float reduce_add_ps(simde__m512 a) {
  const F32x16 x = lanes(a);
  float t8[8], t4[4], t2[2];
  for (int i = 0; i < 8; ++i) t8[i] = x.v[8 + i] + x.v[i];
  for (int i = 0; i < 4; ++i) t4[i] = t8[4 + i] + t8[i];
  for (int i = 0; i < 2; ++i) t2[i] = t4[i] + t4[2 + i];
  return t2[0] + t2[1];
}
inline double reduce_add_pd(simde__m512d a) {
  const F64x8 x = lanes(a);
  double t4[4], t2[2];
  for (int i = 0; i < 4; ++i) t4[i] = x.v[4 + i] + x.v[i];
  for (int i = 0; i < 2; ++i) t2[i] = t4[2 + i] + t4[i];
  return t2[0] + t2[1];
}
// MAXPS: a > b ? a : b (the second operand when either is NaN)
inline float maxps(float a, float b) { return a > b ? a : b; }
inline float reduce_max_ps(simde__m512 a) {
  const F32x16 x = lanes(a);
  float t8[8], t4[4], t2[4], t1[4];
  for (int i = 0; i < 8; ++i) t8[i] = maxps(x.v[8 + i], x.v[i]);
  for (int i = 0; i < 4; ++i) t4[i] = maxps(t8[4 + i], t8[i]);
  static constexpr int kSwapHalves[4] = {2, 3, 0, 1}, kSwapPairs[4] = {1, 0, 1, 0};
  for (int i = 0; i < 4; ++i) t2[i] = maxps(t4[i], t4[kSwapHalves[i]]);
  for (int i = 0; i < 4; ++i) t1[i] = maxps(t2[i], t2[kSwapPairs[i]]);
  return t1[0];
}
inline float cvtss_f32(simde__m512 a) { return lanes(a).v[0]; }

// ---- exponent and mantissa (VGETEXPPS, VGETMANTPS, VSCALEFPS, VRNDSCALEPS), DAZ off
inline float getexp1(float a) {
  if (std::isnan(a)) return quiet(a);
  const float m = std::fabs(a);
  if (m == 0.0f) return -std::numeric_limits<float>::infinity();
  if (std::isinf(m)) return std::numeric_limits<float>::infinity();
  return static_cast<float>(std::ilogb(m));  // floor(log2 |a|), subnormals included
}
inline simde__m512 getexp_ps(simde__m512 a) {
  F32x16 x = lanes(a);
  for (float& v : x.v) v = getexp1(v);
  return vec(x);
}
// Interval [1, 2) only (the one the kernels use); sign control: source, zero or NaN.
inline float getmant1_2(float a, int sign_ctrl) {
  if (std::isnan(a)) return quiet(a);
  const bool neg = std::signbit(a);
  if (neg && sign_ctrl == _MM_MANT_SIGN_nan) return std::numeric_limits<float>::quiet_NaN();
  const float sign = (neg && sign_ctrl == _MM_MANT_SIGN_src) ? -1.0f : 1.0f;
  const float m = std::fabs(a);
  if (m == 0.0f || std::isinf(m)) return sign * 1.0f;
  return sign * std::scalbn(m, -std::ilogb(m));
}
template <int Interval, int SignCtrl>
inline simde__m512 getmant_ps(simde__m512 a) {
  static_assert(Interval == _MM_MANT_NORM_1_2, "the emulation implements the [1, 2) interval only");
  F32x16 x = lanes(a);
  for (float& v : x.v) v = getmant1_2(v, SignCtrl);
  return vec(x);
}
// a * 2^floor(b), one rounding, with the instruction's special cases.
inline float scalef1(float a, float b) {
  if (std::isnan(a)) return quiet(a);
  if (std::isnan(b)) return quiet(b);
  if (std::isinf(b)) {
    if (b > 0) return (a == 0.0f) ? std::numeric_limits<float>::quiet_NaN() : std::copysign(INFINITY, a);
    return std::isinf(a) ? std::numeric_limits<float>::quiet_NaN() : std::copysign(0.0f, a);
  }
  const float e = std::floor(b);
  const int k = e > 1000.0f ? 1000 : (e < -1000.0f ? -1000 : static_cast<int>(e));
  return std::scalbn(a, k);
}
inline simde__m512 scalef_ps(simde__m512 a, simde__m512 b) {
  F32x16 x = lanes(a), y = lanes(b);
  for (int i = 0; i < 16; ++i) x.v[i] = scalef1(x.v[i], y.v[i]);
  return vec(x);
}
// Round to 2^-M precision (M = imm[7:4]) with the mode imm[1:0] (imm[2] set: the MXCSR mode,
// round to nearest even by default).
inline simde__m512 roundscale_ps(simde__m512 a, int imm) {
  F32x16 x = lanes(a);
  const int M = (imm >> 4) & 15, mode = (imm & 4) ? 0 : (imm & 3);
  for (float& v : x.v) {
    if (std::isnan(v)) {
      v = quiet(v);
      continue;
    }
    const double s = std::ldexp(static_cast<double>(v), M);  // exact in double
    double r;
    switch (mode) {
      case 0: r = std::nearbyint(s); break;  // default rounding mode: to nearest even
      case 1: r = std::floor(s); break;
      case 2: r = std::ceil(s); break;
      default: r = std::trunc(s); break;
    }
    v = std::copysign(static_cast<float>(std::ldexp(r, -M)), v);
  }
  return vec(x);
}

// ---- narrowing conversions
// VCVTPS2PH: round per imm (the kernels: to nearest even), subnormal results kept, overflow to
// inf, NaN quieted with its sign and the top of its payload.
inline uint16_t fp32_to_fp16_rne(float f) {
  const uint32_t u = bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x03FFu));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below fp16's smallest normal (2^-14): a subnormal or zero result
    // value = a's significand (with the implicit bit) * 2^(e-150); in units of 2^-24 shift right
    // by 126 - e (e the biased exponent), rounding to nearest even.
    const int e = static_cast<int>(a >> 23);
    if (e < 102) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t m = (a & 0x007FFFFFu) | 0x00800000u;
    const int shift = 126 - e;
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return static_cast<uint16_t>(sign | (q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u)));
  }
  // normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits
  const uint32_t r = a - 0x38000000u;  // exponent - 112
  const uint32_t q = r >> 13, rem = r & 0x1FFFu;
  return static_cast<uint16_t>(sign | (q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u)));
}
inline simde__m256i cvtps_ph(simde__m512 a, int imm) {
  if ((imm & 4) == 0 && (imm & 3) != 0) {
    std::fprintf(stderr, "avx512 emulation: _mm512_cvtps_ph rounding %d not implemented\n", imm & 3);
    std::abort();
  }
  const F32x16 x = lanes(a);
  U16x16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = fp32_to_fp16_rne(x.v[i]);
  return vec(r);
}
// VCVTNEPS2BF16: subnormal inputs to a zero of their sign, NaN keeps its sign and the top of its
// payload with the quiet bit set, else round to nearest even.
inline uint16_t fp32_to_bf16_ne(float f) {
  const uint32_t u = bits(f), a = u & 0x7FFFFFFFu;
  if (a < 0x00800000u) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if (a > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline simde__m256i cvtneps_pbh(simde__m512 a) {
  const F32x16 x = lanes(a);
  U16x16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = fp32_to_bf16_ne(x.v[i]);
  return vec(r);
}
// VPMOVDW: the low 16 bits of each 32-bit lane.
inline simde__m256i cvtepi32_epi16(simde__m512i a) {
  const U32x16 x = std::bit_cast<U32x16>(a);
  U16x16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<uint16_t>(x.v[i]);
  return vec(r);
}

}  // namespace fvdm::avx512_emu

#undef _mm512_fmadd_ps
#undef _mm512_fnmadd_ps
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm256_maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#undef _mm512_reduce_add_ps
#undef _mm512_reduce_add_pd
#undef _mm512_reduce_max_ps
#undef _mm512_getexp_ps
#undef _mm512_getmant_ps
#undef _mm512_scalef_ps
#undef _mm512_roundscale_ps
#undef _mm512_cvtps_ph
#define _mm512_fmadd_ps(a, b, c) ::fvdm::avx512_emu::fmadd_ps(a, b, c)
#define _mm512_fnmadd_ps(a, b, c) ::fvdm::avx512_emu::fnmadd_ps(a, b, c)
#define _mm512_maskz_loadu_ps(k, p) ::fvdm::avx512_emu::maskz_loadu_ps(k, p)
#define _mm512_mask_storeu_ps(p, k, a) ::fvdm::avx512_emu::mask_storeu_ps(p, k, a)
#define _mm256_maskz_loadu_epi16(k, p) ::fvdm::avx512_emu::maskz_loadu_epi16(k, p)
#define _mm256_mask_storeu_epi16(p, k, a) ::fvdm::avx512_emu::mask_storeu_epi16(p, k, a)
#define _mm512_stream_ps(p, a) ::fvdm::avx512_emu::stream_ps(p, a)
#define _mm512_stream_si512(p, a) ::fvdm::avx512_emu::stream_si512(p, a)
#define _mm512_reduce_add_ps(a) ::fvdm::avx512_emu::reduce_add_ps(a)
#define _mm512_reduce_add_pd(a) ::fvdm::avx512_emu::reduce_add_pd(a)
#define _mm512_reduce_max_ps(a) ::fvdm::avx512_emu::reduce_max_ps(a)
#define _mm512_cvtss_f32(a) ::fvdm::avx512_emu::cvtss_f32(a)
#define _mm512_getexp_ps(a) ::fvdm::avx512_emu::getexp_ps(a)
#define _mm512_getmant_ps(a, interval, sign) ::fvdm::avx512_emu::getmant_ps<(interval), (sign)>(a)
#define _mm512_scalef_ps(a, b) ::fvdm::avx512_emu::scalef_ps(a, b)
#define _mm512_roundscale_ps(a, imm) ::fvdm::avx512_emu::roundscale_ps(a, imm)
#define _mm512_cvtps_ph(a, imm) ::fvdm::avx512_emu::cvtps_ph(a, imm)
#define _mm512_cvtneps_pbh(a) ::fvdm::avx512_emu::cvtneps_pbh(a)
#define _mm512_cvtepi32_epi16(a) ::fvdm::avx512_emu::cvtepi32_epi16(a)
