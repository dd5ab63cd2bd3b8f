"""The operator math in plain PyTorch.

Same signatures and semantics as the fused operators in fvdm.ops. Tests compare the two,
the model runs on these with backend="reference", and the benchmarks use them as the eager
baseline, so they are written the way a plain PyTorch model would write them.
"""

from __future__ import annotations

import torch
from torch.nn.functional import layer_norm, scaled_dot_product_attention


def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over D (no affine), then per-frame modulation. x (B,F,N,D); shift, scale (B,F,D)."""
    return layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)


def gated_residual_ref(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate[b, f] * h. x, h (B,F,N,D); gate (B,F,D)."""
    return x + gate.unsqueeze(2) * h


def _per_frame(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,F) coefficients shaped to broadcast over a (B,F,...) tensor."""
    return c.reshape(c.shape + (1,) * (like.dim() - 2))


def frame_combine_ref(inputs: list[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[b, f, k] * inputs[k]; inputs (B,F,...), coeffs (B,F,K)."""
    out = None
    for k, x in enumerate(inputs):
        term = _per_frame(coeffs[..., k], x).to(x.dtype) * x
        out = term if out is None else out + term
    return out


def noise_inject_ref(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    sqrt_alpha_bar: torch.Tensor,
    sqrt_one_minus_alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """x_t = sqrt_alpha_bar[t] * x0 + sqrt_one_minus_alpha_bar[t] * noise with t (B,F) integer."""
    a = _per_frame(sqrt_alpha_bar[t], x0).to(x0.dtype)
    s = _per_frame(sqrt_one_minus_alpha_bar[t], x0).to(x0.dtype)
    return a * x0 + s * noise


def temporal_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention along F for every (b, n, head), as a Latte temporal block does it: rearrange
    (B,F,N,H,Dh) -> (B*N, H, F, Dh), scaled_dot_product_attention, rearrange back.
    key_mask (B,F) bool, true = may be attended; a query with no allowed key outputs zeros."""
    B, Fr, N, H, Dh = q.shape

    def to_seq(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1, 4).reshape(B * N, H, Fr, Dh)

    allowed = None
    if causal:
        allowed = torch.ones(Fr, Fr, dtype=torch.bool, device=q.device).tril()
    if key_mask is not None:
        km = key_mask.bool()[:, None, None, None, :].expand(B, N, 1, 1, Fr).reshape(B * N, 1, 1, Fr)
        allowed = km if allowed is None else allowed & km
    out = scaled_dot_product_attention(to_seq(q), to_seq(k), to_seq(v), attn_mask=allowed, scale=scale)
    if allowed is not None:  # rows with no allowed key: zeros, not NaN
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out.reshape(B, N, H, Fr, Dh).permute(0, 3, 1, 2, 4).contiguous()


def temporal_attention_qkv_ref(
    qkv: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """temporal_attention_ref on q, k, v = qkv.unbind(3) of a (B,F,N,3,H,Dh) qkv buffer."""
    return temporal_attention_ref(*qkv.unbind(3), key_mask, causal, scale)
