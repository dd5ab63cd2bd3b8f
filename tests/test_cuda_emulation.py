"""The CUDA kernels themselves, executed on the CPU.

`make test-cuda-emu` compiles csrc/kernels/cuda/*.cu (kernels and launchers, unchanged) as C++
against the CUDA emulation in csrc/emu/ with AddressSanitizer, and runs this module with the
sanitizer preloaded. Every CUDA thread runs as a fiber with real barriers, warp shuffles and
mma.sync fragments; shared memory and workspaces start as NaN; the launchers see the device
facts of a named GPU profile. The ops are registered as torch.ops.fvdm_cuda_emu.* on CPU
tensors, with the same schemas as torch.ops.fvdm.

Every kernel variant is compared with fvdm.ops.reference under FlashAttention's rule (error
against float64 at most twice that of PyTorch in the same dtype, plus a small slack), and each
case checks from the emulation's launch log that it reached the variant it was drawn for.
Warps run in forward, reverse or shuffled order, so a missing barrier reads NaN.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fvdm.ops.reference import (
    adaln_modulate_ref,
    frame_combine_ref,
    gated_residual_ref,
    noise_inject_ref,
    temporal_attention_ref,
)
from fvdm.ops import selfcheck
from helpers import assert_matches_reference

# Set by `make test-cuda-emu`, which builds the library and preloads the sanitizer it needs.
LIB = os.environ.get("FVDM_CUDA_EMU_LIB", "")

pytestmark = [
    pytest.mark.cuda_emu,
    pytest.mark.skipif(not LIB, reason="run by `make test-cuda-emu` (`make test` includes it)"),
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROFILES = ("sm_80", "sm_90", "sm_80_small")  # sm_75 (no mma) is drawn by the attention tests
ORDERS = (0, 1, 2, 7)  # warps forward, reverse, two shuffles
SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def emu():
    assert Path(LIB).exists(), f"FVDM_CUDA_EMU_LIB={LIB} does not exist"
    torch.ops.load_library(LIB)
    # Outputs from at::empty start as NaN: an element a kernel fails to write is caught.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield torch.ops.fvdm_cuda_emu
    torch.use_deterministic_algorithms(False)


def E():
    return torch.ops.fvdm_cuda_emu


def on(profile: str, order: int = 0) -> None:
    E().set_profile(profile)
    E().set_schedule(order, 2)
    E().take_launches()


def launched() -> list[str]:
    """Names of the kernels launched since the last call."""
    return [entry.split(" grid=")[0].strip("()") for entry in E().take_launches()]


def rand(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """Same values, contiguous, starting `offset` elements into a buffer (not 16-byte aligned)."""
    if offset == 0:
        return t
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def vec(dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def ref_grads(fn, args, grad_out, dtype):
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    fn(*leaves).backward(grad_out.to(dtype))
    return [a.grad for a in leaves]


# ---------------------------------------------------------------------------------------------
# adaLN modulation

# D: odd/tiny (scalar kernels), multiples of the vector (fast kernels), 1544 (> 1536: the
# forward's block-per-row kernel); N up to 40 with the tiny profile gives several row chunks.
modulate_shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.sampled_from([1, 3, 8, 17, 64, 72, 130, 384, 1544])
)


@settings(max_examples=30, **SLOW)
@given(shape=modulate_shapes, dtype=st.sampled_from(FLOAT_DTYPES), offset=st.sampled_from([0, 1]),
       profile=st.sampled_from(PROFILES), order=st.sampled_from(ORDERS), seed=st.integers(0, 10_000))
@example(shape=(1, 1, 40, 64), dtype=torch.bfloat16, offset=0, profile="sm_80_small", order=1, seed=0)
@example(shape=(2, 3, 33, 1544), dtype=torch.float32, offset=0, profile="sm_90", order=0, seed=1)
@example(shape=(1, 2, 7, 72), dtype=torch.float16, offset=1, profile="sm_80", order=2, seed=2)
def test_adaln_forward_and_backward(shape, dtype, offset, profile, order, seed):
    on(profile, order)
    B, F, N, D = shape
    x = misaligned(rand(shape, dtype, seed) * 2 + 0.5, offset)
    shift, scale = rand((B, F, D), dtype, seed + 1), rand((B, F, D), dtype, seed + 2, 0.5)
    y, mean, rstd = E().adaln_modulate(x, shift, scale, 1e-6)
    fast = D % vec(dtype) == 0 and D <= 1536 and offset == 0
    assert launched() == ["adaln_fwd_warp_kernel<T>" if fast else "adaln_fwd_block_kernel<T>"]
    args = [x.double(), shift.double(), scale.double()]
    assert_matches_reference(y, adaln_modulate_ref(x, shift, scale), adaln_modulate_ref(*args))

    gy = rand(shape, dtype, seed + 3)
    got = E().adaln_modulate_backward(gy, x, scale, mean, rstd)
    fast = D % vec(dtype) == 0 and offset == 0
    assert launched() == ["adaln_bwd_cols_kernel<T>" if fast else "adaln_bwd_generic_kernel<T>", "reduce_chunks_kernel<OutT>"]
    exact = ref_grads(adaln_modulate_ref, args, gy, torch.float64)
    same = ref_grads(adaln_modulate_ref, [x, shift, scale], gy, dtype)
    for name, g, r, e in zip(["dx", "dshift", "dscale"], got, same, exact):
        assert_matches_reference(g, r, e, name, conditioning_slack=0 if name == "dx" else 4e-5 * N)


# ---------------------------------------------------------------------------------------------
# gated residual


@settings(max_examples=25, **SLOW)
@given(shape=modulate_shapes, dtype=st.sampled_from(FLOAT_DTYPES), offset=st.sampled_from([0, 1]),
       profile=st.sampled_from(PROFILES), order=st.sampled_from(ORDERS), seed=st.integers(0, 10_000))
@example(shape=(1, 1, 40, 64), dtype=torch.bfloat16, offset=0, profile="sm_80_small", order=1, seed=0)
@example(shape=(2, 1, 9, 17), dtype=torch.float32, offset=1, profile="sm_90", order=0, seed=1)
def test_gated_residual_forward_and_backward(shape, dtype, offset, profile, order, seed):
    on(profile, order)
    B, F, N, D = shape
    x, h = rand(shape, dtype, seed), misaligned(rand(shape, dtype, seed + 1), offset)
    gate = rand((B, F, D), dtype, seed + 2)
    out = E().gated_residual(x, h, gate)
    fast = D % vec(dtype) == 0 and offset == 0
    variant = "gated_{}_kernel<T, V>" if fast else "gated_{}_kernel<T, 1>"
    assert launched() == [variant.format("fwd")]
    args = [x.double(), h.double(), gate.double()]
    assert_matches_reference(out, gated_residual_ref(x, h, gate), gated_residual_ref(*args))

    go = rand(shape, dtype, seed + 3)
    dh, dgate = E().gated_residual_backward(go, h, gate)
    assert launched() == [variant.format("bwd"), "reduce_chunks_kernel<OutT>"]
    exact = ref_grads(gated_residual_ref, args, go, torch.float64)
    same = ref_grads(gated_residual_ref, [x, h, gate], go, dtype)
    assert_matches_reference(dh, same[1], exact[1], "dh")
    assert_matches_reference(dgate, same[2], exact[2], "dgate", conditioning_slack=4e-5 * N)


# ---------------------------------------------------------------------------------------------
# frame combine and noise inject


@settings(max_examples=25, **SLOW)
@given(K=st.integers(1, 8), B=st.integers(1, 2), F=st.integers(1, 3), inner=st.sampled_from([1, 7, 64, 130, 8200]),
       dtype=st.sampled_from(FLOAT_DTYPES), offset=st.sampled_from([0, 1]), profile=st.sampled_from(PROFILES),
       order=st.sampled_from(ORDERS), seed=st.integers(0, 10_000))
@example(K=2, B=1, F=1, inner=8200, dtype=torch.float32, offset=0, profile="sm_90", order=1, seed=0)
def test_frame_combine_forward_and_backward(K, B, F, inner, dtype, offset, profile, order, seed):
    on(profile, order)
    inputs = [rand((B, F, inner), dtype, seed + k) for k in range(K)]
    inputs[0] = misaligned(inputs[0], offset)
    coeffs = rand((B, F, K), torch.float32, seed + 99)
    out = E().frame_combine(inputs, coeffs)
    variant = "combine_{}_kernel<T, V>" if inner % vec(dtype) == 0 and offset == 0 else "combine_{}_kernel<T, 1>"
    assert launched() == [variant.format("fwd")]
    exact_in = [i.double() for i in inputs]
    assert_matches_reference(out, frame_combine_ref(inputs, coeffs), frame_combine_ref(exact_in, coeffs.double()))

    go = rand((B, F, inner), dtype, seed + 5)
    dinputs, dcoeffs = E().frame_combine_backward(go, inputs, coeffs)
    assert launched() == [variant.format("bwd"), "reduce_chunks_kernel<OutT>"]
    fn = lambda c, *xs: frame_combine_ref(list(xs), c)  # noqa: E731
    exact = ref_grads(fn, [coeffs.double(), *exact_in], go, torch.float64)
    same = ref_grads(fn, [coeffs.float(), *inputs], go, dtype)
    for k in range(K):
        assert_matches_reference(dinputs[k], same[1 + k], exact[1 + k], f"dinputs[{k}]")
    # dcoeffs sums `inner` products in fp32 (the reference sums in the input dtype).
    torch.testing.assert_close(dcoeffs.double(), exact[0], atol=1e-5 * inner, rtol=1e-4)


@settings(max_examples=10, **SLOW)
@given(dtype=st.sampled_from(FLOAT_DTYPES), inner=st.sampled_from([5, 64, 1000]), seed=st.integers(0, 10_000))
def test_noise_inject(dtype, inner, seed):
    on("sm_90")
    x0, noise = rand((2, 3, inner), dtype, seed), rand((2, 3, inner), dtype, seed + 1)
    t = torch.randint(0, 1000, (2, 3), generator=torch.Generator().manual_seed(seed))
    ab = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64)
    sa, s1 = ab.sqrt().float(), (1 - ab).sqrt().float()
    out = E().noise_inject(x0, noise, t, sa, s1)
    assert launched() == ["combine_fwd_kernel<T, V>" if inner % vec(dtype) == 0 else "combine_fwd_kernel<T, 1>"]
    exact = noise_inject_ref(x0.double(), noise.double(), t, sa.double(), s1.double())
    assert_matches_reference(out, noise_inject_ref(x0, noise, t, sa, s1), exact)


# ---------------------------------------------------------------------------------------------
# temporal attention


def tensor_core_eligible(dtype, Dh, F, profile, qkv_offset) -> bool:
    """The launchers' choice before shared memory is counted (smem_fits)."""
    return (
        dtype != torch.float32
        and Dh in (64, 72, 128)
        and F <= 128
        and profile != "sm_75"
        and qkv_offset % 2 == 0  # 4-byte aligned rows
    )


