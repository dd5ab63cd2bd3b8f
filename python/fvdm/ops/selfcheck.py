"""First-use check of the fused kernels on a CUDA device.

The first time a fused op runs on a CUDA device in a dtype, it is run once more on tiny inputs
(forward and backward, reaching the tensor-core and the generic kernels) and compared with the
plain-PyTorch reference on the same device; a mismatch raises `KernelSelfCheckError` naming the
op, the device and the way to continue (`backend="reference"`), so a kernel that is wrong on
some GPU never trains a model silently. Costs a few tiny launches per (op, device, dtype);
`FVDM_SELF_CHECK=0` or `set_self_check(False)` turns it off.

The kernels themselves are tested on the CPU through the CUDA emulation
(the `cuda_emu` device of tests/test_op_*.py); this check is for what only the hardware can get wrong
(compiler, architecture, driver).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from fvdm.ops import reference as R

__all__ = ["KernelSelfCheckError", "ensure_checked", "run_self_check", "set_self_check", "self_check_enabled"]


class KernelSelfCheckError(RuntimeError):
    """A fused kernel disagreed with the reference on this device."""


_enabled = os.environ.get("FVDM_SELF_CHECK", "1").strip() not in {"0", "false", "no", "off"}
_checked: dict[tuple[str, str, torch.dtype], float] = {}  # -> seconds the check took


def set_self_check(enabled: bool) -> None:
    """Turn the first-use check of the fused CUDA kernels on or off (default on;
    FVDM_SELF_CHECK=0 in the environment turns it off)."""
    global _enabled
    _enabled = bool(enabled)


def self_check_enabled() -> bool:
    return _enabled


def checked() -> dict[tuple[str, str, torch.dtype], float]:
    """(op, device, dtype) -> seconds, for every check run so far."""
    return dict(_checked)


def ensure_checked(op: str, x: torch.Tensor) -> None:
    """Run the self-check of `op` for x's device and dtype once, if x is on a CUDA device."""
    if x.device.type != "cuda" or not _enabled or torch.compiler.is_compiling():
        return
    key = (op, str(x.device), x.dtype)
    if key in _checked:
        return
    _checked[key] = float("nan")  # mark first: the check calls the op itself
    t0 = time.perf_counter()
    run_self_check(op, x.device, x.dtype, torch.ops.fvdm)
    torch.cuda.synchronize(x.device)
    _checked[key] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the checks: tiny inputs, forward and backward, against the reference in the same dtype and in
# float64; a kernel passes when its error is within 4x the reference's own plus 4 ulps


