"""Which DDPM timesteps a sampler of n steps visits: the ladders of the three spacings.

A ladder is (n + 1,) int64, high to low, ending in -1 (clean). Spacings (sample.spacing):

- "floor": t_i = floor(i T / n), i = 0..n-1. fvdm's default; 50 of 1000 gives 980, 960, ...,
  20, 0. Equal to the official "ddimN" respacing whenever n divides T.
- "official": the official code's `create_diffusion(str(n))`, what its sample scripts run
  (guided-diffusion's `space_timesteps(T, "n")`): n steps spread over [0, T - 1] with both ends
  kept, t_k = round(k (T - 1) / (n - 1)) with Python's round (half to even), 50 of 1000 gives
  999, 979, ..., 41, 20, 0.
- "official-ddim": the official "ddimN" string: the smallest integer stride k with exactly n
  multiples of k below T, t_i = i k; refused when no stride gives exactly n.

space_timesteps also takes the official comma form ("10,15,20": that many steps in each of
equal sections of [0, T)), so any respacing string of an official config can be reproduced.
A respaced step t -> s uses alpha_bar(t) and alpha_bar(s) directly, which is what the official
SpacedDiffusion's recomputed betas amount to, so only the set of timesteps matters.
"""

from __future__ import annotations

import torch

SPACINGS = ("floor", "official", "official-ddim")


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The sorted timesteps an official respacing string keeps: "N" (N steps spread evenly
    over [0, T - 1], both ends kept), "a,b,c" (that many in each of equal sections of [0, T),
    the first T mod sections sections one step longer) or "ddimN" (integer stride)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        count = _positive_int(spec[4:], spec)
        for stride in range(1, num_timesteps):  # as the official loop: a stride of T is never tried
            kept = range(0, num_timesteps, stride)
            if len(kept) == count:
                return list(kept)
        raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {count} of {num_timesteps} timesteps")
    counts = [_positive_int(part, spec) for part in spec.split(",")]
    if len(counts) > num_timesteps:
        raise ValueError(f"respacing {spec!r}: more sections ({len(counts)}) than timesteps ({num_timesteps})")
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"respacing {spec!r}: a section of {size} timesteps cannot hold {count} steps")
        # The official loop adds the float stride count - 1 times and rounds each partial sum;
        # done the same way here so that even a tie rounds as it does there.
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def spaced_ladder(steps: int, num_timesteps: int = 1000, spacing: str = "floor") -> torch.Tensor:
    """(steps + 1,) int64 ladder, high to low then -1 (clean), for one of SPACINGS."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    if spacing == "floor":
        kept = (torch.arange(steps, dtype=torch.int64) * num_timesteps // steps).tolist()
    else:
        kept = space_timesteps(num_timesteps, f"ddim{steps}" if spacing == "official-ddim" else str(steps))
    return torch.tensor(sorted(kept, reverse=True) + [-1], dtype=torch.int64)


def _positive_int(text: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"respacing {spec!r}: {text!r} is not a step count") from None
    if value < 1:
        raise ValueError(f"respacing {spec!r}: step counts must be >= 1, got {value}")
    return value
