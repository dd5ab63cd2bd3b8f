// All operator schemas of the `fvdm` library, in one place. Implementations are registered
// per backend in csrc/ops/*.cpp; autograd and fake (meta) kernels in python/fvdm/ops/.
#include <torch/library.h>

// The test-only CPU emulation of the CUDA kernels (csrc/emu/) registers the same schemas as
// fvdm_cuda_emu::*, and the AVX-512 emulation of the CPU kernels as FVDM_AVX512_EMU_NS::*
// (fvdm_avx512_emu, fvdm_avx512bf16_emu), so they load beside fvdm._C.
#ifdef FVDM_CUDA_EMULATION
#define FVDM_LIBRARY(m) TORCH_LIBRARY(fvdm_cuda_emu, m)
#elif defined(FVDM_AVX512_EMULATION)
#define FVDM_LIBRARY_NS(ns, m) TORCH_LIBRARY(ns, m)  // expands FVDM_AVX512_EMU_NS first
#define FVDM_LIBRARY(m) FVDM_LIBRARY_NS(FVDM_AVX512_EMU_NS, m)
#else
#define FVDM_LIBRARY(m) TORCH_LIBRARY(fvdm, m)
#endif

FVDM_LIBRARY(m) {
  // Per-frame adaLN modulation. x (B,F,N,D); shift, scale (B,F,D). Returns y, mean, rstd (B,F,N).
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns dx, dshift, dscale.
  m.def("adaln_modulate_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");

  // Per-frame gated residual: out = x + gate[b,f] * h. x, h (B,F,N,D); gate (B,F,D).
  m.def("gated_residual(Tensor x, Tensor h, Tensor gate) -> Tensor");
  // Returns dh, dgate (dx is grad_out itself).
  m.def("gated_residual_backward(Tensor grad_out, Tensor h, Tensor gate) -> (Tensor, Tensor)");

  // Per-frame linear combination: out = sum_k coeffs[b,f,k] * inputs[k]; inputs (B,F,...).
  m.def("frame_combine(Tensor[] inputs, Tensor coeffs) -> Tensor");
  // Returns dinputs (one per input), dcoeffs (B,F,K).
  m.def("frame_combine_backward(Tensor grad_out, Tensor[] inputs, Tensor coeffs) -> (Tensor[], Tensor)");
  // Forward process with per-frame integer timesteps t (B,F):
  // x_t = sqrt_alpha_bar[t] * x0 + sqrt_one_minus_alpha_bar[t] * noise.
  m.def("noise_inject(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_alpha_bar, Tensor sqrt_one_minus_alpha_bar)"
        " -> Tensor");

  // Attention along frames for every (b, n, head). q, k, v (B,F,N,H,Dh), any strides with a
  // contiguous last dim (views into a (B,F,N,3,H,Dh) qkv buffer). key_mask (B,F) bool, true =
  // may be attended. Returns out (B,F,N,H,Dh) contiguous and lse (B,N,H,F).
  m.def("temporal_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float scale)"
        " -> (Tensor, Tensor)");
  // Returns dq, dk, dv, contiguous (B,F,N,H,Dh).
  m.def("temporal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_mask, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // The same with q, k, v packed in one (B,F,N,3,H,Dh) qkv buffer (the qkv projection's output):
  // returns out (B,F,N,H,Dh) and lse; the backward returns dqkv (B,F,N,3,H,Dh).
  m.def("temporal_attention_qkv(Tensor qkv, Tensor? key_mask, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("temporal_attention_qkv_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor? key_mask,"
        " bool causal, float scale) -> Tensor");
}
