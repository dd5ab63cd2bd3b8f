// CPU kernels for per-frame adaLN modulation and the per-frame gated residual.
// Rows of D are handled in op-math type: bf16/fp16 rows are converted into small L1 buffers in
// bulk (convert.h), fp32/fp64 rows are used in place; where AVX-512 allows (FVDM_AVX512)
// fp32, bf16 and fp16 go straight through registers instead (adaln_rows, adaln_bwd_rows for
// bf16/fp16, the gated residual's bf16/fp16 loops). The forward reads x once and writes y once.
#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "cpu_utils.h"
#include "fvdm/dispatch.h"
#include "fvdm/kernels.h"

namespace fvdm::cpu {
namespace {

// Large fp32/fp64 outputs are streamed (use_streaming, convert.h): fp32 straight from
// registers (stream_row), fp64 (gradcheck only) through a row buffer and stream_copy.

// Where a row result is computed: straight into the output for fp32/fp64 stored normally,
// else into `buf` (converted, or streamed, by flush_row). End a chunk with stream_fence().
template <typename scalar_t, typename opmath_t>
inline opmath_t* out_row(scalar_t* dst, opmath_t* buf, bool stream) {
  if constexpr (kNeedsConversion<scalar_t>) return buf;
  else return stream ? buf : reinterpret_cast<opmath_t*>(dst);
}
template <typename scalar_t, typename opmath_t>
inline void flush_row(const opmath_t* buf, scalar_t* dst, int64_t n, bool stream) {
  if constexpr (kNeedsConversion<scalar_t>) from_opmath(buf, dst, n);
  else if (stream) stream_copy(buf, dst, n * static_cast<int64_t>(sizeof(scalar_t)));
}

// Per-frame table rows in op-math type, reconverted only when the frame changes.
template <typename scalar_t, typename opmath_t>
struct FrameTables {
  std::vector<opmath_t> a, b;
  int64_t frame = -1, end = 0;  // rows [frame * N, end) use these tables
  explicit FrameTables(int64_t D) : a(D), b(D) {}
  // True when `row` starts another frame (then `frame` is set): one division per frame, not per row.
  bool next(int64_t row, int64_t N) {
    if (row < end) return false;
    frame = row / N;
    end = (frame + 1) * N;
    return true;
  }
};

#if defined(FVDM_AVX512)
// A whole vector of an output row: streamed (fp32 only, 64-byte aligned) or stored.
template <typename T>
inline void put16(T* p, __m512 v, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (stream) return _mm512_stream_ps(p, v);
  }
  store16(p, v, Full{});
}

// Prefetches into L1 the `bytes` from each of K addresses (the rows after the current block),
// spread evenly over the `steps` calls of step() that a pass over the current block makes: the
// next block's loads are in flight while this one is computed, without a burst that stalls it.
template <int K>
struct TrickleRows {
  std::array<const void*, K> next;
  int64_t lines, per_step, line = 0;
  TrickleRows(std::array<const void*, K> next_rows, int64_t bytes, int64_t steps)
      : next(next_rows), lines((bytes + 63) / 64), per_step((lines + steps - 1) / std::max<int64_t>(1, steps)) {}
  void step() {
    for (const int64_t stop = std::min(lines, line + per_step); line < stop; ++line)
      for (int k = 0; k < K; ++k) _mm_prefetch(static_cast<const char*>(next[k]) + 64 * line, _MM_HINT_T0);
  }
};

// Calls f(std::integral_constant<int, R>) for a block of R = 4, 2 or 1 rows, the most of those
// that `left` rows allow; returns R. The row kernels below take R as a template argument.
template <typename F>
inline int64_t with_row_block(int64_t left, const F& f) {
  if (left >= 4) return f(std::integral_constant<int, 4>{}), 4;
  if (left >= 2) return f(std::integral_constant<int, 2>{}), 2;
  return f(std::integral_constant<int, 1>{}), 1;
}

// The forward for R rows of one frame at a time (R <= 4), fp32, bf16 or fp16, all in registers.
// Statistics come from one pass of shifted sums: with k the mean of the row's first 16 values,
// var = E[(x-k)^2] - E[x-k]^2 loses at most D/16 ulps to cancellation (|mean - k|^2 <= var *
// D/16), where a second pass would read the row again. When those first min(D, 16) values are
// all x[0], k is x[0] itself: a constant row (as the reference has it, mean = x and x - mean = 0
// exactly, however large x or inexact its D-fold sum) then sums zeros, its mean is exact and
// its output exactly shift, which a mean of fewer than 16 equal values (D < 16), rounded, would
// miss. The output is fma((x - mean) * rstd, 1 + scale, shift), the table values loaded once for
// the R rows: x - mean is exact near the mean, where fma(x, rstd, -mean * rstd) would return the
// rounding error of mean * rstd (~1e-3 at |x| = 100 on a constant row, rstd = 1/sqrt(eps)). While the
// block's output is computed from L1, the next `prefetch_rows` rows are prefetched, so that a
// load is in flight during that pass.
// `stream` needs every row to start on a cache line.
template <int R, typename T>
inline void adaln_rows(const T* x, const float* sh, const float* sc1, T* y, float* mean_out, float* rstd_out,
                       int64_t D, float eps, bool stream, int64_t prefetch_rows) {
  const int64_t body = D / 16 * 16;
  const __mmask16 tail = first_lanes(D - body);
  const float inv_d = 1.0f / static_cast<float>(D);
  const __mmask16 head = first_lanes(D);
  __m512 k[R], s1[R], s2[R], mr[R], mv[R];
  for (int r = 0; r < R; ++r) {
    const __m512 first = load16(x + r * D, head), x0 = _mm512_set1_ps(_mm512_cvtss_f32(first));
    k[r] = (_mm512_cmp_ps_mask(first, x0, _CMP_EQ_OQ) & head) == head
               ? x0
               : _mm512_set1_ps(_mm512_reduce_add_ps(first) / static_cast<float>(std::min<int64_t>(D, 16)));
    s1[r] = s2[r] = _mm512_setzero_ps();
  }
  const auto accumulate = [&](int r, __m512 v) {
    s1[r] = _mm512_add_ps(s1[r], v);
    s2[r] = _mm512_fmadd_ps(v, v, s2[r]);
  };
  for (int64_t d = 0; d < body; d += 16)
    for (int r = 0; r < R; ++r) accumulate(r, _mm512_sub_ps(load16(x + r * D + d, Full{}), k[r]));
  if (tail)
    for (int r = 0; r < R; ++r) accumulate(r, _mm512_maskz_sub_ps(tail, load16(x + r * D + body, tail), k[r]));
  for (int r = 0; r < R; ++r) {
    const float m1 = _mm512_reduce_add_ps(s1[r]) * inv_d;
    const float var = std::max(0.0f, _mm512_reduce_add_ps(s2[r]) * inv_d - m1 * m1);
    const float mean = _mm512_cvtss_f32(k[r]) + m1, rstd = 1.0f / std::sqrt(var + eps);
    mean_out[r] = mean;
    rstd_out[r] = rstd;
    mr[r] = _mm512_set1_ps(rstd);
    mv[r] = _mm512_set1_ps(mean);
  }
  TrickleRows<1> prefetch({x + R * D}, prefetch_rows * D * static_cast<int64_t>(sizeof(T)), body / 16);
  for (int64_t d = 0; d < body; d += 16) {
    const __m512 a = _mm512_loadu_ps(sc1 + d), b = _mm512_loadu_ps(sh + d);
    prefetch.step();
    for (int r = 0; r < R; ++r)
      put16(y + r * D + d, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(load16(x + r * D + d, Full{}), mv[r]), mr[r]), a, b),
            stream);
  }
  if (tail) {
    const __m512 a = _mm512_maskz_loadu_ps(tail, sc1 + body), b = _mm512_maskz_loadu_ps(tail, sh + body);
    for (int r = 0; r < R; ++r)
      store16(y + r * D + body, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(load16(x + r * D + body, tail), mv[r]), mr[r]), a, b),
              tail);
  }
}
#endif

