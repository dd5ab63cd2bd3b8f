"""Values the config must refuse at load time (one UserError naming the key and its range), and
bad `sample` options and files: each one line and exit status 2, never a traceback."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import torch

from fvdm.config import RANGES, Config, load_config
from fvdm.errors import UserError
from helpers import TINY, cli


@pytest.mark.parametrize("override, key", [
    ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"), ("train.lr=.inf", "train.lr"),
    ("train.weight_decay=nan", "train.weight_decay"), ("train.betas=[nan,0.999]", "train.betas[0]"),
    ("train.betas=[0.9,2.0]", "train.betas[1]"), ("train.grad_clip=nan", "train.grad_clip"),
    ("train.lr_min=nan", "train.lr_min"), ("train.lr_min=-1", "train.lr_min"),
    ("model.mlp_ratio=nan", "model.mlp_ratio"), ("model.hidden_size=-4", "model.hidden_size"),
    ("model.patch_size=0", "model.patch_size"), ("diffusion.num_timesteps=1", "diffusion.num_timesteps"),
    ("diffusion.noise_bias=nan", "diffusion.noise_bias"), ("sample.noise_scale=nan", "sample.noise_scale"),
    ("sample.eta=-1", "sample.eta"), ("sample.guidance_scale=nan", "sample.guidance_scale"),
    ("data.size=1000000000000", "data.size"), ("train.seed=-1", "train.seed"),
    ("sample.steps=1001", "sample.steps"), ("train.max_minutes=inf", "train.max_minutes"),
    ("diffusion.ptss_p=nan", "diffusion.ptss_p"), ("train.ema_decay=nan", "train.ema_decay"),
])
def test_out_of_range_values_are_refused_naming_key_and_range(override, key):
    with pytest.raises(UserError) as info:
        load_config("demo_cpu", [override])
    message = str(info.value)
    assert message.startswith(f"{key} must ") and "\n" not in message, message
    assert " in [" in message or " in (" in message or ">" in message, message  # the range is given


def test_every_numeric_field_has_a_range():
    numeric = []
    for section in dataclasses.fields(Config):
        if section.name == "name":
            continue
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            if any(a in (int, float) for a in args) and f.name != "betas" and not f.metadata.get("from_data"):
                # betas: checked per entry; the model's geometry comes from the data, not a config
                numeric.append(f"{section.name}.{f.name}")
    assert sorted(set(numeric) - set(RANGES)) == []
    load_config("demo_cpu")  # the defaults and shipped configs lie inside
    for name in ("ffs", "sky", "ucf101", "taichi"):
        load_config(name, ["data.root=videos"])


def test_non_utf8_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  lr: 1e-4  # caf\xe9\n")
    with pytest.raises(UserError, match=r"bad\.yaml is not UTF-8"):
        load_config(bad)
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


# ----------------------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fvdm.train.trainer import train

    run = tmp_path_factory.mktemp("bad") / "run"
    train(load_config("demo_cpu", TINY), run, progress=False)
    return run


@pytest.mark.parametrize("args, words", [
    (["unconditional", "--method", "foo"], ["--method", "foo"]),
    (["unconditional", "--method", "euler"], ["euler", "flow"]),
    (["unconditional", "--steps", "1001"], ["--steps", "1000"]),
    (["interpolate", "--keyframes", "0,1,2,3"], ["--keyframes", "every frame"]),
    (["interpolate", "--keyframes", ","], ["--keyframes"]),
    (["interpolate", "--keyframes", ""], ["--keyframes"]),
    (["unconditional", "--method", "ddim", "--eta", "nan"], ["--eta"]),
    (["unconditional", "--eta", "-1"], ["--eta"]),
    (["unconditional", "--guidance", "nan"], ["--guidance"]),
    (["i2v", "--video", "x.mp4"], ["--video", "i2v"]),
    (["unconditional", "--image", "x.png"], ["--image"]),
    (["unconditional", "--device", "tpu"], ["--device", "tpu"]),
    (["unconditional", "--seed", "-1"], ["--seed"]),
    (["unconditional", "--config", "x"], ["--config"]),  # an option sample does not have
])
def test_bad_sample_options_are_one_line(capsys, run_dir, tmp_path, args, words):
    code, _, err = cli(capsys, "sample", *args, "--run", str(run_dir), "--out", str(tmp_path / "o"), "--no-progress")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert "train.device" not in lines[0]


def test_a_zero_frame_video_is_named(monkeypatch):
    """A container with a video stream that decodes to no frames (the message said 'frame None')."""
    import types

    from fvdm.data import video_folder

    class NoFrames:
        streams = types.SimpleNamespace(video=[object()])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def decode(self, stream):
            return iter(())

    monkeypatch.setattr(video_folder.av, "open", lambda *args, **kwargs: NoFrames())
    with pytest.raises(UserError) as info:
        video_folder.read_frames(Path("empty.mp4"))
    assert "None" not in str(info.value) and "no decodable frames" in str(info.value)


def test_a_torchscript_detector_that_raises_is_one_user_error(tmp_path):
    """A `raise` inside TorchScript surfaces as torch.jit.Error, which is not a RuntimeError."""
    from fvdm.eval.fvd import load_i3d

    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:  # the I3D's keywords
            if x.shape[0] > 0:
                raise ValueError("detector refuses this input")
            return x.float().flatten(1)

    path = tmp_path / "i3d.pt"
    torch.jit.script(Raises()).save(str(path))
    detector = load_i3d(path)
    with pytest.raises(UserError, match="i3d.pt failed on a uint8 batch"):
        detector(torch.zeros(1, 4, 8, 8, 3, dtype=torch.uint8))


def test_checkpoint_messages(capsys, run_dir, tmp_path):
    import shutil

    import yaml

    ckpt = run_dir / "checkpoints" / "step_000000002"
    # --ckpt naming one step folder without meta.json: say so, not "train first"
    broken = tmp_path / "checkpoints" / "step_000000002"
    shutil.copytree(ckpt, broken)
    (broken / "meta.json").unlink()
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(run_dir), "--ckpt", str(broken),
                       "--out", str(tmp_path / "o"), "--no-progress")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no meta.json" in lines[0] and "train first" not in lines[0], err
    # a checkpoint of another model size: which tensors differ, in one line
    other = tmp_path / "other"
    other.mkdir()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"]["hidden_size"] = 64
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli(capsys, "sample", "unconditional", "--run", str(other), "--ckpt", str(ckpt),
                       "--out", str(tmp_path / "o"), "--no-progress")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "differ in shape" in lines[0] and "32]" in lines[0], err
    assert lines[0].rstrip().endswith(")"), err  # not cut off after "for Latte:"
