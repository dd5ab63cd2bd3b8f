"""Training data: the built-in MovingSprites, folders of videos or frame images, and optional
VAE latents. Every dataset item is float32 (F, C, H, W) in [-1, 1]."""

from __future__ import annotations

import inspect

from fvdm.data.frame_folder import FrameFolders
from fvdm.data.images import IMAGE_EXTENSIONS, natural_key
from fvdm.data.latents import LatentCache, decode_video, encode_video, load_vae
from fvdm.data.sprites import MovingSprites, Trajectory, render
from fvdm.data.video_folder import VIDEO_EXTENSIONS, VideoFolder, read_image, read_video
from fvdm.errors import UserError

DATASETS = {"sprites": MovingSprites, "videos": VideoFolder, "frames": FrameFolders}

__all__ = [
    "DATASETS", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "FrameFolders", "LatentCache", "MovingSprites",
    "Trajectory", "VideoFolder", "build_dataset", "decode_video", "encode_video", "load_vae", "natural_key",
    "read_image", "read_video", "render",
]


def build_dataset(kind: str, **kwargs):
    """DATASETS[kind](**kwargs), with a UserError for an unknown kind or option."""
    if kind not in DATASETS:
        raise UserError(f"unknown data kind {kind!r}; choose one of {', '.join(DATASETS)}")
    cls = DATASETS[kind]
    params = {n: p for n, p in inspect.signature(cls).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UserError(f"data kind {kind!r} has no option(s) {', '.join(unknown)}; it takes {', '.join(params)}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise UserError(f"data kind {kind!r} needs option(s) {', '.join(missing)}")
    return cls(**kwargs)
