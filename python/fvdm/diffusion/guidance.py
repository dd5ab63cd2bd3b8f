"""Guidance as model_fn wrappers for the samplers: classifier-free guidance (class labels) and
spatiotemporal skip guidance (temporal coherence, any model). Both mix the first C output
channels (the prediction); extra channels (a learned variance) pass through from the full model."""

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
        return lambda x, t, *x_self, **kw: model(x, t, y, *x_self, **kw)

    def guided(x: torch.Tensor, t: torch.Tensor, *x_self: torch.Tensor, **kw) -> torch.Tensor:
        null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), *[torch.cat([e, e]) for e in x_self],
                    **kw)
        cond, uncond = out.chunk(2)
        return _mix(cond, uncond, scale, x.shape[2])

    return guided


def skip_guidance(model_fn: Callable[..., torch.Tensor], scale: float) -> Callable[..., torch.Tensor]:
    """Spatiotemporal skip guidance (STG, Hyung et al. 2025): full + scale * (full - weak), the
    weak prediction from the same network with its frames kept apart (model_fn(...,
    frame_local=True): no attention across frames). What the full model adds over a per-frame
    image model is mostly the frames agreeing with each other (the same sprite, colour and size
    in every frame), and the guidance pushes further that way; no training, one extra network
    call per step. scale = 0 returns model_fn as is."""
    if scale == 0.0:
        return model_fn

    def guided(x: torch.Tensor, t: torch.Tensor, *x_self: torch.Tensor) -> torch.Tensor:
        full = model_fn(x, t, *x_self)
        return _mix(full, model_fn(x, t, *x_self, frame_local=True), 1.0 + scale, x.shape[2])

    return guided


def _mix(strong: torch.Tensor, weak: torch.Tensor, scale: float, C: int) -> torch.Tensor:
    """weak + scale * (strong - weak) on the first C channels; the rest from strong."""
    mixed = weak[:, :, :C] + scale * (strong[:, :, :C] - weak[:, :, :C])
    return mixed if strong.shape[2] == C else torch.cat([mixed, strong[:, :, C:]], dim=2)
