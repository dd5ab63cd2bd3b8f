"""Fused temporal attention: attention along the frame axis for every (b, token, head), reading
q, k, v through their strides straight out of the (B, F, N, 3, H, Dh) qkv projection and
writing (B, F, N, H, Dh) for the output projection. Wrapper, fake kernels and autograd for
fvdm::temporal_attention."""

from __future__ import annotations

import math

import torch

from fvdm._ext import HAS_C, require_c
from fvdm.ops._common import opmath_dtype
from fvdm.ops.selfcheck import ensure_checked


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v along F. q, k, v: (B, F, N, H, Dh), any strides with a contiguous
    last dim (e.g. ``qkv.unbind(3)`` of a (B, F, N, 3, H, Dh) buffer). key_mask: (B, F) bool,
    true = may be attended. causal: frame i sees frames <= i. scale: default 1/sqrt(Dh). The
    arguments are in the order of the op's schema (fvdm::temporal_attention).
    Returns (B, F, N, H, Dh) contiguous. A query with no allowed key gets zeros.

    Non-finite inputs: NaN reaches the output rows it reaches in the reference, plus one case
    more. A query whose every allowed score is -inf (a -inf in q against keys of one sign) has
    no defined softmax; torch's scaled_dot_product_attention (ops.reference) returns zeros
    there, as for a fully masked row, while this kernel returns NaN, so that a non-finite input
    shows instead of passing for a masked row."""
    require_c()
    ensure_checked("temporal_attention", q)
    if scale is None:
        scale = _default_scale(q, "q")
    return torch.ops.fvdm.temporal_attention(q, k, v, key_mask, causal, scale)[0]


def _default_scale(t: torch.Tensor, name: str) -> float:
    """1/sqrt(Dh), Dh = t's last dimension, which must be >= 1."""
    if t.dim() == 0 or t.shape[-1] < 1:
        raise ValueError(f"temporal_attention: the head dim of {name} (its last dimension, Dh) must be >= 1, "
                         f"got shape {tuple(t.shape)}")
    return 1.0 / math.sqrt(t.shape[-1])


def temporal_attention_qkv(
    qkv: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """temporal_attention on q, k, v = qkv.unbind(3) of a (B, F, N, 3, H, Dh) buffer (the qkv
    projection's output, viewed), any strides with a contiguous last dim. The same math, but
    its backward writes one (B, F, N, 3, H, Dh) gradient: through ``unbind`` autograd stacks
    dq, dk, dv into one more copy (13% of the forward+backward at Latte-XL on the CPU).
    Returns (B, F, N, H, Dh) contiguous."""
    require_c()
    ensure_checked("temporal_attention", qkv)
    if scale is None:
        scale = _default_scale(qkv, "qkv")
    return torch.ops.fvdm.temporal_attention_qkv(qkv, key_mask, causal, scale)[0]


if HAS_C:

    @torch.library.register_fake("fvdm::temporal_attention")
    def _attn_fake(q, k, v, key_mask, causal, scale):
        torch._check(q.dim() == 5, lambda: f"fvdm: q must be (B, F, N, H, Dh), got {tuple(q.shape)}")
        B, F, N, H, _ = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, N, H, F), dtype=opmath_dtype(q.dtype), device=q.device)
        return out, lse

    @torch.library.register_fake("fvdm::temporal_attention_backward")
    def _attn_bwd_fake(grad_out, q, k, v, out, lse, key_mask, causal, scale):
        return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))

    def _attn_setup(ctx, inputs, output):
        q, k, v, key_mask, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)

    def _attn_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        # One kernel writes dq, dk and dv and reads every saved tensor for any of them.
        dq, dk, dv = torch.ops.fvdm.temporal_attention_backward(
            grad_out, q, k, v, out, lse, key_mask, ctx.causal, ctx.scale
        )
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None

    torch.library.register_autograd("fvdm::temporal_attention", _attn_backward, setup_context=_attn_setup)

    @torch.library.register_fake("fvdm::temporal_attention_qkv")
    def _attn_qkv_fake(qkv, key_mask, causal, scale):
        torch._check(qkv.dim() == 6 and qkv.shape[3] == 3,
                     lambda: f"fvdm: qkv must be (B, F, N, 3, H, Dh), got {tuple(qkv.shape)}")
        return _attn_fake(*qkv.unbind(3), key_mask, causal, scale)

    @torch.library.register_fake("fvdm::temporal_attention_qkv_backward")
    def _attn_qkv_bwd_fake(grad_out, qkv, out, lse, key_mask, causal, scale):
        return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)

    def _attn_qkv_setup(ctx, inputs, output):
        qkv, key_mask, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, key_mask)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)

    def _attn_qkv_backward(ctx, grad_out, _grad_lse):
        qkv, out, lse, key_mask = ctx.saved_tensors
        dqkv = torch.ops.fvdm.temporal_attention_qkv_backward(
            grad_out, qkv, out, lse, key_mask, ctx.causal, ctx.scale
        )
        return dqkv, None, None, None

    torch.library.register_autograd("fvdm::temporal_attention_qkv", _attn_qkv_backward, setup_context=_attn_qkv_setup)
