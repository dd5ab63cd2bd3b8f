// CPU kernels for fused temporal attention: softmax(scale * q k^T) v along the frame axis for
// every (b, token n, head h) "sequence" of F frames.
//
// Work split: at::parallel_for over the B*N tokens. A token's heads are handled together: its Q,
// K and V rows are gathered frame by frame, heads innermost, which reads the qkv buffer as F
// sequential runs of 3*H*Dh values (in the (B,F,N,3,H,Dh) layout) instead of 3*F*H scattered
// rows; gathered per-head buffers stay in L2 (heads are grouped so that they fit). Every
// product is a small GEMM on those buffers with a register-blocked micro-kernel (8 rows x 16
// columns of accumulators, columns padded to a multiple of 16 with zeros), so nothing depends
// on a store-to-load round trip in the inner loop. The softmax works on whole rows of F scores
// with a vectorizable exp. The backward recomputes P from the saved log-sum-exp
// (FlashAttention's recipe) and accumulates dK, dV per sequence, so sequences never share writes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

#include "convert.h"
#include "cpu_utils.h"
#include "fvdm/dispatch.h"
#include "fvdm/kernels.h"

namespace fvdm::cpu {
namespace {

constexpr int64_t kLanes = 16;  // micro-kernel column block
inline int64_t pad(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline int64_t pad8(int64_t n) { return (n + kLanes / 2 - 1) / (kLanes / 2) * (kLanes / 2); }

// x[j] = exp(x[j]) for n values (n a multiple of kLanes). std::exp does not vectorize without
// -ffast-math, and softmax needs F*F of them per sequence: with AVX-512 this is Cody-Waite range
// reduction, the Cephes degree-5 polynomial and scalef (about 1 ulp); otherwise std::exp.
#if defined(FVDM_AVX512F)
inline __m512 exp_ps(__m512 v) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
  v = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), v);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, v), v, v), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, k);  // y * 2^k
}

// log(x) for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), then the Cephes logf
// polynomial in m - 1 (about 1 ulp).
inline __m512 log_ps(__m512 x) {
  __m512 e = _mm512_getexp_ps(x);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);  // [1, 2)
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(7.0376836292e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174e-1f));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}
#endif

