"""Output writers: pixel convention, videos read back, contact-sheet layout, plots, JSONL, and
atomicity (a failed write leaves the old file as it was)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fvdm import media
from fvdm.errors import UserError

RED, BLUE = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])


def flat_video(colours: list[torch.Tensor], size: int = 16) -> torch.Tensor:
    """(F, 3, size, size) video whose frame f is one flat colour."""
    return torch.stack([c[:, None, None].expand(3, size, size) for c in colours])


def test_to_uint8_matches_the_reference_convention():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.0])[:, None, None, None].expand(5, 1, 1, 1)
    assert media.to_uint8(x).reshape(5, 3)[:, 0].tolist() == [0, 128, 255, 0, 255]
    u = torch.randint(0, 255, (2, 4, 4, 3), dtype=torch.uint8)
    assert np.array_equal(media.to_uint8(u), u.numpy())
    with pytest.raises(UserError, match="NaN"):
        media.to_uint8(torch.full((1, 3, 2, 2), float("nan")))


def test_mp4_and_gif_read_back(tmp_path):
    import av

    video = flat_video([RED, BLUE, BLUE, RED, BLUE])
    mp4 = media.save_video(tmp_path / "v.mp4", video, fps=5)
    gif = media.save_video(tmp_path / "v.gif", video, fps=5)
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (128, 128, 3)  # upscaled 8x to be watchable
    assert frames[0][64, 64, 0] > 200 and frames[0][64, 64, 2] < 60  # red
    assert frames[2][64, 64, 2] > 200 and frames[2][64, 64, 0] < 60  # blue
    im = Image.open(gif)  # GIF stores repeated frames once, with their durations summed
    assert im.n_frames == 4 and im.size == (128, 128)
    durations = []
    for k in range(im.n_frames):
        im.seek(k)
        durations.append(im.info["duration"])
    assert durations == [200, 400, 200, 200]
    im.seek(1)
    r, g, b = im.convert("RGB").getpixel((10, 10))
    assert b > 200 and r < 60
    assert media.save_video(tmp_path / "s.gif", video, scale=1) and Image.open(tmp_path / "s.gif").size == (16, 16)
    with pytest.raises(UserError, match=".avi"):
        media.save_video(tmp_path / "v.avi", video)


def test_contact_sheet_layout_and_held_borders(tmp_path):
    videos = torch.stack([flat_video([RED, BLUE, RED], 8), flat_video([BLUE, BLUE, RED], 8)])
    held = torch.tensor([True, False, False])
    path = media.save_contact_sheet(tmp_path / "sheet.png", videos, held=held, scale=2)
    a = np.asarray(Image.open(path).convert("RGB"))
    cell = 8 * 2 + 2 * media.GUTTER
    assert a.shape == (2 * cell, 3 * cell, 3)
    assert tuple(a[0, 0]) == media.HELD_COLOUR  # frame 0 was given: amber border
    assert tuple(a[0, cell]) != media.HELD_COLOUR  # frame 1 was generated
    centre = cell // 2
    assert tuple(a[centre, centre]) == (255, 0, 0) and tuple(a[cell + centre, centre]) == (0, 0, 255)


def test_schedule_matrix_and_loss_curve(tmp_path):
    from fvdm.diffusion import ddpm_ladder, image_to_video, rolling_diagonal

    S1, h1 = image_to_video(ddpm_ladder(10), 8)
    S2, h2 = rolling_diagonal(ddpm_ladder(10), 8, lag=2)
    p1 = media.save_schedule_matrix(tmp_path / "a.png", S1, h1)
    p2 = media.save_schedule_matrix(tmp_path / "b.png", S2, h2)
    a1, a2 = np.asarray(Image.open(p1)), np.asarray(Image.open(p2))
    assert a1.ndim == 3 and (a1.shape != a2.shape or not np.array_equal(a1, a2))
    records = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(50)] + [{"step": 50, "loss": float("nan")}]
    curve = media.save_loss_curve(tmp_path / "loss.png", records)
    assert Image.open(curve).size[0] > 100
    media.save_loss_curve(tmp_path / "one.png", records[:1])


def test_jsonl_ignores_a_truncated_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    for i in range(3):
        media.append_jsonl(p, {"step": i, "loss": 0.5})
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')  # a run killed mid-write
    assert [r["step"] for r in media.read_jsonl(p)] == [0, 1, 2]


def test_failed_write_keeps_the_old_file_and_bad_paths_are_reported(tmp_path):
    good = flat_video([RED, BLUE])
    path = media.save_video(tmp_path / "v.gif", good)
    before = path.read_bytes()
    with pytest.raises(UserError):
        media.save_video(path, torch.full((2, 3, 16, 16), float("nan")))
    with pytest.raises(UserError):
        media.save_video(path, torch.zeros(2, 5, 16, 16))  # 5 channels
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.gif"]  # no temporary files left behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        media.write_json(blocker / "out.json", {"a": 1})
    assert media.write_json(tmp_path / "d" / "out.json", {"a": 1}).read_text().strip().startswith("{")
