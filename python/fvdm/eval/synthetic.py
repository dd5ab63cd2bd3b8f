"""Measurable quality on the built-in moving sprites, where the truth is known.

A run trained on `data.kind: sprites` is asked to do every task on held-out videos (data seed
+ 1), and what it made is read with the sprite tracker (fvdm.eval.sprites) and compared with
the physics (MovingSprites renders any clip continued for any length):

  unconditional  fraction of coherent videos (one steady sprite on a smooth path), the
                 tracker's criteria, and a proxy FVD: the Fréchet distance of features from a
                 fixed, randomly initialised 3D CNN (seeded: the same network for every run),
                 generated against held-out videos; for "data", two disjoint held-out sets
                 (the floor at this number of videos). With an I3D given, also the real FVD
                 (i3d_fvd) on the same sets: the sprites' pixels as FVD's bytes, upsampled to
                 224x224 by the detector; clips under its 9 frames have every frame repeated
                 (8 -> 16 frames). With a few dozen clips of 400 features both covariances
                 are rank-deficient, so read it against the floor beside it, not against
                 published fvd2048 numbers.
  i2v            frame 0 given: coherence, and whether the sprite keeps the given frame's
                 colour and size.
  interpolate    first and last frames given: PSNR / SSIM of the frames between against the
                 true ones, and the tracked centre against the true centre (pixels).
  extend         half a window given: the true continuation is known exactly, so the centre's
                 distance from it per generated frame (pixels) and PSNR.
  long           4x the training length by sliding windows: coherence over the whole video and
                 drift (colour and size at the end against the start).
  identity       a probe of the denoiser, not a sampler: frame 0 held clean, the others noised
                 to 95% of the schedule; how far the hue of each frame's one-step clean estimate
                 is from the truth, near the clean frame and at the far end. A model whose
                 temporal mixing carries an object's identity scores the same at every distance.

The same numbers for the held-out true videos are given as "data": what a perfect model scores
(the tracker's own error floor). Every number is a median or mean over videos, see each key.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fvdm.pipeline.build import build_schedule
from fvdm.data import MovingSprites
from fvdm.diffusion import DDPMSchedule, noised_input, predict_x0_eps
from fvdm.errors import UserError
from fvdm.eval.frechet import FeatureStats, frechet_from_stats
from fvdm.eval.sprites import Thresholds, expected_sprites, frame_blobs, score_videos, thresholds_for
from fvdm.pipeline.generate import generate
from fvdm.pipeline.runs import LoadedRun, held_out_dataset

GENERATION_TASKS = ("unconditional", "i2v", "interpolate", "extend", "long")
TASKS = (*GENERATION_TASKS, "identity")  # identity probes the denoiser; it samples nothing


# ----------------------------------------------------------------------------- image metrics


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB of (N, C, H, W) pairs in [-1, 1], on the [0, 1] scale."""
    mse = (((a - b) / 2.0) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image SSIM (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, channels averaged)
    of (N, C, H, W) pairs in [-1, 1], on the [0, 1] scale. The window shrinks to the image for
    frames smaller than 11 pixels."""
    x, y = (a.double() + 1.0) / 2.0, (b.double() + 1.0) / 2.0
    window = min(window, x.shape[-1], x.shape[-2])
    window -= 1 - window % 2  # odd
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2.0
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = (g / g.sum())
    C = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window).contiguous()

    def blur(z):
        return F.conv2d(z, kernel, groups=C)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


# ----------------------------------------------------------------------------- proxy FVD


PROXY_SEED = 20241004  # the proxy network's weights: fixed, so numbers compare across runs


def proxy_network(channels: int, seed: int = PROXY_SEED) -> torch.nn.Module:
    """A fixed random 3D CNN, (B, 2C, F, H, W) -> (B, 128) features: three 3x3x3 convolutions
    (the last two halve space, the last also time) with ReLU, then the mean over positions.
    He-initialised from `seed` alone, so every machine builds the same network. Its input is
    the video and its frame-to-frame change (_with_motion): random filters averaged over
    positions see little motion on their own."""
    g = torch.Generator().manual_seed(seed)
    layers, width = [], 2 * channels
    for out, stride in ((32, 1), (64, (1, 2, 2)), (128, 2)):
        conv = torch.nn.Conv3d(width, out, 3, stride=stride, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (width * 27)))
            conv.bias.zero_()
        layers += [conv, torch.nn.ReLU()]
        width = out
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten()).eval()


@torch.no_grad()
def proxy_fvd(fake: torch.Tensor, real: torch.Tensor, batch_size: int = 16) -> float:
    """Fréchet distance of proxy_network features, (B, F, C, H, W) videos in [-1, 1]."""
    net = proxy_network(real.shape[2])
    stats = []
    for videos in (fake, real):
        s = FeatureStats()
        for chunk in videos.split(batch_size):
            s.update(net(_with_motion(chunk.float()).transpose(1, 2)))
        stats.append(s)
    return frechet_from_stats(*stats).value


# Frame changes of moving sprites are small next to the frames; amplified by 8, a frozen or
# shuffled clip scores far above the real-vs-real floor (measured on 32 sprite clips: floor
# 0.35, frozen 2.4, shuffled 8.5; unamplified all three were ~0.05).
MOTION_GAIN = 8.0


def _with_motion(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F, 2C, H, W): each frame and MOTION_GAIN times its change from
    the previous one (zero for the first frame)."""
    change = torch.cat([torch.zeros_like(videos[:, :1]), videos[:, 1:] - videos[:, :-1]], dim=1)
    return torch.cat([videos, MOTION_GAIN * change], dim=2)


# ----------------------------------------------------------------------------- I3D FVD


I3D_MIN_FRAMES = 9  # fvdm.eval.i3d.MIN_FRAMES: fewer leave no time step after the network's pools
_I3D_MEMO: dict[tuple[str, str], FeatureStats] = {}  # (detector sha256, clips sha256) -> stats
_I3D_MEMO_SIZE = 8


def i3d_clips(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) pixels in [-1, 1] -> uint8 (B, 3, T, H, W) as FVD feeds the I3D: FVDM's
    byte rule (pixels.to_uint8), grey repeated to 3 channels, and, for clips shorter than the
    I3D's 9 frames, every frame repeated (nearest neighbour in time: 8 frames -> 16)."""
    from fvdm.io import pixels
    x = torch.from_numpy(pixels.to_uint8(videos)).permute(0, 4, 1, 2, 3)
    if x.shape[2] < I3D_MIN_FRAMES:
        x = x.repeat_interleave(math.ceil(I3D_MIN_FRAMES / x.shape[2]), dim=2)
    return x.contiguous()


def i3d_stats(videos: torch.Tensor, detector, batch_size: int = 8) -> FeatureStats:
    """Streaming statistics of the I3D features of `videos`; remembered for the same clips and
    detector, so the held-out sets are featurised once for every arm of an ablation."""
    import hashlib

    clips = i3d_clips(videos)
    key = (detector.sha256, hashlib.sha256(clips.numpy().tobytes()).hexdigest())
    if key not in _I3D_MEMO:
        stats = FeatureStats()
        with torch.no_grad():
            for chunk in clips.split(batch_size):
                stats.update(detector(chunk))
        while len(_I3D_MEMO) >= _I3D_MEMO_SIZE:
            _I3D_MEMO.pop(next(iter(_I3D_MEMO)))
        _I3D_MEMO[key] = stats
    return _I3D_MEMO[key]


def i3d_fvd(fake: torch.Tensor, real: torch.Tensor, detector) -> float:
    """FVD (Fréchet distance of I3D logits) between two sets of (B, F, C, H, W) videos in [-1, 1]."""
    return frechet_from_stats(i3d_stats(real, detector), i3d_stats(fake, detector)).value


# ----------------------------------------------------------------------------- tracking helpers


def _centres(video: torch.Tensor) -> np.ndarray:
    """(F, C, H, W) -> (F, 2) tracked centres, nan where no sprite is seen."""
    return np.array([frame_blobs(f.numpy()).centroid for f in video])


def _centre_error(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Mean distance (pixels) between tracked centres of two videos, frame by frame; a frame
    where either shows no sprite counts as one frame side (as far off as it gets, roughly)."""
    d = np.linalg.norm(_centres(fake) - _centres(real), axis=1)
    return float(np.where(np.isfinite(d), d, fake.shape[-1]).mean())


def _colour_and_area(video: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    blobs = [frame_blobs(f.numpy()) for f in video]
    return np.array([b.colour for b in blobs]), np.array([b.area for b in blobs])


def _mean_of_finite_rows(a: np.ndarray) -> np.ndarray:
    """Mean over the rows (frames) where every entry is finite (the sprite was seen); nan
    where there is none, without numpy's empty-slice warning."""
    ok = np.isfinite(a).all(axis=1)
    return a[ok].mean(axis=0) if ok.any() else np.full(a.shape[1:], np.nan)


def _nanmedian(values) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.median(np.where(np.isfinite(a), a, np.inf))) if a.size else float("nan")


def _coherence(summary: dict) -> dict:
    keep = ("coherent", "frames_with_expected_count", "area_change", "colour_drift", "max_jerk", "motion")
    return {k: summary[k] for k in keep}


# ----------------------------------------------------------------------------- evaluation


def evaluate_synthetic(
    run: LoadedRun,
    num_videos: int = 32,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    tasks: tuple[str, ...] = TASKS,
    conditioning: str = "hold",
    callback: Callable[[str, float, int], None] | None = None,
    results: dict | None = None,
    i3d=None,
) -> dict:
    """Every task in `tasks` on `num_videos` held-out videos; returns {task: {metric: value}}
    for the model ("model") and for the true videos ("data"). conditioning: how given frames
    enter the sampler ("hold" for FVDM, "replace" for scalar-timestep models). callback(task,
    done, total) reports progress in videos (done fractional: sampler steps count). results:
    a dict filled task by task as each finishes, so a caller interrupted midway keeps them. i3d (an
    fvdm.eval.fvd.Detector): adds the unconditional task's I3D FVD and its real-vs-real floor."""
    cfg = run.cfg
    if cfg.data.kind != "sprites":
        raise UserError(f"eval synthetic needs a run trained on the built-in sprites (data.kind: sprites); "
                        f"this run has data.kind: {cfg.data.kind}")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    Fr = cfg.data.num_frames
    if Fr < 3:
        raise UserError(f"eval synthetic needs clips of at least 3 frames, the run has {Fr}")
    ds = held_out_dataset(cfg, Fr)
    if not isinstance(ds, MovingSprites):
        raise UserError("eval synthetic needs the plain sprites dataset (no class labels)")
    if not 1 <= num_videos <= len(ds):
        raise UserError(f"--videos must lie in [1, {len(ds)}]: the run's held-out sprites (data.num_videos), "
                        f"got {num_videos}")
    expected, th = expected_sprites(ds), thresholds_for(ds)
    device = next(run.model.parameters()).device
    k_extend = Fr // 2
    long_frames = 4 * Fr
    truth = {n: torch.stack([ds.clip(i, n) for i in range(num_videos)])
             for n in {Fr, k_extend + Fr, long_frames}}
    other_real = torch.stack([ds.clip(i, Fr) for i in range(num_videos, 2 * num_videos)])

    def run_task(task: str, condition=None, **kw) -> torch.Tensor:
        out = []
        for start in range(0, num_videos, batch_size):
            n = min(batch_size, num_videos - start)
            cond = None if condition is None else condition[start:start + n]
            report = None
            if callback is not None:
                report = lambda done, total, start=start, n=n: callback(task, start + n * done / total, num_videos)  # noqa: E731
            g = generate(run.model, cfg, task, num_videos=n, steps=steps, seed=seed + start, device=device,
                         condition=cond, codec=run.codec, conditioning=conditioning, callback=report, **kw)
            out.append(g.video)
            if callback is not None:
                callback(task, start + n, num_videos)
        return torch.cat(out)

    results = {} if results is None else results
    real = truth[Fr]
    if "unconditional" in tasks:
        fake = run_task("unconditional")
        scores = {
            "model": {**_coherence(score_videos(fake, expected, th)), "proxy_fvd": proxy_fvd(fake, real)},
            "data": {**_coherence(score_videos(real, expected, th)), "proxy_fvd": proxy_fvd(other_real, real)},
        }
        if i3d is not None:
            scores["model"]["i3d_fvd"] = i3d_fvd(fake, real, i3d)
            scores["data"]["i3d_fvd"] = i3d_fvd(other_real, real, i3d)
        results["unconditional"] = scores
    if "i2v" in tasks:
        fake = run_task("i2v", condition=real[:, :1])
        results["i2v"] = {"model": _i2v_metrics(fake, real, expected, th), "data": _i2v_metrics(real, real, expected, th)}
    if "interpolate" in tasks:
        fake = run_task("interpolate", condition=real, keyframe_indices=[0, Fr - 1])
        results["interpolate"] = {"model": _interpolation_metrics(fake, real)}
    if "extend" in tasks:
        full = truth[k_extend + Fr]
        fake = run_task("extend", condition=full[:, :k_extend], total_frames=k_extend + Fr)
        results["extend"] = {"model": _extension_metrics(fake, full, k_extend)}
    if "long" in tasks:
        fake = run_task("long", total_frames=long_frames)
        results["long"] = {"model": _long_metrics(fake, Fr, expected, th),
                           "data": _long_metrics(truth[long_frames], Fr, expected, th)}
    if "identity" in tasks:
        results["identity"] = {"model": identity_transfer(run, real, seed=seed, batch_size=batch_size)}
        if callback is not None:
            callback("identity", num_videos, num_videos)
    return results


def frame_hue(video: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) in [-1, 1] -> (..., C): each channel's energy over the frame (so where the
    sprite is does not matter), scaled so the largest channel is 1. A sprite on black gives
    its colour's direction: red (1, 0, 0), yellow (1, 1, 0)."""
    energy = ((video.float() + 1.0) / 2.0).clamp(min=0.0).square().sum((-2, -1))
    return energy / energy.amax(-1, keepdim=True).clamp(min=1e-6)


