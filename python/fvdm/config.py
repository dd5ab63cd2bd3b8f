"""Run configuration: typed dataclasses, read from YAML, any key overridable as `section.key=value`.

A config is five sections (model, data, diffusion, train, sample) of plain typed fields; the
model section is the model's own fvdm.models.ModelConfig, less the geometry the data set. YAML
files may give any subset; what they leave out keeps the defaults below. An unknown key, a
value of the wrong type or an out-of-range value is a UserError naming the key, so a typo never
trains the wrong model silently.

    cfg = load_config("demo_cpu", ["train.steps=200", "model.size=T/2"])

A name without a path resolves to a file shipped in fvdm/configs/ (`fvdm train --config sky`).
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fvdm.errors import UserError
from fvdm.models.config import ModelConfig, data_fields

CONFIG_DIR = Path(__file__).parent / "configs"
LR_SCHEDULES = ("constant", "cosine")  # train.lr_schedule (fvdm.train.trainer.lr_at)


@dataclass
class DataConfig:
    kind: str = "sprites"  # sprites (built-in, no download) | videos (folder of files) | frames
    root: str | None = None  # folder for videos / frames
    num_frames: int = 16
    frame_stride: int = 1
    size: int = 32  # frame height = width in pixels
    channels: int = 3
    num_videos: int = 10000  # sprites: length of the dataset
    seed: int = 0  # sprites content / random clip starts
    sprites: dict[str, Any] = field(default_factory=dict)  # extra MovingSprites options (kind=sprites only)
    vae: str | None = None  # local diffusers AutoencoderKL folder: train on its latents
    latent_cache: str | None = None  # folder for cached latents (default: <run>/latents)


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine (DDPM, T steps) | flow (rectified flow)
    num_timesteps: int = 1000
    objective: str = "eps"  # eps | v | x0 | flow
    ptss_p: float = 0.2  # probability of independent per-frame timesteps (0: scalar baseline)
    ptss_mode: str = "batch"  # batch: one coin per global batch (reference) | sample: per clip
    noise_bias: float = 1.0  # > 1 draws training times skewed toward high noise (1: uniform, the paper)
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weights (Hang et al. 2023; 5 is theirs); None: unweighted
    # Share of clips trained with a clean prefix of 1..F-1 frames held (time "clean", out of the
    # loss), as extension and image-to-video sample them; 0: PTSS alone (the paper)
    clean_prefix_p: float = 0.0
    # With model.learn_sigma, which frames at t = 0 take the VB term's decoder NLL: frame (each
    # frame at 0) | clip (the official rule: every frame of the clip, only when all are at 0)
    vb_t0: str = "frame"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global batch; split evenly over processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup, to lr_min)
    lr_min: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None: off
    grad_clip_after: int = 0  # clip only from this step on (the reference switches it on late)
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)): useful on short runs
    # auto: bf16 autocast where the hardware has native bf16 matmuls (CPU: AVX512-BF16 or AMX;
    # CUDA: Ampere on), else fp32 (fvdm.precision) | fp32 | bf16 (autocast)
    precision: str = "auto"
    seed: int = 3407
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0  # write a sample grid every N steps (0: only at the end)
    sample_videos: int = 4
    sample_steps: int = 25
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training in one invocation


@dataclass
class SampleConfig:
    method: str | None = None  # ddpm | ddim | euler; None: ddim for DDPM schedules, euler for flow
    steps: int = 50
    # DDPM timesteps of the steps (fvdm.diffusion.spacing): floor (980, 960, ..., 0 for 50) |
    # official (the official sample scripts' respacing "50": 999, 979, ..., 20, 0) | official-ddim ("ddim50")
    spacing: str = "floor"
    eta: float = 0.0
    noise_scale: float = 1.0  # temperature of each step's fresh noise (ddpm, ddim eta > 0); 1: exact
    clip_x0: float | None = None  # clamp each step's x0 estimate to [-c, c]; None (the reference): no clamp
    guidance_scale: float = 1.0
    # temporal guidance (diffusion.guidance.temporal_guidance), 0: off; each nonzero scale adds one
    # network call a step. stg_scale: skip guidance, prediction + s * (prediction - the same
    # network with its frames kept apart): frames that agree. order_scale: frame-order guidance,
    # + s * (prediction - the network on the frames in a random order): frames that move.
    stg_scale: float = 0.0
    order_scale: float = 0.0
    num_videos: int = 4  # videos a task
    unconditional_videos: int | None = None  # videos of the unconditional task; None: num_videos
    use_ema: bool = True
    fps: int = 8
    seed: int = 0


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        d = _plain(asdict(self))
        for name in data_fields():  # set by the data when the model is built, never here
            del d["model"][name]
        return d

    def validate(self) -> Config:
        from fvdm.data import DATASETS
        from fvdm.diffusion import METHODS, OBJECTIVES, PTSS_MODES, SCHEDULES, SPACINGS, VB_T0_RULES
        from fvdm.models import GELU_FORMS
        from fvdm.ops import BACKENDS
        from fvdm.precision import PRECISIONS

        _check_choice("data.kind", self.data.kind, tuple(DATASETS))
        _check_choice("diffusion.schedule", self.diffusion.schedule, SCHEDULES)
        _check_choice("diffusion.objective", self.diffusion.objective, OBJECTIVES)
        _check_choice("diffusion.ptss_mode", self.diffusion.ptss_mode, PTSS_MODES)
        _check_choice("train.lr_schedule", self.train.lr_schedule, LR_SCHEDULES)
        _check_choice("train.precision", self.train.precision, PRECISIONS)
        _check_choice("model.backend", self.model.backend, BACKENDS)
        _check_choice("model.gelu", self.model.gelu, GELU_FORMS)
        _check_choice("diffusion.vb_t0", self.diffusion.vb_t0, VB_T0_RULES)
        _check_choice("sample.spacing", self.sample.spacing, SPACINGS)
        if self.sample.method is not None:
            _check_choice("sample.method", self.sample.method, METHODS)
        flow = self.diffusion.schedule == "flow"
        if flow != (self.diffusion.objective == "flow"):
            raise UserError("diffusion.objective 'flow' goes with diffusion.schedule 'flow' and only with it "
                            f"(got schedule={self.diffusion.schedule!r}, objective={self.diffusion.objective!r})")
        if flow and self.model.learn_sigma:
            raise UserError("model.learn_sigma needs a DDPM schedule (linear or cosine), not flow")
        if self.data.kind != "sprites" and not self.data.root:
            raise UserError(f"data.root is required for data.kind={self.data.kind!r}: the folder of your videos")
        if self.data.kind != "sprites" and self.data.channels != 3:
            raise UserError(f"data.channels must be 3 for data.kind={self.data.kind!r} (RGB video)")
        if self.data.kind == "sprites" and self.model.num_classes:
            raise UserError("model.num_classes > 0 needs labelled data (data.kind videos or frames, one folder per class)")
        for key, bounds in RANGES.items():
            _check_number(key, self.get(key), *bounds)
        for i, beta in enumerate(self.train.betas):
            _check_number(f"train.betas[{i}]", beta, 0.0, 1.0, False, True)
        if self.train.lr_schedule == "cosine" and self.train.lr_min > self.train.lr:
            raise UserError(f"train.lr_min must not exceed train.lr ({self.train.lr:g}), got {self.train.lr_min:g}")
        if self.diffusion.min_snr_gamma is not None and self.model.learn_sigma:
            raise UserError("diffusion.min_snr_gamma weights the mean loss only: it cannot be combined with "
                            "model.learn_sigma (whose VB term has its own weighting)")
        if not flow:  # DDPM samplers step on a subsequence of the T training steps
            for key in ("sample.steps", "train.sample_steps"):
                if self.get(key) > self.diffusion.num_timesteps:
                    raise UserError(f"{key} must lie in [1, {self.diffusion.num_timesteps}] (diffusion.num_timesteps), "
                                    f"got {self.get(key)}")
        return self

    def get(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)


# The valid range of every numeric field: key -> (low, high, low open, high open); None: no
# bound on that side. Floats must also be finite. Checked by Config.validate, so a value outside
# is refused at load time with the key and the range, before anything is built or written.
# Upper bounds on sizes and counts are far beyond any real use; they keep a typo (1e12) from
# reaching an allocation or an integer overflow.
_BIG = 10**9
_SEED = (0, 2**32 - 1)
RANGES: dict[str, tuple] = {
    "model.patch_size": (1, 1024), "model.hidden_size": (1, 65536), "model.depth": (1, 1024),
    "model.num_heads": (1, 1024), "model.mlp_ratio": (0.0, 64.0, True, False),
    "model.num_classes": (0, 10**6), "model.class_dropout_prob": (0.0, 1.0),
    "model.conv_head": (0, 65536), "model.conv_head_layers": (1, 64),
    "data.num_frames": (1, 4096), "data.frame_stride": (1, 10**4), "data.size": (1, 8192),
    "data.channels": (1, 3), "data.num_videos": (1, _BIG), "data.seed": _SEED,
    "diffusion.num_timesteps": (2, 10**6), "diffusion.ptss_p": (0.0, 1.0),
    "diffusion.noise_bias": (0.0, None, True), "diffusion.min_snr_gamma": (0.0, None, True),
    "diffusion.clean_prefix_p": (0.0, 1.0, False, True),
    "train.steps": (1, _BIG), "train.batch_size": (1, 65536), "train.lr": (0.0, None),
    "train.weight_decay": (0.0, None), "train.warmup_steps": (0, _BIG), "train.lr_min": (0.0, None),
    "train.grad_clip": (0.0, None, True), "train.grad_clip_after": (0, _BIG), "train.ema_decay": (0.0, 1.0),
    "train.seed": _SEED, "train.log_every": (1, _BIG), "train.ckpt_every": (1, _BIG),
    "train.keep_checkpoints": (0, _BIG), "train.sample_every": (0, _BIG), "train.sample_videos": (1, 10**4),
    "train.sample_steps": (1, 10**6), "train.max_minutes": (0.0, None, True),
    "sample.steps": (1, 10**6), "sample.eta": (0.0, 1.0), "sample.noise_scale": (0.0, None),
    "sample.clip_x0": (0.0, None, True), "sample.guidance_scale": (0.0, None), "sample.stg_scale": (0.0, None),
    "sample.order_scale": (0.0, None), "sample.num_videos": (1, 10**4),
    "sample.unconditional_videos": (1, 10**4), "sample.fps": (1, 1000), "sample.seed": _SEED,
}


def _check_number(key: str, value: Any, lo: float | None, hi: float | None, lo_open: bool = False,
                  hi_open: bool = False) -> None:
    """UserError naming `key` and its range unless `value` (None: unset, fine) lies in it."""
    if value is None:
        return
    ok = (isinstance(value, int) or math.isfinite(value)) and (lo is None or (value > lo if lo_open else value >= lo)) and (
        hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        raise UserError(f"{key} must be {_range_text(lo, hi, lo_open, hi_open, isinstance(value, int))}, "
                        f"got {value!r}")


def _range_text(lo, hi, lo_open: bool, hi_open: bool, integer: bool) -> str:
    kind = "an integer" if integer else "a finite number"
    fmt = lambda b: f"{b}" if isinstance(b, int) else f"{b:g}"  # noqa: E731
    if hi is None:
        return f"{kind} {'>' if lo_open else '>='} {fmt(lo)}"
    return f"{kind} in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"


# ----------------------------------------------------------------------------- loading


def config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (demo_cpu, ffs, sky, ucf101, taichi)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if p.suffix not in (".yaml", ".yml") and not p.exists() and shipped.is_file():
        return shipped
    if p.is_dir():
        raise UserError(f"config {p} is a directory; give a YAML file (a run's config is <run>/config.yaml)")
    if p.suffix in (".yaml", ".yml") or p.exists():
        raise UserError(f"config file {p} does not exist")
    raise UserError(f"no config {str(name_or_path)!r}: give a YAML path or one of {shipped_configs()}")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (if given) <- `section.key=value` overrides, then validated."""
    data = read_config_file(config_path(name_or_path)) if name_or_path is not None else {}
    cfg = from_dict(data)
    apply_overrides(cfg, overrides)
    return cfg.validate()


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config file's mapping of sections (not yet checked); UserError if unreadable."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot read config {path}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    for section, values in data.items():
        if section == "name":
            cfg.name = str(values)
            continue
        target = _section(cfg, section)
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            _set(target, f"{section}.{key}", key, value)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Each override is `section.key=value`; the value is parsed as YAML (3e-4, true, null, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key == "name":
            cfg.name = raw
            continue
        if key.count(".") != 1:
            raise UserError(f"override key {key!r} must be section.key, e.g. train.lr; sections: {_sections()}")
        section, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set(_section(cfg, section), key, name, value)
    return cfg


def save_config(cfg: Config, path: Path) -> bool:
    """Write `cfg` to `path` atomically (temporary file, fsync, rename), and only if the file
    does not already hold exactly this config; True if it was written. A failed write (full
    disk) leaves the old file whole and raises UserError."""
    from fvdm.io import atomic
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    try:
        if path.read_bytes() == text.encode("utf-8"):
            return False
    except OSError:
        pass  # absent or unreadable: write it
    atomic.write_text(path, text)
    return True


# ----------------------------------------------------------------------------- typed assignment


def _sections() -> list[str]:
    return [f.name for f in fields(Config) if f.name != "name"]


def _section(cfg: Config, section: str) -> Any:
    if section not in _sections():
        raise UserError(f"unknown config section {section!r}{_did_you_mean(section, _sections())}; "
                        f"sections: {_sections()}")
    return getattr(cfg, section)


# Keys that configs written by earlier versions hold: the value every one of them has is
# accepted and ignored (so their runs still resume), any other is refused with the reason.
RETIRED = {
    "data.num_workers": (0, "clips are made in the training process, as a pure function of (data.seed, step); "
                            "there are no loader workers"),
}


def _set(target: Any, key: str, name: str, value: Any) -> None:
    if key in RETIRED:
        accepted, reason = RETIRED[key]
        if value == accepted:
            return
        raise UserError(f"{key} is no longer a setting ({reason}); remove it from the config")
    hints = typing.get_type_hints(type(target))
    if isinstance(target, ModelConfig) and name in data_fields():
        raise UserError(f"{key} is not set in a config: the model takes it from the data "
                        "(data.size, data.channels or the VAE's, data.num_frames)")
    if name not in hints:
        names = [f.name for f in fields(target) if not (isinstance(target, ModelConfig) and f.name in data_fields())]
        raise UserError(f"unknown config key {key!r}{_did_you_mean(name, names)}; "
                        f"{key.split('.')[0]} has: {', '.join(names)}")
    setattr(target, name, _coerce(key, value, hints[name]))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise UserError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


__all__ = [
    "Config", "ModelConfig", "DataConfig", "DiffusionConfig", "TrainConfig", "SampleConfig",
    "load_config", "read_config_file", "from_dict", "apply_overrides", "save_config", "config_path", "shipped_configs",
    "CONFIG_DIR",
]
