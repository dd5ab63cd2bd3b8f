"""temporal_attention: fused CPU kernel vs ops/reference.py (SDPA with the Latte rearranges)."""

import math

import pytest
import torch
from helpers import FLOAT_DTYPES, assert_matches_reference, rand
from hypothesis import given, settings
from hypothesis import strategies as st

from fvdm.ops import temporal_attention, temporal_attention_qkv
from fvdm.ops.reference import temporal_attention_qkv_ref, temporal_attention_ref


def _qkv(B, F, N, H, Dh, dtype, seed, layout):
    """q, k, v of shape (B, F, N, H, Dh) in one of the layouts the op must read."""
    if layout == "qkv":  # views into the (B, F, N, 3, H, Dh) projection output, as in the model
        return rand((B, F, N, 3, H, Dh), dtype, seed).unbind(3)
    if layout == "contiguous":
        return tuple(rand((B, F, N, H, Dh), dtype, seed + i) for i in range(3))
    # "permuted": (B, N, H, F, Dh) memory seen as (B, F, N, H, Dh)
    return tuple(rand((B, N, H, F, Dh), dtype, seed + i).permute(0, 3, 1, 2, 4) for i in range(3))


def _mask(B, F, seed, kind):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, F, generator=g) > 0.4
    if kind == "with_empty":  # a whole clip with no frame to attend
        m[0] = False
    return m


def _grads(fn, q, k, v, go, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves, **kw).backward(go.to(leaves[0].dtype))
    return [t.grad for t in leaves]


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 2), F=st.integers(1, 40), N=st.integers(1, 3), H=st.integers(1, 3),
    Dh=st.sampled_from([1, 8, 16, 24, 64, 72]), dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(["qkv", "contiguous", "permuted"]), causal=st.booleans(),
    mask=st.sampled_from(["none", "random", "with_empty"]), seed=st.integers(0, 10_000),
)
def test_forward_and_backward_match_reference(B, F, N, H, Dh, dtype, layout, causal, mask, seed):
    q, k, v = _qkv(B, F, N, H, Dh, dtype, seed, layout)
    km = _mask(B, F, seed, mask)
    kw = dict(causal=causal, key_mask=km)
    exact = temporal_attention_ref(q.double(), k.double(), v.double(), **kw)
    out = temporal_attention(q, k, v, **kw)
    assert out.is_contiguous() and out.shape == (B, F, N, H, Dh)
    assert_matches_reference(out, temporal_attention_ref(q, k, v, **kw), exact)

    go = rand((B, F, N, H, Dh), torch.float64, seed + 5)
    fused = _grads(temporal_attention, q, k, v, go, **kw)
    ref = _grads(temporal_attention_ref, q, k, v, go, **kw)
    ex = _grads(temporal_attention_ref, q.double(), k.double(), v.double(), go, **kw)
    for name, f, r, e in zip(["dq", "dk", "dv"], fused, ref, ex):
        assert_matches_reference(f, r, e, name)


@pytest.mark.parametrize("F, Dh", [(16, 64), (16, 72), (16, 128), (128, 64), (100, 72)])
def test_latte_head_dims_and_long_sequences(F, Dh):
    q, k, v = _qkv(1, F, 2, 2, Dh, torch.float32, F + Dh, "qkv")
    for causal in (False, True):
        exact = temporal_attention_ref(q.double(), k.double(), v.double(), causal=causal)
        torch.testing.assert_close(temporal_attention(q, k, v, causal=causal).double(), exact, atol=2e-5, rtol=1e-4)


def test_lse_is_logsumexp_of_masked_scaled_scores():
    B, F, N, H, Dh = 2, 9, 3, 2, 16
    q, k, v = _qkv(B, F, N, H, Dh, torch.float32, 3, "qkv")
    km = _mask(B, F, 3, "with_empty")
    scale = 0.3
    _, lse = torch.ops.fvdm.temporal_attention(q, k, v, km, True, scale)
    s = torch.einsum("bfnhd,bgnhd->bnhfg", q.double(), k.double()) * scale  # (B, N, H, Fq, Fk)
    allowed = torch.ones(F, F, dtype=torch.bool).tril() & km[:, None, None, None, :]
    expect = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expect, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[0]).all()  # clip 0 has no frame to attend


