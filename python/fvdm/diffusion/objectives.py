"""What the network predicts, as per-frame linear maps.

On a path x_t = a x0 + s eps (a, s per frame, from the schedule), every objective is linear in
(x0, eps), and every prediction converts back to (x0, eps) linearly in (x_t, prediction):

    eps : eps                      x0 = (x_t - s m) / a,           eps = m
    x0  : x0                       x0 = m,                         eps = (x_t - a m) / s
    v   : a eps - s x0             x0 = (a x_t - s m) / (a^2+s^2), eps = (s x_t + a m) / (a^2+s^2)
    flow: eps - x0 (velocity)      x0 = (x_t - s m) / (a + s),     eps = x0 + m

(v is Salimans & Ho 2022; for DDPM a^2 + s^2 = 1. flow is d x_t / dt when a = 1 - t, s = t.)
The functions return float64 coefficient tensors; ops.frame_combine applies them in one pass.
"""

from __future__ import annotations

import torch

OBJECTIVES = ("eps", "v", "x0", "flow")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def target_coeffs(objective: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(..., 2): the training target as c0 * x0 + c1 * eps."""
    check_objective(objective)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if objective == "eps":
        return torch.stack([zero, one], -1)
    if objective == "x0":
        return torch.stack([one, zero], -1)
    if objective == "v":
        return torch.stack([-s, a], -1)
    return torch.stack([-one, one], -1)  # flow velocity


def prediction_coeffs(objective: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(..., 2, 2): row 0 gives x0, row 1 gives eps, each as c0 * x_t + c1 * prediction."""
    check_objective(objective)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if objective == "eps":
        rows = [[1 / a, -s / a], [zero, one]]
    elif objective == "x0":
        rows = [[zero, one], [1 / s, -a / s]]
    elif objective == "v":
        n = a * a + s * s
        rows = [[a / n, -s / n], [s / n, a / n]]
    else:  # flow velocity: eps = x0 + m
        n = a + s
        rows = [[1 / n, -s / n], [1 / n, 1 - s / n]]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def min_snr_weights(objective: str, a: torch.Tensor, s: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-frame loss weights of Min-SNR-gamma (Hang et al. 2023): every objective's error is
    the x0 error over P01^2 (P01, the prediction's coefficient in x0_hat), so weighting it by
    min(SNR, gamma) * P01^2 gives each frame the x0 weight min(SNR, gamma), SNR = a^2 / s^2:
    the many easy low-noise frames stop dominating the gradient. float64, shape of a."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    a, s = a.to(torch.float64), s.to(torch.float64)
    snr = (a * a) / (s * s)  # inf at s = 0: clamped to gamma below
    p01 = prediction_coeffs(objective, a, s)[..., 0, 1]
    return snr.clamp(max=gamma) * p01 * p01


def training_target(
    objective: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor, ops
) -> torch.Tensor:
    """The regression target for x0, eps (B, F, ...) and per-frame a, s (B, F)."""
    return ops.frame_combine([x0, eps], target_coeffs(objective, a, s))


def predict_x0_eps(
    objective: str, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, s: torch.Tensor, ops
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network's prediction on x_t (B, F, ...)."""
    P = prediction_coeffs(objective, a, s)
    return x0_estimate(x_t, pred, P, ops), ops.frame_combine([x_t, pred], P[..., 1, :].contiguous())


def x0_estimate(x_t: torch.Tensor, pred: torch.Tensor, P: torch.Tensor, ops) -> torch.Tensor:
    """x0_hat from the prediction, given the objective's (B, F, 2, 2) map P (prediction_coeffs)."""
    return ops.frame_combine([x_t, pred], P[..., 0, :].contiguous())