// The shift of a row's one-pass statistics: x[0] when the first min(D, 16) values all equal
// it, else their mean. |mean - k|^2 <= var * D / 16, so var = E[(x-k)^2] - E[x-k]^2 loses at
// most D/16 ulps to cancellation.
template <typename opmath_t, typename scalar_t>
inline opmath_t row_shift(const scalar_t* x, int64_t D) {
  const int64_t n = std::min<int64_t>(D, 16);
  const opmath_t x0 = static_cast<opmath_t>(x[0]);
  opmath_t sum = 0;
  bool constant = true;
  for (int64_t d = 0; d < n; ++d) {
    const opmath_t v = static_cast<opmath_t>(x[d]);
    constant = constant && v == x0;
    sum += v;
  }
  return constant ? x0 : sum / static_cast<opmath_t>(n);
}

template <typename scalar_t, typename opmath_t>
void adaln_fwd_impl(const AdalnFwdParams& p) {
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* shift = static_cast<const scalar_t*>(p.shift);
  const auto* scale = static_cast<const scalar_t*>(p.scale);
  auto* y = static_cast<scalar_t*>(p.y);
  auto* mean_out = static_cast<opmath_t*>(p.mean);
  auto* rstd_out = static_cast<opmath_t*>(p.rstd);
  const int64_t D = p.D, N = p.N;
  const opmath_t inv_d = opmath_t(1) / opmath_t(D), eps = static_cast<opmath_t>(p.eps);
  const bool stream = use_streaming<scalar_t>(p.BF * N * D, 2);  // x in, y out
  // torch's buffers start on a cache line, so every row does when D is a multiple of 16.
  [[maybe_unused]] const bool stream_rows = stream && D % 16 == 0 && (reinterpret_cast<uintptr_t>(y) & 63) == 0;
  at::parallel_for(0, p.BF * N, grain_rows(D), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> in_buf(D), out_buf(D);
    FrameTables<scalar_t, opmath_t> t(D);  // a = shift, b = 1 + scale
    for (int64_t row = begin; row < end; ++row) {
      if (t.next(row, N)) {
        to_opmath(shift + t.frame * D, t.a.data(), D);
        to_opmath(scale + t.frame * D, t.b.data(), D);
        for (auto& v : t.b) v += opmath_t(1);
      }
#if defined(FVDM_AVX512)
      if constexpr (!std::is_same_v<scalar_t, double>) {
        row += with_row_block(std::min(end, t.end) - row, [&](auto r) {
                 constexpr int R = decltype(r)::value;
                 adaln_rows<R>(x + row * D, t.a.data(), t.b.data(), y + row * D, mean_out + row, rstd_out + row, D,
                               static_cast<float>(p.eps), stream_rows, std::min<int64_t>(4, end - row - R));
               }) - 1;
        continue;
      }
#endif
      const opmath_t* __restrict__ r = load_row(x + row * D, in_buf.data(), D);
      const opmath_t* __restrict__ sh = t.a.data();
      const opmath_t* __restrict__ sc1 = t.b.data();
      // One pass of shifted sums, the shift k chosen as adaln_rows chooses it (see there): a
      // constant row sums zeros, so its mean is exact and its output exactly shift. k is read
      // from the source row: read through r (__restrict__ and, for bf16 / fp16, the same
      // buffer every row) the GCC build here gave the previous row's value.
      const opmath_t k = row_shift<opmath_t>(x + row * D, D);
      const auto [s1, s2] = lane_sums_and_squares<opmath_t>(D, [r, k](int64_t d) { return r[d] - k; });
      const opmath_t m1 = s1 * inv_d;
      const opmath_t mean = k + m1;
      const opmath_t rstd = opmath_t(1) / std::sqrt(std::max(opmath_t(0), s2 * inv_d - m1 * m1) + eps);
      mean_out[row] = mean;
      rstd_out[row] = rstd;
      opmath_t* __restrict__ o = out_row(y + row * D, out_buf.data(), stream);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = (r[d] - mean) * rstd * sc1[d] + sh[d];
      flush_row(o, y + row * D, D, stream);
    }
    stream_fence();
  });
}

