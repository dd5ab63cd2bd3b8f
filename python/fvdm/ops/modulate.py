"""Per-frame timestep modulation: adaLN (LayerNorm + per-frame scale/shift) and the gated
residual. Wrappers, fake kernels for torch.compile, and autograd for fvdm::adaln_modulate and
fvdm::gated_residual."""

from __future__ import annotations

import torch

from fvdm._ext import HAS_C, require_c
from fvdm.ops._common import opmath_dtype
from fvdm.ops.selfcheck import ensure_checked


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = LayerNorm(x; eps, no affine) * (1 + scale[b, f]) + shift[b, f].

    x: (B, F, N, D); shift, scale: (B, F, D), same dtype as x. Statistics in float32."""
    require_c()
    ensure_checked("adaln_modulate", x)
    return torch.ops.fvdm.adaln_modulate(x, shift, scale, eps)[0]


def gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out = x + gate[b, f] * h. x, h: (B, F, N, D); gate: (B, F, D)."""
    require_c()
    ensure_checked("gated_residual", x)
    return torch.ops.fvdm.gated_residual(x, h, gate)


if HAS_C:

    @torch.library.register_fake("fvdm::adaln_modulate")
    def _adaln_fake(x, shift, scale, eps):
        torch._check(x.dim() == 4, lambda: f"fvdm: x must be (B, F, N, D), got {tuple(x.shape)}")
        stats = x.new_empty(x.shape[:3], dtype=opmath_dtype(x.dtype))
        return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)

    @torch.library.register_fake("fvdm::adaln_modulate_backward")
    def _adaln_bwd_fake(grad_y, x, scale, mean, rstd):
        table = x.new_empty((x.shape[0], x.shape[1], x.shape[3]))
        return torch.empty_like(x, memory_format=torch.contiguous_format), table, torch.empty_like(table)

    def _adaln_setup(ctx, inputs, output):
        x, _, scale, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        # dshift = sum_n grad_y needs nothing saved; dx and dscale need the kernel's inputs.
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            ctx.save_for_backward(x, scale, mean, rstd)

    def _adaln_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        need_x, need_shift, need_scale = ctx.needs_input_grad[:3]
        if not (need_x or need_scale):
            return None, grad_y.sum(2, dtype=opmath_dtype(grad_y.dtype)).to(grad_y.dtype), None, None
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.fvdm.adaln_modulate_backward(grad_y, x, scale, mean, rstd)
        return dx if need_x else None, dshift if need_shift else None, dscale if need_scale else None, None

    torch.library.register_autograd("fvdm::adaln_modulate", _adaln_backward, setup_context=_adaln_setup)

    @torch.library.register_fake("fvdm::gated_residual")
    def _gated_fake(x, h, gate):
        torch._check(x.dim() == 4, lambda: f"fvdm: x must be (B, F, N, D), got {tuple(x.shape)}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fvdm::gated_residual_backward")
    def _gated_bwd_fake(grad_out, h, gate):
        return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(gate.shape)

    def _gated_setup(ctx, inputs, output):
        _, h, gate = inputs
        # dx = grad_out needs nothing saved; dh and dgate come from one kernel that reads both.
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ctx.save_for_backward(h, gate)

    def _gated_backward(ctx, grad_out):
        need_x, need_h, need_gate = ctx.needs_input_grad[:3]
        if not (need_h or need_gate):
            return grad_out, None, None
        h, gate = ctx.saved_tensors
        dh, dgate = torch.ops.fvdm.gated_residual_backward(grad_out, h, gate)
        return grad_out if need_x else None, dh if need_h else None, dgate if need_gate else None

    torch.library.register_autograd("fvdm::gated_residual", _gated_backward, setup_context=_gated_setup)
