"""What the per-operator tests (tests/test_op_*.py) run on and what they feed the operators.

Devices: the CPU kernels (`cpu`), the CUDA kernels on a GPU (`cuda`, marked `cuda`, skipped
without a GPU and a CUDA build), and the same CUDA kernels executed on the CPU by the emulation
in csrc/emu/ (`cuda_emu`, marked `cuda_emu`, run by `make test-cuda-emu` in its own process with
AddressSanitizer preloaded and FVDM_CUDA_EMU_LIB set), and the CPU kernels built with their
AVX-512 paths on any x86-64 host by the AVX-512 emulation (`avx512_emu`, marked `avx512_emu`, run
by `make test-avx512-emu` likewise, FVDM_AVX512_EMU_LIB set): the paths a CPU build takes only on
an AVX-512 machine. A test parametrized over DEVICES calls `device.ops` (torch.ops.fvdm, or
torch.ops.fvdm_cuda_emu / fvdm_avx512_emu for the emulations, same schemas) and compares with
fvdm.ops.reference.

On the emulation a case also draws the GPU profile the launchers see and the order warps run
in (`device.launches()`); `device.start(launch)` applies them and `device.expect_launched(...)`
checks from the emulation's launch log which kernel variant the case reached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

import fvdm
from helpers import FLOAT_DTYPES  # noqa: F401  (re-exported for the per-operator modules)

SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Set by `make test-cuda-emu`, which builds the emulation and preloads the sanitizer it needs.
EMU_LIB = os.environ.get("FVDM_CUDA_EMU_LIB", "")
# Set by `make test-avx512-emu` (cmake/FvdmAvx512Emulation.cmake), likewise.
AVX512_EMU_LIB = os.environ.get("FVDM_AVX512_EMU_LIB", "")
PROFILES = ("sm_80", "sm_90", "sm_80_small")  # GPU profiles of the emulation; sm_75 has no mma
ORDERS = (0, 1, 2, 7)  # warps forward, reverse, two shuffles: a missing barrier reads NaN


def _cuda_ready() -> bool:
    info = fvdm.build_info()
    return torch.cuda.is_available() and bool(info.get("built") and info.get("cuda"))


_emu_loaded = set()


def load_emulation(lib: str, variable: str, namespace: str):
    """torch.ops.<namespace>, loading `lib` (named by the environment `variable`) once."""
    if lib not in _emu_loaded:
        assert lib and Path(lib).exists(), f"{variable}={lib} does not exist"
        torch.ops.load_library(lib)
        # Outputs from at::empty start as NaN: an element a kernel fails to write is caught.
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        _emu_loaded.add(lib)
    return getattr(torch.ops, namespace)


def _load_emulation():
    return load_emulation(EMU_LIB, "FVDM_CUDA_EMU_LIB", "fvdm_cuda_emu")


@dataclass(frozen=True)
class Device:
    name: str  # "cpu", "cuda", "cuda_emu" or "avx512_emu"

    def __str__(self) -> str:
        return self.name

    @property
    def emulated(self) -> bool:
        """The CUDA emulation (GPU profiles, warp orders, a launch log)."""
        return self.name == "cuda_emu"

    @property
    def cuda_kernels(self) -> bool:
        return self.name in ("cuda", "cuda_emu")

    @property
    def tensors(self) -> str:
        """The torch device of the tensors this device's ops take (the emulation: CPU tensors)."""
        return "cuda" if self.name == "cuda" else "cpu"

    @property
    def ops(self):
        if self.name == "avx512_emu":
            return load_emulation(AVX512_EMU_LIB, "FVDM_AVX512_EMU_LIB", "fvdm_avx512_emu")
        return _load_emulation() if self.emulated else torch.ops.fvdm

    def examples(self, n: int, emu: int | None = None) -> int:
        """max_examples of a hypothesis test: n, or `emu` on the emulation (every CUDA thread
        is a fiber there, and every AVX-512 intrinsic a function over its lanes, so a case
        costs more)."""
        return emu if self.name.endswith("_emu") and emu is not None else n

    def launches(self, profiles=PROFILES):
        """Strategy for what the emulation's launchers see: (GPU profile, warp order)."""
        if self.emulated:
            return st.tuples(st.sampled_from(profiles), st.sampled_from(ORDERS))
        return st.just(None)

    def slack(self, dtype, ref: torch.Tensor) -> float:
        """Absolute slack a GPU adds to helpers.assert_matches_reference's rule: nvcc builds
        with --use_fast_math (approximate exp2, rsqrt, division), which neither the CPU kernels
        nor the emulation of the CUDA kernels reproduce. One more unit of the rule's own slack."""
        if self.name != "cuda" or not ref.numel():
            return 0.0
        return (1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps) * max(1.0, ref.abs().max().item())

    def start(self, launch=None) -> None:
        if self.emulated:
            profile, order = launch or ("sm_90", 0)
            self.ops.set_profile(profile)
            self.ops.set_schedule(order, 2)
            self.ops.take_launches()

    def launched(self) -> list[str]:
        """Names of the kernels the emulation launched since the last call (empty elsewhere)."""
        if not self.emulated:
            return []
        return [entry.split(" grid=")[0].strip("()") for entry in self.ops.take_launches()]

    def expect_launched(self, kernels: list[str]) -> None:
        if self.emulated:
            got = self.launched()
            assert got == kernels, f"the emulation launched {got}, expected {kernels}"


