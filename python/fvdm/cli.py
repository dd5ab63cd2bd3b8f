"""Command line: `python -m fvdm info | bench ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import fvdm

app = typer.Typer(help="fvdm: Frame-Aware Video Diffusion with per-frame timesteps.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks: fused kernels vs eager reference vs torch.compile.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
# Wide tables stay readable when output goes to a file or CI log.
console = Console(width=None if Console().is_terminal else 160)


def fail(message: str) -> None:
    """A one-line error and a non-zero exit code, no traceback."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


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


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        fail(f"unsupported device {name!r}; use cpu or cuda")
    return device


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


@bench_app.command("model")
def bench_model(
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    size: Annotated[str, typer.Option(help="model size: S/2, B/2, L/2, XL/2, mini/2, T/2")] = "S/2",
    batch: Annotated[int, typer.Option(min=1, help="clips per step")] = 1,
    frames: Annotated[int, typer.Option(min=1, help="frames per clip")] = 16,
    dtype: Annotated[str, typer.Option(help="fp32, or bf16 (autocast)")] = "fp32",
    steps: Annotated[int, typer.Option(min=1, help="timed steps per measurement")] = 3,
    variants: Annotated[str, typer.Option(help="comma list of fused, reference, compiled")] = "fused,reference,compiled",
    out: Annotated[Path | None, typer.Option(help="JSON output path (default benchmarks/results/model-<device>.json)")] = None,
) -> None:
    """Time one training step and one sampling step of the video DiT: fused vs reference vs torch.compile."""
    from fvdm.bench import model as mb
    from fvdm.bench.common import write_results
    from fvdm.models import LATTE_SIZES

    dev = _device(device)
    if size not in LATTE_SIZES:
        fail(f"unknown model size {size!r}; choose from {', '.join(LATTE_SIZES)}")
    if dtype not in ("fp32", "bf16"):
        fail(f"--dtype must be fp32 or bf16, got {dtype!r}")
    names = _split(variants, list(mb.VARIANTS), "variant")
    cfg = mb.ModelBenchConfig(size=size, batch=batch, frames=frames, dtype=dtype, steps=steps, device=dev.type)
    rows = []
    with progress() as bar:
        task = bar.add_task("model bench", total=len(names))
        for name in names:
            bar.update(task, description=f"{size} {name} (own process)")
            rows.extend(mb.run(cfg, [name]))
            bar.advance(task)
    base = {r["variant"]: r for r in rows if "error" not in r}
    table = Table(title=f"fvdm model {size}, B{batch} F{frames} {cfg.latent_size}x{cfg.latent_size}x{cfg.channels}, {dtype}, {dev.type}")
    mem_key = "train_step_peak_mib" if dev.type == "cuda" else "peak_rss_mib"
    for col in ["variant", "train step ms", "sample step ms", "peak MiB", "train vs fused"]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["variant"], f"[red]{r['error']}[/]", "", "", "")
            continue
        ratio = r["train_step_ms"] / base["fused"]["train_step_ms"] if "fused" in base else None
        table.add_row(r["variant"], f"{r['train_step_ms']:.1f}", f"{r['sample_step_ms']:.1f}", f"{r[mem_key]:.0f}",
                      f"{ratio:.2f}x" if ratio else "-")
    console.print(table)
    if "fused" in base:
        for other in ("reference", "compiled"):
            if other in base:
                for k in ("train_step_ms", "sample_step_ms"):
                    base["fused"][f"{k.split('_ms')[0]}_speedup_vs_{other}"] = base[other][k] / base["fused"][k]
    path = write_results(f"model-{size.replace('/', '')}-{dtype}", dev, {"config": vars(cfg), "rows": rows}, out)
    console.print(f"results written to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
