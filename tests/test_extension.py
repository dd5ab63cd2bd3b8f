"""The compiled core is built and reports what it contains."""

import torch

import fvdm
from fvdm.ops import get_backend

# Every operator fvdm._C registered, read from the dispatcher (a new op is checked without
# being listed here).
OPS = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fvdm::"))


def test_extension_is_built():
    info = fvdm.build_info()
    assert info["built"], f"fvdm._C failed to import: {info.get('error')}"
    assert info["version"] == fvdm.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_every_op_of_the_fused_backend_is_registered():
    fused = [name for name in vars(get_backend("fused")) if name != "name"]
    assert fused and set(fused) <= set(OPS), f"registered: {OPS}"
    assert "temporal_attention_qkv_backward" in OPS


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
