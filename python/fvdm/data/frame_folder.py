"""Videos stored as folders of frame images: root/<video>/<frame images>."""

from __future__ import annotations

from pathlib import Path

import torch

from fvdm.data.common import ClipDataset
from fvdm.data.images import list_images, natural_key, read_image
from fvdm.errors import UserError


class FrameFolders(ClipDataset):
    """Clips from frame folders under root: every folder (at any depth, root included) that
    directly holds image files is one video, its frames in natural order (frame_2 before
    frame_10). Same items, options and errors as VideoFolder: float32 (num_frames, 3, size,
    size) in [-1, 1]; short videos skipped with a warning; an unreadable image raises
    UserError naming it when its clip is read."""

    what = "frame folders"

    def __init__(self, root: str | Path, num_frames: int, frame_stride: int = 1, size: int | None = None,
                 seed: int = 0, random_start: bool = True) -> None:
        super().__init__(root, num_frames, frame_stride, size, seed, random_start)

    def _hint(self) -> str:
        return "expected root/<video name>/<frame images: png, jpg, ...>"

    def _scan(self) -> list[tuple[Path, int]]:
        folders = [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]
        folders.sort(key=lambda p: natural_key(str(p.relative_to(self.root))))
        # Listing once here fixes each video's frame list for the dataset's lifetime.
        self._frames = {f: files for f in folders if (files := list_images(f))}
        return [(f, len(files)) for f, files in self._frames.items()]

    def _read(self, path: Path, indices: list[int]) -> torch.Tensor:
        frames = [read_image(self._frames[path][k]) for k in indices]
        if any(f.shape != frames[0].shape for f in frames):
            raise UserError(f"frames in {path} do not all have the same size; resize them to one size")
        return torch.stack(frames)
