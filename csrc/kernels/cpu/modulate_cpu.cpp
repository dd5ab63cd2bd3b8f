// CPU kernels for per-frame adaLN modulation and the per-frame gated residual.
// Each row of D is brought into an op-math buffer once (it stays in L1), so the forward reads
// x once and writes y once; statistics are two-pass over the cached row for accuracy.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "cpu_utils.h"
#include "fvdm/dispatch.h"
#include "fvdm/kernels.h"

namespace fvdm::cpu {
namespace {

template <typename scalar_t, typename opmath_t>
void adaln_fwd_impl(const AdalnFwdParams& p) {
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* shift = static_cast<const scalar_t*>(p.shift);
  const auto* scale = static_cast<const scalar_t*>(p.scale);
  auto* y = static_cast<scalar_t*>(p.y);
  auto* mean_out = static_cast<opmath_t*>(p.mean);
  auto* rstd_out = static_cast<opmath_t*>(p.rstd);
  const int64_t D = p.D, N = p.N;
  const opmath_t inv_d = opmath_t(1) / opmath_t(D);
  at::parallel_for(0, p.BF * N, grain_rows(D), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buf(D);
    opmath_t* __restrict__ r = buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* __restrict__ xr = x + row * D;
      const scalar_t* __restrict__ sh = shift + (row / N) * D;
      const scalar_t* __restrict__ sc = scale + (row / N) * D;
      scalar_t* __restrict__ yr = y + row * D;
      opmath_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) {
        r[d] = static_cast<opmath_t>(xr[d]);
        sum += r[d];
      }
      const opmath_t mean = sum * inv_d;
      opmath_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < D; ++d) {
        const opmath_t c = r[d] - mean;
        sq += c * c;
      }
      const opmath_t rstd = opmath_t(1) / std::sqrt(sq * inv_d + static_cast<opmath_t>(p.eps));
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const opmath_t xhat = (r[d] - mean) * rstd;
        yr[d] = static_cast<scalar_t>(xhat * (opmath_t(1) + static_cast<opmath_t>(sc[d])) +
                                      static_cast<opmath_t>(sh[d]));
      }
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  });
}

// One pass per row: dshift/dscale partial sums and dx from the same loaded row.
// dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' = dy * (1 + scale).
template <typename scalar_t, typename opmath_t>
void adaln_bwd_impl(const AdalnBwdParams& p) {
  const auto* gy = static_cast<const scalar_t*>(p.grad_y);
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* scale = static_cast<const scalar_t*>(p.scale);
  const auto* mean = static_cast<const opmath_t*>(p.mean);
  const auto* rstd = static_cast<const opmath_t*>(p.rstd);
  auto* dx = static_cast<scalar_t*>(p.dx);
  const int64_t D = p.D, N = p.N;
  const opmath_t inv_d = opmath_t(1) / opmath_t(D);
  // acc layout per frame: [dshift (D) | dscale (D)]
  auto sums = frame_chunked_reduce<opmath_t>(p.BF, N, 2 * D, [&](int64_t bf, int64_t n0, int64_t n1, opmath_t* acc) {
    std::vector<opmath_t> buf(3 * D);
    opmath_t* __restrict__ xhat = buf.data();
    opmath_t* __restrict__ gm = buf.data() + D;
    opmath_t* __restrict__ one_plus_sc = buf.data() + 2 * D;
    opmath_t* __restrict__ dsh = acc;
    opmath_t* __restrict__ dsc = acc + D;
    const scalar_t* __restrict__ sc = scale + bf * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) one_plus_sc[d] = opmath_t(1) + static_cast<opmath_t>(sc[d]);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = bf * N + n;
      const scalar_t* __restrict__ xr = x + row * D;
      const scalar_t* __restrict__ gr = gy + row * D;
      scalar_t* __restrict__ dxr = dx + row * D;
      const opmath_t mu = mean[row], rs = rstd[row];
      opmath_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t d = 0; d < D; ++d) {
        const opmath_t g = static_cast<opmath_t>(gr[d]);
        const opmath_t xh = (static_cast<opmath_t>(xr[d]) - mu) * rs;
        xhat[d] = xh;
        dsh[d] += g;
        dsc[d] += g * xh;
        const opmath_t gg = g * one_plus_sc[d];
        gm[d] = gg;
        s1 += gg;
        s2 += gg * xh;
      }
      const opmath_t c1 = s1 * inv_d, c2 = s2 * inv_d;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dxr[d] = static_cast<scalar_t>(rs * (gm[d] - c1 - xhat[d] * c2));
    }
  });
  auto* dshift = static_cast<scalar_t*>(p.dshift);
  auto* dscale = static_cast<scalar_t*>(p.dscale);
  for (int64_t bf = 0; bf < p.BF; ++bf)
    for (int64_t d = 0; d < D; ++d) {
      dshift[bf * D + d] = static_cast<scalar_t>(sums[bf * 2 * D + d]);
      dscale[bf * D + d] = static_cast<scalar_t>(sums[bf * 2 * D + D + d]);
    }
}

