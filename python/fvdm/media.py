"""Everything fvdm writes for people to look at: videos (MP4, GIF), PNG grids of frames,
plots (schedule matrix, loss curve) and the JSONL/JSON metrics files.

Conventions
-----------
* Model-space images and videos are float in [-1, 1] with layout (..., C, H, W); they become
  uint8 (..., H, W, C) by FVDM's rounding rule, see `to_uint8`. Tensors that are already uint8
  are taken to be channels-last (..., H, W, C), the layout decoders produce.
* Every writer is atomic: it writes a temporary file next to the target and `os.replace`s it,
  so a reader never sees half a file and a failed write leaves an existing file untouched.
  Parent directories are created. A location that cannot be written raises `UserError`.
* Writers return the `Path` they wrote.
* matplotlib is used through `Figure` + `FigureCanvasAgg` only (never pyplot), so plotting
  neither needs a display nor changes the backend or any figure state of the caller.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import numbers
import os
import uuid
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fvdm.errors import UserError

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


# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; on success it replaces `path`.

    On any exception the temporary file is removed and `path` is left as it was. OSErrors
    (permissions, missing space, a file where a directory should be) become UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _make_parent(path)
        # os.open with 0o666 lets the umask decide permissions, as for any normally created
        # file (mkstemp would leave the output readable by its owner only).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(path.parent)  # and the new name survives a power loss
    except OSError as e:
        raise _cannot_write(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in directory `path` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some network filesystems refuse it
            raise
    finally:
        os.close(fd)


def _make_parent(path: Path) -> None:
    """Create `path`'s directory; a file standing where a directory should be is named."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a directory; choose another location")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def _cannot_write(path: Path, e: OSError) -> UserError:
    """One line: the target, the OS's reason (naming another path if that is the culprit), a fix."""
    reason = e.strerror or str(e)
    name = os.fsdecode(e.filename) if e.filename else ""
    if name and name != str(path) and not name.endswith(".tmp"):
        reason += f" ({name})"
    return UserError(f"cannot write {path}: {reason}; choose another location or fix its permissions")


