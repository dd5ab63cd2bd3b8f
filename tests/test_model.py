"""The video DiT: backends agree, per-frame conditioning stays per frame, layout, options."""

from __future__ import annotations

import pytest
import torch

from fvdm import HAS_C
from fvdm.models import Latte, LatteBlock, latte, model_config
from fvdm.ops import get_backend

needs_c = pytest.mark.skipif(not HAS_C, reason="fvdm._C is not built")
REF = get_backend("reference")

TINY = dict(input_size=8, in_channels=3, num_frames=6, learn_sigma=True)  # 16 tokens per frame, 6 output channels


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so adaLN-zero layers are non-zero and gradients
    reach every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def inputs(B=2, Fr=6, C=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Fr, C, size, size, generator=g)
    t = torch.randint(0, 1000, (B, Fr), generator=g)
    return x, t


def make(depth=4, backend="reference", seed=0, **kw) -> Latte:
    torch.manual_seed(seed)
    return perturbed(latte("T/2", backend=backend, depth=depth, **{**TINY, **kw}), seed)


def output_and_grads(model, x, t, y=None):
    model.zero_grad()
    out = model(x, t, y)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_backends_agree(depth: int, **kw) -> None:
    ref = make(depth=depth, backend="reference", **kw)
    fused = make(depth=depth, backend="fused", **kw)
    fused.load_state_dict(ref.state_dict())
    x, t = inputs()
    y = torch.tensor([1, 3]) if kw.get("num_classes") else None
    out_r, g_r = output_and_grads(ref.eval(), x, t, y)
    out_f, g_f = output_and_grads(fused.eval(), x, t, y)
    assert out_r.abs().max() > 1e-3  # the perturbation made the output non-trivial
    torch.testing.assert_close(out_f, out_r, atol=1e-4, rtol=1e-4)
    unused = {"temp_embed"} if depth == 1 else set()  # no temporal block, no temporal table
    assert set(g_r) == set(g_f) == {n for n, _ in ref.named_parameters()} - unused
    for name in g_r:
        assert g_r[name].abs().max() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(g_f[name], g_r[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- backends


@needs_c
def test_fused_matches_reference_spatial_only():
    # one spatial block + final layer: every fused op but temporal attention, always runnable
    assert_backends_agree(depth=1, num_classes=5)


@needs_c
def test_fused_matches_reference_full_model():
    assert_backends_agree(depth=4, num_classes=5)


@needs_c
def test_fused_matches_reference_with_conv_head():
    assert_backends_agree(depth=2, conv_head=8, conv_head_layers=2)


@needs_c
def test_fused_matches_reference_with_joint_blocks():
    assert_backends_agree(depth=3, block_pattern="JTS")


def test_conv_head_starts_at_zero_and_reaches_across_patch_borders():
    model = latte("T/2", backend="reference", conv_head=8, **TINY)
    x, t = inputs()
    out = model(x, t)
    assert out.shape == (2, 6, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))
    # zero output but a live gradient: the zero conv learns at once (its input, the Xavier
    # Linear's output, is not zero), and the Linear learns as soon as the conv is not zero
    loss = (model(x, t) * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum()
    loss.backward()
    assert model.conv_head.conv.weight.grad.abs().max() > 0
    # The head alone: a patch's features reach its own pixels through the Linear's unpatchify
    # and, through the 3x3 conv, a one-pixel ring in the neighbouring patches, no further.
    m = perturbed(latte("T/2", backend="reference", depth=1, conv_head=8, **TINY)).eval()
    h = torch.randn(1, 1, 16, 4 * 8)  # (B, F, N, p*p*C) patch features, 4x4 grid of 2x2 patches
    h2 = h.clone()
    h2[0, 0, 5] += 1.0  # patch (row 1, col 1): pixels rows 2-3, cols 2-3
    diff = (m.conv_head(m.unpatchify(h2)) - m.conv_head(m.unpatchify(h))).abs().sum(2)[0, 0]  # (8, 8)
    assert (diff[1:5, 1:5] > 0).all()  # the patch plus a one-pixel ring around it
    assert torch.equal(diff[6:, :], torch.zeros(2, 8)) and torch.equal(diff[:, 6:], torch.zeros(8, 2))
    with pytest.raises(ValueError, match="conv_head"):
        model_config("T/2", conv_head=-1).validate()


def test_deeper_conv_head_reaches_one_more_pixel_per_layer():
    def reach(layers: int) -> torch.Tensor:
        m = perturbed(latte("T/2", backend="reference", depth=1, conv_head=8, conv_head_layers=layers, **TINY)).eval()
        h = torch.randn(1, 1, 16, 4 * 8)
        h2 = h.clone()
        h2[0, 0, 5] += 1.0  # patch (row 1, col 1): pixels rows 2-3, cols 2-3
        with torch.no_grad():
            return (m.conv_head(m.unpatchify(h2)) - m.conv_head(m.unpatchify(h))).abs().sum(2)[0, 0] > 0

    two, three = reach(2), reach(3)
    assert two[0:6, 0:6].all() and not two[6:, :].any() and not two[:, 6:].any()  # a two-pixel ring
    assert three[0:7, 0:7].all() and not three[7:, :].any() and not three[:, 7:].any()
    # the one-layer head keeps its parameter names, so checkpoints from before still load
    one = latte("T/2", backend="reference", conv_head=8, **TINY).state_dict()
    assert sorted(k for k in one if k.startswith("conv_head.")) == ["conv_head.conv.bias", "conv_head.conv.weight"]
    with pytest.raises(ValueError, match="conv_head_layers"):
        model_config("T/2", conv_head=8, conv_head_layers=0).validate()


# ----------------------------------------------------------------------------- per-frame conditioning


def test_fresh_model_outputs_zeros_and_shapes():
    model = latte("T/2", backend="reference", **TINY)
    x, t = inputs()
    out = model(x, t)
    assert out.shape == (2, 6, 6, 8, 8)  # learned variance doubles the channels
    assert torch.equal(out, torch.zeros_like(out))
    small = latte("T/2", backend="reference", **{**TINY, "learn_sigma": False})
    assert small(x, t).shape == x.shape


def test_scalar_t_equals_repeated_t():
    model = make()
    x, _ = inputs()
    t = torch.tensor([17, 802])
    torch.testing.assert_close(model(x, t), model(x, t[:, None].expand(2, 6)), atol=0, rtol=0)


def test_frame_timestep_changes_only_that_frames_modulation():
    model = make(depth=4)
    _, t = inputs()
    t2 = t.clone()
    t2[:, 2] = (t2[:, 2] + 500) % 1000
    c, c2 = model.conditioning(t), model.conditioning(t2)
    assert c.shape == (2, 6, 64)
    changed = (c - c2).abs().amax(dim=-1) > 0  # (B, F)
    assert changed[:, 2].all() and not changed[:, [0, 1, 3, 4, 5]].any()
    for block in model.blocks:  # the six adaLN vectors of every block
        m, m2 = block.adaLN_modulation(c), block.adaLN_modulation(c2)
        diff = (m - m2).abs().amax(dim=-1) > 0
        assert diff[:, 2].all() and not diff[:, [0, 1, 3, 4, 5]].any()


def test_frame_timestep_changes_only_that_frames_output_without_temporal_blocks():
    model = make(depth=1).eval()  # one spatial block: frames never meet
    x, t = inputs()
    t2 = t.clone()
    t2[:, 2] = (t2[:, 2] + 500) % 1000
    diff = (model(x, t) - model(x, t2)).abs().flatten(2).amax(-1)  # (B, F)
    assert (diff[:, 2] > 1e-4).all()
    assert torch.equal(diff[:, [0, 1, 3, 4, 5]], torch.zeros(2, 5))
    # with temporal blocks the change spreads to the other frames: the test above can fail
    full = make(depth=2).eval()
    diff = (full(x, t) - full(x, t2)).abs().flatten(2).amax(-1)
    assert (diff[:, [0, 1, 3]] > 0).all()


def test_temporal_block_mixes_frames_not_tokens():
    torch.manual_seed(0)
    block = perturbed(LatteBlock(64, 4, 4.0, "T", ops=REF))
    x = torch.randn(2, 5, 7, 64)
    c = torch.randn(2, 5, 64)
    x2 = x.clone()
    x2[:, 1, 3] += 1.0  # frame 1, token 3
    diff = (block(x, c) - block(x2, c)).abs().amax(-1)  # (B, F, N)
    assert (diff[:, :, 3] > 0).all()  # token 3 of every frame sees it
    assert torch.equal(diff[:, :, [0, 1, 2, 4, 5, 6]], torch.zeros(2, 5, 6))
    spatial = perturbed(LatteBlock(64, 4, 4.0, "S", ops=REF))
    diff = (spatial(x, c) - spatial(x2, c)).abs().amax(-1)
    assert (diff[:, 1] > 0).all() and torch.equal(diff[:, [0, 2, 3, 4]], torch.zeros(2, 4, 7))
    joint = perturbed(LatteBlock(64, 4, 4.0, "J", ops=REF)).double()  # far tokens move by ~1e-7: fp64
    diff = (joint(x.double(), c.double()) - joint(x2.double(), c.double())).abs().amax(-1)
    assert (diff > 1e-12).all()  # every token of every frame sees it


def test_joint_block_is_spatial_attention_over_the_whole_clip():
    # A joint block on F frames of N tokens is a spatial block on one frame of F*N tokens
    # (same weights), given one conditioning vector for every frame.
    torch.manual_seed(0)
    joint = perturbed(LatteBlock(64, 4, 4.0, "J", ops=REF))
    spatial = LatteBlock(64, 4, 4.0, "S", ops=REF)
    spatial.load_state_dict(joint.state_dict())
    x, c = torch.randn(2, 5, 7, 64), torch.randn(2, 1, 64)
    got = joint(x, c.expand(2, 5, 64))
    want = spatial(x.reshape(2, 1, 35, 64), c).view(2, 5, 7, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=needs_c)])
