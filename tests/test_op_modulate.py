"""adaln_modulate and gated_residual on every device (tests/op_inputs.py): the kernels against
fvdm.ops.reference under FlashAttention's rule, and on the emulation the kernel variant each
case reached; then the autograd wiring, opcheck and the argument checks."""

import pytest
import torch
from helpers import assert_matches_reference
from hypothesis import example, given, settings
from hypothesis import strategies as st
from op_inputs import (
    AUTOGRAD_DEVICES,
    CPU,
    CUDA_ONLY,
    DEVICES,
    FLOAT_DTYPES,
    SLOW,
    adaln_inputs,
    gated_inputs,
    grads_and_saved,
    modulate_layouts,
    modulate_shapes,
    rand,
    ref_grads,
    vec,
)

from fvdm.ops import adaln_modulate, gated_residual
from fvdm.ops.reference import adaln_modulate_ref, gated_residual_ref

# Rows of one repeated value: exact in the reference (its mean is the value, x - mean is 0), so
# the CPU kernels must be exact there too (the portable and the AVX-512 paths, the latter on the
# avx512_emu device here), however large the value or inexact its D-fold sum. The CUDA kernels
# are not: they check these rows with the conditioning slack of the other rows instead.
CONSTANT_ROWS = st.sampled_from([None, 100.0, -100.0, 3.3, 1e4, 0.1])


def _row_conditioning(x, scale):
    """|x|, rstd (B, F, N, 1) and |1 + scale| (B, F, 1, D) in float64: what the conditioning
    bounds below are made of (a nearly constant row has a large rstd)."""
    xd = x.double()
    rstd = (xd.var(-1, unbiased=False, keepdim=True) + 1e-6).rsqrt()
    return xd.abs(), rstd, (1 + scale.double()).abs()[:, :, None]


def _adaln_kernels(D, dtype, aligned):
    """The CUDA kernels a forward and a backward launch, by row width and alignment."""
    fwd = "adaln_fwd_warp_kernel<T>" if D % vec(dtype) == 0 and D <= 1536 and aligned else "adaln_fwd_block_kernel<T>"
    bwd = "adaln_bwd_cols_kernel<T>" if D % vec(dtype) == 0 and aligned else "adaln_bwd_generic_kernel<T>"
    return [fwd], [bwd, "reduce_chunks_kernel<OutT>"]


