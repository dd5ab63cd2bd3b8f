"""Sprite tracking: measurable quality of generated moving-sprites videos.

The sprites are flat saturated colours on black, so a generated frame can be read without a
learned network: pixels whose brightest channel passes a threshold are foreground, connected
components of the foreground are blobs, and each blob has an area, a centroid and a mean colour.
A video is *coherent* when every frame shows the expected number of blobs (no fragments, no
vanishing), the sprite keeps its size and colour, it moves, and its centre follows a smooth path
(constant velocity between bounces: the second difference of the centroid stays small).

Every number is computed per video, so a table can report the fraction of coherent videos and
the mean of each criterion. Videos are (F, C, H, W) or (B, F, C, H, W) in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

FOREGROUND = 0.5  # brightest channel in [0, 1] above this: at least half covered by a sprite
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)  # diagonal pixels join: thin triangle tips stay whole


@dataclass(frozen=True)
class Thresholds:
    """What `coherent` allows, in units of the frame side (so they hold at any size)."""

    min_blob: float = 0.008  # blobs smaller than this fraction of the frame's area are specks
    area_change: float = 0.3  # (max - min) / mean of the sprite's area over the video
    colour_drift: float = 0.2  # largest distance of a frame's mean colour from the video's (RGB, [0, 1])
    jerk: float = 0.1  # largest second difference of the centroid, fraction of the side (a bounce flips one component)
    min_motion: float = 0.04  # the centroid must travel at least this far over the video


@dataclass(frozen=True)
class FrameBlobs:
    count: int  # blobs of at least min_blob area
    specks: int  # smaller components
    area: float  # foreground pixels in blobs (coverage-weighted)
    centroid: tuple[float, float]  # (x, y) of the blobs' union, pixels; nan when empty
    colour: tuple[float, ...]  # mean colour of the blob pixels in [0, 1]; nan when empty


@dataclass(frozen=True)
class VideoScore:
    frames_with_expected_count: float  # fraction of frames showing the expected number of blobs
    area_change: float
    colour_drift: float
    max_jerk: float  # pixels
    motion: float  # pixels between first and last centroid
    coherent: bool


def frame_blobs(frame: np.ndarray, th: Thresholds = Thresholds()) -> FrameBlobs:
    """frame: (C, H, W) float in [-1, 1]."""
    rgb = (np.asarray(frame, dtype=np.float32) + 1.0) / 2.0
    level = rgb.max(axis=0)
    labels, n = ndimage.label(level > FOREGROUND, structure=_EIGHT_NEIGHBOURS)
    H, W = level.shape
    sizes = ndimage.sum_labels(np.ones_like(level), labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
    big = np.flatnonzero(sizes >= th.min_blob * H * W) + 1
    mask = np.isin(labels, big)
    if not mask.any():
        nan = float("nan")
        return FrameBlobs(0, int(n), 0.0, (nan, nan), tuple([nan] * rgb.shape[0]))
    weight = np.where(mask, level, 0.0)
    ys, xs = np.mgrid[0:H, 0:W]
    total = weight.sum()
    centroid = (float((weight * (xs + 0.5)).sum() / total), float((weight * (ys + 0.5)).sum() / total))
    colour = tuple(float(c) for c in rgb[:, mask].mean(axis=1))
    return FrameBlobs(len(big), int(n - len(big)), float(total), centroid, colour)


def score_video(video: torch.Tensor | np.ndarray, expected: int | None = 1,
                th: Thresholds = Thresholds()) -> VideoScore:
    """video: (F, C, H, W) in [-1, 1]. expected: the number of sprites every frame should show
    (None: any number, as long as it is the same in every frame)."""
    v = video.detach().float().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    side = v.shape[-1]
    blobs = [frame_blobs(f, th) for f in v]
    counts = np.array([b.count for b in blobs])
    want = expected if expected is not None else int(np.bincount(counts).argmax())
    count_ok = float(np.mean(counts == want)) if want > 0 else 0.0
    present = counts > 0
    inf = float("inf")
    if present.sum() < 2:
        return VideoScore(count_ok, inf, inf, inf, 0.0, False)
    area = np.array([b.area for b in blobs])[present]
    colour = np.array([b.colour for b in blobs])[present]
    centre = np.array([b.centroid for b in blobs])
    area_change = float((area.max() - area.min()) / area.mean())
    colour_drift = float(np.linalg.norm(colour - colour.mean(axis=0), axis=1).max())
    jerk = np.abs(centre[2:] - 2 * centre[1:-1] + centre[:-2]) if len(centre) >= 3 else np.zeros((0, 2))
    max_jerk = float(np.nanmax(jerk)) if np.isfinite(jerk).any() else inf
    if not np.isfinite(jerk).all():
        max_jerk = inf  # a frame without the sprite breaks the path
    motion = float(np.linalg.norm(centre[present][-1] - centre[present][0]))
    coherent = (count_ok == 1.0 and area_change <= th.area_change and colour_drift <= th.colour_drift
                and max_jerk <= th.jerk * side and motion >= th.min_motion * side)
    return VideoScore(count_ok, area_change, colour_drift, max_jerk, motion, bool(coherent))


def expected_sprites(dataset) -> int | None:
    """How many sprites every frame of a MovingSprites dataset shows (None when it varies)."""
    return dataset.max_sprites if dataset.min_sprites == dataset.max_sprites else None


_JERK_TOP_SPEED = 1.5  # the top sprite speed (data.sprites.speed) the default jerk bound is set for


def thresholds_for(dataset) -> Thresholds:
    """The bounds for videos of a MovingSprites dataset. A bounce flips one velocity component,
    so the centroid's second difference there is up to twice the speed: the jerk bound, which
    true clips of the default speeds (0.5-1.5) pass, grows in proportion to the top speed."""
    return Thresholds(jerk=Thresholds.jerk * max(1.0, dataset.speed[1] / _JERK_TOP_SPEED))


def score_videos(videos: torch.Tensor, expected: int | None = 1, th: Thresholds = Thresholds()) -> dict:
    """(B, F, C, H, W) -> summary: fraction coherent, the mean fraction of frames showing the
    expected number of sprites, and the median of each other criterion (medians: one broken
    video's inf must not hide how the others did)."""
    scores = [score_video(v, expected, th) for v in videos]
    summary = {"videos": len(scores), "coherent": float(np.mean([s.coherent for s in scores])),
               "frames_with_expected_count": float(np.mean([s.frames_with_expected_count for s in scores]))}
    for key in ("area_change", "colour_drift", "max_jerk", "motion"):
        summary[key] = float(np.median([asdict(s)[key] for s in scores]))
    summary["per_video"] = [asdict(s) for s in scores]
    return summary