template <typename scalar_t, typename opmath_t>
void gated_fwd_impl(const GatedResidualFwdParams& p) {
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* h = static_cast<const scalar_t*>(p.h);
  const auto* gate = static_cast<const scalar_t*>(p.gate);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t D = p.D, N = p.N;
  at::parallel_for(0, p.BF * N, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* __restrict__ xr = x + row * D;
      const scalar_t* __restrict__ hr = h + row * D;
      const scalar_t* __restrict__ g = gate + (row / N) * D;
      scalar_t* __restrict__ o = out + row * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        o[d] = static_cast<scalar_t>(static_cast<opmath_t>(xr[d]) +
                                     static_cast<opmath_t>(g[d]) * static_cast<opmath_t>(hr[d]));
    }
  });
}

template <typename scalar_t, typename opmath_t>
void gated_bwd_impl(const GatedResidualBwdParams& p) {
  const auto* go = static_cast<const scalar_t*>(p.grad_out);
  const auto* h = static_cast<const scalar_t*>(p.h);
  const auto* gate = static_cast<const scalar_t*>(p.gate);
  auto* dh = static_cast<scalar_t*>(p.dh);
  const int64_t D = p.D, N = p.N;
  auto sums = frame_chunked_reduce<opmath_t>(p.BF, N, D, [&](int64_t bf, int64_t n0, int64_t n1, opmath_t* acc) {
    const scalar_t* __restrict__ g = gate + bf * D;
    opmath_t* __restrict__ dg = acc;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = bf * N + n;
      const scalar_t* __restrict__ gr = go + row * D;
      const scalar_t* __restrict__ hr = h + row * D;
      scalar_t* __restrict__ dhr = dh + row * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const opmath_t gg = static_cast<opmath_t>(gr[d]);
        dhr[d] = static_cast<scalar_t>(gg * static_cast<opmath_t>(g[d]));
        dg[d] += gg * static_cast<opmath_t>(hr[d]);
      }
    }
  });
  auto* dgate = static_cast<scalar_t*>(p.dgate);
  for (int64_t i = 0; i < p.BF * D; ++i) dgate[i] = static_cast<scalar_t>(sums[i]);
}

}  // namespace

void adaln_fwd(const AdalnFwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "adaln_fwd", [&] { adaln_fwd_impl<scalar_t, opmath_t>(p); });
}
void adaln_bwd(const AdalnBwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "adaln_bwd", [&] { adaln_bwd_impl<scalar_t, opmath_t>(p); });
}
void gated_residual_fwd(const GatedResidualFwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "gated_residual_fwd", [&] { gated_fwd_impl<scalar_t, opmath_t>(p); });
}
void gated_residual_bwd(const GatedResidualBwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "gated_residual_bwd", [&] { gated_bwd_impl<scalar_t, opmath_t>(p); });
}

}  // namespace fvdm::cpu
