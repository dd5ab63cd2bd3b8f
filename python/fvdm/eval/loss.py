"""Held-out diffusion loss of a trained run, per noise level: the first thing to look at when
comparing checkpoints (same clips, same noise, same timesteps for every checkpoint)."""

from __future__ import annotations

import torch

from fvdm.pipeline.build import build_schedule, num_timesteps_for_training
from fvdm.config import Config
from fvdm.diffusion import diffusion_loss, sample_timesteps
from fvdm.pipeline.runs import data_condition


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, cfg: Config, num_clips: int = 32, batch_size: int = 8,
                  buckets: int = 5, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Mean loss on `num_clips` held-out clips (data seed + 1) at scalar times in `buckets`
    equal bins of the noise range, and with independent per-frame times (PTSS p = 1)."""
    model = model.eval()
    schedule = build_schedule(cfg).to(device)
    T = num_timesteps_for_training(cfg)
    g = torch.Generator().manual_seed(seed)
    clips = data_condition(cfg, cfg.data.num_frames, num_clips)
    if cfg.data.vae:
        raise NotImplementedError("held-out loss on VAE latents is not supported yet")
    rows = {}
    edges = torch.linspace(0, 1, buckets + 1)
    for b in range(buckets + 1):
        total, n = 0.0, 0
        for x0 in clips.split(batch_size):
            B, Fr = x0.shape[:2]
            if b < buckets:  # scalar time in bin b
                u = edges[b] + (edges[b + 1] - edges[b]) * torch.rand(B, 1, generator=g)
                t = (u * T).long().clamp(max=T - 1) if T else u.float()
                t = t.expand(B, Fr)
            else:
                t = sample_timesteps(B, Fr, 1.0, num_timesteps=T, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            # a self-conditioning model is scored as it samples: with its own first estimate
            self_cond = torch.ones(B, dtype=torch.bool) if model.config.self_condition else None
            out = diffusion_loss(lambda x, tt, *x_self, rows=None: model(x, tt, None, *x_self), schedule, x0.to(device),
                                 t.to(device), objective=cfg.diffusion.objective, noise=noise.to(device),
                                 learn_sigma=cfg.model.learn_sigma, self_condition=self_cond, ops=model.ops)
            total += float(out.mse.mean()) * B
            n += B
        name = f"t in [{edges[b]:.1f}, {edges[b + 1]:.1f})" if b < buckets else "per-frame independent t"
        rows[name] = total / n
    return rows
