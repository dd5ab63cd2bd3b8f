// Temporal attention forward on CUDA: out = softmax(q k^T * scale, masked) v along F for every
// (b, n, h), q/k/v read through their strides (views of the (B, F, N, 3, H, Dh) qkv buffer),
// out written contiguous (B, F, N, H, Dh), lse (B, N, H, F) in fp32.
//
// Tensor-core path (bf16/fp16, Dh in {64, 72, 128}, F <= 128, sm_80+):
//   one block of 4 warps per (b, tile of `tokens` consecutive n, h). The block copies the whole
//   frame sequence of Q, K and V of its tokens into shared memory (16-byte chunks when aligned,
//   else 4-byte), zero-padded to F rounded up to 16 and to Dh rounded up to 16. Work units are
//   (token, 16-query tile); each warp takes units round-robin and runs FlashAttention-2 style
//   over 16-key tiles: S = Q K^T with mma.sync m16n8k16 (fp32 accumulate), mask (key mask,
//   causal, padding) -> online softmax in registers (log2 domain) -> P re-packed as the A
//   operand -> O += P V with mma. Causal units stop at the diagonal tile. Output is normalised
//   in registers and stored as 32-bit pairs; lse = -inf and zeros for rows with no allowed key.
//   `tokens` is chosen so that a block has about 4 units (4 tokens when F <= 16).
// Generic path (fp32, other head dims up to 256, F up to 1024, unaligned views, pre-sm_80):
//   one warp per query row, 4 rows (consecutive f of one (b, n, h)) per block, so K/V rows are
//   shared through L1. Lanes split Dh (up to 8 elements each); for every allowed key, a warp
//   reduction gives the score and the online-softmax update is applied to the lane's slice.
#include "fvdm/kernels.h"
#include "temporal_attn_common.cuh"