inline void exp_inplace(float* x, int64_t n) {
#if defined(FVDM_AVX512F)
  for (int64_t j = 0; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, exp_ps(_mm512_loadu_ps(x + j)));
#else
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
#endif
}
inline void exp_inplace(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

// Software prefetch of the next token's rows, one cache line at a time, issued from inside the
// GEMMs' k loops (one line a step) so that the requests trickle out while the current token
// computes. The F frames of a token are F places in memory a frame apart, too short for the
// hardware prefetcher to run ahead of, so without it every gather starts with cache misses.
// Into L1 (prefetcht0), which beat L2. One line per k step rather than a burst per phase: a
// burst gained nothing; each GEMM block keeps its span of lines in registers (take).
class LinePrefetcher {
 public:
  struct Span {  // consecutive lines of one run
    const char* first = nullptr;
    int64_t lines = 0;
  };
  void clear() {
    runs_.clear();
    i_ = 0;
    line_ = 0;
  }
  void add(const void* p, int64_t bytes) {  // every line of [p, p + bytes)
    const auto a = reinterpret_cast<uintptr_t>(p), first = a & ~uintptr_t(63);
    runs_.push_back({reinterpret_cast<const char*>(first), static_cast<int64_t>((a + bytes - first + 63) / 64)});
  }
  // The next lines to prefetch, at most max_lines of them; the caller issues them (a GEMM one
  // per k step, its loop then keeps the span in registers).
  Span take(int64_t max_lines) {
    if (i_ == runs_.size()) return {};
    const Span& run = runs_[i_];
    const Span span{run.first + 64 * line_, std::min(max_lines, run.lines - line_)};
    line_ += span.lines;
    if (line_ == run.lines) {
      line_ = 0;
      ++i_;
    }
    return span;
  }
  void rest() {
    for (Span s = take(INT64_MAX); s.lines > 0; s = take(INT64_MAX))
      for (int64_t l = 0; l < s.lines; ++l) __builtin_prefetch(s.first + 64 * l, 0, 3);
  }

 private:
  std::vector<Span> runs_;
  size_t i_ = 0;
  int64_t line_ = 0;
};

// C[R x W] (columns c0 .. c0 + W) = A[R x K] * B[K x ...]; the R x W accumulators live in
// registers across the whole K loop.
template <int R, int W, typename T>
inline void gemm_block(const T* __restrict__ A, int64_t lda, const T* __restrict__ B, int64_t ldb, T* __restrict__ C,
                       int64_t ldc, int64_t K, int64_t c0, LinePrefetcher* pf) {
  T acc[R][W] = {};
  const LinePrefetcher::Span next = pf != nullptr ? pf->take(K) : LinePrefetcher::Span{};
  for (int64_t k = 0; k < K; ++k) {
    if (k < next.lines) __builtin_prefetch(next.first + 64 * k, 0, 3);
    const T* __restrict__ b = B + k * ldb + c0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T a = A[r * lda + k];
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) acc[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) C[r * ldc + c0 + j] = acc[r][j];
}

// C[R x Np] = A[R x K] * B[K x Np] for R (<= 8) rows; Np a multiple of kLanes / 2: blocks of
// kLanes columns and, for Np = 72 (Latte-XL's head dim), one half-width block instead of a
// padded full one.
template <int R, typename T>
inline void gemm_rows(const T* __restrict__ A, int64_t lda, const T* __restrict__ B, int64_t ldb, T* __restrict__ C,
                      int64_t ldc, int64_t K, int64_t Np, LinePrefetcher* pf) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= Np; c0 += kLanes) gemm_block<R, kLanes>(A, lda, B, ldb, C, ldc, K, c0, pf);
  if (c0 < Np) gemm_block<R, kLanes / 2>(A, lda, B, ldb, C, ldc, K, c0, pf);
}

// C[M x Np] = A[M x K] * B[K x Np], Np a multiple of kLanes / 2. Eight rows at a time: eight
// independent FMA chains keep both 512-bit FMA pipes of a Zen 5 core busy (four are enough at
// half width).
// pf (if any): every block prefetches up to K of its lines, one per k step.
template <typename T>
void gemm(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t K, int64_t Np,
          LinePrefetcher* pf) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) gemm_rows<8>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, Np, pf);
  for (; m + 4 <= M; m += 4) gemm_rows<4>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, Np, pf);
  switch (M - m) {
    case 3: gemm_rows<3>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, Np, pf); break;
    case 2: gemm_rows<2>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, Np, pf); break;
    case 1: gemm_rows<1>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, K, Np, pf); break;
    default: break;
  }
}

// dst[c x r] = src[r x c] (leading dims given).
template <typename T>
inline void transpose_scalar(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

#if defined(FVDM_AVX512F)
// In-register transpose of a 16 x 16 float block (unpack, in-lane shuffle, two 128-bit-lane shuffles).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

// dst[c x r] = src[r x c]; float goes through 16 x 16 register blocks (a scalar loop costs a
// fifth of the forward's time at Dh = 72).
template <typename T>
inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if defined(FVDM_AVX512F)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t nr = std::min<int64_t>(16, rows - r0);
      const __mmask16 out_mask = first_lanes(nr);
      for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int64_t nc = std::min<int64_t>(16, cols - c0);
        const __mmask16 in_mask = first_lanes(nc);
        __m512 blk[16];
        for (int64_t i = 0; i < 16; ++i)
          blk[i] = i < nr ? _mm512_maskz_loadu_ps(in_mask, src + (r0 + i) * lds + c0) : _mm512_setzero_ps();
        transpose16x16(blk);
        for (int64_t j = 0; j < nc; ++j) _mm512_mask_storeu_ps(dst + (c0 + j) * ldd + r0, out_mask, blk[j]);
      }
    }
    return;
  }
#endif
  transpose_scalar(src, lds, dst, ldd, rows, cols);
}

