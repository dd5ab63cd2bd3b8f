"""Data: MovingSprites physics and rendering, video and frame folders (real files written with
PyAV / Pillow), reading single videos and images, and VAE latents with their on-disk cache."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fvdm.data import (
    FrameFolders,
    LatentCache,
    MovingSprites,
    Trajectory,
    VideoFolder,
    build_dataset,
    decode_video,
    encode_video,
    load_vae,
    natural_key,
    read_image,
    read_video,
    render,
)
from fvdm.data.common import resize_crop
from fvdm.errors import UserError

LEVEL = 12  # test videos: frame k is a flat grey of level LEVEL * k, so content names the frame
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers not installed (pip install diffusers)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: on a busy 2-core machine, waiting on a second thread costs ~0.3 s a call."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- MovingSprites


def sprite_alpha(video: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Coverage (F, H, W) of the only sprite of an RGB video, from its strongest colour channel."""
    c = int(colour.argmax())
    return (video[:, c] + 1.0) / 2.0 / colour[c]


def centroid(alpha: torch.Tensor) -> torch.Tensor:
    """(F, H, W) coverage -> (F, 2) centre of mass (x, y) in pixels (pixel centres at k + 0.5)."""
    Fr, H, W = alpha.shape
    a = alpha.double()
    mass = a.sum(dim=(1, 2))
    xs = (torch.arange(W, dtype=torch.float64) + 0.5)
    ys = (torch.arange(H, dtype=torch.float64) + 0.5)
    return torch.stack([(a.sum(1) * xs).sum(1) / mass, (a.sum(2) * ys).sum(1) / mass], dim=1)


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 16)])
def test_sprites_shape_range_and_background(channels, size):
    ds = MovingSprites(num_videos=5, num_frames=6, size=size, channels=channels)
    assert len(ds) == 5
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (6, channels, size, size) and x.dtype == torch.float32
        assert x.min() == -1.0 and x.max() <= 1.0  # black background, values in range
        assert (x > -0.5).any(dim=(1, 2, 3)).all()  # a sprite is visible in every frame
        covered = (x > -1.0).float().mean()
        assert 0.01 < covered < 0.5  # sprites, not an empty or filled frame


def test_sprites_deterministic_per_seed_and_index():
    a, b = MovingSprites(num_videos=8, num_frames=4), MovingSprites(num_videos=8, num_frames=4)
    later_first = [b[i] for i in (5, 2, 0)]  # access order must not matter
    assert all(torch.equal(a[i], x) for i, x in zip((5, 2, 0), later_first))
    assert torch.equal(a[-1], a[7])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    other = MovingSprites(num_videos=8, num_frames=4, seed=1)
    assert all(not torch.equal(a[i], other[i]) for i in range(3))
    with pytest.raises(IndexError):
        a[8]


def test_sprites_options_shape_choice_and_counts():
    ds = MovingSprites(num_videos=30, num_frames=2, shapes=("circle",), min_sprites=2, max_sprites=3)
    counts = set()
    for i in range(len(ds)):
        t = ds.trajectory(i)
        assert set(t.shapes) == {"circle"}
        counts.add(len(t.shapes))
        assert len({tuple(c.tolist()) for c in t.colours}) == len(t.shapes)  # distinct colours
    assert counts == {2, 3}


@pytest.mark.parametrize("kwargs", [
    dict(shapes=("star",)), dict(channels=2), dict(sprite_size=(0.5, 0.2)), dict(min_sprites=3, max_sprites=2),
    dict(speed=(-1, 1)), dict(num_frames=0), dict(sprite_size=1.0),
])
def test_sprites_bad_options(kwargs):
    with pytest.raises(UserError, match="MovingSprites"):
        MovingSprites(**kwargs)


