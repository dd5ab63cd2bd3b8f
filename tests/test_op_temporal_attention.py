"""temporal_attention and temporal_attention_qkv on every device (tests/op_inputs.py): the kernels
against fvdm.ops.reference (SDPA with the Latte rearranges) under FlashAttention's rule, and on
the emulation whether each case reached the tensor-core or the generic kernels; then the
autograd wiring, opcheck and the argument checks."""

import math

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
    PROFILES,
    QKV_LAYOUTS,
    SLOW,
    grads_and_saved,
    key_mask,
    packed_qkv,
    qkv_inputs,
    rand,
    ref_grads,
)

from fvdm.ops import temporal_attention, temporal_attention_qkv
from fvdm.ops.reference import temporal_attention_qkv_ref, temporal_attention_ref

SMEM_OPTIN_KIB = {"sm_75": 64, "sm_80": 163, "sm_90": 227, "sm_80_small": 48}


def _tensor_core(dtype, Dh, F, profile, layout, backward) -> bool:
    """The launchers' choice (plan_tensor_core) on the emulation: bf16/fp16, a head dim with a
    tensor-core kernel, F <= 128, rows 4-byte aligned, sm_80+, tiles that fit in shared memory."""
    if dtype == torch.float32 or Dh not in (64, 72, 128) or F > 128 or profile == "sm_75" or layout == "qkv_off1":
        return False
    f_pad, ld = (F + 15) // 16 * 16, (Dh + 15) // 16 * 16 + 8
    need = (4 * f_pad * ld * 2 + 2 * f_pad * 4 if backward else 3 * f_pad * ld * 2) + f_pad
    return need <= SMEM_OPTIN_KIB[profile] * 1024


def _frames(device):
    extra = {"cpu": [3, 9, 24, 40], "cuda": [31, 32, 48, 64, 100, 128], "cuda_emu": [], "avx512_emu": [3, 9, 24, 40]}[device.name]
    return st.sampled_from([1, 2, 5, 16, 17, 33, *extra])


