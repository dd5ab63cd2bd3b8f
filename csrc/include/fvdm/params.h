// Plain parameter structs: the only thing kernels see (no at::Tensor below the API layer).
// Pointers are to contiguous buffers unless strides are given; sizes and strides are int64.
// `dtype` is the element type of the activations; statistics, coefficient tables and
// log-sum-exp use the op-math type (float32, or float64 for float64 inputs).
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fvdm {

// Per-frame adaLN: y = LayerNorm(x) * (1 + scale[bf]) + shift[bf] over rows of length D.
// x, y: (BF, N, D); shift, scale: (BF, D); mean, rstd: (BF, N).
struct AdalnFwdParams {
  c10::ScalarType dtype;
  const void* x;
  const void* shift;
  const void* scale;
  void* y;
  void* mean;
  void* rstd;
  int64_t BF, N, D;
  double eps;
};

// dx: (BF, N, D); dshift, dscale: (BF, D).
struct AdalnBwdParams {
  c10::ScalarType dtype;
  const void* grad_y;
  const void* x;
  const void* scale;
  const void* mean;
  const void* rstd;
  void* dx;
  void* dshift;
  void* dscale;
  int64_t BF, N, D;
};

// out = x + gate[bf] * h. x, h, out: (BF, N, D); gate: (BF, D).
struct GatedResidualFwdParams {
  c10::ScalarType dtype;
  const void* x;
  const void* h;
  const void* gate;
  void* out;
  int64_t BF, N, D;
};

// dh = gate[bf] * grad_out; dgate[bf] = sum_n grad_out * h.
struct GatedResidualBwdParams {
  c10::ScalarType dtype;
  const void* grad_out;
  const void* h;
  const void* gate;
  void* dh;
  void* dgate;
  int64_t BF, N, D;
};

// out = sum_k coeffs[bf, k] * inputs[k]. inputs[k], out: (BF, inner); coeffs: (BF, K), op-math type.
constexpr int kMaxCombineInputs = 8;
struct FrameCombineFwdParams {
  c10::ScalarType dtype;
  const void* inputs[kMaxCombineInputs];
  const void* coeffs;
  void* out;
  int64_t K, BF, inner;
};

// dinputs[k] = coeffs[bf, k] * grad_out (skipped where null); dcoeffs[bf, k] = sum grad_out * inputs[k].
struct FrameCombineBwdParams {
  c10::ScalarType dtype;
  const void* grad_out;
  const void* inputs[kMaxCombineInputs];
  const void* coeffs;
  void* dinputs[kMaxCombineInputs];
  void* dcoeffs;
  int64_t K, BF, inner;
};

// Attention along F for every (b, n, h). q, k, v are (B, F, N, H, Dh) with element strides
// (last dim contiguous); out and grads are contiguous (B, F, N, H, Dh); lse is (B, N, H, F).
// key_mask (B, F) bool, true = may be attended; null = all frames. A query with no allowed
// key outputs zeros and lse = -inf.
struct AttnStrides {
  int64_t b, f, n, h;
};
struct TemporalAttnFwdParams {
  c10::ScalarType dtype;
  const void* q;
  const void* k;
  const void* v;
  AttnStrides q_stride, k_stride, v_stride;
  const bool* key_mask;
  void* out;
  void* lse;
  int64_t B, F, N, H, Dh;
  double scale;
  bool causal;
};

struct TemporalAttnBwdParams {
  TemporalAttnFwdParams fwd;  // q, k, v, mask, lse (read); out (read by the CUDA kernels only)
  const void* grad_out;       // contiguous (B, F, N, H, Dh)
  void* dq;
  void* dk;
  void* dv;
  // Elements between consecutive (b, f, n) rows of H * Dh values in dq, dk, dv: H * Dh for
  // three (B, F, N, H, Dh) tensors, 3 * H * Dh for one packed (B, F, N, 3, H, Dh) gradient.
  int64_t grad_row_stride;
};

}  // namespace fvdm
