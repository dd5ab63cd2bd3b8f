// Host API for per-frame modulation: adaln_modulate and gated_residual.
// Order: check arguments -> make contiguous -> allocate -> fill params -> launch.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "fvdm/checks.h"
#include "fvdm/launch.h"

namespace fvdm {
namespace {

// x (B,F,N,D) and one per-frame table (B,F,D) of the same dtype and device.
void check_frame_table(const at::Tensor& x, const at::Tensor& table, const char* x_name, const char* name) {
  check_float(table, name);
  check_like(table, x, name, x_name, /*same_shape=*/false);
  check_shape(table, {x.size(0), x.size(1), x.size(3)}, name, "(B, F, D)");
}

void check_activation(const at::Tensor& x, const char* name) {
  check_supported_device(x, name);
  check_float(x, name);
  check_dim(x, 4, name, "(B, F, N, D)");
}

at::ScalarType opmath(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate(const at::Tensor& x, const at::Tensor& shift,
                                                              const at::Tensor& scale, double eps) {
  check_activation(x, "x");
  check_frame_table(x, shift, "x", "shift");
  check_frame_table(x, scale, "x", "scale");
  TORCH_CHECK_VALUE(eps > 0.0, "fvdm: eps must be positive, got ", eps);
  auto xc = x.contiguous();
  auto shc = shift.contiguous();
  auto scc = scale.contiguous();
  const int64_t B = x.size(0), F = x.size(1), N = x.size(2), D = x.size(3);
  auto y = at::empty_like(xc);
  auto mean = at::empty({B, F, N}, x.options().dtype(opmath(x)));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  AdalnFwdParams p{x.scalar_type(), xc.const_data_ptr(), shc.const_data_ptr(), scc.const_data_ptr(),
                   y.mutable_data_ptr(), mean.mutable_data_ptr(), rstd.mutable_data_ptr(), B * F, N, D, eps};
  FVDM_LAUNCH(adaln_fwd, p, x);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward(const at::Tensor& grad_y,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& scale,
                                                                       const at::Tensor& mean,
                                                                       const at::Tensor& rstd) {
  check_activation(x, "x");
  check_frame_table(x, scale, "x", "scale");
  check_like(grad_y, x, "grad_y", "x");
  for (auto [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    check_same_device(*t, x, name, "x");
    check_shape(*t, {x.size(0), x.size(1), x.size(2)}, name, "(B, F, N)");
    TORCH_CHECK_TYPE(t->scalar_type() == opmath(x), "fvdm: ", name, " must be ", opmath(x), " for x of dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
  }
  auto gc = grad_y.contiguous();
  auto xc = x.contiguous();
  auto scc = scale.contiguous();
  auto mc = mean.contiguous();
  auto rc = rstd.contiguous();
  const int64_t B = x.size(0), F = x.size(1), N = x.size(2), D = x.size(3);
  auto dx = at::empty_like(xc);
  auto dshift = at::empty({B, F, D}, x.options());
  auto dscale = at::empty({B, F, D}, x.options());
  if (x.numel() == 0) return {dx, dshift.zero_(), dscale.zero_()};
  AdalnBwdParams p{x.scalar_type(),       gc.const_data_ptr(),    xc.const_data_ptr(),
                   scc.const_data_ptr(),  mc.const_data_ptr(),    rc.const_data_ptr(),
                   dx.mutable_data_ptr(), dshift.mutable_data_ptr(), dscale.mutable_data_ptr(),
                   B * F,                 N,                      D};
  FVDM_LAUNCH(adaln_bwd, p, x);
  return {dx, dshift, dscale};
}

at::Tensor gated_residual(const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate) {
  check_activation(x, "x");
  check_like(h, x, "h", "x");
  check_frame_table(x, gate, "x", "gate");
  auto xc = x.contiguous();
  auto hc = h.contiguous();
  auto gc = gate.contiguous();
  auto out = at::empty_like(xc);
  if (x.numel() == 0) return out;
  GatedResidualFwdParams p{x.scalar_type(),      xc.const_data_ptr(), hc.const_data_ptr(), gc.const_data_ptr(),
                           out.mutable_data_ptr(), x.size(0) * x.size(1), x.size(2),        x.size(3)};
  FVDM_LAUNCH(gated_residual_fwd, p, x);
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const at::Tensor& grad_out, const at::Tensor& h,
                                                           const at::Tensor& gate) {
  check_activation(h, "h");
  check_like(grad_out, h, "grad_out", "h");
  check_frame_table(h, gate, "h", "gate");
  auto goc = grad_out.contiguous();
  auto hc = h.contiguous();
  auto gc = gate.contiguous();
  auto dh = at::empty_like(hc);
  auto dgate = at::empty({h.size(0), h.size(1), h.size(3)}, h.options());
  if (h.numel() == 0) return {dh, dgate.zero_()};
  GatedResidualBwdParams p{h.scalar_type(),       goc.const_data_ptr(),     hc.const_data_ptr(),
                           gc.const_data_ptr(),   dh.mutable_data_ptr(),    dgate.mutable_data_ptr(),
                           h.size(0) * h.size(1), h.size(2),                h.size(3)};
  FVDM_LAUNCH(gated_residual_bwd, p, h);
  return {dh, dgate};
}

void register_impls(torch::Library& m) {
  m.impl("adaln_modulate", &adaln_modulate);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace
}  // namespace fvdm

FVDM_REGISTER_BACKENDS(fvdm::register_impls)