def _check(device, B, F, N, H, Dh, dtype, layout, causal, mask, seed, launch=None):
    """Forward (out, lse) and backward of one case against the reference; q, k, v from one qkv
    buffer go through the packed entry and must give the three-tensor backward's bits."""
    device.start(launch)
    profile = launch[0] if launch else "sm_90"
    dev = device.tensors
    packed = layout.startswith("qkv")
    qkv = packed_qkv(B, F, N, H, Dh, dtype, seed, layout, dev) if packed else None
    q, k, v = qkv.unbind(3) if packed else qkv_inputs(B, F, N, H, Dh, dtype, seed, layout, dev)
    km = key_mask(B, F, seed, mask, dev)
    scale = 1 / math.sqrt(Dh)
    if packed:
        out, lse = device.ops.temporal_attention_qkv(qkv, km, causal, scale)
    else:
        out, lse = device.ops.temporal_attention(q, k, v, km, causal, scale)
    tc_fwd = _tensor_core(dtype, Dh, F, profile, layout, backward=False)
    device.expect_launched(["attn_fwd_tc_kernel<T, kDh>" if tc_fwd else "attn_fwd_generic_kernel<T>"])
    assert out.is_contiguous() and out.shape == (B, F, N, H, Dh)
    exact = temporal_attention_ref(q.double(), k.double(), v.double(), km, causal, scale)
    assert_matches_reference(out, temporal_attention_ref(q, k, v, km, causal, scale), exact,
                             conditioning_slack=device.slack(dtype, exact))
    # lse: -inf exactly for rows with no allowed key, else logsumexp of the allowed scores.
    s = torch.einsum("bfnhd,bgnhd->bnhfg", q.double(), k.double()) * scale
    allowed = torch.ones(F, F, dtype=torch.bool, device=dev)
    allowed = allowed.tril() if causal else allowed
    allowed = allowed & km[:, None, None, None, :] if km is not None else allowed.expand(B, 1, 1, F, F)
    exact_lse = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly for rows with no allowed key"
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], atol=1e-4, rtol=1e-4)

    go = rand((B, F, N, H, Dh), dtype, seed + 7, device=dev)
    three = device.ops.temporal_attention_backward(go, q, k, v, out, lse, km, causal, scale)
    tc_bwd = tc_fwd and _tensor_core(dtype, Dh, F, profile, layout, backward=True)
    bwd_kernels = (["attn_bwd_tc_kernel<T, kDh>"] if tc_bwd
                   else ["attn_bwd_dq_generic_kernel<T>", "attn_bwd_dkdv_generic_kernel<T>"])
    device.expect_launched(bwd_kernels)
    if packed:
        dqkv = device.ops.temporal_attention_qkv_backward(go, qkv, out, lse, km, causal, scale)
        device.expect_launched(bwd_kernels)
        assert torch.equal(dqkv, torch.stack(three, 3)), "packed gradient differs from the three-tensor one"
    fn = lambda a, b, c: temporal_attention_ref(a, b, c, km, causal, scale)  # noqa: E731
    exact_g = ref_grads(fn, [q.double(), k.double(), v.double()], go)
    same_g = ref_grads(fn, [q, k, v], go)
    chunked = 2e-5 * F if device.cuda_kernels else 0.0
    for name, g, r, e in zip(["dq", "dk", "dv"], three, same_g, exact_g):
        assert_matches_reference(g, r, e, name, conditioning_slack=chunked + device.slack(dtype, e))
    if km is not None:  # masked keys receive no gradient
        masked = ~km[:, :, None, None, None].expand_as(three[1])
        assert (three[1][masked] == 0).all() and (three[2][masked] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_attention_forward_and_backward(device):
    @settings(max_examples=device.examples(60, emu=40), **SLOW)
    @given(B=st.integers(1, 2), F=_frames(device), N=st.integers(1, 3), H=st.integers(1, 2),
           Dh=st.sampled_from([1, 8, 24, 40, 64, 72, 128]), dtype=st.sampled_from(FLOAT_DTYPES),
           layout=st.sampled_from(QKV_LAYOUTS), causal=st.booleans(), mask=st.sampled_from(["none", "random", "with_empty"]),
           launch=device.launches(PROFILES + ("sm_75",)), seed=st.integers(0, 10_000))
    @example(B=1, F=16, N=3, H=2, Dh=64, dtype=torch.bfloat16, layout="qkv", causal=False, mask="none",
             launch=("sm_90", 0), seed=0)
    @example(B=2, F=17, N=2, H=1, Dh=72, dtype=torch.float16, layout="qkv_off2", causal=True, mask="with_empty",
             launch=("sm_80", 1), seed=1)
    @example(B=1, F=33, N=1, H=1, Dh=128, dtype=torch.bfloat16, layout="qkv", causal=True, mask="none",
             launch=("sm_80_small", 2), seed=2)
    @example(B=1, F=5, N=2, H=2, Dh=64, dtype=torch.float16, layout="qkv", causal=False, mask="random",
             launch=("sm_75", 0), seed=3)
    @example(B=2, F=1, N=3, H=1, Dh=40, dtype=torch.float32, layout="qkv_off1", causal=True, mask="none",
             launch=("sm_90", 7), seed=4)
    @example(B=1, F=3, N=1, H=1, Dh=256, dtype=torch.bfloat16, layout="qkv", causal=False, mask="random",
             launch=("sm_90", 1), seed=5)
    def check(B, F, N, H, Dh, dtype, layout, causal, mask, launch, seed):
        _check(device, B, F, N, H, Dh, dtype, layout, causal, mask, seed, launch)

    check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "F, Dh, dtype, profile",
    [
        (128, 64, torch.bfloat16, "sm_90"),  # the tensor-core limit: 8 query and key tiles
        (129, 64, torch.bfloat16, "sm_90"),  # one frame past it: the generic kernels
        (128, 128, torch.float16, "sm_80_small"),  # tiles do not fit in 48 KiB: the generic kernels
    ],
)
def test_temporal_attention_frame_limits(device, F, Dh, dtype, profile):
    _check(device, 1, F, 1, 1, Dh, dtype, "qkv", True, "random", 5, (profile, 1))


# The CPU kernels take every dtype the same way here (hypothesis draws them above): fp32 only.
DEVICE_DTYPES = [pytest.param(device.values[0], dtype, id=f"{device.id}-{str(dtype)[6:]}", marks=device.marks)
                 for device in AUTOGRAD_DEVICES for dtype in FLOAT_DTYPES
                 if device.values[0] != CPU or dtype == torch.float32]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("F, Dh", [(16, 64), (16, 72), (16, 128), (128, 64), (100, 72), (200, 64), (1024, 32)])
