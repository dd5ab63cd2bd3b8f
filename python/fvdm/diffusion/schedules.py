"""Noise schedules as data.

Both kinds describe a Gaussian path x_t = alpha(t) * x0 + sigma(t) * eps, evaluated per frame
for t of shape (B, F):

- DDPMSchedule: discrete t in {0, ..., T-1} with float64 tables (alphas_cumprod, their square
  roots, posterior coefficients); alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). The
  time -1 means "clean" (alpha_bar = 1): the last row of a DDPM/DDIM schedule matrix, and the
  time of a finished frame. The model never sees -1; it is given t = 0 for clean frames.
- FlowSchedule: rectified flow, continuous t in [0, 1], alpha = 1 - t, sigma = t; the model
  is given t * time_scale so the same sinusoidal embedding (periods up to 10000) serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from fvdm.diffusion._common import check_on_device

DDPM_BETA_SCHEDULES = ("linear", "cosine")
SCHEDULES = (*DDPM_BETA_SCHEDULES, "flow")  # make_schedule's kinds


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas evenly spaced from beta_start to beta_end, float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2)^2, betas clipped
    at max_beta so the last steps do not become singular."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class DDPMSchedule:
    """Float64 tables of a discrete DDPM schedule, indexed by timestep (T,)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta~_t of q(x_{t-1} | x_t, x0)
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t, entry 0 (which is 0) replaced by entry 1
    posterior_mean_coef1: torch.Tensor  # weight of x0 in the posterior mean
    posterior_mean_coef2: torch.Tensor  # weight of x_t in the posterior mean
    alpha_bar_from_clean: torch.Tensor  # (T + 1,): [1, alphas_cumprod], row t + 1 for t in [-1, T-1]

    clean_time = -1  # class constants, not tables
    kind = "ddpm"

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> DDPMSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D table with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            alpha_bar_from_clean=torch.cat([ac.new_ones(1), ac]),
        )

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> DDPMSchedule:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def check_times(self, t: torch.Tensor, name: str = "t", clean: bool = True) -> None:
        """ValueError unless t holds integer timesteps in [-1, T-1] ([0, T-1] when clean=False:
        training times), checked on t's device without a host read (check_on_device)."""
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer DDPM timesteps, got dtype {t.dtype}")
        lo, hi = (-1 if clean else 0), self.num_timesteps - 1
        check_on_device((t >= lo) & (t <= hi), lambda: (
            f"{name} must lie in [{lo}, {hi}]{' (-1 = clean)' if clean else ' (-1, clean, is a sampling time only)'}"
            + (f", got [{int(t.min())}, {int(t.max())}]" if t.device.type == "cpu" else "")))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer times t (any shape), with alpha_bar(-1) = 1; float64."""
        return self.alpha_bar_from_clean.to(t.device)[t.long() + 1]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) of x_t = alpha x0 + sigma eps at integer times t; float64."""
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1.0 - ab).sqrt()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given: the timestep as float32, clean (-1) shown as 0."""
        return t.clamp(min=0).float()

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ops) -> torch.Tensor:
        """x_t for per-frame t (B, F) in [0, T-1], one fused pass (ops.noise_inject)."""
        return ops.noise_inject(
            x0, noise, t.to(x0.device), self.sqrt_alphas_cumprod.to(x0.device),
            self.sqrt_one_minus_alphas_cumprod.to(x0.device),
        )


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: x_t = (1 - t) x0 + t eps, t in [0, 1] (1 = noise); velocity eps - x0."""

    time_scale: float = 1000.0  # the network sees t * time_scale

    clean_time = 0.0
    kind = "flow"

    def to(self, device: torch.device | str) -> FlowSchedule:
        return self

    def check_times(self, t: torch.Tensor, name: str = "t", clean: bool = True) -> None:
        """ValueError unless t holds float times in [0, 1] (clean: unused, every flow time may
        be trained on), checked on t's device without a host read (check_on_device)."""
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must hold float flow times in [0, 1], got dtype {t.dtype}")
        check_on_device((t >= 0.0) & (t <= 1.0), lambda: f"{name} must lie in [0, 1]" + (
            f", got [{float(t.min())}, {float(t.max())}]" if t.device.type == "cpu" else ""))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.to(torch.float64)
        return 1.0 - t, t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float64) * self.time_scale).float()

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ops) -> torch.Tensor:
        a, s = self.alpha_sigma(t.to(x0.device))
        return ops.frame_combine([x0, noise], torch.stack([a, s], dim=-1))


Schedule = DDPMSchedule | FlowSchedule


def ddpm_schedule(kind: str = "linear", num_timesteps: int = 1000, **kwargs) -> DDPMSchedule:
    """DDPMSchedule with "linear" (1e-4 -> 0.02, the FVDM / Latte default) or "cosine" betas."""
    if kind == "linear":
        return DDPMSchedule.from_betas(linear_betas(num_timesteps, **kwargs))
    if kind == "cosine":
        return DDPMSchedule.from_betas(cosine_betas(num_timesteps, **kwargs))
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {DDPM_BETA_SCHEDULES}")


def make_schedule(kind: str = "linear", num_timesteps: int = 1000) -> Schedule:
    """"linear" | "cosine" (DDPM, T = num_timesteps) or "flow" (rectified flow)."""
    if kind == "flow":
        return FlowSchedule()
    return ddpm_schedule(kind, num_timesteps)