def write_json(path: str | Path, obj: object) -> Path:
    """Atomically write `obj` as indented JSON (non-finite floats become null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, default=_scalar) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return Path(path)


def truncate_jsonl(path: str | Path, keep) -> int:
    """Atomically rewrite a metrics file keeping the records for which keep(record) is true (a
    truncated last line is dropped too); returns how many records were dropped. No file: 0."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    data = path.read_bytes()
    if len(kept) != len(records) or (data and not data.endswith(b"\n")):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line to a metrics file and flush it.

    A line cut short by a killed run (no trailing newline) is dropped first, so the new record
    starts on a line of its own. Non-finite floats are written as null (strict JSON)."""
    path = Path(path)
    line = json.dumps(_finite(record), default=_scalar) + "\n"
    try:
        _make_parent(path)
        with open(path, "ab+") as f:
            _drop_partial_line(f)
            f.write(line.encode())
            f.flush()
    except OSError as e:
        raise _cannot_write(path, e) from e


def _drop_partial_line(f: io.BufferedRandom) -> None:
    """Truncate an append-mode file back to its last newline (no-op if it ends with one)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    # Scan back in blocks for the last newline; a partial line is short, so this is quick.
    end = size
    while end > 0:
        start = max(0, end - 4096)
        f.seek(start)
        cut = f.read(end - start).rfind(b"\n")
        if cut >= 0:
            f.truncate(start + cut + 1)
            return
        end = start
    f.truncate(0)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics file; a truncated last line (a killed run) is ignored.

    Any other malformed line raises UserError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line had no newline: an interrupted write
                break
            raise UserError(f"{path}:{number}: not valid JSON; fix or delete that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _finite(obj: object) -> object:
    """Replace NaN/inf floats (anywhere in dicts/lists) by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _scalar(obj: object) -> object:
    """json default: numpy/torch scalars become Python numbers, paths strings."""
    if isinstance(obj, (np.generic, torch.Tensor)) and np.size(obj) == 1:
        value = obj.item()
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


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


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(path: str | Path, fig) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# What the schedule plot says a clean (held) frame is; the README quotes the DDPM ones. In a DDPM
# schedule matrix clean is -1, one below the last noisy timestep 0, and the network is shown it as
# t = 0 (schedules.DDPMSchedule.model_time).
SCHEDULE_LABELS = {"ddpm": "timestep t (-1 = clean)", "flow": "noise level t (0 = clean)"}
HELD_LABELS = {"ddpm": "held: given frames, clean (t = -1) in every step; the network sees t = 0",
               "flow": "held: given frames, clean (t = 0) in every step"}


def save_schedule_matrix(path: str | Path, S: ArrayLike, held: ArrayLike | None = None,
                         title: str | None = None) -> Path:
    """A heatmap of a sampler's per-frame times: x = frame, y = sampler step (first at top).

    S: (steps + 1, F) times: integers in [-1, T - 1] for DDPM (-1 = clean) or floats in
    [0, 1] for flow matching (0 = clean). held: bool (F,) or (steps + 1, F), frames (or cells)
    given as conditioning, drawn hatched and named in the legend."""
    s = torch.as_tensor(S).detach().cpu()
    floating = s.is_floating_point()
    s = s.double()
    if s.ndim != 2 or s.numel() == 0:
        raise UserError(f"S: expected a (steps + 1, F) matrix of per-frame times, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise UserError("S: contains NaN/inf; expected per-frame times")
    mask = _schedule_mask(held, tuple(s.shape))
    rows, frames = s.shape
    flow = floating and bool(s.min() >= 0 and s.max() <= 1)  # DDPM times are integers, -1 = clean
    vmin, vmax = (0.0, 1.0) if flow else (-1.0, max(float(s.max()), 1.0))

    fig = _figure(min(3.0 + 0.35 * frames, 14.0), 4.5)
    ax = fig.add_subplot()
    image = ax.imshow(s.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=SCHEDULE_LABELS["flow" if flow else "ddpm"])
    ax.set_xlabel("frame")
    ax.set_ylabel("sampler step (0 = first)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    if frames <= 32:
        ax.set_xticks(range(frames))
    if mask is not None and mask.any():
        _hatch(ax, mask, HELD_LABELS["flow" if flow else "ddpm"])
    if title:
        ax.set_title(title)
    return _save_figure(path, fig)


def _schedule_mask(held: ArrayLike | None, shape: tuple[int, int]) -> np.ndarray | None:
    """held (F,) or (steps + 1, F) -> bool (steps + 1, F)."""
    if held is None:
        return None
    h = torch.as_tensor(held).cpu().bool()
    if h.ndim == 1 and h.shape[0] == shape[1]:
        h = h.expand(shape[0], -1)
    if tuple(h.shape) != shape:
        raise UserError(f"held: expected shape ({shape[1]},) or {shape} to match S, got {tuple(h.shape)}")
    return h.numpy()


def _hatch(ax, mask: np.ndarray, label: str) -> None:
    """Hatch the held cells: one rectangle per vertical run, so long schedules stay cheap."""
    from matplotlib.patches import Patch, Rectangle

    for col in range(mask.shape[1]):
        padded = np.concatenate([[False], mask[:, col], [False]])
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        for start, stop in zip(edges[::2], edges[1::2]):
            ax.add_patch(Rectangle((col - 0.5, start - 0.5), 1, stop - start, fill=False, hatch="//",
                                   edgecolor="white", linewidth=0))
    # A proxy with a dark face: white hatching alone is invisible in a legend on white.
    proxy = Patch(facecolor="0.25", edgecolor="white", hatch="//", label=label)
    # Below the axes: inside, it would hide part of the matrix.
    ax.legend(handles=[proxy], loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", frameon=False)


def save_loss_curve(path: str | Path, records: Sequence[dict], keys: Sequence[str] = ("loss",)) -> Path:
    """Each key vs "step" on a log y axis: raw values thin and translucent, an exponential
    moving average thick. Records without a key, or with a NaN/inf/non-positive/null value,
    are skipped for that key (a log axis cannot show them)."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    plotted = False
    for i, key in enumerate(keys):
        steps, values = _series(records, key)
        if not len(steps):
            continue
        colour = f"C{i}"
        marker = "o" if len(steps) == 1 else None  # a one-point line would be invisible
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, marker=marker)
        ax.plot(steps, _ema(values), color=colour, linewidth=2.0, label=f"{key} (EMA)", marker=marker)
        plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite values to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("value (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    return _save_figure(path, fig)


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have a finite positive `key` and a "step"."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
             and math.isfinite(r[key]) and r[key] > 0]
    pairs.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)


def _ema(values: np.ndarray) -> np.ndarray:
    """Bias-corrected EMA in log space (a geometric mean, which suits a log axis); its span
    grows with the series so short runs are still smoothed and long ones not over-smoothed."""
    alpha = 2.0 / (min(max(len(values) // 20, 1), 200) + 1)
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(np.log(values)):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return np.exp(out)