def smem_fits(profile, F, Dh, backward):
    f_pad, ld = (F + 15) // 16 * 16, (Dh + 15) // 16 * 16 + 8
    optin = {"sm_75": 64, "sm_80": 163, "sm_90": 227, "sm_80_small": 48}[profile] * 1024
    need = (4 * f_pad * ld * 2 + 2 * f_pad * 4 if backward else 3 * f_pad * ld * 2) + f_pad
    return need <= optin


def qkv_inputs(B, F, N, H, Dh, dtype, seed, offset):
    """q, k, v as views of one packed (B, F, N, 3, H, Dh) buffer, starting `offset` elements in."""
    packed = rand((B, F, N, 3, H, Dh), dtype, seed)
    buf = torch.zeros(packed.numel() + offset, dtype=dtype)
    qkv = buf[offset:].view(packed.shape)
    qkv.copy_(packed)
    return qkv


attn_cases = dict(
    B=st.integers(1, 2), F=st.sampled_from([1, 2, 5, 16, 17, 33]), N=st.integers(1, 3), H=st.integers(1, 2),
    Dh=st.sampled_from([8, 40, 64, 72, 128]), dtype=st.sampled_from(FLOAT_DTYPES), causal=st.booleans(),
    masked=st.booleans(), offset=st.sampled_from([0, 2, 1]), profile=st.sampled_from(PROFILES + ("sm_75",)),
    order=st.sampled_from(ORDERS), seed=st.integers(0, 10_000),
)


