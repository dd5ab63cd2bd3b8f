// CPU execution of fvdm's CUDA kernels: the part of the CUDA language and runtime the kernels
// use, for the test-only build (FVDM_CUDA_EMULATION). The kernel and launcher sources compile
// unchanged as C++ against this header; nothing here is part of the installed package.
//
// Execution model (cuda_emu.cpp):
//  - every CUDA thread is a fiber with its own stack; a block's fibers run on one OS thread,
//    blocks are spread over a few OS threads;
//  - a fiber runs until it reaches a synchronisation point: __syncthreads() (a barrier of the
//    whole block) or a warp collective (__shfl*_sync, mma.sync), which waits for the lanes of
//    its mask. The scheduler runs one warp as far as it can before the next ("warp-greedy", in a
//    forward, reverse or seeded order), so a missing barrier shows up as a read of data the
//    other warps have not written yet;
//  - shared memory (static and dynamic) is allocated per block with malloc (AddressSanitizer
//    sees every array's bounds) and filled with 0xFF bytes (NaN in every float format) before
//    the block starts; device workspaces are filled the same way;
//  - device facts come from a named profile (SM count, shared-memory opt-in, compute
//    capability), so launchers take the same decisions they take on that GPU.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// language keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace fvdm::emu {

// Indices of the CUDA thread running on this OS thread.
struct ThreadDims {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local const ThreadDims* tl_dims;
inline const ThreadDims& dims() { return *tl_dims; }
int lane_id();

// Device facts of the emulated GPU.
struct Profile {
  const char* name;
  int sm_count;
  int64_t smem_optin;  // largest dynamic shared memory one block may opt in to
  int major, minor;
};
const Profile& profile();

// Synchronisation points (they switch to the scheduler).
void syncthreads();
// Deposits `n` 32-bit words for the lanes in `mask` and waits until all of them have; returns
// the 32 lanes' words of this collective (entry [lane * kWords + i]).
constexpr int kWords = 8;
const uint32_t* warp_collective(unsigned mask, const uint32_t* words, int n, const char* what);
[[noreturn]] void trap(const char* why);

// Shared memory of the running block: one array per declaration (`tag` is unique to it).
void* shared_array(const void* tag, size_t bytes);
void* dynamic_shared();

// Poisoned scratch memory standing in for cudaMalloc'ed workspaces.
void* device_alloc(size_t bytes);
void device_free(void* p);

// Runs `body` (which calls the kernel) as a grid; throws c10::Error naming the kernel on any
// emulation error (bad launch configuration, trap, deadlock, diverged warp).
struct KernelBody {
  void* obj;
  void (*call)(void*);
};
void launch(const char* name, dim3 grid, dim3 block, size_t smem, KernelBody body);

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, with the fragment layouts
// of the PTX ISA (g = lane / 4, t = lane % 4; two 16-bit values per register, lower index in
// the low half):
//   A 16x16: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B 16x8:  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D 16x8 fp32: d0, d1 = D[g][2t, 2t+1], d2, d3 = D[g+8][2t, 2t+1]
// Products of two 16-bit values are exact in float; the 16 products and C are summed in
// double and rounded once (tensor cores' internal order is unspecified; tolerances cover it).

template <typename T>
float half_bits_to_float(uint16_t bits) {
  T v;
  v.x = bits;
  return static_cast<float>(v);
}

template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if (profile().major < 8) trap("mma.sync.m16n8k16 needs sm_80 or newer");
  const uint32_t words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint32_t* all = warp_collective(0xffffffffu, words, 6, "mma.sync.m16n8k16");
  auto half_of = [](uint32_t w, int hi) { return static_cast<uint16_t>(hi ? w >> 16 : w & 0xffffu); };
  auto A = [&](int row, int col) {
    const int lane = (row % 8) * 4 + (col % 8) / 2;
    const int reg = row / 8 + 2 * (col / 8);
    return half_bits_to_float<T>(half_of(all[lane * kWords + reg], col % 2));
  };
  auto B = [&](int k, int n) {
    const int lane = n * 4 + (k % 8) / 2;
    const int reg = 4 + k / 8;
    return half_bits_to_float<T>(half_of(all[lane * kWords + reg], k % 2));
  };
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    double acc = d[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k)) * static_cast<double>(B(k, col));
    d[i] = static_cast<float>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// launch: arguments are converted to the kernel's parameter types once, as a real launch
// copies them into the parameter buffer; every thread then gets its own by-value copies.

template <typename... P, typename... A>
void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...>* params;
  } call{kernel, &params};
  launch(name, grid, block, smem,
         KernelBody{&call, [](void* c) {
                      auto* self = static_cast<Call*>(c);
                      std::apply(self->kernel, *self->params);
                    }});
}

}  // namespace fvdm::emu

// ---------------------------------------------------------------------------------------------
// built-in variables and functions

#define threadIdx (::fvdm::emu::dims().thread_idx)
#define blockIdx (::fvdm::emu::dims().block_idx)
#define blockDim (::fvdm::emu::dims().block_dim)
#define gridDim (::fvdm::emu::dims().grid_dim)

inline void __syncthreads() { ::fvdm::emu::syncthreads(); }
[[noreturn]] inline void __trap() { ::fvdm::emu::trap("__trap()"); }

namespace fvdm::emu {
template <typename T>
T shuffle(unsigned mask, T v, int src_lane, int width, const char* what) {
  static_assert(sizeof(T) == 4, "the emulated shuffles move 32-bit values");
  uint32_t w;
  std::memcpy(&w, &v, 4);
  const uint32_t* all = warp_collective(mask, &w, 1, what);
  const int lane = lane_id();
  const int base = lane / width * width;
  const int src = base + ((src_lane % width) + width) % width;
  T out;
  std::memcpy(&out, &all[src * kWords], 4);
  return out;
}
}  // namespace fvdm::emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::fvdm::emu::lane_id();
  // A source outside the caller's width segment reads the caller's own value (CUDA's rule).
  const int src = lane ^ lane_mask;
  const int from = src / width == lane / width ? src % width : lane % width;
  return ::fvdm::emu::shuffle(mask, v, from, width, "__shfl_xor_sync");
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::fvdm::emu::shuffle(mask, v, src_lane, width, "__shfl_sync");
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------
// 16-bit float types and conversions (round to nearest even, as CUDA's _rn intrinsics)

struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __half2float(__half h) { return ::fvdm::emu::half_bits_to_float<c10::Half>(h.x); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::fvdm::emu::half_bits_to_float<c10::BFloat16>(h.x); }
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }

// ---------------------------------------------------------------------------------------------
// shared memory declarations and launch checks, as runtime.cuh spells them for nvcc

#define FVDM_SHARED(T, NAME, COUNT)                                                            \
  T(&NAME)[COUNT] = *static_cast<T(*)[COUNT]>(::fvdm::emu::shared_array(                       \
      [] {                                                                                     \
        static const char tag = 0;                                                             \
        return static_cast<const void*>(&tag);                                                 \
      }(),                                                                                     \
      sizeof(T) * (COUNT)))
#define FVDM_DYNAMIC_SHARED(T, NAME) T* NAME = static_cast<T*>(::fvdm::emu::dynamic_shared())

#define C10_CUDA_CHECK(EXPR)                                                                   \
  do {                                                                                         \
    const cudaError_t fvdm_err = (EXPR);                                                       \
    TORCH_CHECK(fvdm_err == cudaSuccess, "CUDA emulation: ", #EXPR, " failed");                \
  } while (0)
