"""Objects a run is made of, built from its Config: device, schedule, model, dataset.

train, sample and eval all build through here, so a checkpoint always meets the model its
config describes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fvdm.config import Config
from fvdm.diffusion import Schedule, make_schedule
from fvdm.errors import UserError
from fvdm.models import Latte



def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """'auto' (CUDA if torch sees a GPU, else the CPU), cpu, cuda or cuda:N; `what` names the
    setting in the error message (train.device, --device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{what} {name!r} is not a device fvdm runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what} {name!r} was asked for but torch sees no CUDA device; use train.device=cpu "
                        "(or auto) in a config, --device cpu on the command line")
    return device


def build_schedule(cfg: Config) -> Schedule:
    return make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)


def num_timesteps_for_training(cfg: Config) -> int | None:
    """What sample_timesteps draws: integer DDPM steps, or None for continuous flow times."""
    return None if cfg.diffusion.schedule == "flow" else cfg.diffusion.num_timesteps


def vae_geometry(path: str) -> tuple[int, int]:
    """(downsampling factor, latent channels) of a diffusers AutoencoderKL folder, read from its
    config.json (SD's VAE: 8, 4) without loading the weights."""
    import json

    root = Path(path)
    for cfg_file in (root / "config.json", root / "vae" / "config.json"):
        if cfg_file.is_file():
            try:
                c = json.loads(cfg_file.read_text())
                return 2 ** (len(c["block_out_channels"]) - 1), int(c["latent_channels"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"data.vae: {cfg_file} is not an AutoencoderKL config ({e})") from None
    raise UserError(f"data.vae: no AutoencoderKL config.json in {root} (nor in {root / 'vae'})")


def model_input_shape(cfg: Config) -> tuple[int, int, int]:
    """(frames, channels, size) the model sees: pixels, or VAE latents when data.vae is set."""
    d = cfg.data
    if d.vae:
        factor, channels = vae_geometry(d.vae)
        if d.size % factor:
            raise UserError(f"data.size {d.size} must be divisible by the VAE's downsampling factor {factor}")
        return d.num_frames, channels, d.size // factor
    return d.num_frames, d.channels, d.size


def build_model(cfg: Config, backend: str | None = None) -> Latte:
    """The run's model: its model section with the geometry of its data (model_input_shape);
    backend, if given, replaces model.backend."""
    frames, channels, size = model_input_shape(cfg)
    m = cfg.model if backend is None else replace(cfg.model, backend=backend)
    try:
        mc = m.resolved(input_size=size, in_channels=channels, num_frames=frames)
        mc.validate()
    except ValueError as e:
        raise UserError(f"model config: {e}") from None
    return Latte(mc)


def build_dataset(cfg: Config, run_dir: Path | None = None, device: torch.device | None = None):
    """The training clips, (F, C, H, W) in [-1, 1] per item, or their cached VAE latents."""
    from fvdm import data  # PyAV etc. only when data is needed

    d = cfg.data
    kwargs = dict(num_frames=d.num_frames, seed=d.seed)
    if d.kind == "sprites":
        kwargs.update(num_videos=d.num_videos, size=d.size, channels=d.channels, **d.sprites)
    else:  # data.sprites options are for kind=sprites only; other kinds ignore them
        kwargs.update(root=d.root, frame_stride=d.frame_stride, size=d.size)
    dataset = data.build_dataset(d.kind, **kwargs)
    if cfg.model.num_classes and d.kind != "sprites":
        from fvdm.data.labels import LabelledByFolder

        dataset = LabelledByFolder(dataset, cfg.model.num_classes)
    if d.vae:
        vae = data.load_vae(d.vae, device=device or "cpu")
        cache = Path(d.latent_cache) if d.latent_cache else (run_dir or Path(".")) / "latents"
        dataset = data.LatentCache(dataset, vae, cache)
    return dataset
