// CUDA kernels for per-frame adaLN modulation and the per-frame gated residual.
// Rows are (bf, n) of length D; the per-frame tables shift/scale/gate are (BF, D).
//
// adaln forward
//   fast:    one warp per row (4 rows per 128-thread block). Each lane loads its columns as
//            16-byte vectors and keeps them in registers (D <= 1536), so x is read once;
//            mean, then the variance of the cached values (two-pass, accurate), by warp shuffles.
//   generic: one block per row, scalar loads, block reductions (any D, any alignment).
// adaln backward, one pass: each block owns one frame's chunk of rows.
//   fast:    a thread owns one 16-byte column vector; the block walks the chunk R rows at a
//            time, block-reduces the two row sums dx needs, writes dx, and keeps the frame's
//            dshift/dscale partials for its columns in registers. Partials go to a fp32
//            workspace [chunk][bf][2D], summed in a fixed order by a small second kernel, so
//            the result is deterministic.
//   generic: same, scalar, columns strided over the block, partials accumulated in place in
//            the workspace (each thread touches only its own columns).
// gated residual forward: flat grid-stride loop over 16-byte vectors (scalar if unaligned).
// gated residual backward: per (frame, chunk) block, a thread owns a column vector and walks
//   the chunk's rows: dh written as it goes, dgate partial to the workspace, then the same
//   fixed-order reduction.
#include "common.cuh"
#include "fvdm/kernels.h"
#include "launch_utils.cuh"

namespace fvdm::cuda {
namespace {

constexpr int kFwdWarps = 4;
constexpr int kMaxRowElems = 1536;  // fast adaLN forward keeps a row of up to this many in registers
constexpr int kBwdRows = 4;         // rows per block reduction in the fast adaLN backward
constexpr int kMaxWarpsPerBlock = 32;

// ---------------------------------------------------------------------------------------------
// adaLN forward

template <typename T>
__global__ void __launch_bounds__(kFwdWarps* kWarp)
    adaln_fwd_warp_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                          T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                          int64_t N, int D, float eps) {
  constexpr int V = vec16<T>();
  constexpr int kMaxVecs = kMaxRowElems / (kWarp * V);
  using VT = Vec<T, V>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warp leaves together; no block barriers below
  const int nvec = D / V;
  const VT* xr = reinterpret_cast<const VT*>(x + row * D);

  VT buf[kMaxVecs];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVecs; ++i) {
    const int c = lane + i * kWarp;
    if (c < nvec) {
      buf[i] = xr[c];
#pragma unroll
      for (int j = 0; j < V; ++j) sum += to_float(buf[i].v[j]);
    }
  }
  const float inv_d = 1.f / static_cast<float>(D);
  const float mu = warp_sum(sum) * inv_d;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxVecs; ++i) {
    if (lane + i * kWarp < nvec) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = to_float(buf[i].v[j]) - mu;
        sq += d * d;
      }
    }
  }
  const float rs = rsqrtf(warp_sum(sq) * inv_d + eps);

  const int64_t bf = row / N;
  const VT* shr = reinterpret_cast<const VT*>(shift + bf * D);
  const VT* scr = reinterpret_cast<const VT*>(scale + bf * D);
  VT* yr = reinterpret_cast<VT*>(y + row * D);
#pragma unroll
  for (int i = 0; i < kMaxVecs; ++i) {
    const int c = lane + i * kWarp;
    if (c < nvec) {
      const VT sh = shr[c], sc = scr[c];
      VT out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xhat = (to_float(buf[i].v[j]) - mu) * rs;
        out.v[j] = from_float<T>(xhat * (1.f + to_float(sc.v[j])) + to_float(sh.v[j]));
      }
      yr[c] = out;
    }
  }
  if (lane == 0) {
    mean_out[row] = mu;
    rstd_out[row] = rs;
  }
}

