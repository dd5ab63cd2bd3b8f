// Helpers shared by the CPU kernels.
#pragma once
#include <ATen/Parallel.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace fvdm::cpu {

// Per-frame reductions over (BF frames x N rows): splits every frame into enough row chunks
// that all threads stay busy even when BF is small (B=1, F=16 on many cores). `body(bf, n0,
// n1, acc)` adds its chunk's sums into acc[0..width); returns the per-frame sums (BF x width).
template <typename acc_t, typename Body>
std::vector<acc_t> frame_chunked_reduce(int64_t BF, int64_t N, int64_t width, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::clamp<int64_t>((2 * threads + BF - 1) / BF, 1, std::max<int64_t>(N, 1));
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  std::vector<acc_t> partials(static_cast<size_t>(BF * chunks * width), acc_t(0));
  at::parallel_for(0, BF * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bf = task / chunks, c = task % chunks;
      const int64_t n0 = c * rows_per_chunk, n1 = std::min(N, n0 + rows_per_chunk);
      if (n0 < n1) body(bf, n0, n1, partials.data() + task * width);
    }
  });
  std::vector<acc_t> sums(static_cast<size_t>(BF * width), acc_t(0));
  for (int64_t bf = 0; bf < BF; ++bf)
    for (int64_t c = 0; c < chunks; ++c) {
      const acc_t* src = partials.data() + (bf * chunks + c) * width;
      acc_t* dst = sums.data() + bf * width;
      for (int64_t w = 0; w < width; ++w) dst[w] += src[w];
    }
  return sums;
}

// Sum of four 512-bit vectors of T stored at acc. With AVX-512 the last 16 (8) lanes are added
// by a shuffle tree; the compiler's own epilogue is a chain of 16 dependent scalar adds per
// row, which dominates the adaLN forward at D = 384.
template <typename T>
inline T sum_of_four_vectors(const T* acc) {
  constexpr int64_t kLanes = 4 * 64 / static_cast<int64_t>(sizeof(T));
#if defined(FVDM_AVX512F)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 a = _mm512_add_ps(_mm512_loadu_ps(acc), _mm512_loadu_ps(acc + 16));
    const __m512 b = _mm512_add_ps(_mm512_loadu_ps(acc + 32), _mm512_loadu_ps(acc + 48));
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  } else if constexpr (std::is_same_v<T, double>) {
    const __m512d a = _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_loadu_pd(acc + 8));
    const __m512d b = _mm512_add_pd(_mm512_loadu_pd(acc + 16), _mm512_loadu_pd(acc + 24));
    return _mm512_reduce_add_pd(_mm512_add_pd(a, b));
  }
#endif
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Sums of f(d) and of f(d)^2 for d in [0, D) in one pass, each with four vector-wide
// accumulators: with a single one a row reduction waits on the add latency at every vector.
template <typename T, typename F>
inline std::pair<T, T> lane_sums_and_squares(int64_t D, const F& f) {
  constexpr int64_t kLanes = 4 * 64 / static_cast<int64_t>(sizeof(T));
  T acc[kLanes] = {}, acc2[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const T v = f(d + j);
      acc[j] += v;
      acc2[j] += v * v;
    }
  }
  T s = 0, s2 = 0;
  for (; d < D; ++d) {
    const T v = f(d);
    s += v;
    s2 += v * v;
  }
  return {s + sum_of_four_vectors(acc), s2 + sum_of_four_vectors(acc2)};
}

// Rows per parallel task so that each task moves roughly 64 KiB of elements.
inline int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

}  // namespace fvdm::cpu