def test_frame_local_keeps_frames_apart(backend):
    # frame_local (the weak model of skip guidance): a change in frame 2 reaches no other frame,
    # through temporal and joint blocks alike; without it the change spreads
    model = make(depth=3, backend=backend, block_pattern="STJ").eval()
    x, t = inputs()
    x2 = x.clone()
    x2[:, 2] += 0.5
    diff = (model(x, t, frame_local=True) - model(x2, t, frame_local=True)).abs().flatten(2).amax(-1)  # (B, F)
    assert (diff[:, 2] > 1e-4).all()
    assert torch.equal(diff[:, [0, 1, 3, 4, 5]], torch.zeros(2, 5))
    full = (model(x, t) - model(x2, t)).abs().flatten(2).amax(-1)
    assert (full[:, [0, 1, 3, 4, 5]] > 1e-6).all()


def test_frame_local_temporal_block_passes_each_frames_value():
    # with every frame seeing only itself the attention weight is 1 on its own value: the block
    # gives proj(v) of each frame, what a one-frame clip gives
    torch.manual_seed(0)
    block = perturbed(LatteBlock(64, 4, 4.0, "T", ops=REF))
    x, c = torch.randn(2, 5, 7, 64), torch.randn(2, 5, 64)
    got = block(x, c, frame_local=True)
    want = torch.cat([block(x[:, f:f + 1], c[:, f:f + 1]) for f in range(5)], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- options


def test_block_layout_and_position_embeddings():
    model = latte("T/2", backend="reference", **TINY)
    assert [b.kind for b in model.blocks] == ["S", "T", "S", "T"]
    assert model.temp_embed_at == 1  # the temporal table goes in before the first temporal block
    joint = latte("T/2", backend="reference", block_pattern="JTT", depth=4, **TINY)
    assert [b.kind for b in joint.blocks] == ["J", "T", "T", "J"] and joint.temp_embed_at == 0
    for bad in ("", "SX", "st"):
        with pytest.raises(ValueError, match="block_pattern"):
            latte("T/2", backend="reference", block_pattern=bad, **TINY)
    names = {n for n, _ in model.named_parameters()}
    assert {"pos_embed", "temp_embed"} <= names
    fixed = latte("T/2", backend="reference", learned_pos_embed=False, **TINY)
    assert not {"pos_embed", "temp_embed"} & {n for n, _ in fixed.named_parameters()}
    torch.testing.assert_close(fixed.pos_embed, model.pos_embed.detach())  # same sin-cos init


def test_gradient_checkpointing_gives_same_gradients():
    x, t = inputs()
    plain = make(depth=2).train()
    ckpt = make(depth=2, grad_checkpointing=True).train()
    out_p, g_p = output_and_grads(plain, x, t)
    out_c, g_c = output_and_grads(ckpt, x, t)
    torch.testing.assert_close(out_c, out_p, atol=0, rtol=0)
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_attention_under_autograd_matches_fp32(dtype):
    """The spatial/joint attention helper (math backend for half types under autograd on the
    CPU) gives the fp32 values and gradients, to the type's precision."""
    from fvdm.models.latte import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(3, 2, 24, 16, generator=g) for _ in range(4))
    leaves32 = [a.clone().requires_grad_() for a in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves32)
    ref.backward(dout)
    leaves = [a.to(dtype).requires_grad_() for a in (q, k, v)]
    out = sdpa(*leaves)
    out.backward(dout.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for low, high in zip(leaves, leaves32):
        torch.testing.assert_close(low.grad.float(), high.grad, atol=3e-2, rtol=3e-2)
    with torch.no_grad():  # sampling: the default kernel, same values
        torch.testing.assert_close(sdpa(*(a.to(dtype) for a in (q, k, v))).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=needs_c)])