@torch.no_grad()
def identity_transfer(run: LoadedRun, clips: torch.Tensor, noise_level: float = 0.95, seed: int = 0,
                      batch_size: int = 16) -> dict:
    """Frame 0 of each clip (B, F, C, H, W) held clean, frames 1.. noised to `noise_level` of the
    schedule (one draw): the hue error (frame_hue, RGB distance) of the one-step clean estimate
    of frame 1 (hue_error_near), of the last frame (hue_error_far), and the mean over frames
    1.. (hue_error_mean). The true clip scores 0; at this noise the noisy frames alone say
    almost nothing about the colour, so what is right comes from frame 0 through the network."""
    cfg, model = run.cfg, run.model
    device = next(model.parameters()).device
    schedule = build_schedule(cfg).to(device)
    if isinstance(schedule, DDPMSchedule):
        t_noisy = torch.tensor(int(noise_level * (schedule.num_timesteps - 1)), device=device)
    else:
        t_noisy = torch.tensor(noise_level, device=device)
    g = torch.Generator().manual_seed(seed)
    errors = []
    for chunk in clips.split(batch_size):
        x0 = run.codec.encode(chunk.to(device))
        B, Fr = x0.shape[:2]
        t = t_noisy.expand(B, Fr)
        held = torch.zeros(B, Fr, dtype=torch.bool, device=device)
        held[:, 0] = True
        x_t, model_t = noised_input(schedule, x0, torch.randn(x0.shape, generator=g).to(x0), t, held, model.ops)
        y = torch.full((B,), model.config.num_classes, device=device) if model.config.num_classes else None
        x_self = torch.zeros_like(x_t) if model.config.self_condition else None
        pred = model(x_t, model_t, y, x_self)[:, :, : x0.shape[2]].to(x0.dtype)
        a, s = schedule.alpha_sigma(t)
        x0_hat, _ = predict_x0_eps(cfg.diffusion.objective, x_t, pred, a, s, model.ops)
        pixels = run.codec.decode(x0_hat).clamp(-1.0, 1.0).cpu()
        errors.append((frame_hue(pixels) - frame_hue(chunk)).norm(dim=-1)[:, 1:])  # (B, F - 1)
    err = torch.cat(errors).mean(0)
    return {"hue_error_near": float(err[0]), "hue_error_far": float(err[-1]), "hue_error_mean": float(err.mean())}


