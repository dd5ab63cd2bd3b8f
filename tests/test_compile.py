"""All fused operators trace into one torch.compile(fullgraph=True) graph, forward and backward,
and give the same results as eager execution."""

import pytest
import torch
from op_inputs import AUTOGRAD_DEVICES, CPU, CUDA

from fvdm import ops


def block(x, shift, scale, gate, qkv, x0, noise, t, a, s, coeffs):
    """A miniature of what the model and the diffusion code do with the operators."""
    h = ops.adaln_modulate(x, shift, scale)
    B, F, N, D = h.shape
    q, k, v = qkv.unbind(3)
    attn = ops.temporal_attention(q, k, v, causal=True).reshape(B, F, N, D)
    packed = ops.temporal_attention_qkv(qkv).reshape(B, F, N, D)
    y = ops.gated_residual(x, attn + packed + h, gate)
    xt = ops.noise_inject(x0, noise, t, a, s)
    mixed = ops.frame_combine([xt, y], coeffs)
    return mixed.square().mean()


def _inputs(device, dtype, Dh):
    g = torch.Generator().manual_seed(0)
    B, F, N, H = 2, 5, 3, 2
    D = H * Dh

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100), 0).to(device)
    return (r(B, F, N, D), r(B, F, D), r(B, F, D), r(B, F, D), r(B, F, N, 3, H, Dh), r(B, F, N, D), r(B, F, N, D),
            torch.randint(0, 100, (B, F), generator=g).to(device), ab.sqrt(), (1 - ab).sqrt(),
            torch.randn(B, F, 2, generator=g).to(device).requires_grad_())


# On a GPU in bf16 with Dh = 64: the tensor-core attention kernels.
@pytest.mark.parametrize("device, dtype, Dh, tol", [
    pytest.param(CPU, torch.float32, 4, (1e-4, 1e-5), id="cpu"),
    pytest.param(CUDA, torch.bfloat16, 64, (2e-2, 2e-2), id="cuda", marks=AUTOGRAD_DEVICES[1].marks),
])
def test_compile_fullgraph_forward_and_backward_match_eager(device, dtype, Dh, tol):
    inputs = _inputs(device.tensors, dtype, Dh)
    eager_loss = block(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, [t for t in inputs if t.requires_grad])

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
    torch.testing.assert_close(loss, eager_loss, rtol=tol[0], atol=tol[1])
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=tol[0], atol=tol[1])
