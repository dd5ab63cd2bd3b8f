"""The CPU kernels' AVX-512 paths, on any x86-64 host.

`make test-avx512-emu` builds csrc/kernels/cpu/ without -march=native and with FVDM_AVX512 on,
the intrinsics from SIMDe and csrc/emu/avx512_emu.h (cmake/FvdmAvx512Emulation.cmake), with
AddressSanitizer, and runs the `avx512_emu` tests with the sanitizer preloaded: the emulated
device of tests/test_op_*.py (every operator against fvdm.ops.reference) and this module, which
checks what those do not reach: which build ran, the two bf16 narrowings (integer rounding, and
the AVX512-BF16 instruction of the second library), constant rows in the backward, and the
streaming stores of outputs over 16 MiB.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_matches_reference
from op_inputs import (
    AVX512_EMU,
    AVX512_EMU_LIB,
    CPU,
    FLOAT_DTYPES,
    adaln_inputs,
    combine_inputs,
    load_emulation,
    rand,
    ref_grads,
)

from fvdm.ops.reference import adaln_modulate_ref, frame_combine_ref, gated_residual_ref

BF16_LIB = os.environ.get("FVDM_AVX512BF16_EMU_LIB", "")

pytestmark = [
    pytest.mark.avx512_emu,
    pytest.mark.skipif(not (AVX512_EMU_LIB and BF16_LIB), reason="run by `make test-avx512-emu` (`make test` includes it)"),
]


def integer_rounding():
    return AVX512_EMU.ops


def bf16_instruction():
    return load_emulation(BF16_LIB, "FVDM_AVX512BF16_EMU_LIB", "fvdm_avx512bf16_emu")


def test_the_libraries_compiled_the_avx512_paths():
    # cpu_simd is set where csrc/kernels/cpu/simd.h defined FVDM_AVX512 (the library refuses to
    # compile otherwise); the real build reports "avx512" there only on an AVX-512 machine.
    assert integer_rounding().cpu_simd() == "avx512-emulated"
    assert bf16_instruction().cpu_simd() == "avx512-emulated+bf16"


def _bits(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFF for v in t.view(torch.int16).flatten().tolist()]


@pytest.mark.parametrize("D", [5, 16, 37])  # a tail only, one whole vector, vectors and a tail
def test_bf16_narrowing_of_both_builds(D):
    # gated_residual's bf16 output is fp32 x + gate * h narrowed once (convert.h narrow_bf16).
    # Both round to nearest even (ties 1 + ulp/2 -> 1, 1 + 3ulp/2 -> 1 + 2ulp); without
    # AVX512-BF16 subnormals are kept and NaN is 0x7FC0, the instruction flushes subnormals to a
    # zero of their sign and keeps a NaN's sign and payload top (quieted).
    ulp = 2.0**-7
    n = min(D, 5)
    x = torch.zeros(1, 1, 2, D, dtype=torch.bfloat16)
    h = torch.zeros(1, 1, 2, D, dtype=torch.bfloat16)
    gate = torch.ones(1, 1, D, dtype=torch.bfloat16)
    x[0, 0, 0, :n] = torch.tensor([1.0, 1.0, -(2.0**-130), 0.0, 2.0**-128])[:n].bfloat16()
    h[0, 0, 0, :n] = torch.tensor([ulp / 2, 3 * ulp / 2, 0.0, 0.0, 0.0])[:n].bfloat16()  # exact in bf16
    if n > 3:
        x.view(torch.int16)[0, 0, 0, 3] = 0xFFC1 - 0x10000  # a NaN with its sign set (torch drops it)
    tiny = [_bits(torch.tensor(v).bfloat16())[0] for v in (-(2.0**-130), 2.0**-128)]
    want_int = [0x3F80, 0x3F82, tiny[0], 0x7FC0, tiny[1]][:n]
    want_bf16 = [0x3F80, 0x3F82, 0x8000, 0xFFC1, 0x0000][:n]
    got_int = _bits(integer_rounding().gated_residual(x, h, gate)[0, 0, 0, :n])
    got_bf16 = _bits(bf16_instruction().gated_residual(x, h, gate)[0, 0, 0, :n])
    assert got_int == want_int, [hex(v) for v in got_int]
    assert got_bf16 == want_bf16, [hex(v) for v in got_bf16]


@pytest.mark.parametrize("D", [7, 64, 1152])
def test_bf16_instruction_build_matches_the_reference(D):
    # The modulation ops of the second library (bf16 through the AVX512-BF16 instruction).
    ops = bf16_instruction()
    shape = (2, 3, 9, D)
    x, shift, scale = adaln_inputs(shape, torch.bfloat16, D)
    y, mean, rstd = ops.adaln_modulate(x, shift, scale, 1e-6)
    exact = adaln_modulate_ref(x.double(), shift.double(), scale.double())
    assert_matches_reference(y, adaln_modulate_ref(x, shift, scale), exact)
    gy = rand(shape, torch.bfloat16, D + 3)
    exact_g = ref_grads(adaln_modulate_ref, [x.double(), shift.double(), scale.double()], gy)
    same_g = ref_grads(adaln_modulate_ref, [x, shift, scale], gy)
    for name, f, r, e in zip(["dx", "dshift", "dscale"], ops.adaln_modulate_backward(gy, x, scale, mean, rstd), same_g,
                             exact_g):
        assert_matches_reference(f, r, e, name)
    h = rand(shape, torch.bfloat16, D + 4)
    out = ops.gated_residual(x, h, shift)
    assert_matches_reference(out, gated_residual_ref(x, h, shift), gated_residual_ref(x.double(), h.double(), shift.double()))


@pytest.mark.parametrize("device", [pytest.param(CPU, id="cpu"), pytest.param(AVX512_EMU, id="avx512_emu")])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("D", [1, 3, 7, 15, 16, 17, 64, 72, 1152])
def test_constant_rows_are_exact_forward_and_backward(device, dtype, D):
    # A row of one value (however large, or inexact its D-fold sum): the reference has mean = x,
    # x - mean = 0, so y = shift exactly, and in the backward xhat = 0: dscale gets nothing from
    # it and dx = rstd (g' - mean(g')). The CPU kernels, every path, must be exact there too.
    shape = (2, 2, 5, D)
    g = torch.Generator().manual_seed(D)
    values = torch.tensor([100.0, -100.0, 3.3, 1e4, 0.1, -7.25, 2.0**-10, 1e-3, 3e4, -0.3])
    x = values.to(dtype)[torch.randint(0, len(values), shape[:3], generator=g)].unsqueeze(-1).expand(shape).contiguous()
    shift = rand((2, 2, D), dtype, D + 1)
    scale = rand((2, 2, D), dtype, D + 2, 0.5)
    y, mean, rstd = device.ops.adaln_modulate(x, shift, scale, 1e-6)
    assert torch.equal(mean, x[..., 0].to(mean.dtype)), "mean of a constant row is its value"
    err = (y.double() - shift.unsqueeze(2).double()).abs().max().item()
    assert err == 0, f"y on constant rows is off shift by {err:.3e}"
    gy = rand(shape, dtype, D + 3)
    dx, dshift, dscale = device.ops.adaln_modulate_backward(gy, x, scale, mean, rstd)
    assert torch.count_nonzero(dscale) == 0, f"dscale {dscale.double().abs().max().item():.3e} on constant rows"
    exact = ref_grads(adaln_modulate_ref, [x.double(), shift.double(), scale.double()], gy)
    same = ref_grads(adaln_modulate_ref, [x, shift, scale], gy)
    assert_matches_reference(dx, same[0], exact[0], "dx")
    assert_matches_reference(dshift, same[1], exact[1], "dshift")


@pytest.mark.parametrize("D", [1152, 1000])  # rows of whole 64-byte lines, and rows that are not
def test_large_fp32_outputs_are_streamed_correctly(D):
    # Outputs of kernels moving over 16 MiB are written with streaming stores (convert.h
    # stream_row / stream_copy), on the AVX-512 paths straight from registers; the emulation
    # checks each such store is 64-byte aligned (the hardware faults otherwise).
    ops = integer_rounding()
    shape = (1, 2, 2 * 1024 * 1024 // (2 * D) + 3, D)  # 2M+ values: x in and y out are 16 MiB
    x, shift, scale = adaln_inputs(shape, torch.float32, 11)
    y, mean, rstd = ops.adaln_modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(y, adaln_modulate_ref(x, shift, scale))
    gy = rand(shape, torch.float32, 13)
    want = ref_grads(adaln_modulate_ref, [x, shift, scale], gy)
    for got, w in zip(ops.adaln_modulate_backward(gy, x, scale, mean, rstd), want):
        torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-4)
    h = rand(shape, torch.float32, 12)
    torch.testing.assert_close(ops.gated_residual(x, h, shift), gated_residual_ref(x, h, shift))
    want = ref_grads(gated_residual_ref, [x, h, shift], gy)
    for got, w in zip(ops.gated_residual_backward(gy, h, shift), want[1:]):
        torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-4)
    inputs, coeffs = combine_inputs(shape, 2, torch.float32, 14)
    torch.testing.assert_close(ops.frame_combine(inputs, coeffs), frame_combine_ref(inputs, coeffs))
