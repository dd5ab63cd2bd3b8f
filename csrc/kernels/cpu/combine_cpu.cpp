// CPU kernels for the per-frame linear combination out = sum_k c[bf, k] * in_k.
// Works in blocks of kBlock elements held in an op-math buffer, so every input is read once
// and the output written once however many terms there are.
#include <algorithm>
#include <array>

#include "convert.h"
#include "cpu_utils.h"
#include "fvdm/dispatch.h"
#include "fvdm/kernels.h"

namespace fvdm::cpu {
namespace {

constexpr int64_t kBlock = 512;

template <typename scalar_t, typename opmath_t>
void combine_fwd_impl(const FrameCombineFwdParams& p) {
  const auto* coeffs = static_cast<const opmath_t*>(p.coeffs);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t inner = p.inner, K = p.K;
  const int64_t blocks_per_frame = (inner + kBlock - 1) / kBlock;
  at::parallel_for(0, p.BF * blocks_per_frame, 32, [&](int64_t begin, int64_t end) {
    alignas(64) std::array<opmath_t, kBlock> acc;
    alignas(64) std::array<opmath_t, kBlock> in_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bf = task / blocks_per_frame;
      const int64_t i0 = bf * inner + (task % blocks_per_frame) * kBlock;
      const int64_t len = std::min(kBlock, (bf + 1) * inner - i0);
      const opmath_t* c = coeffs + bf * K;
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
