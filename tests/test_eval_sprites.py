"""Sprite tracking (fvdm.eval.sprites): true MovingSprites videos read as coherent; each way a
generated video can go wrong (fragments, a vanished sprite, colour or size change, a jump, no
motion, noise) is caught by the criterion meant for it."""

from __future__ import annotations

import torch

from fvdm.data import MovingSprites
from fvdm.eval.sprites import Thresholds, frame_blobs, score_video, score_videos, thresholds_for


def sprites(n=16, size=16, frames=8, **kw):
    kw = {"max_sprites": 1, "sprite_size": (0.3, 0.4), **kw}
    ds = MovingSprites(num_videos=n, num_frames=frames, size=size, seed=11, **kw)
    return torch.stack([ds[i] for i in range(n)]), ds


def test_true_videos_are_coherent():
    videos, _ = sprites(32)
    summary = score_videos(videos)
    assert summary["coherent"] >= 0.9
    assert summary["frames_with_expected_count"] == 1.0


def test_faster_true_videos_stay_coherent_with_their_thresholds():
    # sprites twice as fast bounce twice as hard: the default jerk bound rejects true clips,
    # the bound scaled to the data's top speed keeps them
    videos, ds = sprites(64, speed=(1.0, 3.0))
    assert score_videos(videos, th=thresholds_for(ds))["coherent"] >= 0.9
    assert score_videos(videos)["coherent"] < 0.85
    assert thresholds_for(sprites(1)[1]) == Thresholds()  # default speeds: the default bounds


def test_centroid_follows_the_physics():
    videos, ds = sprites(4, size=32)
    for i, v in enumerate(videos):
        truth = ds.trajectory(i).positions[:, 0].numpy()
        for f, frame in enumerate(v):
            x, y = frame_blobs(frame.numpy()).centroid
            # thresholded anti-aliased edges: within half a pixel of the true centre
            assert abs(x - truth[f, 0]) < 0.5 and abs(y - truth[f, 1]) < 0.5


def test_a_fragment_breaks_coherence():
    v = sprites(1, size=32)[0][0].clone()
    v[3, :, 0:5, 0:5] = 1.0  # a second white blob in one frame, in a corner
    s = score_video(v)
    assert not s.coherent and s.frames_with_expected_count == 7 / 8


def test_a_vanished_sprite_breaks_coherence():
    v = sprites(1)[0][0].clone()
    v[4] = -1.0
    s = score_video(v)
    assert not s.coherent and s.frames_with_expected_count == 7 / 8


def test_colour_change_breaks_coherence():
    v = sprites(1)[0][0].clone()
    v[4:] = torch.where(v[4:] > -1, v[4:].flip(1), v[4:])  # swap the colour channels halfway through
    before = score_video(sprites(1)[0][0])
    after = score_video(v)
    assert before.coherent and not after.coherent and after.colour_drift > 0.2


def test_a_jump_breaks_coherence():
    v = sprites(1, size=32)[0][0]
    jumped = torch.cat([v[:4], v[4:].roll(shifts=(8, 8), dims=(-2, -1))])
    s = score_video(jumped)
    assert not s.coherent and s.max_jerk > 5


def test_a_static_sprite_is_not_motion():
    v = sprites(1)[0][0]
    s = score_video(v[:1].expand_as(v))
    assert not s.coherent and s.motion == 0.0


def test_growing_sprite_breaks_coherence():
    small, _ = sprites(1, size=32, sprite_size=(0.2, 0.2), speed=(0.0, 0.0))
    big, _ = sprites(1, size=32, sprite_size=(0.4, 0.4), speed=(0.0, 0.0))
    v = torch.cat([small[0, :4], big[0, 4:]])  # same place, same colour, twice the side
    assert score_video(v).area_change > 1.0


def test_noise_is_not_coherent():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 8, 3, 16, 16, generator=g).clamp(-1, 1)
    assert score_videos(noise)["coherent"] == 0.0


def test_expected_none_accepts_any_constant_count():
    v = sprites(1, size=32)[0][0].clone()
    v[:, :, 0:4, 0:4] = 1.0  # a static second blob in every frame
    assert score_video(v, expected=None).frames_with_expected_count == 1.0
    assert score_video(v, expected=1).frames_with_expected_count == 0.0
