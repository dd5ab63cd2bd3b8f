"""Shared test helpers: tolerances and the low-precision error rule."""

from __future__ import annotations

import sys

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(fused: torch.Tensor, ref_same_dtype: torch.Tensor, ref_exact: torch.Tensor, name: str = "out",
                             conditioning_slack: float = 0.0):
    """FlashAttention's rule: the fused result's error against an exact (float64) reference may
    be at most twice the error of the plain-PyTorch reference run in the same dtype, plus a
    small absolute slack for values that round identically in both."""
    assert fused.shape == ref_exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref_exact.shape)}"
    assert fused.dtype == ref_same_dtype.dtype, f"{name}: dtype {fused.dtype} != {ref_same_dtype.dtype}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    if fused.dtype == torch.float32:
        slack = 1e-5 * max(1.0, ref_exact.abs().max().item()) if ref_exact.numel() else 0.0
    elif fused.dtype == torch.float64:
        slack = 1e-10
    else:
        eps = torch.finfo(fused.dtype).eps
        slack = eps * max(1.0, ref_exact.abs().max().item()) if ref_exact.numel() else 0.0
    slack += conditioning_slack  # error any implementation has on ill-conditioned input (the caller says why)
    err_fused = max_err(fused, ref_exact)
    err_ref = max_err(ref_same_dtype, ref_exact)
    assert err_fused <= 2 * err_ref + slack, f"{name}: fused error {err_fused:.3e} > 2 x reference error {err_ref:.3e} + {slack:.1e}"


def rand(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m fvdm ARGS` in this process: (exit status, stdout, stderr)."""
    from fvdm.cli import main

    old = sys.argv
    sys.argv = ["fvdm", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


# Overrides of the demo config for a run of two steps that takes a second or two.
TINY = [
    "model.size=T/2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2",
    "data.size=8", "data.num_frames=4", "data.num_videos=32", "train.batch_size=2", "train.steps=2",
    "train.ckpt_every=2", "train.log_every=1", "train.sample_steps=2", "train.sample_videos=1",
    "sample.steps=2", "sample.num_videos=1", "sample.unconditional_videos=2", "train.precision=fp32", "model.self_condition=false",
    "model.conv_head=0",
]