template <typename scalar_t>
struct Strided {
  const scalar_t* base;
  AttnStrides st;
  // Row (b, f, n, h, :) of a strided (B, F, N, H, Dh) tensor.
  const scalar_t* row(int64_t b, int64_t f, int64_t n, int64_t h) const {
    return base + b * st.b + f * st.f + n * st.n + h * st.h;
  }
};

// Restarts pf with every row of token (b, n) of the given tensors (none when there is no next
// token): frame by frame, each tensor's heads in one run when they are adjacent.
template <typename scalar_t>
void queue_token(LinePrefetcher& pf, std::initializer_list<const Strided<scalar_t>*> tensors, bool any, int64_t b,
                 int64_t n, int64_t F, int64_t H, int64_t Dh) {
  pf.clear();
  const auto row_bytes = Dh * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t f = 0; any && f < F; ++f)
    for (const auto* src : tensors) {
      if (src->st.h == Dh) {
        pf.add(src->row(b, f, n, 0), H * row_bytes);
      } else {
        for (int64_t h = 0; h < H; ++h) pf.add(src->row(b, f, n, h), row_bytes);
      }
    }
}

// allow[i * Fp + j] = 1 where query i may attend key j (causal: j <= i; key_mask[b, j]), else
// 0, padding included. Returns, per query, whether it has any key. allow_t (if given, Fp = 16):
// the transpose, allow_t[j * 16 + i], zero for the padding queries i >= F.
template <typename opmath_t>
void build_allow(const TemporalAttnFwdParams& p, int64_t b, int64_t Fp, opmath_t* allow, std::vector<char>& any,
                 opmath_t* allow_t = nullptr) {
  const int64_t F = p.F;
  for (int64_t i = 0; i < F; ++i) {
    bool has = false;
    for (int64_t j = 0; j < Fp; ++j) {
      const bool ok = j < F && (!p.causal || j <= i) && (p.key_mask == nullptr || p.key_mask[b * F + j]);
      allow[i * Fp + j] = ok ? opmath_t(1) : opmath_t(0);
      has |= ok;
    }
    any[i] = has;
  }
  if (allow_t != nullptr)
    for (int64_t j = 0; j < kLanes; ++j)
      for (int64_t i = 0; i < kLanes; ++i) allow_t[j * kLanes + i] = i < F ? allow[i * Fp + j] : opmath_t(0);
}

// In place over rows of scaled scores: P = exp(s - m) * allow / l, row max m, lse = m + log l.
template <typename opmath_t>
void softmax_rows_generic(opmath_t* s, const opmath_t* allow, const std::vector<char>& any, int64_t F, int64_t Fp,
                  opmath_t scale, opmath_t* lse) {
  for (int64_t i = 0; i < F; ++i) {
    opmath_t* __restrict__ r = s + i * Fp;
    const opmath_t* __restrict__ a = allow + i * Fp;
    if (!any[i]) {  // nothing to attend: P = 0 gives a zero output; lse = -inf
      std::fill(r, r + Fp, opmath_t(0));
      lse[i] = -std::numeric_limits<opmath_t>::infinity();
      continue;
    }
    constexpr opmath_t kNegInf = -std::numeric_limits<opmath_t>::infinity();
    opmath_t m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < Fp; ++j) {
      r[j] = a[j] != 0 ? r[j] * scale : kNegInf;  // exp(-inf) = 0 drops masked keys
      m = std::max(m, r[j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < Fp; ++j) r[j] -= m;
    exp_inplace(r, Fp);
    opmath_t l = 0;
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < Fp; ++j) {
      r[j] *= a[j];  // exact zeros for masked keys (exp is clamped, not exact, far below 0)
      l += r[j];
    }
    const opmath_t inv = opmath_t(1) / l;
#pragma omp simd
    for (int64_t j = 0; j < Fp; ++j) r[j] *= inv;
    lse[i] = m + std::log(l);
  }
}

