"""Output writers (fvdm.io: atomic, pixels, plots): files are read back with PyAV / Pillow and compared pixel by
pixel with what was written; plots are checked as real PNGs whose pixels depend on the data;
failure paths check that nothing is damaged and the error is a one-line UserError."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fvdm.io import atomic, pixels, plots
from fvdm.errors import UserError

# Flat colours that survive H.264's YUV 4:2:0 round trip and GIF's palette well.
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (230, 230, 60), (60, 220, 220)]


def from_uint8(c: np.ndarray | tuple) -> torch.Tensor:
    """The float in [-1, 1] that to_uint8 maps back to byte value c exactly."""
    return torch.as_tensor(np.asarray(c, np.float32)) / 127.5 - 1


def quadrant_video(frames: int, h: int = 32, w: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """(F, 3, H, W) float video and its (F, 2, 3) uint8 colours: frame i has COLOURS[i] on the
    left half and the next colour on the right half, so every frame differs."""
    video = torch.empty(frames, 3, h, w)
    colours = np.empty((frames, 2, 3), np.uint8)
    for i in range(frames):
        left, right = COLOURS[i % len(COLOURS)], COLOURS[(i + 1) % len(COLOURS)]
        video[i, :, :, : w // 2] = from_uint8(left)[:, None, None]
        video[i, :, :, w // 2:] = from_uint8(right)[:, None, None]
        colours[i] = (left, right)
    return video, colours


def half_means(frame: np.ndarray) -> np.ndarray:
    """(2, 3) mean colour of the middle of the left and right halves of an (H, W, 3) frame,
    away from the edge where chroma subsampling and the codec blur the two colours."""
    h, w = frame.shape[:2]
    rows = slice(h // 4, 3 * h // 4)
    return np.stack([frame[rows, w // 8: 3 * w // 8].reshape(-1, 3).mean(0),
                     frame[rows, 5 * w // 8: 7 * w // 8].reshape(-1, 3).mean(0)])


def read_mp4(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, float(stream.average_rate)


def read_gif(path: Path) -> tuple[list[np.ndarray], dict]:
    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
        return frames, dict(im.info)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def chmod_is_effective(directory: Path) -> bool:
    """False when running as root (or on a file system) where a 0o500 directory stays writable."""
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


# ----------------------------------------------------------------------------- to_uint8


def test_to_uint8_convention_exact_values_and_clamping():
    values = [-1.0, -0.5, 0.0, 0.5, 1.0, -3.0, 3.0, 1.0001]
    # floor(clamp((x * 0.5 + 0.5) * 255 + 0.5, 0, 255)): -0.5 -> 64.25, 0.5 -> 191.75
    expected = [0, 64, 128, 191, 255, 0, 255, 255]
    x = torch.tensor(values).view(len(values), 1, 1, 1).expand(-1, 3, 1, 1)
    out = pixels.to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (len(values), 1, 1, 3)
    assert out[:, 0, 0, 0].tolist() == expected
    assert pixels.to_uint8(x.to(torch.bfloat16))[:, 0, 0, 0].tolist() == expected


def test_to_uint8_moves_channels_last_and_passes_uint8_through():
    x = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.ones(2, 3)])  # (C=3, H=2, W=3)
    out = pixels.to_uint8(x[None])  # (1, 3, 2, 3) -> (1, 2, 3, 3)
    assert out.shape == (1, 2, 3, 3)
    assert out[0, 1, 2].tolist() == [0, 128, 255]
    u = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    assert np.array_equal(pixels.to_uint8(u), u.numpy())
    grey = pixels.to_uint8(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1))  # C=1 -> RGB
    assert grey.shape == (2, 1, 1, 3) and grey[:, 0, 0].tolist() == [[0] * 3, [255] * 3]


@pytest.mark.parametrize("bad", [
    torch.full((1, 3, 2, 2), float("nan")),
    torch.zeros(1, 3, 2, 2, dtype=torch.int64),
    torch.zeros(3, 4),
    torch.zeros(1, 4, 2, 2),  # 4 channels
    torch.zeros(1, 2, 2, 2, dtype=torch.uint8),  # uint8 is channels-last: 2 channels
])
def test_to_uint8_rejects_nan_integers_flat_tensors_and_odd_channels(bad):
    with pytest.raises(UserError):
        pixels.to_uint8(bad)


# ----------------------------------------------------------------------------- videos


def test_mp4_reads_back_with_frames_size_rate_and_colours(tmp_path):
    video, colours = quadrant_video(5)
    path = pixels.save_video(tmp_path / "out" / "v.mp4", video, fps=5)  # parent is created
    frames, rate = read_mp4(path)
    assert len(frames) == 5
    assert frames[0].shape == (128, 128, 3)  # 32 px upscaled so the short side is >= 128
    assert rate == pytest.approx(5)
    for frame, expected in zip(frames, colours):
        np.testing.assert_allclose(half_means(frame), expected, atol=6)


def test_mp4_mpeg4_fallback_encoder_reads_back(tmp_path):
    video, colours = quadrant_video(3, 16, 16)
    frames = np.repeat(np.repeat(pixels.to_uint8(video), 4, 1), 4, 2)
    pixels._encode_mp4(tmp_path / "m.mp4", frames, 8, "mpeg4")
    decoded, _ = read_mp4(tmp_path / "m.mp4")
    assert len(decoded) == 3 and decoded[0].shape == (64, 64, 3)
    for frame, expected in zip(decoded, colours):
        np.testing.assert_allclose(half_means(frame), expected, atol=10)


def test_gif_reads_back_with_frames_scale_timing_and_colours(tmp_path):
    video, colours = quadrant_video(5, 16, 24)
    path = pixels.save_video(tmp_path / "v.gif", video, fps=5, scale=3)
    frames, info = read_gif(path)
    assert len(frames) == 5
    assert frames[0].shape == (48, 72, 3)
    assert info["loop"] == 0 and info["duration"] == 200
    for frame, expected in zip(frames, colours):
        np.testing.assert_allclose(half_means(frame), expected, atol=3)


def test_grey_and_uint8_videos_write_the_same_pixels_as_float_rgb(tmp_path):
    grey = torch.linspace(-1, 1, 4).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    pixels.save_video(tmp_path / "grey.gif", grey, scale=1)
    pixels.save_video(tmp_path / "u8.gif", pixels.to_uint8(grey.expand(4, 3, 8, 8)), scale=1)
    a, _ = read_gif(tmp_path / "grey.gif")
    b, _ = read_gif(tmp_path / "u8.gif")
    assert np.array_equal(np.stack(a), np.stack(b))
    assert [f[4, 4].tolist() for f in a] == [[v] * 3 for v in (0, 85, 170, 255)]


def test_default_mp4_scale_makes_odd_sizes_even_and_explicit_odd_is_refused(tmp_path):
    video = torch.zeros(2, 3, 31, 31)
    frames, _ = read_mp4(pixels.save_video(tmp_path / "odd.mp4", video))
    assert frames[0].shape == (186, 186, 3)  # 5x would be 155 (odd), so 6x
    with pytest.raises(UserError, match="even"):
        pixels.save_video(tmp_path / "odd1.mp4", video, scale=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"path": "v.avi"}, ".avi"),
    ({"scale": 0}, "scale"),
    ({"scale": 1.5}, "scale"),
    ({"fps": 0}, "fps"),
    ({"video": torch.zeros(3, 8, 8)}, "shape"),
    ({"video": torch.zeros(0, 3, 8, 8)}, "F >= 1"),
    ({"video": torch.zeros(2, 4, 8, 8)}, "channels"),
])
def test_save_video_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"path": "v.gif", "video": torch.zeros(2, 3, 8, 8), **kwargs}
    with pytest.raises(UserError, match=match):
        pixels.save_video(tmp_path / args.pop("path"), **args)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- grids


def cell(sheet: np.ndarray, r: int, c: int, size: int, left: int = 0) -> np.ndarray:
    """The (size + 2 * GUTTER)^2 cell at grid position (r, c) of a sheet."""
    step = size + 2 * pixels.GUTTER
    return sheet[r * step:(r + 1) * step, left + c * step:left + (c + 1) * step]


def test_contact_sheet_layout_padding_and_held_borders(tmp_path):
    g = torch.Generator().manual_seed(0)
    videos = [torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1]
    held = torch.tensor([[True, False, False, True], [False, True, False, False]])
    sheet = read_png(pixels.save_contact_sheet(tmp_path / "sheet.png", videos, held=held, scale=2))
    size, gut = 16, pixels.GUTTER
    assert sheet.shape == (2 * (size + 2 * gut), 4 * (size + 2 * gut), 3)
    for r in range(2):
        for c in range(4):
            band = cell(sheet, r, c, size)[0, :]  # top edge of the cell's border band
            colour = pixels.HELD_COLOUR if held[r, c] else pixels.BACKGROUND
            assert (band == colour).all(), (r, c)
            inside = cell(sheet, r, c, size)[gut:-gut, gut:-gut]
            if c < len(videos[r]):
                frame = np.repeat(np.repeat(pixels.to_uint8(videos[r][c]), 2, 0), 2, 1)
                assert np.array_equal(inside, frame), (r, c)
            else:  # row 1 is shorter: padded with background
                assert (inside == pixels.BACKGROUND).all(), (r, c)


def test_contact_sheet_labels_add_a_column_and_held_broadcasts(tmp_path):
    videos = torch.rand(3, 5, 1, 6, 6) * 2 - 1  # grey, a single tensor
    held = torch.tensor([True, False, False, False, True])
    plain = read_png(pixels.save_contact_sheet(tmp_path / "a.png", videos, held=held))
    labelled = read_png(pixels.save_contact_sheet(tmp_path / "b.png", videos, held=held, labels=["i2v", "b", "c"]))
    size = 6 * 11  # default scale: 6 px -> at least 64 px
    assert plain.shape == (3 * (size + 2 * pixels.GUTTER), 5 * (size + 2 * pixels.GUTTER), 3)
    left = labelled.shape[1] - plain.shape[1]
    assert left > 0 and np.array_equal(labelled[:, left:], plain)
    assert (labelled[:, :left] != pixels.BACKGROUND).any()  # some text was drawn
    for r in range(3):
        assert (cell(plain, r, 4, size)[-1] == pixels.HELD_COLOUR).all()
        assert (cell(plain, r, 2, size)[-1] == pixels.BACKGROUND).all()


@pytest.mark.parametrize("kwargs", [{"held": torch.ones(2, 3, dtype=torch.bool)}, {"labels": ["only one"]},
                                    {"scale": -1}])
def test_contact_sheet_rejects_mismatched_arguments(tmp_path, kwargs):
    with pytest.raises(UserError):
        pixels.save_contact_sheet(tmp_path / "s.png", torch.zeros(2, 4, 3, 8, 8), **kwargs)


def test_image_grid_rows_of_nrow_with_empty_tail(tmp_path):
    images = torch.rand(10, 3, 16, 16) * 2 - 1
    grid = read_png(pixels.save_image_grid(tmp_path / "g.png", images, nrow=4))
    size = 64  # default scale 4
    assert grid.shape == (3 * (size + 2 * pixels.GUTTER), 4 * (size + 2 * pixels.GUTTER), 3)
    inside = cell(grid, 2, 1, size)[pixels.GUTTER:-pixels.GUTTER, pixels.GUTTER:-pixels.GUTTER]
    assert np.array_equal(inside, np.repeat(np.repeat(pixels.to_uint8(images[9]), 4, 0), 4, 1))
    assert (cell(grid, 2, 2, size) == pixels.BACKGROUND).all()


# ----------------------------------------------------------------------------- plots


def ddpm_schedule(steps: int, frames: int, held: list[int]) -> torch.Tensor:
    """(steps + 1, F) integer times from 999 down to -1, held frames clean (-1) throughout."""
    t = torch.linspace(999, -1, steps + 1).round().long()[:, None].repeat(1, frames)
    t[:, held] = -1
    return t


def test_schedule_matrix_png_depends_on_the_schedule_and_held_frames(tmp_path):
    backend = __import__("matplotlib").get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    S = ddpm_schedule(10, 8, [0])
    held = torch.arange(8) == 0
    a = read_png(plots.save_schedule_matrix(tmp_path / "a.png", S, held, title="i2v"))
    again = read_png(plots.save_schedule_matrix(tmp_path / "again.png", S, held, title="i2v"))
    other = read_png(plots.save_schedule_matrix(tmp_path / "b.png", ddpm_schedule(10, 8, [0, 7]), held, title="i2v"))
    unheld = read_png(plots.save_schedule_matrix(tmp_path / "c.png", S, title="i2v"))
    assert a.shape[0] > 200 and a.shape[1] > 300
    assert np.array_equal(a, again)  # deterministic, so the differences below come from the data
    assert not np.array_equal(a, other) and not np.array_equal(a, unheld)
    # flow times in [0, 1], a per-cell held mask
    flow = torch.linspace(1, 0, 6)[:, None].repeat(1, 4)
    flow[:, 0] = 0
    read_png(plots.save_schedule_matrix(tmp_path / "f.png", flow, held=flow == 0))
    # plotting used its own Agg canvas: no pyplot import, no backend switch
    assert __import__("matplotlib").get_backend() == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


@pytest.mark.parametrize("S, held", [(torch.zeros(5), None), (torch.full((3, 4), float("nan")), None),
                                     (torch.zeros(3, 4), torch.ones(5, dtype=torch.bool))])
def test_schedule_matrix_rejects_bad_shapes(tmp_path, S, held):
    with pytest.raises(UserError):
        plots.save_schedule_matrix(tmp_path / "s.png", S, held)
    assert not (tmp_path / "s.png").exists()


def test_loss_curve_skips_missing_values_and_depends_on_the_data(tmp_path):
    records = [{"step": s, "loss": 2.0 * 0.99 ** s, "grad_norm": 1.0 + (s % 7)} for s in range(1, 300)]
    gaps = [dict(r) for r in records]
    gaps[10]["loss"] = float("nan")
    gaps[11]["loss"] = None  # how append_jsonl stores NaN
    del gaps[12]["loss"]
    keys = ("loss", "grad_norm")
    with_gaps = read_png(plots.save_loss_curve(tmp_path / "gaps.png", gaps, keys=keys))
    # skipping a bad value must look exactly like never having logged it
    without = [dict(r) for r in records]
    for r in without[10:13]:
        del r["loss"]
    assert np.array_equal(with_gaps, read_png(plots.save_loss_curve(tmp_path / "without.png", without, keys=keys)))
    full = read_png(plots.save_loss_curve(tmp_path / "full.png", records, keys=keys))
    assert with_gaps.shape == full.shape and not np.array_equal(with_gaps, full)


def test_loss_curve_single_record_and_no_finite_values(tmp_path):
    one = read_png(plots.save_loss_curve(tmp_path / "one.png", [{"step": 1, "loss": 0.5}]))
    none = read_png(plots.save_loss_curve(tmp_path / "none.png", [{"step": 1, "loss": float("nan")}]))
    assert not np.array_equal(one, none)
    # The lone point sits mid-axes in matplotlib's first colour (the legend is in a corner).
    h, w = one.shape[:2]
    middle = one[h // 5: 4 * h // 5, 2 * w // 5: 13 * w // 20].astype(int)
    assert (np.abs(middle - np.array([31, 119, 180])).sum(-1) < 30).sum() >= 20


# ----------------------------------------------------------------------------- JSONL / JSON


def test_jsonl_ignores_a_truncated_last_line_and_appending_repairs_it(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    for i in range(3):
        atomic.append_jsonl(path, {"step": i, "loss": 0.5 / (i + 1)})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a run killed mid-write
    assert [r["step"] for r in atomic.read_jsonl(path)] == [0, 1, 2]
    atomic.append_jsonl(path, {"step": 3, "loss": float("nan"), "lr": np.float32(0.5)})
    records = atomic.read_jsonl(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[3]["loss"] is None and records[3]["lr"] == 0.5
    assert path.read_text().endswith("\n") and "NaN" not in path.read_text()  # strict JSON lines


def test_jsonl_corruption_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2"):
        atomic.read_jsonl(path)
    with pytest.raises(UserError, match="cannot read"):
        atomic.read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="cannot read"):
        atomic.read_jsonl(tmp_path / "binary.jsonl")


def test_write_json_round_trips(tmp_path):
    path = atomic.write_json(tmp_path / "eval" / "loss.json", {"loss": {"a": 0.25, "b": float("inf")}, "p": tmp_path})
    assert json.loads(path.read_text()) == {"loss": {"a": 0.25, "b": None}, "p": str(tmp_path)}


# ----------------------------------------------------------------------------- atomicity, permissions


def test_failed_writes_leave_the_existing_file_and_no_temporary_files(tmp_path):
    video, _ = quadrant_video(2, 16, 16)
    path = pixels.save_video(tmp_path / "v.gif", video)
    before = path.read_bytes()
    for bad in (torch.full((2, 3, 16, 16), float("nan")), torch.zeros(2, 5, 16, 16)):
        with pytest.raises(UserError):
            pixels.save_video(path, bad)
    # a failure in the middle of writing the temporary file
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_bytes(b"GIF89a half a file")
        raise RuntimeError("encoder crashed")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.gif"]


def test_written_files_get_normal_permissions(tmp_path):
    reference = tmp_path / "reference"
    reference.write_text("x")
    path = atomic.write_json(tmp_path / "a.json", {})
    assert path.stat().st_mode == reference.stat().st_mode  # the umask decides, as for open()


WRITERS = {
    "video": lambda p: pixels.save_video(p / "v.gif", torch.zeros(2, 3, 8, 8)),
    "sheet": lambda p: pixels.save_contact_sheet(p / "s.png", torch.zeros(1, 2, 3, 8, 8)),
    "plot": lambda p: plots.save_loss_curve(p / "l.png", [{"step": 1, "loss": 1.0}]),
    "json": lambda p: atomic.write_json(p / "a.json", {}),
    "jsonl": lambda p: atomic.append_jsonl(p / "m.jsonl", {"step": 1}),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_writing_below_a_regular_file_is_a_user_error(tmp_path, writer):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(UserError, match=r"^cannot write .*blocker"):
        WRITERS[writer](blocker / "sub")


@pytest.mark.parametrize("writer", WRITERS)
def test_read_only_directory_is_a_user_error(tmp_path, writer):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not chmod_is_effective(locked):
            pytest.skip("directory permissions are not enforced here (running as root?)")
        with pytest.raises(UserError, match=rf"^cannot write {locked}.*Permission denied"):
            WRITERS[writer](locked)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)
