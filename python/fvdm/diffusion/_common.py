"""Small helpers shared by the loss and the samplers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def held_mask(held: torch.Tensor, B: int, Fr: int) -> torch.Tensor:
    """A held-frame mask given as (F,) or (B, F) bool, as (B, F)."""
    if held.dtype != torch.bool:
        raise ValueError(f"held must be a bool mask, got dtype {held.dtype}")
    if held.shape == (Fr,):
        return held[None].expand(B, Fr)
    if held.shape != (B, Fr):
        raise ValueError(f"held must have shape ({Fr},) or ({B}, {Fr}), got {tuple(held.shape)}")
    return held


def per_frame(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, F) values shaped to broadcast over a (B, F, ...) tensor."""
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))


def randn_like_shape(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (so a seed gives the same numbers wherever the
    result goes), then moved to device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def check_on_device(ok: torch.Tensor, message: Callable[[], str]) -> None:
    """ValueError(message()) unless every element of the bool tensor `ok` is true, without a
    host read from Python: on the CPU torch tests it in place; on a GPU it is a device-side
    assertion that does not stall the stream (a failure surfaces at the next sync, as a CUDA
    error carrying the message). The message is built only on failure, on the CPU."""
    if ok.device.type == "cpu":
        try:
            torch._assert_async(ok.all())
        except RuntimeError:
            raise ValueError(message()) from None
    else:
        torch._assert_async(ok.all(), message())
