"""fvdm: Frame-Aware Video Diffusion with per-frame (vectorized) timesteps."""

import torch  # noqa: F401  (loads libtorch before the extension)

from fvdm._ext import HAS_C, build_info

__version__ = "0.1.0"
__all__ = ["HAS_C", "build_info", "__version__"]
