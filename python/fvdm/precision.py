"""Which arithmetic training runs in: `train.precision: auto | fp32 | bf16`.

bf16 autocast pays only where the hardware multiplies bf16 natively. On an x86 CPU that means
AVX512-BF16 or AMX; without them oneDNN converts every matmul's operands to fp32 and back, and
the demo trained 2.5x slower in bf16 than in fp32 on a 2-core Xeon without AVX512-BF16 (1.3-1.5
vs 3.3 it/s). On CUDA, bf16 where the GPU supports it (Ampere and later). `auto` picks bf16
exactly there and fp32 everywhere else; `fp32` and `bf16` force a choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")

# CPU features with native bf16 matmuls (Linux /proc/cpuinfo names).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    name: str  # what training runs in: fp32 | bf16 (autocast)
    requested: str  # train.precision as configured: auto | fp32 | bf16
    reason: str  # one phrase: why

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"

    def to_dict(self) -> dict:
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}


def choose_precision(requested: str, device_type: str, cpu_bf16: tuple[str, ...] = (),
                     cuda_bf16: bool = False) -> Precision:
    """The choice from the facts: cpu_bf16 is the CPU's native-bf16 features (a subset of
    CPU_BF16_FLAGS), cuda_bf16 whether the CUDA device supports bf16."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return Precision(requested, requested, f"train.precision={requested}")
    if device_type == "cuda":
        if cuda_bf16:
            return Precision("bf16", "auto", "auto: this GPU computes bf16 natively")
        return Precision("fp32", "auto", "auto: this GPU has no bf16 support")
    if device_type == "cpu":
        if cpu_bf16:
            return Precision("bf16", "auto", f"auto: this CPU has {' and '.join(f.upper() for f in cpu_bf16)}")
        return Precision("fp32", "auto", "auto: this CPU has neither AVX512_BF16 nor AMX_BF16, where bf16 "
                                         "autocast runs slower than fp32; train.precision=bf16 forces it")
    return Precision("fp32", "auto", f"auto: fp32 on {device_type}")


def cpu_bf16_features(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The CPU_BF16_FLAGS this CPU has: from the `flags` line of /proc/cpuinfo (or the text
    given), else from torch's own CPU probe (the one its bf16 kernels dispatch on)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return tuple(f for f in CPU_BF16_FLAGS if f in flags)
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = []
    for flag, probe in probes.items():
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                found.append(flag)
        except RuntimeError:
            pass
    return tuple(found)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """choose_precision with this machine's facts."""
    if requested != "auto":
        return choose_precision(requested, device.type)
    if device.type == "cuda":
        return choose_precision("auto", "cuda", cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    return choose_precision("auto", device.type, cpu_bf16=cpu_bf16_features() if device.type == "cpu" else ())


__all__ = ["PRECISIONS", "Precision", "choose_precision", "cpu_bf16_features", "resolve_precision"]