@pytest.mark.parametrize("device", DEVICES)
def test_adaln_forward_and_backward(device):
    @settings(max_examples=device.examples(60, emu=30), **SLOW)
    @given(shape=modulate_shapes, dtype=st.sampled_from(FLOAT_DTYPES), layout=modulate_layouts,
           constant=CONSTANT_ROWS, launch=device.launches(), seed=st.integers(0, 10_000))
    @example(shape=(1, 2, 3, 7), dtype=torch.float32, layout="contiguous", constant=100.0, launch=None, seed=0)
    @example(shape=(1, 5, 6, 2), dtype=torch.float32, layout="contiguous", constant=None, launch=None, seed=3114)
    @example(shape=(1, 1, 40, 64), dtype=torch.bfloat16, layout="contiguous", constant=None,
             launch=("sm_80_small", 1), seed=0)  # several row chunks per frame
    @example(shape=(2, 3, 33, 1544), dtype=torch.float32, layout="contiguous", constant=None, launch=("sm_90", 0),
             seed=1)  # the block-per-row forward
    @example(shape=(1, 2, 7, 72), dtype=torch.float16, layout="offset1", constant=None, launch=("sm_80", 2), seed=2)
    def check(shape, dtype, layout, constant, launch, seed):
        device.start(launch)
        B, F, N, D = shape
        x, shift, scale = adaln_inputs(shape, dtype, seed, layout, device.tensors, constant)
        y, mean, rstd = device.ops.adaln_modulate(x, shift, scale, 1e-6)
        fwd_kernels, bwd_kernels = _adaln_kernels(D, dtype, aligned=not layout.startswith("offset"))
        device.expect_launched(fwd_kernels)
        exact = adaln_modulate_ref(x.double(), shift.double(), scale.double())
        same = (x == x[..., :1]).all(-1)  # constant rows (D = 1: every row)
        if not device.cuda_kernels:
            torch.testing.assert_close(y[same], shift.unsqueeze(2).expand_as(x)[same], rtol=0, atol=0)
        else:
            same = torch.zeros_like(same)
        # A nearly constant row (D = 3 drew 2.5166, 2.5175, 2.5204) keeps few digits of x - mean
        # in any implementation of this dtype: one rounding of the mean (eps |x|) is amplified by
        # rstd and (1 + scale); the eager reference may land closer or farther by luck.
        eps = torch.finfo(dtype).eps
        x_abs, rstd64, scale1 = _row_conditioning(x, scale)
        cond = eps * float((x_abs * rstd64 * scale1)[~same].max()) if (~same).any() else 0.0
        rest = ~same.unsqueeze(-1).expand_as(x)
        assert_matches_reference(y[rest], adaln_modulate_ref(x, shift, scale)[rest], exact[rest],
                                 conditioning_slack=cond + device.slack(dtype, exact))

        gy = rand(shape, dtype, seed + 3, device=device.tensors)
        got = device.ops.adaln_modulate_backward(gy, x, scale, mean, rstd)
        device.expect_launched(bwd_kernels)
        args = [x.double(), shift.double(), scale.double()]
        exact_g = ref_grads(adaln_modulate_ref, args, gy)
        same_g = ref_grads(adaln_modulate_ref, [x, shift, scale], gy)
        # As in the forward: on a nearly constant row the rounding of the mean (eps |x|) is
        # amplified by rstd in xhat, and dx = rstd (g' - mean g' - xhat mean(g' xhat)) cancels
        # its O(|g'|) terms, so any implementation of this dtype may be off by eps |x| rstd^2 |g'|
        # (hypothesis drew D = 2, rstd 30); dscale sums xhat-weighted gradients over the frame's
        # rows, and the CUDA kernels sum dshift, dscale over row chunks in another order.
        g = gy.double().abs()
        chunked = 4e-5 * N if device.cuda_kernels else 0.0
        slack = {"dx": eps * float((x_abs.amax(-1, keepdim=True) * rstd64**2 * (g * scale1).amax(-1, keepdim=True)).max()),
                 "dshift": chunked,
                 "dscale": eps * float((x_abs * rstd64 * g).sum(2).max()) + chunked}
        for name, f, r, e in zip(["dx", "dshift", "dscale"], got, same_g, exact_g):
            assert_matches_reference(f, r, e, name, conditioning_slack=slack[name] + device.slack(dtype, e))

    check()


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 300, 1152), (2, 16, 64, 384), (1, 2, 5, 4100)])
def test_adaln_wide_rows_and_small_frame_counts(device, dtype, shape):
    # B*F = 1 or 2: the backward splits each frame into row chunks and reduces them; D = 1152 is
    # Latte-XL's width, 4100 fp32 more than the CUDA backward's vector kernel takes.
    x, shift, scale = adaln_inputs(shape, dtype, 11, device=device.tensors)
    gy = rand(shape, dtype, 12, device=device.tensors)
    exact = ref_grads(adaln_modulate_ref, [x.double(), shift.double(), scale.double()], gy)
    fused = ref_grads(adaln_modulate, [x, shift, scale], gy)
    ref = ref_grads(adaln_modulate_ref, [x, shift, scale], gy)
    mag = 8 * torch.finfo(dtype).eps * float(gy.double().abs().sum(2).max())
    for name, f, r, e in zip(["dx", "dshift", "dscale"], fused, ref, exact):
        assert_matches_reference(f, r, e, name, conditioning_slack=(0.0 if name == "dx" else mag) + device.slack(dtype, e))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["offset", "outliers_first"])
def test_adaln_statistics_on_offset_and_outlier_rows(device, dtype, kind):
    # The CPU kernel takes the variance from one pass of sums shifted by the mean of the row's
    # first 16 values: rows far from zero (an unshifted E[x^2] - mean^2 loses all digits here)
    # and rows whose first 16 values are outliers (the worst shift) must stay accurate.
    device.start()
    x = rand((1, 2, 9, 1152), torch.float64, 5)
    if kind == "offset":
        x = x + 1000.0
    else:
        x = 0.1 * x
        x[..., :16] = 50.0
    shift = rand((1, 2, 1152), torch.float64, 6)
    scale = rand((1, 2, 1152), torch.float64, 7) * 0.5
    x, shift, scale = (t.to(device.tensors, dtype) for t in (x, shift, scale))
    exact = adaln_modulate_ref(x.double(), shift.double(), scale.double())
    x_abs, rstd, scale1 = _row_conditioning(x, scale)
    cond = torch.finfo(dtype).eps * float((x_abs * rstd * scale1).max())
    y = device.ops.adaln_modulate(x, shift, scale, 1e-6)[0]
    assert_matches_reference(y, adaln_modulate_ref(x, shift, scale), exact,
                             conditioning_slack=cond + device.slack(dtype, exact))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1152, 1000])  # rows of whole 64-byte lines, and rows that are not
