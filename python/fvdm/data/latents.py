"""Optional VAE latents: a local diffusers AutoencoderKL, frame-wise encode/decode of videos,
and an on-disk cache of a dataset's latents. diffusers is imported only by load_vae."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from fvdm.errors import UserError

CACHE_FORMAT = 1  # bump when what is stored (or how it is computed) changes


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL from a local folder (its config.json + weights, or a pipeline
    folder with a vae/ subfolder), in eval mode without gradients. Never downloads."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("data.vae needs the diffusers package: pip install diffusers") from None
    root = Path(path)
    if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        root = root / "vae"  # a whole Stable Diffusion folder
    config = root / "config.json"
    if not config.is_file():
        raise UserError(f"VAE folder {path} has no config.json; give a local diffusers AutoencoderKL folder "
                        "(e.g. a download of stabilityai/sd-vae-ft-ema)")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"VAE config {config} is not a readable JSON object ({e}); re-download the VAE") from None
    if class_name not in (None, "AutoencoderKL"):
        raise UserError(f"{root} holds a {class_name}, not an AutoencoderKL; give the VAE's folder")
    try:
        # low_cpu_mem_usage needs accelerate; asking only when it is there avoids diffusers' nag.
        vae = AutoencoderKL.from_pretrained(root, local_files_only=True, torch_dtype=dtype,
                                            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"VAE {root} could not be loaded ({first}); check that its weights are complete") from None
    return vae.to(device).eval().requires_grad_(False)


def _scale_shift(vae) -> tuple[float, float]:
    # SD VAEs: latents * 0.18215 have about unit variance; SD3/Flux VAEs also shift them.
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def _vae_place(vae) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """(B, F, 3, H, W) pixels in [-1, 1] -> (B, F, c, H/8, W/8) latents (c = 4 for SD), frame
    by frame: the mean of the VAE's latent distribution (deterministic), (mean - shift) *
    scaling_factor. chunk_size frames per VAE call bound memory. Returned on video's device
    and dtype."""
    if video.ndim != 5 or video.shape[2] != 3:
        raise UserError(f"encode_video needs RGB video (B, F, 3, H, W), got shape {tuple(video.shape)}; "
                        "VAE latents need data.channels=3")
    B, Fr = video.shape[:2]
    device, dtype = _vae_place(vae)
    scale, shift = _scale_shift(vae)
    frames = video.reshape(B * Fr, *video.shape[2:])
    z = torch.cat([vae.encode(c.to(device, dtype)).latent_dist.mean for c in frames.split(chunk_size)])
    z = (z.float() - shift) * scale
    return z.reshape(B, Fr, *z.shape[1:]).to(video.device, video.dtype)


@torch.no_grad()
def decode_video(vae, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """(B, F, c, h, w) latents from encode_video -> (B, F, 3, 8h, 8w) pixels in [-1, 1] (the
    VAE's output clamped), chunk_size frames per VAE call. On latents' device and dtype."""
    if latents.ndim != 5:
        raise UserError(f"decode_video needs latents (B, F, c, h, w), got shape {tuple(latents.shape)}")
    B, Fr = latents.shape[:2]
    device, dtype = _vae_place(vae)
    scale, shift = _scale_shift(vae)
    z = latents.reshape(B * Fr, *latents.shape[2:]).float() / scale + shift
    x = torch.cat([vae.decode(c.to(device, dtype)).sample for c in z.split(chunk_size)]).float().clamp_(-1.0, 1.0)
    return x.reshape(B, Fr, *x.shape[1:]).to(latents.device, latents.dtype)


def vae_fingerprint(vae) -> dict:
    """The VAE's config, dtype and a sample of its weights: two VAEs with the same config but
    different weights (sd-vae-ft-ema vs ft-mse) differ. Exact values, so any device agrees."""
    digest = hashlib.sha256()
    for name, p in sorted(vae.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().contiguous()
        digest.update(name.encode() + sample.numpy().tobytes())
    # Private keys (_name_or_path, _diffusers_version...) say where it came from, not what it is.
    public = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    config = json.loads(json.dumps(public, sort_keys=True, default=str))
    return {"config": config, "dtype": str(_vae_place(vae)[1]), "weights": digest.hexdigest()}


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over path: readers never see a partial file, and
    concurrent writers (DataLoader workers, ranks) each replace it whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # a VAE encode costs far more than this
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LatentCache(Dataset):
    """The VAE latents of dataset[i], (F, c, h, w) float32 (or (latents, label) when the dataset
    yields (video, label)), encoded on first access and stored under cache_dir.

    Files live in cache_dir/<fingerprint>/<i>.safetensors; the fingerprint hashes the dataset's
    `describe()` (its repr if it has none) and the VAE (config, dtype, weights sample), so a
    changed dataset or VAE gets a fresh folder and never reads stale latents.

    Caching freezes per-item randomness: item i keeps the clip (start frame, any augmentation)
    it had when first encoded, for every later epoch and run with the same fingerprint."""

    def __init__(self, dataset, vae, cache_dir: str | Path, chunk_size: int = 8) -> None:
        self.dataset, self.vae, self.chunk_size = dataset, vae, chunk_size
        describe = getattr(dataset, "describe", None)
        # Without describe() the default repr holds the object's id: never reused, so never stale.
        key = {"format": CACHE_FORMAT, "dataset": describe() if callable(describe) else repr(dataset),
               "vae": vae_fingerprint(vae)}
        text = json.dumps(key, indent=1, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:20]
        self.dir = Path(cache_dir) / self.fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "fingerprint.json"
            if not meta.exists():  # for people looking at the folder
                _atomic_write(meta, lambda tmp: Path(tmp).write_text(text))
        except OSError as e:
            raise UserError(f"latent cache folder {self.dir} is not writable ({e}); set data.latent_cache") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, i: int) -> Path:
        return self.dir / f"{i:08d}.safetensors"

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"LatentCache index {i} out of range for {len(self)} items")
        path = self.path(i)
        if path.exists():
            try:
                return self._unpack(load_file(path))
            except (SafetensorError, OSError, KeyError):
                pass  # unreadable (disk trouble): encode again and overwrite
        item = self.dataset[i]
        video, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        tensors = {"latents": encode_video(self.vae, video[None].float(), self.chunk_size)[0].cpu().contiguous()}
        if label is not None:
            tensors["label"] = torch.as_tensor(label).reshape(1).cpu()
        _atomic_write(path, lambda tmp: save_file(tensors, tmp))
        return self._unpack(tensors)

    @staticmethod
    def _unpack(tensors: dict[str, torch.Tensor]):
        z = tensors["latents"]
        return (z, tensors["label"][0]) if "label" in tensors else z