CPU, CUDA, CUDA_EMU, AVX512_EMU = Device("cpu"), Device("cuda"), Device("cuda_emu"), Device("avx512_emu")
_CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and a CUDA build of fvdm._C")]
_EMU_MARKS = [pytest.mark.cuda_emu,
              pytest.mark.skipif(not EMU_LIB, reason="run by `make test-cuda-emu` (`make test` includes it)")]
_AVX512_EMU_MARKS = [pytest.mark.avx512_emu,
                     pytest.mark.skipif(not AVX512_EMU_LIB, reason="run by `make test-avx512-emu` (`make test` includes it)")]
# Every device the kernels run on; the autograd wiring (torch.ops.fvdm only) on the real ones.
DEVICES = [pytest.param(CPU, id="cpu"), pytest.param(CUDA, id="cuda", marks=_CUDA_MARKS),
           pytest.param(CUDA_EMU, id="cuda_emu", marks=_EMU_MARKS),
           pytest.param(AVX512_EMU, id="avx512_emu", marks=_AVX512_EMU_MARKS)]
AUTOGRAD_DEVICES = DEVICES[:2]
CUDA_ONLY = [DEVICES[1]]


# ---------------------------------------------------------------------------------------------
# tensors


def rand(shape, dtype, seed: int, scale: float = 1.0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values in another memory layout. "strided": non-contiguous (the host layer makes it
    contiguous); "offset1" / "offset2": contiguous but starting 1 or 2 elements into a buffer,
    so the data pointer is not 16-byte aligned and the CUDA kernels take their scalar paths."""
    if layout == "contiguous":
        return t
    if layout == "strided":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    off = {"offset1": 1, "offset2": 2}[layout]
    buf = torch.zeros(t.numel() + off, dtype=t.dtype, device=t.device)
    view = buf[off:].view(t.shape)
    view.copy_(t)
    return view


def vec(dtype) -> int:
    """Elements of `dtype` in one 16-byte vector (the CUDA kernels' fast paths)."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def ref_grads(fn, args, grad_out, dtype=None):
    """Gradients of fn(*args) for every argument (as leaves in `dtype`, default their own)."""
    leaves = [a.detach().to(dtype or a.dtype).clone().requires_grad_() for a in args]
    fn(*leaves).backward(grad_out.to(leaves[0].dtype))
    return [a.grad for a in leaves]


def grads_and_saved(fn, args, needs):
    """Gradients of fn(*args) with only the args flagged in `needs` requiring grad, and the
    number of tensors autograd saved for the backward."""
    leaves = [a.detach().clone().requires_grad_(bool(n)) for a, n in zip(args, needs)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return [a.grad for a in leaves], len(saved)


# ---------------------------------------------------------------------------------------------
# adaLN modulation and gated residual: x (B, F, N, D), per-frame tables (B, F, D)

# D: tiny and odd (scalar paths), multiples of the vector (vector paths), Latte widths, 1544
# (> 1536: the CUDA forward's block-per-row kernel); N up to 40 gives several row chunks.
modulate_shapes = st.tuples(
    st.integers(1, 3), st.integers(1, 5), st.integers(1, 40), st.sampled_from([1, 2, 3, 8, 17, 64, 72, 130, 384, 1544])
)
modulate_layouts = st.sampled_from(["contiguous", "strided", "offset1", "offset2"])


def adaln_inputs(shape, dtype, seed, layout="contiguous", device="cpu", constant=None):
    """x, shift, scale; `constant` sets every other token of every frame to one value."""
    B, F, N, D = shape
    x = rand(shape, torch.float64, seed) * 2 + 0.5
    if constant is not None:
        x[:, :, ::2] = constant
    shift = rand((B, F, D), torch.float64, seed + 1)
    scale = rand((B, F, D), torch.float64, seed + 2) * 0.5
    return (with_layout(x.to(device, dtype), layout), shift.to(device, dtype),
            with_layout(scale.to(device, dtype), layout))


def gated_inputs(shape, dtype, seed, layout="contiguous", device="cpu"):
    """x, h, gate."""
    B, F, N, D = shape
    return (rand(shape, dtype, seed, device=device), with_layout(rand(shape, dtype, seed + 1, device=device), layout),
            rand((B, F, D), dtype, seed + 2, device=device))


# ---------------------------------------------------------------------------------------------
# frame combine and noise inject: (B, F, ...) tensors, per-frame coefficients

# (B, F, trailing...) shapes: tokens (N, D), latents (C, H, W), and a bare (B, F).
combine_shapes = st.tuples(st.integers(1, 3), st.integers(1, 6)).flatmap(
    lambda bf: st.sampled_from([bf, bf + (7,), bf + (3, 33), bf + (4, 5, 6), bf + (2, 1, 700), bf + (64, 96)])
)


def combine_inputs(shape, K, dtype, seed, layout="contiguous", device="cpu"):
    """K inputs (the first in `layout`) and coeffs (B, F, K) float32."""
    inputs = [rand(shape, dtype, seed + k, device=device) for k in range(K)]
    inputs[0] = with_layout(inputs[0], layout)
    return inputs, rand(shape[:2] + (K,), torch.float32, seed + 99, device=device)


def noise_tables(T, dtype=torch.float64, device="cpu"):
    """sqrt(alpha_bar), sqrt(1 - alpha_bar) of a linear beta schedule of T steps."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    return ab.sqrt().to(device, dtype), (1 - ab).sqrt().to(device, dtype)


def timesteps(B, F, T, seed, dtype=torch.int64, device="cpu"):
    return torch.randint(0, T, (B, F), generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# ---------------------------------------------------------------------------------------------
# temporal attention: q, k, v (B, F, N, H, Dh), key mask (B, F)

QKV_LAYOUTS = ("qkv", "contiguous", "permuted", "qkv_off1", "qkv_off2")


def qkv_inputs(B, F, N, H, Dh, dtype, seed, layout="qkv", device="cpu", pad=0):
    """q, k, v as the op may see them: views of one (B, F, N, 3, H, Dh) buffer as a Latte block
    makes them ("qkv", rows `pad` elements longer than Dh), separate contiguous tensors,
    (B, N, H, F, Dh) memory seen as (B, F, N, H, Dh) ("permuted"), or qkv views starting 1 or 2
    elements into their buffer ("qkv_off1", "qkv_off2": rows only 2- or 4-byte aligned in 16-bit
    dtypes, which the CUDA tensor-core kernels must copy in smaller chunks or leave alone)."""
    if layout == "contiguous":
        return tuple(rand((B, F, N, H, Dh), dtype, seed + i, device=device) for i in range(3))
    if layout == "permuted":
        return tuple(rand((B, N, H, F, Dh), dtype, seed + i, device=device).permute(0, 3, 1, 2, 4) for i in range(3))
    return packed_qkv(B, F, N, H, Dh, dtype, seed, layout, device, pad).unbind(3)


def packed_qkv(B, F, N, H, Dh, dtype, seed, layout="qkv", device="cpu", pad=0):
    """One (B, F, N, 3, H, Dh) qkv buffer (layouts as in qkv_inputs, "qkv" or "qkv_off*")."""
    qkv = rand((B, F, N, 3, H, Dh + pad), dtype, seed, device=device)[..., :Dh]
    if layout == "qkv":
        return qkv
    return with_layout(qkv.contiguous(), {"qkv_off1": "offset1", "qkv_off2": "offset2"}[layout])


def key_mask(B, F, seed, kind, device="cpu"):
    """None ("none"), random frames allowed ("random"), or random with clip 0 allowed nothing
    ("with_empty")."""
    if kind == "none":
        return None
    m = torch.rand(B, F, generator=torch.Generator().manual_seed(seed)) > 0.4
    if kind == "with_empty":
        m[0] = False
    return m.to(device)
