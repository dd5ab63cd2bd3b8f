"""The exact-recipe switches of the official FVDM code: its timestep respacing (the ladder its
sample scripts run), its rule for the VB term at t = 0, and the config keys that select them."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fvdm.config import load_config
from fvdm.diffusion import ddpm_ladder, ddpm_schedule, sample, space_timesteps, spaced_ladder, unconditional
from fvdm.diffusion.losses import diffusion_loss, vb_term
from fvdm.errors import UserError
from fvdm.ops import get_backend


def published(num_timesteps: int, n: int) -> list[int]:
    """guided-diffusion's respacing "n" as a formula: t_k = round(k (T - 1) / (n - 1)),
    k = 0..n-1, rounded half to even, in exact rational arithmetic."""
    return [round(Fraction(k * (num_timesteps - 1), n - 1)) for k in range(n)]


@pytest.mark.parametrize("n", [50, 250, 100])
def test_official_respacing_equals_the_published_formula(n):
    assert space_timesteps(1000, str(n)) == published(1000, n)
    ladder = spaced_ladder(n, 1000, "official")
    assert ladder.tolist() == published(1000, n)[::-1] + [-1]


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 2000), data=st.data())
def test_every_spacing_gives_a_ladder_of_distinct_steps(T, data):
    n = data.draw(st.integers(1, T))
    kept = space_timesteps(T, str(n))
    assert len(kept) == n and kept[0] == 0 and kept[-1] == (T - 1 if n > 1 else 0)
    for spacing in ("floor", "official"):
        ladder = spaced_ladder(n, T, spacing).tolist()
        assert len(ladder) == n + 1 and ladder[-1] == -1 and ladder[-2] == 0
        assert all(a > b for a, b in zip(ladder, ladder[1:])) and ladder[0] <= T - 1


def test_official_50_is_the_ladder_of_the_official_sample_scripts():
    kept = space_timesteps(1000, "50")
    assert kept[:4] == [0, 20, 41, 61] and kept[-3:] == [958, 979, 999] and len(kept) == 50
    # fvdm's floor spacing is the official "ddimN" when N divides T, not "N"
    assert ddpm_ladder(50).tolist()[:-1] == sorted(space_timesteps(1000, "ddim50"), reverse=True)
    assert spaced_ladder(50, 1000, "official-ddim").tolist() == ddpm_ladder(50).tolist()


def test_respacing_forms_and_refusals():
    # a tie rounds half to even, as Python's round does in the official loop: 499.5 -> 500
    assert space_timesteps(1000, "3") == [0, 500, 999]
    # ddimN: the smallest stride with exactly N multiples below T
    assert space_timesteps(1000, "ddim30") == list(range(0, 1000, 34))
    # sections: 300 timesteps as 100 + 100 + 100, with 10, 15 and 20 steps each, ends kept
    kept = space_timesteps(300, "10,15,20")
    assert [sum(lo <= t < lo + 100 for t in kept) for lo in (0, 100, 200)] == [10, 15, 20]
    assert {0, 99, 100, 199, 200, 299} <= set(kept)
    for bad, match in [("ddim600", "no integer stride"), ("0", ">= 1"), ("x", "not a step count"),
                       ("1001", "cannot hold")]:
        with pytest.raises(ValueError, match=match):
            space_timesteps(1000, bad)
    with pytest.raises(ValueError, match="spacing"):
        spaced_ladder(50, 1000, "linear")


def test_ddim_on_the_official_ladder_is_the_official_spaced_ddim():
    """The official SpacedDiffusion keeps alpha_bar at the kept timesteps, calls the model with
    the original timestep and steps to the previous kept one (alpha_bar 1 after the last).
    Restated here as a plain loop; fvdm's sampler on the "official" ladder must agree."""
    sch = ddpm_schedule()
    kept = space_timesteps(1000, "50")
    ab = sch.alphas_cumprod[kept]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])

    def model(x, t):  # any smooth function of (x, t) will do
        return 0.3 * x + 1e-3 * t.to(x.dtype)[..., None, None, None]

    x_init = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x_init.clone()
    for i in reversed(range(len(kept))):
        eps = model(x, torch.full((2, 3), float(kept[i]), dtype=torch.float64))
        x0 = (x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()
        x = ab_prev[i].sqrt() * x0 + (1 - ab_prev[i]).sqrt() * eps
    S, _ = unconditional(spaced_ladder(50, 1000, "official"), 3)
    ours = sample(model, sch, S, x_init=x_init, method="ddim", dtype=torch.float64, ops=get_backend("reference"))
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
    # and the floor ladder is a different sampler
    S_floor, _ = unconditional(ddpm_ladder(50), 3)
    floor = sample(model, sch, S_floor, x_init=x_init, method="ddim", dtype=torch.float64, ops=get_backend("reference"))
    assert (floor - x).abs().max() > 1e-3


def test_vb_t0_rules():
    """"frame": every frame at t = 0 takes the decoder NLL. "clip" (official): only the frames
    of a clip whose frames are all at 0; a frame at 0 among noisier ones takes the KL against
    the posterior's clipped variance, written out here from the formulas."""
    sch = ddpm_schedule()
    ops = get_backend("reference")
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 2, 3, 3)
    x0 = torch.randn(shape, generator=g).clamp(-1, 1)
    t = torch.tensor([[0, 0, 0, 0], [0, 7, 0, 500], [3, 0, 0, 0]])
    x_t = sch.q_sample(x0, torch.randn(shape, generator=g), t, ops)
    out = torch.randn(shape[:2] + (4,) + shape[3:], generator=g).tanh()
    pred, var = out[:, :, :2], out[:, :, 2:]
    per_frame = vb_term(sch, x0, x_t, t, pred, var, "eps", ops, "frame")
    per_clip = vb_term(sch, x0, x_t, t, pred, var, "eps", ops, "clip")
    differ = per_frame != per_clip
    assert differ.tolist() == [[False] * 4, [True, False, True, False], [False, True, True, True]]

    b = sch.betas.tolist()
    ab0, ab1 = 1 - b[0], (1 - b[0]) * (1 - b[1])
    lv_true = math.log(b[1] * (1 - ab0) / (1 - ab1))  # log beta~ at t = 0, clipped to t = 1's
    xt, x0f, o = x_t[1, 0].double(), x0[1, 0].double(), out[1, 0].double()
    m_model = (xt - math.sqrt(1 - ab0) * o[:2]) / math.sqrt(ab0)  # posterior mean at t = 0 is x0_hat
    frac = (o[2:] + 1) / 2
    lv_model = frac * math.log(b[0]) + (1 - frac) * lv_true
    kl = 0.5 * (-1 + lv_model - lv_true + torch.exp(lv_true - lv_model) + (x0f - m_model) ** 2 * torch.exp(-lv_model))
    assert per_clip[1, 0].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-4)

    # held frames do not count: clip 2 with frame 0 held is "all at 0" for the clip rule
    held = torch.tensor([[False] * 4, [False] * 4, [True, False, False, False]])
    with_held = vb_term(sch, x0, x_t, t, pred, var, "eps", ops, "clip", held)
    torch.testing.assert_close(with_held[2, 1:], per_frame[2, 1:])

    def net(x, tt):
        return out

    losses = {rule: diffusion_loss(net, sch, x0, t, learn_sigma=True, vb_t0=rule, ops=get_backend("reference")).loss
              for rule in ("frame", "clip")}
    assert losses["frame"] != losses["clip"]
    with pytest.raises(ValueError, match="t0_rule"):
        vb_term(sch, x0, x_t, t, pred, var, "eps", ops, "batch")


@pytest.mark.parametrize("name", ["ffs", "sky", "ucf101", "taichi"])
def test_paper_configs_select_the_official_recipe(name):
    cfg = load_config(name, ["data.root=/data"])
    assert (cfg.model.gelu, cfg.model.learned_pos_embed) == ("tanh", False)
    assert (cfg.sample.spacing, cfg.sample.steps, cfg.diffusion.vb_t0) == ("official", 50, "clip")


def test_new_config_keys_refuse_unknown_values():
    for key, bad in [("model.gelu", "fast"), ("sample.spacing", "ddim50"), ("diffusion.vb_t0", "batch")]:
        with pytest.raises(UserError, match=key):
            load_config(None, [f"{key}={bad}"])
    cfg = load_config(None, [])
    assert (cfg.model.gelu, cfg.sample.spacing, cfg.diffusion.vb_t0) == ("exact", "floor", "frame")
