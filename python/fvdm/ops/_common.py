"""Small helpers shared by the operator modules."""

from __future__ import annotations

import torch


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and coefficient tables: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