def test_latte_head_dims_and_long_sequences(device, dtype, F, Dh):
    # Latte's head dims through the tensor-core kernels (CUDA, bf16/fp16, F <= 128), several
    # tokens per block (N = 7 leaves a partial token tile); F > 128 on the generic kernels.
    N, H = (7, 3) if F <= 128 else (1, 1)
    for causal in (False, True):
        _check(device, 1, F, N, H, Dh, dtype, "qkv", causal, "random" if causal else "none", F + Dh)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_queries_give_zeros_and_zero_grads(device):
    device.start()
    q, k, v = qkv_inputs(2, 5, 2, 2, 8, torch.float32, 1, "contiguous", device.tensors)
    km = torch.tensor([[False] * 5, [True, False, True, False, False]], device=device.tensors)
    out, lse = device.ops.temporal_attention(q, k, v, km, False, 0.35)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    grads = device.ops.temporal_attention_backward(torch.ones_like(out), q, k, v, out, lse, km, False, 0.35)
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    # keys 1, 3, 4 of clip 1 are never attended: no gradient reaches them
    assert torch.equal(grads[1][1, [1, 3, 4]], torch.zeros_like(grads[1][1, [1, 3, 4]]))


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_attention_backward_is_deterministic(device):
    device.start(("sm_90", 7))
    q, k, v = qkv_inputs(2, 32, 4, 2, 72, torch.bfloat16, 1, "qkv", device.tensors)
    out, lse = device.ops.temporal_attention(q, k, v, None, False, 0.1)
    go = torch.randn_like(out)
    first, again = (device.ops.temporal_attention_backward(go, q, k, v, out, lse, None, False, 0.1) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---------------------------------------------------------------------------------------------
# the Python entry points and their autograd


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv_inputs(1, 6, 2, 1, 32, torch.float32, 0)
    torch.testing.assert_close(temporal_attention(q, k, v), temporal_attention(q, k, v, scale=1 / math.sqrt(32)))
    assert not torch.allclose(temporal_attention(q, k, v), temporal_attention(q, k, v, scale=1.0))


def test_arguments_follow_the_schema_order():
    # q, k, v, key_mask, causal, scale: the op's schema, the Python entry and the reference.
    q, k, v = qkv_inputs(2, 6, 2, 1, 8, torch.float32, 0)
    km = key_mask(2, 6, 0, "random")
    want = torch.ops.fvdm.temporal_attention(q, k, v, km, True, 0.3)[0]
    torch.testing.assert_close(temporal_attention(q, k, v, km, True, 0.3), want)
    torch.testing.assert_close(temporal_attention_ref(q, k, v, km, True, 0.3), want)
    qkv = torch.stack([q, k, v], 3)
    torch.testing.assert_close(temporal_attention_qkv(qkv, km, True, 0.3), want)
    torch.testing.assert_close(temporal_attention_qkv_ref(qkv, km, True, 0.3), want)


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_packed_qkv_autograd_matches_unbind_and_reference(device):
    # The packed entry runs the same kernels as q, k, v = qkv.unbind(3): the same output and,
    # written straight into one (B, F, N, 3, H, Dh) gradient, the same bits as autograd's stack
    # of dq, dk, dv. pad > 0: a qkv buffer with padded rows (strided, last dim contiguous).
    @settings(max_examples=device.examples(40), **SLOW)
    @given(B=st.integers(1, 2), F=st.integers(1, 20), N=st.integers(1, 3), H=st.integers(1, 3),
           Dh=st.sampled_from([1, 8, 24, 72]), pad=st.sampled_from([0, 3]), dtype=st.sampled_from(FLOAT_DTYPES),
           causal=st.booleans(), mask=st.sampled_from(["none", "random", "with_empty"]), seed=st.integers(0, 10_000))
    def check(B, F, N, H, Dh, pad, dtype, causal, mask, seed):
        qkv = packed_qkv(B, F, N, H, Dh, dtype, seed, device=device.tensors, pad=pad).requires_grad_()
        km = key_mask(B, F, seed, mask, device.tensors)
        go = rand((B, F, N, H, Dh), dtype, seed + 5, device=device.tensors)
        out = temporal_attention_qkv(qkv, km, causal)
        assert out.is_contiguous() and out.shape == (B, F, N, H, Dh)
        (dqkv,) = torch.autograd.grad(out, qkv, go)
        assert dqkv.shape == qkv.shape
        unbound = temporal_attention(*qkv.unbind(3), km, causal)
        (d_unbound,) = torch.autograd.grad(unbound, qkv, go)
        assert torch.equal(out, unbound) and torch.equal(dqkv, d_unbound)
        exact_qkv = qkv.detach().double().requires_grad_()
        exact = temporal_attention_qkv_ref(exact_qkv, km, causal)
        (d_exact,) = torch.autograd.grad(exact, exact_qkv, go.double())
        ref = temporal_attention_qkv_ref(qkv, km, causal)
        (d_ref,) = torch.autograd.grad(ref, qkv, go)
        assert_matches_reference(out, ref, exact, conditioning_slack=device.slack(dtype, exact))
        assert_matches_reference(dqkv, d_ref, d_exact, "dqkv", conditioning_slack=device.slack(dtype, d_exact))

    check()


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_autograd_gradients_of_any_subset_of_q_k_v(device):
    # One kernel writes dq, dk and dv and reads every saved tensor: whichever of q, k, v need
    # gradients, those are the same as when all do.
    q, k, v = qkv_inputs(2, 6, 3, 2, 8, torch.float32, 3, "contiguous", device.tensors)
    fn = lambda a, b, c: temporal_attention(a, b, c, None, True)  # noqa: E731
    full, n_full = grads_and_saved(fn, (q, k, v), (1, 1, 1))
    for needs in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)):
        grads, saved = grads_and_saved(fn, (q, k, v), needs)
        assert saved == n_full
        for g, f, n in zip(grads, full, needs):
            assert g is None if not n else torch.equal(g, f)