template <typename T>
__global__ void adaln_fwd_block_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                       const T* __restrict__ scale, T* __restrict__ y, float* __restrict__ mean_out,
                                       float* __restrict__ rstd_out, int64_t N, int D, float eps) {
  FVDM_SHARED(float, red, kMaxWarpsPerBlock);
  const int64_t row = blockIdx.x;
  const T* xr = x + row * D;
  const float inv_d = 1.f / static_cast<float>(D);
  float s[1] = {0.f};
  for (int c = threadIdx.x; c < D; c += blockDim.x) s[0] += to_float(xr[c]);
  block_sum<1>(s, red);
  const float mu = s[0] * inv_d;
  float q[1] = {0.f};
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float d = to_float(xr[c]) - mu;
    q[0] += d * d;
  }
  block_sum<1>(q, red);
  const float rs = rsqrtf(q[0] * inv_d + eps);
  const int64_t bf = row / N;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float xhat = (to_float(xr[c]) - mu) * rs;
    y[row * D + c] = from_float<T>(xhat * (1.f + to_float(scale[bf * D + c])) + to_float(shift[bf * D + c]));
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mu;
    rstd_out[row] = rs;
  }
}

// ---------------------------------------------------------------------------------------------
// adaLN backward: dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' = dy * (1 + scale);
// dshift = sum_n dy, dscale = sum_n dy * xhat.

template <typename T>
__global__ void adaln_bwd_cols_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ scale,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      T* __restrict__ dx, float* __restrict__ ws, int64_t BF, int64_t N, int D,
                                      int64_t rows_per_chunk, int chunks) {
  constexpr int V = vec16<T>();
  constexpr int R = kBwdRows;
  using VT = Vec<T, V>;
  FVDM_SHARED(float, red, 2 * R * kMaxWarpsPerBlock);
  const int64_t bf = blockIdx.x / chunks;
  const int chunk = blockIdx.x % chunks;
  const int nvec = D / V;
  const int c = threadIdx.x;
  const bool active = c < nvec;
  const int64_t n0 = chunk * rows_per_chunk;
  const int64_t n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
  const VT* gyv = reinterpret_cast<const VT*>(gy);
  const VT* xv = reinterpret_cast<const VT*>(x);
  VT* dxv = reinterpret_cast<VT*>(dx);

  float one_plus[V], dsh[V], dsc[V];
  {
    VT s{};
    if (active) s = reinterpret_cast<const VT*>(scale + bf * D)[c];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      one_plus[j] = 1.f + to_float(s.v[j]);
      dsh[j] = 0.f;
      dsc[j] = 0.f;
    }
  }
  const float inv_d = 1.f / static_cast<float>(D);

  for (int64_t n = n0; n < n1; n += R) {  // n0, n1 are block-uniform: barriers inside are safe
    VT g[R], xr[R];
    float mu[R], rs[R], s[2 * R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = bf * N + n + r;
      const bool ok = n + r < n1;
      mu[r] = ok ? mean[row] : 0.f;
      rs[r] = ok ? rstd[row] : 0.f;
      s[2 * r] = 0.f;
      s[2 * r + 1] = 0.f;
      if (ok && active) {
        g[r] = gyv[row * nvec + c];
        xr[r] = xv[row * nvec + c];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float gj = to_float(g[r].v[j]);
          const float xh = (to_float(xr[r].v[j]) - mu[r]) * rs[r];
          const float gg = gj * one_plus[j];
          s[2 * r] += gg;
          s[2 * r + 1] += gg * xh;
          dsh[j] += gj;
          dsc[j] += gj * xh;
        }
      }
    }
    block_sum<2 * R>(s, red);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (n + r < n1 && active) {
        const int64_t row = bf * N + n + r;
        const float c1 = s[2 * r] * inv_d, c2 = s[2 * r + 1] * inv_d;
        VT out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float xh = (to_float(xr[r].v[j]) - mu[r]) * rs[r];
          const float gg = to_float(g[r].v[j]) * one_plus[j];
          out.v[j] = from_float<T>(rs[r] * (gg - c1 - xh * c2));
        }
        dxv[row * nvec + c] = out;
      }
    }
  }
  if (active) {
    float* w = ws + (chunk * BF + bf) * 2 * D;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      w[c * V + j] = dsh[j];
      w[D + c * V + j] = dsc[j];
    }
  }
}