def test_sprites_move_with_their_velocity():
    """The rendered sprite's centre of mass moves by the trajectory's velocity each frame
    (sub-pixel, thanks to anti-aliasing) and keeps its area: motion is smooth and exact."""
    ds = MovingSprites(num_videos=40, num_frames=12, size=32, min_sprites=1, max_sprites=1)
    seen_shapes = set()
    for i in range(12):
        t = ds.trajectory(i)
        video = ds[i]
        alpha = sprite_alpha(video, t.colours[0])
        c = centroid(alpha)
        step = c[1:] - c[:-1]
        v = t.velocities[:-1, 0].double()
        no_bounce = (t.velocities[1:, 0] == t.velocities[:-1, 0]).all(dim=1)
        assert no_bounce.sum() >= 6
        assert torch.allclose(step[no_bounce], v[no_bounce], atol=0.05), (t.shapes, step, v)
        assert (v.norm(dim=1) >= 0.5 - 1e-5).all()  # speed=(0.5, 1.5) px/frame at size 32
        # The centroid is the box centre for symmetric shapes (the triangle's sits lower).
        if t.shapes[0] != "triangle":
            assert torch.allclose(c, t.positions[:, 0].double(), atol=0.05)
        mass = alpha.sum(dim=(1, 2))
        assert torch.allclose(mass, mass.mean().expand_as(mass), rtol=0.01)
        seen_shapes.add(t.shapes[0])
    assert seen_shapes == {"square", "circle", "triangle"}


def test_sprites_bounce_elastically_and_stay_inside():
    ds = MovingSprites(num_videos=10, num_frames=64, size=24, min_sprites=1, max_sprites=1, speed=(3.0, 4.0))
    bounced = 0
    for i in range(4):
        t = ds.trajectory(i)
        half = t.sizes[0] / 2
        pos, vel = t.positions[:, 0], t.velocities[:, 0]
        assert (pos >= half - 1e-4).all() and (pos <= t.frame_size - half + 1e-4).all()
        flips = (vel[1:] * vel[:-1] < 0).sum()
        bounced += int(flips)
        assert torch.allclose(vel.norm(dim=1), vel[0].norm().expand(64))  # speed kept: elastic
        alpha = sprite_alpha(ds[i], t.colours[0])
        # The full area is in the frame at every frame, touching the walls included.
        mass = alpha.sum(dim=(1, 2))
        assert torch.allclose(mass, mass.mean().expand_as(mass), rtol=0.01)
        assert (alpha[:, 0].sum(1) + alpha[:, -1].sum(1) + alpha[:, :, 0].sum(1) + alpha[:, :, -1].sum(1) > 0).any()
    assert bounced >= 4


def test_render_draws_in_order_and_greyscale_is_the_channel_mean():
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.4, 1.0]
    def two_squares(colours, channels=3):  # pixel-aligned squares: coverage exactly 0 or 1
        return Trajectory(shapes=("square", "square"), colours=torch.tensor(colours), sizes=torch.tensor([8.0, 4.0]),
                          positions=torch.full((1, 2, 2), 8.0), velocities=torch.zeros(1, 2, 2),
                          frame_size=16, channels=channels)
    img = render(two_squares([red, blue]))[0]  # (3, 16, 16)
    expect = torch.full((3, 16, 16), -1.0)
    expect[:, 4:12, 4:12] = torch.tensor(red)[:, None, None] * 2 - 1
    expect[:, 6:10, 6:10] = torch.tensor(blue)[:, None, None] * 2 - 1  # drawn last: on top
    assert torch.allclose(img, expect)
    grey = render(two_squares([red, blue], channels=1))[0]
    assert grey.shape == (1, 16, 16) and torch.allclose(grey, expect.mean(0, keepdim=True))
    colour, grey = MovingSprites(num_frames=3)[4], MovingSprites(num_frames=3, channels=1)[4]
    assert torch.allclose(grey, colour.mean(1, keepdim=True), atol=1e-6)


def test_clip_continues_the_item_for_any_length():
    ds = MovingSprites(num_videos=4, num_frames=16, size=16)
    for i in range(3):
        long = ds.clip(i, 64)
        assert long.shape == (64, 3, 16, 16)
        assert torch.equal(long[:16], ds[i])
        assert torch.equal(ds.trajectory(i, 64).positions[:16], ds.trajectory(i).positions)
        assert torch.equal(render(ds.trajectory(i, 64)), long)
        assert not torch.equal(long[16:32], long[:16])  # it keeps moving


