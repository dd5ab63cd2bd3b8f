"""Training steps per second of a config in fp32 and in bf16 autocast, forced, taking turns.

    PYTHONPATH=python python benchmarks/train_precision.py [--config demo_cpu] [--steps 60]
        [--rounds 2] [--note "busy host"]

Each turn builds the trainer afresh (same seed, same clips) and times `--steps` optimizer steps
(data, forward, backward, AdamW, EMA; no checkpoints or previews), the first `--warmup` not
counted. Writes benchmarks/results/train-precision-<config>-<machine>.json with what
train.precision=auto picks on this machine and why.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fvdm.bench.common import write_results
from fvdm.config import load_config
from fvdm.precision import resolve_precision
from fvdm.train.trainer import Trainer


def steps_per_second(config: str, precision: str, steps: int, warmup: int, run_dir: str) -> float:
    cfg = load_config(config, [f"train.precision={precision}", "train.device=cpu"])
    trainer = Trainer(cfg, run_dir, progress=False)
    for step in range(warmup):
        trainer.train_step(step)
    t0 = time.perf_counter()
    for step in range(warmup, steps):
        trainer.train_step(step)
    return (steps - warmup) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo_cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--note", default="", help="how busy the host was, recorded with the numbers")
    args = ap.parse_args()
    rows = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for precision in rows:
            with tempfile.TemporaryDirectory() as tmp:
                its = steps_per_second(args.config, precision, args.steps, args.warmup, tmp)
            rows[precision].append(its)
            print(f"round {r + 1}: {precision} {its:.2f} it/s", flush=True)
    auto = resolve_precision("auto", torch.device("cpu"))
    summary = {p: {"it_per_s": v, "median": statistics.median(v)} for p, v in rows.items()}
    ratio = summary["fp32"]["median"] / summary["bf16"]["median"]
    print(f"median fp32 {summary['fp32']['median']:.2f} it/s, bf16 {summary['bf16']['median']:.2f} it/s "
          f"(fp32 / bf16 = {ratio:.2f}); auto picks {auto.describe()}")
    cfg = load_config(args.config)
    path = write_results(f"train-precision-{cfg.name}", torch.device("cpu"), {
        "config": args.config, "batch_size": cfg.train.batch_size, "steps_timed": args.steps - args.warmup,
        "warmup": args.warmup, "rounds": args.rounds, "note": args.note, "results": summary,
        "fp32_over_bf16": ratio, "auto": auto.to_dict()})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