def _rand(shape, dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _grads(fn: Callable, args: list[torch.Tensor], grad_out: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    fn(*leaves).backward(grad_out.to(dtype))
    return [a.grad for a in leaves]


def _compare(op: str, what: str, got: torch.Tensor, same: torch.Tensor, exact: torch.Tensor, device) -> None:
    exact = exact.double()
    mag = max(1.0, exact.abs().max().item())
    eps = torch.finfo(got.dtype).eps
    err = (got.double() - exact).abs().max().item() if got.numel() else 0.0
    err_ref = (same.double() - exact).abs().max().item() if same.numel() else 0.0
    allowed = 4 * err_ref + 4 * eps * mag
    if not (err <= allowed):  # NaN fails too
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise KernelSelfCheckError(
            f"fvdm: the fused {op} kernel gave wrong results on {device} ({name}) in {got.dtype}: {what} is off by "
            f"{err:.3g} where {allowed:.3g} is allowed. Continue with the plain-PyTorch operators "
            f"(backend=\"reference\"; in a config, model.backend=reference) and please report this GPU and "
            f"`python -m fvdm info`; FVDM_SELF_CHECK=0 skips this check."
        )


def _check_adaln(ops, device, dtype) -> None:
    shape = (2, 2, 5, 64)
    x = _rand(shape, dtype, device, 1) * 2 + 0.5
    shift, scale = _rand((2, 2, 64), dtype, device, 2), _rand((2, 2, 64), dtype, device, 3, 0.5)
    y, mean, rstd = ops.adaln_modulate(x, shift, scale, 1e-6)
    args = [x.double(), shift.double(), scale.double()]
    _compare("adaln_modulate", "y", y, R.adaln_modulate_ref(x, shift, scale), R.adaln_modulate_ref(*args), device)
    gy = _rand(shape, dtype, device, 4)
    got = ops.adaln_modulate_backward(gy, x, scale, mean, rstd)
    same = _grads(R.adaln_modulate_ref, [x, shift, scale], gy, dtype)
    exact = _grads(R.adaln_modulate_ref, args, gy, torch.float64)
    for name, g, s, e in zip(("dx", "dshift", "dscale"), got, same, exact):
        _compare("adaln_modulate", name, g, s, e, device)


def _check_gated(ops, device, dtype) -> None:
    shape = (2, 2, 5, 64)
    x, h, gate = _rand(shape, dtype, device, 1), _rand(shape, dtype, device, 2), _rand((2, 2, 64), dtype, device, 3)
    args = [x.double(), h.double(), gate.double()]
    out = ops.gated_residual(x, h, gate)
    _compare("gated_residual", "out", out, R.gated_residual_ref(x, h, gate), R.gated_residual_ref(*args), device)
    go = _rand(shape, dtype, device, 4)
    dh, dgate = ops.gated_residual_backward(go, h, gate)
    same = _grads(R.gated_residual_ref, [x, h, gate], go, dtype)
    exact = _grads(R.gated_residual_ref, args, go, torch.float64)
    _compare("gated_residual", "dh", dh, same[1], exact[1], device)
    _compare("gated_residual", "dgate", dgate, same[2], exact[2], device)


def _check_combine(ops, device, dtype) -> None:
    inputs = [_rand((2, 2, 40), dtype, device, k) for k in range(3)]
    coeffs = _rand((2, 2, 3), torch.float32, device, 9)
    exact_in = [i.double() for i in inputs]
    out = ops.frame_combine(inputs, coeffs)
    _compare("frame_combine", "out", out, R.frame_combine_ref(inputs, coeffs),
             R.frame_combine_ref(exact_in, coeffs.double()), device)
    go = _rand((2, 2, 40), dtype, device, 5)
    dinputs, _ = ops.frame_combine_backward(go, inputs, coeffs)
    fn = lambda c, *xs: R.frame_combine_ref(list(xs), c)  # noqa: E731
    same = _grads(fn, [coeffs, *inputs], go, dtype)
    exact = _grads(fn, [coeffs.double(), *exact_in], go, torch.float64)
    for k in range(3):
        _compare("frame_combine", f"dinputs[{k}]", dinputs[k], same[1 + k], exact[1 + k], device)


def _check_noise(ops, device, dtype) -> None:
    x0, noise = _rand((2, 3, 40), dtype, device, 1), _rand((2, 3, 40), dtype, device, 2)
    t = torch.tensor([[0, 500, 999], [10, 20, 30]], device=device)
    ab = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64, device=device)
    sa, s1 = ab.sqrt().float(), (1 - ab).sqrt().float()
    out = ops.noise_inject(x0, noise, t, sa, s1)
    exact = R.noise_inject_ref(x0.double(), noise.double(), t, sa.double(), s1.double())
    _compare("noise_inject", "x_t", out, R.noise_inject_ref(x0, noise, t, sa, s1), exact, device)


def _check_attention(ops, device, dtype) -> None:
    # Dh 64 takes the tensor-core kernels for bf16/fp16 on sm_80+, Dh 8 the generic ones.
    for Dh in (64, 8):
        qkv = _rand((1, 8, 2, 3, 2, Dh), dtype, device, Dh)
        q, k, v = qkv.unbind(3)
        mask = torch.tensor([[True, False, True, True, True, True, False, True]], device=device)
        scale = Dh**-0.5
        out, lse = ops.temporal_attention_qkv(qkv, mask, True, scale)
        fn = lambda a, b, c: R.temporal_attention_ref(a, b, c, mask, True, scale)  # noqa: E731
        _compare("temporal_attention", f"out (Dh={Dh})", out, fn(q, k, v), fn(q.double(), k.double(), v.double()),
                 device)
        go = _rand(out.shape, dtype, device, 7)
        dqkv = ops.temporal_attention_qkv_backward(go, qkv, out, lse, mask, True, scale)
        same = _grads(fn, [q, k, v], go, dtype)
        exact = _grads(fn, [q.double(), k.double(), v.double()], go, torch.float64)
        for name, g, s, e in zip(("dq", "dk", "dv"), dqkv.unbind(3), same, exact):
            _compare("temporal_attention", f"{name} (Dh={Dh})", g, s, e, device)


_CHECKS = {
    "adaln_modulate": _check_adaln,
    "gated_residual": _check_gated,
    "frame_combine": _check_combine,
    "noise_inject": _check_noise,
    "temporal_attention": _check_attention,
}
OPS = tuple(_CHECKS)


def run_self_check(op: str, device, dtype: torch.dtype, ops) -> None:
    """Check one op of the operator namespace `ops` (torch.ops.fvdm, or the CUDA emulation's
    torch.ops.fvdm_cuda_emu) on `device` in `dtype`; raises KernelSelfCheckError on a mismatch."""
    device = torch.device(device)
    # The float64 reference needs autograd and full precision, whatever the caller runs under.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        _CHECKS[op](ops, device, dtype)