#if defined(FVDM_AVX512)
// The bf16/fp16 backward for R rows of one frame (R <= 4) in registers. Pass 1 adds the rows into
// the frame's dshift / dscale sums and takes each row's sums of g' and g' xhat; pass 2 writes
// dx, recomputing xhat and g' from the rows (still in L1), and prefetches the next
// `prefetch_rows` rows of both inputs. Faster than the row loop through L1 conversion buffers
// for bf16/fp16; fp32, which that loop reads in place, gains nothing and keeps the loop.
template <int R, typename T>
inline void adaln_bwd_rows(const T* gy, const T* x, const float* sc1, const float* mean, const float* rstd, float* dsh,
                           float* dsc, T* dx, int64_t D, int64_t prefetch_rows) {
  __m512 rs[R], mv[R], s1[R], s2[R];  // xhat = (x - mean) * rstd: exactly 0 on a constant row
  for (int r = 0; r < R; ++r) {
    rs[r] = _mm512_set1_ps(rstd[r]);
    mv[r] = _mm512_set1_ps(mean[r]);
    s1[r] = s2[r] = _mm512_setzero_ps();
  }
  for_lanes(D, [&](int64_t d, auto m) {
    const __m512 c = load16(sc1 + d, m);
    __m512 a = load16(dsh + d, m), b = load16(dsc + d, m);
    for (int r = 0; r < R; ++r) {
      const __m512 g = load16(gy + r * D + d, m);
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load16(x + r * D + d, m), mv[r]), rs[r]);
      a = _mm512_add_ps(a, g);
      b = _mm512_fmadd_ps(g, xh, b);
      const __m512 gg = _mm512_mul_ps(g, c);
      s1[r] = _mm512_add_ps(s1[r], gg);
      s2[r] = _mm512_fmadd_ps(gg, xh, s2[r]);
    }
    store16(dsh + d, a, m);
    store16(dsc + d, b, m);
  });
  const float inv_d = 1.0f / static_cast<float>(D);
  __m512 c1[R], c2[R];  // mean(g') and mean(g' xhat) of each row
  for (int r = 0; r < R; ++r) {
    c1[r] = _mm512_set1_ps(_mm512_reduce_add_ps(s1[r]) * inv_d);
    c2[r] = _mm512_set1_ps(_mm512_reduce_add_ps(s2[r]) * inv_d);
  }
  TrickleRows<2> prefetch({x + R * D, gy + R * D}, prefetch_rows * D * static_cast<int64_t>(sizeof(T)), D / 16);
  for_lanes(D, [&](int64_t d, auto m) {
    const __m512 c = load16(sc1 + d, m);
    prefetch.step();
    for (int r = 0; r < R; ++r) {  // dx = rstd (g' - mean(g') - xhat mean(g' xhat))
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load16(x + r * D + d, m), mv[r]), rs[r]);
      const __m512 gg = _mm512_mul_ps(load16(gy + r * D + d, m), c);
      store16(dx + r * D + d, _mm512_mul_ps(rs[r], _mm512_fnmadd_ps(xh, c2[r], _mm512_sub_ps(gg, c1[r]))), m);
    }
  });
}
#endif

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
  const bool stream = use_streaming<scalar_t>(p.BF * N * D, 3);  // grad_y and x in, dx out
  // acc layout per frame: [dshift (D) | dscale (D)]
  auto sums = frame_chunked_reduce<opmath_t>(p.BF, N, 2 * D, [&](int64_t bf, int64_t n0, int64_t n1, opmath_t* acc) {
    std::vector<opmath_t> buf(5 * D);
    opmath_t* __restrict__ xhat = buf.data();
    opmath_t* __restrict__ gm = buf.data() + D;
    opmath_t* __restrict__ sc1 = buf.data() + 2 * D;
    opmath_t* x_buf = buf.data() + 3 * D;
    opmath_t* g_buf = buf.data() + 4 * D;
    opmath_t* __restrict__ dsh = acc;
    opmath_t* __restrict__ dsc = acc + D;
    to_opmath(scale + bf * D, sc1, D);
    for (int64_t d = 0; d < D; ++d) sc1[d] += opmath_t(1);
#if defined(FVDM_AVX512)
    if constexpr (kNeedsConversion<scalar_t>) {
      for (int64_t n = n0; n < n1;) {
        const int64_t row = bf * N + n;
        n += with_row_block(n1 - n, [&](auto r) {
          constexpr int R = decltype(r)::value;
          adaln_bwd_rows<R>(gy + row * D, x + row * D, sc1, mean + row, rstd + row, dsh, dsc, dx + row * D, D,
                            std::min<int64_t>(4, n1 - n - R));
        });
      }
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = bf * N + n;
      const opmath_t* __restrict__ xr = load_row(x + row * D, x_buf, D);
      const opmath_t* __restrict__ gr = load_row(gy + row * D, g_buf, D);
      const opmath_t mu = mean[row], rs = rstd[row];
      opmath_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t d = 0; d < D; ++d) {
        const opmath_t g = gr[d];
        const opmath_t xh = (xr[d] - mu) * rs;
        xhat[d] = xh;
        dsh[d] += g;
        dsc[d] += g * xh;
        const opmath_t gg = g * sc1[d];
        gm[d] = gg;
        s1 += gg;
        s2 += gg * xh;
      }
      const opmath_t c1 = s1 * inv_d, c2 = s2 * inv_d;
#if defined(FVDM_AVX512)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stream) {
          const __m512 rv = _mm512_set1_ps(rs), c1v = _mm512_set1_ps(c1), c2v = _mm512_set1_ps(c2);
          stream_row(dx + row * D, D, [&](int64_t d, auto m) {
            const __m512 t = _mm512_fnmadd_ps(load16(xhat + d, m), c2v, _mm512_sub_ps(load16(gm + d, m), c1v));
            return _mm512_mul_ps(rv, t);
          });
          continue;
        }
      }
