// CPU kernels for the per-frame linear combination out = sum_k c[bf, k] * in_k.
// Every input is read once and the output written once however many terms there are: fp32/fp64
// straight from the inputs, bf16/fp16 through registers (FVDM_AVX512), else in blocks of kBlock
// elements held in an op-math buffer.
#include <algorithm>
#include <array>
#include <type_traits>

#include "convert.h"
#include "cpu_utils.h"
#include "fvdm/dispatch.h"
#include "fvdm/kernels.h"

namespace fvdm::cpu {
namespace {

constexpr int64_t kBlock = 512;

// fp32/fp64: one loop straight from the inputs to `o` (K known at compile time), the way an
// inductor-generated kernel streams; no intermediate buffer unless the output is streamed.
template <int K, typename T>
inline void combine_direct(const FrameCombineFwdParams& p, const T* __restrict__ c, int64_t i0, int64_t len,
                           T* __restrict__ o) {
  const T* __restrict__ in[K];
  T ck[K];
  for (int k = 0; k < K; ++k) {
    in[k] = static_cast<const T*>(p.inputs[k]) + i0;
    ck[k] = c[k];
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    T acc = ck[0] * in[0][i];
#pragma GCC unroll 8
    for (int k = 1; k < K; ++k) acc += ck[k] * in[k][i];
    o[i] = acc;
  }
}

// f(std::integral_constant<int, K>{}): the loops over the K inputs are unrolled at compile time.
template <typename F>
inline void with_k(int64_t K, const F& f) {
  switch (K) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, kMaxCombineInputs>{}); break;
  }
}

#if defined(FVDM_AVX512)
// Large fp32 outputs: the same sum computed in registers and streamed out (stream_row).
template <int K>
inline void combine_stream(const FrameCombineFwdParams& p, const float* c, int64_t i0, int64_t len, float* o) {
  const float* in[K];
  __m512 ck[K];
  for (int k = 0; k < K; ++k) {
    in[k] = static_cast<const float*>(p.inputs[k]) + i0;
    ck[k] = _mm512_set1_ps(c[k]);
  }
  stream_row(o, len, [&](int64_t i, auto m) {
    __m512 v = _mm512_mul_ps(ck[0], load16(in[0] + i, m));
#pragma GCC unroll 8
    for (int k = 1; k < K; ++k) v = _mm512_fmadd_ps(ck[k], load16(in[k] + i, m), v);
    return v;
  });
}
#endif