def _check_attention(B, F, N, H, Dh, dtype, causal, masked, offset, profile, order, seed):
    on(profile, order)
    qkv = qkv_inputs(B, F, N, H, Dh, dtype, seed, offset)
    q, k, v = qkv.unbind(3)
    mask = None
    if masked:
        mask = torch.rand(B, F, generator=torch.Generator().manual_seed(seed)) > 0.3
        mask[0, 0] = False  # a masked first key; with causal, frame 0 of batch 0 sees no key
    scale = 1 / math.sqrt(Dh)
    out, lse = E().temporal_attention_qkv(qkv, mask, causal, scale)
    tc = tensor_core_eligible(dtype, Dh, F, profile, offset)
    assert launched() == ["attn_fwd_tc_kernel<T, kDh>" if tc and smem_fits(profile, F, Dh, False) else "attn_fwd_generic_kernel<T>"]
    exact = temporal_attention_ref(q.double(), k.double(), v.double(), causal, mask, scale)
    same = temporal_attention_ref(q, k, v, causal, mask, scale)
    assert_matches_reference(out, same, exact)

    go = rand(out.shape, dtype, seed + 7)
    dqkv = E().temporal_attention_qkv_backward(go, qkv, out, lse, mask, causal, scale)
    tc_bwd = tc and smem_fits(profile, F, Dh, True)
    assert launched() == (
        ["attn_bwd_tc_kernel<T, kDh>"] if tc_bwd else ["attn_bwd_dq_generic_kernel<T>", "attn_bwd_dkdv_generic_kernel<T>"]
    )
    three = E().temporal_attention_backward(go, q, k, v, out, lse, mask, causal, scale)
    launched()
    assert torch.equal(dqkv, torch.stack(three, 3)), "packed gradient differs from the three-tensor one"
    fn = lambda a, b, c: temporal_attention_ref(a, b, c, causal, mask, scale)  # noqa: E731
    exact_g = ref_grads(fn, [q.double(), k.double(), v.double()], go, torch.float64)
    same_g = ref_grads(fn, [q, k, v], go, dtype)
    for name, g, r, e in zip(["dq", "dk", "dv"], dqkv.unbind(3), same_g, exact_g):
        assert_matches_reference(g, r, e, name, conditioning_slack=2e-5 * F)


