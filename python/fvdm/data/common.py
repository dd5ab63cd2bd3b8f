"""What VideoFolder and FrameFolders share: option checks, skipping short videos, the clip's
start frame, and resize + center crop to [-1, 1] tensors."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fvdm.errors import UserError

_START_TAG = 0x57A27  # separates clip-start draws from other users of (seed, i)


def clip_span(num_frames: int, frame_stride: int) -> int:
    """Frames a clip covers in its source: first to last sampled frame inclusive."""
    return (num_frames - 1) * frame_stride + 1


def clip_start(num_available: int, span: int, seed: int, index: int, random_start: bool) -> int:
    """First source frame of clip `index`: uniform over the valid starts, a pure function of
    (seed, index) so every epoch, worker and process sees the same clip; 0 if not random."""
    if not random_start or num_available <= span:
        return 0
    rng = np.random.default_rng([seed % 2**64, index, _START_TAG])
    return int(rng.integers(0, num_available - span + 1))


def resize_crop(frames: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, size, size) in [-1, 1]: the shorter side is resized
    to `size` (bilinear with antialiasing, i.e. area-like when shrinking), then center-cropped
    to a square. size None keeps the frames as they are: (F, 3, H, W)."""
    x = frames.permute(0, 3, 1, 2).float()
    if size is not None:
        H, W = x.shape[-2:]
        scale = size / min(H, W)
        h, w = max(size, round(H * scale)), max(size, round(W * scale))
        if (h, w) != (H, W):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()


def check_clip_options(owner: str, num_frames: int, frame_stride: int, size: int | None) -> None:
    for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise UserError(f"{owner}: size must be a positive integer (frame side in pixels) or None, got {size!r}")


class ClipDataset(Dataset):
    """Clips of num_frames frames, frame_stride apart, one per source video.

    Subclasses list their sources with `_scan() -> [(path, frame count)]` and read frames with
    `_read(path, indices) -> uint8 (len(indices), H, W, 3)`. Sources too short for one clip are
    skipped (kept in `self.skipped`, one warning); none left is an error. Item i is float32
    (num_frames, 3, size, size) in [-1, 1] (size None: native H, W)."""

    what = "videos"  # for messages

    def __init__(self, root: str | Path, num_frames: int, frame_stride: int = 1, size: int | None = None,
                 seed: int = 0, random_start: bool = True) -> None:
        owner = type(self).__name__
        check_clip_options(owner, num_frames, frame_stride, size)
        if root is None or not Path(root).is_dir():
            raise UserError(f"{owner}: root {root} is not a folder; give the folder that holds your {self.what}")
        self.root = Path(root)
        self.num_frames, self.frame_stride, self.size = num_frames, frame_stride, size
        self.seed, self.random_start = int(seed), bool(random_start)
        self.span = clip_span(num_frames, frame_stride)
        sources = self._scan()
        if not sources:
            raise UserError(f"{owner}: found no {self.what} under {self.root}; {self._hint()}")
        self.sources = [(p, n) for p, n in sources if n >= self.span]
        self.skipped = [p for p, n in sources if n < self.span]
        if not self.sources:
            raise UserError(f"{owner}: all {len(sources)} {self.what} under {self.root} have fewer than {self.span} "
                            f"frames (num_frames={num_frames}, frame_stride={frame_stride}); lower one of them")
        if self.skipped:
            warnings.warn(f"{owner}: skipped {len(self.skipped)} of {len(sources)} {self.what} under {self.root} "
                          f"with fewer than {self.span} frames (e.g. {self.skipped[0]})", stacklevel=3)

    def _scan(self) -> list[tuple[Path, int]]:
        raise NotImplementedError

    def _read(self, path: Path, indices: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _hint(self) -> str:
        return "check data.root"

    def __len__(self) -> int:
        return len(self.sources)

    def frame_indices(self, i: int) -> list[int]:
        """Source frame numbers of clip i."""
        path, n = self.sources[i]
        start = clip_start(n, self.span, self.seed, i, self.random_start)
        return list(range(start, start + self.span, self.frame_stride))

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__} index {i} out of range for {len(self)} {self.what}")
        path = self.sources[i][0]
        return resize_crop(self._read(path, self.frame_indices(i)), self.size)

    def describe(self) -> dict:
        """Options and a digest of the source list (paths, sizes, mtimes, frame counts):
        LatentCache fingerprints this, so edited or added files invalidate cached latents."""
        digest = hashlib.sha256()
        for path, n in self.sources:
            st = path.stat()
            digest.update(json.dumps([str(path.relative_to(self.root)), st.st_size, st.st_mtime_ns, n]).encode())
        return {"kind": type(self).__name__, "root": str(self.root.resolve()), "num_frames": self.num_frames,
                "frame_stride": self.frame_stride, "size": self.size, "seed": self.seed,
                "random_start": self.random_start, "sources": digest.hexdigest()}
