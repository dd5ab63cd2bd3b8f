"""Model-space frames as files people look at: MP4 / GIF videos and PNG grids of frames.

Model-space images and videos are float in [-1, 1] with layout (..., C, H, W); they become
uint8 (..., H, W, C) by FVDM's rounding rule, see `to_uint8`. Tensors that are already uint8
are taken to be channels-last (..., H, W, C), the layout decoders produce. Every file is
written atomically (fvdm.io.atomic).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fvdm.errors import UserError
from fvdm.io.atomic import atomic_path

# Width in pixels of the band around every frame in a grid: amber for frames that were given
# as conditioning, background otherwise, so neighbouring frames are 2 * GUTTER apart.
GUTTER = 2
HELD_COLOUR = (255, 176, 0)
BACKGROUND = (24, 24, 24)
LABEL_COLOUR = (230, 230, 230)
# Default upscaling targets: tiny (32x32) samples are unwatchable at their native size.
VIDEO_MIN_SIDE = 128
GRID_MIN_SIDE = 64
MP4_CRF = 15  # visually lossless H.264; files stay small at research resolutions

ArrayLike = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------- pixels


def to_uint8(x: ArrayLike) -> np.ndarray:
    """Model-space pixels to RGB bytes.

    x: float (..., C, H, W) in [-1, 1] -> uint8 (..., H, W, 3), computed as
    floor(clamp((x * 0.5 + 0.5) * 255 + 0.5, 0, 255)) (FVDM's convention: -1 -> 0, 0 -> 128,
    1 -> 255, out-of-range values clamp). uint8 input is taken to be (..., H, W, C) already
    and is returned unchanged. C is 1 or 3; grey (C=1) is repeated to 3 channels for writing."""
    x = torch.as_tensor(x).detach().cpu()
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise UserError(f"expected float pixels in [-1, 1] or uint8, got dtype {x.dtype}")
    if x.ndim < 3:
        raise UserError(f"expected pixels shaped (..., C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[-1] if x.dtype == torch.uint8 else x.shape[-3]
    if channels not in (1, 3):
        raise UserError(f"expected 1 or 3 channels, got shape {tuple(x.shape)} "
                        "(float layout is (..., C, H, W), uint8 layout is (..., H, W, C))")
    if x.is_floating_point():
        x = x.float()
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise UserError(f"pixels contain {bad} NaN/inf values (a diverged model?); nothing written")
        x = ((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).floor().to(torch.uint8).movedim(-3, -1)
    if channels == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x.contiguous().numpy()


def _frames(video: ArrayLike, what: str) -> np.ndarray:
    """A video (F, C, H, W) float or (F, H, W, C) uint8, C in {1, 3} -> uint8 (F, H, W, 3)."""
    v = torch.as_tensor(video)
    if v.ndim != 4 or v.shape[0] == 0:
        raise UserError(f"{what}: expected a video shaped (F, C, H, W) with F >= 1, got shape {tuple(v.shape)}")
    return to_uint8(v)


def _check_scale(scale: int | None) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1):
        raise UserError(f"scale must be a positive integer (or None for automatic), got {scale!r}")


def _auto_scale(h: int, w: int, min_side: int) -> int:
    """Smallest integer factor that brings the shorter side to at least `min_side` pixels."""
    return max(1, math.ceil(min_side / min(h, w)))


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscale of (..., H, W, C): pixels stay crisp squares."""
    if scale == 1:
        return a
    return np.repeat(np.repeat(a, scale, axis=-3), scale, axis=-2)


# ----------------------------------------------------------------------------- videos


def save_video(path: str | Path, video: ArrayLike, fps: float = 8, scale: int | None = None) -> Path:
    """Write a video as .mp4 (H.264, yuv420p) or .gif, chosen by the extension.

    video: (F, C, H, W) float in [-1, 1] or (F, H, W, C) uint8; C is 1 or 3.
    scale: integer nearest-neighbour upscale; None picks one so the shorter side is at least
    VIDEO_MIN_SIDE pixels (and, for MP4, so both sides are even, as yuv420p requires).
    A GIF stores identical consecutive frames once, for their summed duration."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".mp4", ".gif"):
        raise UserError(f"cannot write {path}: unknown video format {ext or '(no extension)'}; use .mp4 or .gif")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps <= 1000:
        raise UserError(f"fps must be a number in (0, 1000], got {fps!r}")
    _check_scale(scale)
    frames = _frames(video, "save_video")
    h, w = frames.shape[1:3]
    if scale is None:
        scale = _auto_scale(h, w, VIDEO_MIN_SIDE)
        if ext == ".mp4" and (h * scale % 2 or w * scale % 2):
            scale += 1  # odd * even is even
    elif ext == ".mp4" and (h * scale % 2 or w * scale % 2):
        raise UserError(f"cannot write {path}: MP4 (yuv420p) needs even width and height, got "
                        f"{w * scale}x{h * scale}; pass an even scale or write a .gif")
    frames = _upscale(frames, scale)
    with atomic_path(path) as tmp:
        if ext == ".mp4":
            _encode_mp4(tmp, frames, fps, _mp4_codec())
        else:
            _encode_gif(tmp, frames, fps)
    return path


def _mp4_codec() -> str:
    """libx264 when this PyAV build has it, else the always-present MPEG-4 Part 2 encoder."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except av.codec.codec.UnknownCodecError:  # PyAV built without GPL codecs
        return "mpeg4"


