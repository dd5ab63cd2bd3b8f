"""Generation with a trained model: the zero-shot tasks end to end, in pixel space.

generate(model, cfg, task, ...) turns a task name and its conditioning frames into a schedule
matrix (fvdm.diffusion.tasks), runs the sampler, and returns the videos in [-1, 1] pixels
(encoding the given frames with the VAE and decoding the result when the model works on
latents). Used by `fvdm sample`, the trainer's preview grids and evaluation.

Tasks: unconditional, i2v (frame 0 given), interpolate (keyframes given, default first and
last), extend (a given clip continued to `total_frames`), long (unconditional start, then
sliding windows to `total_frames`), rolling (diagonal schedule: later frames noisier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fvdm.pipeline.build import build_schedule
from fvdm.config import Config
from fvdm.diffusion import (
    classifier_free_guidance,
    ladder_for,
    long_video,
    rolling_diagonal,
    sample,
    task_matrix,
    temporal_guidance,
    unconditional,
    window_sampler,
)
from fvdm.errors import UserError

TASKS = ("unconditional", "i2v", "interpolate", "extend", "long", "rolling")


@dataclass
class Generated:
    video: torch.Tensor  # (B, F, C, H, W) pixels in [-1, 1] (float32, CPU)
    held: torch.Tensor  # (F,) bool: frames that were given, not generated
    S: torch.Tensor  # the schedule matrix (steps + 1, window) that was run (the first window's for long/extend)
    S_held: torch.Tensor  # (window,) bool: the frames S holds clean
    task: str


class Codec:
    """Pixels <-> what the model sees: identity, or the VAE's latents (data.vae)."""

    def __init__(self, vae=None):
        self.vae = vae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        from fvdm.data import encode_video

        return encode_video(self.vae, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z
        from fvdm.data import decode_video

        return decode_video(self.vae, z)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cfg: Config,
    task: str = "unconditional",
    *,
    num_videos: int = 4,
    steps: int | None = None,
    method: str | None = None,
    eta: float | None = None,
    noise_scale: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    condition: torch.Tensor | None = None,
    keyframe_indices: list[int] | None = None,
    total_frames: int | None = None,
    overlap: int | None = None,
    lag: int = 1,
    labels: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    stg_scale: float | None = None,
    order_scale: float | None = None,
    codec: Codec | None = None,
    conditioning: str = "hold",
    callback: Callable[[int, int], None] | None = None,
) -> Generated:
    """condition: pixels in [-1, 1], (B or 1, k, C, H, W): the image (k=1) for i2v, the full
    window for interpolate (frames at keyframe_indices are used), the clip to continue for
    extend. conditioning: "hold" (FVDM: given frames at the clean time) or "replace" (how a
    scalar-timestep model does it: given frames re-noised to the current time every step).
    callback(done, total) reports sampler steps."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    sc = cfg.sample
    steps = steps or sc.steps
    eta = sc.eta if eta is None else eta
    noise_scale = sc.noise_scale if noise_scale is None else noise_scale
    method = method or sc.method
    codec = codec or Codec()
    device = torch.device(device)
    schedule = build_schedule(cfg).to(device)
    model = model.eval()
    Fr = model.config.num_frames
    C, H = model.config.in_channels, model.config.input_size
    shape = (num_videos, Fr, C, H, H)
    scales = {}
    for key, given_scale in (("stg_scale", stg_scale), ("order_scale", order_scale)):
        scales[key] = getattr(sc, key) if given_scale is None else given_scale
        if not (math.isfinite(scales[key]) and scales[key] >= 0):
            raise UserError(f"the guidance scale sample.{key} must be a finite number >= 0, got {scales[key]}")
    # the frame orders of frame-order guidance: their own stream, so the noise does not depend on them
    orders = torch.Generator().manual_seed(seed)
    model_fn = temporal_guidance(_model_fn(model, cfg, num_videos, labels, guidance_scale, device),
                                 scales["stg_scale"], scales["order_scale"], orders)
    g = torch.Generator(device).manual_seed(seed)
    try:
        ladder = ladder_for(schedule, steps, sc.spacing)
    except ValueError as e:  # steps the spacing cannot give (more than T, no exact ddim stride)
        raise UserError(f"sample.steps / sample.spacing: {e}") from None
    kwargs = dict(method=method, objective=cfg.diffusion.objective, eta=eta, noise_scale=noise_scale,
                  learn_sigma=cfg.model.learn_sigma,
                  generator=g, device=device, ops=model.ops, conditioning=conditioning,
                  self_condition=model.config.self_condition,
                  clip_x0=cfg.sample.clip_x0 if cfg.data.vae is None else None)  # latents are not in [-1, 1]

    def given() -> torch.Tensor:
        """The conditioning frames in model space, (num_videos, k, C, H, W)."""
        if condition is None:
            raise UserError(f"task {task!r} needs conditioning frames (an image or a video)")
        want = (cfg.data.channels, cfg.data.size, cfg.data.size)
        if condition.dim() != 5 or tuple(condition.shape[2:]) != want:
            raise UserError(f"conditioning frames must be (B, k, {want[0]}, {want[1]}, {want[2]}) pixels like the "
                            f"training data, got {tuple(condition.shape)}")
        z = codec.encode(condition.to(device, torch.float32))
        return z.expand(num_videos, *z.shape[1:]) if z.shape[0] == 1 else z

    if task in ("long", "extend"):
        cond = given() if task == "extend" else None
        k = 0 if cond is None else cond.shape[1]
        total = total_frames or (4 * Fr if task == "long" else k + Fr // 2)
        if total <= k:
            raise UserError(f"--frames {total} must exceed the {k} given frames")
        ov = overlap or Fr // 2
        if not 0 < ov < Fr:
            raise UserError(f"overlap must lie in [1, {Fr - 1}], got {ov}")
        ctx = None if cond is None else cond[:, -min(k, Fr - 1):]  # what the first window holds
        n_ctx = 0 if ctx is None else ctx.shape[1]
        new_frames, windows, have = total - k, 1, Fr - n_ctx
        while have < new_frames:
            have, windows = have + Fr - ov, windows + 1
        gen = window_sampler(model_fn, schedule, ladder, shape, callback=_Progress(callback, windows * steps), **kwargs)
        z = long_video(gen, total - (k - n_ctx), Fr, ov, context=ctx)
        if k > n_ctx:  # given frames older than the first window's context
            z = torch.cat([cond[:, : k - n_ctx], z], dim=1)
        held = torch.arange(total) < k
        S, S_held = task_matrix(ladder, Fr, range(n_ctx), conditioning)
        return Generated(codec.decode(z).float().cpu(), held, S, S_held, task)

    x0_held = None
    if task == "unconditional":
        S, held = unconditional(ladder, Fr)
    elif task == "rolling":
        S, held = rolling_diagonal(ladder, Fr, lag)
    elif task == "i2v":
        S, held = task_matrix(ladder, Fr, [0], conditioning)
        x0_held = torch.zeros(shape, device=device)
        x0_held[:, :1] = given()[:, :1]
    else:  # interpolate
        idx = sorted(set(keyframe_indices if keyframe_indices is not None else [0, Fr - 1]))
        bad = [i for i in idx if not 0 <= i < Fr]
        if bad:
            raise UserError(f"keyframe indices {bad} are outside the model's {Fr} frames [0, {Fr - 1}]")
        cond = given()
        if cond.shape[1] not in (Fr, len(idx)):
            raise UserError(f"interpolate needs a clip of {Fr} frames or one frame per keyframe ({len(idx)}); "
                            f"got {cond.shape[1]} frames")
        S, held = task_matrix(ladder, Fr, idx, conditioning)
        x0_held = torch.zeros(shape, device=device)
        x0_held[:, idx] = cond[:, idx] if cond.shape[1] == Fr else cond
    progress = _Progress(callback, S.shape[0] - 1)
    z = sample(model_fn, schedule, S, shape=shape, held=held, x0_held=x0_held, callback=progress, **kwargs)
    return Generated(codec.decode(z).float().cpu(), held, S, held, task)


class _Progress:
    """Adapts the sampler's per-step callback (i, steps, x) to callback(done, total) over windows."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, i: int, steps: int, x: torch.Tensor) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)


def _model_fn(model, cfg: Config, batch: int, labels, guidance_scale, device):
    if model.config.num_classes == 0:
        if labels is not None:
            raise UserError("labels were given but the model is unconditional")
        return lambda x, t, *x_self, **kw: model(x, t, None, *x_self, **kw)
    if labels is None:  # class-conditional: classes 0, 1, 2, ... in turn
        labels = torch.arange(batch) % model.config.num_classes
    y = torch.as_tensor(labels, device=device).reshape(-1)
    y = y.expand(batch) if y.numel() == 1 else y
    if y.shape != (batch,) or bool((y < 0).any() | (y >= model.config.num_classes).any()):
        raise UserError(f"labels must be {batch} class ids in [0, {model.config.num_classes - 1}]")
    scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    return classifier_free_guidance(model, y, scale, model.config.num_classes)