def _i2v_metrics(fake: torch.Tensor, real: torch.Tensor, expected, th: Thresholds) -> dict:
    """Coherence of the generated frames, and how far their sprite's colour (RGB distance) and
    area (relative) are from the given frame's, median over frames then over videos."""
    colour_err, area_err = [], []
    for f, r in zip(fake, real):
        c, a = _colour_and_area(f[1:])
        c0, a0 = _colour_and_area(r[:1])
        colour_err.append(np.nanmedian(np.linalg.norm(c - c0, axis=1)) if np.isfinite(c).any() else np.inf)
        area_err.append(np.median(np.abs(a / max(a0[0], 1e-6) - 1.0)))
    return {**_coherence(score_videos(fake, expected, th)), "colour_error": _nanmedian(colour_err),
            "area_error": _nanmedian(area_err)}


def _interpolation_metrics(fake: torch.Tensor, real: torch.Tensor) -> dict:
    """The frames between the two keyframes against the true ones: mean PSNR / SSIM, median
    centre error (pixels)."""
    mid_f, mid_r = fake[:, 1:-1].flatten(0, 1), real[:, 1:-1].flatten(0, 1)
    return {"psnr": float(psnr(mid_f, mid_r).mean()), "ssim": float(ssim(mid_f, mid_r).mean()),
            "centre_error_px": _nanmedian([_centre_error(f[1:-1], r[1:-1]) for f, r in zip(fake, real)])}