def test_sprites_same_video_at_any_size():
    small, big = MovingSprites(num_videos=3, size=16), MovingSprites(num_videos=3, size=48)
    for i in range(3):
        assert torch.allclose(big.trajectory(i).positions, 3 * small.trajectory(i).positions, atol=1e-4)
    down = torch.nn.functional.avg_pool2d(big[0], 3)  # box filter = area coverage
    assert (down - small[0]).abs().mean() < 0.02


# ----------------------------------------------------------------------------- files on disk


def write_video(path: Path, num_frames: int, w: int = 64, h: int = 48) -> Path:
    """A video whose frame k is a flat grey of level LEVEL * k (mp4 via libx264 lossless, keyframe
    every 4 frames; gif via Pillow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [np.full((h, w, 3), LEVEL * k, np.uint8) for k in range(num_frames)]
    if path.suffix == ".gif":
        imgs = [Image.fromarray(a) for a in levels]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "0", "g": "4"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for a in levels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """(F, 3, H, W) in [-1, 1] of flat grey frames -> the frame number each one shows."""
    level = (clip.mean(dim=(1, 2, 3)) + 1.0) * 127.5
    return [round(v / LEVEL) for v in level.tolist()]


@pytest.fixture
def video_root(tmp_path) -> Path:
    root = tmp_path / "videos"
    write_video(root / "a.mp4", 20)
    write_video(root / "sub" / "b.mp4", 15, w=48, h=64)
    write_video(root / "c.gif", 12)
    write_video(root / "short.mp4", 6)
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.mark.filterwarnings("ignore:VideoFolder. skipped")
def test_video_folder_clips_follow_the_written_frames(video_root):
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        ds = VideoFolder(video_root, num_frames=4, frame_stride=3, size=32)
    assert [p.name for p, _ in ds.sources] == ["a.mp4", "c.gif", "b.mp4"] and ds.skipped[0].name == "short.mp4"
    lengths = {p.name: n for p, n in ds.sources}
    assert lengths == {"a.mp4": 20, "c.gif": 12, "b.mp4": 15}
    for i, (path, n) in enumerate(ds.sources):
        clip = ds[i]
        assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32
        assert clip.min() >= -1.0 and clip.max() <= 1.0
        got = frame_numbers(clip)
        start = got[0]
        assert got == [start, start + 3, start + 6, start + 9] and 0 <= start <= n - 10
        assert got == ds.frame_indices(i)
        assert torch.equal(ds[i], clip)  # deterministic
    again = VideoFolder(video_root, num_frames=4, frame_stride=3, size=32)
    assert [again.frame_indices(i) for i in range(3)] == [ds.frame_indices(i) for i in range(3)]
    starts = {VideoFolder(video_root, num_frames=4, frame_stride=3, seed=s).frame_indices(0)[0] for s in range(6)}
    assert len(starts) > 1  # the start depends on the seed
    fixed = VideoFolder(video_root, num_frames=4, frame_stride=3, random_start=False)
    assert frame_numbers(fixed[0]) == [0, 3, 6, 9] and fixed[0].shape == (4, 3, 48, 64)  # size None: native


@pytest.mark.filterwarnings("ignore:VideoFolder. skipped")
def test_video_folder_errors(tmp_path, video_root):
    bad = tmp_path / "bad"
    write_video(bad / "ok.mp4", 10)
    (bad / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="broken.mp4"):
        VideoFolder(bad, num_frames=4)
    trunc = tmp_path / "trunc"
    data = write_video(tmp_path / "whole.mp4", 20).read_bytes()
    trunc.mkdir()
    (trunc / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.mp4"):
        ds = VideoFolder(trunc, num_frames=4)
        [ds[i] for i in range(len(ds))]
    with pytest.raises(UserError, match="fewer than 30 frames"):
        VideoFolder(video_root, num_frames=30)
    with pytest.raises(UserError, match="no video files"):
        VideoFolder(tmp_path / "videos" / "sub", num_frames=4, extensions=(".mkv",))
    with pytest.raises(UserError, match="not a folder"):
        VideoFolder(tmp_path / "missing", num_frames=4)
    with pytest.raises(UserError, match="frame_stride"):
        VideoFolder(video_root, num_frames=4, frame_stride=0)


def test_resize_crop_is_centred_and_antialiased():
    img = torch.zeros(1, 40, 80, 3, dtype=torch.uint8)
    img[:, 10:30, 30:50] = 255  # a centred white square, half the height
    out = resize_crop(img, 20)  # 40x80 -> 20x40 -> centre 20x20
    assert out.shape == (1, 3, 20, 20)
    assert (out[0, :, 6:14, 6:14] > 0.99).all()  # the square, 10x10 with blurred edges
    assert (out[0, :, :4] == -1).all() and (out[0, :, :, :4] == -1).all()
    assert torch.allclose(out, out.flip(-1)) and torch.allclose(out, out.flip(-2))  # centred
    noise = torch.randint(0, 256, (1, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = resize_crop(noise, 16)
    # Shrinking 4x averages ~4x4 pixels (std ~0.09); plain bilinear would sample 2x2 (std ~0.28).
    assert out.std() < 0.15


def test_frame_folders_natural_order(tmp_path):
    root = tmp_path / "frames"
    for name, n in (("clip_a", 12), ("clip_b", 5)):
        (root / name).mkdir(parents=True)
        for k in range(n):  # frame_1 ... frame_12: lexicographic order would put frame_10 second
            Image.fromarray(np.full((20, 30, 3), LEVEL * k, np.uint8)).save(root / name / f"frame_{k + 1}.png")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        ds = FrameFolders(root, num_frames=4, frame_stride=3, random_start=False)
    assert len(ds) == 1 and frame_numbers(ds[0]) == [0, 3, 6, 9] and ds[0].shape == (4, 3, 20, 30)
    ds = FrameFolders(root, num_frames=5, frame_stride=1, size=16, seed=3)
    for i in range(len(ds)):
        got = frame_numbers(ds[i])
        assert got == list(range(got[0], got[0] + 5)) and ds[i].shape == (5, 3, 16, 16)
    assert sorted(["frame_10", "frame_2", "Frame_1", "frame_1b"], key=natural_key) == \
        ["Frame_1", "frame_1b", "frame_2", "frame_10"]
    (root / "clip_b" / "frame_3.png").write_bytes(b"not a png")
    ds = FrameFolders(root, num_frames=5, random_start=False)
    with pytest.raises(UserError, match="frame_3.png"):
        ds[1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no frame folders"):
        FrameFolders(tmp_path / "empty", num_frames=2)


def test_build_dataset_kinds_and_errors(video_root):
    assert isinstance(build_dataset("sprites", num_frames=4, size=16), MovingSprites)
    with pytest.warns(UserWarning):
        assert len(build_dataset("videos", root=video_root, num_frames=4, frame_stride=3)) == 3
    with pytest.raises(UserError, match="sprites, videos, frames"):
        build_dataset("webcam")
    with pytest.raises(UserError, match="colour"):
        build_dataset("sprites", colour="red")
    with pytest.raises(UserError, match="root"):
        build_dataset("frames", num_frames=4)


def test_read_video_and_image(tmp_path, video_root):
    video = read_video(video_root / "a.mp4")
    assert video.shape == (20, 48, 64, 3) and video.dtype == torch.uint8
    assert [round(v / LEVEL) for v in video.float().mean(dim=(1, 2, 3)).tolist()] == list(range(20))
    gif = read_video(video_root / "c.gif")
    assert gif.shape == (12, 48, 64, 3) and torch.equal(gif[:, 0, 0, 0], torch.arange(12, dtype=torch.uint8) * LEVEL)
    folder = tmp_path / "stills"
    folder.mkdir()
    for k in (10, 2, 1):
        Image.fromarray(np.full((8, 6), k, np.uint8), mode="L").save(folder / f"{k}.png")  # greyscale -> RGB
    frames = read_video(folder)
    assert frames.shape == (3, 8, 6, 3) and frames[:, 0, 0].tolist() == [[1] * 3, [2] * 3, [10] * 3]
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    assert torch.equal(read_image(tmp_path / "x.png"), torch.from_numpy(rgb))

    (tmp_path / "fake.png").write_text("hello")
    (tmp_path / "fake.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "nothing").mkdir()
    for call, path in ((read_image, "missing.png"), (read_image, "fake.png"), (read_image, "nothing"),
                       (read_video, "missing.mp4"), (read_video, "fake.mp4"), (read_video, "nothing")):
        with pytest.raises(UserError, match=path):
            call(tmp_path / path)


# ----------------------------------------------------------------------------- VAE latents


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16, scaling_factor=0.5,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@needs_diffusers
def test_encode_decode_use_the_distribution_mean_and_scaling(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    video = torch.stack([MovingSprites(num_frames=3, size=16)[i] for i in range(2)])  # (2, 3, 3, 16, 16)
    z = encode_video(vae, video, chunk_size=4)
    assert z.shape == (2, 3, 4, 16, 16) and z.dtype == torch.float32
    with torch.no_grad():
        want = vae.encode(video.flatten(0, 1)).latent_dist.mean * 0.5
    assert torch.allclose(z.flatten(0, 1), want, atol=1e-5)
    assert torch.allclose(encode_video(vae, video, chunk_size=1), z, atol=1e-5)  # chunking changes nothing
    assert torch.equal(encode_video(vae, video), z)  # deterministic: no sampling
    x = decode_video(vae, z, chunk_size=5)
    assert x.shape == video.shape and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        want = vae.decode(z.flatten(0, 1) / 0.5).sample.clamp(-1, 1)
    assert torch.allclose(x.flatten(0, 1), want, atol=1e-5)
    with pytest.raises(UserError, match="channels=3"):
        encode_video(vae, video[:, :, :1])


@needs_diffusers
def test_load_vae_errors(tmp_path, tiny_vae_dir, monkeypatch):
    with pytest.raises(UserError, match="no config.json"):
        load_vae(tmp_path / "nowhere")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tiny_vae_dir / "config.json").read_text())
    with pytest.raises(UserError, match="weightless"):
        load_vae(weightless)
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "vae").symlink_to(tiny_vae_dir, target_is_directory=True)
    assert load_vae(pipeline).config.scaling_factor == 0.5  # a whole SD folder: its vae/ is used
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what a missing package looks like to import
    with pytest.raises(UserError, match="pip install diffusers"):
        load_vae(tiny_vae_dir)


@needs_diffusers
def test_latent_cache_encodes_once_and_never_reuses_stale(tmp_path, tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    encodes = []
    encode = vae.encode

    def counting_encode(x):
        encodes.append(x.shape[0])
        return encode(x)

    vae.encode = counting_encode  # count the frames the VAE really encodes
    data = MovingSprites(num_videos=3, num_frames=3, size=16)
    cache = LatentCache(data, vae, tmp_path / "cache")
    assert len(cache) == 3
    first = [cache[i] for i in range(3)]
    assert sum(encodes) == 9 and all(z.shape == (3, 4, 16, 16) for z in first)
    assert torch.allclose(first[1], encode_video(vae, data[1][None])[0])
    files = sorted(cache.dir.glob("*.safetensors"))
    assert len(files) == 3 and not list(cache.dir.glob(".*"))  # no temp files left behind
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    encodes.clear()

    again = LatentCache(MovingSprites(num_videos=3, num_frames=3, size=16), vae, tmp_path / "cache")
    assert again.dir == cache.dir
    assert all(torch.equal(again[i], first[i]) for i in range(3))
    assert encodes == [] and [os.stat(f).st_mtime_ns for f in files] == mtimes

    other_data = LatentCache(MovingSprites(num_videos=3, num_frames=3, size=16, seed=1), vae, tmp_path / "cache")
    torch.manual_seed(1)
    from diffusers import AutoencoderKL
    other_vae = AutoencoderKL.from_config(vae.config).eval()  # same config, other weights
    other_weights = LatentCache(data, other_vae, tmp_path / "cache")
    assert len({cache.dir, other_data.dir, other_weights.dir}) == 3
    assert not torch.allclose(other_data[0], first[0])
    assert encodes == [3]  # the changed dataset was encoded, not read from the old files
    assert not torch.allclose(other_weights[0], first[0])