def test_large_outputs_use_streaming_stores_correctly(dtype, D):
    # CPU kernels moving over 16 MiB write their output with streaming stores (modulate_cpu.cpp):
    # 4M+ values per tensor puts every op there in fp32, forward and backward; check them all,
    # with rows of whole 64-byte lines and rows that are not (normal stores for head and tail).
    shape = (1, 2, 4 * 1024 * 1024 // (2 * D) + 3, D)
    x, shift, scale = (t.requires_grad_() for t in adaln_inputs(shape, dtype, 11))
    h = rand(shape, dtype, 12).requires_grad_()
    gy = rand(shape, dtype, 13)
    for fn, ref, args in [(adaln_modulate, adaln_modulate_ref, (x, shift, scale)),
                          (gated_residual, gated_residual_ref, (x, h, shift))]:
        y = fn(*args)
        got = torch.autograd.grad(y, args, gy)
        want = torch.autograd.grad(ref(*args), args, gy)
        torch.testing.assert_close(y, ref(*args))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_adaln_eps_is_used(device):
    device.start()
    x = torch.zeros(1, 1, 2, 8, device=device.tensors)
    x[..., 0] = 1e-3  # tiny variance: eps dominates the normalisation
    shift, scale = torch.zeros(1, 1, 8, device=device.tensors), torch.zeros(1, 1, 8, device=device.tensors)
    for eps in (1e-6, 1e-2):
        y = device.ops.adaln_modulate(x, shift, scale, eps)[0]
        torch.testing.assert_close(y, adaln_modulate_ref(x, shift, scale, eps))


@pytest.mark.parametrize("device", DEVICES)
def test_modulate_backwards_are_deterministic(device):
    device.start(("sm_80_small", 7))
    x, shift, scale = adaln_inputs((1, 2, 64, 384), torch.bfloat16, 3, device=device.tensors)
    gy = rand(x.shape, torch.bfloat16, 4, device=device.tensors)
    _, mean, rstd = device.ops.adaln_modulate(x, shift, scale, 1e-6)
    runs = [device.ops.adaln_modulate_backward(gy, x, scale, mean, rstd) for _ in range(2)]
    runs += [device.ops.gated_residual_backward(gy, x, shift) for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[2], runs[3]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# gated residual


@pytest.mark.parametrize("device", DEVICES)
def test_gated_residual_forward_and_backward(device):
    @settings(max_examples=device.examples(50, emu=25), **SLOW)
    @given(shape=modulate_shapes, dtype=st.sampled_from(FLOAT_DTYPES), layout=modulate_layouts,
           launch=device.launches(), seed=st.integers(0, 10_000))
    @example(shape=(1, 1, 40, 64), dtype=torch.bfloat16, layout="contiguous", launch=("sm_80_small", 1), seed=0)
    @example(shape=(2, 1, 9, 17), dtype=torch.float32, layout="offset1", launch=("sm_90", 0), seed=1)
    def check(shape, dtype, layout, launch, seed):
        device.start(launch)
        N, D = shape[2:]
        x, h, gate = gated_inputs(shape, dtype, seed, layout, device.tensors)
        out = device.ops.gated_residual(x, h, gate)
        fast = D % vec(dtype) == 0 and not layout.startswith("offset")
        variant = "gated_{}_kernel<T, V>" if fast else "gated_{}_kernel<T, 1>"
        device.expect_launched([variant.format("fwd")])
        args = [x.double(), h.double(), gate.double()]
        exact_out = gated_residual_ref(*args)
        assert_matches_reference(out, gated_residual_ref(x, h, gate), exact_out,
                                 conditioning_slack=device.slack(dtype, exact_out))

        go = rand(shape, dtype, seed + 3, device=device.tensors)
        dh, dgate = device.ops.gated_residual_backward(go, h, gate)
        device.expect_launched([variant.format("bwd"), "reduce_chunks_kernel<OutT>"])
        exact = ref_grads(gated_residual_ref, args, go)
        same = ref_grads(gated_residual_ref, [x, h, gate], go)
        assert_matches_reference(dh, same[1], exact[1], "dh", conditioning_slack=device.slack(dtype, exact[1]))
        assert_matches_reference(dgate, same[2], exact[2], "dgate",
                                 conditioning_slack=(4e-5 * N if device.cuda_kernels else 0.0) + device.slack(dtype, exact[2]))

    check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [16, 37, 1152])  # whole 16-value vectors, a ragged tail, Latte-XL
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_residual_rounds_once_to_nearest_even(device, dtype, D):
    # For bf16/fp16 inputs gate * h is exact in fp32 (at most 11 x 11 significant bits), so
    # x + gate * h in fp32 rounded once to the storage type is the one correct answer: the kernel
    # must match it bit for bit, including ties (1 + ulp/2 -> 1, 1 + 3 ulp/2 -> 1 + 2 ulp), inf
    # and NaN, and for fp16 a subnormal result (bf16 may flush those, README).
    device.start()
    B, F, N = 2, 3, 5
    ulp = torch.finfo(dtype).eps
    x = (torch.randn(B, F, N, D, generator=torch.Generator().manual_seed(D)) * 4).to(dtype)
    h = torch.randn(B, F, N, D, generator=torch.Generator().manual_seed(D + 1)).to(dtype)
    gate = torch.randn(B, F, D, generator=torch.Generator().manual_seed(D + 2)).to(dtype)
    x[0, 0, 0, :5] = torch.tensor([1.0, 1.0, float("inf"), float("nan"), 0.0])
    h[0, 0, 0, :5] = torch.tensor([ulp / 2, 3 * ulp / 2, 1.0, 1.0, 2.0**-20])
    gate[0, :, :5] = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0**-4])
    want = (x.float() + gate.float().unsqueeze(2) * h.float()).to(dtype)
    got = device.ops.gated_residual(*(t.to(device.tensors) for t in (x, h, gate))).cpu()
    assert got[0, 0, 0, :2].tolist() == [1.0, 1.0 + 2 * ulp]
    if dtype == torch.float16:
        assert got[0, 0, 0, 4].item() == 2.0**-24  # the smallest fp16 subnormal
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