def test_gradcheck_fp64():
    qkv = torch.randn(2, 6, 2, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    km = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    for kw in ({}, {"causal": True}, {"key_mask": km}, {"causal": True, "key_mask": km}):
        assert torch.autograd.gradcheck(lambda x: temporal_attention(*x.unbind(3), **kw), (qkv,))
        assert torch.autograd.gradcheck(lambda x: temporal_attention_qkv(x, **kw), (qkv,))


@pytest.mark.parametrize("device", AUTOGRAD_DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64 if device == CPU else torch.bfloat16):
        q, k, v = (t.requires_grad_() for t in qkv_inputs(2, 5, 3, 2, 8, dtype, 0, "contiguous", device.tensors))
        km = torch.tensor([[True, False, True, True, True], [True] * 5], device=device.tensors)
        for mask, causal in ((None, False), (km, True)):
            torch.library.opcheck(torch.ops.fvdm.temporal_attention.default, (q, k, v, mask, causal, 0.35))
        out, lse = torch.ops.fvdm.temporal_attention(q, k, v, km, True, 0.35)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, km, True, 0.35)
        torch.library.opcheck(torch.ops.fvdm.temporal_attention_backward.default, args)
        qkv = rand((2, 5, 3, 3, 2, 8), dtype, 1, device=device.tensors).requires_grad_()
        for mask, causal in ((None, False), (km, True)):
            torch.library.opcheck(torch.ops.fvdm.temporal_attention_qkv.default, (qkv, mask, causal, 0.35))
        out, lse = torch.ops.fvdm.temporal_attention_qkv(qkv, km, True, 0.35)
        args = (torch.randn_like(out), qkv.detach(), out.detach(), lse, km, True, 0.35)
        torch.library.opcheck(torch.ops.fvdm.temporal_attention_qkv_backward.default, args)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_agrees_with_cpu(device, dtype):
    # bf16/fp16 round P and dS on the tensor-core path only: a bound that scales with magnitude.
    q, k, v = qkv_inputs(2, 16, 3, 2, 64, dtype, 50, "qkv", "cuda")
    km = key_mask(2, 16, 50, "random", "cuda")
    cpu_in = [t.cpu() for t in (q, k, v)]
    cpu = torch.ops.fvdm.temporal_attention(*cpu_in, km.cpu(), True, 0.125)
    out, lse = torch.ops.fvdm.temporal_attention(q, k, v, km, True, 0.125)
    go = rand(out.shape, dtype, 51, device="cuda")
    g_cuda = torch.ops.fvdm.temporal_attention_backward(go, q, k, v, out, lse, km, True, 0.125)
    g_cpu = torch.ops.fvdm.temporal_attention_backward(go.cpu(), *cpu_in, cpu[0], cpu[1], km.cpu(), True, 0.125)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 2.5e-5
    for a, b in [(out, cpu[0]), *zip(g_cuda, g_cpu)]:
        mag = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.cpu(), b, atol=4 * eps * mag, rtol=4 * eps)
    finite = torch.isfinite(cpu[1])
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite], cpu[1][finite], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v, m: (q[0], k[0], v[0], m), "q must have 5 dims"),
        (lambda q, k, v, m: (q, k[:, :2], v, m), "k has shape"),
        (lambda q, k, v, m: (q, k, v.double(), m), "v has dtype"),
        (lambda q, k, v, m: (q, k.transpose(3, 4), v, m), "k has shape|k must be contiguous in its last dim"),
        (lambda q, k, v, m: (q, k, v, m[:, :2]), "key_mask must have shape"),
        (lambda q, k, v, m: (q, k, v, m.float()), "key_mask must be bool"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), "q must be float32"),
    ],
)
def test_bad_inputs_name_the_argument(make, match):
    q, k, v = qkv_inputs(2, 4, 3, 2, 4, torch.float32, 0, "contiguous")
    m = torch.ones(2, 4, dtype=torch.bool)
    q, k, v, m = make(q, k, v, m)
    with pytest.raises((ValueError, TypeError), match=match):
        temporal_attention(q, k, v, key_mask=m)


