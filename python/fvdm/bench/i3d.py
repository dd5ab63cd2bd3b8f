"""How fast the built-in I3D turns clips into FVD features (fvdm.eval.i3d).

A clip is FVD's: 16 frames of 224 x 224 (the detector's own size, so the resize is a no-op),
uint8, through rescale and the network to the 400 logits, fp32, gradients off. Each round times
one forward of `batch` clips; the median round gives seconds per clip. An FVD of fvd2048_16f
featurises 2048 real and 2048 generated clips, so it costs 4096 of them (generation not
counted)."""

from __future__ import annotations

import os
import statistics
import time

import torch

from fvdm.bench.common import synchronize
from fvdm.eval.i3d import load_i3d_network


def run(device: torch.device, threads: int | None = 2, batch: int = 1, rounds: int = 5, frames: int = 16,
        size: int = 224) -> dict:
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    net, info = load_i3d_network(device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, frames, size, size), dtype=torch.uint8, generator=g).to(device)
    times = []
    load_before = _loadavg()
    with torch.no_grad():
        net(x, rescale=True, resize=True, return_features=True)  # untimed: allocations, algorithm choice
        synchronize(device)
        for _ in range(rounds):
            t0 = time.perf_counter()
            net(x, rescale=True, resize=True, return_features=True)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    per_clip = statistics.median(times) / batch
    return {"clip": f"{frames}x{size}x{size} uint8", "batch": batch, "rounds": rounds, "dtype": "fp32",
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "round_s": [round(t, 4) for t in times], "s_per_clip": per_clip, "clips_per_s": 1 / per_clip,
            "s_per_2048_clips": 2048 * per_clip, "s_per_fvd2048": 4096 * per_clip,
            "weights_sha256": info["sha256"],
            # other processes on the machine: on 2 cores any of them slows every round
            "load_average_1min": {"before": load_before, "after": _loadavg()}}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every OS
        return None
