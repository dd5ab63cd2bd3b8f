"""Loads the compiled core fvdm._C, which registers the torch.ops.fvdm operators."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from fvdm import _C  # noqa: F401

    HAS_C = True
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    HAS_C = False
    _IMPORT_ERROR = str(exc)


def build_info() -> dict:
    """How fvdm._C was built (version, torch, OpenMP, CUDA archs, kernels per backend)."""
    if not HAS_C:
        return {"built": False, "error": _IMPORT_ERROR}
    return {"built": True, **_C.build_info()}


def require_c() -> None:
    if not HAS_C:
        raise RuntimeError(
            f"fvdm._C is not available ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` or use backend='reference'"
        )
