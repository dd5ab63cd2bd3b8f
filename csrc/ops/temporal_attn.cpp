// Host API for fused temporal attention: attention along F for every (b, n, head), with q, k, v
// read through their strides (views into the qkv projection output) and the output written in
// (B, F, N, H, Dh) order so the output projection needs no transpose.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "fvdm/checks.h"
#include "fvdm/launch.h"

namespace fvdm {
namespace {

constexpr int64_t kMaxFrames = 1024;

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_supported_device(q, "q");
  check_float(q, "q");
  check_dim(q, 5, "q", "(B, F, N, H, Dh)");
  check_like(k, q, "k", "q");
  check_like(v, q, "v", "q");
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) check_last_dim_contiguous(*t, name);
  TORCH_CHECK_VALUE(q.size(1) <= kMaxFrames, "fvdm: temporal_attention supports up to ", kMaxFrames,
                    " frames, got F = ", q.size(1));
}

std::optional<at::Tensor> check_mask(const std::optional<at::Tensor>& key_mask, const at::Tensor& q) {
  if (!key_mask.has_value()) return std::nullopt;
  const at::Tensor& m = *key_mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "fvdm: key_mask must be bool (true = frame may be attended), got ",
                   m.scalar_type());
  check_same_device(m, q, "key_mask", "q");
  check_shape(m, {q.size(0), q.size(1)}, "key_mask", "(B, F)");
  return m.contiguous();
}

void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, "fvdm: scale must be a positive finite number, got ", scale);
}

AttnStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

TemporalAttnFwdParams fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, bool causal, double scale) {
  TemporalAttnFwdParams p{};
  p.dtype = q.scalar_type();
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  p.key_mask = mask ? mask->const_data_ptr<bool>() : nullptr;
  p.B = q.size(0);
  p.F = q.size(1);
  p.N = q.size(2);
  p.H = q.size(3);
  p.Dh = q.size(4);
  p.scale = scale;
  p.causal = causal;
  return p;
}

std::tuple<at::Tensor, at::Tensor> temporal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_mask, bool causal,
                                                      double scale) {
  check_qkv(q, k, v);
  check_scale(scale);
  auto mask = check_mask(key_mask, q);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(2), q.size(3), q.size(1)}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (q.numel() == 0) return {out, lse.fill_(-INFINITY)};
  auto p = fwd_params(q, k, v, mask, causal, scale);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  FVDM_LAUNCH(temporal_attn_fwd, p, q);
  return {out, lse};
}

// The backward's checks and params, writing the gradients to dq, dk, dv (rows grad_row_stride
// apart). Returns the contiguous inputs the params point into (keep them alive until the launch).
struct BwdLaunch {
  TemporalAttnBwdParams p;
  at::Tensor go, oc, lc;
  std::optional<at::Tensor> mask;
};

BwdLaunch bwd_launch(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_mask,
                     bool causal, double scale) {
  check_qkv(q, k, v);
  check_scale(scale);
  BwdLaunch l;
  l.mask = check_mask(key_mask, q);
  check_like(grad_out, q, "grad_out", "q");
  check_like(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");
  check_shape(lse, {q.size(0), q.size(2), q.size(3), q.size(1)}, "lse", "(B, N, H, F)");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::toOpMathType(q.scalar_type()), "fvdm: lse must be ",
                   at::toOpMathType(q.scalar_type()), ", got ", lse.scalar_type());
  l.go = grad_out.contiguous();
  l.oc = out.contiguous();
  l.lc = lse.contiguous();
  l.p = TemporalAttnBwdParams{};
  l.p.fwd = fwd_params(q, k, v, l.mask, causal, scale);
  l.p.fwd.out = const_cast<void*>(l.oc.const_data_ptr());  // read-only in the backward
  l.p.fwd.lse = const_cast<void*>(l.lc.const_data_ptr());
  l.p.grad_out = l.go.const_data_ptr();
  return l;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_mask, bool causal, double scale) {
  auto l = bwd_launch(grad_out, q, k, v, out, lse, key_mask, causal, scale);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(q.sizes(), q.options());
  auto dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  l.p.dq = dq.mutable_data_ptr();
  l.p.dk = dk.mutable_data_ptr();
  l.p.dv = dv.mutable_data_ptr();
  l.p.grad_row_stride = q.size(3) * q.size(4);
  FVDM_LAUNCH(temporal_attn_bwd, l.p, q);
  return {dq, dk, dv};
}

// The packed entry: q, k, v are qkv[:, :, :, 0..2] of one (B, F, N, 3, H, Dh) buffer (the qkv
// projection's output, viewed) and the backward returns one gradient of that shape. Through
// q, k, v = qkv.unbind(3) the same math costs a copy of all three gradients in autograd's
// unbind backward (a stack, 13% of the fused forward+backward at Latte-XL on the CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpack_qkv(const at::Tensor& qkv) {
  check_supported_device(qkv, "qkv");
  check_float(qkv, "qkv");
  check_dim(qkv, 6, "qkv", "(B, F, N, 3, H, Dh)");
  TORCH_CHECK_VALUE(qkv.size(3) == 3, "fvdm: qkv must be (B, F, N, 3, H, Dh) with q, k, v along dim 3, got shape ",
                    shape_str(qkv.sizes()));
  check_last_dim_contiguous(qkv, "qkv");
  return {qkv.select(3, 0), qkv.select(3, 1), qkv.select(3, 2)};
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_qkv(const at::Tensor& qkv,
                                                          const std::optional<at::Tensor>& key_mask, bool causal,
                                                          double scale) {
  auto [q, k, v] = unpack_qkv(qkv);
  return temporal_attention(q, k, v, key_mask, causal, scale);
}

at::Tensor temporal_attention_qkv_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                           const at::Tensor& lse, const std::optional<at::Tensor>& key_mask,
                                           bool causal, double scale) {
  auto [q, k, v] = unpack_qkv(qkv);
  auto l = bwd_launch(grad_out, q, k, v, out, lse, key_mask, causal, scale);
  auto dqkv = at::empty(qkv.sizes(), qkv.options());
  if (qkv.numel() == 0) return dqkv;
  const int64_t HD = q.size(3) * q.size(4);
  auto* base = static_cast<char*>(dqkv.mutable_data_ptr());
  const int64_t part = HD * static_cast<int64_t>(dqkv.element_size());
  l.p.dq = base;
  l.p.dk = base + part;
  l.p.dv = base + 2 * part;
  l.p.grad_row_stride = 3 * HD;
  FVDM_LAUNCH(temporal_attn_bwd, l.p, q);
  return dqkv;
}

void register_impls(torch::Library& m) {
  m.impl("temporal_attention", &temporal_attention);
  m.impl("temporal_attention_backward", &temporal_attention_backward);
  m.impl("temporal_attention_qkv", &temporal_attention_qkv);
  m.impl("temporal_attention_qkv_backward", &temporal_attention_qkv_backward);
}

}  // namespace
}  // namespace fvdm

FVDM_REGISTER_BACKENDS(fvdm::register_impls)
