// CUDA kernels for the per-frame linear combination out = sum_k c[bf, k] * in_k (K <= 8),
// which also serves noise_inject (K = 2 after the host's table lookup).
//
// forward:  flat grid-stride loop over 16-byte vectors of the output (scalar when a pointer is
//           not 16-byte aligned or `inner` is not a multiple of the vector); each thread reads
//           the K inputs' vectors, accumulates in fp32 and writes once: one pass over memory.
// backward: one block per (frame, chunk of that frame's elements). Threads stride over the
//           chunk's vectors, write dinputs[k] = c_k * grad_out (skipped where null) and
//           accumulate the K dot products sum(grad_out * in_k) in registers; a block reduction
//           gives the chunk's partials, written to a fp32 workspace [chunk][bf][K] and summed
//           over chunks in a fixed order by a small second kernel (deterministic).
#include "common.cuh"
#include "fvdm/kernels.h"
#include "launch_utils.cuh"

namespace fvdm::cuda {
namespace {

constexpr int K8 = kMaxCombineInputs;

// Passed by value as a kernel argument.
struct InPtrs {
  const void* p[K8];
};
struct OutPtrs {
  void* p[K8];
};

template <typename T, int V>
__global__ void combine_fwd_kernel(InPtrs ins, const float* __restrict__ coeffs, T* __restrict__ out, int K,
                                   int64_t inner_vecs, int64_t nvec_total) {
  using VT = Vec<T, V>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec_total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bf = i / inner_vecs;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll
    for (int k = 0; k < K8; ++k) {
      if (k < K) {
        const float c = coeffs[bf * K + k];
        const VT a = reinterpret_cast<const VT*>(ins.p[k])[i];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += c * to_float(a.v[j]);
      }
    }
    VT o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(acc[j]);
    reinterpret_cast<VT*>(out)[i] = o;
  }
}

template <typename T, int V>
__global__ void combine_bwd_kernel(const T* __restrict__ go, InPtrs ins, OutPtrs dins,
                                   const float* __restrict__ coeffs, float* __restrict__ ws, int K, int64_t BF,
                                   int64_t inner_vecs, int64_t vecs_per_chunk, int chunks) {
  using VT = Vec<T, V>;
  FVDM_SHARED(float, red, K8 * 32);
  const int64_t bf = blockIdx.x / chunks;
  const int chunk = blockIdx.x % chunks;
  const int64_t v0 = chunk * vecs_per_chunk;
  const int64_t v1 = v0 + vecs_per_chunk < inner_vecs ? v0 + vecs_per_chunk : inner_vecs;
  float c[K8], acc[K8];
#pragma unroll
  for (int k = 0; k < K8; ++k) {
    c[k] = k < K ? coeffs[bf * K + k] : 0.f;
    acc[k] = 0.f;
  }
  const VT* gov = reinterpret_cast<const VT*>(go);
  for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    const int64_t i = bf * inner_vecs + v;
    const VT g = gov[i];
#pragma unroll
    for (int k = 0; k < K8; ++k) {
      if (k < K) {
        const VT a = reinterpret_cast<const VT*>(ins.p[k])[i];
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < V; ++j) s += to_float(g.v[j]) * to_float(a.v[j]);
        acc[k] += s;
        if (dins.p[k] != nullptr) {
          VT d;
#pragma unroll
          for (int j = 0; j < V; ++j) d.v[j] = from_float<T>(c[k] * to_float(g.v[j]));
          reinterpret_cast<VT*>(dins.p[k])[i] = d;
        }
      }
    }
  }
  block_sum<K8>(acc, red);
  if (threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) ws[(chunk * BF + bf) * K + k] = acc[k];
  }
}

bool all_aligned16(const void* const* ptrs, int64_t K) {
  for (int64_t k = 0; k < K; ++k)
    if (ptrs[k] != nullptr && !is_aligned(ptrs[k], 16)) return false;
  return true;
}

template <typename T>
void combine_fwd_typed(const FrameCombineFwdParams& p, cudaStream_t stream) {
  constexpr int V = vec16<T>();
  constexpr int kThreads = 256;
  InPtrs ins{};
  for (int64_t k = 0; k < p.K; ++k) ins.p[k] = p.inputs[k];
  const auto* coeffs = static_cast<const float*>(p.coeffs);
  auto* out = static_cast<T*>(p.out);
  const int K = static_cast<int>(p.K);
  const bool fast = p.inner % V == 0 && all_aligned16(p.inputs, p.K) && is_aligned(out, 16);
  if (fast) {
    const int64_t n = p.BF * (p.inner / V);
    FVDM_LAUNCH_KERNEL((combine_fwd_kernel<T, V>), grid_for(n, kThreads), kThreads, 0, stream, ins, coeffs, out, K, p.inner / V, n);
  } else {
    const int64_t n = p.BF * p.inner;
    FVDM_LAUNCH_KERNEL((combine_fwd_kernel<T, 1>), grid_for(n, kThreads), kThreads, 0, stream, ins, coeffs, out, K, p.inner, n);
  }
}

template <typename T>
void combine_bwd_typed(const FrameCombineBwdParams& p, cudaStream_t stream) {
  constexpr int V = vec16<T>();
  constexpr int kThreads = 256;
  InPtrs ins{};
  OutPtrs dins{};
  for (int64_t k = 0; k < p.K; ++k) {
    ins.p[k] = p.inputs[k];
    dins.p[k] = p.dinputs[k];
  }
  const auto* go = static_cast<const T*>(p.grad_out);
  const auto* coeffs = static_cast<const float*>(p.coeffs);
  const int K = static_cast<int>(p.K);
  const bool fast = p.inner % V == 0 && is_aligned(go, 16) && all_aligned16(p.inputs, p.K) &&
                    all_aligned16(const_cast<const void* const*>(p.dinputs), p.K);
  const int v = fast ? V : 1;
  const int64_t inner_vecs = p.inner / v;
  // Each block should stream a few thousand vectors so the reduction is amortised.
  const int chunks = reduction_chunks(p.BF, inner_vecs, 4 * kThreads);
  const int64_t vecs_per_chunk = ceil_div(inner_vecs, chunks);
  const int64_t blocks = p.BF * chunks;
  TORCH_CHECK(blocks <= INT32_MAX, "fvdm: too many frames for one CUDA launch (", blocks, " blocks)");
  Workspace ws(static_cast<int64_t>(chunks) * p.BF * p.K);
  if (fast) {
    FVDM_LAUNCH_KERNEL((combine_bwd_kernel<T, V>), static_cast<unsigned>(blocks), kThreads, 0, stream, go, ins, dins, coeffs, ws.data(), K, p.BF, inner_vecs, vecs_per_chunk, chunks);
  } else {
    FVDM_LAUNCH_KERNEL((combine_bwd_kernel<T, 1>), static_cast<unsigned>(blocks), kThreads, 0, stream, go, ins, dins, coeffs, ws.data(), K, p.BF, inner_vecs, vecs_per_chunk, chunks);
  }
  auto* dcoeffs = static_cast<float*>(p.dcoeffs);
  launch_reduce_chunks<float>(ws.data(), dcoeffs, dcoeffs, p.BF, p.K, p.K, chunks, stream);
}

}  // namespace

void frame_combine_fwd(const FrameCombineFwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "frame_combine_fwd_cuda", [&] { combine_fwd_typed<scalar_t>(p, stream); });
}
void frame_combine_bwd(const FrameCombineBwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "frame_combine_bwd_cuda", [&] { combine_bwd_typed<scalar_t>(p, stream); });
}

}  // namespace fvdm::cuda
