"""Per-frame linear combinations: the forward process (noise_inject) and the general
out = sum_k c_k[b, f] * in_k that every sampler step and training target reduces to.
Wrappers, fake kernels and autograd for fvdm::frame_combine and fvdm::noise_inject."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fvdm._ext import HAS_C, require_c
from fvdm.ops._common import opmath_dtype
from fvdm.ops.selfcheck import ensure_checked


def frame_combine(inputs: Sequence[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """out = sum_k coeffs[b, f, k] * inputs[k]. inputs: 1..8 tensors (B, F, ...) of one shape and
    dtype; coeffs: (B, F, K), any float dtype (used in float32, float64 for float64 inputs)."""
    require_c()
    ensure_checked("frame_combine", inputs[0])
    return torch.ops.fvdm.frame_combine(list(inputs), coeffs)


def noise_inject(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    sqrt_alpha_bar: torch.Tensor,
    sqrt_one_minus_alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """x_t = sqrt_alpha_bar[t] * x0 + sqrt_one_minus_alpha_bar[t] * noise, with integer per-frame
    timesteps t (B, F) and tables (T,). One pass over memory; the lookup happens in the op."""
    require_c()
    ensure_checked("noise_inject", x0)
    return torch.ops.fvdm.noise_inject(x0, noise, t, sqrt_alpha_bar, sqrt_one_minus_alpha_bar)


if HAS_C:

    @torch.library.register_fake("fvdm::frame_combine")
    def _combine_fake(inputs, coeffs):
        torch._check(len(inputs) >= 1, lambda: "fvdm: frame_combine needs at least one input")
        return torch.empty_like(inputs[0], memory_format=torch.contiguous_format)

    @torch.library.register_fake("fvdm::frame_combine_backward")
    def _combine_bwd_fake(grad_out, inputs, coeffs):
        dinputs = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]
        return dinputs, torch.empty_like(coeffs, memory_format=torch.contiguous_format)

    def _combine_setup(ctx, inputs, output):
        xs, coeffs = inputs
        # needs_input_grad is flat: one entry per input tensor, then coeffs. The inputs are
        # saved only for dcoeffs; dinputs[k] = coeffs[..., k] * grad_out needs coeffs alone.
        # (The backward's ctx.needs_input_grad is not laid out so: keep the flags from here.)
        ctx.need_inputs, ctx.need_coeffs = ctx.needs_input_grad[: len(xs)], ctx.needs_input_grad[len(xs)]
        ctx.save_for_backward(coeffs, *(xs if ctx.need_coeffs else ()))

    def _combine_backward(ctx, grad_out):
        coeffs, *xs = ctx.saved_tensors
        if ctx.need_coeffs:
            dinputs, dcoeffs = torch.ops.fvdm.frame_combine_backward(grad_out, xs, coeffs)
            return [d if need else None for d, need in zip(dinputs, ctx.need_inputs)], dcoeffs
        dinputs = [torch.ops.fvdm.frame_combine([grad_out], coeffs[..., k : k + 1]) if need else None
                   for k, need in enumerate(ctx.need_inputs)]
        return dinputs, None

    torch.library.register_autograd("fvdm::frame_combine", _combine_backward, setup_context=_combine_setup)

    @torch.library.register_fake("fvdm::noise_inject")
    def _noise_fake(x0, noise, t, sqrt_alpha_bar, sqrt_one_minus_alpha_bar):
        return torch.empty_like(x0, memory_format=torch.contiguous_format)

    def _noise_setup(ctx, inputs, output):
        _, _, t, a, s = inputs
        # d x0 = a[t] * g needs a, d noise = s[t] * g needs s.
        ctx.save_for_backward(t, a if ctx.needs_input_grad[0] else None, s if ctx.needs_input_grad[1] else None)

    def _noise_backward(ctx, grad_out):
        t, a, s = ctx.saved_tensors
        dt = opmath_dtype(grad_out.dtype)
        # A B*F lookup and a fused scaling per gradient.
        dx0 = torch.ops.fvdm.frame_combine([grad_out], a.to(dt)[t].unsqueeze(-1)) if a is not None else None
        dnoise = torch.ops.fvdm.frame_combine([grad_out], s.to(dt)[t].unsqueeze(-1)) if s is not None else None
        return dx0, dnoise, None, None, None

    torch.library.register_autograd("fvdm::noise_inject", _noise_backward, setup_context=_noise_setup)