template <typename T>
__global__ void adaln_bwd_generic_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                                         const T* __restrict__ scale, const float* __restrict__ mean,
                                         const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ ws,
                                         int64_t BF, int64_t N, int D, int64_t rows_per_chunk, int chunks) {
  FVDM_SHARED(float, red, 2 * kMaxWarpsPerBlock);
  const int64_t bf = blockIdx.x / chunks;
  const int chunk = blockIdx.x % chunks;
  const int64_t n0 = chunk * rows_per_chunk;
  const int64_t n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
  const float inv_d = 1.f / static_cast<float>(D);
  const T* sc = scale + bf * D;
  float* w = ws + (chunk * BF + bf) * 2 * D;  // this block's partials; thread c owns columns c, c+blockDim, ...
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    w[c] = 0.f;
    w[D + c] = 0.f;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = bf * N + n;
    const float mu = mean[row], rs = rstd[row];
    float s[2] = {0.f, 0.f};
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float g = to_float(gy[row * D + c]);
      const float xh = (to_float(x[row * D + c]) - mu) * rs;
      const float gg = g * (1.f + to_float(sc[c]));
      s[0] += gg;
      s[1] += gg * xh;
      w[c] += g;
      w[D + c] += g * xh;
    }
    block_sum<2>(s, red);
    const float c1 = s[0] * inv_d, c2 = s[1] * inv_d;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float xh = (to_float(x[row * D + c]) - mu) * rs;
      const float gg = to_float(gy[row * D + c]) * (1.f + to_float(sc[c]));
      dx[row * D + c] = from_float<T>(rs * (gg - c1 - xh * c2));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gated residual

template <typename T, int V>
__global__ void gated_fwd_kernel(const T* __restrict__ x, const T* __restrict__ h, const T* __restrict__ gate,
                                 T* __restrict__ out, int64_t nvec_total, int64_t ND, int D) {
  using VT = Vec<T, V>;
  const VT* xv = reinterpret_cast<const VT*>(x);
  const VT* hv = reinterpret_cast<const VT*>(h);
  VT* ov = reinterpret_cast<VT*>(out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec_total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * V;  // D % V == 0, so the vector lies in one row
    const int64_t bf = e / ND;
    const int64_t d = e % D;
    const VT a = xv[i], b = hv[i];
    const VT g = *reinterpret_cast<const VT*>(gate + bf * D + d);
    VT o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(to_float(a.v[j]) + to_float(g.v[j]) * to_float(b.v[j]));
    ov[i] = o;
  }
}

template <typename T, int V>
__global__ void gated_bwd_kernel(const T* __restrict__ go, const T* __restrict__ h, const T* __restrict__ gate,
                                 T* __restrict__ dh, float* __restrict__ ws, int64_t BF, int64_t N, int D,
                                 int64_t rows_per_chunk, int chunks) {
  using VT = Vec<T, V>;
  const int64_t bf = blockIdx.x / chunks;
  const int chunk = blockIdx.x % chunks;
  const int64_t n0 = chunk * rows_per_chunk;
  const int64_t n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
  const int nvec = D / V;
  const VT* gov = reinterpret_cast<const VT*>(go);
  const VT* hv = reinterpret_cast<const VT*>(h);
  VT* dhv = reinterpret_cast<VT*>(dh);
  for (int cv = threadIdx.x; cv < nvec; cv += blockDim.x) {
    const VT gt = *reinterpret_cast<const VT*>(gate + bf * D + cv * V);
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
#pragma unroll 4
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t idx = (bf * N + n) * nvec + cv;
      const VT g = gov[idx], hh = hv[idx];
      VT o;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float gj = to_float(g.v[j]);
        acc[j] += gj * to_float(hh.v[j]);
        o.v[j] = from_float<T>(gj * to_float(gt.v[j]));
      }
      dhv[idx] = o;
    }
    float* w = ws + (chunk * BF + bf) * D + cv * V;
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = acc[j];
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