def _encode_mp4(path: Path, frames: np.ndarray, fps: float, codec: str) -> None:
    """frames: uint8 (F, H, W, 3) with even H, W."""
    import av

    h, w = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(MP4_CRF), "preset": "medium"}
        else:  # mpeg4 has no crf: a generous bit rate (about 4 bits per pixel) instead
            stream.bit_rate = max(1_000_000, int(4 * w * h * fps))
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _encode_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    """frames: uint8 (F, H, W, 3). Loops forever; identical consecutive frames are merged by
    Pillow into one longer frame (playback is the same)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0)  # browsers slow down < 20 ms


# ----------------------------------------------------------------------------- frame grids


def save_contact_sheet(path: str | Path, videos: ArrayLike | Sequence[ArrayLike], held: ArrayLike | None = None,
                       labels: Sequence[str] | None = None, scale: int | None = None) -> Path:
    """A PNG with one row per video and one column per frame.

    videos: (B, F, C, H, W) float / (B, F, H, W, C) uint8, or a list of B such videos of
    possibly different F (short rows are padded with background). All frames share H, W.
    held: bool (B, F) or (F,) (the same for every row), F being the longest video's: frames
    given as conditioning get an amber (HELD_COLOUR) border, generated ones none.
    labels: B short strings drawn left of the rows. scale: as in save_video (None: at least
    GRID_MIN_SIDE pixels)."""
    _check_scale(scale)
    if isinstance(videos, (torch.Tensor, np.ndarray)) and videos.ndim != 5:
        raise UserError(f"save_contact_sheet: expected videos shaped (B, F, C, H, W) or a list of (F, C, H, W), "
                        f"got shape {tuple(videos.shape)}")
    rows = [_frames(v, "save_contact_sheet") for v in videos]
    if not rows:
        raise UserError("save_contact_sheet: no videos given")
    longest = max(len(r) for r in rows)
    marks = _held_rows(held, len(rows), longest)
    cells = [[row[i] if i < len(row) else None for i in range(longest)] for row in rows]
    sheet = _compose(cells, marks, labels, scale)
    return _save_png(path, sheet)


def save_image_grid(path: str | Path, images: ArrayLike, nrow: int = 8, scale: int | None = None) -> Path:
    """A PNG grid of images, `nrow` per row (the last row may be short).

    images: (B, C, H, W) float in [-1, 1] or (B, H, W, C) uint8."""
    if isinstance(nrow, bool) or not isinstance(nrow, numbers.Integral) or nrow < 1:
        raise UserError(f"nrow must be a positive integer, got {nrow!r}")
    _check_scale(scale)
    frames = _frames(images, "save_image_grid")
    cells = [[frames[i] if i < len(frames) else None for i in range(r, r + nrow)] for r in range(0, len(frames), nrow)]
    return _save_png(path, _compose(cells, None, None, scale))


def _held_rows(held: ArrayLike | None, rows: int, cols: int) -> np.ndarray | None:
    """held (F,) or (B, F) -> bool (B, F), checked against the grid's shape."""
    if held is None:
        return None
    h = torch.as_tensor(held).cpu()
    if tuple(h.shape) not in ((cols,), (rows, cols)):
        raise UserError(f"held: expected shape ({cols},) or ({rows}, {cols}) to match the videos, got {tuple(h.shape)}")
    return h.bool().expand(rows, cols).numpy()


def _compose(cells: list[list[np.ndarray | None]], held: np.ndarray | None, labels: Sequence[str] | None,
             scale: int | None) -> np.ndarray:
    """Tile equally sized uint8 (H, W, 3) frames (None = empty cell) into one (rows, cols) image.

    Each cell is the (scaled) frame inside a GUTTER-wide band, filled with HELD_COLOUR where
    `held` (rows, cols) is true; a label column is added on the left when labels are given."""
    first = next(c for row in cells for c in row if c is not None)
    h, w = first.shape[:2]
    if any(c is not None and c.shape[:2] != (h, w) for row in cells for c in row):
        raise UserError("all frames in a grid must have the same height and width")
    scale = scale or _auto_scale(h, w, GRID_MIN_SIDE)
    ch, cw = h * scale + 2 * GUTTER, w * scale + 2 * GUTTER
    n_rows, n_cols = len(cells), max(len(row) for row in cells)
    grid = np.empty((n_rows * ch, n_cols * cw, 3), np.uint8)
    grid[:] = BACKGROUND
    for r, row in enumerate(cells):
        for c, frame in enumerate(row):
            y, x = r * ch, c * cw
            if held is not None and held[r, c]:
                grid[y:y + ch, x:x + cw] = HELD_COLOUR
            if frame is not None:
                grid[y + GUTTER:y + ch - GUTTER, x + GUTTER:x + cw - GUTTER] = _upscale(frame, scale)
    if labels is not None:
        if len(labels) != n_rows:
            raise UserError(f"labels: expected {n_rows} (one per row), got {len(labels)}")
        grid = np.concatenate([_label_column([str(s) for s in labels], ch), grid], axis=1)
    return grid


def _label_column(labels: list[str], row_height: int) -> np.ndarray:
    """uint8 (len(labels) * row_height, W, 3): each label vertically centred on its row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    boxes = [font.getbbox(s) for s in labels]
    pad = 4
    width = max((b[2] - b[0] for b in boxes), default=0) + 2 * pad
    image = Image.new("RGB", (width, row_height * len(labels)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, (text, box) in enumerate(zip(labels, boxes)):
        y = i * row_height + (row_height - (box[3] - box[1])) // 2 - box[1]
        draw.text((pad - box[0], y), text, fill=LABEL_COLOUR, font=font)
    return np.asarray(image)


def _save_png(path: str | Path, image: np.ndarray) -> Path:
    """Atomically write a uint8 (H, W, 3) array as PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)