#if defined(FVDM_AVX512F)
// The same for F <= 16 (one 16-lane vector a row), on the transposed block: with a column of
// scores per register (lanes = queries), the row max and sum are 15 vertical max / add each
// instead of two horizontal reductions and a scalar division per row. allow_t: build_allow's.
inline void softmax_block16(float* s, const float* allow_t, const std::vector<char>& any, int64_t F, float scale,
                            float* lse) {
  const __m512 zero = _mm512_setzero_ps(), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 c[16];
  for (int64_t i = 0; i < 16; ++i) c[i] = i < F ? _mm512_loadu_ps(s + i * 16) : zero;
  transpose16x16(c);  // c[j] lane i = score (i, j)
  __m512 m = neg_inf;
  for (int j = 0; j < 16; ++j) {
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_loadu_ps(allow_t + j * 16), zero, _CMP_NEQ_OQ);
    c[j] = _mm512_mask_mul_ps(neg_inf, ok, c[j], _mm512_set1_ps(scale));
    m = _mm512_max_ps(m, c[j]);
  }
  // queries without any key (and padding): m = -inf; subtract 0 there, and divide by 1 below,
  // so that their P is exactly 0 (every term is exp(-inf) * 0)
  const __mmask16 empty = _mm512_cmp_ps_mask(m, neg_inf, _CMP_EQ_OQ);
  const __m512 m0 = _mm512_mask_mov_ps(m, empty, zero);
  __m512 l = zero;
  for (int j = 0; j < 16; ++j) {  // exact zeros for masked keys (exp is clamped, not exact)
    c[j] = _mm512_mul_ps(exp_ps(_mm512_sub_ps(c[j], m0)), _mm512_loadu_ps(allow_t + j * 16));
    l = _mm512_add_ps(l, c[j]);
  }
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_mask_mov_ps(l, empty, _mm512_set1_ps(1.0f)));
  for (int j = 0; j < 16; ++j) c[j] = _mm512_mul_ps(c[j], inv);
  transpose16x16(c);
  for (int64_t i = 0; i < F; ++i) _mm512_storeu_ps(s + i * 16, c[i]);
  __mmask16 has_key = 0;  // lse = m + log l; -inf for queries without keys
  for (int64_t i = 0; i < F; ++i) has_key |= static_cast<__mmask16>(any[i] ? 1u << i : 0u);
  const __m512 lse_v = _mm512_mask_mov_ps(neg_inf, has_key, _mm512_add_ps(m, log_ps(l)));
  _mm512_mask_storeu_ps(lse, first_lanes(F), lse_v);
}
#endif

template <typename opmath_t>
inline void softmax_rows(opmath_t* s, const opmath_t* allow, const opmath_t* allow_t, const std::vector<char>& any,
                         int64_t F, int64_t Fp, opmath_t scale, opmath_t* lse) {
#if defined(FVDM_AVX512F)
  if constexpr (std::is_same_v<opmath_t, float>) {
    if (Fp == 16 && allow_t != nullptr) return softmax_block16(s, allow_t, any, F, scale, lse);
    // One pass per row in registers; rows are whole 16-lane vectors (Fp is padded).
    const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < F; ++i) {
      float* r = s + i * Fp;
      const float* a = allow + i * Fp;
      if (!any[i]) {
        std::fill(r, r + Fp, 0.0f);
        lse[i] = -std::numeric_limits<float>::infinity();
        continue;
      }
      __m512 vmax = neg_inf;
      for (int64_t j = 0; j < Fp; j += 16) {
        const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_loadu_ps(a + j), _mm512_setzero_ps(), _CMP_NEQ_OQ);
        const __m512 v = _mm512_mask_mul_ps(neg_inf, ok, _mm512_loadu_ps(r + j), vscale);
        _mm512_storeu_ps(r + j, v);
        vmax = _mm512_max_ps(vmax, v);
      }
      const float m = _mm512_reduce_max_ps(vmax);
      const __m512 vm = _mm512_set1_ps(m);
      for (int64_t j = 0; j < Fp; j += 16) _mm512_storeu_ps(r + j, _mm512_sub_ps(_mm512_loadu_ps(r + j), vm));
      exp_inplace(r, Fp);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < Fp; j += 16) {  // exact zeros for masked keys (exp is clamped, not exact)
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(r + j), _mm512_loadu_ps(a + j));
        _mm512_storeu_ps(r + j, p);
        vsum = _mm512_add_ps(vsum, p);
      }
      const float l = _mm512_reduce_add_ps(vsum);
      const __m512 inv = _mm512_set1_ps(1.0f / l);
      for (int64_t j = 0; j < Fp; j += 16) _mm512_storeu_ps(r + j, _mm512_mul_ps(_mm512_loadu_ps(r + j), inv));
      lse[i] = m + std::log(l);
    }
    return;
  }
