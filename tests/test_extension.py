"""The compiled core is built and reports what it contains."""

import torch

import fvdm

OPS = [
    "adaln_modulate",
    "adaln_modulate_backward",
    "gated_residual",
    "gated_residual_backward",
    "frame_combine",
    "frame_combine_backward",
    "noise_inject",
    "temporal_attention",
    "temporal_attention_backward",
]


def test_extension_is_built():
    info = fvdm.build_info()
    assert info["built"], f"fvdm._C failed to import: {info.get('error')}"
    assert info["version"] == fvdm.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_every_op_has_a_cpu_kernel():
    kernels = fvdm.build_info()["kernels"]
    for op in OPS:
        assert "cpu" in kernels.get(op, []), f"fvdm::{op} has no CPU kernel: {kernels}"
    if fvdm.build_info()["cuda"]:
        for op in OPS:
            assert "cuda" in kernels[op], f"CUDA build but fvdm::{op} has no CUDA kernel"


def test_ops_are_torch_library_operators():
    for op in OPS:
        assert isinstance(getattr(torch.ops.fvdm, op).default, torch._ops.OpOverload)
