"""Training loss with per-frame timesteps and per-frame weights.

loss = weighted mean over frames of the per-frame MSE (mean over C, H, W), plus, with a
learned variance on a DDPM schedule, the variational-bound term of Nichol & Dhariwal 2021 as
the reference code uses it: the VB term sees the mean prediction detached, so it trains only
the variance channels.

Held frames (conditioning given clean, e.g. the first frame for image-to-video fine-tuning)
enter the network clean with t = clean and count for nothing in the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch

from fvdm.diffusion.objectives import check_objective, prediction_coeffs, training_target, x0_estimate
from fvdm.diffusion.schedules import DDPMSchedule, Schedule
from fvdm.diffusion._common import check_on_device, held_mask, per_frame, randn_like_shape
from fvdm.ops import get_backend

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,F,C,H,W), t (B,F)) -> out
VB_T0_RULES = ("frame", "clip")  # which frames at t = 0 take the decoder NLL (vb_term)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    mse: torch.Tensor  # (B, F) per-frame MSE
    vb: torch.Tensor | None  # (B, F) per-frame VB term in bits per dim, or None
    weights: torch.Tensor  # (B, F) the frame weights used


def frame_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, F, ...) -> (B, F): mean over everything but batch and frame."""
    return x.flatten(2).mean(-1)


