"""MovingSprites: the built-in synthetic videos (default training data and the CPU demo).

Each video shows 1-2 coloured shapes (square, circle, triangle) on a black background, each
moving at constant velocity and bouncing elastically off the walls. Everything is a pure
function of (seed, index), and the motion is known exactly (`trajectory`), so a model's
samples can be checked against physics, and a clip can be continued for any length (`clip`).

Units: physics runs in frame-relative units (the frame is [0, 1] x [0, 1]) and is scaled to
pixels at the end, so the same (seed, index) shows the same video at any `size`. `speed` is
given in pixels per frame *at size 32* and scales with `size` (0.5-1.5 px/frame at 32 is
1-3 px/frame at 64). `sprite_size` is a fraction of the frame side.

Pixel convention: pixel (row r, column c) covers [c, c+1) x [r, r+1); positions are (x, y) =
(column, row) in pixels, so the centre of pixel (0, 0) is (0.5, 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fvdm.errors import UserError

SHAPES = ("square", "circle", "triangle")
# Saturated, mutually distinct RGB colours in [0, 1]; a video's sprites get different ones.
PALETTE = np.array(
    [
        [1.0, 0.0, 0.0],  # red
        [0.0, 1.0, 0.0],  # green
        [0.0, 0.4, 1.0],  # blue (a little green so it stays visible in greyscale)
        [1.0, 1.0, 0.0],  # yellow
        [1.0, 0.0, 1.0],  # magenta
        [0.0, 1.0, 1.0],  # cyan
    ],
    dtype=np.float32,
)
SPEED_REFERENCE_SIZE = 32  # `speed` is in pixels per frame at this frame size
_STREAM_TAG = 0x5B17E5  # separates this dataset's random streams from other users of (seed, i)


@dataclass(frozen=True)
class Trajectory:
    """Ground truth of one video: S sprites over F frames, in pixels (see module docstring).

    shapes: S names from SHAPES, in draw order (later sprites are drawn on top).
    colours: (S, 3) float32 RGB in [0, 1].
    sizes: (S,) float32 side (square, triangle's bounding box) or diameter (circle), pixels.
    positions: (F, S, 2) float32 centre (x, y) of each sprite's bounding box at each frame.
    velocities: (F, S, 2) float32 velocity (pixels/frame) at each frame; a component flips
        sign at a bounce, so positions[f+1] - positions[f] == velocities[f] between bounces.
    frame_size: H = W in pixels.  channels: 1 (greyscale) or 3 (RGB).
    """

    shapes: tuple[str, ...]
    colours: torch.Tensor
    sizes: torch.Tensor
    positions: torch.Tensor
    velocities: torch.Tensor
    frame_size: int
    channels: int

    @property
    def num_frames(self) -> int:
        return self.positions.shape[0]


def _fold(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unfolded coordinate p (straight-line motion) -> (position, direction sign) after elastic
    bounces between lo and hi: a triangle wave of period 2 (hi - lo). Any shape (broadcast)."""
    span = hi - lo
    u = np.mod(p - lo, 2.0 * span)
    forward = u < span
    return lo + np.where(forward, u, 2.0 * span - u), np.where(forward, 1.0, -1.0)


SUBROWS = 4  # vertical samples per pixel row; horizontal coverage is computed exactly


def _half_width(shape: str, y: np.ndarray, half: float) -> np.ndarray:
    """Half the shape's horizontal extent at height y (offset from its centre, |y| <= half).
    The triangle is isosceles, apex up (y points down), filling its square bounding box."""
    if shape == "square":
        return np.full_like(y, half)
    if shape == "circle":
        return np.sqrt(np.maximum(half * half - y * y, 0.0))
    if shape == "triangle":
        return (y + half) / 2.0
    raise ValueError(f"unknown sprite shape {shape!r}; expected one of {', '.join(SHAPES)}")


def coverage(shape: str, x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    """Area of each unit pixel covered by the shape: x (F, 1, W) and y (F, H, 1) are pixel-centre
    offsets from the shape's centre (float32); returns (F, H, W) in [0, 1].

    Each pixel row is cut into SUBROWS strips; a strip is clipped exactly to the shape's
    vertical extent and its horizontal overlap with the pixel is exact at the strip's middle.
    So squares are exact, and sub-pixel moves change coverage smoothly for every shape (the
    centre of mass follows the true position to a few hundredths of a pixel)."""
    offsets = ((np.arange(SUBROWS) + 0.5) / SUBROWS - 0.5).astype(np.float32)
    rows = y[..., None] + offsets  # (F, H, 1, K) strip centres
    top = np.clip(rows - 0.5 / SUBROWS, -half, half)
    bottom = np.clip(rows + 0.5 / SUBROWS, -half, half)
    hw = _half_width(shape, (top + bottom) / 2.0, half)[..., None]  # (F, H, 1, K, 1)
    xs = x[:, :, None, None, :]  # (F, 1, 1, 1, W)
    overlap = np.clip(np.minimum(xs + 0.5, hw) - np.maximum(xs - 0.5, -hw), 0.0, 1.0)  # (F, H, 1, K, W)
    return np.einsum("fhok,fhokw->fhw", bottom - top, overlap)


def render(trajectory: Trajectory) -> torch.Tensor:
    """Draw a trajectory: float32 (F, C, H, W) in [-1, 1], background -1.

    Anti-aliased: each pixel gets the sprite's coverage of it (sub-pixel positions move the
    edges smoothly), sprites are composited over each other in order. Greyscale (C=1) is the
    mean of the RGB channels, as the library converts RGB inputs for single-channel models."""
    t = trajectory
    Fr, n = t.num_frames, t.frame_size
    pos = t.positions.numpy()
    image = np.zeros((Fr, n, n, 3), dtype=np.float32)  # (F, H, W, 3) in [0, 1] while compositing
    frame = np.arange(Fr)[:, None, None]
    for s, shape in enumerate(t.shapes):  # few sprites; each is vectorised over frames
        half = float(t.sizes[s]) / 2.0
        # Only a window around the sprite can be covered: cost follows sprite area, not frame area.
        win = min(n, math.ceil(2.0 * half) + 2)
        corner = np.clip(np.floor(pos[:, s] - half).astype(np.int64), 0, n - win)  # (F, 2) first column, row
        cols = corner[:, 0, None] + np.arange(win)  # (F, win)
        rows = corner[:, 1, None] + np.arange(win)
        x = (cols + 0.5 - pos[:, s, 0, None]).astype(np.float32)[:, None, :]  # (F, 1, win) offsets
        y = (rows + 0.5 - pos[:, s, 1, None]).astype(np.float32)[:, :, None]  # (F, win, 1)
        alpha = coverage(shape, x, y, half)[..., None]  # (F, win, win, 1)
        index = (frame, rows[:, :, None], cols[:, None, :])
        patch = image[index]  # (F, win, win, 3)
        image[index] = patch + alpha * (t.colours[s].numpy() - patch)  # "over" compositing
    if t.channels == 1:
        image = image @ np.full((3, 1), 1.0 / 3.0, dtype=np.float32)  # channel mean (matmul: faster)
    # numpy, not torch, for the arithmetic: tiny arrays are dominated by per-op overhead.
    return torch.from_numpy(np.ascontiguousarray((image * 2.0 - 1.0).transpose(0, 3, 1, 2)))


def _pair(name: str, value: Sequence[float], lo: float, hi: float | None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"MovingSprites: {name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (lo <= a <= b and (hi is None or b <= hi)):
        bounds = f"{lo} <= min <= max" + (f" <= {hi}" if hi is not None else "")
        raise UserError(f"MovingSprites: {name}={value!r} must satisfy {bounds}")
    return a, b


class MovingSprites(Dataset):
    """Synthetic bouncing-sprite videos; item i is float32 (num_frames, channels, size, size)
    in [-1, 1], a pure function of (seed, i).

    num_videos: len. size: H = W in pixels. channels: 3 (RGB) or 1 (grey: channel mean).
    min_sprites..max_sprites sprites per video, each with its own palette colour. sprite_size:
    (min, max) side or diameter as a fraction of size (max <= 0.9). speed: (min, max) pixels
    per frame at size 32, scaled with size. shapes: a subset of SHAPES."""

    def __init__(
        self,
        *,
        num_videos: int = 10000,
        num_frames: int = 16,
        size: int = 32,
        channels: int = 3,
        min_sprites: int = 1,
        max_sprites: int = 2,
        sprite_size: Sequence[float] = (0.2, 0.3),
        speed: Sequence[float] = (0.5, 1.5),
        shapes: Sequence[str] = SHAPES,
        seed: int = 0,
    ) -> None:
        for name, value, least in (("num_videos", num_videos, 1), ("num_frames", num_frames, 1), ("size", size, 4),
                                   ("min_sprites", min_sprites, 1), ("max_sprites", max_sprites, min_sprites)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"MovingSprites: {name} must be an integer >= {least}, got {value!r}")
        if channels not in (1, 3):
            raise UserError(f"MovingSprites: channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
        if isinstance(shapes, str):
            shapes = (shapes,)
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown or not shapes:
            raise UserError(f"MovingSprites: shapes {list(shapes)!r} must be a non-empty list from {', '.join(SHAPES)}")
        if not isinstance(seed, int):
            raise UserError(f"MovingSprites: seed must be an integer, got {seed!r}")
        self.num_videos, self.num_frames, self.size, self.channels = num_videos, num_frames, size, channels
        self.min_sprites, self.max_sprites = min_sprites, max_sprites
        self.sprite_size = _pair("sprite_size", sprite_size, 1e-3, 0.9)  # room to move
        self.speed = _pair("speed", speed, 0.0, None)
        self.shapes = tuple(shapes)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.clip(i, self.num_frames)

    def clip(self, i: int, num_frames: int) -> torch.Tensor:
        """Video i rendered for num_frames frames, (num_frames, C, H, W): the same sprites and
        physics continued, so clip(i, n)[:self.num_frames] == self[i] for n >= num_frames."""
        return render(self.trajectory(i, num_frames))

    def describe(self) -> dict:
        """Every parameter that determines the items (LatentCache fingerprints this)."""
        keys = ("num_videos", "num_frames", "size", "channels", "min_sprites", "max_sprites",
                "sprite_size", "speed", "shapes", "seed")
        return {"kind": "sprites", **{k: getattr(self, k) for k in keys}}

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.num_videos
        if not 0 <= i < self.num_videos:
            raise IndexError(f"MovingSprites index {i} out of range for {self.num_videos} videos")
        return i

    def trajectory(self, i: int, num_frames: int | None = None) -> Trajectory:
        """Ground truth of video i for num_frames frames (default: the dataset's)."""
        i = self._index(i)
        num_frames = self.num_frames if num_frames is None else int(num_frames)
        if num_frames < 1:
            raise UserError(f"MovingSprites: num_frames must be >= 1, got {num_frames}")
        # SeedSequence mixes the words into independent streams; 2**64 wraps negative seeds.
        rng = np.random.default_rng([self.seed % 2**64, i, _STREAM_TAG])
        S = int(rng.integers(self.min_sprites, self.max_sprites + 1))
        shapes = tuple(self.shapes[k] for k in rng.integers(0, len(self.shapes), S))
        colours = PALETTE[rng.choice(len(PALETTE), S, replace=S > len(PALETTE))]
        side = rng.uniform(*self.sprite_size, S)  # frame-relative
        half = side[:, None] / 2.0  # (S, 1): centres stay in [half, 1 - half] on both axes
        start = rng.uniform(half, 1.0 - half, (S, 2))
        angle = rng.uniform(0.0, 2.0 * math.pi, S)
        speed = rng.uniform(*self.speed, S) / SPEED_REFERENCE_SIZE
        velocity = speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (S, 2)

        t = np.arange(num_frames, dtype=np.float64)[:, None, None]  # (F, 1, 1)
        pos, sign = _fold(start + t * velocity, half, 1.0 - half)  # (F, S, 2) each
        scale = float(self.size)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        return Trajectory(
            shapes=shapes, colours=as_t(colours), sizes=as_t(side * scale),
            positions=as_t(pos * scale), velocities=as_t(sign * velocity * scale),
            frame_size=self.size, channels=self.channels,
        )