template <typename scalar_t, typename opmath_t>
void combine_fwd_impl(const FrameCombineFwdParams& p) {
  const auto* coeffs = static_cast<const opmath_t*>(p.coeffs);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t inner = p.inner, K = p.K;
  const bool stream = use_streaming<scalar_t>(p.BF * inner, K + 1);  // K inputs, one output
  // Flat range over all elements, cut at frame boundaries (each frame has its own coefficients).
  at::parallel_for(0, p.BF * inner, 4 * kBlock, [&](int64_t begin, int64_t end) {
    alignas(64) std::array<opmath_t, kBlock> acc;
    alignas(64) std::array<opmath_t, kBlock> in_buf;
    for (int64_t i0 = begin; i0 < end;) {
      const int64_t bf = i0 / inner;
      const int64_t seg_end = std::min(end, (bf + 1) * inner);
      const opmath_t* c = coeffs + bf * K;
      if constexpr (!kNeedsConversion<scalar_t>) {
        if (!stream) {
          with_k(K, [&](auto k) { combine_direct<decltype(k)::value>(p, c, i0, seg_end - i0, out + i0); });
          i0 = seg_end;
          continue;
        }
#if defined(FVDM_AVX512)
        if constexpr (std::is_same_v<scalar_t, float>) {
          with_k(K, [&](auto k) { combine_stream<decltype(k)::value>(p, c, i0, seg_end - i0, out + i0); });
          i0 = seg_end;
          continue;
        }
#endif
        for (; i0 < seg_end; i0 += kBlock) {  // blocks through an L1 buffer, streamed out
          const int64_t len = std::min(kBlock, seg_end - i0);
          with_k(K, [&](auto k) { combine_direct<decltype(k)::value>(p, c, i0, len, acc.data()); });
          stream_copy(acc.data(), out + i0, len * static_cast<int64_t>(sizeof(scalar_t)));
        }
        i0 = seg_end;
        continue;
      }
#if defined(FVDM_AVX512)
      if constexpr (kNeedsConversion<scalar_t>) {  // straight from bf16/fp16, no buffers
        const scalar_t* in[kMaxCombineInputs];
        __m512 ck[kMaxCombineInputs];
        for (int64_t k = 0; k < K; ++k) {
          in[k] = static_cast<const scalar_t*>(p.inputs[k]);
          ck[k] = _mm512_set1_ps(c[k]);
        }
        for_lanes(seg_end - i0, [&](int64_t i, auto m) {
          __m512 v = _mm512_mul_ps(ck[0], load16(in[0] + i0 + i, m));
          for (int64_t k = 1; k < K; ++k) v = _mm512_fmadd_ps(ck[k], load16(in[k] + i0 + i, m), v);
          store16(out + i0 + i, v, m);
        });
        i0 = seg_end;
        continue;
      }
#endif
      // bf16/fp16 without AVX-512: blocks converted in bulk into op-math buffers.
      for (; i0 < seg_end; i0 += kBlock) {
        const int64_t len = std::min(kBlock, seg_end - i0);
        {
          const opmath_t* __restrict__ in = load_row(static_cast<const scalar_t*>(p.inputs[0]) + i0, in_buf.data(), len);
          const opmath_t c0 = c[0];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) acc[i] = c0 * in[i];
        }
        for (int64_t k = 1; k < K; ++k) {
          const opmath_t* __restrict__ in = load_row(static_cast<const scalar_t*>(p.inputs[k]) + i0, in_buf.data(), len);
          const opmath_t ck = c[k];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) acc[i] += ck * in[i];
        }
        from_opmath(acc.data(), out + i0, len);
      }
      i0 = seg_end;
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t, typename opmath_t>
void combine_bwd_impl(const FrameCombineBwdParams& p) {
  const auto* coeffs = static_cast<const opmath_t*>(p.coeffs);
  const auto* go = static_cast<const scalar_t*>(p.grad_out);
  const int64_t inner = p.inner, K = p.K;
  // Each frame's `inner` elements are treated as rows of one element for the chunked reduce.
  auto sums = frame_chunked_reduce<opmath_t>(p.BF, inner, K, [&](int64_t bf, int64_t i0, int64_t i1, opmath_t* acc) {
    const opmath_t* c = coeffs + bf * K;
    const int64_t base = bf * inner;
    alignas(64) std::array<opmath_t, kBlock> g_buf, in_buf, d_buf;
    for (int64_t b0 = i0; b0 < i1; b0 += kBlock) {
      const int64_t len = std::min(kBlock, i1 - b0);
      const opmath_t* __restrict__ g = load_row(go + base + b0, g_buf.data(), len);
      for (int64_t k = 0; k < K; ++k) {
        const opmath_t* __restrict__ in =
            load_row(static_cast<const scalar_t*>(p.inputs[k]) + base + b0, in_buf.data(), len);
        opmath_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < len; ++i) s += g[i] * in[i];
        acc[k] += s;
        if (p.dinputs[k] != nullptr) {
          const opmath_t ck = c[k];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) d_buf[i] = ck * g[i];
          from_opmath(d_buf.data(), static_cast<scalar_t*>(p.dinputs[k]) + base + b0, len);
        }
      }
    }
  });
  auto* dcoeffs = static_cast<opmath_t*>(p.dcoeffs);
  std::copy(sums.begin(), sums.end(), dcoeffs);
}

}  // namespace

void frame_combine_fwd(const FrameCombineFwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "frame_combine_fwd", [&] { combine_fwd_impl<scalar_t, opmath_t>(p); });
}
void frame_combine_bwd(const FrameCombineBwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "frame_combine_bwd", [&] { combine_bwd_impl<scalar_t, opmath_t>(p); });
}

}  // namespace fvdm::cpu