#endif
      opmath_t* __restrict__ o = out_row(dx + row * D, x_buf, stream);  // x_buf is free again here
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = rs * (gm[d] - c1 - xhat[d] * c2);
      flush_row(o, dx + row * D, D, stream);
    }
    stream_fence();
  });
  auto* dshift = static_cast<scalar_t*>(p.dshift);
  auto* dscale = static_cast<scalar_t*>(p.dscale);
  for (int64_t bf = 0; bf < p.BF; ++bf) {
    from_opmath(sums.data() + bf * 2 * D, dshift + bf * D, D);
    from_opmath(sums.data() + bf * 2 * D + D, dscale + bf * D, D);
  }
}

template <typename scalar_t, typename opmath_t>
void gated_fwd_impl(const GatedResidualFwdParams& p) {
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* h = static_cast<const scalar_t*>(p.h);
  const auto* gate = static_cast<const scalar_t*>(p.gate);
  auto* out = static_cast<scalar_t*>(p.out);
  const int64_t D = p.D, N = p.N;
  const bool stream = use_streaming<scalar_t>(p.BF * N * D, 3);  // x and h in, out out
  at::parallel_for(0, p.BF * N, grain_rows(D), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> x_buf(D), h_buf(D), o_buf(D);
    FrameTables<scalar_t, opmath_t> t(D);  // a = gate
    for (int64_t row = begin; row < end; ++row) {
      if (t.next(row, N)) {
        to_opmath(gate + t.frame * D, t.a.data(), D);
      }
#if defined(FVDM_AVX512)
      if constexpr (kNeedsConversion<scalar_t>) {  // straight from bf16/fp16, no row buffers
        const scalar_t* xr = x + row * D;
        const scalar_t* hr = h + row * D;
        scalar_t* o = out + row * D;
        const float* g = t.a.data();
        for_lanes(D, [&](int64_t d, auto m) {
          store16(o + d, _mm512_fmadd_ps(load16(g + d, m), load16(hr + d, m), load16(xr + d, m)), m);
        });
        continue;
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stream) {
          const float* xr = x + row * D;
          const float* hr = h + row * D;
          const float* g = t.a.data();
          stream_row(out + row * D, D, [&](int64_t d, auto m) {
            return _mm512_fmadd_ps(load16(g + d, m), load16(hr + d, m), load16(xr + d, m));
          });
          continue;
        }
      }
#endif
      const opmath_t* __restrict__ xr = load_row(x + row * D, x_buf.data(), D);
      const opmath_t* __restrict__ hr = load_row(h + row * D, h_buf.data(), D);
      const opmath_t* __restrict__ g = t.a.data();
      opmath_t* __restrict__ o = out_row(out + row * D, o_buf.data(), stream);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = xr[d] + g[d] * hr[d];
      flush_row(o, out + row * D, D, stream);
    }
    stream_fence();
  });
}