int threads_for_columns(int64_t columns, int cap) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(columns, kWarp) * kWarp, kWarp, cap));
}

void check_sizes(int64_t D, int64_t blocks) {
  TORCH_CHECK(D <= INT32_MAX, "fvdm: D = ", D, " is too large for the CUDA kernels");
  TORCH_CHECK(blocks <= INT32_MAX, "fvdm: too many rows for one CUDA launch (", blocks, " blocks)");
}

template <typename T>
void adaln_fwd_typed(const AdalnFwdParams& p, cudaStream_t stream) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* shift = static_cast<const T*>(p.shift);
  const auto* scale = static_cast<const T*>(p.scale);
  auto* y = static_cast<T*>(p.y);
  auto* mean = static_cast<float*>(p.mean);
  auto* rstd = static_cast<float*>(p.rstd);
  const int64_t rows = p.BF * p.N;
  const int D = static_cast<int>(p.D);
  const float eps = static_cast<float>(p.eps);
  constexpr int V = vec16<T>();
  const bool fast = p.D % V == 0 && p.D <= kMaxRowElems && is_aligned(x, 16) && is_aligned(shift, 16) &&
                    is_aligned(scale, 16) && is_aligned(y, 16);
  if (fast) {
    const int64_t blocks = ceil_div(rows, kFwdWarps);
    check_sizes(p.D, blocks);
    FVDM_LAUNCH_KERNEL(adaln_fwd_warp_kernel<T>, static_cast<unsigned>(blocks), kFwdWarps * kWarp, 0, stream, x, shift, scale, y, mean, rstd, rows, p.N, D, eps);
  } else {
    check_sizes(p.D, rows);
    FVDM_LAUNCH_KERNEL(adaln_fwd_block_kernel<T>, static_cast<unsigned>(rows), threads_for_columns(p.D, 256), 0, stream, x, shift, scale, y, mean, rstd, p.N, D, eps);
  }
}

template <typename T>
void adaln_bwd_typed(const AdalnBwdParams& p, cudaStream_t stream) {
  const auto* gy = static_cast<const T*>(p.grad_y);
  const auto* x = static_cast<const T*>(p.x);
  const auto* scale = static_cast<const T*>(p.scale);
  const auto* mean = static_cast<const float*>(p.mean);
  const auto* rstd = static_cast<const float*>(p.rstd);
  auto* dx = static_cast<T*>(p.dx);
  const int D = static_cast<int>(p.D);
  constexpr int V = vec16<T>();
  const int chunks = reduction_chunks(p.BF, p.N, 4 * kBwdRows);
  const int64_t rows_per_chunk = ceil_div(p.N, chunks);
  const int64_t blocks = p.BF * chunks;
  check_sizes(p.D, blocks);
  Workspace ws(static_cast<int64_t>(chunks) * p.BF * 2 * p.D);
  const bool fast = p.D % V == 0 && p.D / V <= kMaxWarpsPerBlock * kWarp && is_aligned(gy, 16) &&
                    is_aligned(x, 16) && is_aligned(scale, 16) && is_aligned(dx, 16);
  if (fast) {
    FVDM_LAUNCH_KERNEL(adaln_bwd_cols_kernel<T>, static_cast<unsigned>(blocks), threads_for_columns(p.D / V, 1024), 0, stream, gy, x, scale, mean, rstd, dx, ws.data(), p.BF, p.N, D, rows_per_chunk, chunks);
  } else {
    FVDM_LAUNCH_KERNEL(adaln_bwd_generic_kernel<T>, static_cast<unsigned>(blocks), threads_for_columns(p.D, 256), 0, stream, gy, x, scale, mean, rstd, dx, ws.data(), p.BF, p.N, D, rows_per_chunk, chunks);
  }
  launch_reduce_chunks<T>(ws.data(), static_cast<T*>(p.dshift), static_cast<T*>(p.dscale), p.BF, 2 * p.D, p.D, chunks,
                          stream);
}