def test_bf16_autocast(backend):
    depth = 2
    model = make(depth=depth, backend=backend)
    x, t = inputs()
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2
    out.float().sum().backward()
    for name, p in model.named_parameters():
        if name != "temp_embed" or depth > 1:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # and a model whose weights are bf16 (inference in half precision)
    out16 = model.to(torch.bfloat16)(x.bfloat16(), t)
    assert out16.dtype == torch.bfloat16 and (out16.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2


def test_class_labels_and_dropout():
    model = make(depth=1, num_classes=4, class_dropout_prob=1.0).eval()
    x, t = inputs()
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4
    null = model(x, t, torch.tensor([4, 4]))  # the null class id is num_classes
    model.train()  # dropout 1.0: every label becomes null
    torch.testing.assert_close(model(x, t, torch.tensor([0, 1])), null)
    with pytest.raises(ValueError, match="y"):
        model(x, t)


def test_self_conditioning_input():
    """A self-conditioning model reads x_self (zeros when not given); others refuse it."""
    model = make(depth=2, self_condition=True).eval()
    assert model.x_embedder.proj.in_channels == 2 * 3
    x, t = inputs()
    g = torch.Generator().manual_seed(5)
    est = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        plain, zeros, given = model(x, t), model(x, t, None, torch.zeros_like(x)), model(x, t, None, est)
    torch.testing.assert_close(plain, zeros)
    assert (given - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="x_self must have the shape"):
        model(x, t, None, est[:, :2])
    with pytest.raises(ValueError, match="self_condition=False"):
        make(depth=1)(x, t, None, est)


def test_bad_inputs_name_the_argument():
    model = latte("T/2", backend="reference", **TINY)
    x, t = inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :, :2], t)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, t[:, :3])
    with pytest.raises(ValueError, match="num_frames"):
        model(torch.cat([x, x], 1), torch.cat([t, t], 1))
    with pytest.raises(ValueError, match="y was given"):
        model(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("Q/3")
    with pytest.raises(ValueError, match="num_heads"):
        latte("T/2", num_heads=5, **TINY)


def test_presets_match_latte_sizes():
    for name, (depth, width, heads) in {"S/2": (12, 384, 6), "B/2": (12, 768, 12), "L/2": (24, 1024, 16),
                                         "XL/2": (28, 1152, 16)}.items():
        cfg = model_config(name)
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, width, heads, 2)
    cfg = model_config("S/2", learn_sigma=True)
    assert cfg.num_patches == 256 and cfg.out_channels == 8  # 32x32x4 latents, learned sigma
