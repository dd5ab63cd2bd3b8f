"""Kernel microbenchmarks: each fused operator vs its eager reference (ops/reference.py) vs
torch.compile of that reference, in one run, forward and forward+backward, as ratios.

Shapes follow Latte: S = (B2, F16, N256, D384, H6, Dh64), XL = (B1, F16, N256, D1152, H16,
Dh72); on CUDA also the same with B8. Memory-bound ops also report their useful traffic as
GB/s and as a share of the device's copy bandwidth, measured in the same run.

The variants of a case take turns of a few back-to-back calls, round after round, and each
ratio is the median of per-round ratios (bench.common.time_paired): on a shared cloud host the
memory bandwidth left to us drifts by 2x within minutes, which moved ratios of variants timed
one after the other by up to 2x between runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fvdm import ops
from fvdm.bench.common import copy_bandwidth_gbs, time_paired
from fvdm.ops import reference as ref

SHAPES = {
    # name: (B, F, N, D, H)   (Dh = D / H)
    "S": (2, 16, 256, 384, 6),
    "XL": (1, 16, 256, 1152, 16),
    "S-B8": (8, 16, 256, 384, 6),
    "XL-B8": (8, 16, 256, 1152, 16),
}
DEFAULT_SHAPES = {"cpu": ["S", "XL"], "cuda": ["S", "XL", "S-B8", "XL-B8"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ["adaln_modulate", "gated_residual", "noise_inject", "frame_combine", "temporal_attention"]
MODES = ["fwd", "fwd+bwd"]


@dataclass
class Target:
    """A performance goal: metric >= threshold for matching rows ("*" matches anything)."""

    device: str
    op: str
    dtype: str
    mode: str
    metric: str  # "vs_reference" | "vs_compiled" | "pct_copy" | "vs_sdpa_pretransposed"
    threshold: float

    def applies(self, device: str, row: dict) -> bool:
        return (
            self.device == device
            and self.op in ("*", row["op"])
            and self.dtype in ("*", row["dtype"])
            and self.mode in ("*", row["mode"])
        )


# The speed each kernel must reach: vs the reference, vs torch.compile, or as a share of the
# device's copy bandwidth (CPU in fp32, CUDA in bf16).
TARGETS = [
    Target("cpu", "adaln_modulate", "fp32", "fwd", "vs_reference", 6.0),
    Target("cpu", "adaln_modulate", "fp32", "fwd", "pct_copy", 40.0),
    Target("cpu", "adaln_modulate", "fp32", "fwd+bwd", "vs_reference", 3.0),
    Target("cpu", "gated_residual", "fp32", "fwd", "vs_reference", 2.0),
    Target("cpu", "noise_inject", "fp32", "fwd", "vs_reference", 2.0),
    Target("cpu", "temporal_attention", "fp32", "fwd", "vs_reference", 2.0),
    Target("cpu", "temporal_attention", "fp32", "fwd+bwd", "vs_reference", 1.5),
    Target("cpu", "*", "fp32", "fwd", "vs_compiled", 1.0),
    Target("cuda", "adaln_modulate", "bf16", "fwd", "pct_copy", 80.0),
    Target("cuda", "noise_inject", "bf16", "fwd", "pct_copy", 80.0),
    Target("cuda", "adaln_modulate", "bf16", "fwd", "vs_compiled", 1.0),
    Target("cuda", "noise_inject", "bf16", "fwd", "vs_compiled", 1.0),
    Target("cuda", "adaln_modulate", "bf16", "fwd+bwd", "vs_compiled", 1.2),
    Target("cuda", "temporal_attention", "bf16", "fwd", "vs_reference", 2.0),
    Target("cuda", "temporal_attention", "bf16", "fwd+bwd", "vs_reference", 1.5),
    Target("cuda", "temporal_attention", "bf16", "*", "vs_sdpa_pretransposed", 1.0),
]


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    mode: str
    make_inputs: Callable[[], tuple]  # fresh inputs (requires_grad where the mode needs it)
    fused: Callable
    reference: Callable
    bytes_moved: int | None = None  # useful traffic of the forward (memory-bound ops)
    extra: dict[str, tuple[Callable[[], tuple], Callable]] = field(default_factory=dict)


def _cases(op: str, shape: str, dtype_name: str, mode: str, device: torch.device) -> Case | None:
    B, Fr, N, D, H = SHAPES[shape]
    Dh = D // H
    dtype = DTYPES[dtype_name]
    grad = mode == "fwd+bwd"
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, requires_grad=False):
        t = torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return t.requires_grad_(requires_grad)

    el = torch.finfo(dtype).bits // 8
    act = B * Fr * N * D
    if op == "adaln_modulate":
        return Case(op, shape, dtype_name, mode,
                    lambda: (randn(B, Fr, N, D, requires_grad=grad), randn(B, Fr, D, requires_grad=grad),
                             randn(B, Fr, D, requires_grad=grad)),
                    ops.adaln_modulate, ref.adaln_modulate_ref, bytes_moved=2 * act * el)
    if op == "gated_residual":
        return Case(op, shape, dtype_name, mode,
                    lambda: (randn(B, Fr, N, D, requires_grad=grad), randn(B, Fr, N, D, requires_grad=grad),
                             randn(B, Fr, D, requires_grad=grad)),
                    ops.gated_residual, ref.gated_residual_ref, bytes_moved=3 * act * el)
    if op == "noise_inject":
        if grad:
            return None  # the forward process is not differentiated in practice
        ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        t = torch.randint(0, 1000, (B, Fr), generator=gen, device=device)
        return Case(op, shape, dtype_name, mode,
                    lambda: (randn(B, Fr, N, D), randn(B, Fr, N, D), t, a, s),
                    ops.noise_inject, ref.noise_inject_ref, bytes_moved=3 * act * el)
    if op == "frame_combine":
        if grad:
            return None
        c = torch.randn(B, Fr, 3, generator=gen, device=device)
        # A DDPM step: c0 * x_t + c1 * eps_pred + c2 * z.
        return Case(op, shape, dtype_name, mode,
                    lambda: (randn(B, Fr, N, D), randn(B, Fr, N, D), randn(B, Fr, N, D), c),
                    lambda x, e, z, c: ops.frame_combine([x, e, z], c),
                    lambda x, e, z, c: ref.frame_combine_ref([x, e, z], c), bytes_moved=4 * act * el)
    if op == "temporal_attention":
        # The (B, F, N, 3, H, Dh) qkv projection output, as in the model: the fused op takes it
        # packed (temporal_attention_qkv, as the model calls it), the reference unbinds it into
        # q, k, v views as a Latte block does.
        def attn(fn):
            return lambda qkv: fn(*qkv.unbind(3))

        def sdpa_pre(q, k, v):  # the best case for SDPA: inputs already (B*N, H, F, Dh) contiguous
            return F.scaled_dot_product_attention(q, k, v)

        return Case(op, shape, dtype_name, mode,
                    lambda: (randn(B, Fr, N, 3, H, Dh, requires_grad=grad),),
                    ops.temporal_attention_qkv, attn(ref.temporal_attention_ref), bytes_moved=4 * act * el,
                    extra={"sdpa_pretransposed": (
                        lambda: tuple(randn(B * N, H, Fr, Dh, requires_grad=grad) for _ in range(3)), sdpa_pre)})
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def _runner(fn: Callable, inputs: tuple, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    out = fn(*inputs)
    grad_out = torch.randn_like(out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        fn(*inputs).backward(grad_out)
    return run


def _compiled(fn: Callable) -> Callable:
    torch._dynamo.reset()  # each case compiles afresh (avoids the recompile limit across shapes)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def run_case(case: Case, device: torch.device, compile_ref: bool, min_seconds: float, copy_gbs: float) -> dict:
    """Times every implementation of one case. copy_gbs: the device's large-copy bandwidth, the
    yardstick of "% of copy bandwidth" for memory-bound rows."""
    impls: dict[str, tuple[Callable[[], tuple], Callable]] = {
        "fused": (case.make_inputs, case.fused),
        "reference": (case.make_inputs, case.reference),
    }
    if compile_ref:
        impls["compiled"] = (case.make_inputs, _compiled(case.reference))
    impls.update(case.extra)
    # All variants timed in turns, round after round: the vs_* ratios are paired (time_paired).
    runners = {name: _runner(fn, make(), case.mode) for name, (make, fn) in impls.items()}
    ms, ratios = time_paired(runners, device, min_seconds=min_seconds)
    row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": case.mode, "ms": ms}
    for name, ratio in ratios.items():
        row[f"vs_{name}"] = ratio
    if case.bytes_moved and case.mode == "fwd":
        row["gbs"] = case.bytes_moved / (ms["fused"] * 1e-3) / 1e9
        row["pct_copy"] = 100.0 * row["gbs"] / copy_gbs
        # A plain copy of the same traffic, timed now: stricter when the working set fits in cache.
        row["copy_same_size_gbs"] = copy_bandwidth_gbs(device, case.bytes_moved // 2)
        row["pct_copy_same_size"] = 100.0 * row["gbs"] / row["copy_same_size_gbs"]
    return row


def evaluate_targets(device: str, rows: list[dict]) -> list[dict]:
    """Records in each row the targets that apply to it; returns one verdict per (target, row)."""
    verdicts = []
    for row in rows:
        row["targets"] = []
        for t in TARGETS:
            if t.applies(device, row) and t.metric in row:
                ok = row[t.metric] >= t.threshold
                row["targets"].append({"metric": t.metric, "threshold": t.threshold, "value": row[t.metric], "met": ok})
                verdicts.append({"row": f"{row['op']} {row['shape']} {row['dtype']} {row['mode']}",
                                 "metric": t.metric, "threshold": t.threshold, "value": row[t.metric], "met": ok})
    return verdicts


def plan(device: torch.device, shapes: Iterable[str], dtypes: Iterable[str], op_names: Iterable[str],
         modes: Iterable[str]) -> list[Case]:
    cases = []
    for op in op_names:
        for shape in shapes:
            for dt in dtypes:
                for mode in modes:
                    c = _cases(op, shape, dt, mode, device)
                    if c is not None:
                        cases.append(c)
    return cases
