"""`fvdm eval synthetic`: image metrics against independent computations, the task metrics
against known answers (truth scores perfectly, a shifted copy scores by its shift), and the
command end to end on a tiny trained run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fvdm.config import load_config
from fvdm.data import MovingSprites
from fvdm.errors import UserError
from fvdm.eval import i3d
from fvdm.eval.synthetic import (
    _extension_metrics,
    _interpolation_metrics,
    evaluate_synthetic,
    frame_hue,
    i3d_clips,
    identity_transfer,
    proxy_fvd,
    proxy_network,
    psnr,
    ssim,
)
from fvdm.pipeline.runs import load_run
from fvdm.train.trainer import train
from test_cli import TINY, cli


def sprites(n=4, size=16, frames=8):
    ds = MovingSprites(num_videos=n, num_frames=frames, size=size, max_sprites=1, sprite_size=(0.3, 0.4), seed=3)
    return torch.stack([ds[i] for i in range(n)])


def test_psnr_of_a_known_error():
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0), atol=1e-4)


def _ssim_direct(x: np.ndarray, y: np.ndarray, window=11, sigma=1.5) -> float:
    """SSIM by its definition, one window position at a time ([0, 1] images, (C, H, W))."""
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - window + 1):
            for j in range(x.shape[2] - window + 1):
                px, py = x[c, i:i + window, j:j + window], y[c, i:i + window, j:j + window]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 14, 13, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    want = _ssim_direct(((a[0] + 1) / 2).double().numpy(), ((b[0] + 1) / 2).double().numpy())
    assert abs(float(ssim(a, b)[0]) - want) < 1e-5
    assert abs(float(ssim(a, a)[0]) - 1.0) < 1e-6
    assert float(ssim(a, b)[0]) < 0.9


def test_interpolation_metrics_truth_and_shift():
    real = sprites()
    perfect = _interpolation_metrics(real, real)
    assert perfect["centre_error_px"] < 1e-6 and perfect["ssim"] > 0.999 and perfect["psnr"] > 90
    shifted = real.roll(shifts=3, dims=-1)  # 3 px to the right (sprites stay clear of the wrap)
    worse = _interpolation_metrics(shifted, real)
    assert worse["psnr"] < 20 and worse["ssim"] < perfect["ssim"]
    assert worse["centre_error_px"] > 1.5


def test_extension_metrics_count_only_generated_frames():
    real = sprites(frames=12)
    fake = real.clone()
    fake[:, :6] = -1.0  # damage the given frames only: the score must not change
    m = _extension_metrics(fake, real, 6)
    assert m["centre_error_px"] < 1e-6 and m["last_frame_centre_error_px"] < 1e-6
    fake[:, 6:] = -1.0  # no sprite in the continuation: one frame side of error per frame
    assert _extension_metrics(fake, real, 6)["centre_error_px"] == pytest.approx(16.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("synthetic") / "run"
    train(load_config("demo_cpu", TINY + ["data.size=16", "model.patch_size=4"]), run, progress=False)
    return run


def test_eval_synthetic_command(tiny_run, capsys):
    code, out, err = cli(capsys, "eval", "synthetic", "--run", str(tiny_run), "--videos", "2", "--steps", "2",
                         "--no-progress")
    assert code == 0, err
    result = json.loads((tiny_run / "eval" / "synthetic.json").read_text())
    tasks = result["results"]
    assert set(tasks) == {"unconditional", "i2v", "interpolate", "extend", "long", "identity"}
    assert all(0.0 <= v <= 3**0.5 for v in tasks["identity"]["model"].values())
    # the true videos are what a perfect model would score
    assert tasks["unconditional"]["data"]["frames_with_expected_count"] == 1.0
    assert tasks["long"]["data"]["frames_with_expected_count"] == 1.0
    assert tasks["i2v"]["data"]["colour_error"] < 0.1
    # the I3D FVD beside the proxy FVD, with its real-vs-real floor, and which I3D made it
    assert tasks["unconditional"]["model"]["i3d_fvd"] > 0 and tasks["unconditional"]["data"]["i3d_fvd"] > 0
    assert result["i3d"]["sha256"] == i3d.KNOWN_SHA256 and result["i3d"]["name"] == i3d.NAME
    for task in tasks.values():
        assert all(isinstance(v, float) for v in task["model"].values())
    assert "interpolate" in out and "psnr" in out


def test_frame_hue_is_the_colour_wherever_the_sprite_is():
    frame = -torch.ones(2, 3, 8, 8)
    frame[0, :2, 1:3, 1:3] = 1.0  # yellow, top left
    frame[1, :2, 5:8, 4:7] = 1.0  # yellow, bigger, elsewhere
    torch.testing.assert_close(frame_hue(frame), torch.tensor([[1.0, 1.0, 0.0]] * 2))
    assert torch.equal(frame_hue(-torch.ones(3, 8, 8)), torch.zeros(3))  # black: no colour, no nan


class _Stub(torch.nn.Module):
    """An x0-predicting stand-in: `oracle` returns the true clips, else it returns its noisy
    input (no information carried from the clean frame)."""

    def __init__(self, model, clips, oracle):
        super().__init__()
        self.config, self.ops, self.clips, self.oracle = model.config, model.ops, clips, oracle
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None, x_self=None):
        return self.clips.to(x) if self.oracle else x


def test_identity_transfer_scores_a_copier_zero_and_a_blind_model_high(tiny_run):
    loaded = load_run(tiny_run, device="cpu")
    loaded.cfg = dataclasses.replace(loaded.cfg, diffusion=dataclasses.replace(loaded.cfg.diffusion, objective="x0"))
    clips = sprites(n=4)
    loaded.model = _Stub(loaded.model, clips, oracle=True)
    perfect = identity_transfer(loaded, clips)
    assert max(perfect.values()) < 1e-5
    loaded.model = _Stub(loaded.model, clips, oracle=False)  # its estimate is the noisy frame itself
    blind = identity_transfer(loaded, clips)
    assert blind["hue_error_near"] > 0.2 and blind["hue_error_far"] > 0.2


def test_eval_synthetic_rejects_non_sprite_runs(tiny_run):
    loaded = load_run(tiny_run, device="cpu")
    loaded.cfg = dataclasses.replace(loaded.cfg, data=dataclasses.replace(loaded.cfg.data, kind="videos"))
    with pytest.raises(UserError, match="sprites"):
        evaluate_synthetic(loaded, num_videos=1, steps=1)


def test_eval_synthetic_bad_task(tiny_run, capsys):
    code, _, err = cli(capsys, "eval", "synthetic", "--run", str(tiny_run), "--tasks", "unconditional,warp")
    assert code == 2 and "warp" in err and len(err.strip().splitlines()) == 1


def test_proxy_fvd_separates_real_from_wrong_videos():
    ds = MovingSprites(num_videos=96, num_frames=8, size=16, max_sprites=1, sprite_size=(0.3, 0.4), seed=3)
    a = torch.stack([ds[i] for i in range(32)])
    b = torch.stack([ds[i] for i in range(32, 64)])
    static = a[:, :1].expand_as(a)  # right frames, no motion
    shuffled = a[:, torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])]  # right frames, wrong order
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(a.shape, generator=g) * 2 - 1
    same = proxy_fvd(b, a)
    assert 3 * same < proxy_fvd(static, a) and 3 * same < proxy_fvd(shuffled, a) and 3 * same < proxy_fvd(noise, a)
    assert proxy_fvd(a, a) == pytest.approx(0.0, abs=1e-9)
    # the same network on every call (fixed seed), so numbers compare across runs
    x = torch.cat([a[:2], a[:2]], dim=2).transpose(1, 2)
    assert torch.equal(proxy_network(3)(x), proxy_network(3)(x))


def test_i3d_clips_are_fvd_bytes_repeated_in_time_up_to_the_i3d_minimum():
    videos = torch.linspace(-1, 1, 8).view(1, 8, 1, 1, 1).expand(2, 8, 1, 4, 6)  # grey, 8 frames
    clips = i3d_clips(videos)
    assert clips.dtype == torch.uint8 and clips.shape == (2, 3, 16, 4, 6)
    want = ((torch.linspace(-1, 1, 8) * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).floor().to(torch.uint8)
    assert torch.equal(clips[0, 1, :, 2, 3], want.repeat_interleave(2))
    assert i3d_clips(torch.zeros(1, 9, 3, 4, 4)).shape == (1, 3, 9, 4, 4)  # 9 frames: as they are
