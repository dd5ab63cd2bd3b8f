"""frame_combine and noise_inject on every device (tests/op_inputs.py): the kernels against
fvdm.ops.reference, and on the emulation the kernel variant each case reached; then the
autograd wiring, opcheck and the argument checks."""

import pytest
import torch
from helpers import LOW_PRECISION, assert_matches_reference
from hypothesis import example, given, settings
from hypothesis import strategies as st
from op_inputs import (
    AUTOGRAD_DEVICES,
    CPU,
    CUDA_ONLY,
    DEVICES,
    FLOAT_DTYPES,
    SLOW,
    combine_inputs,
    combine_shapes,
    grads_and_saved,
    noise_tables,
    rand,
    ref_grads,
    timesteps,
    vec,
)

from fvdm.ops import frame_combine, noise_inject
from fvdm.ops.reference import frame_combine_ref, noise_inject_ref


def _combine_variant(shape, dtype, aligned=True):
    inner = 1
    for n in shape[2:]:
        inner *= n
    return "combine_{}_kernel<T, V>" if inner % vec(dtype) == 0 and aligned else "combine_{}_kernel<T, 1>"


@pytest.mark.parametrize("device", DEVICES)
def test_frame_combine_forward_and_backward(device):
    @settings(max_examples=device.examples(60, emu=25), **SLOW)
    @given(shape=combine_shapes, K=st.integers(1, 8), dtype=st.sampled_from(FLOAT_DTYPES),
           layout=st.sampled_from(["contiguous", "offset1"]), launch=device.launches(), seed=st.integers(0, 10_000))
    @example(shape=(1, 1, 8200), K=2, dtype=torch.float32, layout="contiguous", launch=("sm_90", 1), seed=0)
    def check(shape, K, dtype, layout, launch, seed):
        device.start(launch)
        inputs, coeffs = combine_inputs(shape, K, dtype, seed, layout, device.tensors)
        out = device.ops.frame_combine(inputs, coeffs)
        variant = _combine_variant(shape, dtype, aligned=layout == "contiguous")
        device.expect_launched([variant.format("fwd")])
        exact_in = [x.double() for x in inputs]
        exact_out = frame_combine_ref(exact_in, coeffs.double())
        assert_matches_reference(out, frame_combine_ref(inputs, coeffs), exact_out,
                                 conditioning_slack=device.slack(dtype, exact_out))

        go = rand(shape, dtype, seed + 7, device=device.tensors)
        dinputs, dcoeffs = device.ops.frame_combine_backward(go, inputs, coeffs)
        device.expect_launched([variant.format("bwd"), "reduce_chunks_kernel<OutT>"])
        exact = ref_grads(lambda c, *xs: frame_combine_ref(list(xs), c), [coeffs.double(), *exact_in], go)
        for k in range(K):
            same_k = coeffs[..., k].reshape(shape[:2] + (1,) * (len(shape) - 2)).to(dtype) * go
            assert_matches_reference(dinputs[k], same_k, exact[1 + k], f"dinputs[{k}]",
                                     conditioning_slack=device.slack(dtype, exact[1 + k]))
        # dcoeffs sums a frame's products in fp32 (the reference sums in the input dtype).
        assert dcoeffs.dtype == torch.float32
        inner = go[0, 0].numel()
        torch.testing.assert_close(dcoeffs.double(), exact[0], rtol=2e-2 if dtype in LOW_PRECISION else 1e-4,
                                   atol=max(1e-3, 1e-5 * inner))

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_noise_inject(device):
    @settings(max_examples=device.examples(50, emu=10), **SLOW)
    @given(shape=combine_shapes, dtype=st.sampled_from(FLOAT_DTYPES), t_dtype=st.sampled_from([torch.int64, torch.int32]),
           table_dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10_000))
    def check(shape, dtype, t_dtype, table_dtype, seed):
        device.start()
        T = 1000
        a, s = noise_tables(T, table_dtype, device.tensors)
        x0, noise = rand(shape, dtype, seed, device=device.tensors), rand(shape, dtype, seed + 1, device=device.tensors)
        t = timesteps(shape[0], shape[1], T, seed, t_dtype, device.tensors)
        out = device.ops.noise_inject(x0, noise, t, a, s)
        device.expect_launched([_combine_variant(shape, dtype).format("fwd")])
        exact = noise_inject_ref(x0.double(), noise.double(), t.long(), a.double(), s.double())
        assert_matches_reference(out, noise_inject_ref(x0, noise, t.long(), a, s), exact,
                                 conditioning_slack=device.slack(dtype, exact))

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_noise_inject_per_frame_timesteps_are_independent(device):
    # Frame f of clip b uses exactly its own t[b, f]: compare with a per-frame scalar loop.
    device.start()
    a, s = noise_tables(1000, torch.float32, device.tensors)
    x0, eps = (rand((2, 4, 3, 8, 8), torch.float32, k, device=device.tensors) for k in (0, 1))
    t = torch.tensor([[0, 999, 500, 1], [10, 10, 900, 250]], device=device.tensors)
    out = device.ops.noise_inject(x0, eps, t, a, s)
    for b in range(2):
        for f in range(4):
            torch.testing.assert_close(out[b, f], a[t[b, f]] * x0[b, f] + s[t[b, f]] * eps[b, f])


