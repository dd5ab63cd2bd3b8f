"""Model benchmark: one training step (forward + backward + AdamW) and one sampling step of the
video DiT, with the fused operators vs the reference backend vs torch.compile of the reference
model, in the same run. Each variant runs in its own process so that peak memory (CUDA: peak
allocated; CPU: peak resident set size of the process) belongs to that variant alone.

With profile=True each variant also profiles one training step and splits its operator time
into classes (`op_class`): Linear layers, attention through SDPA, fvdm's fused operators, and
the rest. The Linear layers run identically in every variant, so the split bounds what the
fused operators can ever buy (`fused_ops_free_speedup`)."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

VARIANTS = ("fused", "reference", "compiled")


@dataclass
class ModelBenchConfig:
    size: str = "S/2"
    batch: int = 1
    frames: int = 16
    latent_size: int = 32  # 32x32x4 latents, as SD-VAE gives for 256x256 video
    channels: int = 4
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    steps: int = 3  # timed steps after warmup
    warmup: int = 1
    device: str = "cpu"
    profile: bool = False  # also split one training step's operator time by op_class
    gelu: str = "exact"  # the MLP's GELU: exact | tanh


OP_CLASSES = ("linear", "sdpa", "fvdm", "other")


def op_class(name: str) -> str:
    """The class of a profiler event name: "linear" (matrix products), "sdpa" (torch's
    scaled_dot_product_attention kernels), "fvdm" (our operators and their autograd nodes),
    or "other"."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"):
        return "linear"
    if "scaled_dot_product" in name:
        return "sdpa"
    if name.startswith("fvdm::") or "_fvdm_" in name:
        return "fvdm"
    return "other"


def profile_classes(step, device: torch.device) -> dict[str, float]:
    """Self time (ms) by op_class of one call of step(), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ms = dict.fromkeys(OP_CLASSES, 0.0)
    for event in prof.key_averages():
        ms[op_class(event.key)] += getattr(event, attr) / 1e3
    return ms


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(variant: str, cfg_dict: dict, queue) -> None:
    """Child process: build the model for one variant, time the steps, report through queue."""
    try:
        queue.put(_measure_inner(variant, ModelBenchConfig(**cfg_dict)))
    except Exception as exc:  # report, do not hang the parent
        queue.put({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})


def _measure_inner(variant: str, cfg: ModelBenchConfig) -> dict:
    from fvdm.diffusion import diffusion_loss, make_schedule, sample_timesteps
    from fvdm.models import latte

    device = torch.device(cfg.device)
    torch.manual_seed(0)
    backend = "fused" if variant == "fused" else "reference"
    model = latte(cfg.size, backend=backend, num_frames=cfg.frames, input_size=cfg.latent_size,
                  in_channels=cfg.channels, learn_sigma=True, gelu=cfg.gelu).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    fn = torch.compile(model) if variant == "compiled" else model
    schedule = make_schedule("linear")
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(cfg.batch, cfg.frames, cfg.channels, cfg.latent_size, cfg.latent_size, device=device, generator=gen)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        t = sample_timesteps(cfg.batch, cfg.frames, 0.2, generator=gen, device=device)
        with amp:
            loss = diffusion_loss(fn, schedule, x0, t, learn_sigma=True, generator=gen, ops=model.ops).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample_step():
        t = torch.full((cfg.batch, cfg.frames), 500.0, device=device)
        with amp:
            fn(x0, t)

    results = {"variant": variant}
    for name, step in (("train_step", train_step), ("sample_step", sample_step)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = _rss_mib()
        for _ in range(cfg.warmup):  # includes compilation for the compiled variant
            step()
        sync()
        times = []
        for _ in range(cfg.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        results[f"{name}_ms"] = statistics.median(times)
        if device.type == "cuda":
            results[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            results[f"{name}_rss_before_mib"] = rss_before
    if cfg.profile:
        results["train_step_profile_ms"] = profile_classes(train_step, device)
    if device.type == "cpu":
        results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return results


def fused_ops_free_speedup(rows: list[dict]) -> float | None:
    """The most the fused operators could give at this shape: the reference step's profiled
    time over a fused step in which fvdm's operators take no time, with the Linear layers
    costed as in the reference run (the same matrix products in both; this removes their
    run-to-run noise, several percent on a busy CPU). None without both profiles."""
    by = {r["variant"]: r.get("train_step_profile_ms") for r in rows}
    ref, fused = by.get("reference"), by.get("fused")
    if not ref or not fused:
        return None
    return sum(ref.values()) / (ref["linear"] + fused["sdpa"] + fused["other"])


def run(cfg: ModelBenchConfig, variants=VARIANTS) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for variant in variants:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(variant, asdict(cfg), queue))
        proc.start()
        row = queue.get()
        proc.join()
        rows.append(row)
    return rows


def report(rows: list[dict], cfg: ModelBenchConfig) -> tuple[list, dict]:
    """What `fvdm bench model` prints (rich Tables and lines) for the rows of run(), and the
    extra keys of its results file; each fused row gains its speedups over the other variants."""
    from rich.table import Table

    shown: list = []
    extra: dict = {}
    base = {r["variant"]: r for r in rows if "error" not in r}
    table = Table(title=f"fvdm model {cfg.size}, B{cfg.batch} F{cfg.frames} {cfg.latent_size}x{cfg.latent_size}"
                        f"x{cfg.channels}, {cfg.dtype}, {cfg.gelu} GELU, {cfg.device}")
    mem_key = "train_step_peak_mib" if cfg.device == "cuda" else "peak_rss_mib"
    for col in ["variant", "train step ms", "sample step ms", "peak MiB", "train vs fused"]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["variant"], f"[red]{r['error']}[/]", "", "", "")
            continue
        ratio = r["train_step_ms"] / base["fused"]["train_step_ms"] if "fused" in base else None
        table.add_row(r["variant"], f"{r['train_step_ms']:.1f}", f"{r['sample_step_ms']:.1f}", f"{r[mem_key]:.0f}",
                      f"{ratio:.2f}x" if ratio else "-")
    shown.append(table)
    if cfg.profile:
        prof = Table(title="one training step's operator time by class, ms (profiled)")
        for col in ["variant", *OP_CLASSES, "total", "linear share"]:
            prof.add_column(col, justify="left" if col == "variant" else "right")
        for r in rows:
            ms = r.get("train_step_profile_ms")
            if ms:
                total = sum(ms.values())
                prof.add_row(r["variant"], *(f"{ms[c]:.1f}" for c in OP_CLASSES), f"{total:.1f}",
                             f"{100 * ms['linear'] / total:.0f}%")
        shown.append(prof)
        bound = fused_ops_free_speedup(rows)
        if bound is not None:
            extra["fused_ops_free_speedup"] = bound
            shown.append(f"with fvdm's ops taking no time at all, the fused step would be {bound:.2f}x the "
                         "reference step (the most the fused operators can give at this shape)")
    if "fused" in base:
        for other in ("reference", "compiled"):
            if other in base:
                for k in ("train_step_ms", "sample_step_ms"):
                    base["fused"][f"{k.split('_ms')[0]}_speedup_vs_{other}"] = base[other][k] / base["fused"][k]
    return shown, extra
