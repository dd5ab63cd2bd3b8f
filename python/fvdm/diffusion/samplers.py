"""Samplers driven by a schedule matrix.

A schedule matrix S has shape (steps + 1, F) (or (steps + 1, B, F)) of per-frame times, each
column non-increasing: at step i frame f goes from S[i, f] to S[i + 1, f]. DDPM / DDIM use
integer timesteps with -1 = clean as the last value; flow (Euler) uses float times in [0, 1]
with 0 = clean. A frame whose time does not change in a step stays exactly as it is. Held
frames (a bool mask (F,) or (B, F)) are always exactly their clean values x0_held and are
shown to the model at the clean time.

Every step is one per-frame linear combination. A step rule gives per-frame weights of
(x_t, x0_hat, eps_hat, fresh noise); the objective gives x0_hat and eps_hat as per-frame
combinations of (x_t, prediction); folding the two gives (B, F, 3) coefficients of
(x_t, prediction, noise) applied by one ops.frame_combine call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch

from fvdm.diffusion.objectives import check_objective, prediction_coeffs, x0_estimate
from fvdm.diffusion.schedules import DDPMSchedule, FlowSchedule, Schedule
from fvdm.diffusion._common import check_on_device, held_mask, per_frame, randn_like_shape
from fvdm.ops import get_backend

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,F,C,H,W), t (B,F)) -> out
Callback = Callable[[int, int, torch.Tensor], None]  # (step index, number of steps, x after it)

METHODS = ("ddpm", "ddim", "euler")
# How given frames enter the sampler. "hold" (FVDM): they sit at the clean time with their clean
# values, the other frames follow S. "replace" (the usual way for a scalar-timestep model, e.g.
# Ho et al. 2022's replacement method): every frame follows S, and before each step the given
# frames are overwritten by a fresh noising of their clean values to the current time.
CONDITIONING = ("hold", "replace")
DDPM_VARIANCES = ("small", "large")


class StepWeights(NamedTuple):
    """Per-frame (B, F) float64 weights of one step: x_s = x * x_t + x0 * x0_hat + eps * eps_hat
    + noise * z, z ~ N(0, I)."""

    x: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    noise: torch.Tensor


# ----------------------------------------------------------------------------- step rules


def ddpm_step(schedule: DDPMSchedule, t: torch.Tensor, s: torch.Tensor, variance: str = "small") -> StepWeights:
    """Ho et al. 2020: x_s ~ q(x_s | x_t, x0_hat) for s < t; s = t - 1 is the usual step, a
    larger jump the respaced step (betas recomputed from alpha_bar on the subsequence).
    variance "small" is the posterior variance beta~, "large" is beta. No noise into s = -1."""
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    ab_t, ab_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    beta = 1.0 - ab_t / ab_s  # beta of the (possibly respaced) step t -> s
    w_x0 = ab_s.sqrt() * beta / (1.0 - ab_t)
    w_x = (1.0 - beta).sqrt() * (1.0 - ab_s) / (1.0 - ab_t)
    var = beta * (1.0 - ab_s) / (1.0 - ab_t) if variance == "small" else beta
    std = torch.where(s >= 0, var.clamp(min=0).sqrt(), torch.zeros_like(var))
    return StepWeights(x=w_x, x0=w_x0, eps=torch.zeros_like(w_x), noise=std)


def ddpm_log_variance_bounds(
    schedule: DDPMSchedule, t: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min_log, max_log) per frame for a learned variance, log beta~ and log beta of the step
    t -> s; the model's log-variance is frac * max_log + (1 - frac) * min_log."""
    ab_t, ab_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    beta = 1.0 - ab_t / ab_s
    max_log = torch.log(beta)
    # into s = -1 beta~ is 0 and no noise is added; any finite value keeps the arithmetic clean
    min_log = torch.where(s >= 0, torch.log(beta * (1.0 - ab_s) / (1.0 - ab_t)), max_log)
    return min_log, max_log


