"""Timing, machine description and result files shared by the benchmark suites."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fvdm

RESULTS_DIR = Path("benchmarks") / "results"


def keep_freed_memory() -> bool:
    """Tells glibc malloc to keep freed memory in the heap instead of returning it to the OS
    (no mmap for large blocks, no trimming). Otherwise, whether a freed activation buffer is
    unmapped and page-faulted back on the next call depends on heap history, and the eager
    reference's temporaries swing between e.g. 1 ms and 9 ms from run to run. With this, every
    variant runs with a warm allocator, as PyTorch's caching allocator gives on CUDA. The
    benchmarks use it by default on the CPU; --default-allocator measures without it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        big = 1 << 30
        return bool(libc.mallopt(M_MMAP_THRESHOLD, big)) and bool(libc.mallopt(M_TRIM_THRESHOLD, big))
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, min_runs: int = 5,
            min_seconds: float = 0.5, max_runs: int = 200) -> float:
    """Median wall time of fn() in milliseconds, after warmup; runs at least min_runs times and
    until min_seconds have passed (bounded by max_runs)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_paired(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3, min_rounds: int = 5,
                min_seconds: float = 0.5, max_rounds: int = 200, turn: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Times several implementations of one thing in rounds: in each round every variant takes
    a turn of one untimed call (its own data back in cache, as in back-to-back calls) and
    `turn` timed ones (their median is its time for the round). All variants thus see nearly
    the same state of a shared host, whose memory bandwidth left to us drifts by 2x within
    minutes on a cloud VM. Returns (median over rounds of each variant's ms, and for each name
    but the first the median over rounds of its time over the first's: a paired ratio, which
    such drift moves far less than a ratio of medians timed minutes apart)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    while len(rounds[names[0]]) < min_rounds or (time.perf_counter() - start < min_seconds * len(names)
                                                  and len(rounds[names[0]]) < max_rounds):
        for name in names:
            fns[name]()
            synchronize(device)
            times = []
            for _ in range(turn):
                t0 = time.perf_counter()
                fns[name]()
                synchronize(device)
                times.append((time.perf_counter() - t0) * 1e3)
            rounds[name].append(statistics.median(times))
    ms = {name: statistics.median(ts) for name, ts in rounds.items()}
    first = rounds[names[0]]
    ratios = {name: statistics.median(t / f for t, f in zip(rounds[name], first)) for name in names[1:]}
    return ms, ratios


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Copy bandwidth (bytes read + bytes written per second) of a tensor copy of nbytes. The
    default is far larger than any cache; a copy the size of an operator's working set tells
    what that operator could reach if it were a plain copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, min_runs=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _cpuinfo() -> dict[str, str]:
    """Each /proc/cpuinfo field's first value (empty where there is no such file)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_model(cpuinfo: dict[str, str] | None = None) -> str:
    model = (cpuinfo if cpuinfo is not None else _cpuinfo()).get("model name")
    return model or platform.processor() or platform.machine()


# CPU flags that tell hosts sold under one model name apart (a cloud "AMD EPYC" may be a Zen 4
# or a Zen 5 part; avx512_vp2intersect is Zen 5's) and that the kernels use.
_NOTABLE_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
                      "avx512_vp2intersect", "amx_tile")


def _cpu_details(cpuinfo: dict[str, str]) -> dict:
    """Notable CPU flags and the last-level cache size, where Linux tells them."""
    details: dict = {}
    if "flags" in cpuinfo:
        flags = set(cpuinfo["flags"].split())
        details["cpu_flags"] = [f for f in _NOTABLE_CPU_FLAGS if f in flags]
    try:
        caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
        if caches:
            details["llc"] = (caches[-1] / "size").read_text().strip()
    except OSError:
        pass
    return details


def machine_info(device: torch.device) -> dict:
    cpuinfo = _cpuinfo()
    info = {
        "device": device.type,
        "cpu": _cpu_model(cpuinfo),
        **_cpu_details(cpuinfo),
        "cpu_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fvdm": fvdm.__version__,
        "fvdm_build": {k: v for k, v in fvdm.build_info().items() if k not in ("parallel", "kernels")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}"[:60]


def write_results(suite: str, device: torch.device, payload: dict, out: Path | None = None) -> Path:
    """Writes JSON with the machine description next to the rows; returns the path."""
    path = out or RESULTS_DIR / f"{suite}-{device_tag(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "suite": suite,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        **payload,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path
