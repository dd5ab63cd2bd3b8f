// Argument checks for the host API layer. Every failure names the argument and raises a
// Python ValueError (shape, value, device) or TypeError (dtype); never a crash.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>

namespace fvdm {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// Floating dtypes every op accepts: fp32, bf16, fp16, and fp64 (CPU, for gradcheck).
inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
                   "fvdm: ", name, " must be float32, bfloat16, float16 or float64, got ", st);
  TORCH_CHECK_VALUE(!(st == at::kDouble && t.is_cuda()), "fvdm: ", name,
                    " is float64 on CUDA; float64 is supported on the CPU only");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "fvdm: ", name, " must have ", dim, " dims ", layout, ", got shape ",
                    shape_str(t.sizes()));
}

inline void check_shape(const at::Tensor& t, std::initializer_list<int64_t> expected, const char* name,
                        const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), "fvdm: ", name, " must have shape ", layout, " = ",
                    shape_str(at::IntArrayRef(expected)), ", got ", shape_str(t.sizes()));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fvdm: ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fvdm: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; they must be on the same device");
}

// t is on ref's device with ref's dtype and, unless same_shape is false, ref's shape.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name,
                       bool same_shape = true) {
  check_same_dtype(t, ref, name, ref_name);
  check_same_device(t, ref, name, ref_name);
  TORCH_CHECK_VALUE(!same_shape || t.sizes() == ref.sizes(), "fvdm: ", name, " has shape ", shape_str(t.sizes()),
                    " but ", ref_name, " has shape ", shape_str(ref.sizes()), "; they must match");
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "fvdm: ", name,
                    " must be contiguous in its last dim (stride(-1) == 1), got strides ", shape_str(t.strides()));
}

// Small tables: on the CPU a direct loop (a few ATen calls would cost more than the scan);
// elsewhere isfinite().all().
inline void check_finite(const at::Tensor& t, const char* name) {
  bool finite = true;
  if (t.is_cpu()) {
    auto c = t.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fvdm_check_finite", [&] {
      const scalar_t* p = c.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < c.numel() && finite; ++i) finite = std::isfinite(static_cast<double>(p[i]));
    });
  } else {
    finite = t.isfinite().all().item<bool>();
  }
  TORCH_CHECK_VALUE(finite, "fvdm: ", name, " contains NaN or inf");
}

inline void check_supported_device(const at::Tensor& t, const char* name) {
#ifdef FVDM_WITH_CUDA
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), "fvdm: ", name, " must be a CPU or CUDA tensor, got ", t.device());
#else
  TORCH_CHECK_VALUE(t.is_cpu(), "fvdm: ", name, " is on ", t.device(),
                    " but this build of fvdm._C has CPU kernels only (rebuild with FVDM_CUDA=1)");
#endif
}

}  // namespace fvdm
