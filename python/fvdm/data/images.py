"""Still images: natural-order listing of frame files and reading one image (Pillow)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fvdm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: frame_2 before frame_10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.lower()) for tok in re.split(r"(\d+)", name) if tok]


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside folder, in natural order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> uint8 (H, W, 3) RGB (greyscale, palette and alpha are converted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist or is not a file; check the path")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # decodes the whole image, so truncated files fail here
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"image {path} could not be read ({type(e).__name__}: {e}); "
                        "give a PNG/JPEG/... file or re-save it") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8))
