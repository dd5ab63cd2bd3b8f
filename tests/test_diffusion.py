"""Diffusion: schedules, objectives, PTSS, loss, samplers against the published per-step
formulas, held frames, reproducibility, and the task builders."""

from __future__ import annotations

import math

import pytest
import torch

from fvdm import HAS_C
from fvdm.diffusion import (
    DDPMSchedule,
    FlowSchedule,
    classifier_free_guidance,
    clean_prefix_mask,
    cosine_betas,
    ddpm_ladder,
    ddpm_schedule,
    diffusion_loss,
    flow_ladder,
    keyframes,
    task_matrix,
    temporal_guidance,
    linear_betas,
    long_video,
    min_snr_weights,
    prediction_coeffs,
    rolling_diagonal,
    sample,
    sample_timesteps,
    target_coeffs,
    unconditional,
    window_sampler,
)
from fvdm.diffusion.losses import vb_term
from fvdm.ops import get_backend

BACKENDS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(not HAS_C, reason="fvdm._C is not built"))]
SHAPE = (2, 5, 2, 4, 4)  # B, F, C, H, W


class FakeDenoiser:
    """A fixed deterministic function of (x, t): a seeded linear map of the channels plus a
    time-dependent term, so no training is needed. Records the times it was shown."""

    def __init__(self, C: int = 2, out_channels: int | None = None, seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.out_channels = out_channels or C
        self.W = (0.3 * torch.randn(self.out_channels, C, generator=g)).to(dtype)
        self.b = torch.randn(self.out_channels, generator=g).to(dtype)
        self.times: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(t.clone())
        y = torch.einsum("oc,bfchw->bfohw", self.W.to(x.dtype), x)
        phase = torch.sin(t.to(x.dtype) / 300.0)[:, :, None, None, None]
        return torch.tanh(y + phase * self.b.to(x.dtype)[None, None, :, None, None])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- schedules


def test_ddpm_tables_follow_the_definitions():
    sch = ddpm_schedule("linear")
    assert sch.num_timesteps == 1000 and sch.betas.dtype == torch.float64
    assert sch.betas[0].item() == pytest.approx(1e-4) and sch.betas[-1].item() == pytest.approx(0.02)
    ab = torch.ones(())
    for i in [0, 1, 2]:  # running product, written out
        ab = ab * (1 - sch.betas[i])
        assert sch.alphas_cumprod[i].item() == pytest.approx(ab.item(), rel=1e-14)
    b, ab, abp = sch.betas, sch.alphas_cumprod, sch.alphas_cumprod_prev
    torch.testing.assert_close(sch.posterior_variance, b * (1 - abp) / (1 - ab))
    torch.testing.assert_close(sch.alpha_bar(torch.tensor([-1, 0, 999])), torch.stack([ab.new_ones(()), ab[0], ab[-1]]))
    a, s = sch.alpha_sigma(torch.tensor([[3, 500]]))
    torch.testing.assert_close(a**2 + s**2, torch.ones(1, 2, dtype=torch.float64))

    cos = DDPMSchedule.from_betas(cosine_betas(1000))
    assert cos.betas.max() <= 0.999 and (cos.alphas_cumprod[1:] < cos.alphas_cumprod[:-1]).all()
    assert torch.equal(linear_betas(10), torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta schedule"):
        ddpm_schedule("quadratic")


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_matches_formula(backend):
    ops = get_backend(backend)
    x0, eps = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    t = torch.randint(0, 1000, SHAPE[:2], generator=gen(2))
    sch = ddpm_schedule("cosine")
    a, s = sch.alpha_sigma(t)
    want = a.float()[..., None, None, None] * x0 + s.float()[..., None, None, None] * eps
    torch.testing.assert_close(sch.q_sample(x0, eps, t, ops), want)
    tf = torch.rand(SHAPE[:2], generator=gen(3))
    want = (1 - tf)[..., None, None, None] * x0 + tf[..., None, None, None] * eps
    torch.testing.assert_close(FlowSchedule().q_sample(x0, eps, tf, ops), want)


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("objective", ["eps", "v", "x0", "flow"])
def test_prediction_inverts_target(objective):
    """Feeding the exact target as the prediction recovers x0 and eps, for DDPM and flow paths."""
    x0 = torch.randn(SHAPE, dtype=torch.float64, generator=gen(0))
    eps = torch.randn(SHAPE, dtype=torch.float64, generator=gen(1))
    for a, s in [ddpm_schedule().alpha_sigma(torch.randint(0, 1000, SHAPE[:2], generator=gen(2))),
                 FlowSchedule().alpha_sigma(0.05 + 0.9 * torch.rand(SHAPE[:2], generator=gen(3), dtype=torch.float64))]:
        bc = lambda c: c[..., None, None, None]  # noqa: E731
        x_t = bc(a) * x0 + bc(s) * eps
        tc = target_coeffs(objective, a, s)
        target = bc(tc[..., 0]) * x0 + bc(tc[..., 1]) * eps
        P = prediction_coeffs(objective, a, s)
        torch.testing.assert_close(bc(P[..., 0, 0]) * x_t + bc(P[..., 0, 1]) * target, x0)
        torch.testing.assert_close(bc(P[..., 1, 0]) * x_t + bc(P[..., 1, 1]) * target, eps)
    # the textbook forms: v = a eps - s x0, flow velocity = eps - x0
    a, s = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    assert target_coeffs("v", a, s).tolist() == [[-0.8, 0.6]]
    assert target_coeffs("flow", a, s).tolist() == [[-1.0, 1.0]]


@pytest.mark.parametrize("objective", ["eps", "v", "x0", "flow"])
def test_min_snr_weights_give_every_objective_the_x0_weight_min_snr_gamma(objective):
    """Weighted error of a perturbed prediction == min(SNR, gamma) * the x0 error it causes."""
    gamma = 5.0
    for a, s in [ddpm_schedule("cosine").alpha_sigma(torch.arange(0, 1000, 37)),
                 FlowSchedule().alpha_sigma(torch.linspace(0.02, 0.98, 20, dtype=torch.float64))]:
        w = min_snr_weights(objective, a, s, gamma)
        delta = torch.randn(a.shape, dtype=torch.float64, generator=gen(4))  # prediction error
        x0_err = prediction_coeffs(objective, a, s)[..., 0, 1] * delta
        snr = a * a / (s * s)
        torch.testing.assert_close(w * delta**2, snr.clamp(max=gamma) * x0_err**2)
    # the published special cases: eps min(SNR, g) / SNR, v min(SNR, g) / (SNR + 1)
    a, s = ddpm_schedule().alpha_sigma(torch.tensor([10, 500, 990]))
    snr = a * a / (s * s)
    torch.testing.assert_close(min_snr_weights("eps", a, s, gamma), snr.clamp(max=gamma) / snr)
    torch.testing.assert_close(min_snr_weights("v", a, s, gamma), snr.clamp(max=gamma) / (snr + 1))
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights("v", a, s, 0.0)


# ----------------------------------------------------------------------------- PTSS


def test_ptss_fraction_of_vectorized_batches_is_p():
    g, p, n = gen(0), 0.2, 2000
    vec = [bool((t != t[:, :1]).any()) for t in (sample_timesteps(4, 8, p, generator=g) for _ in range(n))]
    # independent times over 8 frames of 1000 are never all equal, so a varying row means a coin
    assert abs(sum(vec) / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_ptss_per_sample_coins_and_uniform_marginals():
    g, p, n = gen(1), 0.3, 600
    ts = torch.stack([sample_timesteps(8, 8, p, mode="sample", generator=g) for _ in range(n)])  # (n, B, F)
    per_clip = (ts != ts[..., :1]).any(-1).float()  # (n, B)
    assert abs(per_clip.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / per_clip.numel())
    batch_mixed = ((per_clip > 0).any(1) & (per_clip == 0).any(1)).float().mean().item()
    assert batch_mixed > 0.5  # per-sample coins: a batch usually mixes both kinds
    for f in range(8):  # every frame's marginal is uniform over [0, 999]: chi-square over 10 bins
        counts = torch.bincount(ts[:, :, f].flatten() // 100, minlength=10).double()
        expected = counts.sum() / 10
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 33.7, f"frame {f}: chi2 {chi2:.1f} (df 9, p = 1e-4)"


def test_clean_prefix_mask_holds_prefixes_of_1_to_f_minus_1_frames_in_a_share_p():
    p, n, F = 0.3, 4000, 6
    held = clean_prefix_mask(n, F, p, generator=gen(7))
    k = held.sum(1)
    assert torch.equal(held, torch.arange(F)[None, :] < k[:, None])  # a prefix, nothing after it
    assert abs((k > 0).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    counts = torch.bincount(k[k > 0], minlength=F)
    assert counts[0] == 0 and counts[F:].sum() == 0  # 1..F-1 frames: one always stays noised
    assert counts[1:F].min() > 0.7 * counts[1:F].float().mean()  # roughly uniform lengths
    assert not clean_prefix_mask(64, F, 0.0, generator=gen(7)).any()
    assert not clean_prefix_mask(64, 1, 0.5, generator=gen(7)).any()  # one frame: nothing to hold
    # the same draws whatever p: a run's other random streams do not depend on it
    g1, g2 = gen(8), gen(8)
    clean_prefix_mask(16, F, 0.1, generator=g1), clean_prefix_mask(16, F, 0.9, generator=g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    with pytest.raises(ValueError, match="clean prefix"):
        clean_prefix_mask(4, F, 1.0)


def test_ptss_p0_is_scalar_p1_is_independent_and_seeded():
    t0 = sample_timesteps(64, 8, 0.0, generator=gen(2))
    assert torch.equal(t0, t0[:, :1].expand_as(t0))
    t1 = sample_timesteps(64, 8, 1.0, generator=gen(2))
    assert (t1 != t1[:, :1]).any(-1).all()
    assert torch.equal(sample_timesteps(4, 8, 0.5, generator=gen(3)), sample_timesteps(4, 8, 0.5, generator=gen(3)))
    assert not torch.equal(sample_timesteps(4, 8, 0.5, generator=gen(3)), sample_timesteps(4, 8, 0.5, generator=gen(4)))
    tf = sample_timesteps(4, 8, 1.0, num_timesteps=None, generator=gen(5))
    assert tf.dtype == torch.float32 and (tf >= 0).all() and (tf < 1).all()
    with pytest.raises(ValueError, match="p must"):
        sample_timesteps(4, 8, 1.5)
    with pytest.raises(ValueError, match="mode"):
        sample_timesteps(4, 8, 0.5, mode="clip")


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_excludes_held_frames_and_matches_manual_mse(backend):
    sch = ddpm_schedule()
    x0 = torch.randn(SHAPE, generator=gen(0))
    t = torch.randint(0, 1000, SHAPE[:2], generator=gen(1))
    model = FakeDenoiser(dtype=torch.float32)
    held = torch.tensor([True, False, False, True, False])
    out = diffusion_loss(model, sch, x0, t, noise=torch.randn(SHAPE, generator=gen(2)), held=held, ops=get_backend(backend))
    # manual: held frames enter clean at model time 0 and are left out of the mean
    eps = torch.randn(SHAPE, generator=gen(2))
    a, s = sch.alpha_sigma(t)
    x_t = a.float()[..., None, None, None] * x0 + s.float()[..., None, None, None] * eps
    x_t[:, held] = x0[:, held]
    shown = t.float().masked_fill(held, 0.0)
    pred = FakeDenoiser(dtype=torch.float32)(x_t, shown)
    want = ((pred - eps) ** 2)[:, ~held].mean()
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.times[0], shown)
    # the prediction on held frames does not matter
    big = lambda x, tt: FakeDenoiser(dtype=torch.float32)(x, tt) + 100.0 * held[None, :, None, None, None]  # noqa: E731
    out2 = diffusion_loss(big, sch, x0, t, noise=eps, held=held, ops=get_backend(backend))
    torch.testing.assert_close(out2.loss, out.loss)


def test_vb_term_trains_only_the_variance_channels():
    sch = ddpm_schedule()
    x0 = torch.randn(SHAPE, generator=gen(0)).clamp(-1, 1)
    t = torch.tensor([[0, 5, 300, 999, 10], [1, 0, 2, 500, 900]])
    x_t = sch.q_sample(x0, torch.randn(SHAPE, generator=gen(1)), t, get_backend("reference"))
    out = torch.randn(SHAPE[:2] + (4,) + SHAPE[3:], generator=gen(2)).tanh().requires_grad_()
    vb = vb_term(sch, x0, x_t, t, out[:, :, :2], out[:, :, 2:], "eps", get_backend("reference"))
    assert vb.shape == SHAPE[:2] and torch.isfinite(vb).all() and (vb[t > 0] >= 0).all()
    vb.sum().backward()
    assert torch.equal(out.grad[:, :, :2], torch.zeros_like(out.grad[:, :, :2]))
    assert out.grad[:, :, 2:].abs().max() > 0
    # frame (0, 2), t = 300: KL(q(x_299 | x_300, x0) || p) from the formulas, in bits per dim
    b = sch.betas.tolist()
    ab = math.prod(1 - bi for bi in b[:301])
    ab_prev = ab / (1 - b[300])
    c1, c2 = math.sqrt(ab_prev) * b[300] / (1 - ab), math.sqrt(1 - b[300]) * (1 - ab_prev) / (1 - ab)
    xt, x0f, o = x_t[0, 2].double(), x0[0, 2].double(), out.detach()[0, 2].double()
    lv_true = math.log((1 - ab_prev) / (1 - ab) * b[300])
    x0_hat = (xt - math.sqrt(1 - ab) * o[:2]) / math.sqrt(ab)
    frac = (o[2:] + 1) / 2
    lv_model = frac * math.log(b[300]) + (1 - frac) * lv_true
    m_true, m_model = c1 * x0f + c2 * xt, c1 * x0_hat + c2 * xt
    kl = 0.5 * (-1 + lv_model - lv_true + torch.exp(lv_true - lv_model) + (m_true - m_model) ** 2 * torch.exp(-lv_model))
    assert vb[0, 2].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-4)


# ----------------------------------------------------------------------------- samplers vs the papers


def ho_ddpm(model, betas: torch.Tensor, timesteps: list[int], x: torch.Tensor, g: torch.Generator,
            learned: bool = False, noise_scale: float = 1.0) -> torch.Tensor:
    """Ho et al. 2020 ancestral sampling, written per step from the paper: x0 from eps, then the
    posterior mean mu~ = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t)(1 - ab_{t-1}) / (1 - ab_t) x_t
    and variance beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t; no noise at the last step.
    `timesteps` are the original indices; a subsequence uses its respaced betas. learned:
    Nichol & Dhariwal 2021 eq. 15, log var = frac log beta_t + (1 - frac) log beta~_t with
    frac = (v + 1) / 2 from the model's second half of channels. noise_scale multiplies the
    fresh noise (the sampling temperature)."""
    ab_full = torch.cumprod(1 - betas, 0)
    ab_seq = ab_full[torch.tensor(sorted(timesteps))]
    betas_seq = 1 - ab_seq / torch.cat([torch.ones(1, dtype=ab_seq.dtype), ab_seq[:-1]])
    for k in reversed(range(len(timesteps))):
        beta = betas_seq[k].item()
        ab = ab_seq[k].item()
        ab_prev = ab_seq[k - 1].item() if k > 0 else 1.0
        out = model(x, torch.full(x.shape[:2], float(sorted(timesteps)[k]), dtype=x.dtype))
        C = x.shape[2]
        eps = out[:, :, :C]
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x
        if k > 0:
            var = (1 - ab_prev) / (1 - ab) * beta
            std = math.sqrt(var)
            if learned:
                frac = (out[:, :, C:] + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(var)))
            x = mean + noise_scale * std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        else:
            x = mean
    return x


def song_ddim(model, betas, timesteps: list[int], x, g, eta: float, objective: str = "eps") -> torch.Tensor:
    """Song et al. 2021 eq. 12 per step, with sigma from eq. 16 scaled by eta; the last step
    goes to alpha_bar = 1."""
    ab_full = torch.cumprod(1 - betas, 0)
    seq = sorted(timesteps, reverse=True)
    for k, t in enumerate(seq):
        ab = ab_full[t].item()
        ab_prev = ab_full[seq[k + 1]].item() if k + 1 < len(seq) else 1.0
        out = model(x, torch.full(x.shape[:2], float(t), dtype=x.dtype))
        if objective == "eps":
            eps = out
        elif objective == "v":  # v = sqrt(ab) eps - sqrt(1 - ab) x0
            eps = math.sqrt(ab) * out + math.sqrt(1 - ab) * x
        else:  # x0
            eps = (x - math.sqrt(ab) * out) / math.sqrt(1 - ab)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps,learned,noise_scale",
                         [(1000, False, 1.0), (50, False, 1.0), (1000, True, 1.0), (50, True, 1.0), (50, False, 0.7),
                          (50, True, 0.7)])
def test_equal_columns_reproduce_ddpm(backend, steps, learned, noise_scale):
    sch = ddpm_schedule("linear")
    ladder = ddpm_ladder(steps)
    S, _ = unconditional(ladder, SHAPE[1])
    out_channels = 4 if learned else 2
    got = sample(FakeDenoiser(out_channels=out_channels), sch, S, shape=SHAPE, dtype=torch.float64, method="ddpm",
                 learn_sigma=learned, noise_scale=noise_scale, generator=gen(7), ops=get_backend(backend))
    g = gen(7)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    want = ho_ddpm(FakeDenoiser(out_channels=out_channels), sch.betas, ladder[:-1].tolist(), x, g, learned,
                   noise_scale)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_zero_noise_scale_is_deterministic(method):
    """noise_scale 0 leaves the starting noise as the only randomness: the same x_init gives
    the same video whatever the generator, and the steps' fresh noise is what 1 adds."""
    sch = ddpm_schedule("cosine")
    S, _ = unconditional(ddpm_ladder(20), SHAPE[1])
    x_init = torch.randn(SHAPE, generator=gen(11), dtype=torch.float64)
    run = lambda seed, scale: sample(FakeDenoiser(), sch, S, x_init=x_init, method=method, eta=1.0,  # noqa: E731
                                     noise_scale=scale, generator=gen(seed))
    torch.testing.assert_close(run(1, 0.0), run(2, 0.0), atol=0, rtol=0)
    assert not torch.allclose(run(1, 1.0), run(2, 1.0))


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_noise_scale_is_named(bad):
    S, _ = unconditional(ddpm_ladder(4), SHAPE[1])
    with pytest.raises(ValueError, match="noise_scale"):
        sample(FakeDenoiser(), ddpm_schedule(), S, shape=SHAPE, method="ddpm", noise_scale=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta,objective", [(0.0, "eps"), (1.0, "eps"), (0.5, "v"), (0.0, "x0")])
def test_equal_columns_reproduce_ddim(backend, eta, objective):
    sch = ddpm_schedule("cosine")
    ladder = ddpm_ladder(50)
    S, _ = unconditional(ladder, SHAPE[1])
    got = sample(FakeDenoiser(), sch, S, shape=SHAPE, dtype=torch.float64, method="ddim", eta=eta,
                 objective=objective, generator=gen(3), ops=get_backend(backend))
    g = gen(3)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    want = song_ddim(FakeDenoiser(), sch.betas, ladder[:-1].tolist(), x, g, eta, objective)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_columns_reproduce_euler_flow(backend):
    S, _ = unconditional(flow_ladder(20), SHAPE[1])
    fl = FlowSchedule()
    got = sample(FakeDenoiser(), fl, S, shape=SHAPE, dtype=torch.float64, objective="flow", generator=gen(4),
                 ops=get_backend(backend))
    x = torch.randn(SHAPE, generator=gen(4), dtype=torch.float64)
    model = FakeDenoiser()
    times = torch.linspace(1, 0, 21, dtype=torch.float64)
    for t, s in zip(times[:-1], times[1:]):
        x = x + (s - t) * model(x, torch.full(SHAPE[:2], t.item() * 1000.0, dtype=torch.float64))
    torch.testing.assert_close(got, x, atol=1e-10, rtol=1e-10)


def test_per_frame_matrix_equals_per_frame_scalar_runs():
    """With per-frame times, frames with different columns take their own scalar trajectories
    when the denoiser treats frames independently."""
    sch = ddpm_schedule()
    ladder_a, ladder_b = ddpm_ladder(10), ddpm_ladder(20)
    # frames 0, 2 follow ladder_a (padded by staying clean), frames 1, 3, 4 follow ladder_b
    col_a = torch.cat([ladder_a, torch.full((10,), -1)])
    S = torch.stack([col_a, ladder_b, col_a, ladder_b, ladder_b], 1)
    got = sample(FakeDenoiser(), sch, S, shape=SHAPE, dtype=torch.float64, method="ddim", generator=gen(5))
    x = torch.randn(SHAPE, generator=gen(5), dtype=torch.float64)
    a = song_ddim(FakeDenoiser(), sch.betas, ladder_a[:-1].tolist(), x, None, 0.0)
    b = song_ddim(FakeDenoiser(), sch.betas, ladder_b[:-1].tolist(), x, None, 0.0)
    torch.testing.assert_close(got[:, [0, 2]], a[:, [0, 2]], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[:, [1, 3, 4]], b[:, [1, 3, 4]], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- held frames


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ddpm", "ddim", "euler"])
def test_held_frames_are_bit_identical(backend, method):
    sch = FlowSchedule() if method == "euler" else ddpm_schedule()
    ladder = flow_ladder(8) if method == "euler" else ddpm_ladder(8)
    x0_held = torch.randn(SHAPE, generator=gen(0))
    learn_sigma = method == "ddpm"
    objective = "flow" if method == "euler" else "eps"
    for S, held in [keyframes(ladder, 5, [0]), keyframes(ladder, 5, [1, 3]), keyframes(ladder, 5, [0, 1])]:
        model = FakeDenoiser(out_channels=4 if learn_sigma else 2, dtype=torch.float32)
        out = sample(model, sch, S, shape=SHAPE, method=method, eta=1.0, learn_sigma=learn_sigma, objective=objective,
                     held=held, x0_held=x0_held, generator=gen(1), ops=get_backend(backend))
        assert torch.equal(out[:, held], x0_held[:, held])
        assert not torch.isclose(out[:, ~held], x0_held[:, ~held]).all()
        for shown in model.times:  # the model always sees held frames at time 0
            assert torch.equal(shown[:, held], torch.zeros_like(shown[:, held]))
    # a per-sample held mask (B, F)
    S, _ = unconditional(ladder, 5)
    held = torch.tensor([[True, False, False, False, False], [False, False, True, False, True]])
    out = sample(FakeDenoiser(dtype=torch.float32), sch, S, shape=SHAPE, method=method if method != "ddpm" else "ddim",
                 objective=objective, held=held, x0_held=x0_held, generator=gen(1), ops=get_backend(backend))
    assert torch.equal(out[held], x0_held[held])


class RecordingDenoiser(FakeDenoiser):
    """FakeDenoiser that also records the inputs it was shown."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.inputs.append(x.clone())
        return super().__call__(x, t)


@pytest.mark.parametrize("method", ["ddim", "euler"])
def test_replacement_conditioning_renoises_given_frames_to_the_current_time(method):
    """conditioning="replace" (scalar models): the model sees every frame at the ladder's time
    and the given frames as fresh noisings of their clean values to that time; the result
    still holds them exactly. "hold" shows them clean at the clean time."""
    flow = method == "euler"
    sch = FlowSchedule() if flow else ddpm_schedule("cosine")
    ladder = flow_ladder(10) if flow else ddpm_ladder(10)
    shape = (64, 3, 2, 4, 4)  # many samples so the noise statistics are tight
    x0_held = torch.randn(shape, generator=gen(0))
    S, held = task_matrix(ladder, 3, [0], "replace")
    assert torch.equal(S, unconditional(ladder, 3)[0]) and held.tolist() == [True, False, False]
    model = RecordingDenoiser(dtype=torch.float32)
    out = sample(model, sch, S, shape=shape, method=method, objective="flow" if flow else "eps", held=held,
                 x0_held=x0_held, conditioning="replace", generator=gen(1))
    assert torch.equal(out[:, 0], x0_held[:, 0])
    for i, (t, x) in enumerate(zip(model.times, model.inputs)):
        assert torch.equal(t, sch.model_time(S[i]).expand_as(t))  # one time for every frame
        a, s = sch.alpha_sigma(S[i][:1])
        z = (x[:, 0] - float(a) * x0_held[:, 0]) / float(s)  # must be a fresh N(0, 1) draw
        assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1.0) < 0.1
    # "hold": the same given frame is shown clean, at the clean time
    model = RecordingDenoiser(dtype=torch.float32)
    S, held = task_matrix(ladder, 3, [0], "hold")
    sample(model, sch, S, shape=shape, method=method, objective="flow" if flow else "eps", held=held,
           x0_held=x0_held, generator=gen(1))
    for t, x in zip(model.times, model.inputs):
        assert torch.equal(x[:, 0], x0_held[:, 0])
        assert torch.equal(t[:, 0], sch.model_time(torch.full_like(t[:, 0], sch.clean_time)))


@pytest.mark.parametrize("objective", ["eps", "v", "x0", "flow"])
def test_clip_x0_clamps_the_estimate_and_keeps_eps_consistent(objective):
    """A single step to the clean time returns the x0 estimate itself (DDIM and Euler alike),
    so with clip_x0 it must be exactly the clamped unclipped estimate."""
    flow = objective == "flow"
    sch = FlowSchedule() if flow else ddpm_schedule("cosine")
    S = torch.tensor([[0.7] * 5, [0.0] * 5], dtype=torch.float64) if flow else torch.tensor([[600] * 5, [-1] * 5])
    x = 3.0 * torch.randn(SHAPE, generator=gen(0))  # big values: the estimates leave [-1, 1]
    kw = dict(method="euler" if flow else "ddim", objective=objective, ops=get_backend("reference"))
    fake = FakeDenoiser(dtype=torch.float32)

    def model(x, t):  # scaled so an x0 prediction leaves [-1, 1] too
        return 3.0 * fake(x, t)

    free = sample(model, sch, S, x_init=x.clone(), **kw)
    assert free.abs().max() > 1.5
    clipped = sample(model, sch, S, x_init=x.clone(), clip_x0=1.0, **kw)
    assert torch.allclose(clipped, free.clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="clip_x0"):
        sample(FakeDenoiser(), sch, S, x_init=x.clone(), clip_x0=0.0, **kw)


class SelfConditionedDenoiser(FakeDenoiser):
    """FakeDenoiser that also takes x_self (added in, so it changes the output) and records it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.estimates: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.grad_modes: list[bool] = []

    def __call__(self, x, t, x_self, rows=None):
        self.estimates.append(x_self.clone())
        self.inputs.append(x.clone())
        self.grad_modes.append(torch.is_grad_enabled())
        return super().__call__(x + 0.5 * x_self, t)


def test_self_conditioning_sampler_feeds_back_the_previous_estimate():
    sch = ddpm_schedule("cosine")
    ladder = ddpm_ladder(6)
    S, held = keyframes(ladder, 5, [2])
    x0_held = torch.randn(SHAPE, generator=gen(0))
    model = SelfConditionedDenoiser(dtype=torch.float32)
    sample(model, sch, S, shape=SHAPE, method="ddpm", objective="v", held=held, x0_held=x0_held,
           self_condition=True, generator=gen(1), ops=get_backend("reference"))
    first = model.estimates[0]
    assert torch.equal(first[:, 2], x0_held[:, 2]) and torch.equal(first[:, ~held], torch.zeros_like(first[:, ~held]))
    ops = get_backend("reference")
    for i in range(len(model.estimates) - 1):  # step i + 1 sees step i's x0 estimate
        x, t = model.inputs[i], S[i]
        pred = FakeDenoiser.__call__(model, x + 0.5 * model.estimates[i], sch.model_time(t).expand(2, 5))
        a, s = sch.alpha_sigma(t.expand(2, 5))
        x0_hat = ops.frame_combine([x, pred], prediction_coeffs("v", a, s)[..., 0, :].contiguous())
        nxt = model.estimates[i + 1]
        assert torch.allclose(nxt[:, ~held], x0_hat[:, ~held], atol=1e-5)
        assert torch.equal(nxt[:, held], x0_held[:, held])


def test_self_conditioning_loss_makes_a_no_grad_first_pass_for_chosen_clips():
    sch = ddpm_schedule("cosine")
    x0 = torch.randn(SHAPE, generator=gen(0))
    t = torch.full((2, 5), 500)
    w = torch.zeros(1, requires_grad=True)

    model = SelfConditionedDenoiser(dtype=torch.float32)
    seen_rows = []

    def model_fn(x, tt, xs, rows=None):
        seen_rows.append(rows)
        return model(x, tt, xs) + w

    noise = torch.randn(SHAPE, generator=gen(1))
    out = diffusion_loss(model_fn, sch, x0, t, objective="v", noise=noise,
                         self_condition=torch.tensor([False, True]), ops=get_backend("reference"))
    assert model.grad_modes == [False, True]  # estimate without gradient, then the trained pass
    # the first pass sees only the chosen clip, and is told which one it is
    assert seen_rows[0].tolist() == [1] and seen_rows[1] is None
    x_t = sch.q_sample(x0, noise, t, get_backend("reference"))
    assert torch.equal(model.inputs[0], x_t[1:]) and torch.equal(model.inputs[1], x_t)
    est = model.estimates[1]
    assert torch.equal(est[0], torch.zeros_like(est[0])) and est[1].abs().sum() > 0
    x0_hat = model.estimates[1][1]  # the estimate the trained pass gets is the first pass's x0
    a, s = (c.float() for c in sch.alpha_sigma(t[1:]))
    pred = FakeDenoiser.__call__(model, x_t[1:], sch.model_time(t[1:]))
    assert torch.allclose(x0_hat, (a.view(1, -1, 1, 1, 1) * x_t[1:] - s.view(1, -1, 1, 1, 1) * pred)[0], atol=1e-5)
    out.loss.backward()
    assert w.grad is not None
    model = SelfConditionedDenoiser(dtype=torch.float32)
    diffusion_loss(model, sch, x0, t, objective="v", generator=gen(1), self_condition=torch.tensor([False, False]))
    assert len(model.estimates) == 1 and model.estimates[0].abs().sum() == 0  # no clip chosen: one pass, zeros
    with pytest.raises(ValueError, match="self_condition"):
        diffusion_loss(model, sch, x0, t, objective="v", self_condition=torch.tensor([1, 0]))


def test_unknown_conditioning_is_rejected():
    S, held = unconditional(ddpm_ladder(2), 3)
    with pytest.raises(ValueError, match="conditioning"):
        sample(FakeDenoiser(), ddpm_schedule(), S, shape=(1, 3, 2, 4, 4), conditioning="inpaint")


def test_frames_whose_time_does_not_change_stay_exactly():
    sch = ddpm_schedule()
    S, _ = rolling_diagonal(ddpm_ladder(6), 5, lag=2)
    seen = []
    sample(FakeDenoiser(dtype=torch.float32), sch, S, shape=SHAPE, method="ddpm", generator=gen(0),
           callback=lambda i, n, x: seen.append(x.clone()))
    assert len(seen) == S.shape[0] - 1
    for i in range(1, len(seen)):
        still = S[i] == S[i + 1]  # step i moved nothing in these frames
        assert torch.equal(seen[i][:, still], seen[i - 1][:, still])
        assert not torch.equal(seen[i][:, ~still], seen[i - 1][:, ~still])


# ----------------------------------------------------------------------------- reproducibility, guidance


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_reproducible_from_seed_with_a_real_model(backend):
    from fvdm.models import latte

    torch.manual_seed(0)
    model = latte("T/2", backend="reference", input_size=4, in_channels=2, num_frames=5, depth=2, learn_sigma=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    S, held = keyframes(ddpm_ladder(4), 5, [0])
    x0 = torch.randn(SHAPE, generator=gen(9))

    def run(seed):
        return sample(model, ddpm_schedule(), S, shape=SHAPE, method="ddpm", learn_sigma=True, held=held,
                      x0_held=x0, generator=gen(seed), ops=get_backend(backend))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.isclose(a[:, 1:], c[:, 1:]).all()
    assert torch.equal(a[:, 0], x0[:, 0])


def test_classifier_free_guidance_mixes_only_prediction_channels():
    def model(x, t, y):  # prediction channels depend on y, variance channels on y too
        return torch.cat([x * y[:, None, None, None, None], x + y[:, None, None, None, None]], dim=2)

    x, t, y = torch.randn(SHAPE), torch.zeros(SHAPE[:2]), torch.tensor([2.0, 3.0])
    out = classifier_free_guidance(model, y, 4.0, null_label=0)(x, t)
    torch.testing.assert_close(out[:, :, :2], 4.0 * x * y[:, None, None, None, None])  # uncond = 0
    torch.testing.assert_close(out[:, :, 2:], x + y[:, None, None, None, None])  # from cond, unmixed
    torch.testing.assert_close(classifier_free_guidance(model, y, 1.0, 0)(x, t), model(x, t, y))


def _guidance_model(num_frames: int):
    from fvdm.models import latte

    torch.manual_seed(0)
    model = latte("T/2", input_size=4, in_channels=2, num_frames=num_frames, depth=2, learn_sigma=True).eval()
    with torch.no_grad():
        for p in model.parameters():  # past adaLN-zero: frames do meet
            p.add_(0.05 * torch.randn(p.shape))
    return lambda x, t, *x_self, **kw: model(x, t, None, *x_self, **kw)


def test_skip_guidance_pushes_away_from_the_frame_local_model():
    net = _guidance_model(SHAPE[1])
    x, t = torch.randn(SHAPE), torch.randint(0, 1000, SHAPE[:2]).float()
    with torch.no_grad():
        full, weak = net(x, t), net(x, t, frame_local=True)
        out = temporal_guidance(net, 2.0)(x, t)
    assert (full - weak).abs().max() > 1e-4
    torch.testing.assert_close(out[:, :, :2], full[:, :, :2] + 2.0 * (full[:, :, :2] - weak[:, :, :2]))
    torch.testing.assert_close(out[:, :, 2:], full[:, :, 2:])  # the learned variance, unmixed
    assert temporal_guidance(net, 0.0, 0.0) is net


def test_frame_order_guidance_pushes_away_from_the_frames_in_another_order():
    # Two frames: the only order that is not the identity is the swap, so the weak prediction is known.
    net = _guidance_model(2)
    x, t = torch.randn(3, 2, 2, 4, 4), torch.randint(0, 1000, (3, 2)).float()
    swap = torch.tensor([1, 0])
    with torch.no_grad():
        full = net(x, t)
        swapped = net(x[:, swap], t[:, swap])[:, swap]
        out = temporal_guidance(net, 0.0, 1.5, torch.Generator().manual_seed(0))(x, t)
        both = temporal_guidance(net, 2.0, 1.5, torch.Generator().manual_seed(0))(x, t)
        local = net(x, t, frame_local=True)
    assert (full - swapped).abs().max() > 1e-4  # the temporal position embedding sees the order
    torch.testing.assert_close(out[:, :, :2], full[:, :, :2] + 1.5 * (full[:, :, :2] - swapped[:, :, :2]))
    torch.testing.assert_close(out[:, :, 2:], full[:, :, 2:])
    torch.testing.assert_close(both[:, :, :2], out[:, :, :2] + 2.0 * (full[:, :, :2] - local[:, :, :2]))


def test_frame_order_guidance_leaves_an_order_blind_network_alone():
    # A network that sees each frame alone (its own image and timestep) gives the same prediction
    # in any frame order once the order is undone: no push. A real model is pushed.
    def per_frame(x, t, *x_self, **kw):
        return torch.cat([x * torch.cos(t)[..., None, None, None], x.flip(-1)], dim=2)

    x, t = torch.randn(2, 7, 2, 4, 4), torch.randint(0, 1000, (2, 7)).float()
    guided = temporal_guidance(per_frame, 0.0, 3.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(guided(x, t), per_frame(x, t))
    net = _guidance_model(7)
    with torch.no_grad():
        pushed = temporal_guidance(net, 0.0, 3.0, torch.Generator().manual_seed(1))(x, t)
        assert (pushed - net(x, t)).abs().max() > 1e-4


# ----------------------------------------------------------------------------- task builders


def test_ladders():
    assert ddpm_ladder(50).tolist() == list(range(980, -1, -20)) + [-1]
    assert ddpm_ladder(1000).tolist() == list(range(999, -2, -1))
    fl = flow_ladder(4)
    assert fl.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("ladder", [ddpm_ladder(10), flow_ladder(10)], ids=["ddpm", "flow"])
def test_task_matrices_shapes_and_monotonicity(ladder):
    clean = ladder[-1]
    for (S, held), want_held in [
        (unconditional(ladder, 6), []),
        (keyframes(ladder, 6, [0]), [0]),
        (keyframes(ladder, 6, [0, 5]), [0, 5]),
        (keyframes(ladder, 7, [0, 3, 6]), [0, 3, 6]),
        (keyframes(ladder, 6, [4, 1]), [1, 4]),
        (keyframes(ladder, 6, [0, 1, 2]), [0, 1, 2]),
    ]:
        Fr = S.shape[1]
        assert S.shape == (11, Fr) and held.shape == (Fr,) and held.dtype == torch.bool and Fr in (6, 7)
        assert held.nonzero().flatten().tolist() == want_held
        assert (S[1:] <= S[:-1]).all()
        assert (S[:, held] == clean).all()
        assert torch.equal(S[:, ~held], ladder[:, None].expand(-1, int((~held).sum())))

    S, held = rolling_diagonal(ladder, 4, lag=3)
    assert S.shape == (11 + 9, 4) and not held.any()
    assert (S[1:] <= S[:-1]).all() and (S[0] == ladder[0]).all() and (S[-1] == clean).all()
    assert (S[:, 1:] >= S[:, :-1]).all()  # later frames are noisier at every step
    assert torch.equal(S[3:, 1], S[:-3, 0])  # frame 1 lags frame 0 by exactly 3 steps
    with pytest.raises(ValueError, match="indices"):
        keyframes(ladder, 6, [6])
    with pytest.raises(ValueError, match="every frame is held"):
        keyframes(ladder, 6, range(6))


def test_sampler_rejects_bad_matrices():
    sch = ddpm_schedule()
    with pytest.raises(ValueError, match="non-increasing"):
        sample(FakeDenoiser(), sch, torch.tensor([[-1] * 5, [10] * 5]), shape=SHAPE)
    with pytest.raises(ValueError, match="shape"):
        sample(FakeDenoiser(), sch, torch.tensor([[10] * 4, [-1] * 4]), shape=SHAPE)
    with pytest.raises(ValueError, match="integer"):
        sample(FakeDenoiser(), sch, flow_ladder(3)[:, None].expand(-1, 5), shape=SHAPE)
    with pytest.raises(ValueError, match="euler"):
        sample(FakeDenoiser(), FlowSchedule(), flow_ladder(3)[:, None].expand(-1, 5), shape=SHAPE, method="ddim")
    with pytest.raises(ValueError, match="objective 'eps'"):  # eps at flow time 1 has no x0
        sample(FakeDenoiser(), FlowSchedule(), flow_ladder(3)[:, None].expand(-1, 5), shape=SHAPE, objective="eps")
    with pytest.raises(ValueError, match="x0_held"):
        S, held = keyframes(ddpm_ladder(3), 5, [0])
        sample(FakeDenoiser(), sch, S, shape=SHAPE, held=held)


def test_long_video_holds_the_previous_windows_overlap():
    calls = []

    def window(held, x0_held):
        calls.append((held.clone(), None if x0_held is None else x0_held.clone()))
        new = torch.randn(2, 6, 1, 2, 2, generator=gen(len(calls)))
        return new if x0_held is None else torch.where(held[None, :, None, None, None], x0_held, new)

    video = long_video(window, total_frames=20, window=6, overlap=2)
    assert video.shape == (2, 20, 1, 2, 2)
    assert len(calls) == 5  # 6 + 4 * 4 = 22 >= 20
    assert not calls[0][0].any() and calls[0][1] is None
    for k in range(1, 5):
        held, x0_held = calls[k]
        assert held.tolist() == [True, True, False, False, False, False]
        start = 6 + 4 * (k - 1) - 2  # the previous window's last two frames in the video
        assert torch.equal(x0_held[:, :2], video[:, start:start + 2])
    ctx = torch.randn(2, 3, 1, 2, 2)
    calls.clear()
    video = long_video(window, total_frames=9, window=6, overlap=2, context=ctx)
    assert torch.equal(video[:, :3], ctx) and calls[0][0].tolist() == [True] * 3 + [False] * 3


def test_tiny_model_learns_on_a_fixed_batch():
    """Loss + model + PTSS + AdamW: a few steps on one batch lower the loss (fused ops where built)."""
    from fvdm.models import latte

    torch.manual_seed(0)
    backend = "fused" if HAS_C else "reference"
    model = latte("T/2", backend=backend, input_size=4, in_channels=2, num_frames=5, depth=1, learn_sigma=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.randn(SHAPE, generator=gen(0)).clamp(-1, 1)
    sch, g = ddpm_schedule(), gen(1)
    t = sample_timesteps(2, 5, p=0.5, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    losses = []
    for _ in range(30):
        out = diffusion_loss(model, sch, x0, t, noise=noise, learn_sigma=True, ops=get_backend(backend))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_long_video_with_the_sampler_keeps_the_overlap_exact():
    shape = (2, 5, 2, 4, 4)
    inner = window_sampler(FakeDenoiser(dtype=torch.float32), ddpm_schedule(), ddpm_ladder(6), shape,
                           generator=gen(0), method="ddpm")
    windows = []

    def generate(held, x0_held):
        out = inner(held, x0_held)
        if x0_held is not None:
            assert torch.equal(out[:, held], x0_held[:, held])
        windows.append(out)
        return out

    video = long_video(generate, total_frames=11, window=5, overlap=2)
    assert video.shape == (2, 11, 2, 4, 4) and len(windows) == 3
    torch.testing.assert_close(video[:, :5], windows[0], atol=0, rtol=0)
    torch.testing.assert_close(video[:, 3:8], windows[1], atol=0, rtol=0)  # overlap frames 3, 4 shared


def test_noise_bias_skews_training_times_toward_high_noise():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(40000, 1, 0.0, generator=g, noise_bias=2.0).float()
    # t >= 0.8 T  <=>  (1 - u)^2 <= 0.2  <=>  u >= 1 - sqrt(0.2): probability sqrt(0.2) = 0.447
    assert abs(float((t >= 800).float().mean()) - 0.2 ** 0.5) < 0.01
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    f = sample_timesteps(40000, 1, 0.0, generator=g, num_timesteps=None, noise_bias=3.0)
    assert abs(float((f >= 0.8).float().mean()) - 0.2 ** (1 / 3)) < 0.01
    a = sample_timesteps(8, 4, 0.5, generator=torch.Generator().manual_seed(1))
    b = sample_timesteps(8, 4, 0.5, generator=torch.Generator().manual_seed(1), noise_bias=1.0)
    assert torch.equal(a, b)  # bias 1 is the paper's uniform draw, unchanged
    with pytest.raises(ValueError, match="noise_bias"):
        sample_timesteps(2, 2, generator=g, noise_bias=0.0)
