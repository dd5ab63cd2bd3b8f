"""fvdm operators: fused kernels (torch.ops.fvdm, from fvdm._C) and their plain-PyTorch
references. ``get_backend("fused" | "reference" | "auto")`` gives either set behind one
interface, which is how the model switches between them."""

from __future__ import annotations

from types import SimpleNamespace

from fvdm._ext import HAS_C
from fvdm.ops import reference
from fvdm.ops.modulate import adaln_modulate, gated_residual
from fvdm.ops.noise import frame_combine, noise_inject
from fvdm.ops.temporal_attn import temporal_attention, temporal_attention_qkv

__all__ = [
    "adaln_modulate",
    "gated_residual",
    "frame_combine",
    "noise_inject",
    "temporal_attention",
    "temporal_attention_qkv",
    "reference",
    "get_backend",
    "BACKENDS",
]

BACKENDS = ("fused", "reference", "auto")

_FUSED = SimpleNamespace(
    name="fused",
    adaln_modulate=adaln_modulate,
    gated_residual=gated_residual,
    frame_combine=frame_combine,
    noise_inject=noise_inject,
    temporal_attention=temporal_attention,
    temporal_attention_qkv=temporal_attention_qkv,
)
_REFERENCE = SimpleNamespace(
    name="reference",
    adaln_modulate=reference.adaln_modulate_ref,
    gated_residual=reference.gated_residual_ref,
    frame_combine=reference.frame_combine_ref,
    noise_inject=reference.noise_inject_ref,
    temporal_attention=reference.temporal_attention_ref,
    temporal_attention_qkv=reference.temporal_attention_qkv_ref,
)



def _fused_devices() -> frozenset[str]:
    if not HAS_C:
        return frozenset()
    from fvdm._ext import build_info

    return frozenset({"cpu", "cuda"} if build_info()["cuda"] else {"cpu"})


_FUSED_DEVICES = _fused_devices()


def _auto(name: str):
    """Per call: the fused kernel when this build has one for the input's device, else the
    reference (so a CPU-only build still runs a model moved to a GPU)."""
    fused, ref = getattr(_FUSED, name), getattr(_REFERENCE, name)

    def op(first, *args, **kwargs):
        device = (first[0] if isinstance(first, (list, tuple)) else first).device.type
        return (fused if device in _FUSED_DEVICES else ref)(first, *args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = fused.__doc__
    return op


_AUTO = SimpleNamespace(name="auto", **{op: _auto(op) for op in vars(_FUSED) if op != "name"})


def get_backend(name: str = "auto") -> SimpleNamespace:
    """The operator set for a backend: "fused" (fvdm._C kernels), "reference" (plain PyTorch),
    or "auto" (per call, fused where this build has a kernel for the input's device, else
    reference)."""
    if name == "auto":
        return _AUTO
    if name == "fused":
        from fvdm._ext import require_c

        require_c()
        return _FUSED
    if name == "reference":
        return _REFERENCE
    raise ValueError(f"unknown ops backend {name!r}; choose one of {BACKENDS}")