def weighted_frame_mean(per_frame: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of (B, F) values with (B, F) weights (all elements of a frame share its weight)."""
    total = weights.sum()
    check_on_device(total > 0, lambda: "the frame weights sum to zero: every frame is held or masked")
    return (per_frame * weights).sum() / total


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)), in nats."""

    def cdf(z):
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    inv = torch.exp(-log_scale)
    cdf_plus = cdf(inv * (x - mean + 1.0 / 255.0))
    cdf_minus = cdf(inv * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def vb_term(
    schedule: DDPMSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    pred: torch.Tensor,
    var_values: torch.Tensor,
    objective: str,
    ops,
    t0_rule: str = "frame",
    t0_ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-frame VB term (B, F) in bits/dim for one-step posteriors q(x_{t-1} | x_t, x0):
    KL to the model's Gaussian for t > 0, discretised decoder NLL at t = 0. The model's
    log-variance interpolates log beta~_t and log beta_t with frac = (v + 1) / 2.

    t0_rule (VB_T0_RULES) says which frames take the decoder NLL. "frame": every frame at
    t = 0, the term the bound has for that frame. "clip": the official code's rule, all frames
    of a clip when every frame of it is at t = 0, else none (a frame at 0 in a clip of mixed
    times then gets the KL against the posterior's clipped variance). t0_ignore: (B, F) bool,
    frames the clip rule does not look at (held frames, which sit at t = 0 anyway)."""
    if t0_rule not in VB_T0_RULES:
        raise ValueError(f"unknown t0_rule {t0_rule!r}; choose one of {VB_T0_RULES}")
    dev = x0.device

    def lookup(table: torch.Tensor) -> torch.Tensor:  # (B, F, 1, ...) in x's dtype
        return table.to(dev)[t].to(x0.dtype).reshape(t.shape + (1,) * (x0.dim() - 2))

    c1, c2 = schedule.posterior_mean_coef1.to(dev)[t], schedule.posterior_mean_coef2.to(dev)[t]
    true_mean = ops.frame_combine([x0, x_t], torch.stack([c1, c2], -1))
    true_logvar = lookup(schedule.posterior_log_variance_clipped)

    a, s = schedule.alpha_sigma(t)
    P = prediction_coeffs(objective, a, s)[..., 0, :]  # x0_hat = P0 x_t + P1 pred
    # x0_hat is folded into the posterior mean: c1 * (P0 x_t + P1 pred) + c2 * x_t
    model_mean = ops.frame_combine([x_t, pred.detach()], torch.stack([c1 * P[..., 0] + c2, c1 * P[..., 1]], -1))
    frac = (var_values + 1) / 2
    min_log, max_log = true_logvar, lookup(torch.log(schedule.betas))
    model_logvar = frac * max_log + (1 - frac) * min_log

    kl = frame_mean(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
    nll = -frame_mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
    at_zero = t == 0
    if t0_rule == "clip":
        looked_at = at_zero if t0_ignore is None else at_zero | t0_ignore
        at_zero = looked_at.all(dim=1, keepdim=True).expand_as(t)
    return torch.where(at_zero, nll, kl)


def _self_condition_input(model_fn, schedule, x_t, model_t, t, use, objective, C, ops) -> torch.Tensor:
    """x_self for the training pass: the model's own x0 estimate (no gradient) for clips in
    `use`, zeros for the others. The first pass sees only the chosen clips (half the batch on
    average, so it costs half a forward pass), as model_fn(x, t, x_self, rows=their indices)."""
    x_self = torch.zeros_like(x_t)
    if use.shape != (x_t.shape[0],) or use.dtype != torch.bool:
        raise ValueError(f"self_condition must be a ({x_t.shape[0]},) bool mask, got {tuple(use.shape)} {use.dtype}")
    # The rows are found where the mask lives: a mask on the host (as the trainer draws it)
    # costs no device sync.
    rows = use.nonzero().squeeze(1).to(x_t.device)
    if len(rows):
        with torch.no_grad():
            first = model_fn(x_t[rows], model_t[rows], x_self[rows], rows=rows)[:, :, :C].to(x_t.dtype)
            a, s = schedule.alpha_sigma(t[rows])
            x_self[rows] = x0_estimate(x_t[rows], first, prediction_coeffs(objective, a, s), ops)
    return x_self


def noised_input(
    schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, held: torch.Tensor | None, ops
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the network sees for clean clips x0 (B, F, ...) at valid per-frame times t (B, F):
    (x_t, model times), with held frames ((B, F) bool, or None) exactly x0 at the clean time,
    FVDM's way of giving frames."""
    x_t = schedule.q_sample(x0, noise, t, ops)
    model_t = schedule.model_time(t)
    if held is not None:
        x_t = torch.where(per_frame(held, x0), x0, x_t)
        model_t = torch.where(held, schedule.model_time(torch.full_like(t, schedule.clean_time)), model_t)
    return x_t, model_t


def diffusion_loss(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    objective: str = "eps",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    held: torch.Tensor | None = None,
    frame_weights: torch.Tensor | None = None,
    learn_sigma: bool = False,
    self_condition: torch.Tensor | None = None,
    vb_t0: str = "frame",
    ops: SimpleNamespace | None = None,
) -> LossOutput:
    """Loss of model_fn on clean clips x0 (B, F, C, H, W) at per-frame times t (B, F) (or (B,)).

    noise: eps, drawn from generator if not given. held: (B, F) or (F,) bool, frames given
    clean (time = clean) and left out of the loss. frame_weights: (B, F) non-negative weights.
    learn_sigma: the model outputs 2C channels (prediction, variance values); adds the VB term
    (DDPM only). self_condition: for a self-conditioning model, model_fn(x_t, t, x_self); a (B,)
    bool mask of the clips that first get the model's own x0 estimate (a no-grad pass with
    zeros over those clips only, called with rows=their indices in the batch so that a model_fn
    holding per-clip inputs of its own, like class labels, can pick theirs), the others get
    zeros (Chen et al. 2022 draw it with probability 1/2). None: the model takes no estimate.
    vb_t0: which frames at t = 0 get the VB term's decoder NLL, "frame" or the official "clip"
    rule (vb_term). ops: the model's operator set (`model.ops`, chosen when it was built);
    None: fvdm.ops.get_backend("auto").

    t is validated here, once, on its device (no host read): a training step need not wait for
    the GPU."""
    check_objective(objective)
    ops = ops if ops is not None else get_backend("auto")
    if x0.dim() < 3:
        raise ValueError(f"x0 must have shape (B, F, ...), got {tuple(x0.shape)}")
    B, Fr = x0.shape[:2]
    if t.shape == (B,):
        t = t[:, None].expand(B, Fr)
    if t.shape != (B, Fr):
        raise ValueError(f"t must have shape ({B}, {Fr}) or ({B},), got {tuple(t.shape)}")
    t = t.to(x0.device)
    schedule.check_times(t, clean=False)
    if learn_sigma and not isinstance(schedule, DDPMSchedule):
        raise ValueError("learn_sigma needs a DDPM schedule (the VB term is defined for discrete posteriors)")

    weights = torch.ones(B, Fr, dtype=torch.float32, device=x0.device)
    if frame_weights is not None:
        if frame_weights.shape != (B, Fr):
            raise ValueError(f"frame_weights must have shape ({B}, {Fr}), got {tuple(frame_weights.shape)}")
        weights = weights * frame_weights.to(weights)
    if held is not None:
        held = held_mask(held, B, Fr).to(x0.device)
        weights = weights * (~held).float()
        # any valid time: held frames are overwritten with x0 after noising
        t = torch.where(held, torch.zeros_like(t), t)

    if noise is None:
        noise = randn_like_shape(x0.shape, generator, x0.device, x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")

    x_t, model_t = noised_input(schedule, x0, noise, t, held, ops)

    C = x0.shape[2]
    if self_condition is None:
        out = model_fn(x_t, model_t)
    else:
        out = model_fn(x_t, model_t, _self_condition_input(model_fn, schedule, x_t, model_t, t, self_condition,
                                                           objective, C, ops))
    expected = 2 * C if learn_sigma else C
    if out.shape[:2] != (B, Fr) or out.shape[2] != expected or out.shape[3:] != x0.shape[3:]:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected {(B, Fr, expected, *x0.shape[3:])}")
    pred = out[:, :, :C]

    a, s = schedule.alpha_sigma(t)
    target = training_target(objective, x0, noise, a, s, ops)
    mse = frame_mean((pred.float() - target.float()) ** 2)  # (B, F)
    loss = weighted_frame_mean(mse, weights)
    vb = None
    if learn_sigma:
        vb = vb_term(schedule, x0, x_t, t, pred, out[:, :, C:], objective, ops, vb_t0, held)
        loss = loss + weighted_frame_mean(vb.float(), weights)
    return LossOutput(loss=loss, mse=mse, vb=vb, weights=weights)
