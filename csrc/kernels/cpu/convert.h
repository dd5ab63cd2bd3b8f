// Vectorizable conversions between storage types and the op-math type (float / double).
// c10's scalar BFloat16/Half conversions do not auto-vectorize (rounding and NaN branches),
// so rows are converted here in bulk: with AVX-512 16 values at a time in registers (load16 /
// store16), else bf16 by integer bit operations the compiler vectorizes and fp16 with F16C.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace fvdm::cpu {

// Whether scalar_t rows go through op-math buffers (bf16/fp16) or are used in place (fp32/fp64).
template <typename scalar_t>
constexpr bool kNeedsConversion = !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;

#if defined(FVDM_AVX512F)
// Mask of the first min(n, 16) lanes of a 16-lane vector (the tail of a row).
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u); }
#endif

// Short row copies inline: a memcpy call per 64..1152-value row costs as much as the copy, and
// GCC turns a plain copy loop back into a memcpy call, hence the intrinsics.
template <typename T>
inline void copy_row(const T* __restrict__ src, T* __restrict__ dst, int64_t n) {
#if defined(FVDM_AVX512F)
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
    if (i < n) {
      const __mmask16 m = first_lanes(n - i);
      _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
    }
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

#if defined(FVDM_AVX512)
// With AVX-512 (F, BW, VL; FVDM_AVX512): fp32, bf16 and fp16 in registers, 16 values at a time,
// as floats. Elementwise kernels use these to skip the op-math row buffers (a round trip of
// each row through L1 buffers costs more than the op). A lane count is either Full (a row's
// whole vectors: plain loads and stores, much faster than masked ones) or a mask of the first
// lanes (its tail, or a misaligned head).
struct Full {};

inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// Round to nearest even. With AVX512-BF16 one instruction, which (unlike torch's rounding)
// flushes subnormals (below 1.2e-38) to zero and keeps a NaN's sign; otherwise integer
// rounding, NaN as 0x7FC0. Every bf16 output of these kernels is narrowed here.
inline __m256i narrow_bf16(__m512 v) {
#if defined(FVDM_AVX512BF16)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline __m512 load16(const float* p, Full) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, Full) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) { return widen_bf16(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const c10::Half* p, Full) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline void store16(float* p, __m512 v, Full) { _mm512_storeu_ps(p, v); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::BFloat16* p, __m512 v, Full) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v)); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow_bf16(v)); }
// fp16: round to nearest even, subnormals kept (as torch does).
inline __m256i narrow_fp16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void store16(c10::Half* p, __m512 v, Full) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_fp16(v)); }
inline void store16(c10::Half* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow_fp16(v)); }

// f(i, lanes) for i = 0, 16, ... below n: Full for whole vectors, then the tail's mask.
template <typename F>
inline void for_lanes(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) f(i, Full{});
  if (i < n) f(i, first_lanes(n - i));
}

// dst[0, n) = f(d, lanes), 16 floats at a time (lanes as in for_lanes: Full, or the mask of
// the lanes that exist): the 64-byte-aligned body with streaming stores straight from
// registers, the head and tail with masked normal stores. Stream the result this way rather
// than through an L1 row and stream_copy: a row's burst of streaming stores stalls the loads
// behind it, and interleaved they overlap.
template <typename F>
inline void stream_row(float* dst, int64_t n, const F& f) {
  int64_t d = std::min<int64_t>(n, static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63) / 4);
  if (d > 0) _mm512_mask_storeu_ps(dst, first_lanes(d), f(int64_t(0), first_lanes(d)));
  for (; d + 16 <= n; d += 16) _mm512_stream_ps(dst + d, f(d, Full{}));
  if (d < n) _mm512_mask_storeu_ps(dst + d, first_lanes(n - d), f(d, first_lanes(n - d)));
}
#endif

#if !defined(FVDM_AVX512)
// Portable row conversions, one per direction and 16-bit type (the compiler vectorizes the bf16
// bit operations; fp16 uses F16C where the build has it).
inline void convert_portable(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  auto* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
inline void convert_portable(const float* src, c10::BFloat16* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint32_t*>(src);
  auto* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}
inline void convert_portable(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void convert_portable(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#endif

// dst[0, n) = src[0, n) between a storage type and its op-math type, either way. With
// FVDM_AVX512 through load16/store16 (the one rounding of every bf16/fp16 output of these
// kernels), else convert_portable.
template <typename S, typename T>
inline void convert_row(const S* __restrict__ src, T* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    copy_row(src, dst, n);
  } else {
#if defined(FVDM_AVX512)
    for_lanes(n, [&](int64_t i, auto m) { store16(dst + i, load16(src + i, m), m); });
#else
    convert_portable(src, dst, n);
#endif
  }
}

template <typename scalar_t>
inline void to_opmath(const scalar_t* src, at::opmath_type<scalar_t>* dst, int64_t n) { convert_row(src, dst, n); }

template <typename scalar_t>
inline void from_opmath(const at::opmath_type<scalar_t>* src, scalar_t* dst, int64_t n) { convert_row(src, dst, n); }

// dst[0, bytes) = src[0, bytes), the 64-byte-aligned body with streaming stores (the head
// and tail around it with normal ones): for outputs written once and not read back soon, this
// skips the read-for-ownership a normal store pays (a third of a streaming kernel's memory
// traffic). Call stream_fence() before a parallel chunk that used it ends.
inline void stream_copy(const void* src, void* dst, int64_t bytes) {
#if defined(FVDM_AVX512F)
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  const int64_t head = std::min<int64_t>(bytes, (64 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(d) & 63)) & 63);
  std::memcpy(d, s, static_cast<size_t>(head));
  int64_t off = head;
  for (; off + 64 <= bytes; off += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + off), _mm512_loadu_si512(s + off));
  std::memcpy(d + off, s + off, static_cast<size_t>(bytes - off));
#else
  std::memcpy(dst, src, static_cast<size_t>(bytes));
#endif
}

// Streaming stores are weakly ordered: publish them before the work is handed back.
inline void stream_fence() {
#if defined(FVDM_AVX512F)
  _mm_sfence();
#endif
}

// When a kernel's inputs and output (`streams` tensors of `numel` elements) outgrow half a
// typical server last-level cache (32 MiB, one EPYC CCD; on a shared host the part left to us
// is smaller), its output would be evicted before the next op reads it anyway: fp32/fp64
// outputs are then written with streaming stores (stream_row / stream_copy). Below that,
// normal stores keep the output in cache for its reader, and a CPU demo's small activations
// never stream. bf16/fp16 outputs never stream.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename scalar_t>
inline bool use_streaming(int64_t numel, int64_t streams) {
  return !kNeedsConversion<scalar_t> && streams * numel * static_cast<int64_t>(sizeof(scalar_t)) > kStreamBytes;
}

// A row in op-math type: the row itself when no conversion is needed, else a converted copy.
template <typename scalar_t>
inline const at::opmath_type<scalar_t>* load_row(const scalar_t* src, at::opmath_type<scalar_t>* buf, int64_t n) {
  if constexpr (!kNeedsConversion<scalar_t>) {
    return src;
  } else {
    to_opmath(src, buf, n);
    return buf;
  }
}

}  // namespace fvdm::cpu
