"""Small helpers shared by the loss and the samplers."""

from __future__ import annotations

import torch


def held_mask(held: torch.Tensor, B: int, Fr: int) -> torch.Tensor:
    """A held-frame mask given as (F,) or (B, F) bool, as (B, F)."""
    if held.dtype != torch.bool:
        raise ValueError(f"held must be a bool mask, got dtype {held.dtype}")
    if held.shape == (Fr,):
        return held[None].expand(B, Fr)
    if held.shape != (B, Fr):
        raise ValueError(f"held must have shape ({Fr},) or ({B}, {Fr}), got {tuple(held.shape)}")
    return held


def per_frame(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, F) values shaped to broadcast over a (B, F, ...) tensor."""
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))


def frame_noise(shape, generator: torch.Generator | None, device, dtype, shared: float = 0.0) -> torch.Tensor:
    """Noise for (B, F, ...) clips whose frames share a fraction `shared` of their variance:
    sqrt(1 - shared) * N(0, I) + sqrt(shared) * one N(0, I) frame per clip (the "mixed" noise
    prior of Ge et al. 2023, PYoCo). Every element stays N(0, 1); two frames of a clip
    correlate by `shared`. shared = 0 is plain N(0, I), the same numbers as randn_like_shape."""
    if not 0.0 <= shared < 1.0:
        raise ValueError(f"shared must lie in [0, 1), got {shared}")
    eps = randn_like_shape(shape, generator, device, dtype)
    if shared == 0.0:
        return eps
    common = randn_like_shape((shape[0], 1, *shape[2:]), generator, device, dtype)
    return (1.0 - shared) ** 0.5 * eps + shared**0.5 * common


def randn_like_shape(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (so a seed gives the same numbers wherever the
    result goes), then moved to device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