# ---------------------------------------------------------------------------------------------
# autograd, opcheck, torch.compile's view of the ops


def test_gradcheck_fp64():
    x, shift, scale = (t.requires_grad_() for t in adaln_inputs((2, 3, 4, 6), torch.float64, 0))
    assert torch.autograd.gradcheck(adaln_modulate, (x, shift, scale))
    x, h = (rand((2, 3, 4, 5), torch.float64, s).requires_grad_() for s in (0, 1))
    gate = rand((2, 3, 5), torch.float64, 2).requires_grad_()
    assert torch.autograd.gradcheck(gated_residual, (x, h, gate))


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64 if device == CPU else torch.bfloat16):
        x, shift, scale = (t.requires_grad_() for t in adaln_inputs((2, 3, 4, 8), dtype, 1, device=device.tensors))
        torch.library.opcheck(torch.ops.fvdm.adaln_modulate.default, (x, shift, scale, 1e-6))
        _, mean, rstd = torch.ops.fvdm.adaln_modulate(x, shift, scale, 1e-6)
        gy = torch.randn_like(x)
        torch.library.opcheck(torch.ops.fvdm.adaln_modulate_backward.default,
                              (gy, x.detach(), scale.detach(), mean, rstd))
        h = rand(x.shape, dtype, 2, device=device.tensors).requires_grad_()
        torch.library.opcheck(torch.ops.fvdm.gated_residual.default, (x, h, shift))
        torch.library.opcheck(torch.ops.fvdm.gated_residual_backward.default, (gy, h.detach(), shift.detach()))


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_autograd_saves_only_what_the_needed_gradients_use(device):
    # Each subset of inputs that need gradients gets the same gradients as when all do, and the
    # backward keeps only the tensors those gradients read.
    x, shift, scale = adaln_inputs((2, 3, 4, 16), torch.float32, 5, device=device.tensors)
    h = rand(x.shape, torch.float32, 6, device=device.tensors)
    cases = [(adaln_modulate, (x, shift, scale), {(0, 1, 0): 0, (1, 0, 0): 4, (0, 0, 1): 4}),
             (gated_residual, (x, h, shift), {(1, 0, 0): 0, (0, 1, 0): 2, (0, 0, 1): 2})]
    for fn, args, saved_for in cases:
        full, _ = grads_and_saved(fn, args, (1, 1, 1))
        for needs, n_saved in saved_for.items():
            grads, saved = grads_and_saved(fn, args, needs)
            assert saved == n_saved, f"{fn.__name__} saved {saved} tensors for gradients of {needs}"
            for g, f, n in zip(grads, full, needs):
                if not n:
                    assert g is None
                elif fn is adaln_modulate and needs == (0, 1, 0):  # dshift summed without the kernel
                    torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-6)
                else:
                    assert torch.equal(g, f)