template <typename scalar_t, typename opmath_t>
void gated_bwd_impl(const GatedResidualBwdParams& p) {
  const auto* go = static_cast<const scalar_t*>(p.grad_out);
  const auto* h = static_cast<const scalar_t*>(p.h);
  const auto* gate = static_cast<const scalar_t*>(p.gate);
  auto* dh = static_cast<scalar_t*>(p.dh);
  const int64_t D = p.D, N = p.N;
  const bool stream = use_streaming<scalar_t>(p.BF * N * D, 3);  // grad_out and h in, dh out
  auto sums = frame_chunked_reduce<opmath_t>(p.BF, N, D, [&](int64_t bf, int64_t n0, int64_t n1, opmath_t* acc) {
    std::vector<opmath_t> buf(4 * D);
    opmath_t* __restrict__ g = buf.data();
    to_opmath(gate + bf * D, g, D);
    opmath_t* __restrict__ dg = acc;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = bf * N + n;
#if defined(FVDM_AVX512)
      if constexpr (kNeedsConversion<scalar_t>) {  // straight from bf16/fp16, no row buffers
        for_lanes(D, [&](int64_t d, auto m) {
          const __m512 gv = load16(go + row * D + d, m);
          store16(dh + row * D + d, _mm512_mul_ps(gv, load16(g + d, m)), m);
          store16(dg + d, _mm512_fmadd_ps(gv, load16(h + row * D + d, m), load16(dg + d, m)), m);
        });
        continue;
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stream) {
          const float* gr = go + row * D;
          const float* hr = h + row * D;
          stream_row(dh + row * D, D, [&](int64_t d, auto m) {
            const __m512 gv = load16(gr + d, m);
            store16(dg + d, _mm512_fmadd_ps(gv, load16(hr + d, m), load16(dg + d, m)), m);
            return _mm512_mul_ps(gv, load16(g + d, m));
          });
          continue;
        }
      }
#endif
      const opmath_t* __restrict__ gr = load_row(go + row * D, buf.data() + D, D);
      const opmath_t* __restrict__ hr = load_row(h + row * D, buf.data() + 2 * D, D);
      opmath_t* __restrict__ o = out_row(dh + row * D, buf.data() + 3 * D, stream);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        o[d] = gr[d] * g[d];
        dg[d] += gr[d] * hr[d];
      }
      flush_row(o, dh + row * D, D, stream);
    }
    stream_fence();
  });
  from_opmath(sums.data(), static_cast<scalar_t*>(p.dgate), p.BF * D);
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