namespace fvdm::cuda {
namespace {

using namespace attn;

template <typename T, int kDh>
__global__ void __launch_bounds__(kWarps* kWarp) attn_fwd_tc_kernel(const TemporalAttnFwdParams p, const TcConfig cfg) {
  using S = TileShape<kDh>;
  FVDM_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int F = static_cast<int>(p.F), Fp = cfg.f_pad, tokens = cfg.tokens;
  const int64_t N = p.N, H = p.H;
  const int64_t h = blockIdx.x % H;
  const int64_t rest = blockIdx.x / H;
  const int64_t n_first = (rest % cfg.n_tiles) * tokens;
  const int64_t b = rest / cfg.n_tiles;
  const int tile = Fp * S::kLd;
  uint16_t* tiles = reinterpret_cast<uint16_t*>(smem_raw);  // [token][Q, K, V][Fp][kLd]
  uint8_t* kallow = reinterpret_cast<uint8_t*>(tiles + 3 * tokens * tile);

  for (int j = threadIdx.x; j < Fp; j += blockDim.x)
    kallow[j] = j < F && (p.key_mask == nullptr || p.key_mask[b * F + j]);
  const auto* q = static_cast<const uint16_t*>(p.q);
  const auto* k = static_cast<const uint16_t*>(p.k);
  const auto* v = static_cast<const uint16_t*>(p.v);
  for (int t = 0; t < tokens && n_first + t < N; ++t) {
    const int64_t n = n_first + t;
    uint16_t* base = tiles + 3 * t * tile;
    load_tile<kDh, S::kLd>(base, q + offset_of(p.q_stride, b, 0, n, h), p.q_stride.f, F, Fp, cfg.vec16);
    load_tile<kDh, S::kLd>(base + tile, k + offset_of(p.k_stride, b, 0, n, h), p.k_stride.f, F, Fp, cfg.vec16);
    load_tile<kDh, S::kLd>(base + 2 * tile, v + offset_of(p.v_stride, b, 0, n, h), p.v_stride.f, F, Fp, cfg.vec16);
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, tq = lane % 4;
  const int QT = Fp / kTile;
  auto* out = static_cast<uint16_t*>(p.out);
  auto* lse = static_cast<float*>(p.lse);

  for (int u = warp; u < tokens * QT; u += kWarps) {
    const int t = u / QT, qt = u % QT;
    const int64_t n = n_first + t;
    if (n >= N) break;  // units are token-major, so every later unit is past N too
    const uint16_t* Qs = tiles + 3 * t * tile;
    const uint16_t* Ks = Qs + tile;
    const uint16_t* Vs = Ks + tile;
    const int rows[2] = {qt * kTile + g, qt * kTile + g + 8};

    uint32_t qa[S::kKSteps][4];
#pragma unroll
    for (int ks = 0; ks < S::kKSteps; ++ks) load_a<S::kLd>(qa[ks], Qs, qt * kTile, ks * 16, g, tq);

    float o[S::kNTiles][4];
#pragma unroll
    for (int dn = 0; dn < S::kNTiles; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    const int kt_end = p.causal ? qt + 1 : QT;  // causal: later key tiles are all in the future
    for (int kt = 0; kt < kt_end; ++kt) {
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < S::kKSteps; ++ks) {
          uint32_t kb[2];
          load_b_rows_n<S::kLd>(kb, Ks, kt * kTile + nt * 8, ks * 16, g, tq);
          mma16816<T>(s[nt], qa[ks], kb);
        }
      }
      // Mask and scale into the log2 domain; row max over the quad that shares a row.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = rows[e / 2];
          const int col = kt * kTile + nt * 8 + 2 * tq + (e & 1);
          const bool ok = kallow[col] && (!p.causal || col <= row);
          s[nt][e] = ok ? s[nt][e] * cfg.scale_log2 : -INFINITY;
          mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
        }
      float alpha[2], m_use[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFullMask, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFullMask, mx[i], 2));
        const float m_new = fmaxf(m[i], mx[i]);
        m_use[i] = m_new == -INFINITY ? 0.f : m_new;  // no allowed key yet: avoid (-inf) - (-inf)
        alpha[i] = exp2f(m[i] - m_use[i]);
        m[i] = m_new;
        l[i] *= alpha[i];
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use[e / 2]);
          l[e / 2] += s[nt][e];
        }
#pragma unroll
      for (int dn = 0; dn < S::kNTiles; ++dn) {
        o[dn][0] *= alpha[0];
        o[dn][1] *= alpha[0];
        o[dn][2] *= alpha[1];
        o[dn][3] *= alpha[1];
      }
      uint32_t pa[4];
      c_to_a<T>(pa, s);
#pragma unroll
      for (int dn = 0; dn < S::kNTiles; ++dn) {
        uint32_t vb[2];
        load_b_rows_k<S::kLd>(vb, Vs, kt * kTile, dn * 8, g, tq);
        mma16816<T>(o[dn], pa, vb);
      }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(kFullMask, l[i], 1);
      l[i] += __shfl_xor_sync(kFullMask, l[i], 2);
      const int row = rows[i];
      if (row >= F) continue;
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      uint16_t* orow = out + (((b * F + row) * N + n) * H + h) * kDh;
#pragma unroll
      for (int dn = 0; dn < S::kNTiles; ++dn)
        *reinterpret_cast<uint32_t*>(orow + dn * 8 + 2 * tq) = pack2<T>(o[dn][2 * i] * inv, o[dn][2 * i + 1] * inv);
      if (tq == 0) lse[((b * N + n) * H + h) * F + row] = l[i] > 0.f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGenericWarps* kWarp)
    attn_fwd_generic_kernel(const TemporalAttnFwdParams p, float scale_log2) {
  const int64_t F = p.F, N = p.N, H = p.H;
  const int Dh = static_cast<int>(p.Dh);
  const int lane = threadIdx.x % kWarp;
  // Rows in lse order (b, n, h, f): consecutive warps share (b, n, h) and so their K/V rows.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + threadIdx.x / kWarp;
  if (row >= p.B * N * H * F) return;
  const int64_t f = row % F;
  int64_t r = row / F;
  const int64_t h = r % H;
  r /= H;
  const int64_t n = r % N;
  const int64_t b = r / N;

  const T* q = static_cast<const T*>(p.q) + offset_of(p.q_stride, b, f, n, h);
  const T* kbase = static_cast<const T*>(p.k) + offset_of(p.k_stride, b, 0, n, h);
  const T* vbase = static_cast<const T*>(p.v) + offset_of(p.v_stride, b, 0, n, h);
  float qv[kPerLane], o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarp;
    qv[i] = d < Dh ? to_float(q[d]) : 0.f;
    o[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int64_t j_end = p.causal ? f + 1 : F;
  for (int64_t j = 0; j < j_end; ++j) {
    if (p.key_mask != nullptr && !p.key_mask[b * F + j]) continue;  // warp-uniform
    const T* kr = kbase + j * p.k_stride.f;
    const T* vr = vbase + j * p.v_stride.f;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarp;
      if (d < Dh) s += qv[i] * to_float(kr[d]);
    }
    s = warp_sum(s) * scale_log2;
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new);  // m = -inf on the first allowed key: alpha = 0
    const float pj = exp2f(s - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + i * kWarp;
      if (d < Dh) o[i] = o[i] * alpha + pj * to_float(vr[d]);
    }
    m = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* orow = static_cast<T*>(p.out) + (((b * F + f) * N + n) * H + h) * Dh;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarp;
    if (d < Dh) orow[d] = from_float<T>(o[i] * inv);
  }
  if (lane == 0) static_cast<float*>(p.lse)[row] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
}

template <typename T, int kDh>
void launch_fwd_tc(const TemporalAttnFwdParams& p, const TcConfig& cfg, cudaStream_t stream) {
  FVDM_LAUNCH_KERNEL((attn_fwd_tc_kernel<T, kDh>), tc_blocks(p, cfg, "temporal_attention"), kWarps * kWarp,
                     static_cast<size_t>(cfg.smem), stream, p, cfg);
}

template <typename T>
void fwd_typed(const TemporalAttnFwdParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    const bool aligned4 = qkv_rows_aligned(p, 4) && is_aligned(p.out, 4);
    if (const auto cfg = plan_tensor_core(p, /*backward=*/false, aligned4, qkv_rows_aligned(p, 16))) {
      FVDM_HEADDIM_SWITCH(p.Dh, kDh, [&] { launch_fwd_tc<T, kDh>(p, *cfg, stream); });
      return;
    }
  }
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  FVDM_LAUNCH_KERNEL(attn_fwd_generic_kernel<T>, generic_blocks(p, "temporal_attention"), kGenericWarps * kWarp, 0,
                     stream, p, scale_log2);
}

}  // namespace

void temporal_attn_fwd(const TemporalAttnFwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "temporal_attn_fwd_cuda", [&] { fwd_typed<scalar_t>(p, stream); });
}

}  // namespace fvdm::cuda