template <typename T>
void gated_fwd_typed(const GatedResidualFwdParams& p, cudaStream_t stream) {
  const auto* x = static_cast<const T*>(p.x);
  const auto* h = static_cast<const T*>(p.h);
  const auto* gate = static_cast<const T*>(p.gate);
  auto* out = static_cast<T*>(p.out);
  const int64_t total = p.BF * p.N * p.D;
  constexpr int V = vec16<T>();
  constexpr int kThreads = 256;
  check_sizes(p.D, 1);
  const bool fast = p.D % V == 0 && is_aligned(x, 16) && is_aligned(h, 16) && is_aligned(gate, 16) &&
                    is_aligned(out, 16);
  if (fast) {
    FVDM_LAUNCH_KERNEL((gated_fwd_kernel<T, V>), grid_for(total / V, kThreads), kThreads, 0, stream, x, h, gate, out, total / V, p.N * p.D, static_cast<int>(p.D));
  } else {
    FVDM_LAUNCH_KERNEL((gated_fwd_kernel<T, 1>), grid_for(total, kThreads), kThreads, 0, stream, x, h, gate, out, total, p.N * p.D, static_cast<int>(p.D));
  }
}

template <typename T>
void gated_bwd_typed(const GatedResidualBwdParams& p, cudaStream_t stream) {
  const auto* go = static_cast<const T*>(p.grad_out);
  const auto* h = static_cast<const T*>(p.h);
  const auto* gate = static_cast<const T*>(p.gate);
  auto* dh = static_cast<T*>(p.dh);
  constexpr int V = vec16<T>();
  const int chunks = reduction_chunks(p.BF, p.N, 8);
  const int64_t rows_per_chunk = ceil_div(p.N, chunks);
  const int64_t blocks = p.BF * chunks;
  check_sizes(p.D, blocks);
  Workspace ws(static_cast<int64_t>(chunks) * p.BF * p.D);
  const bool fast = p.D % V == 0 && is_aligned(go, 16) && is_aligned(h, 16) && is_aligned(gate, 16) &&
                    is_aligned(dh, 16);
  if (fast) {
    FVDM_LAUNCH_KERNEL((gated_bwd_kernel<T, V>), static_cast<unsigned>(blocks), threads_for_columns(p.D / V, 256), 0, stream, go, h, gate, dh, ws.data(), p.BF, p.N, static_cast<int>(p.D), rows_per_chunk, chunks);
  } else {
    FVDM_LAUNCH_KERNEL((gated_bwd_kernel<T, 1>), static_cast<unsigned>(blocks), threads_for_columns(p.D, 256), 0, stream, go, h, gate, dh, ws.data(), p.BF, p.N, static_cast<int>(p.D), rows_per_chunk, chunks);
  }
  auto* dgate = static_cast<T*>(p.dgate);
  launch_reduce_chunks<T>(ws.data(), dgate, dgate, p.BF, p.D, p.D, chunks, stream);
}

}  // namespace

void adaln_fwd(const AdalnFwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "adaln_fwd_cuda", [&] { adaln_fwd_typed<scalar_t>(p, stream); });
}
void adaln_bwd(const AdalnBwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "adaln_bwd_cuda", [&] { adaln_bwd_typed<scalar_t>(p, stream); });
}
void gated_residual_fwd(const GatedResidualFwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "gated_residual_fwd_cuda", [&] { gated_fwd_typed<scalar_t>(p, stream); });
}
void gated_residual_bwd(const GatedResidualBwdParams& p, cudaStream_t stream) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "gated_residual_bwd_cuda", [&] { gated_bwd_typed<scalar_t>(p, stream); });
}

}  // namespace fvdm::cuda
