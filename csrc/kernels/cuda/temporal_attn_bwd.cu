// Temporal attention backward on CUDA. P is recomputed from the saved lse (no S or P is ever
// stored): P = exp(q k^T * scale - lse), Dsum_i = sum_d dO_i * O_i, dS = P * (dO V^T - Dsum),
// dV = P^T dO, dQ = scale * dS K, dK = scale * dS^T Q. Masked pairs (key mask, causal,
// padding) and rows with lse = -inf have P = 0, so masked keys get zero dK and dV.
//
// Tensor-core path (bf16/fp16, Dh in {64, 72, 128}, F <= 128, sm_80+, fits in shared memory):
//   one block of 4 warps per (b, tile of `tokens` consecutive n, h). The block copies Q, K, V
//   and dO of its tokens' whole frame sequences into shared memory (zero-padded like the
//   forward), loads lse (log2 domain) and computes Dsum with one warp per row. Then two kinds of
//   independent work units, taken round-robin by the warps, with no atomics and no second pass:
//   - (token, 16-key tile): dK and dV for those keys, looping over query tiles: S^T = K Q^T and
//     dP^T = V dO^T by mma, P^T and dS^T in registers, then dV += P^T dO and dK += dS^T Q by
//     mma with P^T / dS^T re-packed as A operands;
//   - (token, 16-query tile): dQ, looping over key tiles: S = Q K^T, dP = dO V^T, dS, then
//     dQ += dS K.
//   S and dP are recomputed once for each kind (about 1.5x the FLOPs of a one-pass backward with
//   atomics), which buys deterministic results; at F <= 128 the op is bound by memory anyway.
// Generic path (fp32, other head dims up to 256, F up to 1024, unaligned views, pre-sm_80):
//   kernel 1, one warp per query row: Dsum (kept in a fp32 workspace) and dQ, looping over keys;
//   kernel 2, one warp per key row: dK and dV, looping over queries. Lanes split Dh; scores and
//   dP come from warp reductions.
#include "fvdm/kernels.h"
#include "temporal_attn_common.cuh"

