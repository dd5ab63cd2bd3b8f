// Helpers shared by the CUDA kernels: 16-byte vectors, warp/block reductions, alignment
// checks, and the fixed-order reduction of per-chunk partial sums that makes the backward
// reductions deterministic (no float atomics anywhere).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "fvdm/dispatch.h"
#include "runtime.cuh"

namespace fvdm::cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// N elements of T stored together; alignas lets a load/store compile to one 128-bit access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sums M values over the whole block; every thread gets the totals. `smem` holds
// M * (blockDim.x / 32) floats. Fixed order, so the result is deterministic. All threads of
// the block must call it (it has barriers).
template <int M>
__device__ __forceinline__ void block_sum(float (&v)[M], float* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < M; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < M; ++i) smem[warp * M + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < M; ++i) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += smem[w * M + i];
    v[i] = s;
  }
  __syncthreads();  // smem may be reused right after
}

// Partial sums ws[chunk][row][w] (fp32) -> out[row][w], summed over chunks in order.
// Columns w < split go to out0[row * split + w], the others to out1[row * (W - split) + w - split].
// One thread per (row, w): the partials are tiny next to the activations they summarize.
template <typename OutT>
__global__ void reduce_chunks_kernel(const float* __restrict__ ws, OutT* __restrict__ out0, OutT* __restrict__ out1,
                                     int64_t rows, int64_t W, int64_t split, int chunks) {
  const int64_t total = rows * W;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int c = 0; c < chunks; ++c) s += ws[c * total + i];
    const int64_t row = i / W, w = i % W;
    if (w < split)
      out0[row * split + w] = static_cast<OutT>(s);
    else
      out1[row * (W - split) + (w - split)] = static_cast<OutT>(s);
  }
}

}  // namespace fvdm::cuda