#endif
  softmax_rows_generic(s, allow, any, F, Fp, scale, lse);
}

// Buffers of one sequence, allocated once per parallel chunk; zero padding stays zero.
template <typename opmath_t>
struct Buf {
  std::vector<opmath_t> v;
  explicit Buf(int64_t n) : v(n, opmath_t(0)) {}
  opmath_t* operator()() { return v.data(); }
};

// Visits the tokens [begin, end) of a chunk as (b, n), rebuilding the per-query key mask only
// when b changes (it depends on b alone). body(b, n, prefetch, b_next, n_next) also gets the
// chunk's next token, whose rows it may prefetch.
template <typename opmath_t, typename Body>
void for_each_token(const TemporalAttnFwdParams& p, int64_t begin, int64_t end, int64_t Fp, opmath_t* allow,
                    opmath_t* allow_t, std::vector<char>& any, const Body& body) {
  int64_t mask_b = -1;
  for (int64_t token = begin; token < end; ++token) {
    const int64_t n = token % p.N, b = token / p.N;
    if (b != mask_b) {
      build_allow(p, b, Fp, allow, any, allow_t);
      mask_b = b;
    }
    body(b, n, token + 1 < end, (token + 1) / p.N, (token + 1) % p.N);
  }
}

// Heads per group so that `floats_per_head` op-math values per head stay within ~1 MiB.
inline int64_t heads_per_group(int64_t H, int64_t floats_per_head) {
  return std::clamp<int64_t>((int64_t(1) << 18) / std::max<int64_t>(floats_per_head, 1), 1, H);
}

// One token's (B, F, N, H, Dh) output rows, all heads, staged here and written per frame as
// one run of H * Dh values (stream_copy). Call stream_fence() before the parallel chunk ends.
// Frame rows are ld = H * Dh + (pad(Dh) - Dh) apart, so a GEMM may write a head's Dh-padded row
// in place: with heads written in ascending order, head h's padding lands where head h + 1
// writes next, and the last head's in the gap.
template <typename scalar_t>
struct TokenOut {
  int64_t F, N, HD, ld;
  std::vector<scalar_t> buf;  // after ld: sized from it
  TokenOut(int64_t F, int64_t N, int64_t H, int64_t Dh)
      : F(F), N(N), HD(H * Dh), ld(H * Dh + pad(Dh) - Dh), buf(F * ld) {}
  scalar_t* row(int64_t f, int64_t h, int64_t Dh) { return buf.data() + f * ld + h * Dh; }
  // dst's (b, f, n) rows are row_stride elements apart (HD when dst is (B, F, N, H, Dh)).
  void flush(scalar_t* dst, int64_t b, int64_t n, int64_t row_stride) const {
    for (int64_t f = 0; f < F; ++f)
      stream_copy(buf.data() + f * ld, dst + ((b * F + f) * N + n) * row_stride,
                  HD * static_cast<int64_t>(sizeof(scalar_t)));
  }
};

