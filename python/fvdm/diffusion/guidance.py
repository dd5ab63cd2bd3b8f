"""Classifier-free guidance as a model_fn wrapper for the samplers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def classifier_free_guidance(
    model: Callable[..., torch.Tensor],
    y: torch.Tensor,
    scale: float,
    null_label: int,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_fn(x, t) = uncond + scale * (cond - uncond) on the first C output channels (the
    prediction; C = x's channels) in one batched call with labels y and null_label. Extra
    channels (a learned variance) come from the conditional half unmixed, as in the reference.
    scale = 1 is the plain conditional model, with no extra batch. A self-conditioning model's
    estimate x_self (an optional third argument) goes to both halves."""
    if scale == 1.0:
        return lambda x, t, *x_self: model(x, t, y, *x_self)

    def guided(x: torch.Tensor, t: torch.Tensor, *x_self: torch.Tensor) -> torch.Tensor:
        C = x.shape[2]
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), *[torch.cat([e, e]) for e in x_self])
        cond, uncond = out.chunk(2)
        mixed = uncond[:, :, :C] + scale * (cond[:, :, :C] - uncond[:, :, :C])
        return torch.cat([mixed, cond[:, :, C:]], dim=2)

    return guided