namespace fvdm::cuda {
namespace {

using namespace attn;

template <typename T, int kDh>
__global__ void __launch_bounds__(kWarps* kWarp)
    attn_bwd_tc_kernel(const TemporalAttnBwdParams bp, const TcConfig cfg) {
  using S = TileShape<kDh>;
  const TemporalAttnFwdParams& p = bp.fwd;
  FVDM_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int F = static_cast<int>(p.F), Fp = cfg.f_pad, tokens = cfg.tokens;
  const int64_t N = p.N, H = p.H;
  const int64_t h = blockIdx.x % H;
  const int64_t rest = blockIdx.x / H;
  const int64_t n_first = (rest % cfg.n_tiles) * tokens;
  const int64_t b = rest / cfg.n_tiles;
  const int tile = Fp * S::kLd;
  uint16_t* tiles = reinterpret_cast<uint16_t*>(smem_raw);            // [token][Q, K, V, dO][Fp][kLd]
  float* stats = reinterpret_cast<float*>(tiles + 4 * tokens * tile);  // [token][lse2 | Dsum][Fp]
  uint8_t* kallow = reinterpret_cast<uint8_t*>(stats + 2 * tokens * Fp);

  const AttnStrides cs = contiguous_strides(F, N, H, kDh);  // out and grad_out
  const AttnStrides gs = grad_strides(F, N, kDh, bp.grad_row_stride);
  const auto* q = static_cast<const uint16_t*>(p.q);
  const auto* k = static_cast<const uint16_t*>(p.k);
  const auto* v = static_cast<const uint16_t*>(p.v);
  const auto* go = static_cast<const uint16_t*>(bp.grad_out);
  const auto* lse = static_cast<const float*>(p.lse);
  const int ntok = static_cast<int>(N - n_first < tokens ? N - n_first : tokens);

  for (int j = threadIdx.x; j < Fp; j += blockDim.x)
    kallow[j] = j < F && (p.key_mask == nullptr || p.key_mask[b * F + j]);
  for (int t = 0; t < ntok; ++t) {
    const int64_t n = n_first + t;
    uint16_t* base = tiles + 4 * t * tile;
    load_tile<kDh, S::kLd>(base, q + offset_of(p.q_stride, b, 0, n, h), p.q_stride.f, F, Fp, cfg.vec16);
    load_tile<kDh, S::kLd>(base + tile, k + offset_of(p.k_stride, b, 0, n, h), p.k_stride.f, F, Fp, cfg.vec16);
    load_tile<kDh, S::kLd>(base + 2 * tile, v + offset_of(p.v_stride, b, 0, n, h), p.v_stride.f, F, Fp, cfg.vec16);
    load_tile<kDh, S::kLd>(base + 3 * tile, go + offset_of(cs, b, 0, n, h), cs.f, F, Fp, cfg.vec16);
    const float* lse_row = lse + ((b * N + n) * H + h) * F;
    for (int f = threadIdx.x; f < Fp; f += blockDim.x)
      stats[2 * t * Fp + f] = f < F ? lse_row[f] * kLog2e : -INFINITY;  // -inf stays -inf
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, tq = lane % 4;

  // Dsum_i = dO_i . O_i, one warp per (token, row); O is read from global once.
  {
    const auto* out = static_cast<const uint16_t*>(p.out);
    for (int u = warp; u < ntok * Fp; u += kWarps) {
      const int t = u / Fp, f = u % Fp;
      float s = 0.f;
      if (f < F) {
        const uint16_t* dos = tiles + (4 * t + 3) * tile + f * S::kLd;
        const uint16_t* orow = out + offset_of(cs, b, f, n_first + t, h);
        for (int d = lane; d < kDh; d += kWarp) s += bits_to_float<T>(dos[d]) * bits_to_float<T>(orow[d]);
      }
      s = warp_sum(s);
      if (lane == 0) stats[(2 * t + 1) * Fp + f] = s;
    }
  }
  __syncthreads();

  const int QT = Fp / kTile;
  const int units_per_token = 2 * QT;  // QT key tiles (dK, dV), then QT query tiles (dQ)
  const float scale = static_cast<float>(p.scale);
  for (int u = warp; u < ntok * units_per_token; u += kWarps) {
    const int t = u / units_per_token, w = u % units_per_token;
    const int64_t n = n_first + t;
    const uint16_t* Qs = tiles + 4 * t * tile;
    const uint16_t* Ks = Qs + tile;
    const uint16_t* Vs = Ks + tile;
    const uint16_t* dOs = Vs + tile;
    const float* lse2 = stats + 2 * t * Fp;
    const float* dsum = lse2 + Fp;

    if (w < QT) {
      // ---- dK, dV for keys kt*16 .. kt*16+15 (rows of the C fragments are keys) ----
      const int kt = w;
      const int keys[2] = {kt * kTile + g, kt * kTile + g + 8};
      float dk[S::kNTiles][4], dv[S::kNTiles][4];
#pragma unroll
      for (int dn = 0; dn < S::kNTiles; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[dn][e] = dv[dn][e] = 0.f;

      for (int qt = p.causal ? kt : 0; qt < QT; ++qt) {  // causal: earlier queries see none of these keys
        float st[2][4], dpt[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < S::kKSteps; ++ks) {
          uint32_t ka[4], va[4];
          load_a<S::kLd>(ka, Ks, kt * kTile, ks * 16, g, tq);
          load_a<S::kLd>(va, Vs, kt * kTile, ks * 16, g, tq);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            uint32_t qb[2], dob[2];
            load_b_rows_n<S::kLd>(qb, Qs, qt * kTile + nt * 8, ks * 16, g, tq);
            load_b_rows_n<S::kLd>(dob, dOs, qt * kTile + nt * 8, ks * 16, g, tq);
            mma16816<T>(st[nt], ka, qb);
            mma16816<T>(dpt[nt], va, dob);
          }
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = keys[e / 2];
            const int qi = qt * kTile + nt * 8 + 2 * tq + (e & 1);
            const float l2 = lse2[qi];
            const bool ok = qi < F && kallow[key] && (!p.causal || key <= qi) && l2 != -INFINITY;
            const float pr = ok ? exp2f(st[nt][e] * cfg.scale_log2 - l2) : 0.f;
            st[nt][e] = pr;                           // P^T
            dpt[nt][e] = pr * (dpt[nt][e] - dsum[qi]);  // dS^T (unscaled)
          }
        uint32_t pa[4], dsa[4];
        c_to_a<T>(pa, st);
        c_to_a<T>(dsa, dpt);
#pragma unroll
        for (int dn = 0; dn < S::kNTiles; ++dn) {
          uint32_t dob[2], qb[2];
          load_b_rows_k<S::kLd>(dob, dOs, qt * kTile, dn * 8, g, tq);
          load_b_rows_k<S::kLd>(qb, Qs, qt * kTile, dn * 8, g, tq);
          mma16816<T>(dv[dn], pa, dob);
          mma16816<T>(dk[dn], dsa, qb);
        }
      }
      auto* dkp = static_cast<uint16_t*>(bp.dk);
      auto* dvp = static_cast<uint16_t*>(bp.dv);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (keys[i] >= F) continue;
        const int64_t off = offset_of(gs, b, keys[i], n, h);
#pragma unroll
        for (int dn = 0; dn < S::kNTiles; ++dn) {
          const int d = dn * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(dkp + off + d) = pack2<T>(dk[dn][2 * i] * scale, dk[dn][2 * i + 1] * scale);
          *reinterpret_cast<uint32_t*>(dvp + off + d) = pack2<T>(dv[dn][2 * i], dv[dn][2 * i + 1]);
        }
      }
    } else {
      // ---- dQ for queries qt*16 .. qt*16+15 ----
      const int qt = w - QT;
      const int rows[2] = {qt * kTile + g, qt * kTile + g + 8};
      float dq[S::kNTiles][4];
#pragma unroll
      for (int dn = 0; dn < S::kNTiles; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[dn][e] = 0.f;

      const int kt_end = p.causal ? qt + 1 : QT;
      for (int kt = 0; kt < kt_end; ++kt) {
        float s[2][4], dp[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < S::kKSteps; ++ks) {
          uint32_t qa[4], doa[4];
          load_a<S::kLd>(qa, Qs, qt * kTile, ks * 16, g, tq);
          load_a<S::kLd>(doa, dOs, qt * kTile, ks * 16, g, tq);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            uint32_t kb[2], vb[2];
            load_b_rows_n<S::kLd>(kb, Ks, kt * kTile + nt * 8, ks * 16, g, tq);
            load_b_rows_n<S::kLd>(vb, Vs, kt * kTile + nt * 8, ks * 16, g, tq);
            mma16816<T>(s[nt], qa, kb);
            mma16816<T>(dp[nt], doa, vb);
          }
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = rows[e / 2];
            const int col = kt * kTile + nt * 8 + 2 * tq + (e & 1);
            const float l2 = lse2[row];
            const bool ok = row < F && kallow[col] && (!p.causal || col <= row) && l2 != -INFINITY;
            const float pr = ok ? exp2f(s[nt][e] * cfg.scale_log2 - l2) : 0.f;
            dp[nt][e] = pr * (dp[nt][e] - dsum[row]);  // dS (unscaled)
          }
        uint32_t dsa[4];
        c_to_a<T>(dsa, dp);
#pragma unroll
        for (int dn = 0; dn < S::kNTiles; ++dn) {
          uint32_t kb[2];
          load_b_rows_k<S::kLd>(kb, Ks, kt * kTile, dn * 8, g, tq);
          mma16816<T>(dq[dn], dsa, kb);
        }
      }
      auto* dqp = static_cast<uint16_t*>(bp.dq);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (rows[i] >= F) continue;
        const int64_t off = offset_of(gs, b, rows[i], n, h);
#pragma unroll
        for (int dn = 0; dn < S::kNTiles; ++dn)
          *reinterpret_cast<uint32_t*>(dqp + off + dn * 8 + 2 * tq) =
              pack2<T>(dq[dn][2 * i] * scale, dq[dn][2 * i + 1] * scale);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// generic path

struct RowIndex {
  int64_t b, n, h, f;
};
// Rows in lse order (b, n, h, f), so consecutive warps share (b, n, h).
__device__ __forceinline__ RowIndex row_index(int64_t row, int64_t N, int64_t H, int64_t F) {
  RowIndex r;
  r.f = row % F;
  row /= F;
  r.h = row % H;
  row /= H;
  r.n = row % N;
  r.b = row / N;
  return r;
}

template <typename T>
__device__ __forceinline__ void load_slice(float (&dst)[kPerLane], const T* src, int Dh, int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarp;
    dst[i] = d < Dh ? to_float(src[d]) : 0.f;
  }
}

// Two dot products of a lane's slices with rows a and b, reduced over the warp.
template <typename T>
__device__ __forceinline__ void warp_dot2(const float (&x)[kPerLane], const T* a, const float (&y)[kPerLane],
                                          const T* b, int Dh, int lane, float& xa, float& yb) {
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarp;
    if (d < Dh) {
      s0 += x[i] * to_float(a[d]);
      s1 += y[i] * to_float(b[d]);
    }
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    s0 += __shfl_xor_sync(kFullMask, s0, o);
    s1 += __shfl_xor_sync(kFullMask, s1, o);
  }
  xa = s0;
  yb = s1;
}

template <typename T>
__global__ void __launch_bounds__(kGenericWarps* kWarp)
    attn_bwd_dq_generic_kernel(const TemporalAttnBwdParams bp, float* __restrict__ dsum_ws, float scale_log2) {
  const TemporalAttnFwdParams& p = bp.fwd;
  const int64_t F = p.F, N = p.N, H = p.H;
  const int Dh = static_cast<int>(p.Dh);
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + threadIdx.x / kWarp;
  if (row >= p.B * N * H * F) return;
  const RowIndex r = row_index(row, N, H, F);
  const AttnStrides cs = contiguous_strides(F, N, H, Dh);
  const int64_t coff = offset_of(cs, r.b, r.f, r.n, r.h);

  float qv[kPerLane], dov[kPerLane], tmp[kPerLane], dq[kPerLane];
  load_slice(qv, static_cast<const T*>(p.q) + offset_of(p.q_stride, r.b, r.f, r.n, r.h), Dh, lane);
  load_slice(dov, static_cast<const T*>(bp.grad_out) + coff, Dh, lane);
  load_slice(tmp, static_cast<const T*>(p.out) + coff, Dh, lane);
  float ds = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    ds += dov[i] * tmp[i];
    dq[i] = 0.f;
  }
  const float dsum = warp_sum(ds);
  if (lane == 0) dsum_ws[row] = dsum;

  const float l2 = static_cast<const float*>(p.lse)[row] * kLog2e;
  if (l2 != -INFINITY) {  // else no allowed key: dq = 0
    const T* kbase = static_cast<const T*>(p.k) + offset_of(p.k_stride, r.b, 0, r.n, r.h);
    const T* vbase = static_cast<const T*>(p.v) + offset_of(p.v_stride, r.b, 0, r.n, r.h);
    const int64_t j_end = p.causal ? r.f + 1 : F;
    for (int64_t j = 0; j < j_end; ++j) {
      if (p.key_mask != nullptr && !p.key_mask[r.b * F + j]) continue;
      const T* kr = kbase + j * p.k_stride.f;
      float s, dp;
      warp_dot2(qv, kr, dov, vbase + j * p.v_stride.f, Dh, lane, s, dp);
      const float pr = exp2f(s * scale_log2 - l2);
      const float dsv = pr * (dp - dsum);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + i * kWarp;
        if (d < Dh) dq[i] += dsv * to_float(kr[d]);
      }
    }
  }
  T* dqr = static_cast<T*>(bp.dq) + offset_of(grad_strides(F, N, Dh, bp.grad_row_stride), r.b, r.f, r.n, r.h);
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + i * kWarp;
    if (d < Dh) dqr[d] = from_float<T>(dq[i] * scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kGenericWarps* kWarp)
    attn_bwd_dkdv_generic_kernel(const TemporalAttnBwdParams bp, const float* __restrict__ dsum_ws, float scale_log2) {
  const TemporalAttnFwdParams& p = bp.fwd;
  const int64_t F = p.F, N = p.N, H = p.H;
  const int Dh = static_cast<int>(p.Dh);
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + threadIdx.x / kWarp;
  if (row >= p.B * N * H * F) return;
  const RowIndex r = row_index(row, N, H, F);  // r.f is the key frame j
  const AttnStrides cs = contiguous_strides(F, N, H, Dh);

  float kv[kPerLane], vv[kPerLane], dk[kPerLane], dv[kPerLane];
  load_slice(kv, static_cast<const T*>(p.k) + offset_of(p.k_stride, r.b, r.f, r.n, r.h), Dh, lane);
  load_slice(vv, static_cast<const T*>(p.v) + offset_of(p.v_stride, r.b, r.f, r.n, r.h), Dh, lane);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dk[i] = dv[i] = 0.f;

  const bool key_allowed = p.key_mask == nullptr || p.key_mask[r.b * F + r.f];
  if (key_allowed) {
    const T* qbase = static_cast<const T*>(p.q) + offset_of(p.q_stride, r.b, 0, r.n, r.h);
    const T* gbase = static_cast<const T*>(bp.grad_out) + offset_of(cs, r.b, 0, r.n, r.h);
    const int64_t stat_base = row - r.f;  // (b, n, h, 0) in lse order
    for (int64_t i = p.causal ? r.f : 0; i < F; ++i) {
      const float l2 = static_cast<const float*>(p.lse)[stat_base + i] * kLog2e;
      if (l2 == -INFINITY) continue;
      const T* qr = qbase + i * p.q_stride.f;
      const T* gr = gbase + i * cs.f;
      float s, dp;
      warp_dot2(kv, qr, vv, gr, Dh, lane, s, dp);
      const float pr = exp2f(s * scale_log2 - l2);
      const float dsv = pr * (dp - dsum_ws[stat_base + i]);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int d = lane + e * kWarp;
        if (d < Dh) {
          dv[e] += pr * to_float(gr[d]);
          dk[e] += dsv * to_float(qr[d]);
        }
      }
    }
  }
  const int64_t goff = offset_of(grad_strides(F, N, Dh, bp.grad_row_stride), r.b, r.f, r.n, r.h);
  T* dkr = static_cast<T*>(bp.dk) + goff;
  T* dvr = static_cast<T*>(bp.dv) + goff;
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + e * kWarp;
    if (d < Dh) {
      dkr[d] = from_float<T>(dk[e] * scale);
      dvr[d] = from_float<T>(dv[e]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// launch

template <typename T, int kDh>
void launch_bwd_tc(const TemporalAttnBwdParams& bp, const TcConfig& cfg, cudaStream_t stream) {
  FVDM_LAUNCH_KERNEL((attn_bwd_tc_kernel<T, kDh>), tc_blocks(bp.fwd, cfg, "temporal_attention_backward"),
                     kWarps * kWarp, static_cast<size_t>(cfg.smem), stream, bp, cfg);
}

template <typename T>
void bwd_typed(const TemporalAttnBwdParams& bp, cudaStream_t stream) {
  const TemporalAttnFwdParams& p = bp.fwd;
  if constexpr (!std::is_same_v<T, float>) {
    const bool aligned4 = qkv_rows_aligned(p, 4) && is_aligned(bp.grad_out, 4) && is_aligned(bp.dq, 4) &&
                          is_aligned(bp.dk, 4) && is_aligned(bp.dv, 4);
    const bool vec16 =
        qkv_rows_aligned(p, 16) && rows_aligned(bp.grad_out, contiguous_strides(p.F, p.N, p.H, p.Dh), 16);
    if (const auto cfg = plan_tensor_core(p, /*backward=*/true, aligned4, vec16)) {
      FVDM_HEADDIM_SWITCH(p.Dh, kDh, [&] { launch_bwd_tc<T, kDh>(bp, *cfg, stream); });
      return;
    }
  }
  const unsigned blocks = generic_blocks(p, "temporal_attention_backward");
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  Workspace dsum(p.B * p.N * p.H * p.F);  // Dsum of every row
  FVDM_LAUNCH_KERNEL(attn_bwd_dq_generic_kernel<T>, blocks, kGenericWarps * kWarp, 0, stream, bp, dsum.data(),
                     scale_log2);
  FVDM_LAUNCH_KERNEL(attn_bwd_dkdv_generic_kernel<T>, blocks, kGenericWarps * kWarp, 0, stream, bp, dsum.data(),
                     scale_log2);
}

}  // namespace

void temporal_attn_bwd(const TemporalAttnBwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.fwd.dtype, "temporal_attn_bwd_cuda", [&] { bwd_typed<scalar_t>(p, stream); });
}

}  // namespace fvdm::cuda