def test_fully_masked_queries_give_zeros_and_zero_grads():
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 5, 2, 2, 8, torch.float32, 1, "contiguous"))
    km = torch.tensor([[False] * 5, [True, False, True, False, False]])
    out = temporal_attention(q, k, v, key_mask=km)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
    # keys 1, 3, 4 of clip 1 are never attended: no gradient reaches them
    assert torch.equal(k.grad[1, [1, 3, 4]], torch.zeros_like(k.grad[1, [1, 3, 4]]))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(1, 6, 2, 1, 32, torch.float32, 0, "qkv")
    torch.testing.assert_close(temporal_attention(q, k, v), temporal_attention(q, k, v, scale=1 / math.sqrt(32)))
    assert not torch.allclose(temporal_attention(q, k, v), temporal_attention(q, k, v, scale=1.0))


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), F=st.integers(1, 20), N=st.integers(1, 3), H=st.integers(1, 3),
    Dh=st.sampled_from([1, 8, 24, 72]), pad=st.sampled_from([0, 3]), dtype=st.sampled_from(FLOAT_DTYPES),
    causal=st.booleans(), mask=st.sampled_from(["none", "random", "with_empty"]), seed=st.integers(0, 10_000),
)
def test_packed_qkv_matches_unbind_and_reference(B, F, N, H, Dh, pad, dtype, causal, mask, seed):
    # The packed entry runs the same kernels as q, k, v = qkv.unbind(3): the same output and,
    # written straight into one (B, F, N, 3, H, Dh) gradient, the same bits as autograd's stack
    # of dq, dk, dv. pad > 0: a qkv buffer with padded rows (strided, last dim contiguous).
    qkv = rand((B, F, N, 3, H, Dh + pad), dtype, seed)[..., :Dh].requires_grad_()
    km = _mask(B, F, seed, mask)
    kw = dict(causal=causal, key_mask=km)
    go = rand((B, F, N, H, Dh), dtype, seed + 5)
    out = temporal_attention_qkv(qkv, **kw)
    assert out.is_contiguous() and out.shape == (B, F, N, H, Dh)
    (dqkv,) = torch.autograd.grad(out, qkv, go)
    assert dqkv.shape == qkv.shape
    unbound = temporal_attention(*qkv.unbind(3), **kw)
    (d_unbound,) = torch.autograd.grad(unbound, qkv, go)
    assert torch.equal(out, unbound) and torch.equal(dqkv, d_unbound)
    exact_qkv = qkv.detach().double().requires_grad_()
    exact = temporal_attention_qkv_ref(exact_qkv, **kw)
    (d_exact,) = torch.autograd.grad(exact, exact_qkv, go.double())
    ref = temporal_attention_qkv_ref(qkv, **kw)
    (d_ref,) = torch.autograd.grad(ref, qkv, go)
    assert_matches_reference(out, ref, exact)
    assert_matches_reference(dqkv, d_ref, d_exact, "dqkv")


def test_gradcheck_fp64():
    qkv = torch.randn(2, 6, 2, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    km = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    for kw in ({}, {"causal": True}, {"key_mask": km}, {"causal": True, "key_mask": km}):
        assert torch.autograd.gradcheck(lambda x: temporal_attention(*x.unbind(3), **kw), (qkv,))
        assert torch.autograd.gradcheck(lambda x: temporal_attention_qkv(x, **kw), (qkv,))


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        q, k, v = (t.requires_grad_() for t in _qkv(2, 5, 3, 2, 8, dtype, 0, "contiguous"))
        km = torch.tensor([[True, False, True, True, True], [True] * 5])
        for mask, causal in ((None, False), (km, True)):
            torch.library.opcheck(torch.ops.fvdm.temporal_attention.default, (q, k, v, mask, causal, 0.35))
        out, lse = torch.ops.fvdm.temporal_attention(q, k, v, km, True, 0.35)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, km, True, 0.35)
        torch.library.opcheck(torch.ops.fvdm.temporal_attention_backward.default, args)
        qkv = rand((2, 5, 3, 3, 2, 8), dtype, 1).requires_grad_()
        for mask, causal in ((None, False), (km, True)):
            torch.library.opcheck(torch.ops.fvdm.temporal_attention_qkv.default, (qkv, mask, causal, 0.35))
        out, lse = torch.ops.fvdm.temporal_attention_qkv(qkv, km, True, 0.35)
        args = (torch.randn_like(out), qkv.detach(), out.detach(), lse, km, True, 0.35)
        torch.library.opcheck(torch.ops.fvdm.temporal_attention_qkv_backward.default, args)


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
    q, k, v = _qkv(2, 4, 3, 2, 4, torch.float32, 0, "contiguous")
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


@settings(max_examples=60, deadline=None)
@given(sign=st.sampled_from([1.0, -1.0]), at=st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 1),
                                                      st.integers(0, 3)),
       causal=st.booleans(), masked=st.booleans(), zero_key=st.booleans(), seed=st.integers(0, 10_000))
def test_infinite_query_puts_nan_where_documented(sign, at, causal, masked, zero_key, seed):
    """NaN where the reference has NaN, and only one place more (as the docstring says): a
    query whose allowed scores are all -inf (or NaN), where SDPA returns zeros."""
    q, k, v = _qkv(1, 4, 2, 2, 4, torch.float32, seed, "contiguous")
    q = q.clone()
    q[(0, *at)] = sign * math.inf
    if zero_key:
        k = k.clone()
        k[0, 1, :, :, at[-1]] = 0.0  # inf * 0: a NaN score
    m = _mask(1, 4, seed, "random") if masked else None
    fused = torch.isnan(temporal_attention(q, k, v, causal=causal, key_mask=m)).any(-1)
    ref = torch.isnan(temporal_attention_ref(q, k, v, causal=causal, key_mask=m)).any(-1)
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
