"""Guidance as model_fn wrappers for the samplers: classifier-free guidance (class labels) and
temporal guidance (skip and frame-order guidance: frames that agree and move; any model). Both
mix the first C output channels (the prediction); extra channels (a learned variance) pass
through from the full model."""

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


def temporal_guidance(
    model_fn: Callable[..., torch.Tensor],
    skip_scale: float,
    order_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Callable[..., torch.Tensor]:
    """full + skip_scale * (full - local) + order_scale * (full - shuffled), on the first C
    channels; no training, one extra network call per nonzero scale per step.

    Spatiotemporal skip guidance (STG, Hyung et al. 2025): `local` is the same network with its
    frames kept apart (model_fn(..., frame_local=True): no attention across frames). What the
    full model adds over a per-frame image model is mostly the frames agreeing with each other
    (the same sprite, colour and size in every frame), and the guidance pushes further that way.
    Agreeing frames include frames that do not change at all, so on its own it also slows motion.

    Frame-order guidance: `shuffled` is the same network run on the frames in a random order
    (each frame with its own timestep and self-conditioning estimate; each video its own order,
    a new one every step, from `generator`, never the identity), its output put back in order.
    Attention across frames does not see the order; the temporal position embedding does. For a network blind to the order
    the two predictions would be equal, so the push is toward what the network makes of the
    order, i.e. the motion, which skip guidance on its own damps.

    Both scales 0 (or one frame, for the order term) return model_fn unchanged."""
    if skip_scale == 0.0 and order_scale == 0.0:
        return model_fn

    def guided(x: torch.Tensor, t: torch.Tensor, *x_self: torch.Tensor) -> torch.Tensor:
        C, Fr = x.shape[2], x.shape[1]
        full = model_fn(x, t, *x_self)
        out = full[:, :, :C].clone()
        if skip_scale:
            out += skip_scale * (full[:, :, :C] - model_fn(x, t, *x_self, frame_local=True)[:, :, :C])
        if order_scale and Fr > 1:
            rows = torch.arange(x.shape[0])[:, None]
            order = torch.stack([_shuffled_order(Fr, generator) for _ in range(x.shape[0])])  # (B, F)
            shuffled = model_fn(x[rows, order], t[rows, order], *(e[rows, order] for e in x_self))
            out += order_scale * (full[:, :, :C] - shuffled[rows, order.argsort(dim=1), :C])
        return _with_extra_channels(out, full, C)

    return guided


def _shuffled_order(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation of range(n), n >= 2, that is not the identity."""
    while True:
        order = torch.randperm(n, generator=generator)
        if bool((order != torch.arange(n)).any()):
            return order


def _mix(strong: torch.Tensor, weak: torch.Tensor, scale: float, C: int) -> torch.Tensor:
    """weak + scale * (strong - weak) on the first C channels; the rest from strong."""
    return _with_extra_channels(weak[:, :, :C] + scale * (strong[:, :, :C] - weak[:, :, :C]), strong, C)


def _with_extra_channels(mixed: torch.Tensor, source: torch.Tensor, C: int) -> torch.Tensor:
    """The mixed prediction (C channels) with source's extra channels (a learned variance) after it."""
    return mixed if source.shape[2] == C else torch.cat([mixed, source[:, :, C:]], dim=2)
