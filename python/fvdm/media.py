"""Everything train and sample write: videos (MP4, GIF), contact sheets, image grids, the
schedule-matrix plot, the loss curve, metrics JSONL and JSON.

Every writer creates the parent folder and writes a temporary file next to the target, then
renames it into place: a reader never sees half a file, and an existing file survives a failed
write. A location that cannot be written raises UserError naming it."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fvdm.errors import UserError

HELD_COLOUR = (255, 200, 0)  # border of frames that were given, not generated
GUTTER = 2


# ----------------------------------------------------------------------------- atomic files


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path in the target's folder; renamed onto `path` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(path)


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON line, flushed, so a killed run keeps every line it logged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records; a truncated last line (a killed writer) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ----------------------------------------------------------------------------- pixels


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) float in [-1, 1] -> (..., H, W, 3) uint8 as the reference writes frames:
    clamp((x * 0.5 + 0.5) * 255 + 0.5, 0, 255) truncated. uint8 input is taken as (..., H, W, C)."""
    if x.dtype == torch.uint8:
        a = x.cpu().numpy()
    else:
        if not torch.isfinite(x).all():
            raise UserError("cannot write frames with NaN or inf values")
        a = ((x.detach().float().cpu() * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
        a = a.movedim(-3, -1).numpy()
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] != 3:
        raise UserError(f"frames must have 1 or 3 channels, got shape {tuple(x.shape)}")
    return a


def _default_scale(h: int, w: int) -> int:
    return max(1, math.ceil(128 / min(h, w)))  # tiny demo frames are unwatchable at 16 px


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    """(..., H, W, 3) nearest-neighbour upscale."""
    return a if scale == 1 else a.repeat(scale, axis=-3).repeat(scale, axis=-2)


# ----------------------------------------------------------------------------- videos


def save_video(path: str | Path, video: torch.Tensor, fps: int = 8, scale: int | None = None) -> Path:
    """video (F, C, H, W) float in [-1, 1] or uint8 (F, H, W, C) -> .mp4 (H.264) or .gif."""
    path = Path(path)
    frames = to_uint8(video)
    if frames.ndim != 4:
        raise UserError(f"a video must be (F, C, H, W), got shape {tuple(video.shape)}")
    frames = _upscale(frames, scale or _default_scale(*frames.shape[1:3]))
    with atomic_path(path) as tmp:
        if path.suffix == ".gif":
            from PIL import Image

            imgs = [Image.fromarray(f) for f in frames]
            imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=round(1000 / fps),
                         loop=0)
        elif path.suffix == ".mp4":
            _write_mp4(tmp, frames, fps)
        else:
            raise UserError(f"cannot write video {path}: use a .mp4 or .gif name")
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p: even sizes
    with av.open(str(path), mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "15"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ----------------------------------------------------------------------------- sheets and grids


def save_contact_sheet(path: str | Path, videos: torch.Tensor | Sequence[torch.Tensor],
                       held: torch.Tensor | None = None, scale: int | None = None) -> Path:
    """One row per video, one column per frame; frames in `held` ((B, F) or (F,) bool) get a
    coloured border, so a reader sees which frames were given. videos (B, F, C, H, W) float."""
    rows = [to_uint8(v) for v in videos]  # each (F, H, W, 3)
    B, F_max = len(rows), max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    s = scale or _default_scale(h, w) // 2 or 1
    mask = np.zeros((B, F_max), dtype=bool)
    if held is not None:
        hm = held.cpu().numpy().astype(bool)
        hm = np.broadcast_to(hm if hm.ndim == 2 else hm[None], (B, hm.shape[-1]))
        mask[:, : min(F_max, hm.shape[1])] = hm[:, :F_max]
    cell_h, cell_w = h * s + 2 * GUTTER, w * s + 2 * GUTTER
    sheet = np.full((B * cell_h, F_max * cell_w, 3), 40, dtype=np.uint8)
    for b, row in enumerate(rows):
        for f, frame in enumerate(_upscale(row, s)):
            y, x = b * cell_h, f * cell_w
            if mask[b, f]:
                sheet[y:y + cell_h, x:x + cell_w] = HELD_COLOUR
            sheet[y + GUTTER:y + GUTTER + h * s, x + GUTTER:x + GUTTER + w * s] = frame
    return _save_png(path, sheet)


def save_image_grid(path: str | Path, images: torch.Tensor, nrow: int = 8, scale: int | None = None) -> Path:
    """images (N, C, H, W) in [-1, 1] as a grid with `nrow` images per row."""
    n = images.shape[0]
    pad = (-n) % nrow
    if pad:
        images = torch.cat([images, torch.full((pad, *images.shape[1:]), -1.0)])
    return save_contact_sheet(path, images.view(-1, nrow, *images.shape[1:]), scale=scale)


def _save_png(path: str | Path, array: np.ndarray) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(path: str | Path, fig) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def save_schedule_matrix(path: str | Path, S: torch.Tensor, held: torch.Tensor | None = None,
                         title: str | None = None) -> Path:
    """Heatmap of a schedule matrix S (steps + 1, F): frame vs sampler step, colour = per-frame
    time (DDPM timestep, -1 = clean; or flow time). Held frames are labelled."""
    S = S.detach().double().cpu()
    steps, F_ = S.shape
    fig = _figure(max(4.0, 0.35 * F_ + 2), max(3.0, min(8.0, 0.06 * steps + 2)))
    ax = fig.add_subplot()
    im = ax.imshow(S.clamp(min=0).numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="noise level (time)")
    ax.set_xlabel("frame")
    ax.set_ylabel("sampler step (top: first)")
    if held is not None:
        for f in held.nonzero().flatten().tolist():
            ax.text(f, -0.5, "held", ha="center", va="bottom", fontsize=7, color="tab:orange")
    ax.set_title(title or f"schedule matrix ({steps - 1} steps, {F_} frames)", pad=14)
    return _save_figure(path, fig)


def save_loss_curve(path: str | Path, records: Iterable[dict], keys: Sequence[str] = ("loss",)) -> Path:
    """Each key vs step (log y): raw values thin, their exponential moving average thick."""
    records = list(records)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
        if not pts:
            continue
        steps, vals = zip(*pts)
        ax.plot(steps, vals, lw=0.7, alpha=0.35)
        ema, smooth = vals[0], []
        for v in vals:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, lw=2, label=f"{key} (EMA)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save_figure(path, fig)
