"""Exponential moving average of the model's weights (the weights that get sampled)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied.

    warmup: the decay used at step n is min(decay, (1 + n) / (10 + n)), so a short run's EMA
    is not stuck near the random initialisation (0.9999 needs ~10k steps to forget it)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