@pytest.mark.parametrize(
    "shape, match",
    [((2, 4, 3, 2, 8), "qkv must have 6 dims"), ((2, 4, 3, 2, 2, 8), "q, k, v along dim 3, got shape")],
)
def test_packed_qkv_bad_shapes_name_the_argument(shape, match):
    with pytest.raises(ValueError, match=match):
        temporal_attention_qkv(torch.randn(shape))
    with pytest.raises(TypeError, match="qkv must be float32"):
        temporal_attention_qkv(torch.randn(2, 4, 3, 3, 2, 8).int())
    with pytest.raises(ValueError, match="qkv must be contiguous in its last dim"):
        temporal_attention_qkv(torch.randn(2, 4, 3, 3, 2, 8, 2)[..., 0])


def test_non_contiguous_last_dim_and_bad_scale_are_rejected():
    x = torch.randn(1, 3, 2, 2, 8, 2)[..., 0]  # last-dim stride 2
    with pytest.raises(ValueError, match="q must be contiguous in its last dim"):
        temporal_attention(x, x, x)
    q = torch.randn(1, 3, 2, 2, 8)
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            temporal_attention(q, q, q, scale=bad)


def test_head_dim_zero_names_the_argument():
    q = torch.randn(1, 3, 2, 2, 0)
    with pytest.raises(ValueError, match=r"head dim of q .*must be >= 1, got shape \(1, 3, 2, 2, 0\)"):
        temporal_attention(q, q, q)
    with pytest.raises(ValueError, match=r"head dim of qkv .*must be >= 1"):
        temporal_attention_qkv(torch.randn(1, 3, 2, 3, 2, 0))


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_rejects_float64(device):
    q = torch.zeros(1, 2, 3, 2, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="q is float64 on CUDA"):
        temporal_attention(q, q, q)


@settings(max_examples=60, deadline=None)
@given(sign=st.sampled_from([1.0, -1.0]), at=st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 1),
                                                      st.integers(0, 3)),
       causal=st.booleans(), masked=st.booleans(), zero_key=st.booleans(), seed=st.integers(0, 10_000))
def test_infinite_query_puts_nan_where_documented(sign, at, causal, masked, zero_key, seed):
    """NaN where the reference has NaN, and only one place more (as the docstring says): a
    query whose allowed scores are all -inf (or NaN), where SDPA returns zeros."""
    q, k, v = qkv_inputs(1, 4, 2, 2, 4, torch.float32, seed, "contiguous")
    q = q.clone()
    q[(0, *at)] = sign * math.inf
    if zero_key:
        k = k.clone()
        k[0, 1, :, :, at[-1]] = 0.0  # inf * 0: a NaN score
    m = key_mask(1, 4, seed, "random") if masked else None
    fused = torch.isnan(temporal_attention(q, k, v, m, causal)).any(-1)
    ref = torch.isnan(temporal_attention_ref(q, k, v, m, causal)).any(-1)
    assert not (ref & ~fused).any()
    allowed = torch.ones(4, 4, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if m is not None:
        allowed = allowed & m[0][None, :]
    scores = torch.einsum("fnhd,gnhd->nhfg", q[0], k[0])
    for f, n, h in (fused & ~ref)[0].nonzero().tolist():
        row = scores[n, h, f][allowed[f]]
        assert bool(((row == -math.inf) | row.isnan()).all()), (f, n, h, row)