def ddim_step(schedule: DDPMSchedule, t: torch.Tensor, s: torch.Tensor, eta: float = 0.0) -> StepWeights:
    """Song et al. 2021, eq. 12: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat
    + sigma z, sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)."""
    ab_t, ab_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
    sigma = eta * ((1.0 - ab_s) / (1.0 - ab_t)).sqrt() * (1.0 - ab_t / ab_s).clamp(min=0).sqrt()
    return StepWeights(
        x=torch.zeros_like(ab_t),
        x0=ab_s.sqrt(),
        eps=(1.0 - ab_s - sigma**2).clamp(min=0).sqrt(),
        noise=sigma,
    )


def euler_step(t: torch.Tensor, s: torch.Tensor) -> StepWeights:
    """Euler step of the flow ODE dx/dt = eps - x0: x_s = x_t + (s - t) (eps_hat - x0_hat)."""
    dt = (s - t).to(torch.float64)
    return StepWeights(x=torch.ones_like(dt), x0=-dt, eps=dt, noise=torch.zeros_like(dt))


def fold_weights(w: StepWeights, P: torch.Tensor) -> torch.Tensor:
    """(B, F, 3) coefficients of (x_t, prediction, noise) from step weights and the objective's
    (B, F, 2, 2) prediction map (rows x0, eps; columns x_t, prediction)."""
    c_x = w.x + w.x0 * P[..., 0, 0] + w.eps * P[..., 1, 0]
    c_pred = w.x0 * P[..., 0, 1] + w.eps * P[..., 1, 1]
    return torch.stack([c_x, c_pred, w.noise], dim=-1)


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    S: torch.Tensor,
    *,
    shape: tuple[int, ...] | None = None,
    x_init: torch.Tensor | None = None,
    method: str | None = None,
    objective: str = "eps",
    eta: float = 0.0,
    variance: str = "small",
    noise_scale: float = 1.0,
    learn_sigma: bool = False,
    held: torch.Tensor | None = None,
    x0_held: torch.Tensor | None = None,
    conditioning: str = "hold",
    clip_x0: float | None = None,
    self_condition: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    ops: SimpleNamespace | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run a schedule matrix S from x_init (default: N(0, I) of `shape` from `generator`).

    model_fn(x (B, F, C, H, W), t (B, F) float model times) -> prediction (B, F, C', H, W),
    C' = 2C when learn_sigma (prediction, variance values: only method "ddpm" uses them).
    method: "ddpm" | "ddim" (DDPM schedule, default "ddim") or "euler" (flow, the default
    there). held / x0_held: the given frames and their clean values, entering as `conditioning`
    says (CONDITIONING; with "replace" their columns of S must follow the ladder like the
    others). They are exactly x0_held in the result. clip_x0: clamp each step's x0 estimate
    to [-clip_x0, clip_x0] (pixel-space data in [-1, 1]: 1.0, as guided-diffusion's
    clip_denoised; None, the reference's FVD setting, leaves it). self_condition: the model
    takes model_fn(x, t, x_self), x_self the previous step's x0 estimate (zeros at first; the
    clean values for held frames). noise_scale: multiplies the fresh noise of every ddpm (or
    ddim eta > 0) step, not the starting noise: the sampling temperature (1: the exact
    posterior; < 1 trades diversity for cleaner samples from an undertrained model). ops: the
    model's operator set (`model.ops`); None: fvdm.ops.get_backend("auto"). Returns
    x (B, F, C, H, W)."""
    check_objective(objective)
    if not (math.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive bound or None, got {clip_x0!r}")
    if conditioning not in CONDITIONING:
        raise ValueError(f"unknown conditioning {conditioning!r}; choose one of {CONDITIONING}")
    replace = conditioning == "replace"
    ops = ops if ops is not None else get_backend("auto")
    method = method or ("euler" if isinstance(schedule, FlowSchedule) else "ddim")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if (method == "euler") != isinstance(schedule, FlowSchedule):
        raise ValueError(f"method {method!r} does not fit a {type(schedule).__name__}: "
                         "use ddpm / ddim with a DDPM schedule and euler with a flow schedule")

    if x_init is None:
        if shape is None:
            raise ValueError("give x_init or shape")
        device = torch.device(device) if device is not None else (x0_held.device if x0_held is not None else "cpu")
        x_init = randn_like_shape(shape, generator, device, dtype)
    x = x_init
    if x.dim() != 5:
        raise ValueError(f"x_init / shape must be (B, F, C, H, W), got {tuple(x.shape)}")
    B, Fr, C = x.shape[:3]
    S = _check_matrix(S, schedule, B, Fr).to(x.device)
    steps = S.shape[0] - 1

    hold = torch.zeros(B, Fr, dtype=torch.bool, device=x.device)
    if held is not None:
        hold = held_mask(held, B, Fr).to(x.device)
    if bool(hold.any()):
        if x0_held is None or x0_held.shape != x.shape:
            raise ValueError(f"x0_held must be given with shape {tuple(x.shape)} when frames are held, "
                             f"got {None if x0_held is None else tuple(x0_held.shape)}")
        x0_held = x0_held.to(device=x.device, dtype=x.dtype)
        x = torch.where(per_frame(hold, x), x0_held, x)
    clean = torch.full((B, Fr), schedule.clean_time, dtype=S.dtype, device=x.device)

    any_held = bool(hold.any())
    x_self = None
    if self_condition:
        x_self = torch.where(per_frame(hold, x), x0_held, torch.zeros_like(x)) if any_held else torch.zeros_like(x)
    for i in range(steps):
        if replace:
            t, s = S[i], S[i + 1]
            if any_held:
                noised = schedule.q_sample(x0_held, randn_like_shape(x.shape, generator, x.device, x.dtype), t, ops)
                x = torch.where(per_frame(hold & (t != clean), x), noised, x)
        else:
            t = torch.where(hold, clean, S[i])
            s = torch.where(hold, clean, S[i + 1])
        moving = t != s
        if bool(moving.any()):
            x, x_self = _step(model_fn, schedule, method, objective, eta, variance, learn_sigma, ops,
                              x, t, s, moving, generator, clip_x0, x_self, noise_scale)
            if any_held and not replace:  # bit-exact whatever the arithmetic did
                x = torch.where(per_frame(hold, x), x0_held, x)
        if callback is not None:
            callback(i, steps, x)
    if any_held and replace:
        x = torch.where(per_frame(hold, x), x0_held, x)
    return x


def _step(model_fn, schedule, method, objective, eta, variance, learn_sigma, ops, x, t, s, moving, generator,
          clip_x0=None, x_self=None, noise_scale=1.0):
    """One step of the loop for frames at times t (B, F) going to s; frames not moving keep x.
    Returns (x at s, the x0 estimate for self-conditioning or None)."""
    B, Fr, C = x.shape[:3]
    out = model_fn(x, schedule.model_time(t)) if x_self is None else model_fn(x, schedule.model_time(t), x_self)
    expected = 2 * C if learn_sigma else C
    if out.shape[:3] != (B, Fr, expected) or out.shape[3:] != x.shape[3:]:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected {(B, Fr, expected, *x.shape[3:])}")
    pred = out[:, :, :C].to(x.dtype)

    # Frames that stay put get a harmless time so no coefficient divides by zero, then (1, 0, 0).
    ddpm = isinstance(schedule, DDPMSchedule)
    safe_t = torch.where(moving, t, torch.full_like(t, 0 if ddpm else 0.5))
    safe_s = torch.where(moving, s, torch.full_like(s, -1 if ddpm else 0.0))
    if method == "ddpm":
        w = ddpm_step(schedule, safe_t, safe_s, variance)
    elif method == "ddim":
        w = ddim_step(schedule, safe_t, safe_s, eta)
    else:
        w = euler_step(safe_t, safe_s)
    a, sig = schedule.alpha_sigma(safe_t)
    P = prediction_coeffs(objective, a, sig)
    if clip_x0 is not None or x_self is not None:
        x0_hat = x0_estimate(x, pred, P, ops)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
            pred = _prediction_for(x0_hat, x, pred, P, moving, ops)
        if x_self is not None:  # frames that stay put keep their earlier estimate
            x_self = torch.where(per_frame(moving, x), x0_hat, x_self)
    coeffs = fold_weights(w, P)
    coeffs[..., 2] *= noise_scale
    keep = torch.tensor([1.0, 0.0, 0.0], dtype=coeffs.dtype, device=coeffs.device)
    coeffs = torch.where(moving[..., None], coeffs, keep)
    if not bool(torch.isfinite(coeffs).all()):
        raise ValueError(f"objective {objective!r} cannot be turned into a {method} step at some frame's time "
                         "(e.g. an eps prediction at flow time 1 gives no x0); use another objective or schedule")

    noisy = moving & (coeffs[..., 2] > 0)
    if not bool(noisy.any()):
        return ops.frame_combine([x, pred], coeffs[..., :2].contiguous()), x_self
    z = randn_like_shape(x.shape, generator, x.device, x.dtype)
    if method == "ddpm" and learn_sigma:
        # per-element std from the variance channels: scale z here, weight it 1 where noisy
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        frac = (out[:, :, C:].to(ct) + 1) / 2
        min_log, max_log = ddpm_log_variance_bounds(schedule, safe_t, safe_s)
        logvar = frac * per_frame(max_log.to(ct), frac) + (1 - frac) * per_frame(min_log.to(ct), frac)
        z = (torch.exp(0.5 * logvar) * z).to(x.dtype)
        coeffs = torch.cat([coeffs[..., :2], noise_scale * noisy[..., None].to(coeffs.dtype)], dim=-1)
    return ops.frame_combine([x, pred, z], coeffs), x_self


def _prediction_for(x0, x, pred, P, moving, ops):
    """The prediction whose x0 estimate is x0 (the clamped one). Every objective's (x0, eps)
    estimates satisfy x_t = a x0 + s eps, so the replaced prediction moves eps with x0 and the
    step stays one folded linear combination. Frames not moving keep their prediction."""
    p0, p1 = P[..., 0, 0], P[..., 0, 1]  # x0 = p0 x + p1 pred, p1 != 0 for a frame that moves
    safe_p1 = torch.where(moving, p1, torch.ones_like(p1))
    clipped = ops.frame_combine([x0, x], torch.stack([1.0 / safe_p1, -p0 / safe_p1], dim=-1))
    return torch.where(per_frame(moving, x), clipped, pred)


# ----------------------------------------------------------------------------- checks


def _check_matrix(S: torch.Tensor, schedule: Schedule, B: int, Fr: int) -> torch.Tensor:
    """S as (steps + 1, B, F), validated: times valid for the schedule, columns non-increasing."""
    if S.dim() == 2 and S.shape[1] == Fr:
        S = S[:, None, :].expand(S.shape[0], B, Fr)
    elif not (S.dim() == 3 and S.shape[1:] == (B, Fr)):
        raise ValueError(f"schedule matrix S must have shape (steps + 1, {Fr}) or (steps + 1, {B}, {Fr}), "
                         f"got {tuple(S.shape)}")
    if S.shape[0] < 2:
        raise ValueError(f"schedule matrix S needs at least 2 rows (one step), got {S.shape[0]}")
    schedule.check_times(S, "S")
    check_on_device(S[1:] <= S[:-1], lambda: "schedule matrix S must be non-increasing down every column "
                    "(noisy -> clean)")
    if isinstance(schedule, FlowSchedule):
        S = S.to(torch.float64)
    return S
