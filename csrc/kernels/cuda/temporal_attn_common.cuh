// Pieces shared by the temporal attention forward and backward kernels: the head-dim switch,
// the bf16/fp16 tensor-core MMA (mma.sync m16n8k16, fp32 accumulate) and its fragment loaders
// from shared memory, the cooperative global -> shared tile copy, and the host-side choice
// between the tensor-core path and the generic CUDA-core path (plan_tensor_core).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major):  a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, "col"):       b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8, fp32):        c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// (two 16-bit values per 32-bit register, the lower index in the low half). The C fragments of
// two adjacent n8 tiles are exactly the A fragment of a 16x16 tile, which is how P and dS go
// from one MMA to the next without touching shared memory.
//
// Shared-memory tiles hold rows of 16-bit values with a row pitch of kDhK + 8 elements
// (kDhK = head dim rounded up to 16): the 8-element pad makes the 32-bit fragment loads of the
// 8 row groups land in distinct banks.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common.cuh"
#include "fvdm/params.h"
#include "launch_utils.cuh"

// Binds a constexpr head dim for the tensor-core kernels. Callers check eligibility first
// (tc_head_dim_supported), so the else branch is a bug guard, not a user error path.
#define FVDM_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)                                             \
  [&] {                                                                                           \
    if ((HEADDIM) == 64) {                                                                        \
      constexpr int CONST_NAME = 64;                                                              \
      return __VA_ARGS__();                                                                       \
    } else if ((HEADDIM) == 72) {                                                                 \
      constexpr int CONST_NAME = 72;                                                              \
      return __VA_ARGS__();                                                                       \
    } else if ((HEADDIM) == 128) {                                                                \
      constexpr int CONST_NAME = 128;                                                             \
      return __VA_ARGS__();                                                                       \
    } else {                                                                                      \
      TORCH_CHECK(false, "fvdm: no tensor-core temporal attention kernel for head dim ", HEADDIM); \
    }                                                                                             \
  }()

namespace fvdm::cuda::attn {

constexpr int kTile = 16;          // query / key tile (the MMA's m and k)
constexpr int kWarps = 4;          // warps per block on the tensor-core path
constexpr int kMaxFramesTC = 128;  // tensor-core path keeps the whole frame sequence on chip
constexpr int kMaxDhGeneric = 256; // generic path: 8 head-dim elements per lane
constexpr int kGenericWarps = 4;   // generic path: rows (one a warp) per block
constexpr int kPerLane = kMaxDhGeneric / kWarp;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline bool tc_head_dim_supported(int64_t dh) { return dh == 64 || dh == 72 || dh == 128; }

template <int kDh>
struct TileShape {
  static constexpr int kDhK = (kDh + 15) / 16 * 16;  // head dim padded to the MMA k step
  static constexpr int kLd = kDhK + 8;               // smem row pitch, elements
  static constexpr int kKSteps = kDhK / 16;          // k steps of Q K^T
  static constexpr int kNTiles = kDh / 8;            // n8 tiles of an output row block
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ------------------------------------------------------------------------------------------
// device helpers

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<c10::Half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<c10::BFloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t b);
template <>
__device__ __forceinline__ float bits_to_float<c10::Half>(uint16_t b) {
  return __half2float(__ushort_as_half(b));
}
template <>
__device__ __forceinline__ float bits_to_float<c10::BFloat16>(uint16_t b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}

// d += a * b, one m16n8k16 tensor-core MMA with fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(FVDM_CUDA_EMULATION)
  ::fvdm::emu::mma_m16n8k16<T>(d, a, b);
#else
  __trap();  // the launcher only picks this path on sm_80+
#endif
}

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t ld_pair(const uint16_t* p, int pitch) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[pitch]) << 16);
}

// A fragment of the 16x16 block M[m0.., k0..] of a row-major smem tile.
template <int kLd>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* M, int m0, int k0, int g, int t) {
  const uint16_t* p = M + (m0 + g) * kLd + k0 + 2 * t;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * kLd);
  a[2] = ld32(p + 8);
  a[3] = ld32(p + 8 * kLd + 8);
}