@pytest.mark.parametrize("device", DEVICES)
def test_frame_combine_backward_is_deterministic(device):
    device.start(("sm_80_small", 7))
    xs, c = combine_inputs((2, 3, 64, 96), 3, torch.bfloat16, 5, device=device.tensors)
    go = rand((2, 3, 64, 96), torch.bfloat16, 6, device=device.tensors)
    first, again = (device.ops.frame_combine_backward(go, xs, c) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inner", [16 * 1024, 16 * 1024 + 7])  # frames of whole 64-byte lines, and not
@pytest.mark.parametrize("K", [1, 3])
def test_large_combines_use_streaming_stores_correctly(dtype, inner, K):
    # CPU combines moving over 16 MiB write their output with streaming stores (combine_cpu.cpp:
    # fp32 from registers, fp64 through an L1 block buffer): check them against the reference,
    # with frames that start on a 64-byte line and frames that do not (normal stores for the
    # head and tail of a run).
    numel = (16 << 20) // ((K + 1) * dtype.itemsize) + 5 * inner
    shape = (1, -(-numel // inner), inner)
    inputs = [rand(shape, dtype, 20 + k) for k in range(K)]
    coeffs = rand(shape[:2] + (K,), torch.float32, 30)
    torch.testing.assert_close(frame_combine(inputs, coeffs), frame_combine_ref(inputs, coeffs))
    t = torch.randint(0, 50, shape[:2])
    sa, s1 = noise_tables(50)
    torch.testing.assert_close(noise_inject(inputs[0], inputs[-1], t, sa, s1), noise_inject_ref(inputs[0], inputs[-1], t, sa, s1))


# ---------------------------------------------------------------------------------------------
# autograd, opcheck


def test_gradcheck_fp64():
    xs = [rand((2, 3, 4, 5), torch.float64, s).requires_grad_() for s in range(3)]
    c = rand((2, 3, 3), torch.float64, 9).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, d, c: frame_combine([a, b, d], c), (*xs, c))
    a, s = noise_tables(50)
    t = torch.randint(0, 50, (2, 3))
    assert torch.autograd.gradcheck(lambda x, e: noise_inject(x, e, t, a, s), tuple(xs[:2]))


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_opcheck(device):
    dtype = torch.float64 if device == CPU else torch.bfloat16
    xs = [rand((2, 3, 4, 5), dtype, s, device=device.tensors).requires_grad_() for s in range(3)]
    c = rand((2, 3, 3), torch.float64 if device == CPU else torch.float32, 9, device=device.tensors).requires_grad_()
    torch.library.opcheck(torch.ops.fvdm.frame_combine.default, (xs, c))
    torch.library.opcheck(torch.ops.fvdm.frame_combine_backward.default,
                          (torch.randn_like(xs[0]), [x.detach() for x in xs], c.detach()))
    a, s = noise_tables(50, device=device.tensors)
    t = torch.randint(0, 50, (2, 3), device=device.tensors)
    torch.library.opcheck(torch.ops.fvdm.noise_inject.default, (xs[0], xs[1], t, a, s))


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_autograd_saves_only_what_the_needed_gradients_use(device):
    # Each subset of inputs that need gradients gets the same gradients as when all do, and the
    # backward keeps only the tensors those gradients read.
    (x, y), c = combine_inputs((2, 3, 4, 16), 2, torch.float32, 5, device=device.tensors)
    a, s = noise_tables(100, torch.float32, device.tensors)
    t = timesteps(2, 3, 100, 1, device=device.tensors)
    cases = [(lambda u, v, w: frame_combine([u, v], w), (x, y, c),
              {(1, 1, 0): 1, (1, 0, 0): 1, (0, 0, 1): 3, (1, 0, 1): 3}),
             (lambda u, v: noise_inject(u, v, t, a, s), (x, y), {(1, 0): 2, (0, 1): 2})]
    for fn, args, saved_for in cases:
        full, _ = grads_and_saved(fn, args, (1,) * len(args))
        for needs, n_saved in saved_for.items():
            grads, saved = grads_and_saved(fn, args, needs)
            assert saved == n_saved, f"saved {saved} tensors for gradients of {needs}"
            for g, f, n in zip(grads, full, needs):
                assert g is None if not n else torch.equal(g, f)


# ---------------------------------------------------------------------------------------------
# argument checks


def test_noise_inject_bad_inputs():
    a, s = noise_tables(10, torch.float32)
    x0 = torch.randn(2, 3, 4)
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
        noise_inject(x0, x0, t + 10, a, s)
    with pytest.raises(ValueError, match=r"t must lie in"):
        noise_inject(x0, x0, t - 1, a, s)
    with pytest.raises(TypeError, match="t must hold integer timesteps"):
        noise_inject(x0, x0, t.float(), a, s)
    with pytest.raises(ValueError, match="t must have shape"):
        noise_inject(x0, x0, t[:, :2], a, s)
    bad = a.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="sqrt_alpha_bar contains NaN or inf"):
        noise_inject(x0, x0, t, bad, s)
    bad = s.clone()
    bad[0] = float("inf")
    with pytest.raises(ValueError, match="sqrt_one_minus_alpha_bar contains NaN or inf"):
        noise_inject(x0, x0, t, a, bad)
    with pytest.raises(ValueError, match="sqrt_one_minus_alpha_bar has 9 entries"):
        noise_inject(x0, x0, t, a, s[:9])
    with pytest.raises(ValueError, match="noise has shape"):
        noise_inject(x0, x0[:, :, :2], t, a, s)
    with pytest.raises(TypeError, match="noise has dtype"):
        noise_inject(x0, x0.double(), t, a, s)


def test_frame_combine_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="coeffs must have shape"):
        frame_combine([x, x], torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape"):
        frame_combine([x, x[:, :, :2]], torch.ones(2, 3, 2))
    with pytest.raises(ValueError, match="takes 1 to 8 inputs"):
        frame_combine([x] * 9, torch.ones(2, 3, 9))
    with pytest.raises(ValueError, match="coeffs contains NaN"):
        frame_combine([x], torch.full((2, 3, 1), float("nan")))
    with pytest.raises(TypeError, match=r"inputs\[1\] has dtype"):
        frame_combine([x, x.half()], torch.ones(2, 3, 2))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_agrees_with_cpu(device, dtype):
    # Both compute in fp32 and round once: they differ by summation order, about an ulp.
    tol = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    xs, c = combine_inputs((2, 4, 3, 8, 8), 3, dtype, 30, device="cuda")
    go = rand(xs[0].shape, dtype, 41, device="cuda")
    cpu_xs = [x.cpu() for x in xs]
    torch.testing.assert_close(frame_combine(xs, c).cpu(), frame_combine(cpu_xs, c.cpu()), atol=tol[0], rtol=tol[1])
    d_cuda = torch.ops.fvdm.frame_combine_backward(go, xs, c)
    d_cpu = torch.ops.fvdm.frame_combine_backward(go.cpu(), cpu_xs, c.cpu())
    for a, b in zip(d_cuda[0], d_cpu[0]):
        torch.testing.assert_close(a.cpu(), b, atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(d_cuda[1].cpu(), d_cpu[1], atol=1e-3, rtol=1e-4)
    a, s = noise_tables(1000, torch.float32, "cuda")
    t = timesteps(2, 4, 1000, 3, device="cuda")
    torch.testing.assert_close(noise_inject(xs[0], xs[1], t, a, s).cpu(),
                               noise_inject(cpu_xs[0], cpu_xs[1], t.cpu(), a.cpu(), s.cpu()), atol=tol[0], rtol=tol[1])
