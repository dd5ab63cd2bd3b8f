"""frame_combine and noise_inject: fused kernels vs ops/reference.py."""

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_matches_reference, rand
from hypothesis import given, settings
from hypothesis import strategies as st

from fvdm.ops import frame_combine, noise_inject
from fvdm.ops.reference import frame_combine_ref, noise_inject_ref

# (B, F, trailing...) shapes: tokens (N, D), latents (C, H, W), and a bare (B, F).
shapes = st.tuples(st.integers(1, 3), st.integers(1, 6)).flatmap(
    lambda bf: st.sampled_from([bf, bf + (7,), bf + (3, 33), bf + (4, 5, 6), bf + (2, 1, 700)])
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, K=st.integers(1, 8), dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 10_000))
def test_frame_combine_matches_reference(shape, K, dtype, seed):
    inputs = [rand(shape, dtype, seed + k) for k in range(K)]
    coeffs = rand(shape[:2] + (K,), torch.float32, seed + 99)
    exact = frame_combine_ref([x.double() for x in inputs], coeffs.double())
    assert_matches_reference(frame_combine(inputs, coeffs), frame_combine_ref(inputs, coeffs), exact)

    go = rand(shape, dtype, seed + 7)

    def grads(fn, xs, c):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        c = c.detach().clone().requires_grad_()
        fn(xs, c).backward(go.to(xs[0].dtype))
        return [x.grad for x in xs] + [c.grad]

    fused = grads(frame_combine, inputs, coeffs)
    exact_g = grads(frame_combine_ref, [x.double() for x in inputs], coeffs.double())
    for k in range(K):
        ref_k = coeffs[..., k].reshape(shape[:2] + (1,) * (len(shape) - 2)).to(dtype) * go
        assert_matches_reference(fused[k], ref_k, exact_g[k], f"dinputs[{k}]")
    # dcoeffs is a float32 sum over a frame: compare to the float64 result with a relative bound.
    torch.testing.assert_close(fused[K].double(), exact_g[K], rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)


def test_frame_combine_gradcheck_and_opcheck():
    xs = [rand((2, 3, 4, 5), torch.float64, s).requires_grad_() for s in range(3)]
    c = rand((2, 3, 3), torch.float64, 9).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, d, c: frame_combine([a, b, d], c), (*xs, c))
    torch.library.opcheck(torch.ops.fvdm.frame_combine.default, (xs, c))
    torch.library.opcheck(torch.ops.fvdm.frame_combine_backward.default, (torch.randn_like(xs[0]), [x.detach() for x in xs], c.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inner", [16 * 1024, 16 * 1024 + 7])  # frames of whole 64-byte lines, and not
@pytest.mark.parametrize("K", [1, 3])
def test_large_combines_use_streaming_stores_correctly(dtype, inner, K):
    # Combines moving over 16 MiB write their output with streaming stores (combine_cpu.cpp:
    # fp32 from registers, fp64 through an L1 block buffer): check them against the reference,
    # with frames that start on a 64-byte line and frames that do not (normal stores for the
    # head and tail of a run).
    numel = (16 << 20) // ((K + 1) * dtype.itemsize) + 5 * inner
    shape = (1, -(-numel // inner), inner)
    inputs = [rand(shape, dtype, 20 + k) for k in range(K)]
    coeffs = rand(shape[:2] + (K,), torch.float32, 30)
    torch.testing.assert_close(frame_combine(inputs, coeffs), frame_combine_ref(inputs, coeffs))
    t = torch.randint(0, 50, shape[:2])
    sa, s1 = _tables(50)
    torch.testing.assert_close(noise_inject(inputs[0], inputs[-1], t, sa, s1), noise_inject_ref(inputs[0], inputs[-1], t, sa, s1))


def _tables(T, dtype=torch.float64):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    return ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)


@settings(max_examples=50, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    t_dtype=st.sampled_from([torch.int64, torch.int32]),
    table_dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_noise_inject_matches_reference(shape, dtype, t_dtype, table_dtype, seed):
    T = 1000
    a, s = _tables(T, table_dtype)
    x0, eps = rand(shape, dtype, seed), rand(shape, dtype, seed + 1)
    t = torch.randint(0, T, shape[:2], generator=torch.Generator().manual_seed(seed)).to(t_dtype)
    exact = noise_inject_ref(x0.double(), eps.double(), t.long(), a.double(), s.double())
    assert_matches_reference(noise_inject(x0, eps, t, a, s), noise_inject_ref(x0, eps, t.long(), a, s), exact)


def test_noise_inject_per_frame_timesteps_are_independent():
    # Frame f of clip b uses exactly its own t[b, f]: compare with a per-frame scalar loop.
    a, s = _tables(1000, torch.float32)
    x0, eps = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    t = torch.tensor([[0, 999, 500, 1], [10, 10, 900, 250]])
    out = noise_inject(x0, eps, t, a, s)
    for b in range(2):
        for f in range(4):
            expect = a[t[b, f]] * x0[b, f] + s[t[b, f]] * eps[b, f]
            torch.testing.assert_close(out[b, f], expect)


def test_noise_inject_gradcheck_and_opcheck():
    a, s = _tables(50)
    x0, eps = (rand((2, 3, 4, 5), torch.float64, k).requires_grad_() for k in (0, 1))
    t = torch.randint(0, 50, (2, 3))
    assert torch.autograd.gradcheck(lambda x, e: noise_inject(x, e, t, a, s), (x0, eps))
    torch.library.opcheck(torch.ops.fvdm.noise_inject.default, (x0, eps, t, a, s))


def test_noise_inject_bad_inputs():
    a, s = _tables(10, torch.float32)
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
