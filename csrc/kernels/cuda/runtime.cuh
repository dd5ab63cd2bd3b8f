// The one place the CUDA sources meet the CUDA toolkit: nvcc builds get the real headers; the
// test-only CPU build (FVDM_CUDA_EMULATION, csrc/emu/) gets an emulation of the same names, so
// every kernel and launcher compiles unchanged for both. Kernels declare shared memory with
// FVDM_SHARED / FVDM_DYNAMIC_SHARED and launchers launch with FVDM_LAUNCH_KERNEL, the only
// spellings that differ between the two.
#pragma once

#ifdef FVDM_CUDA_EMULATION
#include "cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define FVDM_SHARED(T, NAME, COUNT) __shared__ T NAME[COUNT]
#define FVDM_DYNAMIC_SHARED(T, NAME) extern __shared__ __align__(16) T NAME[]
#endif

#include <cstddef>
#include <cstdint>
#include <utility>

namespace fvdm::cuda {

// What launchers may ask of the current device.
struct DeviceFacts {
  int sm_count;
  int64_t smem_optin;  // largest dynamic shared memory one block may opt in to
  int major;           // compute capability
};

inline DeviceFacts device_facts() {
#ifdef FVDM_CUDA_EMULATION
  const auto& p = ::fvdm::emu::profile();
  return {p.sm_count, p.smem_optin, p.major};
#else
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return {prop->multiProcessorCount, static_cast<int64_t>(prop->sharedMemPerBlockOptin), prop->major};
#endif
}

// fp32 scratch buffer, released (stream-ordered on a GPU) when it goes out of scope.
class Workspace {
 public:
  explicit Workspace(int64_t n_floats) {
    const size_t bytes = static_cast<size_t>(n_floats > 1 ? n_floats : 1) * sizeof(float);
#ifdef FVDM_CUDA_EMULATION
    ptr_ = ::fvdm::emu::device_alloc(bytes);
#else
    data_ = c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
    ptr_ = data_.get();
#endif
  }
  ~Workspace() {
#ifdef FVDM_CUDA_EMULATION
    ::fvdm::emu::device_free(ptr_);
#endif
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* data() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
#ifndef FVDM_CUDA_EMULATION
  c10::DataPtr data_;
#endif
};

// Every kernel launch: opts in to more than 48 KiB of dynamic shared memory when asked for,
// launches on `stream` and checks the launch. `name` identifies the kernel in errors (and in
// the emulation's launch log).
template <typename... P, typename... A>
void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
#ifdef FVDM_CUDA_EMULATION
  (void)stream;
  ::fvdm::emu::launch_kernel(name, kernel, grid, block, smem, std::forward<A>(args)...);
#else
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fvdm: launching ", name, " failed: ", cudaGetErrorString(err));
#endif
}

}  // namespace fvdm::cuda

// KERNEL may be a template-id in parentheses, e.g. (combine_fwd_kernel<T, V>).
#define FVDM_LAUNCH_KERNEL(KERNEL, GRID, BLOCK, SMEM, STREAM, ...) \
  ::fvdm::cuda::launch_kernel(#KERNEL, KERNEL, GRID, BLOCK, SMEM, STREAM, __VA_ARGS__)
