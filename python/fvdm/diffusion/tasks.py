"""Zero-shot tasks as schedule matrices.

A task is (S, held): S of shape (steps + 1, F), per-frame times going from noisy to clean
down each column, and held, a bool (F,) mask of frames given clean (their column of S is the
clean time throughout, which is what the sampler enforces anyway). Everything starts from a
ladder: the ordinary scalar schedule, e.g. DDIM-50 [980, 960, ..., 0, -1] (or the official
scripts' [999, 979, ..., 20, 0, -1], spacing "official") or flow
[1, ..., 0]; with equal columns it is plain scalar sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fvdm.diffusion.samplers import ModelFn, sample
from fvdm.diffusion.schedules import FlowSchedule, Schedule
from fvdm.diffusion.spacing import spaced_ladder

Task = tuple[torch.Tensor, torch.Tensor]  # (S (steps + 1, F), held (F,) bool)


# ----------------------------------------------------------------------------- ladders


def ddpm_ladder(steps: int, num_timesteps: int = 1000) -> torch.Tensor:
    """(steps + 1,) int64: timesteps floor(i * T / steps) from high to low, then -1 (clean):
    the "floor" spacing. steps = 50, T = 1000 gives 980, 960, ..., 20, 0, -1, the official
    code's "ddim50" respacing, but not the ladder its sample scripts run (their "50": 999,
    979, ..., 20, 0; spacing "official", see fvdm.diffusion.spacing). steps = T gives every
    timestep."""
    return spaced_ladder(steps, num_timesteps, "floor")


def flow_ladder(steps: int) -> torch.Tensor:
    """(steps + 1,) float64 flow times evenly from 1 (noise) to 0 (clean)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def ladder_for(schedule: Schedule, steps: int, spacing: str = "floor") -> torch.Tensor:
    """The scalar ladder of `steps` steps: flow times for a flow schedule (spacing does not
    apply), else the DDPM timesteps of `spacing` (fvdm.diffusion.spacing.SPACINGS)."""
    if isinstance(schedule, FlowSchedule):
        return flow_ladder(steps)
    return spaced_ladder(steps, schedule.num_timesteps, spacing)


# ----------------------------------------------------------------------------- tasks


def unconditional(ladder: torch.Tensor, num_frames: int) -> Task:
    """Every frame follows the ladder: scalar sampling."""
    _check_ladder(ladder)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    S = ladder[:, None].expand(-1, num_frames).clone()
    return S, torch.zeros(num_frames, dtype=torch.bool)


def keyframes(ladder: torch.Tensor, num_frames: int, indices: Sequence[int]) -> Task:
    """Frames at `indices` are held clean; the rest follow the ladder (in-filling)."""
    S, held = unconditional(ladder, num_frames)
    idx = sorted({int(i) for i in indices})
    if any(i < 0 or i >= num_frames for i in idx):
        raise ValueError(f"keyframe indices must lie in [0, {num_frames - 1}], got {list(indices)}")
    if len(idx) == num_frames:
        raise ValueError("every frame is held: nothing to generate")
    held[idx] = True
    S[:, held] = ladder[-1]
    return S, held


def task_matrix(ladder: torch.Tensor, num_frames: int, indices: Sequence[int], conditioning: str = "hold") -> Task:
    """The matrix for frames `indices` given: keyframes' for "hold"; for "replace" (a scalar
    model: given frames re-noised each step) every column follows the ladder."""
    if not indices:
        return unconditional(ladder, num_frames)
    S, held = keyframes(ladder, num_frames, indices)
    if conditioning == "replace":
        S = unconditional(ladder, num_frames)[0]
    return S, held


def rolling_diagonal(ladder: torch.Tensor, num_frames: int, lag: int = 1) -> Task:
    """Later frames noisier: frame f starts down the ladder f * lag steps after frame 0, so
    S[i, f] = ladder[clamp(i - f * lag, 0, steps)], with steps + (F - 1) * lag + 1 rows. Every
    frame starts at ladder[0] (pure noise) and ends at ladder[-1] (clean)."""
    _check_ladder(ladder)
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    steps = ladder.numel() - 1
    rows = torch.arange(steps + (num_frames - 1) * lag + 1)[:, None]
    pos = (rows - torch.arange(num_frames)[None, :] * lag).clamp(0, steps)
    return ladder[pos], torch.zeros(num_frames, dtype=torch.bool)


# ----------------------------------------------------------------------------- long video


WindowFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def long_video(
    generate_window: WindowFn,
    total_frames: int,
    window: int,
    overlap: int,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window generation of a clip longer than the model's window.

    generate_window(held (window,) bool, x0_held (B, window, ...) or None) -> (B, window, ...)
    samples one window with the held frames kept (e.g. samplers.sample with the task's S).
    The first window is unconditional, or holds `context` (B, k, ...) as its first k frames
    (k < window); every later window holds the previous output's last `overlap` frames and
    generates window - overlap new ones. Returns (B, total_frames, ...)."""
    if not 0 < overlap < window:
        raise ValueError(f"overlap must lie in [1, window - 1] = [1, {window - 1}], got {overlap}")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if context is not None and not 1 <= context.shape[1] < window:
        raise ValueError(f"context must have 1 to {window - 1} frames, got {context.shape[1]}")

    video = context
    n_hold = 0 if context is None else context.shape[1]
    while video is None or video.shape[1] < total_frames:
        held = torch.zeros(window, dtype=torch.bool)
        held[:n_hold] = True
        x0_held = None
        if n_hold:
            prefix = video[:, -n_hold:]
            x0_held = prefix.new_zeros((prefix.shape[0], window, *prefix.shape[2:]))
            x0_held[:, :n_hold] = prefix
        out = generate_window(held, x0_held)
        new = out[:, n_hold:]
        video = new if video is None else torch.cat([video, new], dim=1)
        n_hold = overlap
    return video[:, :total_frames]


def window_sampler(
    model_fn: ModelFn,
    schedule: Schedule,
    ladder: torch.Tensor,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    conditioning: str = "hold",
    **sample_kwargs,
) -> WindowFn:
    """A generate_window for long_video: samples one window of `shape` (B, window, C, H, W)
    along `ladder` with the given frames held (samplers.sample with keyframes' matrix), or
    replaced (conditioning="replace": every column follows the ladder)."""

    def generate(held: torch.Tensor, x0_held: torch.Tensor | None) -> torch.Tensor:
        S, held = task_matrix(ladder, shape[1], held.nonzero().flatten().tolist(), conditioning)
        return sample(model_fn, schedule, S, shape=shape, held=held, x0_held=x0_held, generator=generator,
                      conditioning=conditioning, **sample_kwargs)

    return generate


def _check_ladder(ladder: torch.Tensor) -> None:
    if ladder.dim() != 1 or ladder.numel() < 2:
        raise ValueError(f"ladder must be 1-D with at least 2 entries, got shape {tuple(ladder.shape)}")
    if bool((ladder[1:] > ladder[:-1]).any()):
        raise ValueError("ladder must be non-increasing (noisy -> clean)")
