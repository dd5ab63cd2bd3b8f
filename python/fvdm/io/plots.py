"""Plots of a run: the schedule matrix of a sampling task and the loss curve, as PNG.

matplotlib is used through `Figure` + `FigureCanvasAgg` only (never pyplot), so plotting
neither needs a display nor changes the backend or any figure state of the caller. Files are
written atomically (fvdm.io.atomic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fvdm.errors import UserError
from fvdm.io.atomic import atomic_path

ArrayLike = torch.Tensor | np.ndarray


def _figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(path: str | Path, fig) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# What the schedule plot says a clean (held) frame is; the README quotes the DDPM ones. In a DDPM
# schedule matrix clean is -1, one below the last noisy timestep 0, and the network is shown it as
# t = 0 (schedules.DDPMSchedule.model_time).
SCHEDULE_LABELS = {"ddpm": "timestep t (-1 = clean)", "flow": "noise level t (0 = clean)"}
HELD_LABELS = {"ddpm": "held: given frames, clean (t = -1) in every step; the network sees t = 0",
               "flow": "held: given frames, clean (t = 0) in every step"}


def save_schedule_matrix(path: str | Path, S: ArrayLike, held: ArrayLike | None = None,
                         title: str | None = None) -> Path:
    """A heatmap of a sampler's per-frame times: x = frame, y = sampler step (first at top).

    S: (steps + 1, F) times: integers in [-1, T - 1] for DDPM (-1 = clean) or floats in
    [0, 1] for flow matching (0 = clean). held: bool (F,) or (steps + 1, F), frames (or cells)
    given as conditioning, drawn hatched and named in the legend."""
    s = torch.as_tensor(S).detach().cpu()
    floating = s.is_floating_point()
    s = s.double()
    if s.ndim != 2 or s.numel() == 0:
        raise UserError(f"S: expected a (steps + 1, F) matrix of per-frame times, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise UserError("S: contains NaN/inf; expected per-frame times")
    mask = _schedule_mask(held, tuple(s.shape))
    rows, frames = s.shape
    flow = floating and bool(s.min() >= 0 and s.max() <= 1)  # DDPM times are integers, -1 = clean
    vmin, vmax = (0.0, 1.0) if flow else (-1.0, max(float(s.max()), 1.0))

    fig = _figure(min(3.0 + 0.35 * frames, 14.0), 4.5)
    ax = fig.add_subplot()
    image = ax.imshow(s.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=SCHEDULE_LABELS["flow" if flow else "ddpm"])
    ax.set_xlabel("frame")
    ax.set_ylabel("sampler step (0 = first)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    if frames <= 32:
        ax.set_xticks(range(frames))
    if mask is not None and mask.any():
        _hatch(ax, mask, HELD_LABELS["flow" if flow else "ddpm"])
    if title:
        ax.set_title(title)
    return _save_figure(path, fig)


def _schedule_mask(held: ArrayLike | None, shape: tuple[int, int]) -> np.ndarray | None:
    """held (F,) or (steps + 1, F) -> bool (steps + 1, F)."""
    if held is None:
        return None
    h = torch.as_tensor(held).cpu().bool()
    if h.ndim == 1 and h.shape[0] == shape[1]:
        h = h.expand(shape[0], -1)
    if tuple(h.shape) != shape:
        raise UserError(f"held: expected shape ({shape[1]},) or {shape} to match S, got {tuple(h.shape)}")
    return h.numpy()


def _hatch(ax, mask: np.ndarray, label: str) -> None:
    """Hatch the held cells: one rectangle per vertical run, so long schedules stay cheap."""
    from matplotlib.patches import Patch, Rectangle

    for col in range(mask.shape[1]):
        padded = np.concatenate([[False], mask[:, col], [False]])
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        for start, stop in zip(edges[::2], edges[1::2]):
            ax.add_patch(Rectangle((col - 0.5, start - 0.5), 1, stop - start, fill=False, hatch="//",
                                   edgecolor="white", linewidth=0))
    # A proxy with a dark face: white hatching alone is invisible in a legend on white.
    proxy = Patch(facecolor="0.25", edgecolor="white", hatch="//", label=label)
    # Below the axes: inside, it would hide part of the matrix.
    ax.legend(handles=[proxy], loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", frameon=False)


def save_loss_curve(path: str | Path, records: Sequence[dict], keys: Sequence[str] = ("loss",)) -> Path:
    """Each key vs "step" on a log y axis: raw values thin and translucent, an exponential
    moving average thick. Records without a key, or with a NaN/inf/non-positive/null value,
    are skipped for that key (a log axis cannot show them)."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    plotted = False
    for i, key in enumerate(keys):
        steps, values = _series(records, key)
        if not len(steps):
            continue
        colour = f"C{i}"
        marker = "o" if len(steps) == 1 else None  # a one-point line would be invisible
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, marker=marker)
        ax.plot(steps, _ema(values), color=colour, linewidth=2.0, label=f"{key} (EMA)", marker=marker)
        plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite values to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("value (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    return _save_figure(path, fig)


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have a finite positive `key` and a "step"."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
             and math.isfinite(r[key]) and r[key] > 0]
    pairs.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)


def _ema(values: np.ndarray) -> np.ndarray:
    """Bias-corrected EMA in log space (a geometric mean, which suits a log axis); its span
    grows with the series so short runs are still smoothed and long ones not over-smoothed."""
    alpha = 2.0 / (min(max(len(values) // 20, 1), 200) + 1)
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(np.log(values)):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return np.exp(out)
