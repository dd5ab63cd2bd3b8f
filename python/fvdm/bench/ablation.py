"""The ablation FVDM's claim rests on: PTSS (p = 0.2) against a scalar-timestep model (p = 0)
and fully independent frame times (p = 1), trained with identical seeds, data and budget,
then scored on every zero-shot task where the truth is known (fvdm.eval.synthetic).

The scalar model does the conditional tasks the usual way, by replacement (given frames
re-noised to the current time each step); it is also scored holding them clean at t = 0 as
FVDM does, which it never saw in training. The arms are ordinary run directories: running the
ablation again reuses finished arms and resumes unfinished ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fvdm.config import Config, load_config
from fvdm.eval.synthetic import GENERATION_TASKS, evaluate_synthetic
from fvdm.pipeline.runs import load_run
from fvdm.train.trainer import train

# arm name -> (PTSS p, conditioning ways it is scored)
ARMS: dict[str, tuple[float, tuple[str, ...]]] = {
    "ptss": (0.2, ("hold",)),
    "scalar": (0.0, ("replace", "hold")),
    "independent": (1.0, ("hold",)),
}


def arm_config(config: str, overrides: list[str], p: float) -> Config:
    """The shared config with this arm's PTSS p; everything else (seeds included) identical."""
    return load_config(config, [*overrides, f"diffusion.ptss_p={p}"])


def run_ablation(
    config: str = "demo_cpu",
    overrides: list[str] | None = None,
    out_dir: Path = Path("runs/ablation"),
    videos: int = 32,
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
    on_eval: Callable[[str, int, int], None] | None = None,
    i3d=None,
) -> dict:
    """Train (or reuse) every arm, then evaluate each the ways ARMS lists. Returns
    {"columns": {column: {task: {"model": ..., "data": ...}}}, "arms": {...}}, where a column
    is "<arm> (<conditioning>)". i3d (an fvdm.eval.fvd.Detector): I3D FVD of the unconditional
    task beside the proxy FVD."""
    overrides = list(overrides or [])
    columns: dict[str, dict] = {}
    arms: dict[str, dict] = {}
    for name, (p, ways) in ARMS.items():
        run_dir = Path(out_dir) / name
        if on_stage:
            on_stage(f"train {name} (p={p}) -> {run_dir}")
        result = train(arm_config(config, overrides, p), run_dir, resume=True, progress=progress)
        if result.interrupted:
            raise KeyboardInterrupt(f"{name} stopped by {result.interrupted} at step {result.step}")
        loaded = load_run(run_dir, device=device)
        arms[name] = {"ptss_p": p, "run": str(run_dir), "checkpoint": str(loaded.checkpoint), "step": loaded.step}
        for way in ways:
            if on_stage:
                on_stage(f"evaluate {name} ({way})")
            columns[f"{name} ({way})"] = evaluate_synthetic(loaded, num_videos=videos, steps=steps, seed=seed,
                                                            tasks=GENERATION_TASKS, conditioning=way, callback=on_eval,
                                                            i3d=i3d)
    return {"columns": columns, "arms": arms}


def table_rows(columns: dict[str, dict]) -> list[tuple[str, str, list[float | None], float | None]]:
    """(task, metric, value per column, true data's value) for printing."""
    first = next(iter(columns.values()))
    rows = []
    for task, cols in first.items():
        for metric in cols["model"]:
            values = [c.get(task, {}).get("model", {}).get(metric) for c in columns.values()]
            rows.append((task, metric, values, cols.get("data", {}).get(metric)))
    return rows