// Head h's F output rows = A[F x K] * B[K x pad8(Dh)] into a token's stage: fp32/fp64 straight
// into the stage rows (the pad8 columns past Dh land where head h + 1 writes next, or in the
// gap after the last head), converted types through buf (F x ldb) and from_opmath.
template <typename scalar_t, typename opmath_t>
inline void gemm_to_stage(const opmath_t* A, int64_t lda, const opmath_t* B, int64_t ldb, TokenOut<scalar_t>& stage,
                          int64_t h, int64_t Dh, int64_t F, int64_t K, opmath_t* buf, LinePrefetcher* pf) {
  if constexpr (!kNeedsConversion<scalar_t>) {
    gemm(A, lda, B, ldb, stage.row(0, h, Dh), stage.ld, F, K, pad8(Dh), pf);
  } else {
    gemm(A, lda, B, ldb, buf, ldb, F, K, pad8(Dh), pf);
    for (int64_t i = 0; i < F; ++i) from_opmath(buf + i * ldb, stage.row(i, h, Dh), Dh);
  }
}

template <typename scalar_t, typename opmath_t>
void attn_fwd_impl(const TemporalAttnFwdParams& p) {
  const int64_t B = p.B, F = p.F, N = p.N, H = p.H, Dh = p.Dh;
  const int64_t Fp = pad(F), Dhp = pad(Dh);
  const Strided<scalar_t> Q{static_cast<const scalar_t*>(p.q), p.q_stride};
  const Strided<scalar_t> K{static_cast<const scalar_t*>(p.k), p.k_stride};
  const Strided<scalar_t> V{static_cast<const scalar_t*>(p.v), p.v_stride};
  auto* out = static_cast<scalar_t*>(p.out);
  auto* lse = static_cast<opmath_t*>(p.lse);
  const auto scale = static_cast<opmath_t>(p.scale);
  // Per head: q, k (F x Dh), v (F x Dhp); k^T (Dh x Fp) is made per head from k while in L1
  // (scattering it straight from the gather touches Dh cache lines per row).
  const int64_t q_sz = F * Dh, v_sz = F * Dhp;
  const int64_t HG = heads_per_group(H, 2 * q_sz + v_sz);
  // fp32/fp64 (no conversion): k^T is transposed straight from the F source rows, which the
  // prefetch has brought into cache, and O = P V is written straight into the output stage.
  // q and v are gathered: GEMMs reading F rows a frame stride apart in place are slower.
  constexpr bool kNoConversion = !kNeedsConversion<scalar_t>;
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    Buf<opmath_t> q(HG * q_sz), k(kNoConversion ? 0 : HG * q_sz), kt(Dh * Fp), v(HG * v_sz), s(F * Fp), allow(F * Fp),
        allow_t(Fp == kLanes ? kLanes * kLanes : 0), o(kNoConversion ? 0 : F * Dhp), tmp(Dh);
    TokenOut<scalar_t> tok(F, N, H, Dh);
    std::vector<char> any(F);
    opmath_t* allow_tp = Fp == kLanes ? allow_t() : nullptr;  // softmax_block16
    LinePrefetcher pf;
    for_each_token(p, begin, end, Fp, allow(), allow_tp, any, [&](int64_t b, int64_t n, bool prefetch, int64_t b1, int64_t n1) {
      const int64_t token = b * N + n;
      queue_token(pf, {&Q, &K, &V}, prefetch, b1, n1, F, H, Dh);
      for (int64_t h0 = 0; h0 < H; h0 += HG) {
        const int64_t hn = std::min(HG, H - h0);
        for (int64_t f = 0; f < F; ++f)  // frame-major, heads innermost: sequential reads
          for (int64_t g = 0; g < hn; ++g) {
            const opmath_t* r = load_row(Q.row(b, f, n, h0 + g), tmp(), Dh);
            copy_row(r, q() + g * q_sz + f * Dh, Dh);
            if constexpr (!kNoConversion) {
              r = load_row(K.row(b, f, n, h0 + g), tmp(), Dh);
              copy_row(r, k() + g * q_sz + f * Dh, Dh);
            }
            r = load_row(V.row(b, f, n, h0 + g), tmp(), Dh);
            copy_row(r, v() + g * v_sz + f * Dhp, Dh);
          }
        for (int64_t g = 0; g < hn; ++g) {
          const int64_t h = h0 + g;
          if constexpr (kNoConversion)
            transpose(K.row(b, 0, n, h), K.st.f, kt(), Fp, F, Dh);
          else
            transpose(k() + g * q_sz, Dh, kt(), Fp, F, Dh);
          gemm(q() + g * q_sz, Dh, kt(), Fp, s(), Fp, F, Dh, Fp, &pf);                 // S = Q K^T
          softmax_rows(s(), allow(), allow_tp, any, F, Fp, scale, lse + (token * H + h) * F);  // P, normalised
          gemm_to_stage(s(), Fp, v() + g * v_sz, Dhp, tok, h, Dh, F, F, o(), &pf);  // O = P V
        }
      }
      pf.rest();  // what the GEMMs' steps did not reach (few heads, short rows)
      tok.flush(out, b, n, H * Dh);
    });
    stream_fence();
  });
}

