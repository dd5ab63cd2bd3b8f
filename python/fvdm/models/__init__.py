"""The FVDM video DiT (Latte-style, per-frame timesteps)."""

from fvdm.models.latte import (
    LATTE_SIZES,
    Latte,
    LatteBlock,
    LatteConfig,
    latte,
    latte_config,
    sincos_1d,
    sincos_2d,
    timestep_embedding,
)

__all__ = [
    "LATTE_SIZES",
    "Latte",
    "LatteBlock",
    "LatteConfig",
    "latte",
    "latte_config",
    "sincos_1d",
    "sincos_2d",
    "timestep_embedding",
]
