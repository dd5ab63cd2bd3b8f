"""The FVDM video DiT (Latte-style, per-frame timesteps) and its configuration."""

from fvdm.models.config import BLOCK_KINDS, GELU_FORMS, LATTE_SIZES, ModelConfig, model_config
from fvdm.models.latte import Latte, LatteBlock, latte, sincos_1d, sincos_2d, timestep_embedding

__all__ = [
    "BLOCK_KINDS",
    "GELU_FORMS",
    "LATTE_SIZES",
    "Latte",
    "LatteBlock",
    "ModelConfig",
    "latte",
    "model_config",
    "sincos_1d",
    "sincos_2d",
    "timestep_embedding",
]