# ---------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, s, c: (x[0], s, c), "x must have 4 dims"),
        (lambda x, s, c: (x, s[:, :1], c), "shift must have shape"),
        (lambda x, s, c: (x, s, c[..., :-1]), "scale must have shape"),
        (lambda x, s, c: (x, s.double(), c), "shift has dtype"),
        (lambda x, s, c: (x.int(), s, c), "x must be float32"),
    ],
)
def test_adaln_bad_inputs_name_the_argument(make, match):
    x, s, c = adaln_inputs((2, 3, 4, 8), torch.float32, 0)
    with pytest.raises((ValueError, TypeError), match=match):
        adaln_modulate(*make(x, s, c))


def test_adaln_rejects_bad_eps_and_gated_bad_shapes():
    x, s, c = adaln_inputs((2, 3, 4, 8), torch.float32, 0)
    with pytest.raises(ValueError, match="eps must be positive"):
        adaln_modulate(x, s, c, eps=0.0)
    with pytest.raises(ValueError, match=r"h has shape \(2, 3, 2, 8\) but x has shape \(2, 3, 4, 8\)"):
        gated_residual(x, x[:, :, :2], s)
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_residual(x, x, s[:1])
    with pytest.raises(TypeError, match="h has dtype"):
        gated_residual(x, x.half(), s)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_rejects_float64_and_mixed_devices(device):
    x = torch.zeros(1, 2, 3, 8, dtype=torch.float64, device="cuda")
    t = torch.zeros(1, 2, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="x is float64 on CUDA"):
        adaln_modulate(x, t, t)
    x = torch.zeros(1, 2, 3, 8, device="cuda")
    with pytest.raises(ValueError, match="shift is on"):
        adaln_modulate(x, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8, device="cuda"))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_agrees_with_cpu(device, dtype):
    # Both compute in fp32 and round once: they differ by summation order, about an ulp.
    tol = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    x, shift, scale = adaln_inputs((2, 4, 33, 72), dtype, 21, device="cuda")
    h, gy = rand(x.shape, dtype, 23, device="cuda"), rand(x.shape, dtype, 22, device="cuda")
    fwd_cuda = torch.ops.fvdm.adaln_modulate(x, shift, scale, 1e-6)
    fwd_cpu = torch.ops.fvdm.adaln_modulate(x.cpu(), shift.cpu(), scale.cpu(), 1e-6)
    pairs = list(zip(fwd_cuda, fwd_cpu))
    pairs += zip(torch.ops.fvdm.adaln_modulate_backward(gy, x, scale, fwd_cuda[1], fwd_cuda[2]),
                 torch.ops.fvdm.adaln_modulate_backward(gy.cpu(), x.cpu(), scale.cpu(), fwd_cpu[1], fwd_cpu[2]))
    pairs.append((gated_residual(x, h, shift), gated_residual(x.cpu(), h.cpu(), shift.cpu())))
    pairs += zip(torch.ops.fvdm.gated_residual_backward(gy, h, shift),
                 torch.ops.fvdm.gated_residual_backward(gy.cpu(), h.cpu(), shift.cpu()))
    for a, b in pairs:
        torch.testing.assert_close(a.cpu(), b, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_first_use_self_check_runs_once_per_dtype_and_is_cheap(device):
    from fvdm.ops import selfcheck

    for dtype in FLOAT_DTYPES:
        x, shift, scale = adaln_inputs((1, 2, 3, 64), dtype, 0, device="cuda")
        adaln_modulate(x, shift, scale)
        key = ("adaln_modulate", str(x.device), dtype)
        seconds = selfcheck.checked()[key]
        assert seconds < 1.0, f"self-check of adaln_modulate in {dtype} took {seconds:.2f} s"
        adaln_modulate(x, shift, scale)
        assert selfcheck.checked()[key] == seconds  # not run again
