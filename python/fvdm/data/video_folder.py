"""Video files (PyAV): a folder of videos as a clip dataset, and reading one video or image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import torch

from fvdm.data.common import ClipDataset
from fvdm.data.images import list_images, natural_key, read_image
from fvdm.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
_AV_ERRORS = (av.FFmpegError, OSError, ValueError)  # ValueError: e.g. frames of changing size in np.stack

__all__ = ["VIDEO_EXTENSIONS", "VideoFolder", "probe_frames", "read_frames", "read_image", "read_video"]


def _corrupt(path: Path, e: Exception) -> UserError:
    return UserError(f"video {path} could not be decoded ({type(e).__name__}: {e}); "
                     "remove it or re-encode it (e.g. ffmpeg -i in.mp4 out.mp4)")


def probe_frames(path: Path) -> int:
    """Number of frames of a video file: the container's count, or counted packets (no
    decoding) where the container does not store one (webm, mkv, gif)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"video {path} has no video stream; remove it from the folder")
            stream = container.streams.video[0]
            if stream.frames > 0:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size)
    except UserError:
        raise
    except _AV_ERRORS as e:
        raise _corrupt(path, e) from None


def read_frames(path: Path, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Frames `indices` (increasing; None: all) of a video file -> uint8 (F, H, W, 3) RGB.

    Decodes from the start and stops after the last wanted frame; only wanted frames are
    converted to RGB. (Exact frame numbering without trusting timestamps, which variable
    frame rate files and some containers get wrong.)"""
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices)
    frames: dict[int, np.ndarray] = {}
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"video {path} has no video stream; give a video file")
            for k, frame in enumerate(container.decode(container.streams.video[0])):
                count = k + 1
                if wanted is None or k in wanted:
                    frames[k] = frame.to_ndarray(format="rgb24")
                if last is not None and k >= last:
                    break
        order = sorted(frames) if indices is None else list(indices)
        if not frames and last is None:
            raise UserError(f"video {path} has no decodable frames; it may be empty or truncated: re-encode it")
        if not frames or any(k not in frames for k in order):
            raise UserError(f"video {path} has only {count} decodable frames but frame {last} was needed; "
                            "it may be truncated: re-encode it or remove it")
        return torch.from_numpy(np.stack([frames[k] for k in order]))
    except UserError:
        raise
    except _AV_ERRORS as e:
        raise _corrupt(path, e) from None


def read_video(path: str | Path) -> torch.Tensor:
    """A video file (mp4, gif, ... anything FFmpeg reads) or a folder of frame images (natural
    order) -> uint8 (F, H, W, 3) RGB, all frames."""
    path = Path(path)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise UserError(f"folder {path} holds no frame images (png, jpg, ...); give a video file or a frame folder")
        frames = [read_image(f) for f in files]
        if any(f.shape != frames[0].shape for f in frames):
            raise UserError(f"frame images in {path} do not all have the same size; resize them to one size")
        return torch.stack(frames)
    if not path.is_file():
        raise UserError(f"video {path} does not exist; check the path")
    return read_frames(path)


class VideoFolder(ClipDataset):
    """Clips from every video file under root (recursive, natural order of relative paths).

    Item i: float32 (num_frames, 3, size, size) in [-1, 1], frames frame_stride apart from a
    start drawn from (seed, i) (0 when random_start is False). Each file is probed once, here;
    files shorter than (num_frames - 1) * frame_stride + 1 frames are skipped with a warning.
    A corrupt file raises UserError naming it (when probed, or when a clip is decoded)."""

    what = "video files"

    def __init__(self, root: str | Path, num_frames: int, frame_stride: int = 1, size: int | None = None,
                 extensions: Sequence[str] = VIDEO_EXTENSIONS, seed: int = 0, random_start: bool = True) -> None:
        if isinstance(extensions, str):
            extensions = (extensions,)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        super().__init__(root, num_frames, frame_stride, size, seed, random_start)

    def _hint(self) -> str:
        return f"expected files ending in {', '.join(self.extensions)}"

    def _scan(self) -> list[tuple[Path, int]]:
        files = [p for p in self.root.rglob("*") if p.suffix.lower() in self.extensions and p.is_file()]
        files.sort(key=lambda p: natural_key(str(p.relative_to(self.root))))
        return [(p, probe_frames(p)) for p in files]

    def _read(self, path: Path, indices: list[int]) -> torch.Tensor:
        return read_frames(path, indices)