// B fragment with B[k][n] = M[n0 + n][k0 + k]: rows of M are the n index (B = M^T, e.g. K^T).
template <int kLd>
__device__ __forceinline__ void load_b_rows_n(uint32_t (&b)[2], const uint16_t* M, int n0, int k0, int g, int t) {
  const uint16_t* p = M + (n0 + g) * kLd + k0 + 2 * t;
  b[0] = ld32(p);
  b[1] = ld32(p + 8);
}

// B fragment with B[k][n] = M[k0 + k][n0 + n]: rows of M are the k index (B = M, e.g. V).
template <int kLd>
__device__ __forceinline__ void load_b_rows_k(uint32_t (&b)[2], const uint16_t* M, int k0, int n0, int g, int t) {
  const uint16_t* p = M + (k0 + 2 * t) * kLd + n0 + g;
  b[0] = ld_pair(p, kLd);
  b[1] = ld_pair(p + 8 * kLd, kLd);
}

// The C fragments of two adjacent n8 tiles (16 x 16 block, fp32) as one A fragment.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[2][4]) {
  a[0] = pack2<T>(c[0][0], c[0][1]);
  a[1] = pack2<T>(c[0][2], c[0][3]);
  a[2] = pack2<T>(c[1][0], c[1][1]);
  a[3] = pack2<T>(c[1][2], c[1][3]);
}

// Block-cooperative copy of `rows` rows of kDh elements (row r at src + r * row_stride) into
// a smem tile of `rows_pad` rows; pad rows and pad columns are zero, so padded keys and dims
// contribute nothing to any product. 16-byte chunks when `vec16`, else 4-byte chunks.
template <int kDh, int kLd>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t row_stride, int rows,
                                          int rows_pad, bool vec16) {
  if (vec16) {
    constexpr int kChunks = kLd / 8;
    for (int i = threadIdx.x; i < rows_pad * kChunks; i += blockDim.x) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < rows && c < kDh) v = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * kLd + c) = v;
    }
  } else {
    constexpr int kChunks = kLd / 2;
    for (int i = threadIdx.x; i < rows_pad * kChunks; i += blockDim.x) {
      const int r = i / kChunks, c = (i % kChunks) * 2;
      uint32_t v = 0;
      if (r < rows && c < kDh) v = *reinterpret_cast<const uint32_t*>(src + r * row_stride + c);
      *reinterpret_cast<uint32_t*>(dst + r * kLd + c) = v;
    }
  }
}

// Offset of element (b, f, n, h, 0) for a strided (B, F, N, H, Dh) tensor.
__device__ __forceinline__ int64_t offset_of(const AttnStrides& s, int64_t b, int64_t f, int64_t n, int64_t h) {
  return b * s.b + f * s.f + n * s.n + h * s.h;
}

// Strides of the gradients dq, dk, dv: (b, f, n) rows `row_stride` elements apart (H * Dh for
// three tensors, 3 * H * Dh inside one packed (B, F, N, 3, H, Dh) gradient).
__host__ __device__ inline AttnStrides grad_strides(int64_t F, int64_t N, int64_t Dh, int64_t row_stride) {
  return {F * N * row_stride, N * row_stride, row_stride, Dh};
}

// Strides of a contiguous (B, F, N, H, Dh) tensor (out, grad_out and the gradients).
__host__ __device__ inline AttnStrides contiguous_strides(int64_t F, int64_t N, int64_t H, int64_t Dh) {
  return grad_strides(F, N, Dh, H * Dh);
}

// ------------------------------------------------------------------------------------------
// host-side eligibility

inline bool strides_multiple_of(const AttnStrides& s, int64_t m) {
  return s.b % m == 0 && s.f % m == 0 && s.n % m == 0 && s.h % m == 0;
}

// 16-bit tensor whose rows can be copied in `bytes`-sized chunks.
inline bool rows_aligned(const void* p, const AttnStrides& s, int bytes) {
  return is_aligned(p, bytes) && strides_multiple_of(s, bytes / 2);
}

inline bool device_has_mma() { return device_facts().major >= 8; }

