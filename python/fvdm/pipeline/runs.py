"""A trained run on disk: its config and a checkpoint -> a model ready to sample, plus the
sampling outputs (videos, contact sheet, schedule-matrix plot) that `fvdm sample` writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fvdm.io import pixels, plots
from fvdm.pipeline.build import build_dataset, build_model, resolve_device
from fvdm.config import Config, from_dict, load_config
from fvdm.errors import CheckpointError, UserError
from fvdm.pipeline.generate import Codec, Generated
from fvdm.train.checkpoint import find_latest, is_step_dir, load_checkpoint, state_dict_mismatch


@dataclass
class LoadedRun:
    cfg: Config
    model: torch.nn.Module
    checkpoint: Path
    step: int
    codec: Codec
    ema: bool  # the EMA weights were loaded (else the raw ones)


def load_run(run: str | Path, checkpoint: str | Path | None = None, use_ema: bool | None = None,
             device: str = "auto") -> LoadedRun:
    """run: a run directory (its config.yaml; the latest good checkpoint unless `checkpoint`)
    or a checkpoint directory (the config stored in its meta.json). use_ema: load the EMA
    weights (None: as the config's sample.use_ema says; the raw ones where none were saved)."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run or checkpoint directory")
    target = Path(checkpoint) if checkpoint is not None else run
    if target.is_dir() and not (target / "meta.json").exists() and not is_step_dir(target):
        latest = find_latest(target)
        if latest is None:
            raise CheckpointError(f"{target} has no complete checkpoint (train first, or give --ckpt)")
        target = latest
    ckpt = load_checkpoint(target, map_location="cpu")
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        cfg = load_config(cfg_file)
    elif ckpt.meta.get("config"):
        cfg = from_dict(ckpt.meta["config"]).validate()
    else:
        raise UserError(f"no config.yaml in {run} and none stored in {ckpt.path}")
    dev = resolve_device(device, "--device")
    model = build_model(cfg)
    ema = (cfg.sample.use_ema if use_ema is None else use_ema) and ckpt.ema is not None
    weights = ckpt.ema if ema else ckpt.model
    mismatch = state_dict_mismatch(model, weights)
    if mismatch:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model configured in "
                              f"{cfg_file if cfg_file.is_file() else 'its meta.json'} (another model size?): {mismatch}")
    model.load_state_dict(weights)
    model = model.to(dev).eval()
    codec = Codec()
    if cfg.data.vae:
        from fvdm.data import load_vae

        codec = Codec(load_vae(cfg.data.vae, device=dev))
    return LoadedRun(cfg, model, ckpt.path, int(ckpt.meta.get("step", ckpt.step)), codec, ema)


# ----------------------------------------------------------------------------- conditioning inputs


def image_condition(path: str | Path, cfg: Config) -> torch.Tensor:
    """An image file -> (1, 1, C, H, W) in [-1, 1]; it must have the training frame size."""
    from fvdm.data import read_image

    img = read_image(path)  # (H, W, 3) uint8
    return _frames_to_model(img[None], cfg, str(path))[None]


def video_condition(path: str | Path, cfg: Config, max_frames: int | None = None) -> torch.Tensor:
    """A video file or frame folder -> (1, k, C, H, W) in [-1, 1], its first max_frames frames."""
    from fvdm.data import read_video

    frames = read_video(path)  # (F, H, W, 3) uint8
    if max_frames is not None:
        frames = frames[:max_frames]
    return _frames_to_model(frames, cfg, str(path))[None]


def held_out_dataset(cfg: Config, num_frames: int):
    """The run's own data kind with a held-out seed (data.seed + 1), in pixels, num_frames a clip."""
    held_out = from_dict(cfg.to_dict())
    held_out.data.seed = cfg.data.seed + 1
    held_out.data.vae = None  # pixels; the sampler encodes them
    held_out.data.num_frames = num_frames
    return build_dataset(held_out)


def data_condition(cfg: Config, num_frames: int, num_clips: int = 1) -> torch.Tensor:
    """Clips from the held-out dataset: conditioning for i2v / interpolate / extend when no file
    is given, and held-out evaluation data. (num_clips, num_frames, C, H, W) in [-1, 1]."""
    dataset = held_out_dataset(cfg, num_frames)
    clips = [dataset[i % len(dataset)] for i in range(num_clips)]
    return torch.stack([c[0] if isinstance(c, (tuple, list)) else c for c in clips]).float()


def _frames_to_model(frames: torch.Tensor, cfg: Config, name: str) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (F, C, H, W) in [-1, 1], checked against the data size.
    Frames k times the data size on both sides (k an integer: as fvdm writes its own videos,
    upscaled nearest-neighbour) are scaled back down by averaging k x k blocks, so a sampled
    video or GIF can be given back as conditioning."""
    Fr, H, W, _ = frames.shape
    size = cfg.data.size
    k = H // size
    if (H, W) != (k * size, k * size) or k < 1:
        raise UserError(f"{name} is {W}x{H} pixels but the model was trained on {size}x{size}: resize it to that "
                        f"(or to a whole multiple of it)")
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if k > 1:
        x = torch.nn.functional.avg_pool2d(x, k)
    if cfg.data.channels == 1:
        x = x.mean(dim=1, keepdim=True)
    return x


# ----------------------------------------------------------------------------- outputs


def write_outputs(out_dir: Path, result: Generated, fps: int = 8) -> dict[str, list[Path]]:
    """videos/video_<i>.mp4 and .gif, contact_sheet.png, schedule.png."""
    written: dict[str, list[Path]] = {"videos": [], "images": []}
    for i, video in enumerate(result.video):
        for ext in ("mp4", "gif"):
            p = out_dir / f"video_{i:03d}.{ext}"
            pixels.save_video(p, video, fps=fps)
            written["videos"].append(p)
    sheet = out_dir / "contact_sheet.png"
    pixels.save_contact_sheet(sheet, result.video, held=result.held)
    sched = out_dir / "schedule.png"
    plots.save_schedule_matrix(sched, result.S, held=result.S_held,
                               title=f"{result.task}: per-frame noise level per sampler step")
    written["images"] += [sheet, sched]
    return written
