// Host API for per-frame linear combinations: frame_combine (every sampler step and training
// target) and noise_inject (the forward process, table lookup by per-frame timestep).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "fvdm/checks.h"
#include "fvdm/launch.h"

namespace fvdm {
namespace {

// Checks inputs (K tensors of one shape (B,F,...)) and coeffs (B,F,K); returns the
// contiguous inputs and the coefficients in op-math dtype.
std::pair<std::vector<at::Tensor>, at::Tensor> prepare_combine(at::TensorList inputs, const at::Tensor& coeffs) {
  const int64_t K = static_cast<int64_t>(inputs.size());
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxCombineInputs, "fvdm: frame_combine takes 1 to ", kMaxCombineInputs,
                    " inputs, got ", K);
  const at::Tensor& x = inputs[0];
  check_supported_device(x, "inputs[0]");
  check_float(x, "inputs[0]");
  TORCH_CHECK_VALUE(x.dim() >= 2, "fvdm: inputs[0] must have shape (B, F, ...), got ", shape_str(x.sizes()));
  std::vector<at::Tensor> contig;
  for (int64_t k = 0; k < K; ++k) {
    const std::string name = "inputs[" + std::to_string(k) + "]";
    check_like(inputs[k], x, name.c_str(), "inputs[0]");
    contig.push_back(inputs[k].contiguous());
  }
  check_float(coeffs, "coeffs");
  check_same_device(coeffs, x, "coeffs", "inputs[0]");
  check_shape(coeffs, {x.size(0), x.size(1), K}, "coeffs", "(B, F, K)");
  check_finite(coeffs, "coeffs");
  return {std::move(contig), coeffs.to(at::toOpMathType(x.scalar_type())).contiguous()};
}

FrameCombineFwdParams combine_params(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                                     at::Tensor& out) {
  const at::Tensor& x = inputs[0];
  FrameCombineFwdParams p{};
  p.dtype = x.scalar_type();
  for (size_t k = 0; k < inputs.size(); ++k) p.inputs[k] = inputs[k].const_data_ptr();
  p.coeffs = coeffs.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.K = static_cast<int64_t>(inputs.size());
  p.BF = x.size(0) * x.size(1);
  p.inner = p.BF == 0 ? 0 : x.numel() / p.BF;
  return p;
}

at::Tensor frame_combine(at::TensorList inputs, const at::Tensor& coeffs) {
  auto [contig, c] = prepare_combine(inputs, coeffs);
  auto out = at::empty_like(contig[0]);
  if (out.numel() == 0) return out;
  auto p = combine_params(contig, c, out);
  FVDM_LAUNCH(frame_combine_fwd, p, out);
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> frame_combine_backward(const at::Tensor& grad_out,
                                                                      at::TensorList inputs,
                                                                      const at::Tensor& coeffs) {
  auto [contig, c] = prepare_combine(inputs, coeffs);
  const at::Tensor& x = contig[0];
  check_like(grad_out, x, "grad_out", "inputs[0]");
  auto g = grad_out.contiguous();
  std::vector<at::Tensor> dinputs;
  for (size_t k = 0; k < contig.size(); ++k) dinputs.push_back(at::empty_like(x));
  auto dcoeffs = at::zeros_like(c);
  if (x.numel() == 0) return {dinputs, dcoeffs.to(coeffs.scalar_type())};
  FrameCombineBwdParams p{};
  p.dtype = x.scalar_type();
  p.grad_out = g.const_data_ptr();
  for (size_t k = 0; k < contig.size(); ++k) {
    p.inputs[k] = contig[k].const_data_ptr();
    p.dinputs[k] = dinputs[k].mutable_data_ptr();
  }
  p.coeffs = c.const_data_ptr();
  p.dcoeffs = dcoeffs.mutable_data_ptr();
  p.K = static_cast<int64_t>(contig.size());
  p.BF = x.size(0) * x.size(1);
  p.inner = x.numel() / p.BF;
  FVDM_LAUNCH(frame_combine_bwd, p, x);
  return {dinputs, dcoeffs.to(coeffs.scalar_type())};
}

// (B,F,2) per-frame coefficients [sqrt_alpha_bar[t], sqrt_one_minus_alpha_bar[t]] in op-math
// dtype, with t checked against the table length. A B*F lookup: on the CPU a plain loop (the
// ATen route costs a dozen small ops, more than the lookup), elsewhere index_select.
at::Tensor frame_coefficients(const at::Tensor& t, const at::Tensor& a, const at::Tensor& s, at::ScalarType opm) {
  const int64_t T = a.size(0);
  const int64_t B = t.size(0), F = t.size(1);
  if (t.is_cpu()) {
    auto coeffs = at::empty({B, F, 2}, t.options().dtype(opm));
    auto tl = t.to(at::kLong).contiguous();
    auto ad = a.to(at::kDouble).contiguous(), sd = s.to(at::kDouble).contiguous();
    const int64_t* tp = tl.const_data_ptr<int64_t>();
    const double* ap = ad.const_data_ptr<double>();
    const double* sp = sd.const_data_ptr<double>();
    int64_t tmin = 0, tmax = 0;
    for (int64_t i = 0; i < B * F; ++i) {
      tmin = i ? std::min(tmin, tp[i]) : tp[i];
      tmax = i ? std::max(tmax, tp[i]) : tp[i];
    }
    TORCH_CHECK_VALUE(B * F == 0 || (tmin >= 0 && tmax < T), "fvdm: t must lie in [0, ", T - 1,
                      "] (the table length), got values in [", tmin, ", ", tmax, "]");
    AT_DISPATCH_FLOATING_TYPES(opm, "fvdm_frame_coefficients", [&] {
      scalar_t* c = coeffs.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < B * F; ++i) {
        c[2 * i] = static_cast<scalar_t>(ap[tp[i]]);
        c[2 * i + 1] = static_cast<scalar_t>(sp[tp[i]]);
      }
    });
    return coeffs;
  }
  if (t.numel() > 0) {
    const auto [lo, hi] = at::aminmax(t);
    const int64_t tmin = lo.item<int64_t>(), tmax = hi.item<int64_t>();
    TORCH_CHECK_VALUE(tmin >= 0 && tmax < T, "fvdm: t must lie in [0, ", T - 1, "] (the table length), got values in [",
                      tmin, ", ", tmax, "]");
  }
  auto tl = t.to(at::kLong).reshape(-1);
  return at::stack({a.to(opm).index_select(0, tl), s.to(opm).index_select(0, tl)}, -1).view({B, F, 2});
}

at::Tensor noise_inject(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& t,
                        const at::Tensor& sqrt_alpha_bar, const at::Tensor& sqrt_one_minus_alpha_bar) {
  check_supported_device(x0, "x0");
  check_float(x0, "x0");
  TORCH_CHECK_VALUE(x0.dim() >= 2, "fvdm: x0 must have shape (B, F, ...), got ", shape_str(x0.sizes()));
  check_like(noise, x0, "noise", "x0");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                   "fvdm: t must hold integer timesteps (int64 or int32), got ", t.scalar_type());
  check_same_device(t, x0, "t", "x0");
  check_shape(t, {x0.size(0), x0.size(1)}, "t", "(B, F)");
  for (auto [tab, name] :
       {std::pair{&sqrt_alpha_bar, "sqrt_alpha_bar"}, std::pair{&sqrt_one_minus_alpha_bar, "sqrt_one_minus_alpha_bar"}}) {
    check_float(*tab, name);
    check_same_device(*tab, x0, name, "x0");
    check_dim(*tab, 1, name, "(T,)");
    check_finite(*tab, name);
  }
  const int64_t T = sqrt_alpha_bar.size(0);
  TORCH_CHECK_VALUE(sqrt_one_minus_alpha_bar.size(0) == T, "fvdm: sqrt_one_minus_alpha_bar has ",
                    sqrt_one_minus_alpha_bar.size(0), " entries but sqrt_alpha_bar has ", T);
  auto coeffs = frame_coefficients(t, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, at::toOpMathType(x0.scalar_type()));
  std::vector<at::Tensor> inputs{x0.contiguous(), noise.contiguous()};
  auto out = at::empty_like(inputs[0]);
  if (out.numel() == 0) return out;
  auto c = coeffs.contiguous();
  auto p = combine_params(inputs, c, out);
  FVDM_LAUNCH(frame_combine_fwd, p, out);
  return out;
}

void register_impls(torch::Library& m) {
  m.impl("frame_combine", &frame_combine);
  m.impl("frame_combine_backward", &frame_combine_backward);
  m.impl("noise_inject", &noise_inject);
}

}  // namespace
}  // namespace fvdm

FVDM_REGISTER_BACKENDS(fvdm::register_impls)