@settings(max_examples=40, **SLOW)
@given(**attn_cases)
@example(B=1, F=16, N=3, H=2, Dh=64, dtype=torch.bfloat16, causal=False, masked=False, offset=0, profile="sm_90", order=0, seed=0)
@example(B=2, F=17, N=2, H=1, Dh=72, dtype=torch.float16, causal=True, masked=True, offset=2, profile="sm_80", order=1, seed=1)
@example(B=1, F=33, N=1, H=1, Dh=128, dtype=torch.bfloat16, causal=True, masked=False, offset=0, profile="sm_80_small", order=2, seed=2)
@example(B=1, F=5, N=2, H=2, Dh=64, dtype=torch.float16, causal=False, masked=True, offset=0, profile="sm_75", order=0, seed=3)
@example(B=2, F=1, N=3, H=1, Dh=40, dtype=torch.float32, causal=True, masked=False, offset=1, profile="sm_90", order=7, seed=4)
@example(B=1, F=3, N=1, H=1, Dh=256, dtype=torch.bfloat16, causal=False, masked=True, offset=0, profile="sm_90", order=1, seed=5)
def test_temporal_attention_forward_and_backward(B, F, N, H, Dh, dtype, causal, masked, offset, profile, order, seed):
    _check_attention(B, F, N, H, Dh, dtype, causal, masked, offset, profile, order, seed)


@pytest.mark.parametrize(
    "F, Dh, dtype, profile",
    [
        (128, 64, torch.bfloat16, "sm_90"),  # the tensor-core limit: 8 query and key tiles
        (129, 64, torch.bfloat16, "sm_90"),  # one frame past it: the generic kernels
        (128, 128, torch.float16, "sm_80_small"),  # tiles do not fit in 48 KiB: the generic kernels
    ],
)
def test_temporal_attention_frame_limits(F, Dh, dtype, profile):
    _check_attention(1, F, 1, 1, Dh, dtype, True, True, 0, profile, 1, 5)


# ---------------------------------------------------------------------------------------------
# the emulation itself


def test_launch_errors_name_the_kernel_and_the_profile():
    on("sm_80_small")
    q = torch.zeros(1, 128, 1, 1, 128, dtype=torch.bfloat16)
    # The launcher respects the profile's opt-in limit (generic kernels), so nothing fails here;
    # an unknown profile is refused with the known ones listed.
    E().temporal_attention(q, q, q, None, False, 1.0)
    with pytest.raises(ValueError, match="unknown device profile 'sm_99'.*sm_90"):
        E().set_profile("sm_99")


# ---------------------------------------------------------------------------------------------
# the first-use self-check (fvdm.ops.selfcheck), on the emulated CUDA kernels


@pytest.mark.parametrize("profile", ["sm_90", "sm_75"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_self_check_passes_on_the_cuda_kernels(profile, dtype):
    on(profile)
    for op in selfcheck.OPS:
        selfcheck.run_self_check(op, "cpu", dtype, E())
    kernels = set(launched())
    tc = dtype != torch.float32 and profile == "sm_90"
    assert ("attn_fwd_tc_kernel<T, kDh>" in kernels) == tc and "attn_fwd_generic_kernel<T>" in kernels


def test_self_check_names_the_op_and_the_way_out():
    on("sm_90")

    class Corrupted:
        """The emulated kernels with one output off by a little (a wrong kernel)."""

        def __getattr__(self, name):
            return getattr(E(), name)

        def temporal_attention_qkv_backward(self, *args):
            dqkv = E().temporal_attention_qkv_backward(*args)
            dqkv[0, 3, 1, 1, 0, 5] += 0.5
            return dqkv

    for op in ("adaln_modulate", "frame_combine"):
        selfcheck.run_self_check(op, "cpu", torch.bfloat16, Corrupted())
    with pytest.raises(selfcheck.KernelSelfCheckError, match=r"fused temporal_attention kernel .* dk .*backend=\"reference\""):
        selfcheck.run_self_check("temporal_attention", "cpu", torch.bfloat16, Corrupted())