template <typename scalar_t, typename opmath_t>
void attn_bwd_impl(const TemporalAttnBwdParams& bp) {
  const TemporalAttnFwdParams& p = bp.fwd;
  const int64_t B = p.B, F = p.F, N = p.N, H = p.H, Dh = p.Dh;
  const int64_t Fp = pad(F), Dhp = pad(Dh);
  const Strided<scalar_t> Q{static_cast<const scalar_t*>(p.q), p.q_stride};
  const Strided<scalar_t> K{static_cast<const scalar_t*>(p.k), p.k_stride};
  const Strided<scalar_t> V{static_cast<const scalar_t*>(p.v), p.v_stride};
  // grad_out is contiguous (B, F, N, H, Dh); the gradients' (b, f, n) rows are grad_row_stride
  // apart. out is not read: the softmax-gradient correction D_i = dO_i . O_i equals sum_j P_ij dP_ij,
  // from P and dP, which the backward has in L1 anyway (one input stream less).
  const AttnStrides contig{F * N * H * Dh, N * H * Dh, H * Dh, Dh};
  const Strided<scalar_t> dO{static_cast<const scalar_t*>(bp.grad_out), contig};
  const auto* lse = static_cast<const opmath_t*>(p.lse);
  auto* dq_out = static_cast<scalar_t*>(bp.dq);
  auto* dk_out = static_cast<scalar_t*>(bp.dk);
  auto* dv_out = static_cast<scalar_t*>(bp.dv);
  const auto scale = static_cast<opmath_t>(p.scale);
  constexpr opmath_t kNegInf = -std::numeric_limits<opmath_t>::infinity();
  // Per head: q, k, dO (F x Dhp) gathered, v too when converted (fp32/fp64 transpose v^T from
  // the source rows, as the forward does k^T); k^T and v^T (Dh x Fp) are made per head.
  const int64_t row_sz = F * Dhp, col_sz = Dh * Fp;
  const int64_t HG = heads_per_group(H, 4 * row_sz);
  constexpr bool kNoConversion = !kNeedsConversion<scalar_t>;
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    Buf<opmath_t> q(HG * row_sz), k(HG * row_sz), v(kNoConversion ? 0 : HG * row_sz), dout(HG * row_sz), kt(col_sz), vt(col_sz),
        s(F * Fp), dp(F * Fp), allow(F * Fp), t(F * F), res(kNoConversion ? 0 : F * Dhp), tmp(Dh);
    TokenOut<scalar_t> tdq(F, N, H, Dh), tdk(F, N, H, Dh), tdv(F, N, H, Dh);
    std::vector<char> any(F);
    LinePrefetcher pf;
    for_each_token(p, begin, end, Fp, allow(), static_cast<opmath_t*>(nullptr), any, [&](int64_t b, int64_t n, bool prefetch, int64_t b1, int64_t n1) {
      const int64_t token = b * N + n;
      queue_token(pf, {&Q, &K, &V, &dO}, prefetch, b1, n1, F, H, Dh);
      for (int64_t h0 = 0; h0 < H; h0 += HG) {
        const int64_t hn = std::min(HG, H - h0);
        for (int64_t f = 0; f < F; ++f)
          for (int64_t g = 0; g < hn; ++g) {
            const int64_t h = h0 + g;
            const opmath_t* r = load_row(Q.row(b, f, n, h), tmp(), Dh);
            copy_row(r, q() + g * row_sz + f * Dhp, Dh);
            r = load_row(K.row(b, f, n, h), tmp(), Dh);
            copy_row(r, k() + g * row_sz + f * Dhp, Dh);
            if constexpr (!kNoConversion) {
              r = load_row(V.row(b, f, n, h), tmp(), Dh);
              copy_row(r, v() + g * row_sz + f * Dhp, Dh);
            }
            r = load_row(dO.row(b, f, n, h), tmp(), Dh);
            copy_row(r, dout() + g * row_sz + f * Dhp, Dh);
          }
        for (int64_t g = 0; g < hn; ++g) {
          const int64_t h = h0 + g;
          const opmath_t* lse_seq = lse + (token * H + h) * F;
          transpose(k() + g * row_sz, Dhp, kt(), Fp, F, Dh);
          if constexpr (kNoConversion)  // v is only needed as v^T: straight from the source rows
            transpose(V.row(b, 0, n, h), V.st.f, vt(), Fp, F, Dh);
          else
            transpose(v() + g * row_sz, Dhp, vt(), Fp, F, Dh);
          gemm(q() + g * row_sz, Dhp, kt(), Fp, s(), Fp, F, Dh, Fp, &pf);     // S = Q K^T
          gemm(dout() + g * row_sz, Dhp, vt(), Fp, dp(), Fp, F, Dh, Fp, &pf);  // dP = dO V^T
          for (int64_t i = 0; i < F; ++i) {  // P from lse; D = sum_j P dP; dS = P (dP - D) * scale
            opmath_t* __restrict__ pr = s() + i * Fp;
            opmath_t* __restrict__ dr = dp() + i * Fp;
            const opmath_t* __restrict__ a = allow() + i * Fp;
            const bool live = any[i] && std::isfinite(lse_seq[i]);
            const opmath_t m = live ? lse_seq[i] : opmath_t(0), on = live ? opmath_t(1) : opmath_t(0);
#pragma omp simd
            for (int64_t j = 0; j < Fp; ++j) pr[j] = a[j] != 0 && on != 0 ? pr[j] * scale - m : kNegInf;
            exp_inplace(pr, Fp);
            opmath_t di = 0;
#pragma omp simd reduction(+ : di)
            for (int64_t j = 0; j < Fp; ++j) {
              pr[j] *= a[j] * on;
              di += pr[j] * dr[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < Fp; ++j) dr[j] = pr[j] * (dr[j] - di) * scale;
          }
          transpose(s(), Fp, t(), F, F, F);                                             // P^T
          gemm_to_stage(t(), F, dout() + g * row_sz, Dhp, tdv, h, Dh, F, F, res(), &pf);  // dV = P^T dO
          transpose(dp(), Fp, t(), F, F, F);                                            // dS^T
          gemm_to_stage(t(), F, q() + g * row_sz, Dhp, tdk, h, Dh, F, F, res(), &pf);     // dK = dS^T Q
          gemm_to_stage(dp(), Fp, k() + g * row_sz, Dhp, tdq, h, Dh, F, F, res(), &pf);   // dQ = dS K
        }
      }
      pf.rest();
      tdq.flush(dq_out, b, n, bp.grad_row_stride);
      tdk.flush(dk_out, b, n, bp.grad_row_stride);
      tdv.flush(dv_out, b, n, bp.grad_row_stride);
    });
    stream_fence();
  });
}

}  // namespace

void temporal_attn_fwd(const TemporalAttnFwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.dtype, "temporal_attn_fwd", [&] { attn_fwd_impl<scalar_t, opmath_t>(p); });
}
void temporal_attn_bwd(const TemporalAttnBwdParams& p) {
  FVDM_DISPATCH_FLOAT_TYPES(p.fwd.dtype, "temporal_attn_bwd", [&] { attn_bwd_impl<scalar_t, opmath_t>(p); });
}

}  // namespace fvdm::cpu