// q, k and v rows can be copied in `bytes`-sized chunks.
inline bool qkv_rows_aligned(const TemporalAttnFwdParams& p, int bytes) {
  return rows_aligned(p.q, p.q_stride, bytes) && rows_aligned(p.k, p.k_stride, bytes) &&
         rows_aligned(p.v, p.v_stride, bytes);
}

// Blocks of the generic kernels, one warp per (b, n, h, f) row; `op` names the caller in errors.
inline unsigned generic_blocks(const TemporalAttnFwdParams& p, const char* op) {
  TORCH_CHECK(p.Dh <= kMaxDhGeneric, "fvdm: temporal_attention on CUDA supports head dims up to ", kMaxDhGeneric,
              ", got ", p.Dh);
  const int64_t blocks = ceil_div(p.B * p.N * p.H * p.F, kGenericWarps);
  TORCH_CHECK(blocks <= INT32_MAX, "fvdm: ", op, ": too many rows for one launch");
  return static_cast<unsigned>(blocks);
}

// Launch shape of a tensor-core kernel: one block per (b, tile of `tokens` consecutive n, h).
struct TcConfig {
  int tokens;        // consecutive n per block
  int64_t n_tiles;   // ceil(N / tokens)
  int f_pad;         // F rounded up to 16
  bool vec16;        // rows may be copied in 16-byte chunks
  float scale_log2;  // scale * log2(e)
  int64_t smem;      // dynamic shared memory per block, bytes
};

// Shared memory of a tensor-core block: per token, `tiles` 16-bit (F, Dh) tiles (forward Q, K,
// V; backward also dO) and `stats` fp32 rows of F (backward lse and Dsum); then a flag per key.
inline int64_t tc_smem(int64_t f_pad, int64_t dh, int tokens, bool backward) {
  const int64_t ld = round_up(dh, 16) + 8;
  const int tiles = backward ? 4 : 3, stats = backward ? 2 : 0;
  return tokens * (tiles * f_pad * ld * 2 + stats * f_pad * 4) + round_up(f_pad, 16);
}

// The choice between the tensor-core and the generic kernels, the same for the forward and
// the backward: bf16/fp16, a head dim with a tensor-core kernel, F <= 128, rows 4-byte aligned
// (`aligned4`: every buffer the kernel copies or stores in 32-bit pairs), an sm_80+ device, and
// the tiles of one token fit in shared memory. Returns no config for the generic kernels. A
// block takes as many tokens as give its 4 warps a work unit each (forward: one unit per
// 16-query tile; backward: two, a key tile and a query tile), fewer if shared memory is short.
inline std::optional<TcConfig> plan_tensor_core(const TemporalAttnFwdParams& p, bool backward, bool aligned4,
                                                bool vec16) {
  const bool eligible = (p.dtype == at::kHalf || p.dtype == at::kBFloat16) && tc_head_dim_supported(p.Dh) &&
                        p.F <= kMaxFramesTC && aligned4 && device_has_mma();
  if (!eligible) return std::nullopt;
  TcConfig c{};
  c.f_pad = static_cast<int>(round_up(p.F, kTile));
  const int units_per_token = (backward ? 2 : 1) * (c.f_pad / kTile);
  c.tokens = static_cast<int>(std::clamp<int64_t>(kWarps / units_per_token, 1, p.N));
  while (c.tokens > 1 && tc_smem(c.f_pad, p.Dh, c.tokens, backward) > max_smem_optin()) --c.tokens;
  c.smem = tc_smem(c.f_pad, p.Dh, c.tokens, backward);
  if (c.smem > max_smem_optin()) return std::nullopt;
  c.n_tiles = ceil_div(p.N, c.tokens);
  c.vec16 = vec16;
  c.scale_log2 = static_cast<float>(p.scale) * kLog2e;
  return c;
}

// Blocks of a tensor-core kernel; `op` names the caller in errors.
inline unsigned tc_blocks(const TemporalAttnFwdParams& p, const TcConfig& c, const char* op) {
  const int64_t blocks = p.B * c.n_tiles * p.H;
  TORCH_CHECK(blocks <= INT32_MAX, "fvdm: ", op, ": too many (b, n, h) for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace fvdm::cuda::attn
