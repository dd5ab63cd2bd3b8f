// Host-side helpers for the CUDA launchers: device facts, and how to split a per-frame
// reduction into chunks so that small B*F still fills the GPU.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace fvdm::cuda {

inline int sm_count() { return device_facts().sm_count; }

// Largest dynamic shared memory one block may opt in to on the current device.
inline int64_t max_smem_optin() { return device_facts().smem_optin; }

// Number of row chunks per frame for a per-frame reduction over `rows` rows, aiming at
// `blocks_per_sm` resident blocks on every SM, with at least `min_rows` rows per chunk.
inline int reduction_chunks(int64_t frames, int64_t rows, int64_t min_rows, int blocks_per_sm = 4) {
  const int64_t target = static_cast<int64_t>(sm_count()) * blocks_per_sm;
  const int64_t want = ceil_div(target, std::max<int64_t>(frames, 1));
  const int64_t most = std::max<int64_t>(1, rows / std::max<int64_t>(min_rows, 1));
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 1024)));
}

// Grid for a grid-stride loop over `n` items with `threads` per block.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(n, threads), 1, cap));
}

template <typename OutT>
void launch_reduce_chunks(const float* ws, OutT* out0, OutT* out1, int64_t rows, int64_t W, int64_t split, int chunks,
                          cudaStream_t stream) {
  constexpr int kThreads = 256;
  FVDM_LAUNCH_KERNEL(reduce_chunks_kernel<OutT>, grid_for(rows * W, kThreads), kThreads, 0, stream, ws, out0, out1,
                     rows, W, split, chunks);
}

}  // namespace fvdm::cuda
