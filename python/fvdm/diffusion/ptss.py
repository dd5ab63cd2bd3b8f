"""PTSS, probabilistic timestep sampling (FVDM's training-time sampler of t (B, F)).

With probability p a clip gets independent per-frame timesteps, otherwise one timestep
repeated over its frames. mode="batch" flips one coin for the whole batch (what the official
code does, p = 0.2 hard-coded there); mode="sample" flips one coin per clip. p = 0 is the
ordinary scalar-timestep model, the ablation baseline.

Every call draws the same random numbers whatever the coins say (coins, then independent
times, then shared times), so a seeded generator gives a reproducible stream.
"""

from __future__ import annotations

import torch

PTSS_MODES = ("batch", "sample")


def ptss_coins(batch: int, p: float, mode: str = "batch", generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool on the generator's device: which clips get independent per-frame times."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if mode not in PTSS_MODES:
        raise ValueError(f"unknown PTSS mode {mode!r}; choose one of {PTSS_MODES}")
    device = generator.device if generator is not None else None
    u = torch.rand(1 if mode == "batch" else batch, generator=generator, device=device, dtype=torch.float64)
    return (u < p).expand(batch)


def sample_timesteps(
    batch: int,
    frames: int,
    p: float = 0.2,
    *,
    num_timesteps: int | None = 1000,
    mode: str = "batch",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise_bias: float = 1.0,
) -> torch.Tensor:
    """Training timesteps t (B, F) by PTSS.

    num_timesteps=T: integer DDPM timesteps uniform in [0, T-1] (int64). num_timesteps=None:
    flow times uniform in [0, 1) (float32). Drawn on the generator's device, returned on
    device (default: the generator's device, else CPU).

    noise_bias > 1 skews the times toward high noise: u ~ U[0, 1) becomes 1 - (1 - u)^bias
    before scaling (bias 2 puts 45% of draws in the noisiest fifth instead of 20%), which is
    where a short run must learn to lay out a whole frame. 1 is uniform (the paper)."""
    if batch < 1 or frames < 1:
        raise ValueError(f"batch and frames must be >= 1, got batch={batch}, frames={frames}")
    gen_device = generator.device if generator is not None else None
    vectorized = ptss_coins(batch, p, mode, generator)

    if noise_bias <= 0:
        raise ValueError(f"noise_bias must be > 0, got {noise_bias}")

    def draw(shape: tuple[int, int]) -> torch.Tensor:
        if num_timesteps is None:
            u = torch.rand(shape, generator=generator, device=gen_device)
            return u if noise_bias == 1.0 else 1.0 - (1.0 - u) ** noise_bias
        if noise_bias == 1.0:
            return torch.randint(0, num_timesteps, shape, generator=generator, device=gen_device)
        u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
        return ((1.0 - (1.0 - u) ** noise_bias) * num_timesteps).long().clamp(max=num_timesteps - 1)

    independent = draw((batch, frames))
    shared = draw((batch, 1)).expand(batch, frames)
    t = torch.where(vectorized[:, None], independent, shared)
    return t.to(device) if device is not None else t


def clean_prefix_mask(batch: int, frames: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, F) bool, True on held frames: with probability p a clip holds its first k frames
    clean, k uniform in [1, F-1] (at least one frame stays noised), as extension and
    image-to-video condition on clean frames at sampling time. Draws the same numbers whatever
    p is (coins, then lengths)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"clean prefix probability must lie in [0, 1), got {p}")
    device = generator.device if generator is not None else None
    coin = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) < p
    if frames < 2:
        return torch.zeros(batch, frames, dtype=torch.bool, device=device)
    k = torch.randint(1, frames, (batch,), generator=generator, device=device)
    return coin[:, None] & (torch.arange(frames, device=device)[None, :] < k[:, None])