def _extension_metrics(fake: torch.Tensor, real: torch.Tensor, k: int) -> dict:
    """The generated continuation (frames k..) against the physics: median over videos of the
    mean centre error, of the error at the last frame, and mean PSNR."""
    gen_f, gen_r = fake[:, k:], real[:, k:]
    last = [_centre_error(f[-1:], r[-1:]) for f, r in zip(gen_f, gen_r)]
    return {"centre_error_px": _nanmedian([_centre_error(f, r) for f, r in zip(gen_f, gen_r)]),
            "last_frame_centre_error_px": _nanmedian(last),
            "psnr": float(psnr(gen_f.flatten(0, 1), gen_r.flatten(0, 1)).mean())}


def _long_metrics(videos: torch.Tensor, window: int, expected, th: Thresholds) -> dict:
    """Coherence over the whole long video, and drift: how far the sprite's colour (RGB
    distance) and area (relative) in the last window are from the first window's."""
    colour_drift, area_drift = [], []
    for v in videos:
        c, a = _colour_and_area(v)
        c_first, c_last = _mean_of_finite_rows(c[:window]), _mean_of_finite_rows(c[-window:])
        a_first, a_last = a[:window].mean(), a[-window:].mean()
        colour_drift.append(float(np.linalg.norm(c_last - c_first)))
        area_drift.append(abs(a_last / a_first - 1.0) if a_first > 0 else math.inf)
    return {**_coherence(score_videos(videos, expected, th)), "end_colour_drift": _nanmedian(colour_drift),
            "end_area_drift": _nanmedian(area_drift)}
