"""The CLI on bad input: a one-line error naming the problem, a non-zero exit status, no
traceback, and nothing already written damaged. Plus the happy path of `sample` per task."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fvdm.config import load_config
from fvdm.train.trainer import train
from helpers import TINY, cli


def assert_one_line_error(code: int, err: str, *words: str):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    train(load_config("demo_cpu", TINY), run, progress=False)
    return run


def write_mp4(path: Path, frames: int, size: int) -> None:
    from fvdm.io import pixels
    video = torch.linspace(-1, 1, frames)[:, None, None, None].expand(frames, 3, size, size)
    pixels.save_video(path, video, fps=4, scale=1)


def test_sample_every_task_writes_outputs(capsys, run_dir, tmp_path):
    out = tmp_path / "samples"
    code, stdout, err = cli(capsys, "sample", "all", "--run", str(run_dir), "--out", str(out), "--no-progress",
                            "--frames", "6", "--stg", "1.0", "--order", "1.0")  # temporal guidance through every sampler
    assert code == 0, err
    for task in ("unconditional", "i2v", "interpolate", "extend", "long", "rolling"):
        files = {p.name for p in (out / task).iterdir()}
        assert {"contact_sheet.png", "schedule.png", "video_000.mp4", "video_000.gif"} <= files, (task, files)
        # sample.unconditional_videos=2 (TINY) for unconditional, sample.num_videos=1 for the rest
        assert len([f for f in files if f.endswith(".mp4")]) == (2 if task == "unconditional" else 1), (task, files)
    assert stdout.count("sprite tracker reads") == 6  # sprite runs say how many videos read as coherent
    from PIL import Image

    sheet = np.asarray(Image.open(out / "long" / "contact_sheet.png"))
    assert sheet.shape[1] > sheet.shape[0]  # 6 frames in a row


def test_sample_with_replacement_conditioning(capsys, run_dir, tmp_path):
    """--conditioning replace (scalar models): the given frames still come out exactly."""
    from PIL import Image

    img = tmp_path / "first.png"
    frame = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(frame).save(img)
    out = tmp_path / "i2v"
    code, _, err = cli(capsys, "sample", "i2v", "--run", str(run_dir), "--image", str(img), "--conditioning",
                       "replace", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert (out / "contact_sheet.png").is_file() and (out / "video_000.mp4").is_file()


def test_self_conditioning_run_trains_and_samples(capsys, tmp_path):
    run = tmp_path / "sc"
    train(load_config("demo_cpu", TINY + ["model.self_condition=true", "sample.clip_x0=1.0"]), run, progress=False)
    out = tmp_path / "samples"
    code, _, err = cli(capsys, "sample", "all", "--run", str(run), "--out", str(out), "--no-progress", "--frames", "6")
    assert code == 0, err
    assert all((out / task / "contact_sheet.png").is_file() for task in ("unconditional", "i2v", "long"))


def test_unknown_config_key_and_bad_option(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--out", str(tmp_path / "r"), "train.stpes=3")
    assert_one_line_error(code, err, "train.stpes", "steps")
    assert not (tmp_path / "r").exists()
    code, _, err = cli(capsys, "train", "--config", "nonexistent_cfg")
    assert_one_line_error(code, err, "nonexistent_cfg")
    code, _, err = cli(capsys, "sample", "dance", "--run", "x")
    assert_one_line_error(code, err, "dance")
    code, _, err = cli(capsys, "sample", "long", "--frames", "0", "--run", "x")
    assert_one_line_error(code, err, "--frames")
    code, _, err = cli(capsys, "train", "--bogus-flag")
    assert_one_line_error(code, err, "--bogus-flag")
    code, _, err = cli(capsys, "sample", "i2v", "--conditioning", "inpaint", "--run", "x")
    assert_one_line_error(code, err, "--conditioning", "inpaint")
    code, _, err = cli(capsys, "sample", "unconditional", "--noise-scale", "-0.5", "--run", "x")
    assert_one_line_error(code, err, "--noise-scale", "-0.5")
    code, _, err = cli(capsys, "train", "--out", str(tmp_path / "r"), "sample.noise_scale=-1")
    assert_one_line_error(code, err, "sample.noise_scale")
    code, _, err = cli(capsys, "sample", "unconditional", "--stg", "nan", "--run", "x")
    assert_one_line_error(code, err, "--stg", "nan")
    code, _, err = cli(capsys, "train", "--out", str(tmp_path / "r"), "sample.stg_scale=-1")
    assert_one_line_error(code, err, "sample.stg_scale")


def test_missing_and_unreadable_inputs(capsys, run_dir, tmp_path):
    before = tree_digest(run_dir)
    code, _, err = cli(capsys, "sample", "i2v", "--run", str(run_dir), "--image", str(tmp_path / "nope.png"))
    assert_one_line_error(code, err, "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    code, _, err = cli(capsys, "sample", "i2v", "--run", str(run_dir), "--image", str(bad))
    assert_one_line_error(code, err, "bad.png")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(2000))
    code, _, err = cli(capsys, "sample", "extend", "--run", str(run_dir), "--video", str(corrupt))
    assert_one_line_error(code, err, "corrupt.mp4")
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(tmp_path / "no_run"))
    assert_one_line_error(code, err, "no_run")
    assert tree_digest(run_dir) == before


def test_wrong_sizes_and_indices(capsys, run_dir, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(big)
    code, _, err = cli(capsys, "sample", "i2v", "--run", str(run_dir), "--image", str(big), "--no-progress")
    assert_one_line_error(code, err, "24x20", "8x8")
    wrong = tmp_path / "wrong.mp4"
    write_mp4(wrong, 4, 12)  # not a whole multiple of 8 (those are scaled down)
    code, _, err = cli(capsys, "sample", "extend", "--run", str(run_dir), "--video", str(wrong), "--no-progress")
    assert_one_line_error(code, err, "12x12")
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, 4, 8)
    code, _, err = cli(capsys, "sample", "interpolate", "--run", str(run_dir), "--video", str(clip),
                       "--keyframes", "0,9", "--no-progress")
    assert_one_line_error(code, err, "9")
    code, _, err = cli(capsys, "sample", "interpolate", "--run", str(run_dir), "--keyframes", "0,x")
    assert_one_line_error(code, err, "--keyframes")
    code, _, err = cli(capsys, "sample", "extend", "--run", str(run_dir), "--video", str(clip), "--frames", "3",
                       "--no-progress")
    assert_one_line_error(code, err, "--frames 3")


def test_corrupt_checkpoint_is_reported(capsys, run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpt = sorted((copy / "checkpoints").glob("step_*"))[-1]
    (ckpt / "state.pt").write_bytes(b"garbage")
    code, _, err = cli(capsys, "train", "--out", str(copy), "--resume", *TINY, "train.steps=4")
    assert code != 0 and "Traceback" not in err
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 10)
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(copy), "--ckpt", str(ckpt))
    assert_one_line_error(code, err, "corrupt", str(ckpt.name))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; chmod cannot make a folder unwritable")
def test_unwritable_output(capsys, run_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(run_dir), "--out", str(ro / "x"))
    assert_one_line_error(code, err, str(ro))


def test_output_path_under_a_file(capsys, run_dir, tmp_path):
    """Writing below a regular file fails the same way for root and everyone else."""
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(run_dir), "--out", str(blocker / "x"),
                       "--no-progress")
    assert_one_line_error(code, err, "cannot write", "file")
    assert blocker.read_text() == "keep me"
    code, _, err = cli(capsys, "train", "--out", str(blocker / "run"), *TINY)
    assert_one_line_error(code, err, str(blocker))
    assert blocker.read_text() == "keep me"


def test_eval_loss_writes_a_table(capsys, run_dir):
    import json

    code, out, err = cli(capsys, "eval", "loss", "--run", str(run_dir), "--clips", "4")
    assert code == 0, err
    result = json.loads((run_dir / "eval" / "loss.json").read_text())
    losses = result["loss"]
    assert len(losses) == 6 and all(v > 0 for v in losses.values())
    assert result["step"] == 2 and "per-frame independent t" in losses
